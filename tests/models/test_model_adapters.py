"""Model adapters on tiny random models: matching, stacks, row counts, modality ids, groups, protection."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from morphoquant.models import (
    SUPPORTED_ARCHITECTURES,
    AdapterStack,
    AdapterWarning,
    CausalLMAdapter,
    Dinov2Adapter,
    QwenOmniAdapter,
    QwenOmniThinkerAdapter,
    QwenVLAdapter,
    UnsupportedModelError,
    WhisperAdapter,
    get_adapter,
    is_protected,
)
from morphoquant.models.tiny import AUDIO_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN
from morphoquant.statistics.modality import PAD, Modality

EXPECTED = {
    # arch: (adapter class, [(stack name, default_enabled)])
    "llama": (CausalLMAdapter, [("text", True)]),
    "qwen2": (CausalLMAdapter, [("text", True)]),
    "qwen2.5-omni-thinker": (QwenOmniThinkerAdapter, [("vision", False), ("audio", False), ("text", True)]),
    "qwen2.5-omni": (QwenOmniAdapter, [("vision", False), ("audio", False), ("text", True)]),
    "qwen2.5-vl": (QwenVLAdapter, [("vision", False), ("text", True)]),
    "whisper": (WhisperAdapter, [("encoder", True), ("decoder", True)]),
    "dinov2": (Dinov2Adapter, [("vision", True)]),
}
ARCHS = list(EXPECTED)

# (arch, sample options) combinations exercised by the row-count tests
CASES = [(a, {}) for a in ARCHS] + [
    ("qwen2.5-omni-thinker", {"video": True}),
    ("qwen2.5-omni-thinker", {"video": True, "image": False, "audio": False}),
    ("qwen2.5-omni-thinker", {"audio": False}),
    ("qwen2.5-omni-thinker", {"batch_size": 1}),
    ("qwen2.5-omni-thinker", {"batch_size": 3, "seed": 4}),
    ("qwen2.5-vl", {"video": True}),
    ("qwen2.5-vl", {"video": True, "image": False}),
    ("llama", {"batch_size": 3, "seed": 1}),
    ("whisper", {"batch_size": 3}),
]


def _case_id(case):
    arch, opts = case
    return arch + ("-" + "-".join(f"{k}={v}" for k, v in opts.items()) if opts else "")


def capture_block_inputs(stack, sample):
    """Shapes of the first positional tensor of every call of the stack's first block during ``forward``."""
    shapes = []

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        shapes.append(tuple(x.shape))

    h = stack.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            stack.forward(sample)
    finally:
        h.remove()
    return shapes


def capture_linear_rows(stack, sample):
    """Input row count of every linear of the first block (first call of the block only)."""
    rows: dict[str, int] = {}
    handles = []
    for name, lin in stack.linears(stack.blocks[0]).items():
        def hook(module, args, name=name):
            rows.setdefault(name, args[0].numel() // args[0].shape[-1])
        handles.append(lin.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            stack.forward(sample)
    finally:
        for h in handles:
            h.remove()
    return rows


# ----------------------------------------------------------------------------------------------- matching


@pytest.mark.parametrize("arch", ARCHS)
def test_get_adapter_picks_the_right_adapter(tiny, arch):
    model, _ = tiny(arch)
    cls, stacks = EXPECTED[arch]
    adapter = get_adapter(model)
    assert type(adapter) is cls
    assert [(s.name, s.default_enabled) for s in adapter.stacks()] == stacks
    assert all(isinstance(s, AdapterStack) for s in adapter.stacks())
    assert all(len(s.blocks) == 2 for s in adapter.stacks())


def test_supported_architectures_listed():
    for name in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen2_5OmniThinkerForConditionalGeneration",
                 "Qwen2_5OmniForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                 "WhisperForConditionalGeneration", "Dinov2Model"):
        assert name in SUPPORTED_ARCHITECTURES


def test_unsupported_bert_raises_listing_supported():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=32))
    with pytest.raises(UnsupportedModelError) as err:
        get_adapter(bert)
    msg = str(err.value)
    assert "BertModel" in msg
    for name in SUPPORTED_ARCHITECTURES:
        assert name in msg
    assert "register_adapter" in msg
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("obj", [nn.Sequential(nn.Linear(4, 4)), nn.Module(), object(), None])
def test_unsupported_plain_modules_raise(obj):
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        get_adapter(obj)


