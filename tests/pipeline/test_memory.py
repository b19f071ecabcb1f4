"""What keeps ``quantize``'s peak memory bounded (the measured bound on Qwen2.5-0.5B is in tests/slow/test_memory_slow.py
and scripts/bench_memory.py): a finished block holds only integer codes and scales — no fp32 copy of its weights."""
import gc
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from morphoquant import quantize
from morphoquant.layers import QuantLinear
from morphoquant.models.tiny import tiny_model
from morphoquant.pipeline.recipe import load_recipe
from morphoquant.pipeline.runner import release_dequantized_weights

RECIPE = {"weights": {"group_size": 16}}


def _quantized_tiny():
    model, factory = tiny_model("llama")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers." in n}
    refs = [weakref.ref(m.weight) for m in linears.values()]
    fp32_bytes = sum(m.weight.numel() * 4 for m in linears.values())
    del linears
    quantize(model, load_recipe("rtn-w4a4", RECIPE), [factory(seed=0), factory(seed=1)], progress=False)
    gc.collect()
    return model, factory, refs, fp32_bytes


def test_finished_blocks_keep_no_fp32_weights():
    model, _, refs, fp32_bytes = _quantized_tiny()
    q = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert q
    assert not any(m.has_cache for m in q)                      # dequantized caches released
    assert all(r() is None for r in refs)                        # the replaced fp32 weights were freed
    held = sum(b.numel() * b.element_size() for m in q for b in m.buffers())
    # int8 codes (1 byte/weight) + scales of groups of 16 + small per-channel vectors: ~1/3 of fp32, not 1 or 2x
    assert held < 0.4 * fp32_bytes, (held, fp32_bytes)


def test_released_cache_is_rebuilt_with_the_same_result():
    model, factory, _, _ = _quantized_tiny()
    sample = factory(seed=3)
    with torch.no_grad():
        a = model(**sample).logits
        freed = sum(release_dequantized_weights(b) for b in model.model.layers)
        b = model(**sample).logits
    assert freed > 0
    assert torch.equal(a, b)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_rss_is_measured_from_the_last_reset():
    # compare resets the mark before each row: a small row after a large one must not report the large peak
    from morphoquant.utils.memory import peak_rss_mb, reset_peak_rss
    big = torch.ones(300 * 2 ** 20 // 4)          # 300 MiB, touched
    big += 1
    high = peak_rss_mb()
    del big
    assert reset_peak_rss()
    low = peak_rss_mb()
    assert high - low > 200, (high, low)
