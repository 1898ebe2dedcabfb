#!/usr/bin/env python3
"""Records what float16 alone does to each fixture, in transformers itself:
the floor an fp16 compile can be held to.

For every fixture of make_fixtures.py it reruns the golden's steps (the
prompt, then the golden's own greedy ids, so every step sees the same
tokens) twice and writes tests/fixtures/golden/<name>/:

- logits_fp16.npy: the model in float16 (`model.half()`, transformers' own
  fp16 compute on the CPU);
- fp16.json: for both that run and the f32 model over fp16-rounded weights,
  the worst step's max |logit − golden| / max |golden logit| and the lowest
  cosine to the golden.

    /tmp/ref/bin/python tests/golden/make_fp16_goldens.py
"""

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "tests" / "fixtures" / "models"
GOLDEN = ROOT / "tests" / "fixtures" / "golden"


def follow(model, golden: dict) -> np.ndarray:
    """Logits of the prompt's last token, then of each golden id in turn."""
    rows = []
    with torch.no_grad():
        out = model(input_ids=torch.tensor([golden["prompt_ids"]]), use_cache=True)
        for step, token in enumerate(golden["generated_ids"]):
            rows.append(out.logits[0, -1].float().numpy().copy())
            if step + 1 < len(golden["generated_ids"]):
                out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return np.stack(rows).astype(np.float32)


def distance(logits: np.ndarray, golden: np.ndarray) -> dict:
    with np.errstate(invalid="ignore"):
        rel = [float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(logits, golden)]
        cos = [float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(logits, golden)]
    # NaN (an overflow) is reported as null: json has no NaN.
    worst = lambda v, f: None if any(np.isnan(v)) else f(v)
    return {"max_abs_over_max_logit": worst(rel, max), "min_cosine": worst(cos, min), "finite": bool(np.isfinite(logits).all())}


def load(name: str):
    return AutoModelForCausalLM.from_pretrained(MODELS / name, dtype=torch.float32, attn_implementation="eager").eval()


def main() -> None:
    torch.use_deterministic_algorithms(True)
    for golden_dir in sorted(GOLDEN.iterdir()):
        name = golden_dir.name
        if not (MODELS / name).is_dir():
            continue
        golden = json.loads((golden_dir / "golden.json").read_text())
        reference = np.load(golden_dir / "logits.npy")
        rounded = load(name)
        with torch.no_grad():
            for p in rounded.parameters():
                p.copy_(p.half().float())
        half = load(name).half()
        fp16 = follow(half, golden)
        np.save(golden_dir / "logits_fp16.npy", fp16)
        report = {
            "what": "float16 against the f32 golden, over the golden's own tokens",
            "model_in_float16": distance(fp16, reference),
            "f32_over_fp16_rounded_weights": distance(follow(rounded, golden), reference),
            "reference": {"transformers": transformers.__version__, "torch": torch.__version__, "device": "cpu"},
        }
        (golden_dir / "fp16.json").write_text(json.dumps(report, indent=2) + "\n")
        print(name, json.dumps({k: v for k, v in report.items() if k not in ("what", "reference")}))


if __name__ == "__main__":
    main()
