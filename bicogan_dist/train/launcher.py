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
from typing import Mapping

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


#: Addresses that name this machine only: a rendezvous host other nodes can never reach.
LOOPBACK = ("127.", "localhost", "::1", "0.0.0.0")


def nodes_in_job(env: Mapping[str, str] | None = None) -> int:
    """How many machines the launcher's job spans: torchrun's ``GROUP_WORLD_SIZE`` (agents, one per node), else
    ``WORLD_SIZE // LOCAL_WORLD_SIZE``; 1 outside a launcher."""
    env = os.environ if env is None else env
    try:
        if env.get("GROUP_WORLD_SIZE"):
            return int(env["GROUP_WORLD_SIZE"])
        if env.get("WORLD_SIZE") and env.get("LOCAL_WORLD_SIZE"):
            return max(1, int(env["WORLD_SIZE"]) // max(1, int(env["LOCAL_WORLD_SIZE"])))
    except ValueError:
        return 1
    return 1


def multinode_address_problem(env: Mapping[str, str] | None = None) -> str | None:
    """Why this multi-node job's rendezvous address is wrong (unset, or this machine only), else None.

    ``launch_configs/accelerate/multinode_2x8.yaml`` has no default address on purpose: with
    127.0.0.1 every node would rendezvous with itself. A job whose nodes could not meet hangs in
    torchrun's rendezvous before any rank starts, so this check (run by every rank at start) sees
    the jobs that did meet with a loopback address on some node, and the launch command names the fix.
    """
    env = os.environ if env is None else env
    nodes = nodes_in_job(env)
    if nodes <= 1:
        return None
    addr = (env.get("MASTER_ADDR") or "").strip()
    if addr and addr != "None" and not addr.lower().startswith(LOOPBACK):
        return None
    shown = addr or "unset"
    return (f"a {nodes}-node job needs node 0's address, but MASTER_ADDR is {shown}: pass "
            f"--main_process_ip NODE0_ADDRESS (an address every node can reach) to accelerate launch on every node, "
            f"as launch_configs/slurm/train_multinode.sbatch does")
