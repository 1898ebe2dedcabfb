#!/usr/bin/env python3
"""Records Hugging Face transformers' view of the sentencepiece GGUF fixtures
(tests/fixtures/gguf/{gemma,gemma2,gemma3,spm-llama,spm-phi3}.gguf, written by
make_gguf_fixtures.py): the goldens for Kiln's sentencepiece tokenizer and its
Gemma GGUF architectures.

Run it from the repository root with the reference stack
(tests/golden/requirements.txt); CI never runs it, its outputs are committed:

    /tmp/ref/bin/python tests/golden/make_gguf_spm_goldens.py

It writes tests/fixtures/gguf/spm/:

- goldens.json:
  - `tokenizers.<file>`: the class transformers' GGUF loader picked, and for
    each text the ids `tokenizer(text)` gives (`ids`, BOS added as the file
    says), the ids without special tokens (`ids_plain`), and
    `decode(ids, skip_special_tokens=True)` (`decoded`).
  - `generation.<file>`: greedy ids over the prompt's ids, and where the
    logits come from.
- tokenizer_<file>.json: the `tokenizers` serialization of the tokenizer
  transformers built (its backend tokenizer), for a structural comparison.
- logits_<file>.npy: float32 [NEW_TOKENS, vocab]; row i holds the logits the
  i-th new token was chosen from (row 0 from the prefill's last position).

What transformers' loader cannot do, and what is recorded instead:
- It refuses `gemma` (the first generation) models ("not supported yet"), so
  that file's tokenizer is loaded through `GemmaTokenizer` (the class its
  loader uses for `gemma2` and `gemma3` files, built by the same
  `gemma_tokenizer`), and its logits come from transformers running the
  original checkpoint (tests/fixtures/models/gemma) on the GGUF tokenizer's
  prompt ids: the GGUF holds those weights, norms plus one.
- For `gemma2` it reads neither `gemma2.attn_logit_softcapping` nor
  `gemma2.final_logit_softcapping` (leaving Gemma2Config's 50 and 30), and a
  GGUF has no `query_pre_attn_scalar`. The model is loaded from the GGUF with
  those three passed as llama.cpp reads the file: the two caps from the
  metadata, and the attention scale 1/sqrt(key_length) (llama.cpp's
  llama_model_gemma2 for every size but the 46-layer 27B). The script checks
  that its loader gives other logits without them.
- For `gemma3` it reads the global RoPE base and the window, but neither
  `gemma3.rope.scaling.*` nor `gemma3.rope.freq_base_swa`, and a GGUF has no
  `query_pre_attn_scalar` (Gemma3TextConfig's default is 256). The model is
  loaded with those passed as llama.cpp reads the file (llama_model_gemma3):
  the global layers' base and linear factor, the local base, the attention
  scale 1/sqrt(key_length) (every size but the 62-layer 27B), and its fixed
  layer pattern (every sixth layer global). Checked as for `gemma2`.
"""

import importlib.metadata
import json
from pathlib import Path

import numpy as np
import torch
import transformers
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer, GemmaTokenizer

# The HF fixtures' greedy loop (prefill, then decode steps with the cache).
from make_fixtures import NEW_TOKENS, greedy_with_logits

ROOT = Path(__file__).resolve().parents[2]
GGUF_DIR = ROOT / "tests" / "fixtures" / "gguf"
OUT = GGUF_DIR / "spm"
MODELS = ROOT / "tests" / "fixtures" / "models"

FILES = ["gemma.gguf", "gemma2.gguf", "gemma3.gguf", "spm-llama.gguf", "spm-phi3.gguf"]
MIN_MARGIN = 1e-2
# Tried in order; the first whose greedy choices are clear is recorded.
PROMPTS = [
    "the café serves tea to the reader at the table. Kiln compiles 310B graphs.",
    "Kiln compiles language models for the Ascend 310B, one static graph at a time.",
    "the model ever runs the decode graph; keys and values of every layer.",
    "static shapes let the compiler plan memory.\n\n  return x",
]

TEXTS = [
    ("ascii", "Kiln compiles language models for the Ascend 310B, one static graph at a time."),
    ("in_vocabulary", "the prefill graph reads the prompt; the decode graph adds one token at a time."),
    ("non_ascii", "Größenwahn — 東京 🚀 naïve café"),
    ("whitespace", "  hello\n\n\tworld   12345 \n"),
    ("leading_space", " the table"),
    ("code", "    def forward(self, x):\n        return x**2  # square\r\n"),
    ("special_tokens", "<start_of_turn>user\nHi<end_of_turn>\n<bos>the<eos> <unk><pad><mask>"),
    ("chat_like", "<start_of_turn>model\nthe cafe\n\n\n<end_of_turn>"),
    ("only_spaces", "    "),
    ("newline", "\n"),
    ("empty", ""),
]


def load_tokenizer(name: str):
    try:
        return AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=name), "AutoTokenizer", None
    except ValueError as e:
        return GemmaTokenizer.from_pretrained(GGUF_DIR, gguf_file=name), "GemmaTokenizer", str(e)


