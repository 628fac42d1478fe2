#!/usr/bin/env bash
# RLHF throughput on the same models and rollout shape: our PPO, TRL 1.12's PPO (the last TRL with PPO) and
# TRL 1.16's RLOO (critic-free); our DPO and TRL 1.16's; our GRPO and RLOO and TRL 1.16's GRPOTrainer and
# RLOOTrainer on the arithmetic demo (throughput and reward curves, REPEATS seeds each); learning of both PPOs
# over three seeds; 1 vs 2 workers; feedback ingestion of 100k records; full vs LoRA PPO memory. JSON lands in benchmarks/results/,
# the throughput side by side in summary.json.
#   benchmarks/run.sh [ITERATIONS]        (make bench; REPEATS=3 alternating runs of our PPO and TRL's)
# Each TRL gets its own virtual environment with the same torch build as .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
ITERATIONS="${1:-6}"
REPEATS="${REPEATS:-3}"
GRPO_STEPS="${GRPO_STEPS:-150}"
PY=.venv/bin/python
TORCH_SPEC="torch==$($PY -c 'import torch; print(torch.__version__.split("+")[0])')"
make_venv() {  # make_venv DIR TRL_VERSION
  if [ ! -x "$1/bin/python" ]; then
    python3 -m venv "$1"
    "$1/bin/pip" install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
    "$1/bin/pip" install --quiet "trl==$2" "transformers==5.23.0"
  fi
}
make_venv benchmarks/.venv-trl 1.12.0
make_venv benchmarks/.venv-trl-rloo 1.16.0
mkdir -p benchmarks/results/runs
export RLHF_NO_PROGRESS=1
for model in demo gpt2-6x512; do
  $PY -c "import json, sys; sys.path.insert(0, 'benchmarks'); from common import DPO_SETTINGS, prepare, \
prepare_pairs; json.dump({**prepare('$model'), 'pairs': prepare_pairs(DPO_SETTINGS['pairs'])}, \
open('benchmarks/results/paths-$model.json', 'w'))"
  # Ours and TRL's PPO alternate, so a drift in the shared machine's speed hits both; compare.py takes medians.
  for run in $(seq "$REPEATS"); do
    $PY benchmarks/ppo.py --model "$model" --iterations "$ITERATIONS" \
      -o "benchmarks/results/runs/ppo-$model-$run.json" >/dev/null
    benchmarks/.venv-trl/bin/python benchmarks/trl_ppo.py --paths "benchmarks/results/paths-$model.json" \
      --model "$model" --iterations "$ITERATIONS" -o "benchmarks/results/runs/trl-ppo-$model-$run.json" >/dev/null 2>&1
  done
  benchmarks/.venv-trl-rloo/bin/python benchmarks/trl_rloo.py --paths "benchmarks/results/paths-$model.json" \
    --model "$model" --iterations "$ITERATIONS" -o "benchmarks/results/trl-rloo-$model.json" >/dev/null 2>&1
  $PY benchmarks/dpo.py --model "$model" -o "benchmarks/results/dpo-$model.json" >/dev/null
  benchmarks/.venv-trl-rloo/bin/python benchmarks/trl_dpo.py --paths "benchmarks/results/paths-$model.json" \
    --model "$model" -o "benchmarks/results/trl-dpo-$model.json" >/dev/null 2>&1
done
# GRPO and RLOO on the arithmetic demo, ours and TRL 1.16's, alternating; each run its own seed.
$PY -c "import json, sys; sys.path.insert(0, 'benchmarks'); from common import prepare_arithmetic; \
json.dump(prepare_arithmetic(), open('benchmarks/results/paths-arithmetic.json', 'w'))"
for run in $(seq "$REPEATS"); do
  for advantage in grpo rloo; do
    $PY benchmarks/grpo.py --advantage "$advantage" --steps "$GRPO_STEPS" --seed "$run" \
      -o "benchmarks/results/runs/grpo-$advantage-$run.json" >/dev/null
    benchmarks/.venv-trl-rloo/bin/python benchmarks/trl_grpo.py --paths benchmarks/results/paths-arithmetic.json \
      --trainer "$advantage" --steps "$GRPO_STEPS" --seed "$run" \
      -o "benchmarks/results/runs/trl-grpo-$advantage-$run.json" >/dev/null 2>&1
  done
done
$PY benchmarks/learning.py --seeds 0 1 2 -o benchmarks/results/learning.json >/dev/null 2>&1
$PY benchmarks/distributed.py -o benchmarks/results/distributed.json >/dev/null 2>&1
$PY benchmarks/feedback.py -o benchmarks/results/feedback.json >/dev/null 2>&1
$PY benchmarks/lora.py -o benchmarks/results/lora.json >/dev/null 2>&1
$PY benchmarks/compare.py benchmarks/results
