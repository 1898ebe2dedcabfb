"""Checks the ATC graphs of a `kiln compile --quant w8a8` directory.

onnx and ONNX Runtime know neither AscendQuant nor AscendDequant (Huawei's
own ops in the default domain), nor an int8 x int8 MatMul, so the ATC graphs
cannot be checked as they are. This script:

1. checks their form: AscendQuant/AscendDequant with the attributes ATC's
   ONNX parser reads, every MatMul weight an INT8 initializer, every
   deq_scale a UINT64 word with only the f32 scale's top 19 bits set
   (offset 0: symmetric weights);
2. replaces each Ascend op by standard ops that compute what its CANN page
   documents (AscendQuant(scale=1, offset=0, round_mode=Round) = round half
   to even to int8; int8 MatMul = MatMulInteger; AscendDequant(dtype=0) =
   f32(x) times the f32 held in deq_scale's bits 31..0), checks the result
   with onnx.checker (full check), and runs it with ONNX Runtime beside the
   directory's .ort.onnx graph on the same inputs: the outputs must be equal
   bit for bit.

What this cannot show is that the NPU computes those documented semantics;
nothing here ran on Ascend hardware.

Usage: ascend_w8a8.py DIR GRAPH...   (prints one JSON line per graph)
"""

import json
import pathlib
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ASCEND_QUANT_ATTRS = {
    "scale": 1.0,
    "offset": 0.0,
    "sqrt_mode": 0,
    "round_mode": b"Round",
    "dst_type": b"INT8",
}
ASCEND_DEQUANT_ATTRS = {"dtype": 0, "sqrt_mode": 0, "relu_flag": 0}


def attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def fail(message):
    raise SystemExit(f"ascend_w8a8.py: {message}")


def check_form(model):
    """Asserts the ATC form; returns counts for the report."""
    inits = {i.name: i for i in model.graph.initializer}
    ops = [n.op_type for n in model.graph.node]
    for banned in ("MatMulInteger", "QuantizeLinear", "DequantizeLinear"):
        if banned in ops:
            fail(f"the ATC graph uses {banned}, which ATC does not list")
    quants = [n for n in model.graph.node if n.op_type == "AscendQuant"]
    dequants = [n for n in model.graph.node if n.op_type == "AscendDequant"]
    if not quants or len(quants) != len(dequants):
        fail(f"{len(quants)} AscendQuant and {len(dequants)} AscendDequant nodes")
    for node in quants:
        if attrs(node) != ASCEND_QUANT_ATTRS:
            fail(f"{node.name}: AscendQuant attributes {attrs(node)}")
    int8_bytes = 0
    matmuls = 0
    quantized = {n.output[0] for n in quants}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[0] not in quantized:
            continue  # float products (attention, RoPE's rotation)
        weight = inits.get(node.input[1])
        if weight is None or weight.data_type != TensorProto.INT8:
            fail(f"{node.name}: the MatMul after AscendQuant has no INT8 weight initializer")
        int8_bytes += numpy_helper.to_array(weight).nbytes
        matmuls += 1
    if matmuls != len(quants):
        fail(f"{matmuls} int8 MatMuls for {len(quants)} AscendQuant nodes")
    for node in dequants:
        if attrs(node) != ASCEND_DEQUANT_ATTRS:
            fail(f"{node.name}: AscendDequant attributes {attrs(node)}")
        deq = inits[node.input[1]]
        if deq.data_type != TensorProto.UINT64 or len(deq.dims) != 1:
            fail(f"{deq.name}: deq_scale must be 1-D UINT64")
        words = numpy_helper.to_array(deq).astype(np.uint64)
        if np.any(words >> np.uint64(32)) or np.any(words & np.uint64(0x1FFF)):
            fail(f"{deq.name}: bits outside the f32 scale's top 19 are set")
    return {"ascend_quant": len(quants), "int8_matmuls": matmuls, "int8_bytes": int8_bytes}


def emulate(model):
    """The ATC graph with each Ascend op spelled in standard ops."""
    inits = {i.name: i for i in model.graph.initializer}
    quantized = {n.output[0] for n in model.graph.node if n.op_type == "AscendQuant"}
    nodes = []
    for node in model.graph.node:
        out = node.output[0]
        if node.op_type == "AscendQuant":
            rounded = f"{out}/emulated_round"
            nodes.append(helper.make_node("Round", [node.input[0]], [rounded]))
            nodes.append(helper.make_node("Cast", [rounded], [out], to=TensorProto.INT8))
        elif node.op_type == "MatMul" and node.input[0] in quantized:
            nodes.append(helper.make_node("MatMulInteger", list(node.input), [out]))
        elif node.op_type == "AscendDequant":
            words = numpy_helper.to_array(inits[node.input[1]]).astype(np.uint64)
            scale = (words & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32)
            name = f"{node.input[1]}/emulated_f32"
            model.graph.initializer.remove(inits[node.input[1]])
            model.graph.initializer.append(numpy_helper.from_array(scale, name))
            wide = f"{out}/emulated_f32"
            nodes.append(helper.make_node("Cast", [node.input[0]], [wide], to=TensorProto.FLOAT))
            nodes.append(helper.make_node("Mul", [wide, name], [out]))
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def inputs_for(session, vocab, seed):
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        shape = i.shape
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(0, vocab, size=shape, dtype=np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(shape[1], dtype=np.int64).reshape(shape)
        elif i.name == "logits_index":
            feeds[i.name] = np.full(shape, 0, dtype=np.int64)
        elif i.name.startswith("attention_mask"):
            dtype = np.float16 if i.type == "tensor(float16)" else np.float32
            feeds[i.name] = np.zeros(shape, dtype=dtype)
        else:
            dtype = np.float16 if i.type == "tensor(float16)" else np.float32
            feeds[i.name] = (rng.standard_normal(shape) * 0.5).astype(dtype)
    return feeds


def main():
    directory = pathlib.Path(sys.argv[1])
    manifest = json.loads((directory / "manifest.json").read_text())
    for name in sys.argv[2:]:
        graph = next(g for g in manifest["graphs"] if g["name"] == name)
        atc = onnx.load(directory / graph["onnx"])
        report = {"graph": name, **check_form(atc)}
        emulated = emulate(atc)
        onnx.checker.check_model(emulated, full_check=True)
        options = ort.SessionOptions()
        # No graph rewrites: the two graphs are compared as written.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        ours = ort.InferenceSession(emulated.SerializeToString(), options, providers=["CPUExecutionProvider"])
        reference = ort.InferenceSession(str(directory / graph["ort_onnx"]), options, providers=["CPUExecutionProvider"])
        feeds = inputs_for(reference, manifest["vocab_size"], seed=len(name))
        got = ours.run(None, feeds)
        want = reference.run(None, feeds)
        for out, a, b in zip(reference.get_outputs(), got, want):
            if a.shape != b.shape or not np.array_equal(a, b):
                diff = np.abs(a.astype(np.float64) - b.astype(np.float64)).max() if a.shape == b.shape else "shape"
                fail(f"{name}: output {out.name} differs from the .ort.onnx graph's (max abs {diff})")
            if not np.all(np.isfinite(a)):
                fail(f"{name}: output {out.name} is not finite")
        report["outputs_equal"] = len(want)
        print(json.dumps(report))


if __name__ == "__main__":
    main()
