"""Integer GEMM kernels: ``acc[n, o] = Σ_c (u[n, c] − off) · w[o, c]`` for unsigned activation codes
``u ∈ [0, 2^a − 1]`` with a per-tensor offset ``off`` and int8 weight codes ``w``, accumulated exactly in int32
and returned as float32 — i.e. ``fl(acc)``, exact while ``|acc| < 2^24`` (always for 4-bit × 4-bit) and
correctly rounded once beyond. Each kernel checks its bounds (no int32 overflow, no inexact intermediate) when
a layer is prepared and refuses a layer it cannot compute that way.

* ``int_mm`` — ``torch._int_mm`` (int8 × int8 → int32), the reference. On CUDA it needs M > 16 and K, N
  multiples of 8 (we pad); the CPU build of torch 2.13 accepts any shape (see tests/runtime) but, on a CPU
  without AVX512-VNNI/AMX, runs a naive loop — ~10× *slower* than an fp32 GEMM on this machine's AVX2 CPU.
* ``onednn`` — ``torch.ops.onednn.qlinear_pointwise`` (the int8 GEMM behind torch's x86 quantization: u8 × s8 →
  s32 with the activation zero point compensated in integers) with unit scales so that it returns the raw
  accumulator. On AVX2 it multiplies with ``vpmaddubsw``, which saturates pairs of products at ±32767: exact only
  while ``2 · max(u) · max|w| ≤ 32767``. Layers beyond that (8-bit × 8-bit) are split into two 4-bit activation
  halves ``u = 16·h + l`` (two GEMMs, combined in int32). Fastest here for large M (prefill).
* ``fbgemm`` — ``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``: the same u8 × s8 arithmetic (and
  saturation rule; 8 × 8 bits refused) through FBGEMM, 3–8× faster than oneDNN for M ≤ 16 (decode).
* ``auto`` — FBGEMM, oneDNN for what it refuses, ``_int_mm`` last (one packed copy of the weights);
  ``auto-fast`` — FBGEMM up to 64 rows and oneDNN above (two copies).

A probe run on first use checks each kernel's exactness (with and without the folded weight scale) on random and
saturation-prone extreme operands; a kernel that fails it reports itself unavailable.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["AutoKernel", "FBGEMMKernel", "IntKernel", "IntMMKernel", "OneDNNKernel", "available_kernels", "get_kernel",
           "int_mm", "int_mm_matmul", "prepare_first"]

_EXACT = 2 ** 24
_INT32 = 2 ** 31 - 1
_PAIR = 32767


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a[M, K] @ b[K, N]`` for int8 inputs → int32 with ``torch._int_mm``; pads to the CUDA constraints
    (M > 16, K and N multiples of 8) when running on CUDA. On CPU, ``K = 1`` (e.g. a last weight group of one
    channel) is padded to ``K = 2`` with a zero column: torch 2.13's CPU ``_int_mm`` returns garbage for
    ``K = 1, N > 1`` on AMX processors (Sapphire Rapids; measured, every M); zeros add nothing to the sums."""
    m, k = a.shape
    n = b.shape[1]
    if a.is_cuda:
        pm, pk, pn = max(0, 17 - m), (-k) % 8, (-n) % 8
        if pm or pk or pn:
            a = torch.nn.functional.pad(a, (0, pk, 0, pm))
            b = torch.nn.functional.pad(b, (0, pn, 0, pk))
            return torch._int_mm(a, b)[:m, :n]
    elif k == 1:
        a = torch.nn.functional.pad(a, (0, 1))
        b = torch.nn.functional.pad(b, (0, 0, 0, 1))
    return torch._int_mm(a, b)


