#!/usr/bin/env bash
# PPO throughput, ours and TRL's, on the same models and setting; JSON lands in benchmarks/results/.
#   benchmarks/run.sh [ITERATIONS]        (make bench)
# TRL gets its own virtual environment, benchmarks/.venv-trl, with the same torch build as .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
ITERATIONS="${1:-6}"
PY=.venv/bin/python
TRL_VENV=benchmarks/.venv-trl
TORCH_SPEC="torch==$($PY -c 'import torch; print(torch.__version__.split("+")[0])')"
if [ ! -x "$TRL_VENV/bin/python" ]; then
  python3 -m venv "$TRL_VENV"
  "$TRL_VENV/bin/pip" install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
  "$TRL_VENV/bin/pip" install --quiet "trl==1.12.0" "transformers==5.23.0"
fi
mkdir -p benchmarks/results
export RLHF_NO_PROGRESS=1
for model in demo gpt2-6x512; do
  $PY -c "import json, sys; sys.path.insert(0, 'benchmarks'); from common import prepare; \
json.dump(prepare('$model'), open('benchmarks/results/paths-$model.json', 'w'))"
  $PY benchmarks/ppo.py --model "$model" --iterations "$ITERATIONS" -o "benchmarks/results/ppo-$model.json" >/dev/null
  "$TRL_VENV/bin/python" benchmarks/trl_ppo.py --paths "benchmarks/results/paths-$model.json" --model "$model" \
    --iterations "$ITERATIONS" -o "benchmarks/results/trl-ppo-$model.json" >/dev/null 2>&1
done
$PY benchmarks/compare.py benchmarks/results
