#!/usr/bin/env python3
"""Small GGUF fixtures written by llama.cpp's own Python package (`gguf`),
so Kiln's GGUF reader is checked against an independent writer and an
independent dequantizer. Not run in CI; run it once and commit the output:

    /path/to/venv/bin/pip install -r tests/golden/requirements.txt
    python tests/golden/make_gguf_fixtures.py

It writes into tests/fixtures/gguf/:

- quant.gguf + quant_expected.npy: one tensor per ggml type Kiln reads
  (F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, Q5_0, Q5_1) made of
  random blocks, and what `gguf.quants.dequantize` makes of each, stacked in
  file order ([10, 4, 512]).
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
- llama-kquant.gguf: a 256-wide Llama in Q4_K and Q6_K blocks, as a Q4_K_M
  file holds one (random blocks; see make_kquant).
- phi3-q8_0.gguf: phi3.gguf with every matrix in Q8_0 blocks
  (`gguf.quants.quantize`), as `llama-quantize` leaves them, so the fused
  matrices Kiln keeps in blocks are split in their blocks.
- gemma.gguf, gemma2.gguf: the `gemma` and `gemma2` fixtures as llama.cpp's
  GemmaModel / Gemma2Model converters write them (convert_hf_to_gguf.py):
  its tensor names, every `*norm.weight` stored with 1 added, no Q/K
  permutation, the soft-cap and sliding-window keys for Gemma 2, and a
  sentencepiece vocabulary (`tokenizer.ggml.model = llama`) as its
  `_set_vocab_sentencepiece` writes one: tokens, scores and token types read
  from a `tokenizer.model`, user-defined and control tokens from the
  tokenizer_config.json beside it (multi-space pieces spelled with real
  spaces). That model is trained here with the `sentencepiece` package on a
  generated text: BPE, 320 pieces (the fixtures' vocabulary size, so their
  embeddings stay as they are), byte fallback, Gemma's special ids.
- gemma3.gguf: the `gemma3-pattern6` fixture as Gemma3Model writes it: the
  same, plus q/k norms (also stored plus 1), the global layers' RoPE base and
  linear scaling, `rope.freq_base_swa` for the local layers, and the window.
  Its layers follow the pattern llama.cpp assumes for every Gemma 3 file
  (every sixth global), which the script checks.
- spm-llama.gguf, spm-phi3.gguf: the same vocabulary alone (no tensors) under
  the `llama` and `phi3` architectures, for which transformers builds
  sentencepiece tokenizers differently (a prefix space, merges ordered by
  score); spm-llama.gguf also asks for EOS, spm-phi3.gguf has no add-BOS
  key (older files), which means BOS.

Names on the command line build only those files (`quant`, `llama-gqa`,
`qwen3`, `llama3-rope`, `phi3`, `phi3-longrope`, `phi3-q8_0`,
`llama-kquant`, `gemma`, `gemma2`, `gemma3`, `spm`).
"""

import json
import math
import random
import sys
import tempfile
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
    if qtype in (Q.Q4_0, Q.Q8_0, Q.Q5_0):
        raw[:, 0:2] = scale(n_blocks)
    elif qtype in (Q.Q4_1, Q.Q5_1):
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
        # Last, so that the blocks above stay as they were.
        ("q5_0", Q.Q5_0),
        ("q5_1", Q.Q5_1),
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