def test_generic_llama_like_causal_lm_matches(tiny):
    """A renamed Llama-like *ForCausalLM (unknown class name) is still handled by the causal-LM adapter."""
    model, _ = tiny("llama")
    renamed = type("MyLlamaForCausalLM", (nn.Module,), {"forward": lambda self, **kw: self.inner(**kw)})()
    renamed.inner = model
    renamed.model = model.model
    renamed.config = type("Cfg", (), {"model_type": "my_llama", "is_encoder_decoder": False})()
    adapter = get_adapter(renamed)
    assert isinstance(adapter, CausalLMAdapter)
    assert len(adapter.stacks()[0].blocks) == 2


# ----------------------------------------------------------------------------------------------- row counts


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_first_block_rows_equal_modality_ids(tiny, case):
    arch, opts = case
    model, make = tiny(arch)
    sample = make(**opts)
    adapter = get_adapter(model)
    for stack in adapter.stacks():
        shapes = capture_block_inputs(stack, sample)
        assert bool(shapes) == stack.uses_sample(sample), (stack.name, shapes)
        for shape in shapes:
            ids = stack.modality_ids(sample, torch.Size(shape))
            assert ids.dtype == torch.int8
            assert ids.numel() == torch.Size(shape[:-1]).numel(), (stack.name, shape, ids.shape)
            assert tuple(ids.shape) == shape[:-1]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_linear_rows_match_ids_except_cross_inputs(tiny, case):
    """Every linear of block 0 reads as many rows as there are ids, except the declared ``cross_inputs``."""
    arch, opts = case
    model, make = tiny(arch)
    sample = make(**opts)
    for stack in get_adapter(model).stacks():
        if not stack.uses_sample(sample):
            continue
        shape = capture_block_inputs(stack, sample)[0]
        n_ids = stack.modality_ids(sample, torch.Size(shape)).numel()
        rows = capture_linear_rows(stack, sample)
        assert set(rows) == set(stack.linears(stack.blocks[0]))
        different = {n for n, r in rows.items() if r != n_ids}
        assert different == set(stack.cross_inputs), (stack.name, rows, n_ids)


def test_whisper_cross_attention_reads_encoder_rows(tiny):
    model, make = tiny("whisper")
    sample = make()
    dec = get_adapter(model).stack("decoder")
    assert set(dec.cross_inputs) == {"encoder_attn.k_proj", "encoder_attn.v_proj"}
    rows = capture_linear_rows(dec, sample)
    b = sample["input_features"].shape[0]
    assert rows["encoder_attn.k_proj"] == rows["encoder_attn.v_proj"] == b * model.config.max_source_positions
    assert rows["encoder_attn.q_proj"] == sample["decoder_input_ids"].numel()


# ------------------------------------------------------------------------------------------- padding / ids


def _decoder_stack(adapter):
    return adapter.stacks()[-1]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen2.5-omni-thinker", "qwen2.5-omni", "qwen2.5-vl"])
def test_decoder_pad_count_matches_attention_mask(tiny, arch):
    model, make = tiny(arch)
    sample = make()
    assert (sample["attention_mask"] == 0).any(), "tiny samples must contain padding"
    adapter = get_adapter(model)
    stack = _decoder_stack(adapter)
    shape = capture_block_inputs(stack, sample)[0]
    ids = stack.modality_ids(sample, torch.Size(shape))
    assert int((ids == PAD).sum()) == int((sample["attention_mask"] == 0).sum())
    assert torch.equal(ids == PAD, sample["attention_mask"] == 0)
    assert torch.equal(adapter.decoder_modality_ids(sample), ids)


def test_whisper_pad_counts(tiny):
    model, make = tiny("whisper")
    sample = make()
    adapter = get_adapter(model)
    enc, dec = adapter.stacks()
    enc_ids = enc.modality_ids(sample, torch.Size(capture_block_inputs(enc, sample)[0]))
    dec_ids = dec.modality_ids(sample, torch.Size(capture_block_inputs(dec, sample)[0]))
    # encoder row j is padding when mel frame 2j is (conv2 has stride 2)
    assert int((enc_ids == PAD).sum()) == int((sample["attention_mask"][:, ::2] == 0).sum()) > 0
    assert set(enc_ids[enc_ids != PAD].tolist()) == {int(Modality.AUDIO)}
    assert int((dec_ids == PAD).sum()) == int((sample["decoder_attention_mask"] == 0).sum()) > 0
    assert set(dec_ids[dec_ids != PAD].tolist()) == {int(Modality.TEXT)}
    assert torch.equal(adapter.decoder_modality_ids(sample), dec_ids)
    # without the frame mask every encoder row counts
    no_mask = {k: v for k, v in sample.items() if k != "attention_mask"}
    no_mask_shape = torch.Size(capture_block_inputs(enc, no_mask)[0])
    assert int((enc.modality_ids(no_mask, no_mask_shape) == PAD).sum()) == 0


