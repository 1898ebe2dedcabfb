#!/usr/bin/env bash
# The one check to run on a board with CANN (an Orange Pi AI Pro, say), on a
# directory written by `kiln compile`:
#
#   examples/board-check.sh <compiled-dir> [--report FILE] [--soc CHIP|auto]
#                           [--device N] [--kiln-run PATH] [--no-build]
#
# It runs, logging each step:
#   1. <compiled-dir>/build_om.sh (--soc auto by default when npu-smi works):
#      the .om files;
#   2. kiln-run check: manifest, .om inputs and outputs, and what ATC built
#      (engines, AI CPU fallbacks, int8 weights for w8a8) read from MODEL_DEF;
#   3. kiln-run diff --a cpu --b npu on fixed prompts, with the thresholds of
#      the compiled dtype (diff prints them);
#   4. a short benchmark: kiln-run generate on the NPU and on the CPU
#      reference interpreter (time to first token, prompt and decode tok/s),
#      with the device memory kiln-run allocated, while a background loop
#      samples `npu-smi info` to show the AI Core busy during decode;
# and writes one Markdown report (default board-check-report.md) to paste
# into an issue: CANN version, chip, kiln-run version, each step's result,
# and whether it ran on real hardware or on stand-ins (the tests' stand-in
# atc and ACL test double say so in what they write). It exits 1 when a
# step fails; the report is written either way.
set -euo pipefail

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }

dir=
report=board-check-report.md
soc=
device=0
kiln_run=${KILN_RUN:-}
build=1
while [ $# -gt 0 ]; do
    case "$1" in
        --report) report=${2:?--report needs a file}; shift 2 ;;
        --soc) soc=${2:?--soc needs a chip name or auto}; shift 2 ;;
        --device) device=${2:?--device needs a number}; shift 2 ;;
        --kiln-run) kiln_run=${2:?--kiln-run needs a path}; shift 2 ;;
        --no-build) build=0; shift ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "board-check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *)
            [ -z "$dir" ] || { echo "board-check.sh: one compiled directory, please" >&2; exit 2; }
            dir=$1; shift ;;
    esac
done
[ -n "$dir" ] || { usage >&2; exit 2; }
[ -f "$dir/manifest.json" ] || { echo "board-check.sh: $dir has no manifest.json: not a directory kiln compile wrote" >&2; exit 2; }
[[ $device =~ ^[0-9]+$ ]] || { echo "board-check.sh: --device $device is not a number" >&2; exit 2; }
if [ -n "$soc" ] && ! [[ $soc =~ ^(auto|Ascend[0-9A-Za-z]+)$ ]]; then
    echo "board-check.sh: --soc $soc is not a chip name such as Ascend310B4, or auto" >&2
    exit 2
fi
if [ -z "$kiln_run" ]; then
    if [ -x ./kiln-run ]; then kiln_run=./kiln-run; else kiln_run=$(command -v kiln-run || true); fi
fi
if [ -z "$kiln_run" ] || [ ! -x "$kiln_run" ]; then
    echo "board-check.sh: kiln-run not found: pass --kiln-run PATH or set KILN_RUN" >&2
    exit 2
fi

# Logs go beside the report, in a fresh folder; the report itself is written
# to a temporary file and renamed at the end.
report_dir=$(dirname -- "$report")
logs=$(mktemp -d "$report_dir/.board-check.XXXXXX")
trap 'rm -rf -- "$logs"' EXIT

results=()   # "step|PASS or FAIL|detail" rows for the summary table
failed=0
record() {
    results+=("$1|$2|${3//|//}")
    if [ "$2" = FAIL ]; then failed=1; fi
}
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# The first line of FILE matching the extended regex, or nothing.
first() { grep -m1 -E -- "$1" "$2" 2>/dev/null || true; }

