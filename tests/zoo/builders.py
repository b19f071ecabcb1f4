"""Writers of tiny synthetic checkpoints in the formats the zoo converts (GGUF, CTranslate2, ONNX).

Each builder makes a small random HF model, writes it in the foreign format the way the real exporters do, and
returns the HF model so that tests can compare the converted result against it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|transcribe|>",
    "<|translate|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]


def byte_alphabet() -> list[str]:
    """The 256 byte-level BPE symbols in byte order."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


# ---------------------------------------------------------------------------------------------------- GGUF


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k rows (transformers undoes it when reading GGUF)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, arch: str = "llama", seed: int = 0):
    """Writes a 2-layer ``arch`` ("llama" or "qwen2") GGUF with a byte-level BPE tokenizer; ffn_down of
    layer 0 is stored as Q8_0 (the rest F32).  Returns the reference HF model holding exactly the stored
    values."""
    import gguf
    from gguf.quants import dequantize, quantize
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokens = ["<|endoftext|>", *byte_alphabet(), "Ġt", "he", "Ġthe"]
    merges = ["Ġ t", "h e", "Ġt he"]
    vocab, hidden, inter, heads, kv = len(tokens), 64, 128, 4, 2
    torch.manual_seed(seed)
    common = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    if arch == "llama":
        ref = LlamaForCausalLM(
            LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
        )
    else:
        ref = Qwen2ForCausalLM(
            Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
        )
    ref.eval()
    for p in ref.parameters():  # random norms too, so a dropped norm weight would show
        if p.ndim == 1:
            p.data.uniform_(0.5, 1.5)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in ref.state_dict().items()}

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e4)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (vocab - 1))
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)

    def put(name: str, arr: np.ndarray, q8: bool = False) -> None:
        if q8:
            qa = quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, qa, raw_shape=qa.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            return dequantize(qa, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, np.ascontiguousarray(arr))
        return arr

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    put("output.weight", sd["lm_head.weight"])
    for i in range(2):
        h = f"model.layers.{i}."
        q, k = sd[h + "self_attn.q_proj.weight"], sd[h + "self_attn.k_proj.weight"]
        if arch == "llama":
            q, k = _permute_qk(q, heads), _permute_qk(k, kv)
        put(f"blk.{i}.attn_norm.weight", sd[h + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", q)
        put(f"blk.{i}.attn_k.weight", k)
        put(f"blk.{i}.attn_v.weight", sd[h + "self_attn.v_proj.weight"])
        if arch == "qwen2":
            for n in "qkv":
                put(f"blk.{i}.attn_{n}.bias", sd[h + f"self_attn.{n}_proj.bias"])
        put(f"blk.{i}.attn_output.weight", sd[h + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[h + "post_attention_layernorm.weight"])
        put(f"blk.{i}.ffn_gate.weight", sd[h + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", sd[h + "mlp.up_proj.weight"])
        down = put(f"blk.{i}.ffn_down.weight", sd[h + "mlp.down_proj.weight"], q8=(i == 0))
        ref.get_parameter(h + "mlp.down_proj.weight").data = torch.from_numpy(np.array(down, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


# ---------------------------------------------------------------------------------------------------- CT2


def _ct2_str(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


_CT2_CODES = {
    np.dtype(np.float32): 0,
    np.dtype(np.int8): 1,
    np.dtype(np.int16): 2,
    np.dtype(np.int32): 3,
    np.dtype(np.float16): 4,
}


def write_ct2(
    path: Path,
    variables: dict[str, np.ndarray],
    aliases: dict[str, str] | None = None,
    spec: str = "WhisperSpec",
    version: int = 6,
    bf16: tuple[str, ...] = (),
) -> None:
    """Writes a CTranslate2 ``model.bin``; names in ``bf16`` are stored as bfloat16 (dtype code 5)."""
    out = [
        struct.pack("<I", version),
        _ct2_str(spec),
        struct.pack("<I", 1),
        struct.pack("<I", len(variables)),
    ]
    for name, arr in variables.items():
        arr = np.asarray(arr)
        if name in bf16:
            code, raw = 5, (arr.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
        else:
            code, raw = _CT2_CODES[arr.dtype], np.ascontiguousarray(arr).tobytes()
        out += [
            _ct2_str(name),
            struct.pack("<B", arr.ndim),
            struct.pack("<" + "I" * arr.ndim, *arr.shape),
            struct.pack("<BI", code, len(raw)),
            raw,
        ]
    aliases = aliases or {}
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out += [_ct2_str(alias), _ct2_str(target)]
    Path(path).write_bytes(b"".join(out))


def write_whisper_tokenizer(path: Path) -> int:
    """A byte-level BPE ``tokenizer.json`` with Whisper's special tokens (no timestamps); returns its size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(byte_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.save(str(path))
    return tok.get_vocab_size()


def write_tiny_ct2_whisper(model_dir: Path, seed: int = 0, bf16_name: str | None = None):
    """Writes ``model.bin`` (fp16 weights, fused q/k/v as CTranslate2 stores them), ``tokenizer.json`` and
    ``config.json`` of a tiny Whisper into ``model_dir``; returns the reference HF model (fp16-rounded)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    model_dir.mkdir(parents=True, exist_ok=True)
    n_tok = write_whisper_tokenizer(model_dir / "tokenizer.json")
    vocab = n_tok + 1501  # + the timestamp tokens, as in the real tiny.en (50363 + 1501 = 51864)
    torch.manual_seed(seed)
    cfg = WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=80,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=1500,
        max_target_positions=64,
        decoder_start_token_id=257,
        pad_token_id=256,
        bos_token_id=256,
        eos_token_id=256,
    )
    ref = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.half().float())  # exactly representable in the fp16 file
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}

    def h16(a):
        return np.asarray(a, np.float16)

    v: dict[str, np.ndarray] = {}

    def ln(dst: str, src: str) -> None:
        v[dst + "/gamma"], v[dst + "/beta"] = h16(sd[src + ".weight"]), h16(sd[src + ".bias"])

    def lin(dst: str, src: str) -> None:
        v[dst + "/weight"], v[dst + "/bias"] = h16(sd[src + ".weight"]), h16(sd[src + ".bias"])

    for side in ("encoder", "decoder"):
        v[f"{side}/num_heads"] = np.array(2, np.int16)
        for i in range(2):
            c, h = f"{side}/layer_{i}", f"model.{side}.layers.{i}."
            ln(c + "/self_attention/layer_norm", h + "self_attn_layer_norm")
            a = h + "self_attn."
            v[c + "/self_attention/linear_0/weight"] = h16(
                np.concatenate([sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"]])
            )
            v[c + "/self_attention/linear_0/bias"] = h16(
                np.concatenate([sd[a + "q_proj.bias"], np.zeros(32, np.float32), sd[a + "v_proj.bias"]])
            )
            lin(c + "/self_attention/linear_1", a + "out_proj")
            if side == "decoder":
                x = h + "encoder_attn."
                ln(c + "/attention/layer_norm", h + "encoder_attn_layer_norm")
                lin(c + "/attention/linear_0", x + "q_proj")
                v[c + "/attention/linear_1/weight"] = h16(
                    np.concatenate([sd[x + "k_proj.weight"], sd[x + "v_proj.weight"]])
                )
                v[c + "/attention/linear_1/bias"] = h16(
                    np.concatenate([np.zeros(32, np.float32), sd[x + "v_proj.bias"]])
                )
                lin(c + "/attention/linear_2", x + "out_proj")
            ln(c + "/ffn/layer_norm", h + "final_layer_norm")
            lin(c + "/ffn/linear_0", h + "fc1")
            lin(c + "/ffn/linear_1", h + "fc2")
        ln(f"{side}/layer_norm", f"model.{side}.layer_norm")
        v[f"{side}/position_encodings/encodings"] = h16(sd[f"model.{side}.embed_positions.weight"])
    lin("encoder/conv1", "model.encoder.conv1")
    lin("encoder/conv2", "model.encoder.conv2")
    v["decoder/embeddings/weight"] = h16(sd["model.decoder.embed_tokens.weight"])
    v["decoder/scale_embeddings"] = np.array(0, np.int8)
    bf16 = ()
    if bf16_name is not None:  # store one tensor as bfloat16 and round the reference to match
        bf16 = (bf16_name,)
        v[bf16_name] = np.asarray(v[bf16_name], np.float32)
    write_ct2(
        model_dir / "model.bin",
        v,
        aliases={"decoder/projection/weight": "decoder/embeddings/weight"},
        bf16=bf16,
    )
    (model_dir / "config.json").write_text(
        json.dumps({"alignment_heads": [[1, 0]], "suppress_ids": [1, 2], "suppress_ids_begin": [220, 256]})
    )
    return ref


# ---------------------------------------------------------------------------------------------------- ONNX

_OLD_NAMES = {
    "attention.q_proj.": "attention.attention.query.",
    "attention.k_proj.": "attention.attention.key.",
    "attention.v_proj.": "attention.attention.value.",
    "attention.o_proj.": "attention.output.dense.",
}


def write_tiny_onnx_dinov2(path: Path, seed: int = 0):
    """Writes an ONNX file laid out like an HF ``Dinov2Model`` export under the prefix ``backbone``: named
    initializers, anonymous transposed MatMul weights and anonymous position embeddings.  Only the
    initializers and node names the converter reads are present (the graph is not runnable).  Returns the
    HF model."""
    import onnx
    from onnx import helper, numpy_helper
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    ref = Dinov2Model(
        Dinov2Config(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            patch_size=14,
            image_size=28,
            intermediate_size=512,
            layerscale_value=1.0,
        )
    ).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lambda1" in name or "norm" in name:
                p.uniform_(0.5, 1.5)
    inits, nodes, anon = [], [], [0]

    def anon_init(arr: np.ndarray) -> str:
        anon[0] += 1
        name = f"onnx::Anon_{1000 + anon[0]}"
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, np.float32), name))
        return name

    for key, t in ref.state_dict().items():
        arr = t.detach().numpy()
        if key == "embeddings.mask_token":
            continue
        if key == "embeddings.position_embeddings":
            cls_name, grid_name = anon_init(arr[:, :1]), anon_init(arr[:, 1:])
            nodes.append(
                helper.make_node("Concat", [cls_name, "x"], ["y"], name="/backbone/embeddings/Concat_6")
            )
            nodes.append(
                helper.make_node("Reshape", [grid_name, "s"], ["z"], name="/backbone/embeddings/Reshape_1")
            )
            continue
        for new, old in _OLD_NAMES.items():
            key = key.replace(new, old)
        if key.endswith(".weight") and arr.ndim == 2:  # a Linear: anonymous, transposed, found via its MatMul
            w = anon_init(arr.T)
            node_name = "/backbone/" + key[: -len(".weight")].replace(".", "/").replace("layer/", "layer.")
            nodes.append(helper.make_node("MatMul", ["act", w], ["out"], name=node_name + "/MatMul"))
        else:
            inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), "backbone." + key))
    # A head outside the backbone, which the converter must ignore.
    inits.append(numpy_helper.from_array(np.ones((1, 128, 1, 1), np.float32), "decoder.final_conv.weight"))
    graph = helper.make_graph(nodes, "tiny_dinov2", [], [], initializer=inits)
    onnx.save(helper.make_model(graph), str(path))
    return ref
