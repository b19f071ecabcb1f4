import copy
import math

import pytest
import torch

from morphoquant import quantize
from morphoquant.methods.morpho import ClipSearch, MorphoOptions, row_weights
from morphoquant.models.tiny import tiny_model
from morphoquant.numerics import QuantSpec
from morphoquant.pipeline.recipe import load_recipe
from morphoquant.statistics import Modality

SPEC = QuantSpec(4, False, "channel")


def _hetero(n_text=1900, n_audio=100, c=16, seed=0):
    """Text rows: Gaussian; audio rows (5 %): heavy-tailed and 6x wider on every channel."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(n_text, c, generator=g)
    audio = torch.distributions.StudentT(3.0).sample((n_audio, c)) * 6
    x = torch.cat([text, audio])
    ids = torch.cat([torch.zeros(n_text), torch.full((n_audio,), int(Modality.AUDIO))]).to(torch.int8)
    return x, ids


def _mse(x, xh, sel):
    return float((x[sel] - xh[sel]).pow(2).mean())


def test_row_weights_balanced_equalises_modalities():
    ids = torch.tensor([0, 0, 0, 3], dtype=torch.int8)
    w = row_weights(ids, 4, "balanced")
    torch.testing.assert_close(w, torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 2]))
    torch.testing.assert_close(row_weights(ids, 4, "pooled"), torch.full((4,), 0.25))
    w = row_weights(ids, 4, {"text": 3.0, "audio": 1.0})
    torch.testing.assert_close(w, torch.tensor([.25, .25, .25, .25]))


def test_balanced_objective_changes_alpha_when_one_modality_is_rare():
    x, ids = _hetero()
    lo, hi = x.amin(0), x.amax(0)
    none = torch.zeros(x.shape[1], dtype=torch.bool)
    r = {}
    for mode in ("pooled", "balanced"):
        o = MorphoOptions(dabc="none", lambda_cos=0.0, modality_weighting=mode, base_interval="minmax")
        r[mode], _ = ClipSearch(o, SPEC, dynamic=False).search(x, row_weights(ids, len(ids), mode), lo, hi, none)
    # pooled clips hard for the 95 % text rows; balanced keeps more of the audio range
    assert r["balanced"].mean() > r["pooled"].mean() + 0.05


def test_modality_aware_recipe_beats_pooled_on_rare_modality():
    """Synthetic heterogeneous data: the balanced objective lowers the rare modality's error at little cost."""
    from morphoquant.methods.morpho import fake_channel
    x, ids = _hetero(seed=1)
    xt, idt = _hetero(seed=2)      # held-out rows
    lo, hi = x.amin(0), x.amax(0)
    none = torch.zeros(x.shape[1], dtype=torch.bool)
    err = {}
    for mode in ("pooled", "balanced"):
        o = MorphoOptions(dabc="none", lambda_cos=0.0, modality_weighting=mode, base_interval="minmax")
        r, _ = ClipSearch(o, SPEC, False).search(x, row_weights(ids, len(ids), mode), lo, hi, none)
        xh = fake_channel(xt, r * lo, r * hi, SPEC)
        err[mode] = (_mse(xt, xh, idt == 3), _mse(xt, xh, idt == 0))
    # held-out: the rare modality's error drops clearly, and the modality-averaged error is lower
    assert err["pooled"][0] / err["balanced"][0] > 1.2
    assert sum(err["balanced"]) < sum(err["pooled"])


def test_search_accumulates_over_all_rows_not_ema():
    """With accumulate=sum the choice depends on every row; with an EMA the last batch dominates."""
    g = torch.Generator().manual_seed(0)
    calm = torch.randn(1024, 4, generator=g)
    wild = torch.randn(64, 4, generator=g) * 20
    x = torch.cat([wild, calm])            # wild rows first: an EMA forgets them
    lo, hi = x.amin(0), x.amax(0)
    none = torch.zeros(4, dtype=torch.bool)
    w = torch.full((x.shape[0],), 1 / x.shape[0])
    r_sum, _ = ClipSearch(MorphoOptions(dabc="none", lambda_cos=0, search_batch_rows=64), SPEC, False).search(
        x, w, lo, hi, none)
    r_ema, _ = ClipSearch(MorphoOptions(dabc="none", lambda_cos=0, accumulate="ema", search_batch_rows=64), SPEC,
                          False).search(x, w, lo, hi, none)
    assert not torch.equal(r_sum, r_ema)


