#!/usr/bin/env python3
"""Write a Q8_0 copy of SmolLM2-135M-Instruct's Q4_1 GGUF, for
tests/bench/gguf_vs_llamacpp.py to benchmark a second weight format.

    python tests/bench/make_smollm2_q8_0.py OUT.gguf [--source Q4_1.gguf] [--check]

Needs `gguf` (0.19.0) and numpy; --check also needs llama-cpp-python. The
source (default ~/.cache/kiln/models/SmolLM2-135M-Instruct.Q4_1.gguf, which
examples/fetch_smollm2.sh fetches) is read with gguf's GGUFReader: every
Q4_1 tensor is dequantized to f32 and quantized again to Q8_0 with
gguf.quants (bit-exact with ggml's reference quantize_row_q8_0), every other
tensor (the Q8_0 token embedding, the F32 norms) and every metadata key is
copied unchanged, in the same order and alignment. `general.file_type` is
copied too, so it still says Q4_1; llama.cpp only prints it. The Q8_0 file
holds the Q4_1 file's values to within Q8_0's rounding (printed), not the
original bf16 checkpoint's.

--check loads the result with llama.cpp and completes "The capital of
France is" greedily, which should mention Paris. The output must not be in
tests/fixtures: the tests own that directory.
"""

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SOURCE = Path.home() / ".cache" / "kiln" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert(source: Path, out: Path) -> None:
    reader = gguf.GGUFReader(source)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(out, arch=arch, endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    for field in reader.fields.values():
        # GGUFWriter writes the architecture and the GGUF.* header fields itself.
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)

    tensors = []
    worst = 0.0
    for tensor in reader.tensors:
        data, qtype = tensor.data, tensor.tensor_type
        if qtype == Q.Q4_1:
            values = gguf.quants.dequantize(data, Q.Q4_1)
            data, qtype = gguf.quants.quantize(values, Q.Q8_0), Q.Q8_0
            worst = max(worst, float(np.abs(gguf.quants.dequantize(data, Q.Q8_0) - values).max()))
        writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, qtype)
        tensors.append(data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data in tensors:
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()
    converted = sum(t.tensor_type == Q.Q4_1 for t in reader.tensors)
    print(f"{out}: {converted} of {len(reader.tensors)} tensors Q4_1 -> Q8_0 "
          f"(max abs change {worst:.2e}), {out.stat().st_size / 1e6:.1f} MB")


def check(path: Path) -> None:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=128, n_threads=2, verbose=False)
    prompt = "The capital of France is"
    text = llm(prompt, max_tokens=12, temperature=0.0)["choices"][0]["text"]
    print(f"llama.cpp: {prompt!r} -> {text!r}")
    if "Paris" not in text:
        sys.exit("the Q8_0 model does not say Paris")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the Q8_0 .gguf to write")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the Q4_1 .gguf")
    parser.add_argument("--check", action="store_true", help="generate with llama.cpp from the result")
    args = parser.parse_args()
    if args.out.resolve().is_relative_to(ROOT / "tests" / "fixtures"):
        sys.exit(f"{args.out} is inside tests/fixtures: write it elsewhere")
    if not args.source.exists():
        sys.exit(f"{args.source} not found: run examples/fetch_smollm2.sh first")
    convert(args.source, args.out)
    if args.check:
        check(args.out)


if __name__ == "__main__":
    main()
