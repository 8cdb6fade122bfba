"""The trainer under a real ``accelerate launch`` with two CPU processes, when the launcher is signalled or killed,
and when a rank fails: what each process does and which exit code the user sees (README section 2). The first
tests check ``launcher.stop_with_launcher`` on its own, in real processes whose parent dies.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bicogan_dist.train import checkpoint as ckpt
from test_train import CPU_2PROC, ROOT, SMOKE, TINY, accelerate_cmd, env, free_port, shards  # noqa: F401

#: A "rank": arms stop_with_launcher, says so, and on SIGTERM writes its parent pid into MARKER and exits.
RANK = textwrap.dedent("""
    import os, signal, sys, time
    marker, ready = sys.argv[1], sys.argv[2]
    def stopped(signum, frame):
        open(marker, "w").write(str(os.getppid()))
        os._exit(0)
    signal.signal(signal.SIGTERM, stopped)
    from bicogan_dist.train.launcher import stop_with_launcher
    assert stop_with_launcher()
    open(ready, "w").close()
    time.sleep(120)
""")


def wait_for(path: Path, seconds: float) -> bool:
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline:
        time.sleep(0.1)
    return path.exists()


def test_a_rank_gets_sigterm_when_its_launcher_is_killed(tmp_path):
    marker, ready = tmp_path / "stopped", tmp_path / "ready"
    launcher_code = ("import subprocess, sys, time; "
                     f"p = subprocess.Popen([sys.executable, '-c', {RANK!r}, {str(marker)!r}, {str(ready)!r}]); "
                     "print(p.pid, flush=True); time.sleep(120)")
    launcher = subprocess.Popen([sys.executable, "-c", launcher_code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                env=dict(env(), TORCHELASTIC_RUN_ID="test"))
    rank = int(launcher.stdout.readline())
    try:
        assert wait_for(ready, 60), "the rank did not start"
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        assert wait_for(marker, 10), "no SIGTERM reached the rank after its launcher died"
    finally:
        stop_group(launcher, [rank])


def test_a_rank_whose_launcher_died_before_it_asked_stops_at_once(tmp_path):
    """The launcher is gone before the rank arms: the kernel would never signal, so it signals itself."""
    marker, ready = tmp_path / "stopped", tmp_path / "ready"
    orphan = ("import os, sys, time, runpy\n"
              "if os.fork(): os._exit(0)  # the launcher exits at once\n"
              "time.sleep(1.0)\n"
              f"sys.argv = ['rank', {str(marker)!r}, {str(ready)!r}]\n"
              f"exec({RANK!r})\n")
    subprocess.run([sys.executable, "-c", orphan], cwd=ROOT, env=dict(env(), TORCHELASTIC_RUN_ID="test"), check=True)
    assert wait_for(marker, 10), "the orphaned rank kept running"
    if marker.read_text() != "1":
        pytest.skip("orphans here go to a subreaper, not init: the rank cannot tell its launcher died")


def test_a_process_no_launcher_started_is_left_alone():
    """A plain ``python -m bicogan_dist.train`` (say under nohup) must outlive the shell that started it."""
    code = "from bicogan_dist.train.launcher import stop_with_launcher; print(stop_with_launcher())"
    e = {k: v for k, v in env().items() if k not in ("TORCHELASTIC_RUN_ID", "ACCELERATE_MIXED_PRECISION")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def launch_cmd(run_dir: Path, shards: Path, *overrides: str, quiet: bool = False) -> list[str]:  # noqa: F811
    return accelerate_cmd(*(["--quiet"] if quiet else []), "--config_file", str(CPU_2PROC), "--main_process_port",
                          str(free_port()), "-m", "bicogan_dist.train", "--config", str(SMOKE),
                          f"data.shards={shards}", f"log.run_dir={run_dir}", *TINY, *overrides)


def start_training(run_dir: Path, shards: Path, log: Path) -> tuple[subprocess.Popen, list[int]]:  # noqa: F811
    """Launch an endless run in its own process group; return once it has written a checkpoint, with the rank pids."""
    cmd = launch_cmd(run_dir, shards, "train.max_steps=100000", "log.checkpoint_every=5")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    first = ckpt.checkpoint_root(run_dir) / "checkpoint-00000005" / ckpt.STATE_FILE
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.3)
    if not first.exists():
        stop_group(proc, [])
        pytest.fail(f"no checkpoint in time:\n{log.read_text()[-3000:]}")
    ranks = children(proc.pid)
    assert len(ranks) == 2 and all("bicogan_dist.train" in cmdline(p) for p in ranks), [cmdline(p) for p in ranks]
    assert "2 process(es) on cpu" in log.read_text()  # the world size, not assumed
    return proc, ranks


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's), from /proc."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Running (a zombie left to a parent that does not reap it has stopped: it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.time() + seconds
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.5)
    return [p for p in pids if alive(p)]


def stop_group(proc: subprocess.Popen, ranks: list[int]) -> None:
    """Clean up what this test started: the launcher's process group and the recorded ranks."""
    for pid in [proc.pid, *ranks]:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def newest_step(run_dir: Path) -> int:
    return json.loads((ckpt.list_checkpoints(run_dir)[-1] / ckpt.STATE_FILE).read_text())["step"]