def int_mm_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The ``matmul`` plug of :func:`morphoquant.numerics.integer_gemm.integer_linear`: ``a @ b.T`` with
    ``a``/``b`` integer-valued (any dtype, values in int8 range) → float32 via ``torch._int_mm``."""
    a16 = a.to(torch.int16)
    shift = 128 if a16.numel() and int(a16.max()) > 127 else 0      # 8-bit unsigned codes: shift into int8
    acc = int_mm((a16 - shift).to(torch.int8), b.to(torch.int8).T)
    if shift:
        acc += shift * b.to(torch.int32).sum(1)
    return acc.float()


class IntKernel:
    """Interface. ``prepare(w, act_bits, scale)`` once per weight (group); ``matmul(codes, off, handle)`` per
    forward, where ``codes`` are float tensors holding integer activation codes in ``[qmin, qmax]`` and
    ``off`` = ``-qmin`` for symmetric codes (0 for unsigned ones). Returns ``fl(acc)``, or ``fl(fl(acc)·scale)``
    when ``scale`` (fp32 ``[O]``) was given to ``prepare``."""

    name = "abstract"

    def prepare(self, w: torch.Tensor, act_bits: int, scale: torch.Tensor | None = None):  # pragma: no cover
        raise NotImplementedError

    def matmul(self, codes: torch.Tensor, off: int, handle) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class IntMMKernel(IntKernel):
    """``torch._int_mm`` on int8 operands (8-bit unsigned codes are shifted by 128 into int8)."""

    name = "int_mm"

    def prepare(self, w, act_bits, scale=None):
        w = w.to(torch.int8).contiguous()
        wmax = int(w.abs().max()) if w.numel() else 0
        if w.shape[1] * (2 ** act_bits) * max(wmax, 1) >= _INT32:
            raise ValueError(f"int_mm: K={w.shape[1]} with {act_bits}-bit activations may overflow int32")
        return {"b": w.T, "rowsum": w.sum(1, dtype=torch.int32), "wide": act_bits == 8, "scale": scale}

    def matmul(self, codes, off, handle):
        shift = 128 if handle["wide"] and off == 0 else 0
        acc = int_mm((codes - shift).to(torch.int8), handle["b"])
        if shift:
            acc += shift * handle["rowsum"]
        out = acc.float()
        return out if handle["scale"] is None else out.mul_(handle["scale"])


def _onednn_ok() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise") \
        and torch.backends.mkldnn.is_available()


def _pair_split(w: torch.Tensor, act_bits: int, what: str) -> bool:
    """Whether a pairwise-int16 (vpmaddubsw) kernel must split 8-bit activations into two 4-bit halves."""
    k = w.shape[1]
    wmax = max(int(w.abs().max()) if w.numel() else 0, 1)
    umax = 2 ** act_bits - 1
    split = 2 * umax * wmax > _PAIR
    if k * umax * wmax >= _INT32 or (split and (k * 15 * wmax >= _EXACT or 2 * 15 * wmax > _PAIR)):
        raise ValueError(f"{what}: K={k} with {act_bits}-bit activations cannot be computed exactly")
    return split


class OneDNNKernel(IntKernel):
    """oneDNN u8 × s8 GEMM (``torch.ops.onednn.qlinear_pointwise``), unit activation scale, the weight scale
    applied in its epilogue; returns the exact accumulator times the scale (see module docstring)."""

    name = "onednn"

    def prepare(self, w, act_bits, scale=None):
        w = w.to(torch.int8).contiguous()
        o, k = w.shape
        split = _pair_split(w, act_bits, "onednn")
        return {"w": torch.ops.onednn.qlinear_prepack(w, [1, k]), "ones": torch.ones(o),
                "scale": scale.float().reshape(-1).expand(o).contiguous() if scale is not None else None,
                "zp": torch.zeros(o, dtype=torch.long), "split": split, "rowsum": w.sum(1, dtype=torch.int32),
                "o": o}

    @staticmethod
    def _call(u, off, h, scale):
        return torch.ops.onednn.qlinear_pointwise(u, 1.0, off, h["w"], h["ones"] if scale is None else scale,
                                                  h["zp"], None, 1.0, 0, torch.float32, "none", [], "")

    def matmul(self, codes, off, handle):
        if codes.shape[0] == 0:
            return torch.zeros(0, handle["o"])
        u = (codes + off).to(torch.uint8) if off else codes.to(torch.uint8)
        if not handle["split"]:
            return self._call(u, off, handle, handle["scale"])
        hi, lo = u >> 4, u & 15
        acc = self._call(hi, 0, handle, None).to(torch.int32) * 16 + self._call(lo, 0, handle, None).to(torch.int32)
        if off:
            acc -= off * handle["rowsum"]
        out = acc.float()
        return out if handle["scale"] is None else out.mul_(handle["scale"])


def _fbgemm_ok() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32")


class FBGEMMKernel(IntKernel):
    """FBGEMM u8 × s8 GEMM (``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``): the float codes are
    "quantized" with scale 1 and zero point ``off`` (the identity onto uint8), the weight scale is baked into
    the packed weight. Fastest here for small M (decode); 8-bit × 8-bit layers (pair saturation) are refused."""

    name = "fbgemm"

    def prepare(self, w, act_bits, scale=None):
        import warnings

        w = w.to(torch.int8).contiguous()
        o = w.shape[0]
        if _pair_split(w, act_bits, "fbgemm"):
            raise ValueError("fbgemm: 8-bit x 8-bit codes could saturate its pairwise int16 products")
        s = (scale.reshape(-1).expand(o) if scale is not None else torch.ones(o)).double().contiguous()
        prev = torch.backends.quantized.engine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(w, s, torch.zeros(o, dtype=torch.long), 0)
            try:
                torch.backends.quantized.engine = "fbgemm"
                packed = torch.ops.quantized.linear_prepack(qw, None)
            finally:
                torch.backends.quantized.engine = prev
        return {"w": packed, "o": o}

    def matmul(self, codes, off, handle):
        if codes.shape[0] == 0:
            return torch.zeros(0, handle["o"])
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            codes.contiguous(), 1.0, off, handle["w"])


class AutoKernel(IntKernel):
    """Picks kernels per layer. Memory per weight: FBGEMM keeps its int8 input next to the packed copy (2 bytes),
    oneDNN only the packed copy (1 byte).

    * ``mode="lean"`` (default): per-channel weights get one FBGEMM packing (fast for decode, within ~25 % of
      oneDNN for long prefills; 2 B/weight); group-wise weights get oneDNN per-group packings for many rows plus
      one FBGEMM full-K packing for the block-diagonal few-rows path (3 B/weight).
    * ``mode="fast"``: FBGEMM for calls with at most ``small_m`` rows and oneDNN above, for every layer
      (3 B/weight).

    oneDNN / ``_int_mm`` take over wherever a kernel refuses a layer (8-bit × 8-bit for FBGEMM)."""

    name = "auto"

    def __init__(self, mode: str = "lean", small_m: int = 64):
        if mode not in ("lean", "fast"):
            raise ValueError("AutoKernel mode must be 'lean' or 'fast'")
        self.mode, self.small_m = mode, small_m
        self.name = "auto" if mode == "lean" else "auto-fast"
        self.kernels = [k for k in (FBGEMMKernel(), OneDNNKernel(), IntMMKernel()) if _available(k.name)]
        by_name = {k.name: k for k in self.kernels}
        #: preference orders for a layer that only ever sees few rows / many rows
        self.small_kernels = [by_name[n] for n in ("fbgemm", "onednn", "int_mm") if n in by_name]
        self.large_kernels = [by_name[n] for n in ("onednn", "int_mm", "fbgemm") if n in by_name]

    def prepare(self, w, act_bits, scale=None):
        handles = {}
        for k in self.small_kernels if self.mode == "lean" else self.kernels:
            try:
                handles[k.name] = (k, k.prepare(w, act_bits, scale))
            except ValueError:
                continue
            if self.mode == "lean" or k.name != "fbgemm":
                break
        if not handles:
            raise ValueError("no integer kernel can compute this layer exactly")
        return handles

    def matmul(self, codes, off, handle):
        big = codes.shape[0] > self.small_m
        order = ("onednn", "int_mm", "fbgemm") if big else ("fbgemm", "onednn", "int_mm")
        for name in order:
            if name in handle:
                kern, h = handle[name]
                return kern.matmul(codes, off, h)
        raise RuntimeError("no prepared kernel")  # pragma: no cover


def prepare_first(kernels: list[IntKernel], w: torch.Tensor, act_bits: int, scale: torch.Tensor | None = None
                  ) -> tuple[IntKernel, object]:
    """``(kernel, handle)`` from the first of ``kernels`` that can compute ``w`` exactly."""
    errors = []
    for k in kernels:
        try:
            return k, k.prepare(w, act_bits, scale)
        except ValueError as e:
            errors.append(str(e))
    raise ValueError("no integer kernel can compute this layer exactly: " + "; ".join(errors))


def _probe(kernel: IntKernel) -> bool:
    """Exactness check on random and extreme operands (incl. ones that saturate a pairwise int16 kernel)."""
    g = torch.Generator().manual_seed(0)
    try:
        for act_bits, wbits, (m, k, n), off in [(4, 4, (5, 40, 24), 8), (4, 4, (33, 64, 17), 0),
                                                 (8, 4, (3, 96, 8), 128), (8, 8, (19, 72, 16), 128),
                                                 (4, 8, (2, 24, 40), 0), (8, 4, (1, 16, 8), 0)]:
            hi = 2 ** (wbits - 1)
            w = torch.randint(-hi, hi, (n, k), generator=g, dtype=torch.int8)
            qmin, qmax = (-off, 2 ** act_bits - 1 - off)
            codes = torch.randint(qmin, qmax + 1, (m, k), generator=g).float()
            w[0] = -hi + 1
            w[1] = hi - 1
            codes[0] = qmax
            ref = (codes.double() @ w.double().T).float()
            s = torch.rand(n, generator=g) * 1e-2 + 1e-4
            try:
                h = kernel.prepare(w, act_bits)
                hs = kernel.prepare(w, act_bits, s)
            except ValueError:          # the kernel refuses this combination: fine, it is never used for it
                continue
            if not torch.equal(kernel.matmul(codes, off, h), ref):
                return False
            if not torch.equal(kernel.matmul(codes, off, hs), ref * s):
                return False
    except Exception:  # noqa: BLE001 - an unusable kernel is simply unavailable
        return False
    return True


@functools.cache
def _available(name: str) -> bool:
    if name == "int_mm":
        return hasattr(torch, "_int_mm") and _probe(IntMMKernel())
    if name == "onednn":
        return _onednn_ok() and _probe(OneDNNKernel())
    if name == "fbgemm":
        return _fbgemm_ok() and _probe(FBGEMMKernel())
    return False


def available_kernels() -> list[str]:
    return [n for n in ("fbgemm", "onednn", "int_mm") if _available(n)]


def get_kernel(name: str | IntKernel = "auto") -> IntKernel:
    """``"auto"`` (one packed copy: FBGEMM, else oneDNN, else ``torch._int_mm``), ``"auto-fast"`` (FBGEMM for
    small M and oneDNN for large M, two copies), ``"fbgemm"``, ``"onednn"`` or ``"int_mm"``; only kernels whose
    exactness probe passed are used."""
    if isinstance(name, IntKernel):
        return name
    if name in ("auto", "auto-fast"):
        return AutoKernel("lean" if name == "auto" else "fast")
    classes = {"fbgemm": FBGEMMKernel, "onednn": OneDNNKernel, "int_mm": IntMMKernel}
    if name not in classes:
        raise ValueError(f"unknown integer kernel {name!r}; choose auto, auto-fast, fbgemm, onednn or int_mm")
    if not _available(name):
        raise RuntimeError(f"integer kernel {name!r} is not available (or failed its exactness probe) here")
    return classes[name]()
