#!/usr/bin/env python3
"""Benchmark: `kiln generate` against llama.cpp (llama-cpp-python, CPU) on
the same GGUF file, same prompt token ids, same thread count.

    python tests/bench/gguf_vs_llamacpp.py [MODEL.gguf ...] [--threads 2] [--repeats 5]
        [--kiln-args "--quant keep"] [--kiln-args "--quant none"]

Needs llama-cpp-python and numpy, and a release build (`cargo build
--release -p kiln`; $KILN_BIN overrides the binary). The models default to
SmolLM2-135M-Instruct's Q4_1 GGUF (examples/fetch_smollm2.sh) and, if
present beside it, the Q8_0 copy tests/bench/make_smollm2_q8_0.py writes.

The prompt is the first --prompt-len (64) tokens of a fixed English text,
tokenized by llama.cpp and given to Kiln as --token-ids. Both sides
generate --new-tokens (32) greedily, ignoring end-of-sequence, with a KV
cache of --ctx (1024, Kiln's default) positions. Prefill = one forward over
the prompt, returning the last position's logits; decode = picking the
first token from them and (new tokens - 1) single-token steps, each
followed by a greedy argmax. Model loading is not timed.

Kiln: the `kiln` binary runs `generate FILE --token-ids ... --warmup 1`
(one untimed pass first) and reports its own prefill and decode times on
stderr, which are parsed; each --kiln-args string is passed through and
gets its own rows. llama.cpp: llama_cpp.Llama (n_threads and
n_threads_batch = --threads, n_batch = n_ubatch >= the prompt; flash
attention off and an f16 KV cache, llama-cpp-python's defaults) in a
separate process, so that its peak RSS is its own; it times eval() of the
prompt and then eval() of one token at a time, argmax over the logits
llama_get_logits_ith returns, after one untimed warm-up run. The sides take
turns, --repeats runs each, so that load from other processes on a shared
machine falls on all alike; the best run is reported, the median beside it,
and the 1-minute load average before and after. (llama.cpp's threads wait
for each other at every op by spinning: when other processes hold the
cores, a step waits for the scheduler, and its speed with 2 threads on a
busy 2-core machine falls far below its speed with 1.)

Peak RSS is the maximum resident set size: of each kiln process (from
/usr/bin/time -v, else the running maximum over this script's children,
getrusage(RUSAGE_CHILDREN)), and of the llama.cpp process (Python, numpy
and llama_cpp included; what they held before loading the model is printed).
The greedy ids of both sides are printed with how many agree from the
start: llama.cpp quantizes activations to 8 bits for its quantized matmuls,
so the two may part after a few tokens.
"""

import argparse
import multiprocessing
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import llama_cpp
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
# KILN_BIN overrides it (a build with another CARGO_TARGET_DIR, say).
KILN = Path(os.environ.get("KILN_BIN", ROOT / "target" / "release" / "kiln"))
MODELS = Path.home() / ".cache" / "kiln" / "models"
GNU_TIME = shutil.which("time", path="/usr/bin")

PROMPT_TEXT = (
    "The history of Paris begins with a small settlement of the Parisii, a Celtic tribe, on an "
    "island in the Seine. The Romans conquered the area in 52 BC and built a town called Lutetia "
    "on the left bank of the river, with a forum, baths, temples and an amphitheatre. In the "
    "centuries that followed, the city grew into the capital of the kingdom of France, and by the "
    "Middle Ages it was one of the largest cities in Europe, known for its university, its "
    "cathedral and its markets. Today Paris is"
)


def peak_rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # kilobytes on Linux


def llama_greedy(llm: llama_cpp.Llama, n_vocab: int) -> int:
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
    return int(logits.argmax())


