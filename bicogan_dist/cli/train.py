"""``bicogan-train`` / ``python -m bicogan_dist.train`` (under ``accelerate launch``): train on webdataset shards.

    accelerate launch [...] -m bicogan_dist.train --config EXP.yaml [--resume latest|PATH] [key=value ...]

The work is :func:`bicogan_dist.train.trainer.train`. Exit codes: 2 for a bad config, shard folder or
checkpoint, 3 when a loss turns non-finite (every rank stops; nothing is saved after it).
"""
from __future__ import annotations

import argparse
from typing import Callable

from bicogan_dist.cli.common import NON_FINITE_LOSS, USER_ERROR, Command


def _evaluator_factory(cfg) -> Callable | None:
    """Periodic evaluation (eval.every > 0) composed here, at the top, so training never imports evaluation."""
    if cfg.eval.every <= 0:
        return None

    def factory(device):
        from bicogan_dist.evaluate.evaluation import make_training_evaluator

        return make_training_evaluator(cfg.eval.classifier, cfg.data.shards, num_samples=cfg.eval.num_samples,
                                       split=cfg.eval.split, device=device, seed=cfg.train.seed, model=cfg.model)

    return factory


def build_parser() -> argparse.ArgumentParser:
    """The trainer's flags: an experiment YAML, --resume and key=value overrides in any order."""
    parser = argparse.ArgumentParser(
        prog="python -m bicogan_dist.train",
        description="Train a BiCoGAN (or gan/cgan/bigan) on webdataset shards; launch with `accelerate launch`.",
    )
    parser.add_argument("--config", help="experiment YAML (launch_configs/experiments/*.yaml); defaults if omitted")
    parser.add_argument("--resume", metavar="latest|PATH",
                        help="continue the run in log.run_dir from its newest checkpoint, or from a checkpoint path")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.max_steps=200 data.shards=data_shards/fer2013")
    return parser


def _train(args: argparse.Namespace) -> int:
    from bicogan_dist.config import ConfigError
    from bicogan_dist.train.config import load_config
    from bicogan_dist.train.launcher import multinode_address_problem
    from bicogan_dist.train.trainer import train

    problem = multinode_address_problem()  # a multi-node job rendezvousing on a loopback address
    if problem:
        raise ConfigError(problem)
    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume, evaluator_factory=_evaluator_factory(cfg))
    if result.engine.is_main:
        print(f"done: {result.run_dir} at step {result.step}", flush=True)
    result.engine.close()
    return 0


def _errors() -> dict:
    from bicogan_dist.config import ConfigError
    from bicogan_dist.data.manifest import ShardError
    from bicogan_dist.train.checkpoint import CheckpointError
    from bicogan_dist.train.trainer import NonFiniteLossError

    return {(ConfigError, ShardError, CheckpointError): USER_ERROR, NonFiniteLossError: NON_FINITE_LOSS}


#: 0 when training finished (or was stopped by SIGTERM/SIGINT and saved), 2 on a user error, 3 on a
#: non-finite loss. Overrides may stand before or after --resume.
COMMAND = Command(build_parser, _train, _errors)
main, parse_args = COMMAND.main, COMMAND.parse_args


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(main())
