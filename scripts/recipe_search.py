"""How many training images LeNet-5 needs to reach 98 % test accuracy, over recipes and seeds, in one process.

Each candidate trains the real model, optimizer and data path (on a GPU as one CUDA graph) and evaluates
on the whole 10,000-image test set every --eval-images images, so "images to 98 %" is read to that
resolution (a real run's evaluation cadence can only find it later). One line of JSON per candidate.

    python scripts/recipe_search.py --stage search --seeds 0,1,2,3,4 > search.jsonl
    python scripts/recipe_search.py --stage extras --seeds 0,1,2,3,4 > extras.jsonl

The schedule is one-cycle over a horizon of images (warm-up to the peak, cosine down to peak / 1e4) that
then holds its last value; the rest is Adam with the recipe's betas unless a candidate says otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lenet_dist.config import TrainConfig  # noqa: E402
from lenet_dist.data import InMemoryDataset, ShuffledBatches, load_split  # noqa: E402
from lenet_dist.recipe.build import build_model  # noqa: E402
from lenet_dist.steps import GraphedStep  # noqa: E402

TARGET = 0.98


@dataclass(frozen=True)
class Candidate:
    batch: int = 64
    lr: float = 5e-3
    warmup: float = 0.1  # share of the horizon
    horizon: int = 60_000  # images over which the schedule anneals
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    final_div: float = 1e4
    init: str = "default"  # or "lecun": normal(0, 1/fan_in) weights, zero biases, as LeCun's tanh nets had
    ema: float = 0.0  # > 0: evaluate an exponential moving average of the weights with this decay


def schedule(candidate: Candidate, steps_in_horizon: int):
    warm = max(1, round(candidate.warmup * steps_in_horizon))

    def factor(step: int) -> float:  # relative to the peak lr
        if step < warm:
            return (1 / 25) + (1 - 1 / 25) * step / warm  # one-cycle's start at peak / 25
        progress = min(1.0, (step - warm) / max(1, steps_in_horizon - warm))
        low = 1 / candidate.final_div
        return low + (1 - low) * (1 + math.cos(math.pi * progress)) / 2

    return factor


class Step(GraphedStep):
    """The recipe's graphed step with the candidate's loss (label smoothing)."""

    def __init__(self, *args, label_smoothing: float, **kwargs) -> None:
        self.label_smoothing = label_smoothing
        super().__init__(*args, **kwargs)

    def _step(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=False)
        logits = self.model(self.images)
        loss = F.cross_entropy(logits, self.labels, label_smoothing=self.label_smoothing)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), (logits.detach().argmax(1) == self.labels).sum()


def images_to_target(candidate: Candidate, seed: int, train: InMemoryDataset, test: tuple, device: torch.device,
                     eval_images: int, limit_images: int) -> tuple[int | None, float]:
    torch.manual_seed(seed)
    model = build_model(TrainConfig(), num_classes=10).to(device)
    if candidate.init == "lecun":
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                    fan_in = module.weight[0].numel()
                    module.weight.normal_(0, fan_in ** -0.5)
                    module.bias.zero_()
    parameters = list(model.parameters())
    averaged = [parameter.detach().clone() for parameter in parameters]
    optimizer = torch.optim.AdamW(model.parameters(), lr=candidate.lr, betas=(candidate.beta1, candidate.beta2),
                                  eps=candidate.eps, weight_decay=candidate.weight_decay, fused=True,
                                  capturable=device.type == "cuda")
    steps_in_horizon = candidate.horizon // candidate.batch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(candidate, steps_in_horizon))
    step = Step(model, optimizer, scheduler, candidate.batch, device, capture=device.type == "cuda",
                label_smoothing=candidate.label_smoothing)
    batches = ShuffledBatches(train, candidate.batch, seed, 0, 1)
    every = max(1, eval_images // candidate.batch)
    images, best, epoch = 0, 0.0, 0
    test_images, test_labels = test
    updates = 0
    while images < limit_images:
        for index, (x, y) in enumerate(batches.epoch(epoch), 1):
            step(x, y)
            images += candidate.batch
            updates += 1
            if candidate.ema:
                with torch.no_grad():  # the average forgets its start quickly: decay warms up as (1 + t) / (10 + t)
                    torch._foreach_lerp_(averaged, parameters, 1 - min(candidate.ema, (1 + updates) / (10 + updates)))
            if index % every == 0:
                model.eval()
                with torch.no_grad():
                    if candidate.ema:
                        current = [parameter.detach().clone() for parameter in parameters]
                        torch._foreach_copy_(parameters, averaged)
                    accuracy = (model(test_images).argmax(1) == test_labels).float().mean().item()
                    if candidate.ema:
                        torch._foreach_copy_(parameters, current)
                model.train()
                best = max(best, accuracy)
                if accuracy >= TARGET:
                    return images, best
            if images >= limit_images:
                break
        epoch += 1
    return None, best


def candidates(stage: str) -> list[Candidate]:
    base = Candidate()
    if stage == "search":  # batch × peak lr × horizon × warm-up
        return [replace(base, batch=b, lr=lr, horizon=h, warmup=w) for b, lr, h, w in itertools.product(
            (32, 64), (4e-3, 6e-3, 1e-2), (20_000, 26_000, 32_000), (0.1, 0.25))]
    if stage == "extras":  # Adam's betas and epsilon, label smoothing, weight decay around one candidate
        anchor = replace(base, batch=32, lr=6e-3, horizon=26_000, warmup=0.1)
        return [replace(anchor, **change) for change in (
            {}, {"beta2": 0.99}, {"beta2": 0.999}, {"beta1": 0.8}, {"label_smoothing": 0.1}, {"weight_decay": 1e-4},
            {"eps": 1e-6}, {"final_div": 1e2})]
    if stage == "average":  # LeCun's initialisation and a moving average of the weights (two controls first)
        controls = [replace(base, batch=b, lr=6e-3, horizon=32_000) for b in (32, 64)]
        return controls + [replace(base, batch=b, lr=lr, horizon=h, init="lecun", ema=ema) for b, lr, h, ema in
                           itertools.product((32, 64), (5e-3, 8e-3), (26_000, 32_000), (0.0, 0.99, 0.998))]
    if stage == "small-batch":  # LeCun's initialisation at batches 16 and 32, and what the lr holds after the horizon
        lecun = replace(base, init="lecun")
        return [replace(lecun, batch=16, lr=3e-3, horizon=32_000), replace(lecun, batch=16, lr=3e-3, horizon=28_000),
                replace(lecun, batch=32, lr=5e-3, horizon=32_000, final_div=50.0),
                replace(lecun, batch=16, lr=3e-3, horizon=32_000, final_div=50.0)]
    raise SystemExit(f"unknown stage {stage}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", default="search", choices=("search", "extras", "average", "small-batch"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--eval-images", type=int, default=1024)
    parser.add_argument("--limit-images", type=int, default=60_000)
    parser.add_argument("--only", type=int, help="run the first N candidates (a quick look)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data_dir = Path(args.data_dir)
    train = InMemoryDataset(load_split(data_dir, "train", "mnist"), device)
    test_split = InMemoryDataset(load_split(data_dir, "test", "mnist"), device)
    test = test_split.batch(torch.arange(len(test_split), device=device))
    seeds = [int(seed) for seed in args.seeds.split(",")]
    started = time.perf_counter()
    for candidate in candidates(args.stage)[: args.only]:
        results = [images_to_target(candidate, seed, train, test, device, args.eval_images, args.limit_images)
                   for seed in seeds]
        reached = [images for images, _ in results]
        counted = [images if images is not None else math.inf for images in reached]
        print(json.dumps({**asdict(candidate), "images": reached, "median": statistics.median(counted),
                          "misses": reached.count(None), "best": [round(best, 4) for _, best in results],
                          "seconds": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
