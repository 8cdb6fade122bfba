"""The prepared GPU check (``tools/check_gpu.py``): one command that shows, in under 10 minutes on one GPU,
that the whole system works there and how fast it is.

It lies downstream of everything (it launches the trainer, reads its TensorBoard events and
checkpoints, builds loaders), so it lives in ``evaluate/``. Each step runs in a subprocess with
its own timeout (the real ``accelerate launch`` for training runs), inside one overall time
budget; a step that fails is recorded as FAIL with its first error line and the check goes on
with the next one. While steps run, a background thread samples ``nvidia-smi`` (memory used,
utilisation) so each row carries the GPU's peak memory and utilisation during that step.

Steps (row ids in the report):

- ``install``: the packages import (else ``pip install -e .[deepspeed]``); versions, the GPU.
- ``shard_synthetic`` / ``shard_fer2013``: the shard tool on the built-in synthetic set, and on
  FER2013 when ``../shared/fer2013/fer2013.csv.gz`` exists (SKIP otherwise, and in a dry run).
- ``train_bf16``: ``accelerate launch --config_file launch_configs/accelerate/1gpu.yaml -m
  bicogan_dist.train`` in bf16 with augmentation, sample grids and checkpoints (all checked on disk).
- ``resume_bf16``: the same run again with ``--resume latest`` and a larger ``train.max_steps``;
  it must continue from the saved step and end at the new one.
- ``train_fp16`` / ``train_fp32``: the other precisions.
- ``throughput_<arch>_b<batch>``: the trainer's logged images/s (median, warm-up interval left
  out) for arch ours and paper at two batch sizes in bf16 (the measurement of
  ``tools/bench_train.py``: the real trainer, ``perf/images_per_s`` from TensorBoard), and the
  memory format ``model.channels_last=auto`` chose at start with both of its timings.
- ``compile``: ``train.compile=true`` against the same run without it.
- ``loader``: samples/s of the loaders the trainer uses (``build_loader`` + ``build_augmenter``,
  as ``tools/bench_data.py`` measures them), memory and stream, with and without augmentation,
  batches delivered on the GPU.
- ``deepspeed_zero2_bf16``: the DeepSpeed engine with ``launch_configs/deepspeed/zero2_bf16.json``.
- ``cpu_config``: a rank under ``launch_configs/accelerate/cpu_2proc.yaml`` sees no CUDA device
  and world size 2, even on this GPU machine.

``dry_run=True`` runs the same steps on the CPU with tiny sizes (GPUs hidden from every child),
which is what the test suite exercises.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from bicogan_dist.evaluate.quality import free_port, images_per_second

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch_configs" / "accelerate"
EXPERIMENT = ROOT / "launch_configs" / "experiments" / "quickstart.yaml"
#: Arch paper runs as published (its own batch norm, bce, no mbstd), like tools/bench_train.py's paper rows.
PAPER_EXPERIMENT = ROOT / "launch_configs" / "experiments" / "bicogan_paper.yaml"
ZERO2_BF16 = ROOT / "launch_configs" / "deepspeed" / "zero2_bf16.json"
REAL_FER2013 = ROOT.parent / "shared" / "fer2013" / "fer2013.csv.gz"
#: Targets printed beside the numbers (not pass/fail: a slower GPU still passes the check).
TARGET_IMAGES_PER_S = 20_000  # arch ours, width 1, bf16, at its best batch
TARGET_LOADER_RATIO = 10.0  # loader (memory mode, with augmentation) over the training rate
#: Packages the check needs; a missing one triggers ``pip install -e .[deepspeed]``.
REQUIRED = ("torch", "accelerate", "webdataset", "safetensors", "tensorboard", "yaml", "deepspeed")


@dataclass(frozen=True)
class Sizes:
    """How big each step is: ``GPU_SIZES`` fits one H200 in under 10 minutes, ``DRY_SIZES`` two CPU cores."""

    device: str  # what the children may use: "cuda" or "cpu" (GPUs hidden)
    synthetic: int  # faces in the synthetic shard set
    batch: int  # correctness runs (bf16 / resume / fp16 / fp32 / deepspeed)
    steps: int  # steps of the first bf16 run (checkpoint and grid at steps // 2 and steps)
    more_steps: int  # steps the resumed run adds; also the fp16 / fp32 / deepspeed runs' length
    width: float  # model.width of arch ours
    z_dim: int
    throughput_batches: tuple[int, ...]
    throughput_steps: dict[str, int]  # per arch
    throughput_log_every: dict[str, int]
    loader_batch: int
    loader_seconds: float  # measuring time per loader cell
    loader_workers: int
    budget_s: float | None  # the whole check; None = no overall limit
    timeouts: dict[str, float] = field(default_factory=dict)


GPU_SIZES = Sizes(
    device="cuda", synthetic=24_000, batch=256, steps=200, more_steps=100, width=1.0, z_dim=100,
    throughput_batches=(1024, 4096), throughput_steps={"ours": 80, "paper": 30},
    throughput_log_every={"ours": 20, "paper": 10}, loader_batch=1024, loader_seconds=4.0, loader_workers=4,
    budget_s=540.0,  # + up to 40 s to stop a step that overran: under 10 minutes in all
    timeouts={"install": 240, "shard_synthetic": 90, "shard_fer2013": 90, "train": 120, "throughput": 90,
              "compile": 180, "loader": 90, "deepspeed": 180, "cpu_config": 90},
)
DRY_SIZES = Sizes(
    device="cpu", synthetic=600, batch=16, steps=4, more_steps=2, width=0.25, z_dim=32,
    throughput_batches=(16, 32), throughput_steps={"ours": 6, "paper": 4},
    throughput_log_every={"ours": 2, "paper": 2}, loader_batch=32, loader_seconds=1.0, loader_workers=1,
    budget_s=None,
    timeouts={"install": 240, "shard_synthetic": 180, "shard_fer2013": 180, "train": 300, "throughput": 300,
              "compile": 600, "loader": 300, "deepspeed": 600, "cpu_config": 300},
)


class StepError(RuntimeError):
    """A step that failed; the message's first line is what the table shows."""