def test_cosine_term_runs_and_is_deterministic():
    x, ids = _hetero(c=12)
    lo, hi = x.amin(0), x.amax(0)
    none = torch.zeros(12, dtype=torch.bool)
    o = MorphoOptions(dabc="none", lambda_cos=5.0)
    w = row_weights(ids, len(ids), "pooled")
    a, _ = ClipSearch(o, SPEC, False).search(x, w, lo, hi, none)
    b, _ = ClipSearch(o, SPEC, False).search(x, w, lo, hi, none)
    assert torch.equal(a, b) and ((a >= 0.3 - 1e-6) & (a <= 1.0 + 1e-6)).all()


@pytest.mark.parametrize("held", [True, False])
@pytest.mark.parametrize("dabc", ["dense", "sparse", "none"])
def test_cosine_sweep_matches_brute_force_objective(dabc, held, monkeypatch):
    """One Jacobi sweep picks, per channel, the candidate minimising L_p/C + λ(1 − Σ_t w_t cos_t) with every other
    channel at its starting ratio — checked against recomputing x̂ and the per-token cosine from scratch."""
    g = torch.Generator().manual_seed(3)
    n, c = 96, 6
    x = torch.randn(n, c, generator=g) * torch.tensor([1.0, 3.0, 0.5, 8.0, 1.0, 2.0]) + 0.3
    lo, hi = x.amin(0), x.amax(0)
    outliers = torch.tensor([False, False, False, True, False, False])
    o = MorphoOptions(dabc=dabc, lambda_cos=4.0, cos_sweeps=1, grid_points=5, budget=None)
    cs = ClipSearch(o, SPEC, False)
    if not held:    # candidates rebuilt on use instead of held (what large layers do)
        monkeypatch.setattr("morphoquant.methods.morpho.SWEEP_CANDIDATE_BYTES", 0)
    w = torch.full((n,), 1.0 / n)
    grid = o.grid()
    lp = torch.stack([cs._batched_lp(x, torch.full((c,), float(r)), lo, hi, outliers, w, None)[0] for r in grid])
    start = torch.tensor([0, 4, 2, 1, 3, 0])
    got = cs._cosine_sweeps(x, w, grid, start.clone(), lp, lo, hi, outliers, None)
    want = torch.empty(c, dtype=torch.long)
    for ch in range(c):
        objective = []
        for j in range(len(grid)):
            pick = start.clone()
            pick[ch] = j
            xh = cs._reconstruct(x, grid[pick], lo, hi, outliers)[0]
            cos = (x * xh).sum(1) / (x.norm(dim=1) * xh.norm(dim=1))
            objective.append(float(lp[j, ch]) / c + 4.0 * (1 - float((w * cos).sum())))
        want[ch] = min(range(len(grid)), key=objective.__getitem__)
    assert torch.equal(got, want)


def test_sparse_budget_bounds_bypassed_elements():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g)
    x[:, 0] *= 30
    mask = torch.zeros(8, dtype=torch.bool)
    mask[0] = True
    lo, hi = x.amin(0), x.amax(0)
    w = torch.full((2000,), 1 / 2000)
    o = MorphoOptions(dabc="sparse", rho=0.8, budget=0.01, lambda_cos=0)
    search = ClipSearch(o, SPEC, False)
    r, _ = search.search(x, w, lo, hi, mask)
    _, by = search._reconstruct(x, r, lo, hi, mask)
    assert float(by.sum()) / x.numel() <= 0.01 + 1e-9
    o_unbounded = MorphoOptions(dabc="sparse", rho=0.8, budget=None, lambda_cos=0)
    r2, _ = ClipSearch(o_unbounded, SPEC, False).search(x, w, lo, hi, mask)
    assert r2[0] <= r[0]      # without a budget the outlier channel drifts to a smaller clip (authors' behaviour)