@pytest.mark.parametrize("arch", ["qwen2.5-omni-thinker", "qwen2.5-omni"])
def test_omni_ids_contain_image_audio_text(tiny, arch):
    model, make = tiny(arch)
    sample = make()
    adapter = get_adapter(model)
    ids = adapter.decoder_modality_ids(sample)
    present = set(ids.unique().tolist())
    assert {int(Modality.TEXT), int(Modality.IMAGE), int(Modality.AUDIO), PAD} <= present
    assert torch.equal(ids == int(Modality.IMAGE), sample["input_ids"] == IMAGE_TOKEN)
    assert torch.equal(ids == int(Modality.AUDIO), sample["input_ids"] == AUDIO_TOKEN)
    vid = make(video=True)
    ids = adapter.decoder_modality_ids(vid)
    assert torch.equal(ids == int(Modality.VIDEO), vid["input_ids"] == VIDEO_TOKEN)
    assert int((ids == int(Modality.VIDEO)).sum()) > 0


def test_omni_tower_ids(tiny):
    model, make = tiny("qwen2.5-omni-thinker")
    adapter = get_adapter(model)
    vision, audio = adapter.stack("vision"), adapter.stack("audio")
    # image + video sample: the tower runs twice, images first
    sample = make(video=True)
    calls = [vision.modality_ids(sample, torch.Size(s)) for s in capture_block_inputs(vision, sample)]
    assert [set(c.tolist()) for c in calls] == [{int(Modality.IMAGE)}, {int(Modality.VIDEO)}]
    # video only
    vid = make(video=True, image=False, audio=False)
    (shape,) = capture_block_inputs(vision, vid)
    assert set(vision.modality_ids(vid, torch.Size(shape)).tolist()) == {int(Modality.VIDEO)}
    # audio: feature padding is dropped by the model, so all rows are audio and rows = sum(ceil(len/2))
    (shape,) = capture_block_inputs(audio, sample)
    ids = audio.modality_ids(sample, torch.Size(shape))
    lens = sample["feature_attention_mask"].sum(-1)
    assert ids.numel() == int(((lens - 1) // 2 + 1).sum())
    assert set(ids.tolist()) == {int(Modality.AUDIO)}


def test_tower_ids_with_unknown_layout_warn_and_fall_back(tiny):
    model, make = tiny("qwen2.5-omni-thinker")
    audio = get_adapter(model).stack("audio")
    sample = make()
    with pytest.warns(AdapterWarning):
        ids = audio.modality_ids(sample, torch.Size([7, 64]))
    assert ids.shape == (7,) and set(ids.tolist()) == {int(Modality.AUDIO)}


def test_decoder_ids_reject_wrong_shape(tiny):
    model, make = tiny("llama")
    stack = get_adapter(model).stacks()[0]
    with pytest.raises(ValueError, match="modality ids"):
        stack.modality_ids(make(), torch.Size([2, 5, 64]))


def test_vl_ids(tiny):
    model, make = tiny("qwen2.5-vl")
    sample = make(video=True)
    ids = get_adapter(model).decoder_modality_ids(sample)
    assert torch.equal(ids == int(Modality.IMAGE), sample["input_ids"] == IMAGE_TOKEN)
    assert torch.equal(ids == int(Modality.VIDEO), sample["input_ids"] == VIDEO_TOKEN)
    assert int(Modality.AUDIO) not in ids.tolist()


# ----------------------------------------------------------------------------------------------- groups


@pytest.mark.parametrize("arch", ARCHS)
def test_sequential_groups_cover_every_linear(tiny, arch):
    model, _ = tiny(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdapterWarning)  # no unknown linears in any tiny architecture
        adapter = get_adapter(model)
        stacks = adapter.stacks()
    for stack in stacks:
        flat = [s for g in stack.sequential_groups for s in g]
        assert len(flat) == len(set(flat)), (stack.name, flat)
        assert all(g for g in stack.sequential_groups)
        for block in stack.blocks:
            modules = dict(block.named_modules())
            for suffix in flat:
                assert suffix in modules and isinstance(modules[suffix], nn.Linear), (stack.name, suffix)
            assert set(flat) == set(stack.linears(block)), (stack.name, flat, list(stack.linears(block)))


def test_known_group_layouts(tiny):
    omni = get_adapter(tiny("qwen2.5-omni-thinker")[0])
    assert omni.stack("vision").sequential_groups[0] == ["attn.q", "attn.k", "attn.v"]  # not fused in 5.24
    vl = get_adapter(tiny("qwen2.5-vl")[0])
    assert vl.stack("vision").sequential_groups[0] == ["attn.qkv"]
    assert omni.stack("text").sequential_groups == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    wh = get_adapter(tiny("whisper")[0])
    assert ["encoder_attn.k_proj", "encoder_attn.v_proj"] in wh.stack("decoder").sequential_groups


# ----------------------------------------------------------------------------------------------- protection


@pytest.mark.parametrize("arch", ARCHS)
def test_protected_modules(tiny, arch):
    model, _ = tiny(arch)
    adapter = get_adapter(model)
    protected = adapter.protected_module_names()
    in_blocks = {id(m) for s in adapter.stacks() for b in s.blocks for m in b.modules()}
    names = dict(model.named_modules())
    for p in protected:
        assert p in names, p
        assert id(names[p]) not in in_blocks, p
    # every Linear / Embedding is either inside a stack block or protected
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)) and id(mod) not in in_blocks:
            assert is_protected(name, protected), name
    head = {"whisper": "proj_out", "dinov2": None, "qwen2.5-omni": "thinker.lm_head"}.get(arch, "lm_head")
    if head:
        assert head in protected