def add_bpe_vocab(writer, tok):
    """A byte-level BPE tokenizer.json as `tokenizer.ggml.*` arrays: tokens
    in id order, special added tokens as control tokens, the merges."""
    vocab = tok["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = {t["id"] for t in tok.get("added_tokens", []) if t.get("special")}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])


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

    add_bpe_vocab(writer, tok)
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


def make_kquant():
    """llama-kquant.gguf: a Llama of 256-wide matrices (k-quants need rows of
    whole 256-blocks) as a Q4_K_M file holds it: Q4_K for most matrices,
    Q6_K for attn_v, ffn_down and output, norms and the embedding in F32,
    the llama-gqa fixture's byte-level vocabulary. The blocks are random, with
    d and dmin chosen so that weights are about 1/sqrt(fan-in) and the
    activations stay O(1); gguf's own dequantizer (through transformers' GGUF
    loader) is the reference for what they mean."""
    rng = np.random.default_rng(19)
    hidden, ffn, layers, heads, kv_heads = 256, 512, 2, 4, 2
    head_dim = hidden // heads
    src = json.loads((MODELS / "llama-gqa" / "tokenizer.json").read_text())
    writer = gguf.GGUFWriter(str(OUT / "llama-kquant.gguf"), "llama")
    writer.add_name("llama-kquant")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    add_bpe_vocab(writer, src)
    writer.add_add_bos_token(False)
    vocab = len(src["model"]["vocab"])

    def scales(n, top):
        values = rng.uniform(0.2 * top, top, size=n).astype(np.float16)
        return np.frombuffer(values.tobytes(), dtype=np.uint8).reshape(n, 2)

    def matrix(name, rows, cols, qtype):
        raw = random_blocks(rng, qtype, rows, cols)
        blocks = raw.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])
        target = 4 / math.sqrt(cols)  # the largest |w| wanted
        if qtype == Q.Q4_K:  # w = d·sc·q − dmin·m, sc and m ≤ 63, q ≤ 15
            blocks[:, 0:2] = scales(len(blocks), target / (63 * 15))
            blocks[:, 2:4] = scales(len(blocks), target / 63 / 2)
        else:  # Q6_K: w = d·sc·(q − 32), |sc| ≤ 128
            blocks[:, 208:210] = scales(len(blocks), target / (128 * 32))
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)

    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    writer.add_tensor("token_embd.weight", f32(0.5 * rng.standard_normal((vocab, hidden))))
    writer.add_tensor("output_norm.weight", f32(1 + 0.1 * rng.standard_normal(hidden)))
    matrix("output.weight", vocab, hidden, Q.Q6_K)
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", f32(1 + 0.1 * rng.standard_normal(hidden)))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", f32(1 + 0.1 * rng.standard_normal(hidden)))
        for name, rows, cols, qtype in [
            ("attn_q", hidden, hidden, Q.Q4_K),
            ("attn_k", kv_heads * head_dim, hidden, Q.Q4_K),
            ("attn_v", kv_heads * head_dim, hidden, Q.Q6_K),
            ("attn_output", hidden, hidden, Q.Q4_K),
            ("ffn_gate", ffn, hidden, Q.Q4_K),
            ("ffn_up", ffn, hidden, Q.Q4_K),
            ("ffn_down", hidden, ffn, Q.Q6_K),
        ]:
            matrix(f"blk.{i}.{name}.weight", rows, cols, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---- sentencepiece vocabularies (Gemma) ----

SPM_VOCAB = 320
SPM_LINES = [
    "kiln is an ahead of time graph compiler for language models on ascend boards.\n",
    "the prefill graph reads the prompt; the decode graph adds one token at a time.\n",
    "a cache of fixed length keeps the keys and the values of every layer.\n",
    "static shapes let the compiler plan memory before the model ever runs.\n",
    "    def forward(self, x):\n",
    "        return self.norm(x) + x\n",
    "the caf\u00e9 serves tea to the reader at the table.\n",
    "\n",
]
# Gemma's layout: pad, eos, bos, unk first, then its turn markers and some of
# the newline and space runs it keeps whole.
SPM_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]
SPM_CONTROL = ["<start_of_turn>", "<end_of_turn>"]
SPM_USER = ["\n", "\n\n", "\u2581\u2581", "\u2581\u2581\u2581\u2581"]
# A template of the same shape as Gemma's: turns between markers.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def train_sentencepiece(work: Path) -> Path:
    """A Gemma-shaped BPE sentencepiece model: no dummy prefix, whitespace
    kept as it is, digits split, unknown characters as byte pieces."""
    import sentencepiece as spm

    rng = random.Random(0)
    text = work / "train.txt"
    text.write_text("".join(rng.choice(SPM_LINES) for _ in range(400)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(work / "tokenizer"),
        model_type="bpe",
        vocab_size=SPM_VOCAB,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=SPM_CONTROL + SPM_USER,
        character_coverage=0.995,
        num_threads=1,
        minloglevel=2,
    )
    return work / "tokenizer.model"


def write_hf_tokenizer_files(work: Path) -> None:
    """What a Gemma repository carries beside tokenizer.model and the
    converter reads: tokenizer_config.json (special tokens, add-BOS, the
    chat template, the added tokens) and tokenizer.json's added tokens."""
    added = [
        {"id": i, "content": t, "special": True}
        for i, t in enumerate(SPM_SPECIAL + SPM_CONTROL)
    ] + [
        {"id": len(SPM_SPECIAL + SPM_CONTROL) + i, "content": t, "special": False}
        for i, t in enumerate(SPM_USER)
    ]
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {str(a["id"]): a for a in added},
    }
    (work / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (work / "tokenizer.json").write_text(json.dumps({"added_tokens": added}), encoding="utf-8")


def sentencepiece_vocab(work: Path, vocab_size: int):
    """tokens, scores and token types as convert_hf_to_gguf.py's
    `_create_vocab_sentencepiece` reads them: each piece's score and kind
    from the model, then the tokenizer_config.json's added tokens as control
    (special) or user-defined tokens, the latter with `\u2581` spelled as a
    space."""
    from sentencepiece import SentencePieceProcessor

    T = gguf.TokenType
    sp = SentencePieceProcessor(model_file=str(work / "tokenizer.model"))
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [T.UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        kind = T.NORMAL
        if sp.IsUnknown(i):
            kind = T.UNKNOWN
        elif sp.IsControl(i):
            kind = T.CONTROL
        elif sp.IsUnused(i):
            kind = T.UNUSED
        elif sp.IsByte(i):
            kind = T.BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode(), sp.GetScore(i), kind
    config = json.loads((work / "tokenizer_config.json").read_text(encoding="utf-8"))
    for key, token in config["added_tokens_decoder"].items():
        i, content = int(key), token["content"]
        if token.get("special"):
            types[i] = T.CONTROL
        else:
            content = content.replace("\u2581", " ")
            types[i] = T.USER_DEFINED
        scores[i], tokens[i] = -1000.0, content.encode()
    return tokens, scores, types


def make_gemma(fixture: str, work: Path, out_name: str | None = None):
    """The HF fixture `fixture` as GemmaModel / Gemma2Model / Gemma3Model
    write it, into `out_name`.gguf (default: the fixture's name)."""
    out_name = out_name or fixture
    src = MODELS / fixture
    config = json.loads((src / "config.json").read_text())
    arch = {
        "gemma": gguf.MODEL_ARCH.GEMMA,
        "gemma2": gguf.MODEL_ARCH.GEMMA2,
        "gemma3_text": gguf.MODEL_ARCH.GEMMA3,
    }[config["model_type"]]
    # The converter reads bos/eos/pad ids from config.json; a Gemma one has them.
    (work / "config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}))
    tokens, scores, types = sentencepiece_vocab(work, config["vocab_size"])

    writer = gguf.GGUFWriter(str(OUT / f"{out_name}.gguf"), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(fixture)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if arch == gguf.MODEL_ARCH.GEMMA2:
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
        writer.add_sliding_window(config["sliding_window"])
    if arch == gguf.MODEL_ARCH.GEMMA3:
        # TextModel.set_gguf_parameters: the global layers' RoPE (base and
        # linear scaling) and the local base; Gemma3Model: the window, no
        # soft-cap keys (the config has none). No key says which layers
        # slide: llama.cpp takes every sixth as global.
        assert config["layer_types"] == [
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
            for i in range(config["num_hidden_layers"])
        ], "llama.cpp would read another layer pattern from this file"
        rope = config["rope_parameters"]
        writer.add_rope_freq_base(rope["full_attention"]["rope_theta"])
        writer.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
        if rope["full_attention"]["rope_type"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope["full_attention"]["factor"])
        writer.add_sliding_window(config["sliding_window"])
        assert config["final_logit_softcapping"] is None and config["attn_logit_softcapping"] is None

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(work, n_vocab=len(tokens)).add_to_gguf(writer)
    if arch == gguf.MODEL_ARCH.GEMMA:
        # GemmaModel marks CodeGemma's infill tokens by these ids whatever the
        # vocabulary; copied here as it writes them.
        special = gguf.SpecialVocab(
            work, load_merges=False, special_token_types=["prefix", "suffix", "middle", "fsep", "eot"]
        )
        for kind, token_id in [("prefix", 67), ("suffix", 69), ("middle", 68), ("fsep", 70), ("eot", 107)]:
            special._set_special_token(kind, token_id)
        special.chat_template = None
        special.add_to_gguf(writer)
    writer.add_add_space_prefix(False)

    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    weights = load_file(src / "model.safetensors")
    for name, w in sorted(weights.items()):
        if name == "lm_head.weight":
            continue  # tied; the converter skips it
        w = w.astype(np.float32)
        if name.endswith("norm.weight"):
            w = w + 1  # Gemma's RMSNorm multiplies by 1 + w; llama.cpp stores 1 + w
        base, suffix = name.rsplit(".", 1)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def make_spm_only(arch_name: str, work: Path, add_bos, add_eos):
    """The vocabulary alone, under another architecture's name, with the
    add-BOS/EOS flags given (None: no key, as in older files)."""
    tokens, scores, types = sentencepiece_vocab(work, SPM_VOCAB)
    writer = gguf.GGUFWriter(str(OUT / f"spm-{arch_name}.gguf"), arch_name)
    writer.add_name(f"spm-{arch_name}")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(work, n_vocab=len(tokens))
    special.add_special_token = {k: v for k, v in (("bos", add_bos), ("eos", add_eos)) if v is not None}
    special.add_to_gguf(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    everything = {"quant", "llama-gqa", "qwen3", "llama3-rope", "phi3", "phi3-longrope"}
    everything |= {"phi3-q8_0", "llama-kquant", "gemma", "gemma2", "gemma3", "spm"}
    wanted = set(sys.argv[1:]) or everything
    if "quant" in wanted:
        make_quant()
    if "llama-gqa" in wanted:
        make_model("llama-gqa", "llama")
    if "qwen3" in wanted:
        make_model("qwen3", "qwen3")
    if "llama3-rope" in wanted:
        make_model("llama3-rope", "llama")
    if "phi3" in wanted:
        make_model("phi3", "phi3")
    if "phi3-longrope" in wanted:
        make_model("phi3-longrope", "phi3")
    if "llama-kquant" in wanted:
        make_kquant()
    if "phi3-q8_0" in wanted:
        make_model("phi3", "phi3", out_name="phi3-q8_0", matrix_type=Q.Q8_0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_sentencepiece(work)
        write_hf_tokenizer_files(work)
        for fixture in ("gemma", "gemma2"):
            if fixture in wanted:
                make_gemma(fixture, work)
        if "gemma3" in wanted:
            make_gemma("gemma3-pattern6", work, out_name="gemma3")
        if "spm" in wanted:
            (work / "config.json").unlink(missing_ok=True)
            # Between them, the flags' other cases: EOS added; no add-BOS key.
            make_spm_only("llama", work, add_bos=True, add_eos=True)
            make_spm_only("phi3", work, add_bos=None, add_eos=None)
    print(f"wrote {sorted(p.name for p in OUT.iterdir())} (gguf {gguf.__name__})")


if __name__ == "__main__":
    main()
