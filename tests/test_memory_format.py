"""model.channels_last (true / false / auto): the config values, the measurement behind auto, the trainer's
log line, and that checkpoints and exports do not depend on the layout a run trained in."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from bicogan_dist.config import ConfigError
from bicogan_dist.models.networks import ModelConfig, build_models
from bicogan_dist.train.config import load_config
from bicogan_dist.train.memory_format import (MemoryFormatChoice, parse_memory_format_line, resolve_channels_last,
                                              time_memory_formats)
from test_train import run, shards, train_cmd  # noqa: F401  (shards is a fixture)

SMALL = ModelConfig(kind="bicogan", width=0.25, z_dim=16)


def is_channels_last(module: torch.nn.Module) -> bool:
    return any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in module.parameters())


# ----------------------------------------------------------------------------- config
def test_config_takes_true_false_auto_from_yaml_and_overrides(tmp_path):
    assert load_config(None).model.channels_last == "auto"  # the default
    for text, value in (("true", True), ("false", False), ("auto", "auto")):
        assert load_config(None, [f"model.channels_last={text}"]).model.channels_last == value
        path = tmp_path / f"{text}.yaml"
        path.write_text(f"model: {{channels_last: {text}}}\n")
        assert load_config(path).model.channels_last == value
        assert load_config(path, ["model.channels_last=false"]).model.channels_last is False  # override wins


@pytest.mark.parametrize("bad, shown", [("maybe", "'maybe'"), ("2", "'2'"), ("Auto", "'Auto'")])
def test_a_bad_value_names_the_key_and_the_allowed_values(bad, shown):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"model.channels_last={bad}"])
    assert str(err.value) == f"model.channels_last: {shown} is not one of [true, false, auto]"


def test_model_config_refuses_a_non_bool_in_python_too():
    with pytest.raises(ConfigError, match=r"^model\.channels_last: 1 is not one of \[true, false, auto\]$"):
        ModelConfig(channels_last=1)  # 1 == True, but not a bool


def test_build_models_applies_only_an_explicit_true():
    torch.manual_seed(0)
    assert is_channels_last(build_models(ModelConfig(width=0.25, channels_last=True), 6))
    assert not is_channels_last(build_models(ModelConfig(width=0.25, channels_last=False), 6))
    assert not is_channels_last(build_models(ModelConfig(width=0.25), 6))  # auto: the trainer's to resolve


# ----------------------------------------------------------------------------- the measurement
@pytest.fixture
def engine():
    """A real single-process Accelerate engine on the CPU (fp32); accelerate's process-wide state is reset after."""
    from accelerate.state import AcceleratorState

    from bicogan_dist.train.engine import AccelerateEngine

    eng = AccelerateEngine("no")
    yield eng
    AcceleratorState._reset_state(True)


def _no_autocast():
    import contextlib

    return contextlib.nullcontext()


def test_time_memory_formats_times_both_layouts_within_its_passes():
    t_c, t_cl, n = time_memory_formats(SMALL, 6, 8, torch.device("cpu"), _no_autocast, budget_s=60.0, repeats=3)
    assert isinstance(t_c, float) and isinstance(t_cl, float) and t_c > 0 and t_cl > 0
    assert n == 3  # the budget was not reached: every repeat ran
    _, _, n = time_memory_formats(SMALL, 6, 8, torch.device("cpu"), _no_autocast, budget_s=0.0, repeats=3)
    assert n == 1  # a spent budget still times each layout once


def test_auto_measures_on_this_rank_and_keeps_the_faster(engine):
    rng = torch.get_rng_state()
    choice = resolve_channels_last(engine, ModelConfig(width=0.25, z_dim=16), 6, 8)
    assert torch.equal(rng, torch.get_rng_state())  # throwaway copies under a forked RNG: the run's draws unchanged
    assert isinstance(choice.channels_last, bool) and choice.setting == "auto" and choice.reason == "measured"
    assert choice.ms_contiguous > 0 and choice.ms_channels_last > 0 and choice.timed >= 1
    assert choice.channels_last == (choice.ms_channels_last < choice.ms_contiguous)
    assert (choice.batch, choice.precision, choice.device) == (8, "no", "cpu")
    assert parse_memory_format_line("x\n" + choice.describe() + "\ny") == {
        "channels_last": choice.channels_last, "setting": "auto",
        "ms_contiguous": round(choice.ms_contiguous, 2), "ms_channels_last": round(choice.ms_channels_last, 2)}


