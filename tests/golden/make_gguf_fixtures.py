#!/usr/bin/env python3
"""Small GGUF fixtures written by llama.cpp's own Python package (`gguf`),
so Kiln's GGUF reader is checked against an independent writer and an
independent dequantizer. Not run in CI; run it once and commit the output:

    /path/to/venv/bin/pip install -r tests/golden/requirements.txt
    python tests/golden/make_gguf_fixtures.py

It writes into tests/fixtures/gguf/:

- quant.gguf + quant_expected.npy: one tensor per ggml type Kiln reads
  (F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K) made of random blocks, and
  what `gguf.quants.dequantize` makes of each, stacked in file order
  ([8, 4, 512]).
- llama-gqa.gguf, qwen3.gguf, llama3-rope.gguf, phi3.gguf,
  phi3-longrope.gguf: the Hugging Face fixtures of the same names
  (tests/fixtures/models/) as llama.cpp's converter (convert_hf_to_gguf.py,
  https://github.com/ggml-org/llama.cpp) would store them: its tensor names,
  its metadata keys, Llama's Q/K rows permuted for interleaved RoPE, and the
  byte-level BPE tokenizer as `tokenizer.ggml.*` arrays. Weights stay F32,
  so Kiln must reproduce the transformers goldens of those fixtures
  (tests/fixtures/golden/) from the GGUF alone.
  - llama3-rope: `rope_freqs.weight`, the per-frequency divisors the
    converter computes from `llama3` rope scaling (LlamaModel.
    generate_extra_tensors), computed here as it does.
  - phi3, phi3-longrope: architecture `phi3` (Phi3MiniModel): fused
    `attn_qkv` and `ffn_up` (gate then up) as transformers stores them,
    `rope.dimension_count` the rotated part of a head,
    `rope.scaling.original_context_length`, and for longrope
    `rope_factors_long/short.weight` with `rope.scaling.attn_factor`.
    (The converter would take a Phi-3 vocabulary from tokenizer.model, which
    these fixtures do not have; their byte-level BPE is stored as for the
    others.)
- phi3-q8_0.gguf: phi3.gguf with every matrix in Q8_0 blocks
  (`gguf.quants.quantize`), as `llama-quantize` leaves them, so the fused
  matrices Kiln keeps in blocks are split in their blocks.
"""

import json
import math
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "tests" / "fixtures" / "models"
OUT = ROOT / "tests" / "fixtures" / "gguf"
Q = gguf.GGMLQuantizationType


