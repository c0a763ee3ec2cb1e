#!/usr/bin/env bash
# Rebuild the three shipped models from the corpus on one GPU (the recipe behind pretrained_models/).
#   bash scripts/make_shipped_models.sh CORPUS_DIR OUT_ROOT [SMALL_MIN] [DRAFT_MIN] [SUBWORD_MIN]
# CORPUS_DIR holds train/ and val/ (the offline corpus). The three trainings run at the same time on
# one GPU (the small models leave most of an H100 idle); logs go to OUT_ROOT/logs.
set -euo pipefail
corpus=${1:?corpus dir with train/ and val/}
out=${2:?output root}
small_min=${3:-6}
draft_min=${4:-3}
sub_min=${5:-2}
mkdir -p "$out/logs"
export PYTHONUNBUFFERED=1
# run from a source checkout without installing: the repo root on the path
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
python -m mambabyte train --config scripts/configs/mambabyte_small.yml --data "$corpus/train" \
  --val_data "$corpus/val" --out_dir "$out/runs/mambabyte-small" --export_dir "$out/mambabyte-small" \
  --max_time "$small_min" --set progress=off > "$out/logs/small.log" 2>&1 &
p1=$!
python -m mambabyte train --config scripts/configs/mambabyte_draft.yml --data "$corpus/train" \
  --val_data "$corpus/val" --out_dir "$out/runs/mambabyte-draft" --export_dir "$out/mambabyte-draft" \
  --max_time "$draft_min" --set progress=off > "$out/logs/draft.log" 2>&1 &
p2=$!
python scripts/train_subword_drafter.py --config scripts/configs/mambabyte_subword_draft.yml \
  --train "$corpus/train" --val "$corpus/val" --out "$out/mambabyte-subword-draft" \
  --max_time_minutes "$sub_min" > "$out/logs/subword.log" 2>&1 &
p3=$!
rc=0
wait $p1 || rc=1
wait $p2 || rc=1
wait $p3 || rc=1
exit $rc