@pytest.mark.parametrize("value", [True, False])
def test_explicit_values_skip_the_measurement(engine, value):
    # num_classes=0 cannot be built: a measurement would fail, so success shows that nothing was measured.
    choice = resolve_channels_last(engine, ModelConfig(width=0.25, channels_last=value), 0, 8)
    assert choice == MemoryFormatChoice(value, str(value).lower(), "as configured, not measured")
    assert choice.describe() == (f"memory format: channels_last={str(value).lower()} "
                                 f"(model.channels_last={str(value).lower()}; as configured, not measured)")
    assert parse_memory_format_line(choice.describe()) == {"channels_last": value, "setting": str(value).lower(),
                                                           "ms_contiguous": None, "ms_channels_last": None}
    with pytest.raises(RuntimeError, match=r"^model\.channels_last=auto: measuring the memory formats on rank 0 failed "
                                           r"\(ValueError: num_classes must be an integer >= 1, got 0\); set "
                                           r"model\.channels_last=true or false to skip the measurement$"):
        resolve_channels_last(engine, ModelConfig(width=0.25), 0, 8)


def test_the_deepspeed_engine_resolves_auto_to_false_without_measuring():
    from bicogan_dist.train.engine import AccelerateEngine
    from bicogan_dist.train.engine_deepspeed import DeepSpeedEngine

    assert AccelerateEngine.applies_channels_last is True and DeepSpeedEngine.applies_channels_last is False


# ----------------------------------------------------------------------------- in a real run
def test_auto_run_logs_its_choice_and_checkpoints_resume_and_export_under_either_layout(shards, tmp_path):  # noqa: F811
    """auto measures and logs; the run resumes under the other explicit layout (not measured); the export is
    contiguous and holds exactly the checkpoint's tensors."""
    from bicogan_dist.cli.export import main as convert_main
    from bicogan_dist.export import load_export

    run_dir = tmp_path / "run"
    proc = run(train_cmd(run_dir, shards, "train.max_steps=2", "model.channels_last=auto"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = parse_memory_format_line(proc.stdout)
    assert first is not None and first["setting"] == "auto", proc.stdout
    assert first["ms_contiguous"] > 0 and first["ms_channels_last"] > 0
    assert first["channels_last"] == (first["ms_channels_last"] < first["ms_contiguous"])
    assert "channels_last: auto" in (run_dir / "config.yaml").read_text()  # the setting, not the choice

    other = "false" if first["channels_last"] else "true"
    proc = run(train_cmd(run_dir, shards, "train.max_steps=4", f"model.channels_last={other}") + ["--resume", "latest"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting at step 2" in proc.stdout
    assert (f"memory format: channels_last={other} (model.channels_last={other}; as configured, not measured)"
            in proc.stdout)

    assert json.loads((run_dir / "checkpoints" / "checkpoint-00000004" / "state.json").read_text())[
        "channels_last"] == (other == "true")
    # auto on resume keeps the layout the checkpoint recorded: a new measurement could change the rounding.
    proc = run(train_cmd(run_dir, shards, "train.max_steps=6", "model.channels_last=auto") + ["--resume", "latest"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"memory format: channels_last={other} (model.channels_last=auto; the resumed checkpoint's layout, "
            f"not measured)" in proc.stdout)

    # Only the layout is exempt: another model key still refuses the resume.
    proc = run(train_cmd(run_dir, shards, "train.max_steps=8", "model.channels_last=true", "model.mbstd_group=0")
               + ["--resume", "latest"])
    assert proc.returncode != 0
    assert "model: the config's model section differs from the checkpoint's" in proc.stdout + proc.stderr

    out = tmp_path / "export"
    assert convert_main([str(run_dir), "--out", str(out)]) == 0
    model = load_export(out)
    assert not is_channels_last(model.G) and not is_channels_last(model.E)
    last = run_dir / "checkpoints" / "checkpoint-00000006"
    ema, ge = load_file(str(last / "ema.safetensors")), load_file(str(last / "ge.safetensors"))
    for key, value in model.G.state_dict().items():
        assert torch.equal(value, ema[key]), key
    for key, value in model.E.state_dict().items():
        assert torch.equal(value, ge[f"E.{key}"]), key
