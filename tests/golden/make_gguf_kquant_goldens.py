#!/usr/bin/env python3
"""Records Hugging Face transformers' view of tests/fixtures/gguf/llama-kquant.gguf
(written by make_gguf_fixtures.py: Q4_K and Q6_K blocks, as a Q4_K_M file
holds them): the goldens for Kiln's k-quant weights. transformers' GGUF
loader dequantizes the blocks with llama.cpp's `gguf` package.

Run it from the repository root with the reference stack
(tests/golden/requirements.txt); CI never runs it, its outputs are committed:

    /tmp/ref/bin/python tests/golden/make_gguf_kquant_goldens.py

It writes tests/fixtures/gguf/kquant/:
- golden.json: the prompt ids (the llama-gqa fixture's), the greedy ids
  over them (prefill, then decode steps with the cache), the smallest top-2
  margin, and the versions.
- logits.npy: float32 [9, vocab], row i the logits the i-th new token was
  chosen from.
"""

import importlib.metadata
import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from make_fixtures import greedy_with_logits

ROOT = Path(__file__).resolve().parents[2]
GGUF_DIR = ROOT / "tests" / "fixtures" / "gguf"
OUT = GGUF_DIR / "kquant"


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    prompt_ids = json.loads((ROOT / "tests/fixtures/golden/llama-gqa/golden.json").read_text())["prompt_ids"]
    model = AutoModelForCausalLM.from_pretrained(
        GGUF_DIR, gguf_file="llama-kquant.gguf", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    chosen, logits, margin = greedy_with_logits(model, prompt_ids)
    assert margin > 1e-2, margin
    assert len(set(chosen)) > 2, chosen
    np.save(OUT / "logits.npy", logits)
    golden = {
        "model": "tests/fixtures/gguf/llama-kquant.gguf (transformers' GGUF loader)",
        "prompt_ids": prompt_ids,
        "generated_ids": chosen,
        "min_top2_margin": margin,
        "max_abs_logit": float(np.abs(logits).max()),
        "logits": "logits.npy: [generated tokens, vocab] float32; row i is what token i was chosen from",
        "reference": {name: importlib.metadata.version(name) for name in ("transformers", "torch", "gguf")},
    }
    (OUT / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    print(f"llama-kquant: {len(prompt_ids)} prompt ids → {chosen} (margin {margin:.3f}, max |logit| {golden['max_abs_logit']:.1f})")


if __name__ == "__main__":
    main()
