#!/usr/bin/env python3
"""Records transformers' strided-window perplexity of a fixed text for two
fixture models: the goldens `kiln eval` is tested against (tests/eval.rs).

Run it from the repository root (needs tests/golden/requirements.txt, ~6 GB):

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install -r tests/golden/requirements.txt
    /tmp/ref/bin/python tests/golden/make_eval_goldens.py

It writes tests/fixtures/golden/<model>/eval.json. The text,
tests/fixtures/eval/apache-2.0-head.txt, is the start of the Apache License
2.0 (Debian's /usr/share/common-licenses/Apache-2.0); it is tokenized as
`tokenizer(text)` does by default, as `kiln eval --text` does, and the ids are
recorded so that the test can check both sides score the same tokens.

The method is that of transformers' perplexity guide: windows of `ctx`
tokens starting every `stride` tokens, the last one the first to reach the
end; in each, only the tokens the previous window did not cover are labels,
and the model's own loss (labels shifted by one inside the model) is their
mean NLL. The guide weights each window's loss by its label count minus one;
here it is weighted by the labels the loss actually averaged (after the
shift), so that the result is exp(mean NLL over every token after the first),
which is what Kiln reports. The same figure is also computed from the logits
in float64 and the two must agree.
"""

import json
import math
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "tests" / "fixtures" / "models"
GOLDEN = ROOT / "tests" / "fixtures" / "golden"
TEXT = Path("tests/fixtures/eval/apache-2.0-head.txt")

FIXTURES = ["llama-bf16-tied", "qwen3"]
# `stride: None` is kiln eval's default, ctx // 2; `max_tokens` cuts the text.
RUNS = [
    {"ctx": 64, "stride": None, "max_tokens": None},
    {"ctx": 100, "stride": 37, "max_tokens": 250},
]
# The loss (float32) and the float64 log-softmax must agree this closely.
CROSS_CHECK = 1e-6


def windows(n: int, ctx: int, stride: int):
    """(begin, end, first scored position) of each window, as the guide's loop makes them."""
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + ctx, n)
        yield begin, end, max(prev_end, begin + 1)
        prev_end = end
        if end == n:
            break


def strided_perplexity(model, ids: list[int], ctx: int, stride: int) -> dict:
    seq = torch.tensor([ids])
    nll_sum, nll64_sum, scored, count = 0.0, 0.0, 0, 0
    prev_end = 0
    for begin, end, first in windows(len(ids), ctx, stride):
        target_len = end - prev_end
        input_ids = seq[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-target_len] = -100
        with torch.no_grad():
            out = model(input_ids, labels=labels)
        # The model shifts the labels by one: these are the ones its loss averages.
        counted = int((labels[:, 1:] != -100).sum())
        assert counted == end - first, (begin, end, first, counted)
        nll_sum += float(out.loss) * counted
        # The same from the logits, in float64: row r predicts token r + 1.
        logp = torch.log_softmax(out.logits[0].double(), dim=-1)
        rows = torch.arange(first - 1 - begin, end - 1 - begin)
        nll64_sum += float(-logp[rows, input_ids[0, rows + 1]].sum())
        scored += counted
        count += 1
        prev_end = end
    mean_nll = nll_sum / scored
    mean_nll64 = nll64_sum / scored
    assert math.isfinite(mean_nll), "the reference's perplexity is not finite"
    assert abs(mean_nll - mean_nll64) <= CROSS_CHECK * abs(mean_nll64), (mean_nll, mean_nll64)
    assert scored == len(ids) - 1, "every token after the first is scored once"
    return {
        "windows": count,
        "scored_tokens": scored,
        "mean_nll": mean_nll64,
        "ppl": math.exp(mean_nll64),
    }


def main() -> None:
    torch.use_deterministic_algorithms(True)
    text = (ROOT / TEXT).read_text(encoding="utf-8")
    for name in FIXTURES:
        model_dir = MODELS / name
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
        model.eval()
        ids = tokenizer(text)["input_ids"]
        runs = []
        for run in RUNS:
            stride = run["stride"] or run["ctx"] // 2
            kept = ids[: run["max_tokens"]] if run["max_tokens"] else ids
            result = strided_perplexity(model, kept, run["ctx"], stride)
            runs.append(
                {
                    "ctx": run["ctx"],
                    "stride": stride,
                    "stride_is_default": run["stride"] is None,
                    "max_tokens": run["max_tokens"],
                    "tokens": len(kept),
                    **result,
                }
            )
            print(f"{name}: ctx {run['ctx']} stride {stride}, {len(kept)} tokens: "
                  f"{result['windows']} windows, ppl {result['ppl']:.6f}")
        golden = {
            "model": name,
            "text": str(TEXT),
            "tokenization": "tokenizer(text): with the special tokens the tokenizer adds by default",
            "token_ids": ids,
            "runs": runs,
            "reference": {
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "attn_implementation": "eager",
                "dtype": "float32",
                "nll": "float64 log-softmax of the logits; the model's float32 loss agrees within "
                f"{CROSS_CHECK:g} relative",
            },
        }
        out = GOLDEN / name / "eval.json"
        out.write_text(json.dumps(golden, indent=2) + "\n")


if __name__ == "__main__":
    main()
