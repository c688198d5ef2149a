#!/usr/bin/env bash
# A crlnseg walkthrough on LA-like folders: split, plan, prepare, train, predict, rectify, evaluate.
#
# Input: a folder laid out like ../shared/data/la (one NIfTI per case, same file name on both sides):
#     DATA/images/<ID>.nii.gz     scans
#     DATA/labels/<ID>.nii.gz     masks (0 background, 1 left atrium)
#     DATA/cases.txt              case IDs, one per line (the split order)
# Usage:   examples/walkthrough.sh [DATA] [WORK]      (defaults: ../shared/data/la, la-walkthrough)
# Env:     ITERATIONS (default 1000, the cpu preset's), PRESET (default cpu), and the split
#          boundaries in cases.txt lines: LABELLED (8), UNLABELLED_END (64), VAL_END (80).
# Nothing in DATA is written; everything goes under WORK. Re-running reuses what exists.
# Run time on a quiet 2-core CPU with the defaults: about 9 minutes in all. Training's 1000
# iterations take about 8 (2.2 it/s); plan ~2 s, prepare ~2 s, predict ~5 s, rectify ~40 s,
# evaluate ~2 s (benchmarks/RESULTS.md, "walkthrough"). A busy machine can take several times
# longer.
set -euo pipefail

DATA=${1:-../shared/data/la}
WORK=${2:-la-walkthrough}
ITERATIONS=${ITERATIONS:-1000}
LABELLED=${LABELLED:-8}
UNLABELLED_END=${UNLABELLED_END:-64}
VAL_END=${VAL_END:-80}
PRESET=${PRESET:-cpu}
mkdir -p "$WORK"
DATA=$(cd "$DATA" && pwd)  # absolute: the symlinks below must resolve from anywhere

# 1. Splits as folders of symlinks (no copies): the literature's LA protocol uses the first
#    8 (or 16) cases as labelled, the rest of cases 1-64 as unlabelled, 65-80 as validation.
#    The unlabelled folder has images only; its labels go to a separate "truth" folder that
#    training never sees (rectify uses it to score pseudo-labels).
split() {  # split NAME FIRST LAST KIND...   (KIND: images and/or labels)
  local name=$1 first=$2 last=$3 kind
  shift 3
  for kind in "$@"; do
    mkdir -p "$WORK/splits/$name/$kind"
    sed -n "${first},${last}p" "$DATA/cases.txt" | while read -r id; do
      ln -sf "$DATA/$kind/$id.nii.gz" "$WORK/splits/$name/$kind/$id.nii.gz"
    done
  done
}
split labelled 1 "$LABELLED" images labels
split unlabelled $((LABELLED + 1)) "$UNLABELLED_END" images
split unlabelled_truth $((LABELLED + 1)) "$UNLABELLED_END" labels
split validation $((UNLABELLED_END + 1)) "$VAL_END" images labels

# 2. Plan: what train derives from the scans' headers (target spacing, normalisation, pooling
#    and kernels per axis, patch), with the reason for each value. Train applies it to every
#    value that no preset, settings file, option or --set gives; on a CPU it plans the cpu
#    preset's patch here. Nothing is written.
crlnseg plan "$WORK/splits/labelled" "$WORK/splits/unlabelled" --device cpu

# 3. Prepare: validate every case (readable, label matches the image's grid, label values) and
#    write the training cache (normalised float arrays + dataset.json). Bad input stops here with
#    one line naming the file (exit status 2). Each prepare plans its spacing from its own folder;
#    both folders here share one spacing, so the caches match (for folders that differ, give both
#    the same --target-spacing). Optional: `crlnseg train` prepares raw folders on the fly, but a
#    shared cache saves the work when you train several runs.
[ -e "$WORK/prepared/labelled" ] || crlnseg prepare "$WORK/splits/labelled" -o "$WORK/prepared/labelled"
[ -e "$WORK/prepared/unlabelled" ] || crlnseg prepare "$WORK/splits/unlabelled" -o "$WORK/prepared/unlabelled"

# 4. Train CRLN (the default method) with the CPU preset. Progress on stderr; the run folder gets
#    checkpoints/ (last.pt, periodic, best.pt because --val is given), metrics.jsonl,
#    training.png and settings.json. `crlnseg train --preset cpu --print-config` shows every
#    setting; change any with --set, e.g. --set method.xi=0.9. Interrupt with Ctrl-C and continue
#    later with --resume. Compare with --method mean-teacher or --method supervised.
if [ ! -e "$WORK/run/checkpoints/last.pt" ]; then
  crlnseg train --labelled "$WORK/prepared/labelled" --unlabelled "$WORK/prepared/unlabelled" \
    --val "$WORK/splits/validation" -o "$WORK/run" --preset "$PRESET" --iterations "$ITERATIONS"
fi

# 5. Predict the validation scans with the last checkpoint (never choose a checkpoint on the data
#    you report). Masks keep each input's shape, spacing, origin and direction. One summary line
#    per case on stdout. --tta adds flips, --keep-largest keeps the largest component.
#    --no-tuned: the run chose its blending on these very scans (--val), so it must not be scored
#    with that choice here; on new scans leave it out and predict uses the run's choice.
crlnseg predict "$WORK/splits/validation/images" -o "$WORK/predictions" -m "$WORK/run" \
  --no-tuned --overwrite

# 6. Rectify: pseudo-labels of the unlabelled scans, raw (teacher) and rectified (CRLN), with the
#    confidence and reliable mask; --labels scores both against the hidden truth, --preview adds
#    a PNG per case to review before opening a viewer.
crlnseg rectify "$WORK/splits/unlabelled/images" -o "$WORK/pseudo_labels" -m "$WORK/run" \
  --labels "$WORK/splits/unlabelled_truth/labels" --preview --overwrite
head -n 5 "$WORK/pseudo_labels/summary.csv"

# 7. Evaluate: Dice, Jaccard, HD95, ASD per case and their summary. A table for people, JSON for
#    scripts (distances in mm; --voxel-units for the literature's voxel units).
crlnseg evaluate "$WORK/predictions" "$WORK/splits/validation/labels" --format table
crlnseg evaluate "$WORK/predictions" "$WORK/splits/validation/labels" --format json \
  -o "$WORK/evaluation.json" --overwrite
python3 - "$WORK/evaluation.json" <<'EOF'
import json, sys
summary = json.load(open(sys.argv[1]))["summary"]["1"]
print(f"validation Dice {100 * summary['dice']['mean']:.1f} ± {100 * summary['dice']['std']:.1f}")
EOF
