"""Checkpoint → export: bit-exact round trip, ONNX parity, no pickle, atomic and refusing writes, clear errors.

Checkpoints are written in the trainer's exact layout (GeneratorEncoder state in
ge.safetensors, D in d.safetensors, EMA of G in ema.safetensors, state.json committed
through ``checkpoint.commit``), with EMA weights that differ from G's so the tests see
which ones were exported. Slow tests convert checkpoints of real 2-step runs (DDP and DeepSpeed).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bicogan_dist.config import from_dict, to_dict
from bicogan_dist.cli.export import main as convert_main
from bicogan_dist.export import ExportError, load_export
from bicogan_dist.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["angry", "fear", "happy", "sad", "surprise", "neutral"]
Z_DIM = 16


def tiny_config(kind: str, **model):
    from bicogan_dist.models.networks import ModelConfig

    return from_dict(ModelConfig, {"kind": kind, "z_dim": Z_DIM, "width": 0.25, **model})


def make_checkpoint(run_dir: Path, kind: str, step: int = 2, engine: str = "ddp", seed: int = 0, **model) -> dict:
    """A checkpoint folder in the trainer's layout; returns it and the reference modules (EMA G, E) in eval mode.

    ``model``: ModelConfig keys besides the kind (the tiny width and z_dim are fixed)."""
    from bicogan_dist.models.networks import build_models
    from bicogan_dist.train.engine import GeneratorEncoder

    cfg = tiny_config(kind, **model)
    torch.manual_seed(seed)
    models = build_models(cfg, len(CLASS_NAMES))
    # One train-mode forward moves BatchNorm running statistics away from their defaults.
    gen = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(8, Z_DIM, generator=gen)
    c = torch.arange(8) % len(CLASS_NAMES) if cfg.conditional else None
    with torch.no_grad():
        models.G.train()(z, c)
        if models.E is not None:
            models.E.train()(torch.rand(8, 1, 48, 48, generator=gen) * 2 - 1)
    ema = copy.deepcopy(models.G)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    tmp = ckpt.begin(run_dir, step)
    tmp.mkdir(parents=True)
    ge = GeneratorEncoder(models.G, models.E)
    save_file({k: v.contiguous() for k, v in ge.state_dict().items()}, str(tmp / "ge.safetensors"))
    save_file({k: v.contiguous() for k, v in models.D.state_dict().items()}, str(tmp / "d.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
    folder = ckpt.commit(tmp, {"step": step, "epoch": step / 10, "batches_per_epoch": 10, "world_size": 1,
                               "engine": engine, "model": to_dict(cfg), "label_names": CLASS_NAMES}, keep=3)
    E = models.E.eval() if models.E is not None else None
    return {"folder": folder, "cfg": cfg, "G_ema": ema.eval(), "G_raw": models.G.eval(), "E": E}


def fixed_inputs(n: int = 5, conditional: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    z = torch.randn(n, Z_DIM, generator=torch.Generator().manual_seed(123))
    return z, (torch.arange(n) % len(CLASS_NAMES) if conditional else None)


@pytest.fixture(scope="module")
def bicogan(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bicogan")
    ref = make_checkpoint(root / "run", "bicogan")
    out = root / "export"
    assert convert_main([str(root / "run"), "--out", str(out), "--onnx"]) == 0
    return {**ref, "export": out, "root": root}


@pytest.fixture(scope="module")
def gan(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gan")
    ref = make_checkpoint(root / "run", "gan")
    out = root / "export"
    assert convert_main([str(ref["folder"]), "--out", str(out), "--onnx"]) == 0
    return {**ref, "export": out, "root": root}


def test_round_trip_is_bit_exact_and_uses_ema(bicogan):
    model = load_export(bicogan["export"])
    z, c = fixed_inputs()
    with torch.inference_mode():
        x_ref = bicogan["G_ema"](z, c)
        x = model.G(z, c)
        assert torch.equal(x, x_ref)
        assert not torch.equal(x, bicogan["G_raw"](z, c)), "exported the raw G instead of its EMA"
        for a, b in zip(model.E(x_ref), bicogan["E"](x_ref)):
            assert torch.equal(a, b)
    assert not model.G.training and not model.E.training
    assert not any(p.requires_grad for p in [*model.G.parameters(), *model.E.parameters()])
    assert model.class_names == CLASS_NAMES and model.z_dim == Z_DIM and model.conditional and model.bidirectional


@pytest.mark.parametrize("e_emotion", ["shared", "branch"])
def test_round_trip_keeps_either_emotion_path_of_the_encoder(e_emotion, tmp_path):
    ref = make_checkpoint(tmp_path / "run", "bicogan", e_emotion=e_emotion)
    assert convert_main([str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    model = load_export(tmp_path / "export")
    assert (model.E.emotion is not None) == (e_emotion == "branch")
    x = torch.rand(5, 1, 48, 48, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with torch.inference_mode():
        for a, b in zip(model.E(x), ref["E"](x)):
            assert torch.equal(a, b)
    if e_emotion == "branch":  # the branch's running statistics travel too (a train-mode forward moved them)
        bn = model.E.emotion[1]
        assert isinstance(bn, torch.nn.BatchNorm2d) and torch.equal(bn.running_mean, ref["E"].emotion[1].running_mean)
        assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))


def test_exports_and_checkpoints_written_before_the_emotion_branch_load_as_shared(tmp_path):
    """Their model sections have no ``e_emotion``: they built the shared head, whatever today's default is."""
    ref = make_checkpoint(tmp_path / "run", "bicogan", e_emotion="shared")
    state_path = ref["folder"] / "state.json"
    state = json.loads(state_path.read_text())
    del state["model"]["e_emotion"]
    state_path.write_text(json.dumps(state))
    assert convert_main([str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    meta_path = tmp_path / "export" / "export.json"
    meta = json.loads(meta_path.read_text())
    assert meta["model"]["e_emotion"] == "shared"  # the export states what it holds
    del meta["model"]["e_emotion"]
    meta_path.write_text(json.dumps(meta))
    model = load_export(tmp_path / "export")
    assert model.model.e_emotion == "shared" and model.E.emotion is None
    x = torch.rand(3, 1, 48, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.inference_mode():
        for a, b in zip(model.E(x), ref["E"](x)):
            assert torch.equal(a, b)


def test_export_json_describes_the_model(bicogan):
    from bicogan_dist.models.networks import describe

    meta = json.loads((bicogan["export"] / "export.json").read_text())
    assert meta["format"] == "bicogan_dist.export" and meta["version"] == 1
    assert meta["model"] == to_dict(bicogan["cfg"])
    assert meta["architecture"] == json.loads(json.dumps(describe(bicogan["cfg"], 6), default=str))
    assert meta["num_classes"] == 6 and meta["class_names"] == CLASS_NAMES and meta["z_dim"] == Z_DIM
    assert meta["image_size"] == 48 and meta["channels"] == 1 and meta["pixel_range"] == [-1, 1]
    assert meta["pixel_to_uint8"] == "round((x + 1) * 127.5)"
    assert meta["source"]["checkpoint"] == str(bicogan["folder"].resolve())
    assert meta["source"]["step"] == 2 and meta["source"]["engine"] == "ddp"
    assert meta["onnx"]["opset"] >= 17


def test_export_holds_no_pickle(bicogan, gan):
    from safetensors import safe_open

    assert sorted(p.name for p in bicogan["export"].iterdir()) == [
        "encoder.safetensors", "export.json", "generator.onnx", "generator.safetensors"]
    assert sorted(p.name for p in gan["export"].iterdir()) == ["export.json", "generator.onnx", "generator.safetensors"]
    for path in [*bicogan["export"].iterdir(), *gan["export"].iterdir()]:
        data = path.read_bytes()
        assert not data.startswith(b"PK"), f"{path} is a zip (torch.save) archive"
        if path.suffix == ".safetensors":  # u64 header length, then a JSON header: nothing else
            n = int.from_bytes(data[:8], "little")
            assert isinstance(json.loads(data[8:8 + n]), dict)
            with safe_open(str(path), "pt") as fh:
                assert fh.metadata()["format"] == "bicogan_dist.export"
        elif path.suffix == ".json":
            json.loads(data)
        else:
            import onnx

            assert path.suffix == ".onnx"
            onnx.checker.check_model(onnx.load_from_string(data))
    assert not list(bicogan["root"].glob("export.*")), "temporary folders left behind"


@pytest.mark.parametrize("which", ["bicogan", "gan"])
def test_onnx_matches_torch_for_several_batch_sizes(which, bicogan, gan):
    import onnx
    import onnxruntime as ort

    ref = {"bicogan": bicogan, "gan": gan}[which]
    path = ref["export"] / "generator.onnx"
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    conditional = ref["cfg"].conditional
    inputs = {i.name: i.type for i in sess.get_inputs()}
    assert inputs == ({"z": "tensor(float)", "c": "tensor(int64)"} if conditional else {"z": "tensor(float)"})
    for b in (1, 4, 13):
        z, c = fixed_inputs(b, conditional)
        feeds = {"z": z.numpy(), **({"c": c.numpy()} if conditional else {})}
        out = sess.run(None, feeds)[0]
        with torch.inference_mode():
            expected = ref["G_ema"](z, c).numpy()
        assert out.shape == (b, 1, 48, 48)
        assert abs(out - expected).max() < 1e-4


def test_unconditional_export_has_no_encoder(gan):
    model = load_export(gan["export"])
    assert model.E is None and not model.conditional
    z, _ = fixed_inputs()
    with torch.inference_mode():
        assert torch.equal(model.G(z, None), gan["G_ema"](z, None))
    meta = json.loads((gan["export"] / "export.json").read_text())
    assert "encoder" not in meta["files"]


def test_refuses_to_overwrite_without_force(bicogan, tmp_path, capsys):
    out = tmp_path / "export"
    shutil.copytree(bicogan["export"], out)
    before = (out / "generator.safetensors").read_bytes()
    capsys.readouterr()
    assert convert_main([str(bicogan["root"] / "run"), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "generator.safetensors").read_bytes() == before
    assert convert_main([str(bicogan["root"] / "run"), "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["encoder.safetensors", "export.json", "generator.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    assert convert_main([str(bicogan["root"] / "run"), "--out", str(foreign), "--force"]) == 2
    assert f"error: {foreign} is not empty and holds files this tool did not write (todo.txt)" in \
        capsys.readouterr().err
    assert (foreign / "todo.txt").read_text() == "mine"


def test_failed_export_leaves_no_folder_it_made(tmp_path, capsys):
    """A bad source with a new, nested --out: no temporary folder and none of the parents it created remain."""
    out = tmp_path / "new" / "deeper" / "export"
    assert convert_main([str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'missing'} does not exist")
    assert list(tmp_path.iterdir()) == []


def test_run_folder_takes_newest_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run, "cgan", step=2, seed=0)
    newest = make_checkpoint(run, "cgan", step=4, seed=1)
    (ckpt.checkpoint_root(run) / "checkpoint-00000006.tmp").mkdir()  # an interrupted write
    assert convert_main([str(run), "--out", str(tmp_path / "export")]) == 0
    meta = json.loads((tmp_path / "export" / "export.json").read_text())
    assert meta["source"]["step"] == 4 and meta["source"]["checkpoint"] == str(newest["folder"].resolve())


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert_main([str(empty), "--out", str(tmp_path / "e1")]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    assert convert_main([str(tmp_path / "missing"), "--out", str(tmp_path / "e2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "e1").exists() and not (tmp_path / "e2").exists()


def test_mismatched_weights_fail_and_write_nothing(tmp_path, capsys):
    ref = make_checkpoint(tmp_path / "run", "bicogan")
    save_file({"bogus": torch.zeros(3)}, str(ref["folder"] / "ema.safetensors"))
    assert convert_main([str(ref["folder"]), "--out", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err
    assert "ema.safetensors" in err and "missing" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_broken_deepspeed_checkpoint_gives_a_clear_error(tmp_path, capsys):
    """state.json says deepspeed but the DeepSpeed tag folders are missing (or DeepSpeed is not installed)."""
    ref = make_checkpoint(tmp_path / "run", "bicogan", engine="deepspeed")
    assert convert_main([str(ref["folder"]), "--out", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "DeepSpeed" in err
    assert not (tmp_path / "export").exists()


def test_load_export_errors_name_the_file(bicogan, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(ExportError, match="export.json is missing"):
        load_export(broken)
    for name in ("generator.safetensors", "encoder.safetensors"):
        (broken / name).write_bytes((bicogan["export"] / name).read_bytes())
    meta = json.loads((bicogan["export"] / "export.json").read_text())
    (broken / "export.json").write_text(json.dumps({**meta, "format": "something.else"}))
    with pytest.raises(ExportError, match=r"export\.json: format is 'something.else'"):
        load_export(broken)
    (broken / "export.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ExportError, match=r"export\.json: export version 99"):
        load_export(broken)
    (broken / "export.json").write_text("{not json")
    with pytest.raises(ExportError, match=r"export\.json: not valid JSON"):
        load_export(broken)
    (broken / "export.json").write_text(json.dumps(meta))
    (broken / "encoder.safetensors").unlink()
    with pytest.raises(ExportError, match=r"encoder\.safetensors is missing"):
        load_export(broken)
    (broken / "encoder.safetensors").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ExportError, match=r"encoder\.safetensors: not a readable safetensors file"):
        load_export(broken)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_export_of_a_real_two_step_run(engine, tmp_path):
    """The real trainer (2 steps, tiny nets, either engine) → convert → the export reproduces the EMA G and E."""
    from safetensors.torch import load_file

    from bicogan_dist.cli.shard import main as shard_main
    from bicogan_dist.models.networks import build_models

    engine_args = []
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
        engine_args = ["train.engine=deepspeed",
                       f"train.deepspeed_config={ROOT / 'launch_configs/deepspeed/zero2.json'}"]

    shards = tmp_path / "shards"
    assert shard_main(["--synthetic", "600", "--out", str(shards), "--no-progress"]) in (0, None)
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("ACCELERATE_USE_CPU", None)
    proc = subprocess.run(
        [sys.executable, "-m", "bicogan_dist.train", "--config", str(ROOT / "launch_configs/experiments/smoke.yaml"),
         f"data.shards={shards}", f"log.run_dir={run}", "train.max_steps=2", "model.width=0.25",
         f"model.z_dim={Z_DIM}", "data.batch_size=16", "log.heldout_size=16", "log.progress=false", *engine_args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, str(ROOT / "tools/convert_checkpoint.py"), str(run), "--out", str(out),
                           "--onnx"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = ckpt.list_checkpoints(run)[-1]
    state = ckpt.read_state(folder)
    model = load_export(out)
    ref = build_models(model.model, len(state["label_names"]))
    ref.G.load_state_dict(load_file(str(folder / "ema.safetensors")))
    assert state["engine"] == engine
    if engine == "ddp":
        ge = load_file(str(folder / "ge.safetensors"))
    else:
        from bicogan_dist.train.engine_deepspeed import consolidated_weights

        ge = consolidated_weights(folder)["ge"]
    ref.E.load_state_dict({k[2:]: v for k, v in ge.items() if k.startswith("E.")})
    ref.eval()
    z, c = fixed_inputs(6, True)
    with torch.inference_mode():
        x = ref.G(z, c)
        assert torch.equal(model.G(z, c), x)
        for a, b in zip(model.E(x), ref.E(x)):
            assert torch.equal(a, b)
    assert model.class_names == state["label_names"]
