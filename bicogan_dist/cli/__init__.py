"""Every command line of the project, one module per command; the library modules hold no argument parsing.

    module               console script             tools/ script (runs it from a checkout)
    cli/train.py         bicogan-train              python -m bicogan_dist.train (under accelerate launch)
    cli/shard.py         bicogan-shard              tools/shard_fer2013.py
    cli/export.py        bicogan-export             tools/convert_checkpoint.py
    cli/sample.py        bicogan-sample             tools/sample_images.py
    cli/evaluate.py      bicogan-evaluate           tools/evaluate.py
    cli/train_classifier.py  bicogan-train-classifier  tools/train_classifier.py
    cli/ablate.py        bicogan-ablate             tools/ablate_augmentations.py
    cli/probe.py         (none)                     python -m bicogan_dist.cli.probe (tests, tools/bench_engines.py)

Each module declares a ``common.Command`` (flags, value checks, action, the errors a user can fix);
its ``main(argv=None) -> int`` parses with ``parse_intermixed_args`` (positionals and options in any
order), calls one library function and turns the errors a user can fix into ``error: ...`` on stderr
and exit code 2 (``common.py``). This package sits at the top of the import graph: it may import
anything in bicogan_dist, and nothing in bicogan_dist imports it (except ``train/__main__``).
"""
