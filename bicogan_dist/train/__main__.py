"""``accelerate launch [...] -m bicogan_dist.train --config EXP.yaml [--resume latest|PATH] [key=value ...]``."""
from __future__ import annotations

import argparse
import sys

from bicogan_dist.config import ConfigError
from bicogan_dist.data.manifest import ShardError
from bicogan_dist.train.checkpoint import CheckpointError
from bicogan_dist.train.config import load_config
from bicogan_dist.train.launcher import report_error
from bicogan_dist.train.trainer import NonFiniteLossError, train


def _evaluator_factory(cfg):
    """Periodic evaluation (eval.every > 0) composed here, at the top, so training never imports evaluation."""
    if cfg.eval.every <= 0:
        return None

    def factory(device):
        from bicogan_dist.evaluate.evaluation import make_training_evaluator

        return make_training_evaluator(cfg.eval.classifier, cfg.data.shards, num_samples=cfg.eval.num_samples,
                                       split=cfg.eval.split, device=device, seed=cfg.train.seed, model=cfg.model)

    return factory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bicogan_dist.train",
        description="Train a BiCoGAN (or gan/cgan/bigan) on webdataset shards; launch with `accelerate launch`.",
    )
    parser.add_argument("--config", help="experiment YAML (launch_configs/experiments/*.yaml); defaults if omitted")
    parser.add_argument("--resume", metavar="latest|PATH",
                        help="continue the run in log.run_dir from its newest checkpoint, or from a checkpoint path")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.max_steps=200 data.shards=data_shards/fer2013")
    args = parser.parse_intermixed_args(argv)  # overrides may stand before or after --resume
    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg, resume=args.resume, evaluator_factory=_evaluator_factory(cfg))
    except (ConfigError, ShardError, CheckpointError) as exc:
        return _fail(exc, 2)
    except NonFiniteLossError as exc:
        return _fail(exc, 3)
    if result.engine.is_main:
        print(f"done: {result.run_dir} at step {result.step}", flush=True)
    return 0


def _fail(exc: Exception, code: int) -> int:
    """Print the ``error:`` line and, under a launcher, make it the root cause in torchrun's failure report."""
    message = f"error: {exc}"
    print(message, file=sys.stderr, flush=True)
    report_error(message)
    return code


if __name__ == "__main__":
    sys.exit(main())
