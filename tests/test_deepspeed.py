"""The DeepSpeed ZeRO engine: the same trainer in real 2-process runs (accelerate launch, gloo), its
checkpoints, its consolidated export, its precision, and its messages.

DeepSpeed compiles a small communication op (deepspeed_shm_comm_op, ~45 s) the first time a
process group starts. Every launched run here sets TORCH_EXTENSIONS_DIR to ``<repo>/.torch_extensions``
(git-ignored), so a machine pays that once, not once per test; on CI, cache that folder between jobs
(e.g. actions/cache keyed on the deepspeed and torch versions) and the cost is paid once per version.
Tests that need DeepSpeed skip where it is not installed; the missing-DeepSpeed and config tests run
everywhere.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bicogan_dist.config import ConfigError
from bicogan_dist.train.engine_deepspeed import MISSING_DEEPSPEED, resolve_config

ROOT = Path(__file__).resolve().parents[1]
PROBE = ["-m", "bicogan_dist.cli.probe"]  # accelerate launch runs the module on every rank
SMOKE = ROOT / "launch_configs" / "experiments" / "smoke.yaml"
CPU_2PROC = ROOT / "launch_configs" / "accelerate" / "cpu_2proc.yaml"
DS_CONFIGS = ROOT / "launch_configs" / "deepspeed"
TORCH_EXTENSIONS = ROOT / ".torch_extensions"
TINY = ["model.width=0.25", "model.z_dim=16", "data.batch_size=16", "log.heldout_size=32", "log.progress=false"]

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed not installed (pip install -e .[deepspeed])")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCH_EXTENSIONS_DIR=str(TORCH_EXTENSIONS))
    e.pop("ACCELERATE_USE_CPU", None)
    return e


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def launch_probe(out: Path, shards: Path, run_dir: Path, *overrides: str, resume: bool = False) -> dict:
    """2 CPU processes through accelerate launch; returns the probe's per-rank results."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
           "--main_process_port", str(free_port()), *PROBE, str(out), "--config", str(SMOKE),
           f"data.shards={shards}", f"log.run_dir={run_dir}", *TINY, "train.engine=deepspeed", *overrides]
    proc = run(cmd)
    assert proc.returncode == 0, (proc.stdout[-2000:] + proc.stderr[-4000:])
    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    tensors = [load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1)]
    return {"infos": infos, "tensors": tensors, "output": proc.stdout + proc.stderr}


def assert_ranks_identical(tensors: list[dict[str, torch.Tensor]]) -> None:
    a, b = tensors
    assert a.keys() == b.keys() and any(k.startswith("d.") for k in a) and any(k.startswith("ge.E.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs between ranks"
        assert torch.isfinite(a[key].float()).all(), key


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from bicogan_dist.cli.shard import main as shard_main

    out = tmp_path_factory.mktemp("shards") / "synthetic"
    assert shard_main(["--synthetic", "900", "--out", str(out)]) in (0, None)
    return out


# -- the DeepSpeed JSON, without DeepSpeed ---------------------------------------------------------------------
def test_shipped_configs_resolve_with_auto_keys_filled():
    zero2 = resolve_config(DS_CONFIGS / "zero2.json", None, 16, grad_clip=0.0, launch_precision="no")
    assert zero2.zero_stage == 2 and zero2.precision == "no" and zero2.loss_scale is None
    ds = zero2.ds_config
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 0.0 and "torch_autocast" not in ds and "optimizer" not in ds
    assert resolve_config(DS_CONFIGS / "zero1.json", None, 8, 1.5).ds_config["gradient_clipping"] == 1.5
    assert resolve_config(DS_CONFIGS / "zero1.json", None, 8).zero_stage == 1

    bf16 = resolve_config(DS_CONFIGS / "zero2_bf16.json", None, 16)
    assert bf16.precision == "bf16" and bf16.ds_config["torch_autocast"] == {"enabled": True, "dtype": "torch.bfloat16"}
    # train.mixed_precision overrides the JSON; the accelerate launch config's precision applies when neither says.
    assert resolve_config(DS_CONFIGS / "zero2_bf16.json", "no", 16).precision == "no"
    assert "torch_autocast" not in resolve_config(DS_CONFIGS / "zero2_bf16.json", "no", 16).ds_config
    assert resolve_config(DS_CONFIGS / "zero2.json", None, 16, launch_precision="bf16").precision == "bf16"
    assert resolve_config(DS_CONFIGS / "zero2_bf16.json", None, 16, launch_precision="fp16").precision == "bf16"


def test_native_precision_sections_are_read_as_requests(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2},
                                "fp16": {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 50}}))
    fp16 = resolve_config(path, None, 4)
    assert fp16.precision == "fp16" and "fp16" not in fp16.ds_config
    assert fp16.ds_config["torch_autocast"]["dtype"] == "torch.float16"
    assert (fp16.loss_scale.initial, fp16.loss_scale.window, fp16.loss_scale.dynamic) == (256.0, 50, True)
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}))
    assert resolve_config(path, None, 4).precision == "bf16"
    assert resolve_config(path, "fp16", 4).loss_scale.initial == 2.0 ** 16


