"""The prepared GPU check (tools/check_gpu.py): its dry run on the CPU runs every step for real, and a failing
step is a FAIL row while the check goes on."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bicogan_dist.evaluate.gpu_check import first_error_line, row_names, run_check

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "check_gpu.py"
DRY_ROWS = ["install", "shard_synthetic", "train_bf16", "resume_bf16", "train_fp16", "train_fp32",
            "throughput_ours_b16", "throughput_ours_b32", "throughput_paper_b16", "throughput_paper_b32",
            "compile", "loader", "deepspeed_zero2_bf16", "cpu_config", "shard_fer2013"]


def env() -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    e.pop("ACCELERATE_USE_CPU", None)
    return e


def test_row_names_gpu_and_dry():
    assert row_names(True) == DRY_ROWS
    gpu = row_names(False)
    assert [n for n in gpu if n.startswith("throughput_")] == [
        "throughput_ours_b1024", "throughput_ours_b4096", "throughput_paper_b1024", "throughput_paper_b4096"]
    assert len(gpu) == len(DRY_ROWS)


def test_first_error_line_prefers_the_trainers_error_then_the_first_exception():
    log = "warming up\nerror: data.shards: /x has no manifest.json\nTraceback...\nValueError: later\n"
    assert first_error_line(log) == "error: data.shards: /x has no manifest.json"
    log = ("Traceback (most recent call last):\nTypeError: forward() got an unexpected keyword argument 'k'\n"
           "RuntimeError: Traceback (most recent call last):\n"
           "subprocess.CalledProcessError: Command '[...]' returned non-zero exit status 1.\n")
    assert first_error_line(log) == "TypeError: forward() got an unexpected keyword argument 'k'"
    assert first_error_line("just\nthis\n") == "this"
    assert first_error_line("") == "(no output)"


def test_spent_budget_fails_the_rest_and_still_writes_the_report(tmp_path):
    result = run_check(tmp_path, dry_run=True, budget_s=0, echo=None)
    assert [r.name for r in result.rows] == DRY_ROWS
    assert all(r.status == "FAIL" and r.error == "not run: the check's 0 s budget is spent" for r in result.rows)
    assert not result.ok
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is False and [r["name"] for r in report["rows"]] == DRY_ROWS
    assert "| resume_bf16 | FAIL | not run: the check's 0 s budget is spent |" in (tmp_path / "report.md").read_text()


def test_a_failing_step_is_recorded_and_the_check_goes_on(tmp_path):
    """resume_bf16 without its first run fails; the next step still runs; the tool exits 1."""
    proc = subprocess.run([sys.executable, str(TOOL), "--dry-run", "--out", str(tmp_path),
                           "--only", "resume_bf16,shard_fer2013"], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {r["name"]: r for r in json.loads((tmp_path / "report.json").read_text())["rows"]}
    assert list(rows) == ["resume_bf16", "shard_fer2013"]
    assert rows["resume_bf16"]["status"] == "FAIL"
    assert rows["resume_bf16"]["error"] == "needs the train_bf16 run, which failed"
    assert rows["shard_fer2013"]["status"] == "SKIP"
    assert "| resume_bf16 | FAIL | needs the train_bf16 run, which failed |" in proc.stdout


def test_unknown_step_is_an_error(tmp_path):
    proc = subprocess.run([sys.executable, str(TOOL), "--dry-run", "--out", str(tmp_path), "--only", "trian_bf16"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --only: unknown step 'trian_bf16'; steps: ['install'")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dry_run_every_step_ok(tmp_path):
    """The whole check on the CPU with tiny sizes: every row OK (FER2013 sharding is SKIP in a dry run)."""
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(TOOL), "--dry-run", "--out", str(out)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=1800)
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == DRY_ROWS
    status = {name: r["status"] for name, r in rows.items()}
    assert status == {**{name: "OK" for name in DRY_ROWS}, "shard_fer2013": "SKIP"}, \
        {n: r["error"] for n, r in rows.items() if r["status"] == "FAIL"}
    assert proc.returncode == 0 and report["ok"] is True
    # the numbers each row promises
    assert rows["train_bf16"]["numbers"]["checkpoints"] == [2, 4]
    assert rows["resume_bf16"]["numbers"]["checkpoints"] == [2, 4, 6]
    for name in DRY_ROWS:
        if name.startswith("throughput_"):
            assert rows[name]["numbers"]["images_per_s"] > 0
    assert rows["compile"]["numbers"]["on_images_per_s"] > 0 and rows["compile"]["numbers"]["off_images_per_s"] > 0
    assert set(rows["loader"]["numbers"]["samples_per_s"]) == {"memory_none", "memory_augment", "stream_none",
                                                               "stream_augment"}
    assert [r["world_size"] for r in rows["cpu_config"]["numbers"]["ranks"]] == [2, 2]
    assert report["targets"]["training_images_per_s"]["measured"] == max(
        rows[n]["numbers"]["images_per_s"] for n in DRY_ROWS if n.startswith("throughput_ours"))
    assert report["targets"]["loader_ratio"]["measured"] == rows["loader"]["numbers"]["ratio_to_training"]
    md = (out / "report.md").read_text()
    assert "| step | status | key numbers | GPU peak MiB | GPU util % (mean / max) | s |" in md
    assert all(f"| {name} | {status[name]} |" in md for name in DRY_ROWS)
    assert md in proc.stdout  # the same table is printed


def test_a_step_past_its_timeout_is_stopped_with_its_children(tmp_path):
    """The timeout ends the whole process group (a launcher's ranks included) and names the limit."""
    from bicogan_dist.evaluate.gpu_check import DRY_SIZES, Context, StepError

    ctx = Context(DRY_SIZES, tmp_path, dry_run=True)
    pid_file = tmp_path / "grandchild.pid"
    script = f"import subprocess, time; p = subprocess.Popen(['sleep', '300']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(300)"
    with pytest.raises(StepError, match=r"^timed out after 3 s \(log "):
        ctx.run("sleepy", [sys.executable, "-c", script], timeout=3)
    grandchild = int(pid_file.read_text())
    import time

    def gone(pid: int) -> bool:  # a zombie waiting for a container's init to reap it counts as gone
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, IndexError):
            return True

    for _ in range(50):
        if gone(grandchild):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the step's child {grandchild} outlived the timeout")