def test_full_omni_protects_talker_and_token2wav(tiny):
    model, _ = tiny("qwen2.5-omni")
    protected = get_adapter(model).protected_module_names()
    assert "talker" in protected and "token2wav" in protected
    assert is_protected("talker.model.layers.0.self_attn.q_proj", protected)
    assert not any(p.startswith("thinker.model.language_model.layers") for p in protected)


def test_fake_full_omni_tree(tiny):
    """A module tree shaped like the full Omni model: only the thinker is adapted."""
    thinker, make = tiny("qwen2.5-omni-thinker")
    fake_cls = type("Qwen2_5OmniForConditionalGeneration", (nn.Module,), {})
    fake = fake_cls()
    fake.thinker = thinker
    fake.talker = nn.Sequential(nn.Linear(8, 8))
    fake.token2wav = nn.Sequential(nn.Linear(8, 8))
    adapter = get_adapter(fake)
    assert isinstance(adapter, QwenOmniAdapter)
    protected = adapter.protected_module_names()
    assert {"talker", "token2wav", "thinker.lm_head"} <= set(protected)
    text = adapter.stack("text")
    sample = make()
    shape = capture_block_inputs(text, sample)[0]
    assert text.modality_ids(sample, torch.Size(shape)).numel() == shape[0] * shape[1]


# ----------------------------------------------------------------------------------------------- misc


def test_forward_ignores_metadata_keys(tiny):
    model, make = tiny("llama")
    stack = get_adapter(model).stacks()[0]
    sample = make()
    sample["modality_ids"] = torch.zeros_like(sample["input_ids"], dtype=torch.int8)
    assert capture_block_inputs(stack, sample) == [(2, 12, model.config.hidden_size)]


def test_make_sample(tiny):
    llama = get_adapter(tiny("llama")[0])
    s = llama.make_sample(input_ids=[5, 6, 7])
    assert s["input_ids"].shape == (1, 3) and s["attention_mask"].tolist() == [[1, 1, 1]]
    whisper = get_adapter(tiny("whisper")[0])
    s = whisper.make_sample(input_features=torch.zeros(1, 16, 32))
    assert s["decoder_input_ids"].tolist() == [[whisper.model.config.decoder_start_token_id]]
    # the whisper stacks run without decoder inputs too (decoder_start_token_id is filled in)
    bare = {"input_features": torch.zeros(1, 16, 32)}
    assert capture_block_inputs(whisper.stack("decoder"), bare) == [(1, 1, 32)]


def test_stack_forward_disables_cache(tiny):
    model, make = tiny("llama")
    seen = {}
    handle = model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            get_adapter(model).stacks()[0].forward(make())
    finally:
        handle.remove()
    assert seen.get("use_cache") is False


def test_register_adapter_takes_precedence(tiny):
    from morphoquant.models import ADAPTERS, ModelAdapter, register_adapter

    class MyLlama(ModelAdapter):
        name = "my-llama"
        architectures = ("LlamaForCausalLM",)

    saved = list(ADAPTERS)
    try:
        register_adapter(MyLlama)
        assert isinstance(get_adapter(tiny("llama")[0]), MyLlama)
        assert "LlamaForCausalLM" in SUPPORTED_ARCHITECTURES
    finally:
        ADAPTERS[:] = saved
        register_adapter(saved[0])  # refresh SUPPORTED_ARCHITECTURES
    assert isinstance(get_adapter(tiny("llama")[0]), CausalLMAdapter)
