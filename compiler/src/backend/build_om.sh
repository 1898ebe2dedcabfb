#!/usr/bin/env bash
# Converts Kiln's ONNX graphs into .om models with Huawei's ATC (CANN).
# Written by `kiln compile`; run it on a machine with CANN installed (the
# board itself will do).
#
#   ./build_om.sh [--soc CHIP|auto]
#
#   --soc CHIP   the chip to convert for, as ATC spells it (Ascend310B1,
#                Ascend310B4, ...); `auto` reads it from `npu-smi info` on
#                this machine. Default: the chip the model was compiled for.
#
# The graphs' weights.bin is made first from weights.safetensors when it is
# not here (kiln compile leaves it out to keep the directory small), by
# `kiln-run expand-weights`: $KILN_RUN, ./kiln-run, ../kiln-run, kiln-run on
# PATH, or `kiln expand-weights`. It is removed again once ATC is done.
#
# Every graph is converted with --external_weight=1: its weights go to
# weight/, one file per distinct constant (weight_<sha256 of its bytes>), so
# graphs with the same weights share the same files, and <graph>.weights
# lists the files each graph reads. kiln-run allocates each file once and
# registers it for every graph. The chip converted for goes to om_soc.txt,
# which kiln-run compares with the NPU before loading.
set -euo pipefail
started_in=$PWD
cd "$(dirname "$0")"

compiled_soc=@COMPILED_SOC@
graphs=(@GRAPHS@)
# The graphs' external data and its size; empty when the weights are inline.
weights_bin=@WEIGHTS_BIN@
weights_bin_bytes=@WEIGHTS_BIN_BYTES@

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }

soc=$compiled_soc
while [ $# -gt 0 ]; do
    case "$1" in
        --soc) soc=${2:?--soc needs a chip name such as Ascend310B4, or auto}; shift 2 ;;
        --soc=*) soc=${1#--soc=}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "build_om.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

# The chip npu-smi reports (e.g. 310B4), as ATC spells it (Ascend310B4).
detect_soc() {
    command -v npu-smi >/dev/null 2>&1 || return 1
    local name
    name=$(npu-smi info -t board -i 0 -c 0 2>/dev/null |
        awk -F: '/Chip Name/ { gsub(/[[:space:]]/, "", $2); print $2; exit }') || true
    if [ -z "$name" ]; then
        # The summary table: the chip is the third field of its seventh line.
        name=$(npu-smi info 2>/dev/null | awk 'NF > 0 && NR == 7 { print $3 }') || true
    fi
    name=${name#Ascend}
    case "$name" in
        [0-9][0-9][0-9][A-Z][0-9]*) echo "Ascend$name" ;;
        *) return 1 ;;
    esac
}

if [ "$soc" = auto ]; then
    soc=$(detect_soc) || {
        echo "build_om.sh: --soc auto could not read the chip from npu-smi; pass it, e.g. --soc Ascend310B4" >&2
        exit 2
    }
    echo "chip: $soc (from npu-smi)"
fi
if ! [[ $soc =~ ^Ascend[0-9A-Za-z]+$ ]]; then
    echo "build_om.sh: --soc $soc is not a chip name such as Ascend310B1 or Ascend310B4" >&2
    exit 2
fi
if [ "$soc" != "$compiled_soc" ]; then
    echo "note: converting for $soc; the model was compiled for $compiled_soc"
elif board=$(detect_soc) && [ "$board" != "$soc" ]; then
    echo "warning: this machine's NPU is $board but the model is converted for $soc;" \
        "kiln-run will refuse it here. Run ./build_om.sh --soc auto to convert for this NPU." >&2
fi

if ! command -v atc >/dev/null 2>&1; then
    for env in "${ASCEND_HOME_PATH:-}/../set_env.sh" "${ASCEND_TOOLKIT_HOME:-}/../set_env.sh" \
        /usr/local/Ascend/ascend-toolkit/set_env.sh /usr/local/Ascend/cann/set_env.sh; do
        if [ -f "$env" ]; then
            # shellcheck disable=SC1090
            . "$env"
            break
        fi
    done
fi
command -v atc >/dev/null 2>&1 || { echo "atc not found: install CANN and source its set_env.sh" >&2; exit 127; }

