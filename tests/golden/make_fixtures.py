#!/usr/bin/env python3
"""Builds Kiln's tiny fixture models with Hugging Face transformers and records
transformers' own outputs for them: the goldens Kiln is tested against.

Run it from the repository root (needs tests/golden/requirements.txt, ~6 GB):

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install -r tests/golden/requirements.txt
    /tmp/ref/bin/python tests/golden/make_fixtures.py [NAME...]

(names rebuild only those fixtures).

It writes tests/fixtures/models/<name>/ (config.json, safetensors, tokenizer)
and tests/fixtures/golden/<name>/ (golden.json, logits.npy). Everything is
seeded, so a rerun with the same versions reproduces the files. The outputs are
committed; CI never runs this script.

Each model is saved, then loaded back from disk, and the goldens come from the
loaded copy, so they reflect how transformers itself reads the files Kiln reads.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    Phi3Config,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "tests" / "fixtures" / "models"
GOLDEN = ROOT / "tests" / "fixtures" / "golden"

PROMPT = "Kiln compiles language models for the Ascend 310B, one static graph at a time."
NEW_TOKENS = 9  # the prefill's choice plus 8 decode steps
VOCAB = 320
# Greedy choices closer than this would make the comparison fragile.
MIN_MARGIN = 1e-2
# Sliding windows shorter than the prompt plus the decode steps (44 + 9), so
# the window hides keys from the prefill on and more with every step.
WINDOW = 16

CORPUS = [
    "Kiln is an ahead-of-time graph compiler for language models on Ascend NPUs.",
    "The prefill graph reads the prompt; the decode graph adds one token at a time.",
    "A KV cache of fixed length keeps the keys and values of every layer.",
    "Static shapes let the compiler plan memory before the model ever runs.",
    "The reference interpreter computes in f32 and is the ground truth for diffs.",
    "Rotary position embeddings rotate pairs of dimensions by angles that grow with position.",
    "Grouped-query attention shares each key and value head between several query heads.",
    "Orange Pi AI Pro boards carry one Ascend 310B with LPDDR4X memory.",
    "The quick brown fox jumps over the lazy dog, 0123456789 times!",
]

SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    eos_token_id=0,
    bos_token_id=None,
    pad_token_id=None,
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Replaces transformers' tiny initial weights with larger ones, so that
    activations are O(1) and greedy choices are clear rather than near-ties.
    Norm weights and biases are random too, so that applying them is tested.
    Gemma's norms apply 1 + w: their stored weights are offsets from 1; its
    embeddings are multiplied by sqrt(hidden), so they are drawn that much
    smaller (else the residual stream only echoes the last token)."""
    gen = torch.Generator().manual_seed(seed)
    gemma = model.config.model_type.startswith("gemma")
    norm_offset = 0.0 if gemma else 1.0
    embed_std = 0.5 / model.config.hidden_size**0.5 if gemma else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(norm_offset + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.3 * noise)
            elif "embed_tokens" in name:
                p.copy_(embed_std * noise)
            elif name == "lm_head.weight":
                p.copy_(0.5 * noise)
            else:
                p.copy_(1.5 / p.shape[1] ** 0.5 * noise)


# The outlier fixture: a residual stream that passes fp16's largest finite
# value (65504) while every weight and every block's output stays in range.
FP16_MAX = 65504.0
OUTLIER_SCALE = 1000.0  # the residual stream's typical magnitude
OUTLIER_START = 20000.0  # channel 0 of every embedding row
OUTLIER_GAIN = 700.0  # down_proj's weight from the outlier unit to channel 0