def llama_run(llm: llama_cpp.Llama, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    n_vocab = llm.n_vocab()
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    tokens = [llama_greedy(llm, n_vocab)]
    for _ in range(new_tokens - 1):
        llm.eval([tokens[-1]])
        tokens.append(llama_greedy(llm, n_vocab))
    decode = time.perf_counter() - start
    return prefill, decode, tokens


def llama_worker(conn, model: str, prompt_len: int, new_tokens: int, threads: int, ctx: int) -> None:
    """The llama.cpp side, in its own process: answers "run", "text" and "stop"."""
    before = peak_rss_mb(resource.RUSAGE_SELF)
    batch = max(512, prompt_len)
    llm = llama_cpp.Llama(model_path=model, n_ctx=ctx, n_batch=batch, n_ubatch=batch,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    prompt = llm.tokenize(PROMPT_TEXT.encode())[:prompt_len]
    llama_run(llm, prompt, new_tokens)  # warm-up
    conn.send((llama_cpp.__version__, prompt, before))
    while True:
        command, *rest = conn.recv()
        if command == "run":
            conn.send(llama_run(llm, prompt, new_tokens))
        elif command == "text":
            conn.send(llm.detokenize(rest[0]).decode(errors="replace"))
        else:
            conn.send(peak_rss_mb(resource.RUSAGE_SELF))
            return


def kiln_run(model: Path, prompt: list[int], args, extra: str) -> tuple[float, float, list[int], float]:
    cmd = [
        str(KILN), "generate", str(model),
        "--token-ids", ",".join(map(str, prompt)),
        "--max-new-tokens", str(args.new_tokens), "--ignore-eos",
        "--threads", str(args.threads), "--prefill-len", str(len(prompt)),
        "--max-seq-len", str(args.ctx), "--warmup", "1", *shlex.split(extra),
    ]
    with tempfile.NamedTemporaryFile(mode="r") as usage:
        timed = [GNU_TIME, "-v", "-o", usage.name, *cmd] if GNU_TIME else cmd
        result = subprocess.run(timed, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"{shlex.join(cmd)} failed:\n{result.stderr}")
        if GNU_TIME:
            line = next(row for row in usage.read().splitlines() if "Maximum resident set size" in row)
            rss = int(line.split(":")[1]) / 1024
        else:
            rss = peak_rss_mb(resource.RUSAGE_CHILDREN)
    times = {}
    for line in result.stderr.splitlines():
        # "prefill: 64 tokens in 123.4 ms (...)" / "decode:  31 tokens in 456.7 ms (...)"
        if line.startswith(("prefill:", "decode:")):
            times[line.split(":")[0]] = float(line.split(" in ")[1].split(" ms")[0]) / 1e3
    tokens = [int(t) for t in result.stdout.strip().split(",")]
    return times["prefill"], times["decode"], tokens, rss


def rates(runs, prompt_len: int, steps: int) -> tuple[float, float, float, float]:
    prefill = [prompt_len / r[0] for r in runs]
    decode = [steps / r[1] for r in runs]
    return max(prefill), statistics.median(prefill), max(decode), statistics.median(decode)


def agreeing(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def bench(model: Path, args) -> None:
    load_before = os.getloadavg()[0]
    parent, child = multiprocessing.Pipe()
    worker = multiprocessing.get_context("spawn").Process(
        target=llama_worker, args=(child, str(model), args.prompt_len, args.new_tokens, args.threads, args.ctx))
    worker.start()
    version, prompt, llama_base_rss = parent.recv()
    if len(prompt) < args.prompt_len:
        sys.exit(f"the prompt text has only {len(prompt)} tokens; use --prompt-len {len(prompt)} or less")
    kiln_names = [" ".join(["kiln", *shlex.split(extra)]) for extra in args.kiln_args]
    runs = {name: [] for name in [f"llama.cpp {version}", *kiln_names]}
    for _ in range(args.repeats):
        parent.send(("run",))
        runs[f"llama.cpp {version}"].append(parent.recv())
        for name, extra in zip(kiln_names, args.kiln_args):
            runs[name].append(kiln_run(model, prompt, args, extra))
    texts = {}
    for name, r in runs.items():
        parent.send(("text", r[0][2]))
        texts[name] = parent.recv()
    parent.send(("stop",))
    llama_rss = parent.recv()
    worker.join()

    print(f"\n{model.name} ({model.stat().st_size / 1e6:.1f} MB): prompt {len(prompt)} tokens, "
          f"{args.new_tokens} new tokens, {args.threads} threads, KV cache {args.ctx}, {args.repeats} runs each; "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    steps = args.new_tokens - 1
    rows = {name: rates(r, len(prompt), steps) for name, r in runs.items()}
    rss = {name: max(r[3] for r in runs[name]) for name in kiln_names}
    rss[f"llama.cpp {version}"] = llama_rss
    width = max(30, *(len(f"ratio {name} / llama.cpp") + 1 for name in kiln_names))
    print(f"{'tokens/s, best (median)':{width}} {'prefill':>16} {'decode':>14} {'peak RSS':>10}")
    for name, (pb, pm, db, dm) in rows.items():
        print(f"{name:{width}} {pb:7.1f} ({pm:6.1f}) {db:6.1f} ({dm:5.1f}) {rss[name]:7.0f} MB")
    llama = rows[f"llama.cpp {version}"]
    for name in kiln_names:
        ratio = [rows[name][i] / llama[i] for i in range(4)]
        label = f"ratio {name} / llama.cpp"
        print(f"{label:{width}} {ratio[0]:7.2f} ({ratio[1]:6.2f}) {ratio[2]:6.2f} ({ratio[3]:5.2f})")
    print(f"(llama.cpp's RSS includes {llama_base_rss:.0f} MB held by Python, numpy and llama_cpp before loading the model)")

    llama_ids = runs[f"llama.cpp {version}"][0][2]
    for name, r in runs.items():
        ids = r[0][2]
        varies = "" if all(run[2] == ids for run in r) else " (they differ between runs!)"
        print(f"{name} greedy ids: {ids}{varies}\n  text: {texts[name]!r}")
        if name in kiln_names:
            print(f"  the first {agreeing(ids, llama_ids)} of {args.new_tokens} agree with llama.cpp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="*",
                        help="GGUF files [default: SmolLM2-135M-Instruct Q4_1, and Q8_0 if present]")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--ctx", type=int, default=1024, help="KV-cache positions (kiln --max-seq-len, llama.cpp n_ctx)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kiln-args", action="append", metavar='"ARGS"',
                        help='extra kiln generate arguments, e.g. "--quant keep"; repeat it to compare several')
    args = parser.parse_args()
    args.kiln_args = args.kiln_args or [""]
    if not KILN.exists():
        sys.exit(f"{KILN} not found: run `cargo build --release -p kiln` first")
    models = args.models or [m for m in (MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf",
                                         MODELS / "SmolLM2-135M-Instruct.Q8_0.gguf") if m.exists()]
    if not models:
        sys.exit(f"no model in {MODELS}: run examples/fetch_smollm2.sh first")
    for model in models:
        bench(model, args)


if __name__ == "__main__":
    main()
