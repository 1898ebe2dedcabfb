#!/usr/bin/env python3
"""Runs a directory written by `kiln compile` with ONNX Runtime, the way the
NPU runtime runs it: prefill in steps of the prefill graph's length, then one
decode step per token, with the host writing each step's new K/V rows into
the cache as manifest.json describes.

    python examples/ort_run.py COMPILED_DIR --token-ids 3,17,250 --max-new-tokens 8 \\
        [--save-logits logits.npy] [--ignore-eos]

It takes the same options as `kiln generate` and prints the generated ids the
same way (comma-separated on stdout), so the two can be compared file to file.
Needs numpy and onnxruntime.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


class OrtSession:
    def __init__(self, directory: Path):
        self.manifest = json.loads((directory / "manifest.json").read_text())
        m = self.manifest
        self.float = {"float32": np.float32, "float16": np.float16}[m["dtype"]]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.graphs = {}
        for graph in m["graphs"]:
            session = ort.InferenceSession(str(directory / graph["onnx"]), options, providers=["CPUExecutionProvider"])
            self.graphs[graph["name"]] = (graph, session)
        kv = m["kv_cache"]
        self.max_len = kv["max_len"]
        shape = (kv["layers"], 1, kv["kv_heads"], kv["max_len"], kv["head_dim"])
        self.k_cache = np.zeros(shape, self.float)
        self.v_cache = np.zeros(shape, self.float)
        self.past = 0

    def _step(self, graph_name: str, tokens: list[int]) -> np.ndarray:
        graph, session = self.graphs[graph_name]
        t, valid, past, cache = graph["tokens"], len(tokens), self.past, self.max_len
        ids = np.zeros((1, t), np.int64)
        positions = np.full((1, t), past + valid - 1, np.int64)
        mask = np.full((1, 1, t, cache + t), -np.inf, self.float)
        for i in range(t):
            if i < valid:
                ids[0, i] = tokens[i]
                positions[0, i] = past + i
                mask[0, 0, i, :past] = 0
                mask[0, 0, i, cache : cache + i + 1] = 0
            else:  # padding sees only itself; nothing sees it
                mask[0, 0, i, cache + i] = 0
        feeds = {
            "input_ids": ids,
            "position_ids": positions,
            "attention_mask": mask,
            "logits_index": np.array([[valid - 1]], np.int64),
            "k_cache": self.k_cache,
            "v_cache": self.v_cache,
        }
        logits, k_new, v_new = session.run(["logits", "k_new", "v_new"], feeds)
        self.k_cache[:, :, :, past : past + valid] = k_new[:, :, :, :valid]
        self.v_cache[:, :, :, past : past + valid] = v_new[:, :, :, :valid]
        self.past += valid
        return logits.reshape(-1).astype(np.float32)

    def forward(self, tokens: list[int]) -> np.ndarray:
        if self.past + len(tokens) > self.max_len:
            sys.exit(f"the conversation needs {self.past + len(tokens)} positions but the KV cache holds {self.max_len}")
        if len(tokens) == 1:
            return self._step("decode", tokens)
        chunk = self.manifest["prefill_len"]
        for start in range(0, len(tokens), chunk):
            logits = self._step("prefill", tokens[start : start + chunk])
        return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("compiled_dir", type=Path)
    parser.add_argument("--token-ids", required=True, help="prompt token ids, comma-separated")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--save-logits", type=Path, help="f32 .npy of shape [new tokens, vocab]")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--follow-ids", help="feed these generated ids instead of the argmax (for diffs: both sides see the same tokens)")
    args = parser.parse_args()

    session = OrtSession(args.compiled_dir)
    prompt = [int(t) for t in args.token_ids.split(",")]
    eos = set() if args.ignore_eos else set(session.manifest["generation"]["eos_token_ids"])
    start = time.perf_counter()
    logits = session.forward(prompt)
    prefill = time.perf_counter() - start
    rows, tokens = [], []
    start = time.perf_counter()
    follow = [int(t) for t in args.follow_ids.split(",")] if args.follow_ids else []
    while len(tokens) < args.max_new_tokens:
        token = follow[len(tokens)] if len(tokens) < len(follow) else int(np.argmax(logits))
        rows.append(logits)
        tokens.append(token)
        if token in eos or len(tokens) == args.max_new_tokens or session.past >= session.max_len:
            break
        logits = session.forward([token])
    decode = time.perf_counter() - start
    print(",".join(map(str, tokens)))
    if args.save_logits:
        np.save(args.save_logits, np.stack(rows).astype(np.float32))
    print(f"prefill: {len(prompt)} tokens in {prefill * 1e3:.1f} ms; decode: {len(tokens) - 1} tokens in {decode * 1e3:.1f} ms "
          f"(onnxruntime {ort.__version__}, {session.manifest['dtype']})", file=sys.stderr)


if __name__ == "__main__":
    main()