# --- What this machine is -------------------------------------------------
cann_version() {
    local root file
    for root in "${ASCEND_HOME_PATH:-}" "${ASCEND_TOOLKIT_HOME:-}" \
        /usr/local/Ascend/ascend-toolkit/latest /usr/local/Ascend/cann; do
        if [ -z "$root" ] || [ ! -d "$root" ]; then continue; fi
        for file in "$root"/*/ascend_toolkit_install.info "$root"/version.cfg "$root"/*/version.info; do
            [ -f "$file" ] || continue
            grep -m1 -E '^(version|Version|runtime_running_version)=' "$file" | cut -d= -f2- | tr -d '[]'
            return 0
        done
    done
    echo "not found (no CANN install under \$ASCEND_HOME_PATH or /usr/local/Ascend)"
}
have_npu_smi=0
npu_smi_chip="npu-smi not found (no NPU driver here)"
if command -v npu-smi >/dev/null 2>&1; then
    have_npu_smi=1
    npu-smi info >"$logs/npu-smi-before.txt" 2>&1 || true
    # The summary table: the chip is the third field of its seventh line.
    npu_smi_chip=$(awk 'NF > 0 && NR == 7 { print $3 }' "$logs/npu-smi-before.txt")
    npu_smi_chip=${npu_smi_chip:-unreadable (see npu-smi info)}
fi
if [ -z "$soc" ] && [ "$have_npu_smi" = 1 ]; then soc=auto; fi
kiln_version=$("$kiln_run" --version 2>&1 || echo "kiln-run --version failed")

# --- 1. build_om.sh -------------------------------------------------------
if [ "$build" = 1 ]; then
    start=$(now)
    build_args=()
    [ -z "$soc" ] || build_args=(--soc "$soc")
    # build_om.sh makes weights.bin with this kiln-run when it is not there.
    if KILN_RUN=$kiln_run bash "$dir/build_om.sh" "${build_args[@]}" >"$logs/build_om.txt" 2>&1; then
        record "build_om.sh" PASS "$(elapsed "$start") s; $(first '^done:' "$logs/build_om.txt")"
    else
        record "build_om.sh" FAIL "see the build_om.sh log below"
    fi
else
    echo "skipped (--no-build)" >"$logs/build_om.txt"
    record "build_om.sh" PASS "skipped (--no-build): the .om files already there"
fi
om_soc=$(cat "$dir/om_soc.txt" 2>/dev/null || echo "not recorded")

# Stand-ins disclose themselves: the tests' atc writes "stand-in" in its
# log and MODEL_DEF, the ACL test double carries a marker string, the tests'
# npu-smi names itself in its table.
standins=()
if grep -qs "stand-in" "$dir"/atc-*.log; then standins+=("atc (ATC logs say stand-in)"); fi
acl_lib=${KILN_ACL_LIB:-}
if [ -n "$acl_lib" ] && grep -qa "KILN ACL TEST DOUBLE" -- "$acl_lib" 2>/dev/null; then
    standins+=("ACL (KILN_ACL_LIB is Kiln's ACL test double)")
fi
if [ "$have_npu_smi" = 1 ] && grep -qs "stand-in" "$logs/npu-smi-before.txt"; then
    standins+=("npu-smi (its table says stand-in)")
fi
acl_double=0
for s in "${standins[@]}"; do case "$s" in ACL*) acl_double=1 ;; esac; done

# --- 2. kiln-run check ----------------------------------------------------
if "$kiln_run" check "$dir" >"$logs/check.txt" 2>&1; then
    warnings=$(grep -c '^warning:' "$logs/check.txt" || true)
    record "kiln-run check" PASS "$warnings warning(s)$([ "$warnings" = 0 ] || echo ': see below')"
else
    record "kiln-run check" FAIL "$(grep -m1 '^error:' "$logs/check.txt" | cut -c1-200)"
fi
ai_cpu_lines=$(grep -E '^warning: .*AI CPU' "$logs/check.txt" || true)

