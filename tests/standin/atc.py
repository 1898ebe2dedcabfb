#!/usr/bin/env python3
"""A STAND-IN for Huawei's `atc`, for tests only: it is not CANN and compiles
nothing for an NPU. Called as build_om.sh calls atc (--model=X.onnx
--output=DIR/BASE --soc_version=CHIP --external_weight=1 ...), it writes what
ATC leaves, from the ONNX graph itself:

- DIR/weight/weight_<sha256 of the bytes>: one file per distinct initializer;
- DIR/BASE.om by the .om layout runtime/src/om/mod.rs documents: the 256-byte
  header, a 64-bit partition table, MODEL_DEF (GE's ModelDef protobuf:
  field numbers from ge_ir.proto, https://github.com/Ascend/metadef
  proto/ge_ir.proto, encoded here by hand), an empty WEIGHTS_DATA and
  MODEL_INOUT_INFO (the graph's inputs and outputs).

Every ONNX node becomes one GE op of the same type (MatMul → MatMulV2, as ATC
names it), on the AI Core (`_ge_attr_op_kernel_lib_name` = AIcoreEngine), its
input dtypes from ONNX shape inference; each initializer a FileConstant with
`location` naming its weight file. $KILN_STANDIN_ATC_AICPU=Op1,Op2 puts those
ONNX op types on the AI CPU (aicpu_ascend_kernel) instead, as ATC does when
no AI Core kernel takes an op; $KILN_STANDIN_ATC_FLOAT_WEIGHTS=1 turns int8
initializers into float16 copies, as an ATC that dropped the quantized form
would.
"""
import hashlib
import os
import struct
import sys

import onnx
from onnx import numpy_helper, shape_inference

# ONNX TensorProto element types -> (GE DataType, ACL aclDataType, bytes).
# GE: ge_ir.proto's DataType; ACL: acl_base.h's aclDataType.
DTYPES = {
    1: (1, 0, 4),  # float
    10: (2, 1, 2),  # float16
    3: (3, 2, 1),  # int8
    2: (4, 4, 1),  # uint8
    6: (7, 3, 4),  # int32
    7: (8, 9, 8),  # int64
    13: (10, 10, 8),  # uint64
    9: (11, 12, 1),  # bool
    16: (27, 27, 2),  # bfloat16
}
GE_NAMES = {"MatMul": "MatMulV2", "Softmax": "SoftmaxV2", "ArgMax": "ArgMaxV2"}
LOCAL = "DNN_VM_GE_LOCAL_OP_STORE"


def varint(v):
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def field(number, value):
    """A protobuf field: ints as varints, bytes/str length-delimited."""
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    if isinstance(value, str):
        value = value.encode()
    return varint(number << 3 | 2) + varint(len(value)) + value


def attr(key, s=None, i=None):
    value = field(2, s) if s is not None else field(3, i)  # AttrDef.s / .i
    return field(1, key) + field(2, value)  # map entry {key 1, value 2}


def tensor_desc(ge_dtype, dims, weight_size=0):
    shape = b"".join(field(1, d) for d in dims)  # ShapeDef.dim
    out = field(2, ge_dtype) + field(3, shape) + field(4, "ND")
    return out + (field(11, weight_size) if weight_size else b"")


def op_def(name, op_type, lib, attrs=(), inputs=(), outputs=()):
    out = field(1, name) + field(2, op_type)
    out += b"".join(field(10, a) for a in (attr("_ge_attr_op_kernel_lib_name", s=lib),) + tuple(attrs))
    out += b"".join(field(33, d) for d in inputs)
    out += b"".join(field(34, d) for d in outputs)
    return out


def tensor_descs(tensors):
    """MODEL_INOUT_INFO's description block."""
    out = struct.pack("<I", len(tensors))
    for name, acl_dtype, size, dims in tensors:
        raw = name.encode()
        out += struct.pack("<QiiIIII", size, 2, acl_dtype, len(raw), 8 * len(dims), 0, 0)
        out += raw + b"".join(struct.pack("<q", d) for d in dims)
    return out


