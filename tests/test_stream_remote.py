"""Shards from a URL or a ``pipe:`` command: same batches as the local folder, exact resume, clear faults.

A real HTTP server on 127.0.0.1 (``http.server`` in a thread, started here) serves a shard folder;
a second one misbehaves on purpose (closes the connection after N bytes of a shard). ``pipe:``
sources run real shell commands. The 2-process runs use real ``torch.distributed`` (gloo) and real
``accelerate launch``.
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from bicogan_dist.data.loader import DataConfig, build_loader, load_split
from bicogan_dist.data.manifest import ShardError, ShardManifest
from bicogan_dist.data.shard_io import ShardLocation

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_loader import WORKER, _free_port, ids, make_shards  # noqa: E402

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    """http.server's file handler without a log line per request."""

    def log_message(self, *args) -> None:  # noqa: D401
        pass


class _Cutting(_Quiet):
    """Serves files, but the first ``cuts`` GETs of ``*.tar`` send the full Content-Length and only ``after``
    bytes, then close the connection (``cuts`` < 0: every GET). Range requests are ignored (as http.server does)."""

    after = 5000
    cuts = -1
    served: list[str] = []

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        type(self).served.append(self.path)
        if path.suffix != ".tar" or not path.is_file() or type(self).cuts == 0:
            return super().do_GET()
        if type(self).cuts > 0:
            type(self).cuts -= 1
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: self.after])
        self.wfile.flush()
        self.close_connection = True


def _serve(folder: Path, handler: type = _Quiet) -> tuple[http.server.ThreadingHTTPServer, str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/set"


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[Path, str]]:
    """Training: 96 samples in 3 shards (40, 40, 16); PublicTest: 50 in 2 — as a folder and as a URL."""
    root = tmp_path_factory.mktemp("www")
    make_shards(root / "set", {"Training": 96, "PublicTest": 50}, shard_size=40)
    server, url = _serve(root)
    yield root / "set", url
    server.shutdown()


@pytest.fixture
def copy(served, tmp_path) -> Path:
    """A writable copy of the served set under tmp_path/www/set, for tests that damage it."""
    folder, _ = served
    dest = tmp_path / "www" / "set"
    shutil.copytree(folder, dest)
    return dest