def make_outliers(model: torch.nn.Module) -> None:
    """Gives a randomized Llama the "massive activation" real models have: one
    residual channel that every layer's MLP pushes further, as the outlier
    channels of LLMs grow layer after layer.

    The residual stream runs at OUTLIER_SCALE (embeddings, o_proj and
    down_proj scaled up, so every block matters at that scale), channel 0
    starts at OUTLIER_START in every embedding row, and each MLP has one
    unit (0), the only one reading channel 0 of its normalized input (about sqrt(hidden))
    through gate and up and writing OUTLIER_GAIN times its square into
    channel 0 alone: about +30000 per layer, so the stream passes 65504 in
    the second layer while each block's output stays near 31000. The LM head
    ignores channel 0 (it carries no token information)."""
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(OUTLIER_SCALE)
        model.model.embed_tokens.weight[:, 0] = OUTLIER_START
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(OUTLIER_SCALE)
            mlp = layer.mlp
            mlp.down_proj.weight.mul_(OUTLIER_SCALE)
            layer.post_attention_layernorm.weight[0] = 1.0
            # Only the outlier unit reads channel 0 (elsewhere it would add
            # the same large term for every token and drown the rest).
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                proj.weight[:, 0] = 0.0
            for proj in (mlp.gate_proj, mlp.up_proj):
                proj.weight[0, :] = 0.0
                proj.weight[0, 0] = 1.0
            mlp.down_proj.weight[:, 0] = 0.0
            mlp.down_proj.weight[0, 0] = OUTLIER_GAIN
        model.lm_head.weight[:, 0] = 0.0


def check_outliers(model: torch.nn.Module, ids: list[int]) -> None:
    """The outlier fixture does what it is for: weights and block outputs
    within fp16's range, the residual stream well beyond it."""
    for name, p in model.named_parameters():
        assert p.abs().max() < FP16_MAX / 2, f"{name} reaches {p.abs().max():.0f}"
    block_max = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: block_max.append(float((out[0] if isinstance(out, tuple) else out).abs().max())))
        for layer in model.model.layers
        for m in (layer.self_attn, layer.mlp)
    ]
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    assert max(block_max) < FP16_MAX * 0.75, f"a block's output reaches {max(block_max):.0f}"
    # hidden_states[-1] is after the final norm: the stream is the one before.
    stream = max(float(h.abs().max()) for h in hidden[:-1])
    print(f"outliers: blocks' outputs up to {max(block_max):.0f}, residual stream up to {stream:.0f} before the last layer")


def residual_max(model: torch.nn.Module, ids: list[int]) -> float:
    """The largest |value| of the residual stream, final layer's output included."""
    seen = []
    hook = model.model.layers[-1].register_forward_hook(lambda _m, _i, out: seen.append(float((out[0] if isinstance(out, tuple) else out).abs().max())))
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    hook.remove()
    return seen[0]