def tokenizer_goldens(name: str) -> tuple[dict, object]:
    tok, loader, error = load_tokenizer(name)
    backend = tok.backend_tokenizer
    cases = []
    for case, text in TEXTS:
        ids = tok(text)["input_ids"]
        plain = tok(text, add_special_tokens=False)["input_ids"]
        decoded = tok.decode(ids, skip_special_tokens=True)
        # The backend alone gives the same: what Kiln runs is that tokenizer.json.
        assert ids == backend.encode(text).ids, (name, case)
        assert plain == backend.encode(text, add_special_tokens=False).ids, (name, case)
        assert decoded == backend.decode(ids, skip_special_tokens=True), (name, case)
        cases.append({"name": case, "text": text, "ids": ids, "ids_plain": plain, "decoded": decoded})
    serialized = json.loads(backend.to_str())
    (OUT / f"tokenizer_{Path(name).stem}.json").write_text(
        json.dumps(serialized, ensure_ascii=False, indent=1, sort_keys=True) + "\n", encoding="utf-8"
    )
    return {
        "loader": loader,
        "auto_tokenizer_error": error,
        "class": type(tok).__name__,
        "add_bos_token": tok.add_bos_token,
        "add_eos_token": tok.add_eos_token,
        "special_tokens": tok.special_tokens_map,
        "cases": cases,
    }, tok


def field(reader: GGUFReader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def load(source, **kwargs):
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, attn_implementation="eager", **kwargs
    )
    return model.eval()


def with_overrides(name: str, tok, metadata: dict, why: str):
    """The file through transformers' GGUF loader with `metadata` passed as
    llama.cpp reads it, checked to differ from the plain loader's model."""
    model = load(GGUF_DIR, gguf_file=name, **metadata)
    plain = load(GGUF_DIR, gguf_file=name)
    probe = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        a = model(input_ids=probe).logits
        b = plain(input_ids=probe).logits
    assert not torch.allclose(a, b), "the overrides changed nothing: drop them"
    return model, {
        "model": f"tests/fixtures/gguf/{name} (transformers' GGUF loader)",
        "config_overrides": metadata,
        "why": f"{why}; these are the values llama.cpp takes from the file",
        "loader_config": {k: plain.config.to_dict().get(k) for k in metadata},
    }


def generation_goldens(name: str, tok) -> dict:
    reader = GGUFReader(GGUF_DIR / name)
    arch = field(reader, "general.architecture")
    if arch == "gemma":
        try:
            load(GGUF_DIR, gguf_file=name)
            raise SystemExit("transformers now loads gemma GGUF files: record from the GGUF instead")
        except ValueError as e:
            error = str(e)
        model = load(MODELS / "gemma")
        source = {
            "model": "tests/fixtures/models/gemma (transformers)",
            "why": f"transformers' GGUF loader: {error}",
        }
    elif arch == "gemma2":
        metadata = {
            "attn_logit_softcapping": field(reader, "gemma2.attn_logit_softcapping"),
            "final_logit_softcapping": field(reader, "gemma2.final_logit_softcapping"),
            "query_pre_attn_scalar": field(reader, "gemma2.attention.key_length"),
        }
        assert field(reader, "gemma2.block_count") != 46  # 27B: hidden / heads instead
        model, source = with_overrides(name, tok, metadata, "transformers' GGUF loader reads neither "
                                       "soft-cap key and a GGUF has no query_pre_attn_scalar")
    elif arch == "gemma3":
        assert field(reader, "gemma3.block_count") != 62  # 27B: hidden / heads instead
        assert field(reader, "gemma3.final_logit_softcapping") is None
        full = {"rope_type": "default", "rope_theta": field(reader, "gemma3.rope.freq_base")}
        if field(reader, "gemma3.rope.scaling.type") == "linear":
            full = {**full, "rope_type": "linear", "factor": field(reader, "gemma3.rope.scaling.factor")}
        metadata = {
            "query_pre_attn_scalar": field(reader, "gemma3.attention.key_length"),
            "layer_types": [
                "full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                for i in range(field(reader, "gemma3.block_count"))
            ],
            "rope_parameters": {
                "full_attention": full,
                "sliding_attention": {
                    "rope_type": "default",
                    "rope_theta": field(reader, "gemma3.rope.freq_base_swa") or 10000.0,
                },
            },
        }
        model, source = with_overrides(name, tok, metadata, "transformers' GGUF loader reads neither "
                                       "the RoPE scaling nor the local base of a gemma3 file and a GGUF "
                                       "has no query_pre_attn_scalar")
    else:
        raise ValueError(arch)
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        chosen, logits, margin = greedy_with_logits(model, ids)
        if margin >= MIN_MARGIN:
            break
        print(f"{name}: greedy margin {margin:.2e} on {prompt!r}; trying the next prompt")
    else:
        raise SystemExit(f"{name}: no prompt gives clear greedy choices")
    logits_file = f"logits_{Path(name).stem}.npy"
    np.save(OUT / logits_file, logits)
    return {
        "prompt": prompt,
        "prompt_ids": ids,
        "generated_ids": chosen,
        "logits_file": logits_file,
        "min_top2_margin": margin,
        "config": {k: model.config.to_dict().get(k) for k in (
            "model_type", "head_dim", "sliding_window", "layer_types", "attn_logit_softcapping",
            "final_logit_softcapping", "query_pre_attn_scalar", "tie_word_embeddings", "rms_norm_eps",
            "rope_parameters",
        )},
        **source,
    }


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    goldens = {
        "reference": {
            name: importlib.metadata.version(name)
            for name in ("transformers", "torch", "tokenizers", "gguf", "sentencepiece")
        },
        "tokenizers": {},
        "generation": {},
    }
    for name in FILES:
        goldens["tokenizers"][name], tok = tokenizer_goldens(name)
        if name in ("gemma.gguf", "gemma2.gguf", "gemma3.gguf"):
            goldens["generation"][name] = generation_goldens(name, tok)
    (OUT / "goldens.json").write_text(json.dumps(goldens, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    for name, g in goldens["generation"].items():
        print(f"{name}: {len(g['prompt_ids'])} prompt ids → {g['generated_ids']} (margin {g['min_top2_margin']:.3f})")
    print(f"transformers {transformers.__version__}: wrote {sorted(p.name for p in OUT.iterdir())}")


if __name__ == "__main__":
    main()
