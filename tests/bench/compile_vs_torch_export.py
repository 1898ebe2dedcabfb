#!/usr/bin/env python3
"""Benchmark: `kiln compile` against the peers' way to the same place —
`torch.onnx.export` of the Hugging Face model — in one run: wall time and
peak memory (max RSS of the process), on a random model of SmolLM2-135M's
shape (f32 safetensors, ~540 MB of weights).

    python tests/bench/compile_vs_torch_export.py [--dtype fp32|fp16]

Needs torch + transformers + onnxscript (tests/golden/requirements.txt) and a
release build of kiln. Each side runs in a fresh process measured with
/usr/bin/time; the export side loads the model with transformers and
exports one static-shape forward over 64 tokens (the simplest export the
community scripts start from; theirs add KV-cache inputs and cost more).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KILN = ROOT / "target" / "release" / "kiln"

EXPORT = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    model_dir, out, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16 if dtype == "fp16" else torch.float32)
    model.eval()

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(input_ids=ids, use_cache=False).logits

    ids = torch.zeros((1, 64), dtype=torch.long)
    with torch.no_grad():
        torch.onnx.export(Logits(model), (ids,), out, input_names=["input_ids"], output_names=["logits"],
                          opset_version=18, dynamo=True)
    """
)


def measure(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of a command."""
    result = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{result.stderr[-3000:]}")
    wall, rss_kb = result.stderr.strip().splitlines()[-1].split()
    return float(wall), int(rss_kb) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    args = parser.parse_args()
    if not KILN.exists():
        sys.exit(f"{KILN} not found: run `cargo build --release` first")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "smollm2-135m-shape"
        # Made in a child process: PyTorch's idle worker threads in this one
        # would otherwise compete with the processes being measured.
        make = (
            f"import sys; sys.path.insert(0, {str(ROOT / 'tests' / 'bench')!r})\n"
            "from interp_vs_torch import smollm2_135m_shape\n"
            "import torch\nfrom transformers import LlamaForCausalLM\n"
            f"torch.manual_seed(0); LlamaForCausalLM(smollm2_135m_shape()).save_pretrained({str(model_dir)!r})\n"
        )
        subprocess.run([sys.executable, "-c", make], check=True, capture_output=True)
        weights_mb = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**20
        os.sync()  # neither side should race the writeback of the model just saved

        # Writing is the bottleneck: each run writes about twice the weights
        # (inline, each graph carries them; --external-data writes them once
        # for both; weights.safetensors is the f32 reference copy). Each run
        # starts after a sync, so none is throttled by the writeback of the
        # one before. The shared machine is noisy: best of three for kiln;
        # one run for the export, which takes far longer.
        def kiln(extra: list[str], tag: str) -> tuple[float, float]:
            runs = []
            for i in range(3):
                os.sync()
                runs.append(measure([str(KILN), "compile", str(model_dir), "-o", str(tmp / f"kiln-{tag}-{i}"),
                                     "--dtype", args.dtype, "--no-atc", *extra]))
            return min(r[0] for r in runs), max(r[1] for r in runs)

        kiln_time, kiln_rss = kiln([], "inline")
        ext_time, ext_rss = kiln(["--external-data"], "external")
        script = tmp / "export.py"
        script.write_text(EXPORT)
        os.sync()
        torch_time, torch_rss = measure([sys.executable, str(script), str(model_dir), str(tmp / "torch.onnx"), args.dtype])

    print(f"model: random SmolLM2-135M shape, {weights_mb:.0f} MiB of f32 weights; output {args.dtype}")
    print(f"{'':34} {'wall s':>8} {'peak RSS MiB':>13} {'RSS / weights':>14}")
    print(f"{'kiln compile (prefill + decode)':34} {kiln_time:8.2f} {kiln_rss:13.0f} {kiln_rss / weights_mb:14.2f}")
    print(f"{'  … with --external-data':34} {ext_time:8.2f} {ext_rss:13.0f} {ext_rss / weights_mb:14.2f}")
    print(f"{'torch.onnx.export (one graph)':34} {torch_time:8.2f} {torch_rss:13.0f} {torch_rss / weights_mb:14.2f}")
    print(f"{'ratio torch / kiln':34} {torch_time / kiln_time:8.1f}x {torch_rss / kiln_rss:12.1f}x")
    print(f"{'ratio torch / kiln --external-data':34} {torch_time / ext_time:8.1f}x {torch_rss / ext_rss:12.1f}x")


if __name__ == "__main__":
    main()
