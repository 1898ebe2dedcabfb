#!/usr/bin/env python3
"""Benchmark: Kiln's reference interpreter against Hugging Face transformers
(PyTorch eager, CPU), same model, same prompt, same thread count, one run.

    python tests/bench/interp_vs_torch.py [--threads 2] [--prompt-len 64] [--new-tokens 32]

Needs torch + transformers (tests/golden/requirements.txt) and a release
build (`cargo build --release`). The model is random, of SmolLM2-135M's
shape (hidden 576, 30 layers, 9 heads, 3 KV heads, vocab 49152, tied
embeddings), f32, written to a temporary directory.

Each side is timed the same way: prefill = one forward over the prompt,
computing the last position's logits only (as generate() does); decode =
(new tokens - 1) single-token steps with the KV cache, each followed by a
greedy argmax. Model loading is not timed, and each side does one untimed
warm-up pass first. The two sides take turns, --repeats runs each, so that
load from other processes on a shared machine falls on both alike; the
best run of each side is reported, and the median beside it.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[2]
# KILN_BIN overrides it (a build with another CARGO_TARGET_DIR, say).
KILN = Path(os.environ.get("KILN_BIN", ROOT / "target" / "release" / "kiln"))


def smollm2_135m_shape() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
    )


def time_torch(model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    with torch.no_grad():
        start = time.perf_counter()
        # Only the last position's logits, as generate() asks for (and as Kiln's graphs compute).
        out = model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        token = int(torch.argmax(out.logits[0, -1]))
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            token = int(torch.argmax(out.logits[0, -1]))
        decode = time.perf_counter() - start
    return prefill, decode


def time_kiln(model_dir: Path, prompt: list[int], new_tokens: int, threads: int) -> tuple[float, float]:
    cmd = [
        str(KILN), "generate", str(model_dir),
        "--token-ids", ",".join(map(str, prompt)),
        "--max-new-tokens", str(new_tokens), "--ignore-eos",
        "--threads", str(threads), "--prefill-len", str(len(prompt)), "--warmup", "1",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    times = {}
    for line in result.stderr.splitlines():
        # "prefill: 64 tokens in 123.4 ms (...)" / "decode:  31 tokens in 456.7 ms (...)"
        if line.startswith(("prefill:", "decode:")):
            key = line.split(":")[0]
            times[key] = float(line.split(" in ")[1].split(" ms")[0]) / 1e3
    return times["prefill"], times["decode"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not KILN.exists():
        sys.exit(f"{KILN} not found: run `cargo build --release` first")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = smollm2_135m_shape()
    model = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    prompt = torch.randint(0, config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "smollm2-135m-shape"
        model.save_pretrained(model_dir)
        print(f"model: random SmolLM2-135M shape, {params / 1e6:.1f}M parameters, f32; "
              f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, {args.threads} threads, "
              f"{args.repeats} runs each")
        time_torch(model, prompt[:8], 2)  # warm-up
        torch_runs, kiln_runs = [], []
        for _ in range(args.repeats):
            torch_runs.append(time_torch(model, prompt, args.new_tokens))
            kiln_runs.append(time_kiln(model_dir, prompt, args.new_tokens, args.threads))

    steps = args.new_tokens - 1
    rows = []
    for name, runs in (("transformers (PyTorch eager)", torch_runs), ("kiln interpreter", kiln_runs)):
        prefill = [args.prompt_len / r[0] for r in runs]
        decode = [steps / r[1] for r in runs]
        rows.append((name, max(prefill), statistics.median(prefill), max(decode), statistics.median(decode)))
    print(f"{'tokens/s, best (median)':30} {'prefill':>16} {'decode':>14}")
    for name, pb, pm, db, dm in rows:
        print(f"{name:30} {pb:7.1f} ({pm:6.1f}) {db:6.1f} ({dm:5.1f})")
    t, k = rows
    ratio = [k[i] / t[i] for i in range(1, 5)]
    print(f"{'ratio kiln / transformers':30} {ratio[0]:7.2f} ({ratio[1]:6.2f}) {ratio[2]:6.2f} ({ratio[3]:5.2f})")


if __name__ == "__main__":
    main()