def random_blocks(rng, qtype, rows, cols):
    """Random raw blocks whose f16 scales are small and finite."""
    block_len, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = rows * cols // block_len
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    scale = lambda n: np.frombuffer(  # noqa: E731
        rng.uniform(-0.1, 0.1, size=n).astype(np.float16).tobytes(), dtype=np.uint8
    ).reshape(n, 2)
    if qtype in (Q.Q4_0, Q.Q8_0):
        raw[:, 0:2] = scale(n_blocks)
    elif qtype == Q.Q4_1:
        raw[:, 0:2] = scale(n_blocks)
        raw[:, 2:4] = scale(n_blocks)
    elif qtype == Q.Q4_K:
        raw[:, 0:2] = scale(n_blocks)  # d
        raw[:, 2:4] = scale(n_blocks)  # dmin
    elif qtype == Q.Q6_K:
        raw[:, 208:210] = scale(n_blocks)  # d is last
    return raw.reshape(rows, cols // block_len * block_bytes)


def make_quant():
    rng = np.random.default_rng(7)
    writer = gguf.GGUFWriter(str(OUT / "quant.gguf"), "quant-test")
    expected = {}
    rows, cols = 4, 512
    for name, qtype in [
        ("f32", Q.F32),
        ("f16", Q.F16),
        ("bf16", Q.BF16),
        ("q4_0", Q.Q4_0),
        ("q4_1", Q.Q4_1),
        ("q8_0", Q.Q8_0),
        ("q4_k", Q.Q4_K),
        ("q6_k", Q.Q6_K),
    ]:
        if qtype in (Q.F32, Q.F16):
            values = rng.standard_normal((rows, cols)).astype(np.float32)
            data = values.astype(np.float16 if qtype == Q.F16 else np.float32)
            writer.add_tensor(name, data)
            expected[name] = data.astype(np.float32)
            continue
        if qtype == Q.BF16:
            raw = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), Q.BF16)
        else:
            raw = random_blocks(rng, qtype, rows, cols)
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        expected[name] = gguf.quants.dequantize(raw, qtype).astype(np.float32)
        assert expected[name].shape == (rows, cols), (name, expected[name].shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    # One array, tensors in file order, so the Rust test needs only an .npy reader.
    np.save(OUT / "quant_expected.npy", np.stack(list(expected.values())))


def llama_cpp_permute(w, n_head):
    """llama.cpp's converter: each head's rows (half, i) → (i, half)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    # Phi-3's fused projections (llama.cpp's tensor_mapping.py maps
    # qkv_proj to ATTN_QKV and gate_up_proj to FFN_UP).
    "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",
}


def llama3_rope_freqs(config):
    """LlamaModel.generate_extra_tensors of llama.cpp's converter: one divisor
    per frequency, computed in the converter's order and dtypes. The
    converter reads original_max_position_embeddings from the config's top
    level, defaulting to 8192 (Llama 3.1/3.2's value, which their configs
    also give inside rope_scaling). transformers-5 configs keep it inside
    rope_parameters only, so for this fixture (64) the converter would fall
    back to 8192 and store the divisors of a different model than the
    fixture is; the fixture's own value is taken here instead."""
    import torch

    rope = config["rope_parameters"]
    base = rope.get("rope_theta", 10000.0)
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low_freq_factor = rope.get("low_freq_factor", 1.0)
    high_freq_factor = rope.get("high_freq_factor", 4.0)
    old_context_len = config.get("original_max_position_embeddings", rope["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32).numpy()


def make_model(fixture, arch, out_name=None, matrix_type=None):
    src = MODELS / fixture
    config = json.loads((src / "config.json").read_text())
    tok = json.loads((src / "tokenizer.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    theta = (config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta", 10000.0)

    writer = gguf.GGUFWriter(str(OUT / f"{out_name or fixture}.gguf"), arch)
    writer.add_name(fixture)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    extra_tensors = {}
    if arch == "phi3":
        # Phi3MiniModel.set_gguf_parameters / generate_extra_tensors.
        rope = config["rope_parameters"]
        n_embd, max_pos = config["hidden_size"], config["max_position_embeddings"]
        orig_max_pos = rope.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
        rope_dims = int(rope.get("partial_rotary_factor", 1.0) * n_embd) // heads
        writer.add_rope_scaling_orig_ctx_len(orig_max_pos)
        writer.add_rope_dimension_count(rope_dims)
        writer.add_sliding_window(config.get("sliding_window") or 0)
        if rope.get("long_factor"):
            scale = max_pos / orig_max_pos
            attn_factor = math.sqrt(1 + math.log(scale) / math.log(orig_max_pos)) if scale > 1.0 else 1.0
            writer.add_rope_scaling_attn_factors(attn_factor)
            assert len(rope["long_factor"]) == len(rope["short_factor"]) == rope_dims // 2
            extra_tensors["rope_factors_long.weight"] = np.array(rope["long_factor"], dtype=np.float32)
            extra_tensors["rope_factors_short.weight"] = np.array(rope["short_factor"], dtype=np.float32)
    else:
        writer.add_rope_dimension_count(head_dim)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_vocab_size(config["vocab_size"])
        if (config.get("rope_parameters") or {}).get("rope_type") == "llama3":
            extra_tensors["rope_freqs.weight"] = llama3_rope_freqs(config)

    vocab = tok["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = {t["id"] for t in tok.get("added_tokens", []) if t.get("special")}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_token_merges(merges)
    if config.get("eos_token_id") is not None:
        writer.add_eos_token_id(config["eos_token_id"])
    writer.add_add_bos_token(False)

    for name, w in extra_tensors.items():
        writer.add_tensor(name, w)
    weights = load_file(src / "model.safetensors")
    for name, w in sorted(weights.items()):
        w = w.astype(np.float32)
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            gguf_name = f"blk.{layer}.{GGUF_NAMES[rest]}"
            if arch == "llama" and rest == "self_attn.q_proj.weight":
                w = llama_cpp_permute(w, heads)
            elif arch == "llama" and rest == "self_attn.k_proj.weight":
                w = llama_cpp_permute(w, kv_heads)
        w = np.ascontiguousarray(w)
        if matrix_type is not None and w.ndim == 2:
            raw = gguf.quants.quantize(w, matrix_type)
            writer.add_tensor(gguf_name, raw, raw_shape=raw.shape, raw_dtype=matrix_type)
        else:
            writer.add_tensor(gguf_name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    make_quant()
    make_model("llama-gqa", "llama")
    make_model("qwen3", "qwen3")
    make_model("llama3-rope", "llama")
    make_model("phi3", "phi3")
    make_model("phi3-longrope", "phi3")
    make_model("phi3", "phi3", out_name="phi3-q8_0", matrix_type=Q.Q8_0)
    print(f"wrote {sorted(p.name for p in OUT.iterdir())} (gguf {gguf.__name__})")


if __name__ == "__main__":
    main()