def om_file(name, partitions):
    body = struct.pack("<II", len(partitions), 0)
    offset = 0
    for kind, data in partitions:
        body += struct.pack("<IIQQ", kind, 0, offset, len(data))
        offset += len(data)
    body += b"".join(data for _, data in partitions)
    header = bytearray(256)
    struct.pack_into("<III", header, 0, 0x444F4D49, 256, 0x20000000)
    raw = name.encode()[:31]
    header[84 : 84 + len(raw)] = raw
    struct.pack_into("<I", header, 156, 1)
    struct.pack_into("<Q", header, 184, len(body))
    return bytes(header) + body


def main(argv):
    args = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    model_path, output, soc = args["model"], args["output"], args["soc_version"]
    external = args.get("external_weight") == "1"
    on_cpu = set(filter(None, os.environ.get("KILN_STANDIN_ATC_AICPU", "").split(",")))
    float_copies = os.environ.get("KILN_STANDIN_ATC_FLOAT_WEIGHTS") == "1"
    model = onnx.load(model_path)
    graph = shape_inference.infer_shapes(model).graph
    elem = {}
    for v in list(graph.input) + list(graph.value_info) + list(graph.output):
        elem[v.name] = v.type.tensor_type.elem_type
    out_dir = os.path.dirname(output) or "."
    ops = []
    for v in graph.input:
        dtype = DTYPES[v.type.tensor_type.elem_type][0]
        dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
        ops.append(op_def(v.name, "Data", LOCAL, outputs=[tensor_desc(dtype, dims)]))
    for init in graph.initializer:
        array = numpy_helper.to_array(init, base_dir=os.path.dirname(model_path))
        data_type = init.data_type
        if float_copies and data_type == 3:
            array, data_type = array.astype("float16"), 10
        elem[init.name] = data_type
        data = array.tobytes()
        ge_dtype = DTYPES[data_type][0]
        file = "weight_" + hashlib.sha256(data).hexdigest()
        if external:
            os.makedirs(os.path.join(out_dir, "weight"), exist_ok=True)
            with open(os.path.join(out_dir, "weight", file), "wb") as f:
                f.write(data)
        attrs = [attr("location", s=file), attr("offset", i=0), attr("length", i=len(data))]
        ops.append(
            op_def(
                init.name,
                "FileConstant" if external else "Const",
                LOCAL,
                attrs if external else (),
                outputs=[tensor_desc(ge_dtype, list(init.dims), len(data))],
            )
        )
    for i, node in enumerate(graph.node):
        lib = "aicpu_ascend_kernel" if node.op_type in on_cpu else "AIcoreEngine"
        inputs = [tensor_desc(DTYPES.get(elem.get(x, 0), (0,))[0], []) for x in node.input if x]
        ops.append(op_def(node.name or f"node_{i}", GE_NAMES.get(node.op_type, node.op_type), lib, inputs=inputs))
    ops.append(op_def("NetOutput", "NetOutput", LOCAL))
    base = os.path.basename(output)
    graph_def = field(1, base) + b"".join(field(6, op) for op in ops)
    model_attrs = [attr("soc_version", s=soc), attr("atc_version", s="stand-in atc (tests/standin/atc.py)")]
    model_def = field(1, base) + field(2, 1) + field(7, graph_def) + b"".join(field(11, a) for a in model_attrs)

    def described(values, suffix):
        out = []
        for v in values:
            t = v.type.tensor_type
            _, acl, size = DTYPES[t.elem_type]
            dims = [d.dim_value for d in t.shape.dim]
            for d in dims:
                size *= d
            out.append((v.name + suffix, acl, size, dims))
        return out

    inout = b""
    for kind, block in ((0, described(graph.input, "")), (1, described(graph.output, ":0"))):
        value = tensor_descs(block)
        inout += struct.pack("<II", kind, len(value)) + value
    with open(output + ".om", "wb") as f:
        f.write(om_file(base, [(0, model_def), (1, b""), (8, inout)]))
    print(f"ATC run success (stand-in: {len(ops)} ops, no NPU code generated)")


if __name__ == "__main__":
    main(sys.argv[1:])
