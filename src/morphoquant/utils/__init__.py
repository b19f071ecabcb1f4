"""Small shared utilities (no model or numerics imports)."""
from .atomic import (
                     atomic_directory,
                     atomic_write_bytes,
                     atomic_write_json,
                     atomic_write_text,
                     fsync_dir,
                     fsync_file,
                     fsync_tree,
)

__all__ = ["atomic_directory", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "fsync_dir",
           "fsync_file", "fsync_tree"]
