#!/usr/bin/env bash
# Quick start: install, shard, train.  bash run.sh [path/to/fer2013.csv[.gz] | fer2013 folder] [key=value ...]
# Without a path it trains on the built-in synthetic expression set; with one, on real FER2013.
# Uses every GPU it finds (bf16), else two CPU processes. Leaves runs/quickstart-<synthetic|fer2013>/.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
export PATH="$PWD/.venv/bin:$PATH"

SOURCE=""
if [ $# -ge 1 ] && [[ "$1" != *=* ]]; then SOURCE=$1; shift; fi
if [ -n "$SOURCE" ]; then
  SHARDS=data_shards/fer2013
  [ -f "$SHARDS/manifest.json" ] || python tools/shard_fer2013.py "$SOURCE" --out "$SHARDS"
else
  SHARDS=data_shards/synthetic
  [ -f "$SHARDS/manifest.json" ] || python tools/shard_fer2013.py --synthetic 12000 --out "$SHARDS"
fi

GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -gt 1 ]; then
  LAUNCH=(--multi_gpu --num_processes "$GPUS" --mixed_precision bf16)
elif [ "$GPUS" -eq 1 ]; then
  LAUNCH=(--config_file launch_configs/accelerate/1gpu.yaml)
else
  LAUNCH=(--config_file launch_configs/accelerate/cpu_2proc.yaml)
fi
# --quiet: a failing trainer's "error: ..." line ends the output, without the launcher's Python traceback.
python -m accelerate.commands.launch --quiet "${LAUNCH[@]}" -m bicogan_dist.train \
  --config launch_configs/experiments/quickstart.yaml --resume latest data.shards="$SHARDS" \
  log.run_dir="runs/quickstart-$(basename "$SHARDS")" "$@"
echo "TensorBoard: .venv/bin/tensorboard --logdir runs/quickstart-$(basename "$SHARDS")/tb   samples: runs/quickstart-$(basename "$SHARDS")/samples/"
