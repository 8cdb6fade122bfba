"""Write a folder completely or not at all: build it beside the target, then swap it in by renames.

Used by every tool that writes a folder (shards, exports, generated sets), so a failed or
interrupted run never leaves a half-written output and a finished one replaces the old at once.
"""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path


def temp_sibling(out: Path) -> Path:
    """A fresh temporary folder beside ``out`` (same filesystem, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    return tmp


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out`` by renames; a previous ``out`` is removed last."""
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{secrets.token_hex(4)}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