@pytest.mark.parametrize("config, kwargs, message", [
    ({"zero_optimization": {"stage": 3}}, {}, "zero_optimization.stage must be 1 or 2, got 3"),
    ({}, {}, "zero_optimization.stage must be 1 or 2, got 0"),
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}, {}, "remove the 'optimizer' section"),
    ({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}, {}, "remove the 'scheduler' section"),
    ({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4}, {}, "gradient_accumulation_steps must be 1"),
    ({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8}, {"micro_batch_size": 16},
     "train_micro_batch_size_per_gpu=8 differs from data.batch_size=16"),
    ({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}, {"grad_clip": 0.0},
     "gradient_clipping=1.0 differs from optim.grad_clip=0.0"),
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "fp16": {"enabled": True}}, {},
     "enable different precisions"),
])
def test_bad_deepspeed_config_names_the_key(tmp_path, config, kwargs, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    args = {"mixed_precision": None, "micro_batch_size": None, **kwargs}
    with pytest.raises(ConfigError, match="train.deepspeed_config") as info:
        resolve_config(path, **args)
    assert message in str(info.value)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(tmp_path / "nope.json", None, 4)
    (tmp_path / "bad.json").write_text("{stage: 2")
    with pytest.raises(ConfigError, match="not a readable JSON file"):
        resolve_config(tmp_path / "bad.json", None, 4)


def test_without_deepspeed_the_module_imports_and_the_engine_asks_for_it(shards, tmp_path):
    script = (
        "import sys; sys.modules['deepspeed'] = None\n"
        "import bicogan_dist.train.engine_deepspeed as m\n"
        "try:\n    m.consolidated_weights('.')\nexcept ImportError as e:\n    print('export:', e, file=sys.stderr)\n"
        "from bicogan_dist.cli.train import main\n"
        f"sys.exit(main(['--config', {str(SMOKE)!r}, 'data.shards={shards}', 'log.run_dir={tmp_path / 'run'}',"
        f" 'train.engine=deepspeed', 'train.deepspeed_config={DS_CONFIGS / 'zero2.json'}']))\n"
    )
    proc = run([sys.executable, "-c", script], timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: {MISSING_DEEPSPEED}" in proc.stderr
    assert f"export: {MISSING_DEEPSPEED}" in proc.stderr
    assert "Traceback" not in proc.stderr


@needs_deepspeed
def test_a_stale_build_lock_is_named_before_torch_waits_on_it(shards, tmp_path):
    """A first run killed while compiling DeepSpeed's comm op leaves torch's build lock behind, and every later
    run waited on it forever without a word (seen here after a killed test run). The trainer names the lock
    first. The run itself still waits (torch's wait has no timeout), so the test kills it after the warning."""
    import queue
    import threading
    import time

    lock = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    cmd = [sys.executable, "-m", "bicogan_dist.train", "--config", str(SMOKE), f"data.shards={shards}",
           f"log.run_dir={tmp_path / 'run'}", *TINY, "train.engine=deepspeed",
           f"train.deepspeed_config={DS_CONFIGS / 'zero2.json'}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(env(), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext")),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()  # read on a thread: without the warning the run prints nothing, ever
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                continue
            if seen[-1].startswith("warning: ") and str(lock) in seen[-1]:
                break
    finally:
        proc.kill()
        proc.wait()
    assert any(line.startswith(f"warning: {lock} is ") and "nothing was built beside it" in line
               and "if no other run is compiling, delete it" in line for line in seen), "".join(seen)[-3000:]


def test_fresh_or_built_locks_are_not_stale(tmp_path, monkeypatch):
    from bicogan_dist.train.engine_deepspeed import stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    compiling, built = tmp_path / "deepspeed_shm_comm", tmp_path / "py311_cpu" / "deepspeed_shm_comm"
    for folder in (compiling, built):
        folder.mkdir(parents=True)
        (folder / "lock").touch()
    assert stale_build_locks() == []  # a compile in progress (fresh lock) is not stale
    old = os.stat(compiling / "lock").st_mtime - 3600
    for folder in (compiling, built):
        os.utime(folder / "lock", (old, old))
    (built / "deepspeed_shm_comm.so").touch()
    [(lock, age)] = stale_build_locks()  # an old lock beside a built op is not stale either
    assert lock == compiling / "lock" and 3600 <= age < 3700


def test_checkpoint_reads_refuse_foreign_objects(tmp_path):
    from bicogan_dist.train.checkpoint import CheckpointError
    from bicogan_dist.train.engine_deepspeed import safe_torch_load

    torch.save({"module": {"w": torch.ones(2)}, "trap": CheckpointError("not a tensor")}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        safe_torch_load(tmp_path / "evil.pt")
    torch.save({"module": {"w": torch.ones(2)}, "shapes": [torch.Size([2])]}, tmp_path / "ok.pt")
    assert torch.equal(safe_torch_load(tmp_path / "ok.pt")["module"]["w"], torch.ones(2))


# -- real 2-process runs ---------------------------------------------------------------------------------------
def consolidated_matches_live_model(run: dict, shards: Path, overrides: list[str]) -> None:
    """consolidated_weights → fresh GeneratorEncoder → G(z, c) equals the live engine's G on the same inputs."""
    from bicogan_dist.models.networks import build_models
    from bicogan_dist.train.config import load_config
    from bicogan_dist.train.engine_base import GeneratorEncoder
    from bicogan_dist.train.engine_deepspeed import consolidated_weights

    info, live = run["infos"][0], run["tensors"][0]
    weights = consolidated_weights(info["last_checkpoint"])
    assert set(weights) == {"ge", "d"}
    for unit in ("ge", "d"):
        # The fp32 masters ZeRO wrote equal what each rank's module held (the module is fp32 here).
        assert weights[unit].keys() == {k[len(unit) + 1:] for k in live if k.startswith(unit + ".")}
        for key, value in weights[unit].items():
            assert torch.equal(value, live[f"{unit}.{key}"]), f"{unit}.{key}"
    cfg = load_config(SMOKE, [f"data.shards={shards}", *TINY, *overrides])
    state = json.loads((Path(info["last_checkpoint"]) / "state.json").read_text())
    models = build_models(cfg.model, len(state["label_names"]))
    ge = GeneratorEncoder(models.G, models.E)
    ge.load_state_dict(weights["ge"])
    ge.eval()
    with torch.no_grad():
        out = ge.G(live["probe.z"], live.get("probe.c"))
    assert torch.allclose(out, live["probe.G_out"], atol=1e-6, rtol=0)


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_zero_two_processes_stay_in_sync_and_export_reproduces_g(shards, tmp_path, stage):
    overrides = [f"train.deepspeed_config={DS_CONFIGS / f'zero{stage}.json'}", "train.max_steps=4", "log.log_every=2",
                 "log.checkpoint_every=100", "model.channels_last=auto"]
    result = launch_probe(tmp_path / "probe", shards, tmp_path / "run", *overrides)
    infos = result["infos"]
    assert [i["world_size"] for i in infos] == [2, 2] and [i["rank"] for i in infos] == [0, 1]
    # ZeRO keeps weights contiguous: auto resolves to false there without measuring.
    assert ("memory format: channels_last=false (model.channels_last=auto; the deepspeed engine keeps weights "
            "contiguous, not measured)") in result["output"]
    assert [i["channels_last"] for i in infos] == [False, False]
    assert {i["backend"] for i in infos} == {"gloo"}
    assert {i["engine"] for i in infos} == {"deepspeed"} and {i["zero_stage"] for i in infos} == {stage}
    # The DeepSpeed micro batch is data.batch_size once make_engine passes it (micro_batch_size=cfg.data.batch_size);
    # until then the engine fills "auto" with 1, which only DeepSpeed's own throughput counters read.
    assert {i["micro_batch"] for i in infos} == {16}
    assert {tuple(i["param_dtypes"]) for i in infos} == {("torch.float32",)}
    assert_ranks_identical(result["tensors"])
    assert "precision no" in result["output"]

    ckpt = Path(infos[0]["last_checkpoint"])
    state = json.loads((ckpt / "state.json").read_text())
    assert state["engine"] == "deepspeed" and state["step"] == 4 and state["world_size"] == 2
    for unit in ("ge", "d"):  # DeepSpeed's own layout: one model-states file, one optimizer partition per rank
        names = sorted(p.name for p in (ckpt / unit).iterdir())
        assert names == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                         "zero_pp_rank_1_mp_rank_00_optim_states.pt"], names
    consolidated_matches_live_model(result, shards, overrides)

    # The export path reads this checkpoint like a DDP one.
    from bicogan_dist.train.checkpoint import weights as checkpoint_weights

    exported = checkpoint_weights(ckpt)
    for key, value in exported["ge"].items():
        assert torch.equal(value, result["tensors"][0][f"ge.{key}"]), key


def zero_files(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the per-rank ZeRO optimizer files: fp32 master partitions and Adam moments/steps."""
    from bicogan_dist.train.engine_deepspeed import safe_torch_load

    out = {}
    for path in sorted(ckpt.glob("*/zero_pp_rank_*_optim_states.pt")):
        osd = safe_torch_load(path)["optimizer_state_dict"]
        tag = f"{path.parent.name}/{path.name}"
        for i, part in enumerate(osd["single_partition_of_fp32_groups"]):
            out[f"{tag}/fp32[{i}]"] = part
        for pid, st in osd["base_optimizer_state"]["state"].items():
            for k, v in st.items():
                out[f"{tag}/adam[{pid}].{k}"] = torch.as_tensor(v)
    return out


@needs_deepspeed
@pytest.mark.slow
def test_resume_equals_straight_run(shards, tmp_path):
    common = [f"train.deepspeed_config={DS_CONFIGS / 'zero2.json'}", "log.checkpoint_every=100",
              "augment.ops=[affine_rotate]"]
    straight = launch_probe(tmp_path / "p_straight", shards, tmp_path / "straight", "train.max_steps=6", *common)
    launch_probe(tmp_path / "p_first", shards, tmp_path / "split", "train.max_steps=3", *common)
    # The probe passes no --resume; the trainer's CLI does. Resume through the CLI under accelerate launch.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC), "--main_process_port",
           str(free_port()), "-m", "bicogan_dist.train", "--config", str(SMOKE), f"data.shards={shards}",
           f"log.run_dir={tmp_path / 'split'}", *TINY, "train.engine=deepspeed", "train.max_steps=6", *common,
           "--resume", "latest"]
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "starting at step 3" in proc.stdout + proc.stderr

    from bicogan_dist.train.engine_deepspeed import consolidated_weights

    a_dir = tmp_path / "straight" / "checkpoints" / "checkpoint-00000006"
    b_dir = tmp_path / "split" / "checkpoints" / "checkpoint-00000006"
    a, b = consolidated_weights(a_dir), consolidated_weights(b_dir)
    a["ema"], b["ema"] = load_file(str(a_dir / "ema.safetensors")), load_file(str(b_dir / "ema.safetensors"))
    for unit in a:
        assert a[unit].keys() == b[unit].keys()
        for key in a[unit]:
            assert torch.allclose(a[unit][key].float(), b[unit][key].float(), atol=1e-6, rtol=0), f"{unit}.{key}"
    za, zb = zero_files(a_dir), zero_files(b_dir)
    assert za.keys() == zb.keys() and len(za) > 4
    for key in za:
        assert torch.allclose(za[key].float(), zb[key].float(), atol=1e-6, rtol=0), key
    assert all(int(v) == 6 for k, v in za.items() if k.endswith(".step"))
    # and what the straight run's ranks held at the end is what the resumed checkpoint holds
    for key, value in straight["tensors"][0].items():
        if key.startswith("ge."):
            assert torch.allclose(value.float(), b["ge"][key[3:]].float(), atol=1e-6, rtol=0), key


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_stays_finite_and_in_sync(shards, tmp_path, precision):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    result = launch_probe(tmp_path / "probe", shards, run_dir, f"train.deepspeed_config={DS_CONFIGS / 'zero2.json'}",
                          "train.max_steps=6", "log.log_every=1", f"train.mixed_precision={precision}")
    assert f"precision {precision}" in result["output"]
    infos = result["infos"]
    assert {i["precision"] for i in infos} == {precision}
    assert {tuple(i["param_dtypes"]) for i in infos} == {("torch.float32",)}  # fp32 weights, autocast compute
    assert_ranks_identical(result["tensors"])
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    assert len(scalars["loss/d"]) == 6
    for tag, values in scalars.items():
        values = torch.tensor(values)
        if tag.startswith("grad_norm/") and precision == "fp16":
            # fp16: a step skipped on overflow reports inf (never NaN); the scale comes down until steps go through.
            assert not values.isnan().any() and torch.isfinite(values).any(), (tag, values)
        else:
            assert torch.isfinite(values).all(), (tag, values)
    if precision == "fp16":  # each unit has its own scale, the same on both ranks
        assert infos[0]["loss_scale"] == infos[1]["loss_scale"]
        assert all(1 <= s <= 2.0 ** 16 for s in infos[0]["loss_scale"].values())
        skipped = sum(v == float("inf") for v in scalars["grad_norm/ge"])
        assert infos[0]["loss_scale"]["ge"] == 2.0 ** 16 / 2 ** skipped  # halved once per skipped step
    else:
        assert infos[0]["loss_scale"] == {"ge": None, "d": None}


@needs_deepspeed
@pytest.mark.slow
def test_wgan_clipping_reaches_zero_master_weights(shards, tmp_path):
    from bicogan_dist.train.engine_deepspeed import consolidated_weights

    result = launch_probe(tmp_path / "probe", shards, tmp_path / "run", "model.kind=gan", "loss.loss=wgan",
                          "loss.clip_value=0.01", f"train.deepspeed_config={DS_CONFIGS / 'zero2.json'}",
                          "train.max_steps=3")
    d = consolidated_weights(result["infos"][0]["last_checkpoint"])["d"]
    params = [v for k, v in d.items() if not k.endswith(("_u", "_v"))]
    assert params and max(float(v.abs().max()) for v in params) <= 0.01 + 1e-7
