"""Write a folder completely or not at all: build it beside the target, then swap it in by renames.

Used by every tool that writes a folder (shards, exports, generated sets), so a failed or
interrupted run never leaves a half-written output and a finished one replaces the old at once.

The temporary siblings are named ``<out>.tmp-<host>-<pid>-<hex>`` (and ``<out>.old-...`` for the
previous output during the swap), so they record which process made them. A process killed
with SIGKILL cannot remove its sibling; the next run on the same ``out`` removes every sibling
whose owner process no longer exists on this host, and never one of a live process or of
another host (a shared filesystem may hold another node's run in progress).
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


class OutputExistsError(RuntimeError):
    """The output folder is occupied and the run may not replace it; the message names it and what to do."""


def _owner_tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _sibling(out: Path, kind: str) -> Path:
    return out.with_name(f"{out.name}.{kind}-{_owner_tag()}-{secrets.token_hex(4)}")


def temp_sibling(out: Path) -> Path:
    """A fresh temporary folder beside ``out`` (same filesystem, so the final rename is atomic), named after
    its owner (so a later run can tell whether it is stale)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "tmp")
    tmp.mkdir()
    return tmp


def _missing_ancestor(path: Path) -> Path | None:
    """The topmost folder of ``path``'s ancestry that does not exist yet (what a failed run must not leave)."""
    top = None
    for parent in path.parents:
        if parent.exists():
            break
        top = parent
    return top


def _remove_empty_up_to(start: Path, top: Path) -> None:
    """rmdir ``start`` and its parents up to ``top`` while they are empty."""
    for folder in (start, *start.parents):
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == top:
            return


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out`` by renames; a previous ``out`` is removed last."""
    old = None
    if out.exists():
        old = _sibling(out, "old")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _zombie(pid: int) -> bool:
    """A killed process its parent has not reaped yet still answers kill(pid, 0) but writes nothing (Linux /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].startswith("Z")


def process_gone(host: str, pid: int) -> bool:
    """True only when ``pid`` is known not to run: same host and no such process (or only its zombie).
    Unsure means alive."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # another user's process, or not a pid at all: leave it be
        return False
    return _zombie(pid)


def stale_siblings(out: Path) -> list[Path]:
    """Temporary siblings of ``out`` whose owner process is gone (``.old-`` ones only while ``out`` exists,
    since a run killed between its two renames leaves the previous output only there)."""
    pattern = re.compile(re.escape(out.name) + r"\.(tmp|old)-(.+)-(\d+)-[0-9a-f]{8}")
    if not out.parent.is_dir():
        return []
    stale = []
    for path in sorted(out.parent.iterdir()):
        m = pattern.fullmatch(path.name)
        if m is None or not path.is_dir() or (m.group(1) == "old" and not out.exists()):
            continue
        if process_gone(m.group(2), int(m.group(3))):
            stale.append(path)
    return stale


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def remove_stale_siblings(out: Path, log: Callable[[str], None] = _stderr) -> list[Path]:
    """Delete the siblings :func:`stale_siblings` finds (left by killed runs); returns them."""
    removed = stale_siblings(out)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
        log(f"removed {path}: left by a run whose process is gone")
    return removed


def check_target(out: Path, force: bool, what: str, owned: Callable[[Path], bool],
                 error: type[Exception] = OutputExistsError) -> None:
    """Refuse an ``out`` that is a file, holds anything the tool did not write (even with --force), or holds
    ``what`` (an earlier output of the tool) without ``force``. ``owned(entry)`` says which entries are the tool's;
    ``error`` is the caller's exception type, so each tool keeps the errors its users catch."""
    if out.exists() and not out.is_dir():
        raise error(f"{out} exists and is not a folder; pick a folder for --out")
    if not out.is_dir():
        return
    entries = sorted(out.iterdir())
    if not entries:
        return
    foreign = [p.name for p in entries if not owned(p)]
    if foreign:
        raise error(f"{out} is not empty and holds files this tool did not write ({', '.join(foreign[:5])}); "
                    f"refusing to replace it, even with --force: move them or pick another --out")
    if not force:
        raise error(f"{out} already holds {what}; pass --force to replace it, or pick another --out")


@contextmanager
def atomic_output(out: str | Path, *, force: bool, what: str, owned: Callable[[Path], bool],
                  error: type[Exception] = OutputExistsError,
                  log: Callable[[str], None] = _stderr) -> Iterator[Path]:
    """Check ``out`` (see :func:`check_target`), clear stale siblings, yield a fresh temporary sibling to write
    into; when the block succeeds ``out`` is checked again (another run may have written there meanwhile) and
    replaced by it, and on any failure the temporary folder is removed, so ``out`` is never half-written."""
    out = Path(os.path.abspath(out))  # absolute, so "." or "x/.." still have a name and a parent for the swap
    check_target(out, force, what, owned, error)
    remove_stale_siblings(out, log)
    created = _missing_ancestor(out)
    tmp = temp_sibling(out)
    try:
        yield tmp
        check_target(out, force, what, owned, error)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            if created is not None:  # a failed run leaves no folders it made for --out either
                _remove_empty_up_to(out.parent, created)