def batches(source, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(source.epoch(epoch, start_batch=start))


def loaders(shards: str, world: int = 2, **kw) -> list:
    cfg = DataConfig(shards=shards, **{"batch_size": 8, "num_workers": 2, "shuffle_buffer": 16, **kw})
    return [build_loader(cfg, rank=r, world_size=world, device=CPU, seed=5) for r in range(world)]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


# --------------------------------------------------------------------------- the same batches as local


@pytest.mark.parametrize("mode", ["stream", "memory"])
def test_http_and_pipe_give_the_local_batches_and_resume_exactly(served, mode):
    folder, url = served
    local = loaders(str(folder), mode=mode)
    for shards in (url, f"pipe:cat {folder}/{{}}"):
        remote = loaders(shards, mode=mode)
        assert [r.batches_per_epoch for r in remote] == [6, 6] and remote[0].label_names == local[0].label_names
        for r in range(2):
            want = batches(local[r], 1)
            assert same(batches(remote[r], 1), want), (shards, r)
            assert same(batches(remote[r], 1, start=4), want[4:]), (shards, r)  # resume from batch 4


def test_resampled_from_http_with_fewer_shards_than_ranks_times_workers(served):
    folder, url = served  # PublicTest: 2 shards for 2 ranks x 2 workers
    remote = loaders(url, mode="stream", split="PublicTest", batch_size=5, resampled=True)
    local = loaders(str(folder), mode="stream", split="PublicTest", batch_size=5, resampled=True)
    for r in range(2):
        got = batches(remote[r], 0)
        assert len(got) == 5 and all(x.shape == (5, 1, 48, 48) for x, _ in got)
        assert same(got, batches(local[r], 0)) and same(batches(remote[r], 0, start=3), got[3:])
        assert set(i for x, _ in got for i in ids(x)) <= set(range(50))


def test_manifest_and_load_split_from_http_and_pipe(served):
    folder, url = served
    want = load_split(folder, "Training")
    for shards in (url, f"pipe:cat {folder}/{{}}"):
        assert ShardManifest.load(shards).splits["Training"].count == 96
        got = load_split(shards, "Training")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    five = load_split(url, "Training", limit=5)
    assert torch.equal(five[0], want[0][:5])


def test_cache_dir_keeps_downloaded_shards(copy, tmp_path):
    server, url = _serve(copy.parent)
    cache = tmp_path / "cache"
    try:
        first = loaders(url, mode="stream", cache_dir=str(cache))
        want = [batches(src, 0) for src in first]
    finally:
        server.shutdown()
        server.server_close()
    location = ShardLocation.parse(url, cache_dir=str(cache))
    cached = sorted(p.name for p in location.cache_path("x").parent.iterdir())
    assert cached == ["Training-000000.tar", "Training-000001.tar", "Training-000002.tar"]
    assert location.cache_path("Training-000000.tar").read_bytes() == (copy / "Training-000000.tar").read_bytes()
    # The server is gone: the manifest cannot be read (it is never cached), but the shards come from the cache.
    with pytest.raises(ShardError, match=f"{url}/manifest.json: gave up after"):
        loaders(url, mode="stream", cache_dir=str(cache), retries=0)
    src = build_loader(DataConfig(shards=f"pipe:cat {copy}/{{}}", batch_size=8, num_workers=2, shuffle_buffer=16,
                                  mode="stream"), rank=1, world_size=2, device=CPU, seed=5)
    assert same(batches(src, 0), want[1])


# ----------------------------------------------------------------------------------------------- faults


@pytest.mark.parametrize("mode", ["stream", "memory"])
def test_http_404_names_the_url(copy, mode):
    (copy / "Training-000001.tar").unlink()
    server, url = _serve(copy.parent)
    try:
        with pytest.raises(ShardError, match=f"{url}/Training-000001.tar: HTTP 404"):
            for src in loaders(url, mode=mode):
                batches(src, 0)
        with pytest.raises(ShardError, match=f"{url}/nowhere/manifest.json: HTTP 404 File not found"):
            ShardManifest.load(url + "/nowhere")
    finally:
        server.shutdown()


def test_pipe_command_failing_names_the_command(served, tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(ShardError, match=f"pipe command 'cat {missing}/manifest.json' exited with status 1: cat: "):
        ShardManifest.load(f"pipe:cat {missing}/{{}}")
    folder, _ = served
    # manifest fine, shards not: the command fails for the shard, in a worker
    cmd = f"pipe:case {{}} in manifest.json) cat {folder}/{{}};; *) echo no such object >&2; exit 3;; esac"
    with pytest.raises(ShardError, match=r"pipe command 'case Training-00000\d.tar in .*exited with status 3: "
                                         r"no such object"):
        batches(loaders(cmd, mode="stream")[0], 0)


def test_stalled_pipe_command_times_out_and_is_stopped(tmp_path):
    pids = tmp_path / "pids"
    location = ShardLocation.parse(f"pipe:echo $$ > {pids}; exec sleep 60 # {{}}", timeout=1)
    with pytest.raises(ShardError, match=r"pipe command 'echo .* produced no output for 1 s \(data.timeout\)"):
        ShardManifest.load(location)
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left sleeping
        os.kill(int(pids.read_text()), 0)


@pytest.mark.parametrize("mode", ["stream", "memory"])
def test_connection_cut_is_retried_then_fails_naming_the_url(copy, mode):
    _Cutting.after, _Cutting.cuts, _Cutting.served = 5000, -1, []
    server, url = _serve(copy.parent, _Cutting)
    try:
        with pytest.raises(ShardError, match=rf"{url}/Training-00000\d.tar: gave up after 3 failed attempts "
                                             rf"\(data.retries=2\) at byte 5000 of \d+"):
            batches(loaders(url, mode=mode, retries=2)[0], 0)
        _Cutting.cuts = 2  # two cut answers, then good ones: the retries recover
        got = batches(loaders(url, mode=mode, retries=2)[0], 0)
        assert same(got, batches(loaders(str(copy), mode=mode)[0], 0))
    finally:
        server.shutdown()


@pytest.mark.parametrize("mode", ["stream", "memory"])
def test_truncated_shard_over_http_names_the_url(copy, mode):
    path = copy / "Training-000001.tar"
    path.write_bytes(path.read_bytes()[:30000])
    server, url = _serve(copy.parent)
    try:
        with pytest.raises(ShardError, match=f"{url}/Training-000001.tar (is truncated|holds 5 samples)"):
            for src in loaders(url, mode=mode, world=1):
                batches(src, 0)
    finally:
        server.shutdown()


def test_sha256_mismatch_over_http_names_the_url(copy):
    path = copy / "Training-000002.tar"
    data = bytearray(path.read_bytes())
    data[2000] ^= 0xFF  # tar padding: the shard still reads, only sha256 can tell
    path.write_bytes(bytes(data))
    server, url = _serve(copy.parent)
    try:
        loaders(url, mode="stream")  # not checked unless asked
        with pytest.raises(ShardError, match=f"shard {url}/Training-000002.tar does not match its sha256"):
            loaders(url, mode="stream", verify=True)
    finally:
        server.shutdown()


def test_unreachable_server_fails_within_the_retries(served):
    port = _free_port()  # nothing listens there
    with pytest.raises(ShardError, match=rf"http://127.0.0.1:{port}/x/manifest.json: gave up after 2 failed "
                                         rf"attempts \(data.retries=1\) at byte 0"):
        ShardManifest.load(ShardLocation.parse(f"http://127.0.0.1:{port}/x", retries=1))


@pytest.mark.parametrize("workers", [0, 2])
def test_pipe_processes_are_reaped(served, tmp_path, workers):
    """Every pipe: process is gone (not running, not a zombie) after a full epoch (the workers stay for
    the next one), after an early stop and after close()."""
    folder, _ = served
    pids = tmp_path / "pids"
    cmd = f"pipe:echo $$ >> {pids}; exec cat {folder}/{{}}"
    src = loaders(cmd, mode="stream", num_workers=workers)[0]

    def alive() -> list[int]:
        found = []
        for pid in [int(p) for p in pids.read_text().split()]:
            try:
                os.kill(pid, 0)  # succeeds for a running process and for an unreaped zombie
                found.append(pid)
            except ProcessLookupError:
                pass
        return found

    assert len(batches(src, 0)) == 6
    assert alive() == []  # no sleep: the epoch's end waits for the workers to close their streams
    it = src.epoch(1)
    next(it)
    it.close()  # the consumer stops early: workers shut down, open pipes killed and reaped
    del it
    time.sleep(0.5)
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) >= 4  # manifest + shards of two epochs
    assert alive() == []
    it = src.epoch(2)
    next(it)
    src.close()  # ends the epoch being read and the workers
    assert alive() == []
    with pytest.raises(StopIteration):
        next(it)
    assert len(batches(src, 3)) == 6  # a closed source starts new workers
    src.close()
    assert alive() == []


def test_a_finished_epoch_waits_for_the_workers_to_close_their_pipes(tmp_path):
    """The last batch comes only after the persistent workers finished their parts: a pipe that is
    still sending the rest of a shard (after what the epoch needs) is read to its end and reaped,
    not left to the next epoch. Each shard's command pauses 2 s before its end-of-archive blocks."""
    import tarfile

    folder = tmp_path / "set"
    make_shards(folder, {"Training": 2200}, shard_size=1100)
    ends = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            last = t.getmembers()[-1]
        ends[tar.name] = last.offset_data + -(-last.size // 512) * 512  # where the end-of-archive starts
    cases = " ".join(f"{name}) n={n};;" for name, n in ends.items())
    pids = tmp_path / "pids"
    cmd = (f"pipe:echo $$ >> {pids}; case {{}} in {cases} *) n=0;; esac; f={folder}/{{}}; "
           f"if [ $n -gt 0 ]; then head -c $n $f; sleep 2; tail -c +$((n + 1)) $f; else cat $f; fi")
    src = build_loader(DataConfig(shards=cmd, mode="stream", batch_size=1000, num_workers=1, shuffle_buffer=16,
                                  timeout=30), rank=0, world_size=1, device=CPU, seed=5)
    need = src.batches_per_epoch * src.batch_size + 16 + 50  # + shuffle buffer + a margin
    counts = src.split.counts

    def late_end(epoch: int) -> bool:
        """Does the worker reach a shard's end (the 2 s pause) only after the samples the epoch needs?"""
        pos = 0
        for shard, lo, hi in src.plan(epoch).segments[0]:
            pos += hi - lo
            if hi == counts[shard] and pos >= need:
                return True
        return False

    epoch = next(e for e in range(200) if late_end(e))
    assert len(batches(src, epoch)) == 2
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) >= 3  # manifest + the shards
    alive = []
    for pid in started:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    assert alive == []
    src.close()


# ------------------------------------------------------------------------------------ real processes


def test_two_real_processes_stream_from_http_like_the_local_folder(served, tmp_path):
    """Two processes joined by gloo read the URL: equal batch counts (a hang otherwise), the local batches."""
    folder, url = served
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    results = {}
    for name, shards in (("http", url), ("local", str(folder))):
        out = tmp_path / name
        out.mkdir()
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, str(script), shards, str(out)], env={**env, "RANK": str(r)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
        for p in procs:
            log, _ = p.communicate(timeout=240)
            assert p.returncode == 0, log.decode()
        results[name] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in range(2):
        assert results["http"][r]["world_size"] == 2
        assert results["http"][r]["seen"] == results["local"][r]["seen"]
    a, b = (results["http"][r]["seen"]["stream0"] for r in range(2))
    assert len(a) == len(b) == 48 and sorted(a + b) == list(range(96))


def _launch(run_dir: Path, shards: str, steps: int, *extra: str, resume: bool = False) -> str:
    from test_resume_launcher import CPU_2PROC, SMOKE, TINY, env

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
           "--main_process_port", str(_free_port()), "-m", "bicogan_dist.train", "--config", str(SMOKE)]
    if resume:
        cmd += ["--resume", "latest"]
    cmd += [f"data.shards={shards}", f"log.run_dir={run_dir}", *TINY, "data.mode=stream", "data.num_workers=2",
            "data.shuffle_buffer=64", "log.image_every=1000", *extra, f"train.max_steps={steps}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]  # a non-finite loss exits 3, unequal batch counts hang
    assert "2 process(es) on cpu" in output
    return output


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from bicogan_dist.train import checkpoint as ckpt

    weights = ckpt.weights(ckpt.list_checkpoints(run_dir)[-1])
    return {f"{unit}.{k}": v for unit, sd in weights.items() for k, v in sd.items()}


def test_accelerate_training_from_http_matches_the_local_folder_and_resumes(served, tmp_path):
    """2-process ``accelerate launch`` training streaming from the URL, across an epoch boundary (96 samples,
    2 x 16 a step: 3 steps an epoch), equals the same run from the local folder (same batches, bit for bit),
    and a run stopped at step 4 and resumed from the URL equals the straight one."""
    folder, url = served
    straight, local, split = tmp_path / "http", tmp_path / "local", tmp_path / "split"
    _launch(straight, url, 7)
    _launch(local, str(folder), 7)
    w_http, w_local = _weights(straight), _weights(local)
    assert w_http.keys() == w_local.keys() and len(w_http) > 10
    assert all(torch.equal(w_http[k], w_local[k]) for k in w_http)
    _launch(split, url, 4)
    out = _launch(split, url, 7, resume=True)
    assert "starting at step 4" in out
    w_split = _weights(split)
    assert all(torch.allclose(w_http[k].float(), w_split[k].float(), atol=1e-6, rtol=0) for k in w_http)


def test_exact_cover_reads_the_split_about_once_per_epoch(served, tmp_path):
    """4 ranks x 1 worker over 3 shards: each reader opens only the shards its block overlaps (at most
    shards + readers opens an epoch, not ranks x shards), and the ranks still cover the split once."""
    folder, _ = served
    log = tmp_path / "opened"
    cmd = f"pipe:echo {{}} >> {log}; exec cat {folder}/{{}}"
    ranks = loaders(cmd, world=4, mode="stream", num_workers=1, batch_size=4)
    log.write_text("")
    seen = [i for src in ranks for x, _ in src.epoch(3) for i in ids(x)]
    assert sorted(seen) == list(range(96))
    opened = log.read_text().split()
    assert set(opened) == {"Training-000000.tar", "Training-000001.tar", "Training-000002.tar"}
    assert len(opened) <= 3 + 4
