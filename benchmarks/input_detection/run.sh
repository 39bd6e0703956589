#!/usr/bin/env bash
# The input-level detection benchmark (every protocol of `metashield evaluate`), in the background:
#   bash benchmarks/input_detection/run.sh          # one process (~55 min of one uncontended core)
#   JOBS=3 bash benchmarks/input_detection/run.sh   # three niced processes (a shared machine), then one run merges
#   tail -f artifacts/eval/benchmark*.log
# Writes benchmarks/input_detection/results/standard_zoo_held_out/ (benchmark.md, *.png, summary.json; the config is
# configs/benchmark.yaml beside this script); records and the protocol-trained detectors go to artifacts/eval/benchmark.
# Needs the zoo (artifacts/zoo/standard) and what benchmarks/meta/run.sh wrote (artifacts/meta: activation cache,
# maml/pooled/oracle detectors, split.json). Step 1 builds the adaptive-attack zoo (configs/adaptive_zoo.yaml, 10 MNIST
# models, resumable); step 2 evaluates. FOREGROUND=1 runs in the foreground.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=benchmarks/input_detection
[ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ] && . .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1   # one core per process: BLAS threads only contend
export CONFIG=${CONFIG:-$HERE/configs/benchmark.yaml} JOBS=${JOBS:-1}
mkdir -p artifacts/eval

run() {
  local ev="nice -n 19 metashield evaluate --config $CONFIG"
  if [ "$JOBS" = 1 ]; then
    nice -n 19 metashield zoo build --config $HERE/configs/adaptive_zoo.yaml --out artifacts/eval/adaptive_zoo \
        --report artifacts/eval/adaptive_zoo_report.md --threads 1 --progress false
    $ev
    return
  fi
  # Three processes on disjoint protocols (each saves results/<protocol>.json), then one run adds the adaptive
  # protocol and renders the report from all of them (--merge).
  nice -n 19 metashield zoo build --config $HERE/configs/adaptive_zoo.yaml --out artifacts/eval/adaptive_zoo \
      --report artifacts/eval/adaptive_zoo_report.md --threads 1 --progress false &
  $ev --protocol in_domain,live_baselines > artifacts/eval/benchmark-1.log 2>&1 &
  $ev --protocol few_shot > artifacts/eval/benchmark-2.log 2>&1 &
  $ev --protocol ablations,cross_domain,novel_attacks,cost > artifacts/eval/benchmark-3.log 2>&1 &
  wait
  $ev --protocol adaptive
}

if [ "${FOREGROUND:-0}" = 1 ]; then
  run
else
  export -f run
  export HERE
  nohup bash -c run > artifacts/eval/benchmark.log 2>&1 &
  echo "started (pid $!): tail -f artifacts/eval/benchmark*.log"
fi