@pytest.mark.parametrize("recipe", ["morpho", "morpho-reference", "morpho-modal", "morpho-plus"])
def test_recipes_run_on_tiny_omni_with_mixed_modalities(recipe):
    model, factory = tiny_model("qwen2.5-omni-thinker")
    samples = [factory(seed=0), factory(seed=1, video=True)]
    q = copy.deepcopy(model)
    rep = quantize(q, load_recipe(recipe, {"weights": {"group_size": 16}}), samples, progress=False)
    info = rep.records[0].linears["self_attn.q_proj"]
    assert {"outlier_channels", "effective_bits", "loss_by_modality"} <= set(info)
    assert {"text", "image", "audio"} <= set(info["loss_by_modality"])
    with torch.no_grad():
        out = q(**factory(seed=3))
    assert torch.isfinite(out.logits).all()


def test_dense_budget_caps_outlier_share_and_reports_bits():
    model, factory = tiny_model("llama")
    q = copy.deepcopy(model)
    rep = quantize(q, load_recipe("morpho", {"weights": {"group_size": 16}, "options": {"budget": 0.02, "k": 0.5}}),
                   [factory()], progress=False)
    for rec in rep.records:
        for info in rec.linears.values():
            assert info["outlier_fraction"] <= 0.02 + 1e-9
            assert info["effective_bits"] == pytest.approx(4 + 16 * info["outlier_fraction"])


def test_modality_ranges_fit_each_modality_and_run_without_explicit_context():
    """Per-modality ranges (extension 4b): on the tiny Omni thinker every mixed layer gets multipliers, a plain
    forward of the quantized model works (the adapter supplies the ids) and equals an explicit context."""
    from morphoquant.models import get_adapter
    from morphoquant.statistics import modality_context
    model, factory = tiny_model("qwen2.5-omni-thinker")
    samples = [factory(seed=0), factory(seed=1, video=True)]
    q = copy.deepcopy(model)
    rep = quantize(q, load_recipe("morpho-modal", {"weights": {"group_size": 16},
                                                   "options": {"modality_range_min_rows": 4}}),
                   samples, progress=False)
    info = rep.records[0].linears["self_attn.q_proj"]
    assert {"text", "image", "audio"} <= set(info["modality_range_scale"])
    from morphoquant.layers import QuantLinear
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.modality_scale.numel() == len(Modality) + 1 for m in layers)
    s = factory(seed=3)
    with torch.no_grad():
        plain = q(**s).logits
        with modality_context(get_adapter(q).decoder_modality_ids(s)):
            explicit = q(**s).logits
    assert torch.equal(plain, explicit)


def test_modality_scale_search_picks_wider_range_for_wider_modality():
    from morphoquant.methods.morpho import search_modality_scales
    x, ids = _hetero(n_text=400, n_audio=400, c=8)
    lo, hi = x[ids == 0].amin(0), x[ids == 0].amax(0)          # ranges fitted to text
    none = torch.zeros(8, dtype=torch.bool)
    t, _info = search_modality_scales(x, ids, lo, hi, none, MorphoOptions(lambda_cos=0.0), SPEC, False)
    assert t[int(Modality.AUDIO)] > 1.5 and 0.5 < t[int(Modality.TEXT)] <= 1.2
    assert t[-1] == 1.0
    one, _ = search_modality_scales(x[ids == 0], ids[ids == 0], lo, hi, none, MorphoOptions(), SPEC, False)
    assert one is None


