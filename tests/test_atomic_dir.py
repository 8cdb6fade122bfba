"""The one output-folder guard: refuse what is not ours, write beside, swap on success, clean up on failure and
after killed runs (never a live run's or another host's temporary folder)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bicogan_dist.atomic_dir import OutputExistsError, atomic_output, stale_siblings

HOST = socket.gethostname()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def txt_files(entry: Path) -> bool:
    return entry.suffix == ".txt"


def write(out: Path, text: str, force: bool = False) -> None:
    with atomic_output(out, force=force, what="notes", owned=txt_files, log=lambda line: None) as tmp:
        (tmp / "a.txt").write_text(text)


def test_new_output_then_refused_then_forced(tmp_path):
    out = tmp_path / "out"
    write(out, "one")
    assert (out / "a.txt").read_text() == "one"
    with pytest.raises(OutputExistsError, match=f"^{out} already holds notes; pass --force"):
        write(out, "two")
    write(out, "two", force=True)
    assert (out / "a.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_foreign_files_and_a_file_are_never_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.pdf").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"holds files this tool did not write \(keep.pdf\).*even with --force"):
        write(out, "x", force=True)
    assert [p.name for p in out.iterdir()] == ["keep.pdf"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="exists and is not a folder"):
        write(tmp_path / "file", "x", force=True)


def test_failure_leaves_neither_temp_nor_new_parents_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    write(out, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(out, force=True, what="notes", owned=txt_files) as tmp:
            (tmp / "a.txt").write_text("new")
            raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    nested = tmp_path / "x" / "y" / "out"
    with pytest.raises(RuntimeError):
        with atomic_output(nested, force=False, what="notes", owned=txt_files):
            raise RuntimeError("boom")
    assert not (tmp_path / "x").exists()


def test_output_taken_meanwhile_is_not_overwritten(tmp_path):
    """Checked again before the swap: a second run that finished first keeps its output."""
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="already holds notes"):
        with atomic_output(out, force=False, what="notes", owned=txt_files) as tmp:
            (tmp / "a.txt").write_text("slow")
            write(out, "fast")
    assert (out / "a.txt").read_text() == "fast" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_temp_sibling_names_its_owner(tmp_path):
    out = tmp_path / "out"
    with atomic_output(out, force=False, what="notes", owned=txt_files) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f"out.tmp-{HOST}-{os.getpid()}-")
        assert stale_siblings(out) == []  # our own, live


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="zombies are recognised through Linux /proc")
def test_a_killed_but_unreaped_process_counts_as_gone(tmp_path):
    """kill -9 leaves a zombie until its parent waits for it; it writes nothing, so its folder is stale."""
    import signal

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder = tmp_path / f"out.tmp-{HOST}-{proc.pid}-0badc0de"
        folder.mkdir()
        assert stale_siblings(out) == []  # running
        os.kill(proc.pid, signal.SIGKILL)
        for _ in range(100):  # the kill is delivered asynchronously; not reaped: we have not waited
            if Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.05)
        assert stale_siblings(out) == [folder]
    finally:
        proc.kill()
        proc.wait()


def test_stale_siblings_only_dead_owners_on_this_host(tmp_path):
    out = tmp_path / "out"
    dead = dead_pid()
    names = {
        "stale_tmp": f"out.tmp-{HOST}-{dead}-0badc0de",
        "live_tmp": f"out.tmp-{HOST}-{os.getpid()}-5afe5afe",
        "other_host": f"out.tmp-{HOST}x-{dead}-0e15e0e1",
        "stale_old": f"out.old-{HOST}-{dead}-01d01d01",
        "unrelated": f"output.tmp-{HOST}-{dead}-0badc0de",
        "legacy": "out.tmp-0badc0de",  # before owners were recorded: cannot tell, left alone
    }
    for name in names.values():
        (tmp_path / name).mkdir()
    found = {p.name for p in stale_siblings(out)}
    assert found == {names["stale_tmp"]}  # .old- only counts while out exists: it may be the only copy
    out.mkdir()
    found = {p.name for p in stale_siblings(out)}
    assert found == {names["stale_tmp"], names["stale_old"]}
    lines: list[str] = []
    with atomic_output(out, force=False, what="notes", owned=txt_files, log=lines.append) as tmp:
        (tmp / "a.txt").write_text("x")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"out", names["live_tmp"], names["other_host"], names["unrelated"], names["legacy"]}
    assert len(lines) == 2 and all("left by a run whose process is gone" in line for line in lines)