# --- 3. kiln-run diff --a cpu --b npu -------------------------------------
prompts=("The capital of France is" "def fibonacci(n):")
diff_rows=()
for i in "${!prompts[@]}"; do
    log="$logs/diff-$i.txt"
    if "$kiln_run" diff "$dir" --a cpu --b npu --prompt "${prompts[$i]}" --steps 8 >"$log" 2>&1; then
        verdict=PASS
    else
        verdict=FAIL
    fi
    # The step table: step, token, max abs, mean abs, cosine, top1, top5.
    stats=$(awk '$1 ~ /^[0-9]+$/ && NF >= 7 { n++; if ($3 > maxabs) maxabs = $3; if (min == "" || $5 < min) min = $5; if ($6 == "yes") top1++ }
        END { if (n) printf "%d steps, max abs %.3e, min cosine %.7f, top-1 agrees %d/%d", n, maxabs, min, top1, n; else print "no step table (see the log)" }' "$log")
    diff_rows+=("${prompts[$i]}|$verdict|$stats")
    if [ "$verdict" = FAIL ] && [ "$acl_double" = 1 ]; then
        record "diff cpu vs npu #$((i + 1))" "NOT JUDGED" "$stats (the ACL test double's fake model does not compute the network)"
    else
        record "diff cpu vs npu #$((i + 1))" "$verdict" "$stats"
    fi
done

# --- 4. Benchmark with npu-smi sampling -----------------------------------
bench_prompt="Write one sentence about the sea."
sample_npu_smi() {
    while :; do
        { echo "--- $(date +%s.%N)"; npu-smi info 2>&1; } >>"$logs/npu-smi-samples.txt" || true
        sleep 0.5
    done
}
sampler=
if [ "$have_npu_smi" = 1 ]; then
    sample_npu_smi &
    sampler=$!
fi
if "$kiln_run" generate "$dir" --backend npu --device "$device" --prompt "$bench_prompt" \
    --max-new-tokens 32 --ignore-eos >"$logs/generate-npu.out" 2>"$logs/generate-npu.txt"; then
    npu_ok=PASS
else
    npu_ok=FAIL
fi
if [ -n "$sampler" ]; then
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
fi
"$kiln_run" generate "$dir" --backend cpu --prompt "$bench_prompt" --max-new-tokens 32 --ignore-eos \
    >"$logs/generate-cpu.out" 2>"$logs/generate-cpu.txt" || true

# "first token after X ms", "prefill: N tokens in X ms (Y tok/s)", "decode: ... (Y tok/s)".
ttft() { sed -n 's/^first token after \([0-9.]*\) ms.*/\1/p' "$1" | head -n1; }
rate() { sed -n "s/^$2:.*(\([0-9.]*\) tok\/s).*/\1/p" "$1" | head -n1; }
npu_ttft=$(ttft "$logs/generate-npu.txt"); npu_prefill=$(rate "$logs/generate-npu.txt" prefill); npu_decode=$(rate "$logs/generate-npu.txt" decode)
cpu_ttft=$(ttft "$logs/generate-cpu.txt"); cpu_prefill=$(rate "$logs/generate-cpu.txt" prefill); cpu_decode=$(rate "$logs/generate-cpu.txt" decode)
ratio=$(awk -v n="${npu_decode:-}" -v c="${cpu_decode:-}" 'BEGIN { if (n != "" && c > 0) printf "%.2f", n / c; else print "n/a" }')
memory=$(sed -n 's/^kiln-run: device memory: //p' "$logs/generate-npu.txt" | head -n1)
if [ "$npu_ok" = PASS ] && [ -n "$npu_decode" ]; then
    if [ "$acl_double" = 1 ]; then
        record "benchmark (npu)" PASS "decode ${npu_decode} tok/s on the ACL test double (not NPU time)"
    else
        record "benchmark (npu)" PASS "decode ${npu_decode} tok/s, ${ratio}× the CPU interpreter"
    fi
else
    record "benchmark (npu)" FAIL "$(grep -m1 '^error' "$logs/generate-npu.txt" | cut -c1-200)"
fi

# npu-smi samples: in each table, a chip row is "| chip device | bus | AICore(%) used / total |".
aicore="npu-smi not found: AI Core use not sampled"
if [ "$have_npu_smi" = 1 ]; then
    aicore=$(awk -F'|' '/^---/ { s++ } $2 ~ /^ *[0-9]+ +[0-9]+ *$/ { split($4, f, " "); if (f[1] ~ /^[0-9.]+$/) { n++; sum += f[1]; if (f[1] > max) max = f[1]; if (f[1] > 0) busy++ } if (f[2] > mem) mem = f[2] }
        END { if (n) printf "%d samples over %d tables: AI Core busy in %d, max %s%%, mean %.1f%%; device memory used up to %s MB", n, s, busy, max, sum / n, mem; else print "no AICore(%) column found in npu-smi info (see the first sample below)" }' \
        "$logs/npu-smi-samples.txt" 2>/dev/null || echo "no samples taken")
    # The fastllm lesson: an NPU run whose AI Core never shows busy did not
    # compute on the NPU, whatever the timings say.
    busy=$(awk -F'|' '$2 ~ /^ *[0-9]+ +[0-9]+ *$/ { split($4, f, " "); if (f[1] ~ /^[0-9.]+$/ && f[1] > 0) n++ } END { print n + 0 }' \
        "$logs/npu-smi-samples.txt" 2>/dev/null || echo 0)
    if [ "$busy" -gt 0 ]; then
        record "AI Core busy (npu-smi)" PASS "$aicore"
    else
        record "AI Core busy (npu-smi)" FAIL "AI Core at 0% in every sample: the NPU did not visibly compute ($aicore)"
    fi
else
    record "AI Core busy (npu-smi)" "NOT SAMPLED" "npu-smi not found"
fi

# --- The report -----------------------------------------------------------
if [ "${#standins[@]}" -eq 0 ]; then
    ran_on="real hardware: CANN's atc and ACL, npu-smi of this board"
else
    ran_on="STAND-INS, NOT AN NPU: $(printf '%s; ' "${standins[@]}")no number below was computed by an Ascend NPU"
fi
tmp_report=$(mktemp "$report_dir/.board-check-report.XXXXXX")
{
    echo "# Kiln board check: $(basename -- "$dir")"
    echo
    echo "**Ran on: $ran_on.**"
    echo
    echo "| | |"
    echo "|---|---|"
    echo "| date | $(date -u '+%Y-%m-%d %H:%M UTC') |"
    echo "| kiln-run | $kiln_version |"
    echo "| CANN | $(cann_version) |"
    echo "| SoC (npu-smi) | $npu_smi_chip |"
    echo "| .om built for | $om_soc |"
    echo "| machine | $(uname -srm) |"
    echo
    echo "## Summary"
    echo
    echo "| step | result | detail |"
    echo "|---|---|---|"
    for row in "${results[@]}"; do
        IFS='|' read -r step verdict detail <<<"$row"
        echo "| $step | $verdict | $detail |"
    done
    echo
    echo "## What ATC built (kiln-run check)"
    echo
    if [ -n "$ai_cpu_lines" ]; then
        echo "**AI CPU FALLBACK:**"
        echo
        while IFS= read -r line; do echo "- $line"; done <<<"$ai_cpu_lines"
    else
        echo "No op fell back to the AI CPU (or no .om described its engines; see the log)."
    fi
    echo
    echo '```'
    cat "$logs/check.txt"
    echo '```'
    echo
    echo "## CPU vs NPU (kiln-run diff, 8 steps each)"
    echo
    echo "| prompt | result | steps |"
    echo "|---|---|---|"
    for row in "${diff_rows[@]}"; do
        IFS='|' read -r prompt verdict stats <<<"$row"
        echo "| \`$prompt\` | $verdict | $stats |"
    done
    echo
    echo "Verdict on the first prompt: $(first '^(ok:|error:)' "$logs/diff-0.txt" | cut -c1-300)"
    echo
    echo "## Benchmark (kiln-run generate, 32 new tokens, prompt \`$bench_prompt\`)"
    echo
    echo "| backend | time to first token (ms) | prompt tok/s | decode tok/s |"
    echo "|---|---|---|---|"
    echo "| npu | ${npu_ttft:-n/a} | ${npu_prefill:-n/a} | ${npu_decode:-n/a} |"
    echo "| cpu (reference interpreter) | ${cpu_ttft:-n/a} | ${cpu_prefill:-n/a} | ${cpu_decode:-n/a} |"
    echo
    echo "NPU decode / CPU decode: ${ratio}×"
    echo
    echo "## Memory"
    echo
    echo "Allocated by kiln-run on the device: ${memory:-not reported (see the generate log)}"
    echo
    echo "## AI Core during the NPU run (npu-smi info, every 0.5 s)"
    echo
    echo "$aicore"
    echo
    echo "## Logs (last 40 lines each)"
    for log in build_om check diff-0 diff-1 generate-npu generate-cpu npu-smi-before; do
        [ -f "$logs/$log.txt" ] || continue
        echo
        echo "<details><summary>$log</summary>"
        echo
        echo '```'
        tail -n 40 "$logs/$log.txt"
        echo '```'
        echo "</details>"
    done
} >"$tmp_report"
mv -f -- "$tmp_report" "$report"
echo "report: $report"
exit "$failed"
