"""The command-line layer: one package parses every command, tools only call it, one exit convention."""
from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from conftest import ROOT

from bicogan_dist.cli.common import NON_FINITE_LOSS, USER_ERROR, run_command

SMOKE = ROOT / "launch_configs" / "experiments" / "smoke.yaml"
#: tools/ script → the cli module it must call (and nothing else of the package).
TOOLS = {"shard_fer2013": "shard", "convert_checkpoint": "export", "sample_images": "sample", "evaluate": "evaluate",
         "train_classifier": "train_classifier", "ablate_augmentations": "ablate"}
SCRIPTS = {"bicogan-train": "train", "bicogan-shard": "shard", "bicogan-export": "export", "bicogan-sample": "sample",
           "bicogan-evaluate": "evaluate", "bicogan-train-classifier": "train_classifier", "bicogan-ablate": "ablate"}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (at any depth), by its dotted name."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_library_module_parses_arguments():
    """argparse appears only in bicogan_dist/cli: the library keeps logic functions, the cli owns the flags."""
    offenders = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "bicogan_dist").rglob("*.py"))
                 if "cli" not in p.relative_to(ROOT / "bicogan_dist").parts[:1] and "argparse" in imported_modules(p)]
    assert offenders == []


@pytest.mark.parametrize("tool, command", sorted(TOOLS.items()))
def test_thin_tools_only_call_the_cli(tool, command):
    ours = {m for m in imported_modules(ROOT / "tools" / f"{tool}.py") if m.startswith("bicogan_dist")}
    assert ours == {f"bicogan_dist.cli.{command}"}


def test_no_tool_runs_or_imports_anything_from_tests():
    for path in sorted((ROOT / "tools").glob("*.py")):
        text = path.read_text()
        assert '"tests"' not in text and "tests/" not in text, path.name
        assert not any(m == "tests" or m.startswith(("tests.", "conftest", "test_")) for m in imported_modules(path))
    assert not (ROOT / "tests" / "train_probe.py").exists()


def test_console_scripts_are_the_cli_mains():
    """pyproject's [project.scripts] as installed: each name loads the main of its cli module."""
    found = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("bicogan-")}
    assert sorted(found) == sorted(SCRIPTS)
    for name, command in SCRIPTS.items():
        assert found[name].value == f"bicogan_dist.cli.{command}:main"
        module = importlib.import_module(f"bicogan_dist.cli.{command}")
        assert found[name].load() == module.main and module.main.__self__ is module.COMMAND


def test_positionals_and_options_may_be_mixed():
    from bicogan_dist.cli import ablate, probe, sample, shard

    args = ablate.parse_args(["--shards", "s", "model.width=0.5", "--classifier", "c", "--steps", "2",
                              "data.batch_size=8", "--rerun"])
    assert args.overrides == ["model.width=0.5", "data.batch_size=8"] and args.rerun and args.steps == 2
    args = probe.build_parser().parse_intermixed_args(["OUT", "train.max_steps=2", "--config", "x.yaml", "a=1"])
    assert (args.out, args.config, args.overrides) == ("OUT", "x.yaml", ["train.max_steps=2", "a=1"])
    assert sample.parse_args(["--out", "g.png", "EXPORT", "--seeds", "3"]).export == "EXPORT"
    assert shard.parse_args(["--out", "o", "SRC", "--workers", "1"]).source == "SRC"


def test_argument_checks_exit_2_with_usage(capsys):
    from bicogan_dist.cli import sample, shard

    with pytest.raises(SystemExit) as exc:
        shard.parse_args(["SRC", "--synthetic", "5", "--out", "o"])
    assert exc.value.code == 2 and "give exactly one of SOURCE and --synthetic N" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        sample.parse_args(["EXPORT", "--out", "g.png", "--batch-size", "0"])
    assert exc.value.code == 2 and "--batch-size must be at least 1" in capsys.readouterr().err


def test_run_command_maps_listed_errors_and_lets_bugs_through(capsys):
    class Occupied(RuntimeError):
        pass

    def occupied() -> int:
        raise Occupied("out/ already holds shards")

    def diverged() -> int:
        raise FloatingPointError("step 3: non-finite loss")

    errors = {(KeyError, Occupied): USER_ERROR, FloatingPointError: NON_FINITE_LOSS}
    assert run_command(occupied, errors) == 2
    assert capsys.readouterr().err == "error: out/ already holds shards\n"
    assert run_command(diverged, errors) == 3
    assert capsys.readouterr().err == "error: step 3: non-finite loss\n"
    assert run_command(lambda: 0, errors) == 0
    with pytest.raises(ZeroDivisionError):
        run_command(lambda: 1 // 0, errors)


def test_train_module_reports_a_bad_override_with_exit_2(tmp_path):
    """``python -m bicogan_dist.train`` still works and calls the cli; an override before --config is parsed."""
    proc = subprocess.run([sys.executable, "-m", "bicogan_dist.train", "model.knd=cgan", "--config", str(SMOKE),
                           f"log.run_dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: unknown config key model.knd")
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_error_lines_of_concurrent_processes_never_merge():
    """Ranks share the launcher's stderr, unbuffered under the launcher: each ``error:`` line is one write.

    (With ``print`` the newline was a second write, and two ranks' messages ran into one line.)
    """
    script = ("import sys\nfrom bicogan_dist.cli.common import fail\n"
              "for i in range(1500):\n    fail(f'rank {sys.argv[1]} message {i} ' + 'x' * 300)\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    r, w = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-c", script, str(rank)], stderr=w, env=env) for rank in (0, 1)]
    os.close(w)
    with os.fdopen(r, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    assert [p.wait() for p in procs] == [0, 0]
    assert len(lines) == 3000
    assert all(line.startswith("error: rank ") and line.endswith("x" * 300) and line.count("error:") == 1
               for line in lines)


@pytest.mark.parametrize("value", ["shared", True, 0.5, 64, ["translation", "cutout"], [], None])
def test_format_override_round_trips_through_parse_overrides(value):
    from bicogan_dist.config import format_override, parse_overrides

    text = format_override("loss.efl_augment", value)
    assert " " not in text  # one shell word
    assert parse_overrides([text]) == {"loss": {"efl_augment": value}}