def to_old_config_form(config_path: Path) -> None:
    """Rewrites a transformers-5 config.json the way hub checkpoints from
    transformers 4.x look: top-level rope_theta / rope_scaling, torch_dtype,
    and no head_dim (derived from hidden_size / num_attention_heads)."""
    cfg = json.loads(config_path.read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    cfg["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    cfg.pop("head_dim", None)
    cfg["transformers_version"] = "4.45.0"
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


FIXTURES = [
    # name, config, save options
    ("llama-gqa", LlamaConfig(**SMALL), {}),
    (
        "llama-bf16-tied",
        LlamaConfig(**{**SMALL, "num_key_value_heads": 1, "tie_word_embeddings": True}),
        {"dtype": torch.bfloat16},
    ),
    (
        "llama3-rope",
        LlamaConfig(
            **SMALL,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        {},
    ),
    (
        "qwen2-old-config",
        Qwen2Config(**SMALL, rope_parameters={"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0}),
        {"old_config": True},
    ),
    ("mistral-sharded", MistralConfig(**SMALL, sliding_window=None), {"max_shard_size": "100KB"}),
    ("qwen3", Qwen3Config(**{**SMALL, "head_dim": 32}), {}),
    # GeGLU (tanh GELU), RMSNorm over 1 + w, embeddings times sqrt(hidden), tied lm_head.
    (
        "gemma",
        GemmaConfig(**{**SMALL, "head_dim": 16, "hidden_act": "gelu_pytorch_tanh"}),
        {},
    ),
    # Fused qkv_proj and gate_up_proj.
    ("phi3", Phi3Config(**SMALL, sliding_window=None), {}),
    # Soft-capped attention scores and logits (caps small enough to bite),
    # query_pre_attn_scalar, sandwich norms; layer 0 slides over WINDOW
    # positions, layer 1 is global.
    (
        "gemma2",
        Gemma2Config(
            **{**SMALL, "head_dim": 16},
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=24,
            attn_logit_softcapping=4.0,
            final_logit_softcapping=5.0,
            sliding_window=WINDOW,
        ),
        {"varied_ids": True},
    ),
    # q/k norms; local layers (0, 1, 3: sliding_window_pattern 3) over
    # WINDOW positions with their own RoPE base, a global layer with
    # another base and linear scaling; no soft-caps (Gemma 3's default).
    (
        "gemma3",
        Gemma3TextConfig(
            **{**SMALL, "head_dim": 16, "num_hidden_layers": 4},
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            sliding_window_pattern=3,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
            },
        ),
        {"varied_ids": True},
    ),
    # Seeded from place 7, where it was built before the families above came.
    ("llama-outliers", LlamaConfig(**SMALL), {"outliers": True, "seed_index": 7}),
    # Phi-4-mini's RoPE in small: longrope over the first 3/4 of each head
    # (partial rotary), the rest passed through. The prompt (44 tokens) is
    # longer than original_max_position_embeddings, so transformers uses the
    # long factors from the prefill on, as Kiln does for any KV cache longer
    # than that; the attention factor is the default sqrt(1 + ln 8 / ln 32).
    (
        "phi3-longrope",
        Phi3Config(
            **SMALL,
            sliding_window=None,
            original_max_position_embeddings=32,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.75,
                "short_factor": [1.0, 1.02, 1.05, 1.1, 1.2, 1.3],
                "long_factor": [1.0, 1.5, 3.0, 6.0, 12.0, 24.0],
            },
        ),
        {"seed_index": 11},
    ),
    # Gemma 3 as a GGUF file holds it, where llama.cpp fixes what the file
    # does not say: Gemma3TextConfig's own layer pattern (every sixth layer
    # global: 0-4 slide, 5 does not), query_pre_attn_scalar equal to
    # head_dim (1B to 12B), local base 10000; the global layers scaled
    # linearly as in the 4B and up. The source of tests/fixtures/gguf/gemma3.gguf.
    (
        "gemma3-pattern6",
        Gemma3TextConfig(
            **{**SMALL, "head_dim": 16, "num_hidden_layers": 6},
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=16,
            sliding_window=WINDOW,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
            },
        ),
        # A wider margin: its fp16 run must choose the same ids.
        {"varied_ids": True, "min_margin": 0.03},
    ),
    # Mistral's and Phi-3's windows, on every layer (Mistral 7B v0.1: 4096;
    # Phi-3-mini: 2047), shorter here than the prompt.
    ("mistral-window", MistralConfig(**SMALL, sliding_window=WINDOW), {"varied_ids": True}),
    ("phi3-window", Phi3Config(**SMALL, sliding_window=WINDOW), {"varied_ids": True}),
]


def check_window_matters(model_dir: Path, ids: list[int], logits: np.ndarray) -> None:
    """The same files without the sliding window must give other logits:
    else the fixture would not show a window applied wrongly."""
    unwindowed = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", sliding_window=None
    ).eval()
    _, other, _ = greedy_with_logits(unwindowed, ids)
    moved = float(np.abs(other - logits).max())
    assert moved > 0.1, f"{model_dir.name}: without the window the logits move only {moved:.2e}"
    print(f"{model_dir.name}: without the window the logits move by {moved:.2f}")


def greedy_with_logits(model, ids: list[int]) -> tuple[list[int], np.ndarray, float]:
    """Prefill, then NEW_TOKENS - 1 decode steps with the KV cache: the ids
    chosen, the logits each was chosen from, and the smallest top-2 margin."""
    rows, chosen, margins = [], [], []
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        for step in range(NEW_TOKENS):
            logits = out.logits[0, -1].float()
            top2 = torch.topk(logits, 2).values
            margins.append(float(top2[0] - top2[1]))
            token = int(torch.argmax(logits))
            rows.append(logits.numpy().copy())
            chosen.append(token)
            if step + 1 < NEW_TOKENS:
                out = model(
                    input_ids=torch.tensor([[token]]),
                    past_key_values=out.past_key_values,
                    use_cache=True,
                )
    return chosen, np.stack(rows).astype(np.float32), min(margins)


def build(name: str, config, options: dict, tokenizer, seed: int) -> bool:
    """Writes one fixture; False when its greedy margins are too small."""
    model_dir, golden_dir = MODELS / name, GOLDEN / name
    for d in (model_dir, golden_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    randomize(model, seed)
    if options.get("outliers"):
        make_outliers(model)
    if "dtype" in options:
        model = model.to(options["dtype"])
    model.eval()
    model.save_pretrained(model_dir, max_shard_size=options.get("max_shard_size", "50MB"))
    tokenizer.save_pretrained(model_dir)
    if options.get("old_config"):
        to_old_config_form(model_dir / "config.json")

    # The golden comes from the files on disk, upcast to f32 (bf16 included).
    loaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    loaded.eval()
    ids = tokenizer(PROMPT)["input_ids"]
    extra = {}
    if options.get("outliers"):
        check_outliers(loaded, ids)
        extra["max_abs_residual"] = residual_max(loaded, ids)
        assert extra["max_abs_residual"] > 1.1 * FP16_MAX, extra
    chosen, logits, margin = greedy_with_logits(loaded, ids)
    if margin < options.get("min_margin", MIN_MARGIN):
        print(f"{name}: seed {seed} gives a greedy margin of {margin:.2e}; trying another")
        return False
    # A model that repeats one token would not show a wrong window.
    if options.get("varied_ids") and len(set(chosen)) < 4:
        print(f"{name}: seed {seed} chooses only {sorted(set(chosen))}; trying another")
        return False
    if options.get("varied_ids") and getattr(loaded.config, "sliding_window", None):
        check_window_matters(model_dir, ids, logits)
    np.save(golden_dir / "logits.npy", logits)
    golden = {
        "model": name,
        "prompt": PROMPT,
        "prompt_ids": ids,
        "generated_ids": chosen,
        "generated_text": tokenizer.decode(chosen, skip_special_tokens=True),
        "logits": "logits.npy: [generated tokens, vocab] float32; row i is what token i was chosen from",
        "seed": seed,
        "min_top2_margin": margin,
        "max_abs_logit": float(np.abs(logits).max()),
        **extra,
        "reference": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "attn_implementation": "eager",
            "dtype": "float32",
        },
    }
    (golden_dir / "golden.json").write_text(json.dumps(golden, indent=2) + "\n")
    files = sorted(p.name for p in model_dir.iterdir())
    print(f"{name}: {len(ids)} prompt tokens → {chosen} (margin {margin:.3f}); files: {', '.join(files)}")
    return True


def main() -> None:
    """With fixture names as arguments, builds only those (each keeps the
    seeds its place in FIXTURES gives it, so the others stay as committed)."""
    only = set(sys.argv[1:])
    unknown = only - {name for name, _, _ in FIXTURES}
    if unknown:
        sys.exit(f"no such fixtures: {', '.join(sorted(unknown))}")
    torch.use_deterministic_algorithms(True)
    tokenizer = make_tokenizer()
    for index, (name, config, options) in enumerate(FIXTURES, start=1):
        if only and name not in only:
            continue
        # Seeds are tried in a fixed order, so reruns pick the same one.
        index = options.get("seed_index", index)
        for seed in range(index, index + 1000, 100):
            if build(name, config, options, tokenizer, seed):
                break
        else:
            sys.exit(f"{name}: no seed gave clear greedy choices")


if __name__ == "__main__":
    main()
