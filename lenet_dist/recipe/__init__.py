"""The recipes `--recipe` names: every field a recipe sets, which a flag given on its own overrides.

    default     MNIST's test set in 2 epochs: Adam, one-cycle over both, 98.6 % and more (BENCHMARKS.md)
    fast-to-98  fewest images to 98 %: Muon (Adam on the biases and the output layer), LeCun init, batch 32, the
                learning rate annealed over the first 45,056 images to a fiftieth of its peak and then held (so a
                slow seed still learns), stopping at the first evaluation ≥ 98 % (scripts/recipe_search.py)
    predict     for reading your own handwriting (`lenet-dist predict`): the default's Adam and schedule over 5 epochs,
                each batch redrawn as other hands and pens write (--augment, augment.py); README's "Predict your
                own digits" has what it reads (scripts/read_handwriting.py)

This table imports nothing heavy, for the command line; build.py and lr_schedule.py build from it.
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    "default": {"epochs": 2, "batch_size": 128, "lr": 6e-3, "warmup": 0.3, "anneal_images": None,
                "final_lr_factor": 1 / 25 / 1e4, "init": "pytorch", "target_accuracy": None, "optimizer": "adam",
                "muon_lr": 0.02, "augment": False},
    "fast-to-98": {"epochs": 1, "batch_size": 32, "lr": 5e-3, "warmup": 0.1, "anneal_images": 45_056,
                   "final_lr_factor": 1 / 50, "init": "lecun", "target_accuracy": 0.98, "optimizer": "muon",
                   "muon_lr": 0.01, "augment": False},
    "predict": {"epochs": 5, "batch_size": 128, "lr": 6e-3, "warmup": 0.3, "anneal_images": None,
                "final_lr_factor": 1 / 25 / 1e4, "init": "pytorch", "target_accuracy": None, "optimizer": "adam",
                "muon_lr": 0.02, "augment": True},
}
FROM_RECIPE = "(default: the --recipe's)"
