"""``crlnseg train``: everything only training uses.

    launch.py     train(): plan, run one rank here or N as processes, clean up a failed start
    plan.py       checks, the dataset plan and on-the-fly preparation before the loop; the RunPlan
                  every rank follows
    run_dir.py    the run folder: which folders a run may use, clean-up of an unsaved run
    overwrite.py  --overwrite: the old run set aside until the first checkpoint
    resume.py     what a resumed run may change
    loop.py       the loop of one rank; state.py the train state and its (de)serialisation
    logging.py    metrics.jsonl, progress, environment.json; plot.py training.png
    validation.py --val: sliding-window Dice and the blending choice for predict
    parallel.py   process groups and DistributedDataParallel; allocator.py host memory
"""

from __future__ import annotations

from typing import Any

__all__ = ["train", "TrainResult", "run_settings", "summary", "result_json", "planned_settings"]


def __getattr__(name: str) -> Any:
    # Lazy: importing one submodule (crlnseg.train.allocator, say) must not import torch and
    # the whole training stack.
    if name in __all__:
        from crlnseg.train import launch

        return getattr(launch, name)
    raise AttributeError(f"module 'crlnseg.train' has no attribute {name!r}")
