"""MorphoQuant: modality-aware W4A4 post-training quantization for omni-modal LLMs.

Public API::

    from morphoquant import quantize, load_recipe
    report = quantize(model, "rtn-w4a4", calib_samples)
"""
__version__ = "0.1.0"


def __getattr__(name):
    # the API sits at the top layer; import lazily so `import morphoquant.numerics` stays light
    if name == "load":
        from .export import load_quantized
        return load_quantized
    if name in ("quantize", "load_recipe", "Recipe"):
        from . import api
        return getattr(api, name)
    raise AttributeError(name)
