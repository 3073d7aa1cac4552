#!/usr/bin/env bash
# Regenerate every table and figure of docs/RESULTS.md: runs each reproduction and benchmark script
# (they write docs/results/<name>.{csv,md,png} and <name>_summary.md, its rows of the summary
# table), builds docs/results/summary.md from those rows, then pastes each docs/results/<name>.md
# into the matching "<!-- begin <name>.md --> … <!-- end <name>.md -->" block of docs/RESULTS.md.
#
#   scripts/tools/make_results.sh                        # everything, ~40 min on 2 quiet cores
#   scripts/tools/make_results.sh bench_overhead ...     # only these scripts, then re-paste
#   scripts/tools/make_results.sh --assemble             # only re-paste docs/results/*.md into docs/RESULTS.md
#
# Timing on a shared machine: before each script this waits (up to WAIT_MINUTES in total, default
# 30) until the 1-minute load average is below MAX_LOAD (default 1.5); every script records the
# load it started under next to its numbers. Environment: PYTHON (default .venv/bin/python),
# OUT_DIR (default docs/results), RESULTS (default docs/RESULTS.md), LSTM_STEPS (default 10000).
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-.venv/bin/python}
OUT_DIR=${OUT_DIR:-docs/results}
RESULTS=${RESULTS:-docs/RESULTS.md}
MAX_LOAD=${MAX_LOAD:-1.5}
WAIT_MINUTES=${WAIT_MINUTES:-30}
LSTM_STEPS=${LSTM_STEPS:-10000}
waited=0

wait_for_quiet() {
  while awk -v max="$MAX_LOAD" '{ exit !($1 >= max) }' /proc/loadavg; do
    if (( waited >= WAIT_MINUTES * 60 )); then
      echo "make_results: load $(cut -d' ' -f1 /proc/loadavg) still >= $MAX_LOAD after ${WAIT_MINUTES} min; running anyway (the load is recorded)"
      return
    fi
    sleep 15
    waited=$((waited + 15))
  done
}

run() {
  wait_for_quiet
  echo "== $* (load $(cut -d' ' -f1 /proc/loadavg))"
  "$PYTHON" "$@" --out-dir "$OUT_DIR"
}

assemble() {
  "$PYTHON" - "$OUT_DIR" "$RESULTS" <<'EOF'
import re
import sys
from pathlib import Path

out_dir, results = Path(sys.argv[1]), Path(sys.argv[2])
text = results.read_text()
missing = []

# The summary table: every script's <name>_summary.md rows, in the order of this document.
ORDER = ["highway_sweep", "error_flow", "lstm_adding_T100", "lstm_adding_T500", "lstm_adding_T1000",
         "lstm_temporal_order_T100", "depth_init", "depth_init_long", "depth_transfer", "hyper_depth", "bench_depth", "overhead", "model_cost", "shards", "cpu_efficiency", "bench_lstm"]
rows = [(out_dir / f"{name}_summary.md").read_text().strip() for name in ORDER
        if (out_dir / f"{name}_summary.md").exists()]
if rows:
    (out_dir / "summary.md").write_text(
        "| result | measured | target | paper / reference | verdict |\n| --- | --- | --- | --- | --- |\n"
        + "\n".join(rows) + "\n")


def paste(match: re.Match) -> str:
    name = match.group(1)
    fragment = out_dir / name
    if not fragment.exists():
        missing.append(name)
        return match.group(0)
    return f"<!-- begin {name} -->\n{fragment.read_text().strip()}\n<!-- end {name} -->"


text = re.sub(r"<!-- begin (\S+) -->.*?<!-- end \1 -->", paste, text, flags=re.S)
results.write_text(text)
if missing:
    sys.exit(f"make_results: no {', '.join(missing)} in {out_dir}; run the script that writes it")
print(f"make_results: {results} updated from {out_dir}")
EOF
}

if [[ "${1:-}" == "--assemble" ]]; then
  assemble
  exit 0
fi

# Benchmarks first: they are the most sensitive to other processes on the machine.
declare -A ARGS=(
  [bench_overhead]="" [bench_model_cost]="" [bench_shards]="--trials 5 --images 3200 --tar-reader both"
  [bench_cpu_efficiency]="" [repro_error_flow]=""
  [repro_highway_sweep]="--jobs 2" [repro_depth_init]="--append" [sweep_depth_transfer]="" [bench_depth]="" [repro_lstm_adding]="--jobs 2 --steps $LSTM_STEPS" [bench_lstm]=""
)
ALL=(bench_overhead bench_model_cost bench_shards bench_cpu_efficiency bench_lstm bench_depth repro_error_flow
     repro_highway_sweep repro_lstm_adding repro_depth_init sweep_depth_transfer)
selected=("$@")
(( ${#selected[@]} )) || selected=("${ALL[@]}")
for name in "${selected[@]}"; do
  [[ -v "ARGS[$name]" ]] || { echo "make_results: unknown script '$name'; valid: ${ALL[*]}" >&2; exit 2; }
done

start=$(date +%s)
for name in "${selected[@]}"; do
  # shellcheck disable=SC2086  # ARGS holds several words on purpose
  run scripts/*/"$name.py" ${ARGS[$name]}  # scripts/benchmarks/ or scripts/repro/
done
assemble
echo "make_results: done in $(( ($(date +%s) - start) / 60 )) min"