def test_modal_recipe_equals_the_paper_recipe_on_text_only_models(run_recipe):
    """On a text-only model every modality-aware extension is a no-op (one modality: balanced = pooled, the
    per-modality outlier union is the pooled test, no per-modality range is searched), so `morpho-modal` gives
    exactly the paper recipe's model — which is why it is not run separately on the text-only benchmarks."""
    outs = []
    for name in ("morpho", "morpho-modal"):
        d = load_recipe(name).model_dump(mode="json")
        d["name"] = "x"
        d["description"] = ""
        d["options"]["grid_points"] = 4
        err, _report, model = run_recipe("llama", d)
        outs.append((err, {n: b.clone() for n, b in model.state_dict().items()}))
    assert outs[0][0] == outs[1][0]
    assert outs[0][1].keys() == outs[1][1].keys()
    assert all(torch.equal(outs[0][1][k], outs[1][1][k]) for k in outs[0][1])


def _stacked_outlier_errors(w, s, ch, cands, m2, spec):
    """Oracle: quantize every candidate's whole folded matrix and sum the weighted errors."""
    from morphoquant.numerics import quantize_weight
    out = []
    for cand in cands.tolist():
        sc = s.clone()
        sc[ch] = cand
        deq = quantize_weight(w * sc, spec).dequantize() / sc
        out.append(float(((w - deq) ** 2 * m2).sum()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("spec", [QuantSpec(8, True, "channel"), QuantSpec(4, False, "channel"),
                                  QuantSpec(4, True, "channel", fmt="nf4"),
                                  QuantSpec(4, True, "channel", full_range=True)],
                         ids=["int8-sym", "int4-asym", "nf4", "int4-full-range"])
def test_row_scale_errors_equal_the_stacked_matrices(spec):
    # the channel-granularity fast path of the outlier-scale search must give the errors of quantizing the whole
    # [P, O, C] stack, rows where the candidate sets the min/max included (large candidates) and rows where not
    from morphoquant.methods import morpho
    g = torch.Generator().manual_seed(1)
    o, c = 24, 40
    w = torch.randn(o, c, generator=g)
    s = torch.rand(c, generator=g) + 0.5
    s[[3, 17]] = torch.tensor([30.0, 0.05])
    m2 = torch.rand(c, generator=g) + 0.1
    cands = torch.logspace(-2, 2, 33)
    for ch in (3, 17, 0, c - 1):
        fast = morpho._row_scale_errors(w, s, ch, cands, m2, spec).double()
        slow = _stacked_outlier_errors(w, s, ch, cands, m2, spec)
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-7)
    # and both kinds of rows occur: some candidates keep every row's parameters, the largest change them all
    v = w[:, 3].unsqueeze(0) * cands.unsqueeze(1)
    rest = torch.cat([(w * s)[:, :3], (w * s)[:, 4:]], 1)
    inside = (v >= rest.amin(1)) & (v <= rest.amax(1))
    assert bool(inside[0].all()) and int((~inside[-1]).sum()) > o // 2


def test_outlier_scale_search_channel_weights_matches_a_brute_force_coordinate_pass(monkeypatch):
    from morphoquant.methods import morpho
    spec = QuantSpec(8, True, "channel")
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 48, generator=g)
    scale = torch.rand(48, generator=g) * 0.1 + 0.05
    idx = torch.tensor([5, 9, 30])
    scale[idx] = torch.tensor([4.0, 0.9, 12.0])
    m2 = torch.rand(48, generator=g) + 0.1
    monkeypatch.setattr(morpho, "ROW_SEARCH_BYTES", 4 * 48 * 3 * 7)     # re-quantized rows in chunks of 7
    got = morpho.search_outlier_scales(w, scale, idx, m2, spec)
    s = scale.clone()
    s_med = scale[torch.ones(48, dtype=torch.bool).index_fill_(0, idx, False)].median()
    for ch in idx.tolist():
        lo = min(float(s_med), float(scale[ch])) / 16
        hi = max(float(s_med), float(scale[ch])) * 4
        cands = torch.logspace(math.log10(lo), math.log10(hi), 33)
        s[ch] = cands[int(_stacked_outlier_errors(w, s, ch, cands, m2, spec).argmin())]
    torch.testing.assert_close(got, s, rtol=0, atol=0)
    assert not torch.equal(got[idx], scale[idx])
