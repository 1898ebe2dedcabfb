#!/usr/bin/env python3
"""Runs a directory written by `kiln compile` with ONNX Runtime, the way the
NPU runtime runs it: the prompt in chunks of the largest graph (prefill, or
the one `step` graph of `--graphs single`), then one step per generated
token on the smallest graph, with the host writing each step's new K/V rows
into the cache as manifest.json describes.

    python examples/ort_run.py COMPILED_DIR --token-ids 3,17,250 --max-new-tokens 8 \\
        [--save-logits logits.npy] [--ignore-eos] \\
        [--dump model.layers.0.mlp_residual,logits --dump-dir DIR]

It takes the same options as `kiln generate` and prints the generated ids the
same way (comma-separated on stdout), so the two can be compared file to file.
Needs numpy and onnxruntime (and onnx for --dump), and the directory's
weights.bin: kiln compile records how to make it instead of storing it, so
run `kiln-run expand-weights COMPILED_DIR` first (kiln diff does it itself).

--dump saves intermediate values, by IR value name (the ONNX graphs keep the
IR's names), as DIR/step<N>/<name>.npy in f32: each is added as an extra
graph output when the sessions are created. Step N's values come from the
graph run that produced step N's logits (a long prompt's last prefill chunk).
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def file_stem(name: str) -> str:
    """The dump file name of a value (as `kiln diff` names them)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def with_outputs(path: Path, names: list, float_type, options: "ort.SessionOptions") -> "ort.InferenceSession":
    """A session on the model with `names` added as graph outputs: ORT can
    return any intermediate value once it is listed as one."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    computed = {out for node in graph.node for out in node.output}
    missing = [n for n in names if n not in computed]
    if missing:
        sys.exit(f"{path.name} computes no value named {', '.join(missing)}")
    outputs = {o.name for o in graph.output}
    types = value_types(model, float_type)
    for name in names:
        if name not in outputs:
            graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, types[None]), None))
    # Created from bytes, ORT needs to be told where external weights live.
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent.resolve()))
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # an ORT without that option: load the weights too (< 2 GB)
        model = onnx.load(str(path))
        for name in names:
            if name not in outputs:
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, types[None]), None))
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def value_types(model, float_type) -> dict:
    """Each value's element type as onnx's shape inference finds it (an fp16
    model's residual stream is f32 with --residual-dtype f32); under None the
    model's float type, for values inference leaves untyped."""
    import onnx

    types = {None: onnx.TensorProto.FLOAT16 if float_type == np.float16 else onnx.TensorProto.FLOAT}
    inferred = onnx.shape_inference.infer_shapes(model)
    for value in inferred.graph.value_info:
        if value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return types


class ReferenceSession:
    """onnx's own reference evaluator (numpy) behind ORT's `run`: every value
    in the type the graph gives it. ONNX Runtime's CPU provider has no fp16
    kernels for most ops and runs them in f32 between inserted Casts, so an
    fp16 value that overflows inside the graph may never become inf there
    (https://github.com/microsoft/onnxruntime/issues/11831); this engine
    shows what a device computing in fp16 computes. Slow: tiny models only."""

    def __init__(self, path: Path):
        import onnx
        from onnx.reference import ReferenceEvaluator

        self.evaluator = ReferenceEvaluator(onnx.load(str(path)))

    def run(self, names, feeds):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # overflow is what it may be asked to show
            return self.evaluator.run(names, feeds)


class OrtSession:
    def __init__(self, directory: Path, dump: "list[str] | None" = None, engine: str = "onnxruntime"):
        self.manifest = json.loads((directory / "manifest.json").read_text())
        m = self.manifest
        # kiln compile leaves weights.bin out and records how to make it.
        weights_bin = (m.get("weights_bin") or {}).get("file")
        if weights_bin and not (directory / weights_bin).is_file():
            sys.exit(
                f"{directory / weights_bin} is not there: kiln compile records how to make it from the reference "
                f"weights instead of storing it; run `kiln-run expand-weights {directory}` (or `kiln expand-weights`) "
                "first (kiln diff does it itself)"
            )
        self.float = {"float32": np.float32, "float16": np.float16}[m["dtype"]]
        self.dump = dump or []
        self.dumped = {}  # the last graph run's values, by name
        self.graphs = {}
        for graph in m["graphs"]:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            # A quantized model's graphs for ONNX Runtime keep the quantized
            # weights (graph["onnx"] is ATC's, with them dequantized).
            path = directory / (graph.get("ort_onnx") or graph["onnx"])
            if engine == "onnx-reference":
                if self.dump:
                    sys.exit("--dump needs --engine onnxruntime")
                session = ReferenceSession(path)
            elif self.dump:
                session = with_outputs(path, self.dump, self.float, options)
            else:
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
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
        ids[0, :valid] = tokens
        positions[0, :valid] = np.arange(past, past + valid)
        feeds = {
            "input_ids": ids,
            "position_ids": positions,
            "logits_index": np.array([[valid - 1]], np.int64),
            "k_cache": self.k_cache,
            "v_cache": self.v_cache,
        }
        # One mask per input the manifest lists (attention_mask, and
        # attention_mask_local for sliding-window layers), as
        # kiln_runtime::engine::step_mask builds them.
        for spec in self.manifest["mask"]["inputs"]:
            window = spec.get("sliding_window")
            mask = np.full((1, 1, t, cache + t), -np.inf, self.float)
            for i in range(t):
                if i < valid:
                    p = past + i
                    first = 0 if window is None else max(p + 1 - window, 0)
                    mask[0, 0, i, min(first, past) : past] = 0
                    mask[0, 0, i, cache + max(first - past, 0) : cache + i + 1] = 0
                else:  # padding sees only itself; nothing sees it
                    mask[0, 0, i, cache + i] = 0
            feeds[spec["input"]] = mask
        logits, k_new, v_new, *dumped = session.run(["logits", "k_new", "v_new", *self.dump], feeds)
        self.dumped = {name: value.astype(np.float32) for name, value in zip(self.dump, dumped)}
        self.k_cache[:, :, :, past : past + valid] = k_new[:, :, :, :valid]
        self.v_cache[:, :, :, past : past + valid] = v_new[:, :, :, :valid]
        self.past += valid
        return logits.reshape(-1).astype(np.float32)

    def forward(self, tokens: list[int]) -> np.ndarray:
        if self.past + len(tokens) > self.max_len:
            sys.exit(f"the conversation needs {self.past + len(tokens)} positions but the KV cache holds {self.max_len}")
        # As Kiln's engines chunk (kiln_runtime::engine::step_chunks): the
        # smallest graph that takes what is left, else a full chunk of the
        # largest (prefill + decode, or one `step` graph for both).
        sizes = {name: graph["tokens"] for name, (graph, _) in self.graphs.items()}
        start = 0
        while start < len(tokens):
            left = len(tokens) - start
            fitting = [name for name, t in sizes.items() if t >= left]
            name = min(fitting, key=sizes.get) if fitting else max(sizes, key=sizes.get)
            logits = self._step(name, tokens[start : start + sizes[name]])
            start += sizes[name]
        return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("compiled_dir", type=Path)
    parser.add_argument("--token-ids", required=True, help="prompt token ids, comma-separated")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--save-logits", type=Path, help="f32 .npy of shape [new tokens, vocab]")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--follow-ids", help="feed these generated ids instead of the argmax (for diffs: both sides see the same tokens)")
    parser.add_argument("--dump", nargs="+", metavar="NAME[,NAME...]", help="save these IR values of every step (needs --dump-dir)")
    parser.add_argument("--dump-dir", type=Path, help="where --dump writes step<N>/<name>.npy")
    parser.add_argument(
        "--engine",
        choices=["onnxruntime", "onnx-reference"],
        default="onnxruntime",
        help="onnx-reference: onnx's own numpy evaluator, every value in its graph type (fp16 overflow shows); tiny models only",
    )
    args = parser.parse_args()
    dump = [n for arg in args.dump or [] for n in arg.split(",") if n]
    if dump and not args.dump_dir:
        parser.error("--dump needs --dump-dir")

    session = OrtSession(args.compiled_dir, dump, args.engine)
    prompt = [int(t) for t in args.token_ids.split(",")]
    eos = set() if args.ignore_eos else set(session.manifest["generation"]["eos_token_ids"])

    def save_dumps(step: int) -> None:
        if dump:
            step_dir = args.dump_dir / f"step{step}"
            step_dir.mkdir(parents=True, exist_ok=True)
            for name, value in session.dumped.items():
                np.save(step_dir / f"{file_stem(name)}.npy", value)

    start = time.perf_counter()
    logits = session.forward(prompt)
    prefill = time.perf_counter() - start
    save_dumps(0)
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
        save_dumps(len(tokens))
    decode = time.perf_counter() - start
    print(",".join(map(str, tokens)))
    if args.save_logits:
        np.save(args.save_logits, np.stack(rows).astype(np.float32))
    print(f"prefill: {len(prompt)} tokens in {prefill * 1e3:.1f} ms; decode: {len(tokens) - 1} tokens in {decode * 1e3:.1f} ms "
          f"({'onnx reference evaluator' if args.engine == 'onnx-reference' else 'onnxruntime ' + ort.__version__}, "
          f"{session.manifest['dtype']})", file=sys.stderr)


if __name__ == "__main__":
    main()