class StepSkipped(RuntimeError):
    """A step that does not apply here (no FER2013 file, a dry run); recorded as SKIP, not a failure."""


@dataclass
class Row:
    """One step's result: OK / FAIL / SKIP, its numbers, a one-line summary, seconds and the GPU's load."""

    name: str
    status: str
    summary: str
    seconds: float
    numbers: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    gpu_peak_mib: float | None = None
    gpu_util_mean: float | None = None
    gpu_util_max: float | None = None


@dataclass
class CheckResult:
    """Everything the check learnt: rows in order, environment, targets; ``ok`` when no row failed."""

    dry_run: bool
    out_dir: Path
    rows: list[Row]
    environment: dict[str, Any]
    targets: dict[str, Any]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(r.status != "FAIL" for r in self.rows)


# ------------------------------------------------------------------------------------------ GPU sampling


class GpuSampler:
    """Samples ``nvidia-smi`` (memory used, utilisation; the max over GPUs) every ``every`` seconds in a thread.

    ``window()`` starts a new per-step window; ``read()`` gives its peak memory and mean / max
    utilisation. Without ``nvidia-smi`` (a CPU machine, a dry run) it samples nothing and reads None.
    """

    def __init__(self, every: float = 0.25, enabled: bool = True) -> None:
        self.every = every
        self.exe = shutil.which("nvidia-smi") if enabled else None
        self._lock = threading.Lock()
        self._mem: list[float] = []
        self._util: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self.exe is not None

    def start(self) -> "GpuSampler":
        if self.exe and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="nvidia-smi-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            sample = self.sample()
            if sample is not None:
                with self._lock:
                    self._mem.append(sample[0])
                    self._util.append(sample[1])
            self._stop.wait(self.every)

    def sample(self) -> tuple[float, float] | None:
        """(MiB used, utilisation %) now, the max over GPUs; None when nvidia-smi cannot say."""
        if not self.exe:
            return None
        try:
            out = subprocess.run([self.exe, "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            pairs = [tuple(float(v) for v in line.split(",")[:2]) for line in out.strip().splitlines() if "," in line]
        except (OSError, subprocess.SubprocessError, ValueError):
            return None
        if not pairs:
            return None
        return max(p[0] for p in pairs), max(p[1] for p in pairs)

    def window(self) -> None:
        with self._lock:
            self._mem.clear()
            self._util.clear()

    def read(self) -> tuple[float | None, float | None, float | None]:
        with self._lock:
            if not self._mem:
                return None, None, None
            return max(self._mem), statistics.fmean(self._util), max(self._util)


# ------------------------------------------------------------------------------------------ subprocesses


def first_error_line(text: str) -> str:
    """The line a person should read first: the trainer's ``error:`` line, else the first exception line, else the
    last non-empty line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("error:"):
            return ln
    for ln in lines:  # the first exception: the rank's own, before the launcher's CalledProcessError
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b:", ln) and not ln.startswith("RuntimeError: Traceback"):
            return ln
    return lines[-1] if lines else "(no output)"


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the step's process group (ranks save and exit), SIGKILL after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class Context:
    """What steps share: sizes, folders, the children's environment, and results later steps use."""

    def __init__(self, sizes: Sizes, out_dir: Path, dry_run: bool) -> None:
        self.sizes = sizes
        self.dry_run = dry_run
        self.out_dir = out_dir
        self.work = out_dir / "work"
        self.logs = out_dir / "logs"
        self.shards = self.work / "synthetic"
        self.results: dict[str, dict[str, Any]] = {}
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # The repo first on the path: children import this checkout, whatever is installed.
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))  # DeepSpeed's op, compiled once
        if sizes.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # a dry run stays on the CPU on a GPU machine too
            env.setdefault("OMP_NUM_THREADS", "1")
        self.env = env

    def run(self, name: str, cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
        """Run ``cmd`` from the repo root with a log in ``logs/<name>.log``; its output, or StepError naming the
        first error line (and the timeout)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        with open(log, "a") as fh:
            fh.write("$ " + shlex.join(cmd) + "\n")
            fh.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)  # the launcher and its ranks: nothing of this step may run into the next
                raise StepError(f"timed out after {timeout:.0f} s (log {log})") from None
        text = log.read_text(errors="replace")
        if rc != 0:
            raise StepError(f"{first_error_line(text)} (exit {rc}; log {log})")
        return text

    def launch(self, config: str = "1gpu.yaml") -> list[str]:
        """The real launcher with one of ``launch_configs/accelerate``."""
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / config),
                "--main_process_port", str(free_port())]

    def train(self, name: str, timeout: float, *, run_dir: Path | None = None, resume: bool = False,
              arch: str = "ours", batch: int | None = None, steps: int | None = None, precision: str = "bf16",
              extra: tuple[str, ...] = ()) -> tuple[Path, str]:
        """One training run under ``1gpu.yaml``; (run folder, log text)."""
        s = self.sizes
        run_dir = run_dir or self.work / "runs" / name
        steps = steps or s.steps
        width = s.width if arch == "ours" else 1.0
        config = EXPERIMENT if arch == "ours" else PAPER_EXPERIMENT
        cmd = [*self.launch(), "-m", "bicogan_dist.train", "--config", str(config)]
        if resume:
            cmd += ["--resume", "latest"]
        cmd += [f"data.shards={self.shards}", f"log.run_dir={run_dir}", f"train.max_steps={steps}",
                f"train.mixed_precision={precision}", f"data.batch_size={batch or s.batch}", f"model.arch={arch}",
                f"model.width={width}", f"model.z_dim={s.z_dim}", "log.progress=false", *extra]
        return run_dir, self.run(name, cmd, timeout)


# ------------------------------------------------------------------------------------------ steps


def _checkpoint_steps(run_dir: Path) -> list[int]:
    from bicogan_dist.train import checkpoint as ckpt

    return [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(run_dir)]


def _done_step(log: str) -> int | None:
    found = re.findall(r"^done: .* at step (\d+)$", log, re.M)
    return int(found[-1]) if found else None


def step_install(ctx: Context, timeout: float) -> tuple[str, dict[str, Any]]:
    import importlib.util

    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    installed = False
    if missing:
        # Few retries: a machine without a package index should fail this row in seconds, not minutes.
        try:
            ctx.run("install", [sys.executable, "-m", "pip", "install", "--retries", "1", "--timeout", "15", "-e",
                                f"{ROOT}[deepspeed]"], timeout)
        except StepError as exc:
            raise StepError(f"{', '.join(missing)} missing and pip install failed: {exc}") from None
        installed = True
    probe = ("import json, torch, accelerate; c = torch.cuda.is_available()\n"
             "try:\n    import deepspeed; ds = deepspeed.__version__\nexcept ImportError:\n    ds = None\n"
             "print(json.dumps({'torch': torch.__version__, 'accelerate': accelerate.__version__, "
             "'deepspeed': ds, 'cuda': torch.version.cuda, 'cuda_available': c, "
             "'gpu': torch.cuda.get_device_name(0) if c else None, 'gpus': torch.cuda.device_count()}))")
    text = ctx.run("install_probe", [sys.executable, "-c", probe], timeout)
    info = json.loads(text.strip().splitlines()[-1])
    info["installed_now"] = installed
    if ctx.sizes.device == "cuda" and not info["cuda_available"]:
        raise StepError(f"torch {info['torch']} sees no CUDA device (torch.cuda.is_available() is False)")
    if ctx.sizes.device == "cpu" and info["cuda_available"]:
        raise StepError("a dry run hid the GPUs (CUDA_VISIBLE_DEVICES=''), yet the child sees CUDA")
    where = info["gpu"] or "CPU"
    return (f"torch {info['torch']} (CUDA {info['cuda']}), accelerate {info['accelerate']}, deepspeed "
            f"{info['deepspeed']} on {where}" + (" (installed now)" if installed else " (already importable)")), info


def step_shard_synthetic(ctx: Context, timeout: float) -> tuple[str, dict[str, Any]]:
    t0 = time.perf_counter()
    ctx.run("shard_synthetic", [sys.executable, str(ROOT / "tools" / "shard_fer2013.py"), "--synthetic",
                                str(ctx.sizes.synthetic), "--out", str(ctx.shards), "--force", "--no-progress"], timeout)
    manifest = json.loads((ctx.shards / "manifest.json").read_text())
    counts = {k: v["count"] for k, v in manifest["splits"].items()}
    return f"{sum(counts.values()):,} faces in {time.perf_counter() - t0:.1f} s: {counts}", {"counts": counts}


def step_shard_fer2013(ctx: Context, timeout: float) -> tuple[str, dict[str, Any]]:
    if ctx.dry_run:
        raise StepSkipped("dry run (FER2013 sharding takes too long on a CPU check)")
    if not REAL_FER2013.is_file():
        raise StepSkipped(f"{REAL_FER2013} is absent")
    out = ctx.work / "fer2013"
    t0 = time.perf_counter()
    ctx.run("shard_fer2013", [sys.executable, str(ROOT / "tools" / "shard_fer2013.py"), str(REAL_FER2013), "--out",
                              str(out), "--force", "--no-progress"], timeout)
    seconds = time.perf_counter() - t0
    manifest = json.loads((out / "manifest.json").read_text())
    counts = {k: v["count"] for k, v in manifest["splits"].items()}
    return f"{counts} in {seconds:.1f} s", {"counts": counts, "seconds": seconds}


def _check_run(run_dir: Path, log: str, end: int, checkpoints: list[int], grids: bool = True) -> dict[str, Any]:
    """The run ended at ``end``, holds ``checkpoints`` and (``grids``) a sample grid per checkpoint; its numbers."""
    done = _done_step(log)
    if done != end:
        raise StepError(f"the run did not report 'done: ... at step {end}' (it said {done})")
    have = _checkpoint_steps(run_dir)
    if have[-len(checkpoints):] != checkpoints:
        raise StepError(f"checkpoints {have} in {run_dir}/checkpoints; expected {checkpoints} last")
    if grids:
        missing = [s for s in checkpoints if not (run_dir / "samples" / f"step-{s:08d}.png").is_file()]
        if missing:
            raise StepError(f"no sample grid samples/step-XXXXXXXX.png for steps {missing} in {run_dir}")
    return {"images_per_s": images_per_second(run_dir), "checkpoints": have}


def _intervals(steps: int) -> tuple[str, ...]:
    half = max(1, steps // 2)
    return (f"log.log_every={max(1, min(20, half))}", f"log.image_every={half}", f"log.checkpoint_every={half}",
            "log.keep_checkpoints=10")


def _rate(numbers: dict[str, Any]) -> str:
    v = numbers.get("images_per_s")
    return f"{v:,.0f} img/s" if v else "img/s n/a"


def step_train_bf16(ctx: Context, timeout: float) -> tuple[str, dict[str, Any]]:
    s = ctx.sizes
    run_dir, log = ctx.train("train_bf16", timeout, steps=s.steps,
                             extra=(*_intervals(s.steps), "augment.ops=[affine_rotate,fliplr]"))
    half = max(1, s.steps // 2)
    numbers = _check_run(run_dir, log, s.steps, sorted({half, s.steps}))
    ctx.results["train_bf16"] = {"run_dir": run_dir}
    return (f"{s.steps} steps b{s.batch} width {s.width}, augmentation, grids + checkpoints at "
            f"{sorted({half, s.steps})}; {_rate(numbers)}"), numbers


def step_resume(ctx: Context, timeout: float) -> tuple[str, dict[str, Any]]:
    s = ctx.sizes
    first = ctx.results.get("train_bf16", {}).get("run_dir")
    if first is None:
        raise StepError("needs the train_bf16 run, which failed")
    end = s.steps + s.more_steps
    run_dir, log = ctx.train("resume_bf16", timeout, run_dir=first, resume=True, steps=end,
                             extra=(*_intervals(s.steps), "augment.ops=[affine_rotate,fliplr]"))
    numbers = _check_run(run_dir, log, end, [end], grids=False)
    if s.steps not in numbers["checkpoints"]:
        raise StepError(f"the first run's checkpoint {s.steps} is gone: {numbers['checkpoints']}")
    state = json.loads((run_dir / "checkpoints" / f"checkpoint-{end:08d}" / "state.json").read_text())
    if state.get("step") != end:
        raise StepError(f"checkpoint-{end:08d}/state.json says step {state.get('step')}")
    return f"--resume latest continued from step {s.steps} to {end}; {_rate(numbers)}", numbers


def _step_precision(precision: str) -> Callable[[Context, float], tuple[str, dict[str, Any]]]:
    def step(ctx: Context, timeout: float) -> tuple[str, dict[str, Any]]:
        n = ctx.sizes.more_steps
        run_dir, log = ctx.train(f"train_{precision}", timeout, steps=n, precision=precision,
                                 extra=(*_intervals(n), "augment.ops=[]"))
        numbers = _check_run(run_dir, log, n, sorted({max(1, n // 2), n}))
        return f"{n} steps b{ctx.sizes.batch}, finite losses; {_rate(numbers)}", numbers

    step.__doc__ = f"A short run in {precision}."
    return step


def _throughput(ctx: Context, name: str, arch: str, batch: int, timeout: float,
                extra: tuple[str, ...] = ()) -> dict[str, Any]:
    s = ctx.sizes
    steps, every = s.throughput_steps[arch], s.throughput_log_every[arch]
    run_dir, log = ctx.train(name, timeout, arch=arch, batch=batch, steps=steps, precision="bf16",
                             extra=("augment.ops=[]", f"log.log_every={every}", f"log.image_every={10 * steps}",
                                    f"log.checkpoint_every={10 * steps}", *extra))
    if _done_step(log) != steps:
        raise StepError(f"the run did not reach step {steps}")
    rate = images_per_second(run_dir)
    if not rate:
        raise StepError(f"no perf/images_per_s in {run_dir}/tb")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # large at batch 4096, nothing reads them
    from bicogan_dist.train.memory_format import parse_memory_format_line  # imports torch: not before install

    numbers: dict[str, Any] = {"arch": arch, "batch": batch, "images_per_s": rate}
    layout = parse_memory_format_line(log)  # model.channels_last=auto: the trainer's choice and both timings
    if layout is not None:
        numbers.update({"channels_last": layout["channels_last"], "ms_contiguous": layout["ms_contiguous"],
                        "ms_channels_last": layout["ms_channels_last"]})
    return numbers


def _layout(numbers: dict[str, Any]) -> str:
    """``; channels_last (contiguous 12.1 ms, channels_last 9.8 ms)``: the trainer's memory-format choice, if logged."""
    if "channels_last" not in numbers:
        return ""
    text = f"; {'channels_last' if numbers['channels_last'] else 'contiguous'}"
    if numbers.get("ms_contiguous") is not None:
        text += f" (contiguous {numbers['ms_contiguous']:.1f} ms, channels_last {numbers['ms_channels_last']:.1f} ms)"
    return text


def _step_throughput(arch: str, batch: int) -> Callable[[Context, float], tuple[str, dict[str, Any]]]:
    def step(ctx: Context, timeout: float) -> tuple[str, dict[str, Any]]:
        name = f"throughput_{arch}_b{batch}"
        numbers = _throughput(ctx, name, arch, batch, timeout)
        ctx.results[name] = numbers
        text = f"arch {arch} b{batch} bf16: {numbers['images_per_s']:,.0f} img/s"
        if arch == "ours":
            text += f" (target >= {TARGET_IMAGES_PER_S:,} at the best batch, width 1)"
        return text + _layout(numbers), numbers

    return step


def best_ours(ctx: Context) -> dict[str, Any] | None:
    """The fastest arch-ours throughput row measured so far."""
    rows = [v for k, v in ctx.results.items() if k.startswith("throughput_ours_")]
    return max(rows, key=lambda r: r["images_per_s"]) if rows else None


def step_compile(ctx: Context, timeout: float) -> tuple[str, dict[str, Any]]:
    batch = ctx.sizes.throughput_batches[0]
    off = ctx.results.get(f"throughput_ours_b{batch}")
    t0 = time.perf_counter()
    on = _throughput(ctx, "compile_on", "ours", batch, timeout, extra=("train.compile=true",))
    on_seconds = time.perf_counter() - t0
    if off is None:
        off = _throughput(ctx, "compile_off", "ours", batch, max(1.0, timeout - on_seconds))
    speedup = on["images_per_s"] / off["images_per_s"]
    numbers = {"batch": batch, "on_images_per_s": on["images_per_s"], "off_images_per_s": off["images_per_s"],
               "speedup": speedup, "on_run_seconds": on_seconds}
    return (f"arch ours b{batch} bf16: compile on {on['images_per_s']:,.0f} vs off {off['images_per_s']:,.0f} "
            f"img/s ({speedup:.2f}x; compiled run {on_seconds:.0f} s incl. compilation)"), numbers


def measure_loaders(shards: str, device: str, batch: int, seconds: float, workers: int,
                    ops: tuple[str, ...] = ("affine_rotate", "fliplr")) -> dict[str, float]:
    """samples/s of the trainer's loaders on ``device`` (one rank), memory and stream, with and without ``ops``.

    Each cell: one warm-up batch, then batches for about ``seconds`` (across epochs), each moved to
    ``device`` as the trainer does, with the device synchronised before the clock stops.
    """
    import torch

    from bicogan_dist.data.augment import AugmentConfig, build_augmenter
    from bicogan_dist.data.loader import DataConfig, build_loader

    dev = torch.device(device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    rates: dict[str, float] = {}
    for mode in ("memory", "stream"):
        for aug_name, aug_ops in (("none", ()), ("augment", ops)):
            augmenter = build_augmenter(AugmentConfig(ops=list(aug_ops))) if aug_ops else None
            cfg = DataConfig(shards=shards, mode=mode, batch_size=batch, num_workers=workers if mode == "stream" else 0)
            source = build_loader(cfg, rank=0, world_size=1, device=dev, seed=0, augmenter=augmenter)
            n, t0, epoch, warm = 0, None, 0, False
            while True:
                it = source.epoch(epoch)
                for x, y in it:
                    x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                    if not warm:
                        sync()
                        warm, t0 = True, time.perf_counter()
                        continue
                    n += x.shape[0]
                    if time.perf_counter() - t0 > seconds:
                        break
                close = getattr(it, "close", None)
                if close:
                    close()
                if t0 is not None and time.perf_counter() - t0 > seconds:
                    break
                epoch += 1
            sync()
            rates[f"{mode}_{aug_name}"] = n / (time.perf_counter() - t0)
            source.close()  # stream workers persist across epochs until then
    return rates


def step_loader(ctx: Context, timeout: float) -> tuple[str, dict[str, Any]]:
    s = ctx.sizes
    kwargs = {"shards": str(ctx.shards), "device": s.device, "batch": s.loader_batch, "seconds": s.loader_seconds,
              "workers": s.loader_workers}
    code = ("import json, sys; from bicogan_dist.evaluate.gpu_check import measure_loaders; "
            "print('RATES ' + json.dumps(measure_loaders(**json.loads(sys.argv[1]))))")
    text = ctx.run("loader", [sys.executable, "-c", code, json.dumps(kwargs)], timeout)
    line = [ln for ln in text.splitlines() if ln.startswith("RATES ")][-1]
    rates = json.loads(line[len("RATES "):])
    numbers: dict[str, Any] = {"samples_per_s": rates, "batch": s.loader_batch}
    best = best_ours(ctx)
    summary = ", ".join(f"{k.replace('_', '+')} {v:,.0f}" for k, v in rates.items()) + " samples/s"
    if best:
        ratio = rates["memory_augment"] / best["images_per_s"]
        numbers["ratio_to_training"] = ratio
        ctx.results["loader"] = numbers
        summary += (f"; memory+augment / training ({best['images_per_s']:,.0f} img/s) = {ratio:.1f}x "
                    f"(target >= {TARGET_LOADER_RATIO:.0f}x)")
    return summary, numbers


def step_deepspeed(ctx: Context, timeout: float) -> tuple[str, dict[str, Any]]:
    n = ctx.sizes.more_steps
    run_dir, log = ctx.train("deepspeed_zero2_bf16", timeout, steps=n, precision="bf16",
                             extra=(*_intervals(n), "augment.ops=[]", "train.engine=deepspeed",
                                    f"train.deepspeed_config={ZERO2_BF16}"))
    numbers = _check_run(run_dir, log, n, sorted({max(1, n // 2), n}))
    state = json.loads((run_dir / "checkpoints" / f"checkpoint-{n:08d}" / "state.json").read_text())
    if state.get("engine") != "deepspeed":
        raise StepError(f"checkpoint-{n:08d}/state.json says engine {state.get('engine')!r}, not deepspeed")
    return f"ZeRO-2 bf16, {n} steps b{ctx.sizes.batch}, DeepSpeed checkpoints; {_rate(numbers)}", numbers


CPU_PROBE = """\
import json, os
import torch
from accelerate import PartialState
state = PartialState(cpu=not torch.cuda.is_available())  # the device choice of bicogan_dist/train/engine.py
# One write(2) per line: print() under PYTHONUNBUFFERED writes the newline apart, and the two ranks' lines merged.
os.write(1, ("PROBE " + json.dumps({"rank": state.process_index, "world_size": state.num_processes,
    "cuda_available": torch.cuda.is_available(), "device": str(state.device),
    "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\\n").encode())
"""


def probe_launch(config: Path, env: dict[str, str], timeout: float, work: Path) -> list[dict[str, Any]]:
    """What each rank under ``accelerate launch --config_file config`` sees: rank, world size, CUDA, device."""
    work.mkdir(parents=True, exist_ok=True)
    script = work / "probe_device.py"
    script.write_text(CPU_PROBE)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port",
           str(free_port()), str(script)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise StepError(f"{first_error_line(proc.stderr + proc.stdout)} (exit {proc.returncode})")
    found = [json.loads(ln[len("PROBE "):]) for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    return sorted(found, key=lambda r: r["rank"])


def step_cpu_config(ctx: Context, timeout: float) -> tuple[str, dict[str, Any]]:
    # On a GPU machine the launcher itself sees the GPUs (the user's environment): the config must hide them.
    ranks = probe_launch(LAUNCH / "cpu_2proc.yaml", ctx.env, timeout, ctx.work)
    if [r["rank"] for r in ranks] != [0, 1] or any(r["world_size"] != 2 for r in ranks):
        raise StepError(f"expected ranks [0, 1] of world size 2, got {ranks}")
    on_cuda = [r for r in ranks if r["cuda_available"] or not r["device"].startswith("cpu")]
    if on_cuda:
        raise StepError(f"cpu_2proc.yaml: rank {on_cuda[0]['rank']} sees CUDA (device {on_cuda[0]['device']})")
    return (f"cpu_2proc.yaml: ranks 0, 1 of 2 on {ranks[0]['device']}, CUDA hidden "
            f"(CUDA_VISIBLE_DEVICES={ranks[0]['CUDA_VISIBLE_DEVICES']!r})"), {"ranks": ranks}


def plan(sizes: Sizes) -> list[tuple[str, str, Callable[[Context, float], tuple[str, dict[str, Any]]]]]:
    """(row id, timeout key, step) in the order they run: what everything else needs first, the optional last."""
    steps: list[tuple[str, str, Callable]] = [
        ("install", "install", step_install),
        ("shard_synthetic", "shard_synthetic", step_shard_synthetic),
        ("train_bf16", "train", step_train_bf16),
        ("resume_bf16", "train", step_resume),
        ("train_fp16", "train", _step_precision("fp16")),
        ("train_fp32", "train", _step_precision("no")),
    ]
    for arch in ("ours", "paper"):
        for batch in sizes.throughput_batches:
            steps.append((f"throughput_{arch}_b{batch}", "throughput", _step_throughput(arch, batch)))
    steps += [
        ("compile", "compile", step_compile),
        ("loader", "loader", step_loader),
        ("deepspeed_zero2_bf16", "deepspeed", step_deepspeed),
        ("cpu_config", "cpu_config", step_cpu_config),
        ("shard_fer2013", "shard_fer2013", step_shard_fer2013),
    ]
    return steps


def row_names(dry_run: bool) -> list[str]:
    """The report's row ids, in order (what the tests assert)."""
    return [name for name, _, _ in plan(DRY_SIZES if dry_run else GPU_SIZES)]


# ------------------------------------------------------------------------------------------ the check


def run_check(out_dir: str | Path, dry_run: bool = False, budget_s: float | None = None,
              only: list[str] | None = None, echo: Callable[[str], None] | None = print) -> CheckResult:
    """Run every step (or those in ``only``), write ``report.json`` and ``report.md`` into ``out_dir``.

    A step that raises is a FAIL row with the first line of its error; the rest still run. A step
    that would start after the overall budget (``budget_s``, default the sizes') is a FAIL row
    saying so, and each step's timeout is cut to what is left of the budget.
    """
    sizes = DRY_SIZES if dry_run else GPU_SIZES
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(sizes, out, dry_run)
    for own in (ctx.work, ctx.logs):  # a previous check's runs would be resumed, not started: start afresh
        shutil.rmtree(own, ignore_errors=True)
    budget = budget_s if budget_s is not None else sizes.budget_s
    t_start = time.perf_counter()
    sampler = GpuSampler(enabled=not dry_run).start()
    rows: list[Row] = []
    steps = plan(sizes)
    if only:
        unknown = sorted(set(only) - {n for n, _, _ in steps})
        if unknown:
            raise ValueError(f"unknown step {unknown[0]!r}; steps: {[n for n, _, _ in steps]}")
        steps = [s for s in steps if s[0] in only]
    try:
        for name, key, fn in steps:
            timeout = float(sizes.timeouts[key])
            if budget is not None:
                left = budget - (time.perf_counter() - t_start)
                if left < 10:
                    rows.append(Row(name, "FAIL", "", 0.0, error=f"not run: the check's {budget:.0f} s budget is spent"))
                    _echo_row(echo, rows[-1])
                    continue
                timeout = min(timeout, left)
            sampler.window()
            t0 = time.perf_counter()
            try:
                summary, numbers = fn(ctx, timeout)
                row = Row(name, "OK", summary, 0.0, numbers)
            except StepSkipped as exc:
                row = Row(name, "SKIP", str(exc), 0.0)
            except Exception as exc:  # noqa: BLE001 - a failing step is a FAIL row; the check goes on
                msg = str(exc).strip() or type(exc).__name__
                if not isinstance(exc, StepError):
                    msg = f"{type(exc).__name__}: {msg}"
                row = Row(name, "FAIL", "", 0.0, error=msg.splitlines()[0])
            row.seconds = time.perf_counter() - t0
            row.gpu_peak_mib, row.gpu_util_mean, row.gpu_util_max = sampler.read()
            rows.append(row)
            _echo_row(echo, row)
    finally:
        sampler.stop()
    env_row = next((r for r in rows if r.name == "install" and r.status == "OK"), None)
    result = CheckResult(dry_run=dry_run, out_dir=out, rows=rows,
                         environment={"python": platform.python_version(), "host": platform.node(),
                                      "sizes": asdict(sizes), **(env_row.numbers if env_row else {})},
                         targets=targets(ctx), seconds=time.perf_counter() - t_start)
    write_report(result)
    return result


def targets(ctx: Context) -> dict[str, Any]:
    """The two speed targets with what was measured (None where the step failed)."""
    best = best_ours(ctx)
    ratio = ctx.results.get("loader", {}).get("ratio_to_training")
    rate = best["images_per_s"] if best else None
    return {
        "training_images_per_s": {"target": TARGET_IMAGES_PER_S, "measured": rate,
                                  "batch": best["batch"] if best else None,
                                  "met": None if rate is None else rate >= TARGET_IMAGES_PER_S,
                                  "what": "arch ours, width 1, bf16, best batch"},
        "loader_ratio": {"target": TARGET_LOADER_RATIO, "measured": ratio,
                         "met": None if ratio is None else ratio >= TARGET_LOADER_RATIO,
                         "what": "loader samples/s (memory mode, augmentation) / training images/s"},
    }


def _echo_row(echo: Callable[[str], None] | None, row: Row) -> None:
    if echo:
        echo(f"[{row.status}] {row.name} ({row.seconds:.0f} s): {row.error or row.summary}")


def _fmt_gpu(row: Row) -> tuple[str, str]:
    mem = f"{row.gpu_peak_mib:,.0f}" if row.gpu_peak_mib is not None else "—"
    util = f"{row.gpu_util_mean:.0f} / {row.gpu_util_max:.0f}" if row.gpu_util_mean is not None else "—"
    return mem, util


def table_lines(result: CheckResult) -> list[str]:
    """The Markdown table: step, status, key numbers (or the first error line), GPU peak MiB, util %, seconds."""
    lines = ["| step | status | key numbers | GPU peak MiB | GPU util % (mean / max) | s |", "|---|---|---|---|---|---|"]
    for r in result.rows:
        mem, util = _fmt_gpu(r)
        text = (r.error or r.summary).replace("|", "\\|")
        lines.append(f"| {r.name} | {r.status} | {text} | {mem} | {util} | {r.seconds:.0f} |")
    return lines


def _target_lines(result: CheckResult) -> list[str]:
    out = []
    for t in result.targets.values():
        measured = "not measured" if t["measured"] is None else f"{t['measured']:,.1f}"
        verdict = "—" if t["met"] is None else ("met" if t["met"] else "MISSED")
        out.append(f"- {t['what']}: {measured} (target >= {t['target']:,}): {verdict}")
    return out


def markdown(result: CheckResult) -> str:
    env = result.environment
    head = "# GPU check" + (" (dry run on the CPU, tiny sizes: the numbers mean nothing)" if result.dry_run else "")
    lines = [head, "",
             f"{env.get('gpu') or 'CPU'}; torch {env.get('torch', '?')}, accelerate {env.get('accelerate', '?')}, "
             f"deepspeed {env.get('deepspeed', '?')}; {result.seconds:.0f} s in all; "
             f"{'all steps OK' if result.ok else 'FAILED: ' + ', '.join(r.name for r in result.rows if r.status == 'FAIL')}",
             "", *table_lines(result), "", "Targets (informational; a miss does not fail the check):",
             *_target_lines(result), ""]
    return "\n".join(lines)


def write_report(result: CheckResult) -> tuple[Path, Path]:
    """``report.json`` (every number) and ``report.md`` (the table) in the check's folder."""
    data = {"dry_run": result.dry_run, "ok": result.ok, "seconds": result.seconds,
            "environment": result.environment, "targets": result.targets,
            "rows": [asdict(r) for r in result.rows]}
    js = result.out_dir / "report.json"
    md = result.out_dir / "report.md"
    js.write_text(json.dumps(data, indent=2, default=str) + "\n")
    md.write_text(markdown(result))
    return js, md