@pytest.mark.slow
def test_killing_the_launcher_stops_both_ranks(shards, tmp_path):  # noqa: F811
    """kill -9 of ``accelerate launch``: its ranks get SIGTERM from the kernel (parent death), save and exit."""
    run_dir, log = tmp_path / "run", tmp_path / "launch.log"
    proc, ranks = start_training(run_dir, shards, log)
    try:
        os.kill(proc.pid, signal.SIGKILL)  # the launcher only: torchrun's agent dies with it, unable to pass it on
        proc.wait(timeout=30)
        left = wait_gone(ranks, 60)
        assert not left, f"ranks {left} still running 60 s after the launcher died:\n{log.read_text()[-3000:]}"
    finally:
        stop_group(proc, ranks)
    output = log.read_text()
    assert "stop signal received; checkpoint saved" in output, output[-3000:]
    assert newest_step(run_dir) > 5
    assert not list(ckpt.checkpoint_root(run_dir).glob("*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("sig, to_group, code", [(signal.SIGTERM, False, 143), (signal.SIGINT, True, 130)],
                         ids=["sigterm-to-launcher", "ctrl-c-to-process-group"])
def test_a_stop_signal_saves_a_checkpoint_and_the_launcher_exits_128_plus_signal(shards, tmp_path, sig, to_group,
                                                                                code):  # noqa: F811
    """SIGTERM to the launcher (preemption) or SIGINT to its process group (Ctrl-C): the ranks save and exit 0,
    then ``accelerate launch`` exits 128 + signal, as README section 2 says."""
    run_dir, log = tmp_path / "run", tmp_path / "launch.log"
    proc, ranks = start_training(run_dir, shards, log)
    try:
        if to_group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        assert proc.wait(timeout=120) == code, log.read_text()[-3000:]
        assert not wait_gone(ranks, 10)
    finally:
        stop_group(proc, ranks)
    output = log.read_text()
    assert "stop signal received; checkpoint saved" in output and "done:" in output, output[-3000:]
    assert newest_step(run_dir) > 5
    assert json.loads((ckpt.list_checkpoints(run_dir)[-1] / ckpt.STATE_FILE).read_text())["world_size"] == 2
    assert not list(ckpt.checkpoint_root(run_dir).glob("*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("quiet", [False, True], ids=["plain", "quiet"])
def test_a_trainer_error_is_the_root_cause_in_the_launchers_report(shards, tmp_path, quiet):  # noqa: F811
    proc = subprocess.run(launch_cmd(tmp_path / "run", shards, "model.knd=gan", quiet=quiet), cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = "error: unknown config key model.knd"
    assert line in proc.stderr
    # torchrun's report ends with the root cause; it carries the trainer's error line, not "To enable traceback".
    root_cause = proc.stderr.rsplit("Root Cause (first observed failure):", 1)[1]
    assert f"traceback : {line}" in root_cause, proc.stderr[-3000:]
    assert ("Traceback (most recent call last)" in proc.stderr) is not quiet


@pytest.mark.slow
def test_a_write_failure_on_one_rank_stops_both_with_the_folder_named(shards, tmp_path):  # noqa: F811
    """A file-size limit (EFBIG, as a full disk gives ENOSPC) makes rank 0's first weights file fail mid-save:
    both ranks stop together, naming the folder, and no half-written checkpoint is left."""
    run_dir = tmp_path / "run"
    limit = 400_000  # below ge.safetensors of TINY (~0.8 MB); rank 1 writes only its ~7 KB RNG file

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(launch_cmd(run_dir, shards, "train.max_steps=3", "log.checkpoint_every=2",
                                     "log.image_every=100", quiet=True),
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert proc.returncode == 1, proc.stderr[-3000:]
    folder = ckpt.checkpoint_root(run_dir)
    assert f"error: {folder}: cannot write checkpoint checkpoint-00000002 (rank 0: " in proc.stderr, proc.stderr[-3000:]
    assert "(another rank could not write its part); the disk may be full" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(folder.iterdir())
