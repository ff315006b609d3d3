"""The `lenet-dist` command: one subcommand per job, its flags generated from its dataclass in config.py.

A subcommand's module is imported only when that subcommand runs, so `lenet-dist --help`,
`lenet-dist inspect` and `lenet-dist predict --help` never load torch or accelerate.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from lenet_dist.config import (
    BenchConfig,
    CompareConfig,
    DownloadConfig,
    InspectConfig,
    LaunchConfigFlags,
    PredictConfig,
    TrainConfig,
)
from lenet_dist.errors import exit_on_user_error, exit_quickly, status_of
from lenet_dist.flags import ArgumentParser, add_config_arguments, config_from_args, version_text

# name: (help, config class, "module:function" that runs it and returns an exit status or None)
COMMANDS = {
    "train": ("train in this process (several: accelerate launch -m lenet_dist.train)", TrainConfig,
              "lenet_dist.train:train_command"),
    "bench": ("throughput per device, pipeline, precision and batch size; time to result; scaling", BenchConfig,
              "lenet_dist.bench.suite:run"),
    "bench compare": ("bench --json results side by side, matched row by row, with ratios", CompareConfig,
                      "lenet_dist.bench.compare:run"),
    "inspect": ("where a profiled step's time goes, per rank", InspectConfig, "lenet_dist.profiling.inspection:run"),
    "predict": ("classify your own images with a trained run", PredictConfig, "lenet_dist.predict.classify:run"),
    "download": ("fetch a data set into the data folder (for machines that train offline)", DownloadConfig,
                 "lenet_dist.data:download"),
    "launch-config": ("print the path of a packaged accelerate config: accelerate launch --config_file PATH",
                      LaunchConfigFlags, "lenet_dist.distributed.configs:print_config_path"),
}


LAUNCH_HELP = ("accelerate launch's flags and launcher, with one line and exit 128+N when the ranks stopped on "
               "signal N after saving (see `lenet-dist launch --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="lenet-dist", description="LeNet-5 on MNIST through accelerate.")
    parser.add_argument("--version", action="version", version=version_text())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers: dict[str, argparse.ArgumentParser] = {}
    subcommands = {}
    for name, (summary, config_class, _) in COMMANDS.items():
        command, _, subcommand = name.partition(" ")
        if subcommand:  # e.g. `bench compare`: a subcommand of `bench`, which also runs on its own
            if command not in subcommands:
                subcommands[command] = parsers[command].add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
            parsers[name] = subcommands[command].add_parser(subcommand, help=summary, description=summary)
            add_config_arguments(parsers[name], config_class)
        else:
            parsers[name] = commands.add_parser(name, help=summary, description=summary)
            add_config_arguments(parsers[name], config_class)
        # `lenet-dist train --version` answers too: to argparse it is not --version, and it suggested a flag
        parsers[name].add_argument("--version", action="version", version=version_text())
        if name == "train":
            commands.add_parser("launch", help=LAUNCH_HELP, add_help=False)
    parser.commands = parsers  # for errors in a subcommand's own words
    return parser


def main(argv: list[str] | None = None) -> NoReturn:
    """`lenet-dist`: run the command and end the process with its status."""
    exit_quickly(command_status(sys.argv[1:] if argv is None else argv))


def command_status(argv: list[str]) -> int:
    """What `lenet-dist ARGV` prints and its exit status, in this process."""
    if argv[:1] == ["launch"]:  # accelerate's own flags, parsed by accelerate's own parser
        from lenet_dist.distributed.launcher import main as launch

        def launched() -> int:
            with exit_on_user_error():
                return launch(argv[1:])

        return status_of(launched)

    def command() -> int:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        name = f"{args.command} {args.subcommand}" if getattr(args, "subcommand", None) else args.command
        if extra:  # said by the subcommand's parser: its help lists the flags that exist
            parser.commands[name].error(f"unrecognized arguments: {' '.join(extra)}")
        _, config_class, target = COMMANDS[name]
        module_name, function_name = target.split(":")
        with exit_on_user_error():
            config = config_from_args(config_class, args)  # a bad value fails before the heavy imports
            status = getattr(importlib.import_module(module_name), function_name)(config)
        return status if isinstance(status, int) else 0

    return status_of(command)


if __name__ == "__main__":
    main()
