"""The `lenet-dist` command: one subcommand per job, each parsed from its module's own options."""

from __future__ import annotations

import argparse
import sys

from lenet_dist.config import ArgumentParser, TrainConfig, add_config_arguments, config_from_args
from lenet_dist.bench import BenchConfig
from lenet_dist.errors import exit_on_user_error
from lenet_dist.predict import PredictConfig
from lenet_dist.traces import InspectConfig


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="lenet-dist", description="LeNet-5 on MNIST through accelerate.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train_parser = commands.add_parser(
        "train", help="train in this process (for several processes: accelerate launch lenet_dist/train.py)"
    )
    add_config_arguments(train_parser, TrainConfig)
    bench_parser = commands.add_parser("bench", help="throughput per device, pipeline, precision and batch size")
    add_config_arguments(bench_parser, BenchConfig)
    inspect_parser = commands.add_parser("inspect", help="where a profiled step's time goes, per rank")
    add_config_arguments(inspect_parser, InspectConfig)
    predict_parser = commands.add_parser("predict", help="classify your own images with a trained run")
    add_config_arguments(predict_parser, PredictConfig)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    status = 0
    with exit_on_user_error():
        if args.command == "train":
            from lenet_dist.train import train

            train(config_from_args(TrainConfig, args))
        elif args.command == "bench":
            from lenet_dist.bench import run

            run(config_from_args(BenchConfig, args))
        elif args.command == "inspect":
            from lenet_dist.traces import run as inspect

            inspect(config_from_args(InspectConfig, args))
        elif args.command == "predict":
            from lenet_dist.predict import run as predict

            status = predict(config_from_args(PredictConfig, args))
    sys.exit(status)


if __name__ == "__main__":
    main()
