"""``python -m bicogan_dist.train``: the trainer's command line lives in ``bicogan_dist/cli/train.py``."""
import sys

from bicogan_dist.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
