#!/usr/bin/env bash
# Meta-train metashield-base and its ablations on the standard zoo, then evaluate them on the held-out models
# (adaptation timing is a separate command: benchmarks/meta/adapt_timing.py). Resumable: each training run resumes
# from its checkpoints, the activation cache only adds what is missing. Writes artifacts/meta/* (git-ignored) and
# benchmarks/meta/results/held_out.{md,json}.
#   bash benchmarks/meta/run.sh        # after: metashield zoo build --config configs/zoo/standard.yaml --out artifacts/zoo/standard \
#                                      #            --report benchmarks/meta/results/standard_zoo.md
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ] && . .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ZOO=${ZOO:-artifacts/zoo/standard}
OUT=${OUT:-artifacts/meta}
STEPS=${STEPS:-300}
RESULTS=benchmarks/meta/results
COMMON="--steps $STEPS --meta_batch 8 --k_choices 5,10,20 --inner_steps 3 --seed 0"
LAUNCH="accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no -m metashield_hf.meta.train"
resume() { [ -d "$1/checkpoints" ] && echo "--resume" || true; }

# 1. metashield-base: second-order MAML, deployable inner loop; the activation cache is built here (2 processes).
$LAUNCH --zoo "$ZOO" --out "$OUT/maml" --cache_dir "$OUT/cache" $COMMON $(resume "$OUT/maml")
# 2. ablations on the same cache and split: pooled tasks without meta-learning, and the oracle inner loop.
$LAUNCH --cache_dir "$OUT/cache" --out "$OUT/pooled" --algorithm pooled $COMMON $(resume "$OUT/pooled")
$LAUNCH --cache_dir "$OUT/cache" --out "$OUT/oracle" --inner_mode oracle $COMMON $(resume "$OUT/oracle")
# 3. throughput of one process (the 2-process figure is in $OUT/maml/metrics.json).
rm -rf "$OUT/throughput-1proc"
metashield train --cache_dir "$OUT/cache" --out "$OUT/throughput-1proc" --steps 10 --meta_batch 8 --k_choices 5,10,20 --inner_steps 3

python scripts/make_default_detector.py --out "$OUT/prior"   # the untrained prior, for comparison
# 4. held-out evaluation: every variant on the same episodes, two processes sharing the records.
V=("MAML + adaptation (metashield-base)=$OUT/maml/detector:3"
   "MAML, no adaptation=$OUT/maml/detector:0"
   "pooled, no meta-learning=$OUT/pooled/detector:0"
   "oracle inner loop (ablation)=$OUT/oracle/detector:3:oracle"
   "untrained prior (previous default)=$OUT/prior:0")
for i in 0 1; do
  python benchmarks/meta/held_out.py --cache_dir "$OUT/cache" --split "$OUT/maml/split.json" --variant "${V[@]}" \
      --k 10,20 --seeds 3 --shard "$i/2" --out "$OUT/bench" &
done
wait
python - "$OUT" <<'EOF' > "$OUT/facts.json"
import json, sys
out = sys.argv[1]
m2 = json.load(open(f"{out}/maml/metrics.json")); m1 = json.load(open(f"{out}/throughput-1proc/metrics.json"))
print(json.dumps({
    "zoo": "artifacts/zoo/standard (configs/zoo/standard.yaml)",
    "split": f"{m2['train_models']} training / {m2['test_models']} held-out models, stratified by (domain, attack), seed 0",
    "training": f"{m2['steps']} outer steps x 8 episodes, k in {{5,10,20}}, 3 inner steps, second-order MAML",
    "throughput": f"{m1['episodes_per_s']:.2f} episodes/s with 1 process, {m2['episodes_per_s']:.2f} with 2 (MAML run)",
    "command": "bash benchmarks/meta/run.sh",
}))
EOF
python benchmarks/meta/held_out.py --merge "$OUT"/bench.shard0of2.json "$OUT"/bench.shard1of2.json \
    --meta "$(cat "$OUT/facts.json")" --out "$RESULTS/held_out"
