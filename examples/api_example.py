"""crlnseg from Python: the same stages as the command line, as library calls.

Runs on a small generated dataset (or your own folders: see the paths below) in a few minutes on a
CPU. Usage:  python examples/api_example.py [WORK_DIR] [ITERATIONS]
(defaults: ./crlnseg-api-example, 240).

The stages and their artefacts are those of ``crlnseg demo``; what this adds is the in-memory use
of a trained model (``Predictor``), e.g. inside your own pipeline, without writing files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from crlnseg.config import resolve_settings
from crlnseg.evaluate import EvaluateSettings, evaluate
from crlnseg.inference.predictor import Predictor
from crlnseg.io import read_image, write_image
from crlnseg.metrics import dice, hd95
from crlnseg.predict import predict_paths
from crlnseg.prepare import prepare_dataset
from crlnseg.rectify import rectify_paths
from crlnseg.settings import PrepareSettings
from crlnseg.synthetic import generate_dataset
from crlnseg.train import train

work = Path(sys.argv[1] if len(sys.argv) > 1 else "crlnseg-api-example")
iterations = int(sys.argv[2]) if len(sys.argv) > 2 else 240

# 1. Data: folders laid out as images/<ID>.nii.gz (+ labels/<ID>.nii.gz). Here a generated set;
#    with your own data, point these paths at your folders instead.
data = generate_dataset(work / "data", n_labelled=4, n_unlabelled=8, n_test=4, seed=0,
                        overwrite=True)

# 2. Prepare: validate and normalise each folder into a training cache (arrays + dataset.json).
settings = PrepareSettings(normalize="zscore")
for split in ("labelled", "unlabelled"):
    prepare_dataset(data / split, work / "prepared" / split, settings, overwrite=True)

# 3. Train: settings resolve exactly as on the command line (defaults < preset < options <
#    --set strings); the resolved settings are saved in the run folder and in every checkpoint.
run_settings = resolve_settings(
    preset="cpu",
    options={"method": {"method": "crln"},
             "train": {"iterations": iterations, "patch": (48, 48, 32), "device": "auto"}},
    overrides=["method.xi=0.6"],
)
run = work / "run"
result = train(work / "prepared" / "labelled", work / "prepared" / "unlabelled", run, run_settings,
               overwrite=True)  # also: val=FOLDER (best.pt), nproc=N / gpus=N (data parallel)

# 4. Predict folders to files (what `crlnseg predict` does) and evaluate them.
predict_paths([data / "test" / "images"], work / "predictions", run, overwrite=True)
report = evaluate(work / "predictions", data / "test" / "labels", EvaluateSettings())
print(f"test Dice {report.summary['1']['dice']['mean']:.3f}")

# 5. Pseudo-labels of the unlabelled scans, raw vs rectified, scored against hidden labels.
rows = rectify_paths([data / "unlabelled" / "images"], work / "pseudo_labels", run,
                     labels=data / "unlabelled" / "labels_hidden", overwrite=True)
raw, rectified = (np.mean([r[k] for r in rows]) for k in ("dice_raw", "dice_rectified"))
print(f"pseudo-label Dice raw {raw:.3f}, rectified {rectified:.3f}")

# 6. In memory: load the model once, segment volumes as arrays, keep the input's geometry.
predictor = Predictor.from_run(run)  # the EMA teacher of checkpoints/last.pt
image = read_image(data / "test" / "images" / "test_00.nii.gz")
prediction = predictor.predict_volume(image)  # mask on the input's grid, rectified output
truth = read_image(data / "test" / "labels" / "test_00.nii.gz").array > 0
distance = hd95(prediction.mask, truth, image.geometry.spacing)  # None if a mask is empty
print(f"test_00: Dice {dice(prediction.mask, truth):.3f}, HD95 "
      f"{'n/a' if distance is None else f'{distance:.2f} mm'}, {prediction.seconds:.1f} s")
write_image(prediction.mask, image, work / "test_00_mask.nii.gz", overwrite=True)