# The program that makes weights.bin: kiln-run expand-weights, or kiln's.
expander() {
    local candidate=${KILN_RUN:-}
    case "$candidate" in "" | /*) ;; *) candidate="$started_in/$candidate" ;; esac
    for candidate in "$candidate" ./kiln-run ../kiln-run; do
        if [ -n "$candidate" ] && [ -f "$candidate" ] && [ -x "$candidate" ]; then
            echo "$candidate"
            return
        fi
    done
    command -v kiln-run || command -v kiln
}

made_weights_bin=
if [ -n "$weights_bin" ] && { [ ! -f "$weights_bin" ] || [ "$(wc -c <"$weights_bin")" != "$weights_bin_bytes" ]; }; then
    if ! program=$(expander); then
        {
            echo "build_om.sh: $weights_bin is not here: kiln compile leaves it out and records how to make it"
            echo "from weights.safetensors. Make it with kiln-run, built for this machine:"
            echo "  kiln-run expand-weights $PWD"
            echo "(put kiln-run beside this directory or on PATH, or set KILN_RUN=/path/to/kiln-run, and build_om.sh"
            echo "runs it itself), or with \`kiln expand-weights DIR\` on the build machine and copy $weights_bin here;"
            echo "kiln compile --store-atc-weights writes it into the directory from the start."
        } >&2
        exit 1
    fi
    echo "$weights_bin: making it from weights.safetensors ($program expand-weights)"
    if ! "$program" expand-weights "$PWD"; then
        echo "build_om.sh: $program expand-weights failed (above); $weights_bin is needed for atc" >&2
        exit 1
    fi
    made_weights_bin=yes
fi

# A fresh start: nothing of an earlier conversion survives.
rm -rf weight om_soc.txt opp
for graph in "${graphs[@]}"; do rm -rf "$graph.weights" ".atc-$graph"; done

# Kiln's Ascend C kernels (kiln compile --kernels ascendc): the graphs hold
# custom nodes that only this package serves, so build it, install it into
# opp/ here, and point atc at it with ASCEND_CUSTOM_OPP_PATH.
if [ -f kernels/build.sh ]; then
    echo "kernels: building the Ascend C custom-op package, log in kernels-build.log"
    if ! bash kernels/build.sh >kernels-build.log 2>&1; then
        echo "building kernels/ failed; see kernels-build.log" >&2
        tail -n 20 kernels-build.log >&2
        exit 1
    fi
    installers=(kernels/build_out/custom_opp_*.run)
    if [ "${#installers[@]}" -ne 1 ] || [ ! -f "${installers[0]}" ]; then
        echo "kernels/build.sh should leave one kernels/build_out/custom_opp_*.run" >&2
        exit 1
    fi
    echo "kernels: installing ${installers[0]##*/} into opp/"
    chmod +x "${installers[0]}"
    if ! "${installers[0]}" --install-path="$PWD/opp" >kernels-install.log 2>&1; then
        echo "installing the kernel package failed; see kernels-install.log" >&2
        tail -n 20 kernels-install.log >&2
        exit 1
    fi
    vendor_dir="$PWD/opp/vendors/@VENDOR@"
    if [ -f "$vendor_dir/bin/set_env.bash" ]; then
        # The installer's own script prepends the package to ASCEND_CUSTOM_OPP_PATH.
        set +u
        # shellcheck disable=SC1091
        . "$vendor_dir/bin/set_env.bash"
        set -u
    fi
    case ":${ASCEND_CUSTOM_OPP_PATH:-}:" in
        *":$vendor_dir:"*) ;;
        *) ASCEND_CUSTOM_OPP_PATH="$vendor_dir${ASCEND_CUSTOM_OPP_PATH:+:$ASCEND_CUSTOM_OPP_PATH}" ;;
    esac
    export ASCEND_CUSTOM_OPP_PATH
    echo "kernels: ASCEND_CUSTOM_OPP_PATH=$ASCEND_CUSTOM_OPP_PATH"
fi

# convert GRAPH OM_BASE ATC_ARGS...: one graph, staged in .atc-GRAPH (ATC
# writes weight/ beside its --output), then its .om and weight files moved in.
convert() {
    local graph=$1 om=$2
    shift 2
    local stage=".atc-$graph"
    mkdir "$stage"
    echo "atc: $graph -> $om.om, log in atc-$graph.log"
    if ! atc "$@" "--output=$stage/$om" "--soc_version=$soc" --external_weight=1 >"atc-$graph.log" 2>&1; then
        echo "atc failed on $graph; see atc-$graph.log" >&2
        tail -n 20 "atc-$graph.log" >&2
        exit 1
    fi
    mv -f "$stage/$om.om" "$om.om"
    : >"$graph.weights"
    local file
    for file in "$stage"/weight/*; do
        [ -f "$file" ] || continue
        mkdir -p weight
        echo "${file##*/}" >>"$graph.weights"
        mv -f "$file" "weight/${file##*/}"
    done
    rm -rf "$stage"
}

mb() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1e6 }'; }

# Which weight bytes the graphs share, and which only one graph reads (ATC
# may lay a weight out differently for different token counts).
report_weights() {
    if [ ! -d weight ]; then
        echo "weights: embedded in the .om files (ATC wrote no weight/ folder)"
        return
    fi
    local total=0 shared=0 files=0 file name size graph readers only
    declare -A own
    for graph in "${graphs[@]}"; do own[$graph]=0; done
    for file in weight/*; do
        name=${file##*/}
        size=$(wc -c <"$file")
        total=$((total + size))
        files=$((files + 1))
        readers=0
        for graph in "${graphs[@]}"; do
            if grep -qxF "$name" "$graph.weights"; then
                readers=$((readers + 1))
                only=$graph
            fi
        done
        if [ "$readers" -eq "${#graphs[@]}" ]; then
            shared=$((shared + size))
        elif [ "$readers" -eq 1 ]; then
            own[$only]=$((own[$only] + size))
        fi
    done
    echo "weights: $(mb "$total") MB in weight/ ($files files), held once on the device;" \
        "$(mb "$shared") MB shared by ${graphs[*]}"
    if [ "${#graphs[@]}" -gt 1 ]; then
        for graph in "${graphs[@]}"; do
            if [ "${own[$graph]}" -gt 0 ]; then
                echo "  $(mb "${own[$graph]}") MB only in $graph: ATC laid these weights out differently" \
                    "for it, so the device holds them in addition (kiln compile --graphs single avoids this)"
            fi
        done
    fi
}

@CONVERSIONS@
echo "$soc" >om_soc.txt
if [ -n "$made_weights_bin" ]; then
    # The .om files and weight/ hold what ATC took from it.
    rm -f "$weights_bin"
    echo "$weights_bin: removed (atc is done with it; kiln-run expand-weights makes it again)"
fi
report_weights
echo "done: .om models written for $soc"
