"""How a rank lives under a launcher (``accelerate launch`` / torchrun): it stops when the launcher dies, and
tells the launcher why it failed.

Under ``accelerate launch`` with more than one process, the ranks are children of torchrun's
elastic agent, which runs inside the launcher process itself (``accelerate launch`` calls
torchrun in-process). A launcher killed with SIGKILL cannot pass anything on, so its ranks would
train on as orphans, writing checkpoints nobody asked for. :func:`stop_with_launcher` asks Linux
to send this rank SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``), and a watchdog
thread that polls ``os.getppid()`` sends it as well should the kernel's signal not come (the
signal follows the parent *thread*, and other systems lack it); the trainer turns SIGTERM into
"finish the step, save a checkpoint, exit", and the stop is agreed over ranks, so a job whose
launcher on one node died stops everywhere with a good checkpoint.

:func:`report_error` writes the trainer's ``error:`` line into the file torchrun names in
``TORCHELASTIC_ERROR_FILE``, so the launcher's failure report shows that line as the root cause
instead of "To enable traceback see: ...".
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

#: linux/prctl.h
PR_SET_PDEATHSIG = 1
#: Set by torchrun's agent (hence by ``accelerate launch`` with 2+ processes) in every rank's environment.
TORCHRUN_ENV = "TORCHELASTIC_RUN_ID"
#: Set by ``accelerate launch`` in the one process it starts itself (single-process launch configs).
ACCELERATE_ENV = "ACCELERATE_MIXED_PRECISION"
#: Words in a launcher's command line (accelerate launch, torchrun, python -m torch.distributed.run).
LAUNCHER_NAMES = (b"accelerate", b"torchrun", b"torch.distributed.run")
#: Seconds between the watchdog's looks at the parent.
WATCH_EVERY_S = 2.0
_watching: set[int] = set()  # parents a watchdog already watches (train() may run more than once in a process)


def started_by_launcher() -> bool:
    """True in a rank that ``accelerate launch`` or torchrun started (their environment says so)."""
    return TORCHRUN_ENV in os.environ or ACCELERATE_ENV in os.environ


def stop_with_launcher() -> bool:
    """Have SIGTERM delivered to this process when its launcher (its parent) dies; True when armed.

    Only in ranks a launcher started: a plain ``python -m bicogan_dist.train`` (say under nohup)
    must outlive the shell that started it. The parent may already be gone when this runs (the
    launcher killed during start-up): then this process was re-parented before the request and
    no signal would ever come, so it sends itself SIGTERM now.
    """
    if not started_by_launcher():
        return False
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            print(f"warning: prctl(PR_SET_PDEATHSIG) failed ({os.strerror(ctypes.get_errno())}); only a watchdog "
                  f"stops this rank when its launcher dies", file=sys.stderr, flush=True)
    if _orphaned(parent):
        os.kill(os.getpid(), signal.SIGTERM)
        return True
    if parent not in _watching:
        _watching.add(parent)
        threading.Thread(target=_watch_parent, args=(parent,), name="stop-with-launcher", daemon=True).start()
    return True


def _orphaned(parent: int) -> bool:
    """True when this rank's launcher is gone: the parent changed since ``parent`` was read, or the parent is
    init (pid 1) and init is not itself the launcher (in a container the launcher may be pid 1; then it is alive)."""
    if os.getppid() != parent:
        return True
    if parent != 1:
        return False
    try:
        init = Path("/proc/1/cmdline").read_bytes()
    except OSError:
        return False  # cannot tell: never stop a run that may be healthy
    return not any(name in init for name in LAUNCHER_NAMES)


def _watch_parent(parent: int) -> None:
    """SIGTERM to this process once its parent is no longer ``parent`` (it died and this one was re-parented)."""
    while os.getppid() == parent:
        time.sleep(WATCH_EVERY_S)
    os.kill(os.getpid(), signal.SIGTERM)


def report_error(message: str) -> None:
    """Hand ``message`` (the trainer's ``error:`` line) to torchrun's failure report, when a launcher asked for it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as fh:
            json.dump({"message": message, "timestamp": int(time.time())}, fh)
    except OSError:
        pass  # the message is on stderr already; the report only repeats it
