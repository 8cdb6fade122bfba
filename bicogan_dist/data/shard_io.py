"""Where a shard set lives and how its bytes are read: a local folder, an HTTP(S) base URL, or a ``pipe:`` command.

``data.shards`` names one of three places, each holding ``manifest.json`` and the tar shards:

* a local folder: ``data_shards/fer2013``;
* a base URL: ``https://host/fer2013`` (files at ``https://host/fer2013/manifest.json``, ...);
* a ``pipe:`` command template whose ``{}`` stands for a file name, run by ``sh`` with the file on
  its stdout: ``pipe:aws s3 cp s3://bucket/fer2013/{} -``, ``pipe:gsutil cat gs://bucket/fer2013/{}``.

:func:`read_shard` is the one reader of shard contents (both loader modes and ``load_split`` use it):
a streaming tar header parser (:func:`tar_members`, webdataset's ``tar_file_iterator`` contract at
~1/8 of its CPU) and webdataset's key grouping over the opened stream, plus the checks the
manifest allows (sample count, png and cls present, class in range), each naming the URL.

Faults end in a :class:`ShardError` naming the URL or command, never in a hang: an HTTP 4xx
answer fails at once; refused or cut connections and 5xx answers are retried ``retries`` times
(resuming with a ``Range`` request where the server supports it) with a socket ``timeout`` on
every connect and read; a ``pipe:`` command that exits non-zero fails with its status and the
tail of its stderr. A pipe's process group is killed and reaped when its stream is closed
(also when a consumer stops early), so no zombie or orphan is left behind.

With ``cache_dir`` remote shards are downloaded once into ``cache_dir/<hash of data.shards>/<file>``
(webdataset's ``cache_dir`` idea, with the faults above; atomic rename, so concurrent ranks and
workers on a node are safe) and read from there; the manifest itself is never cached.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Literal

from bicogan_dist.data.manifest import ShardError

__all__ = ["ShardLocation", "read_shard", "sha256_of", "tar_members"]

#: File names a ``pipe:`` template may receive (they go into a shell command unquoted).
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
#: Bytes a stream buffers between the network/pipe and the tar reader.
_BUFFER = 1 << 20


@dataclass(frozen=True)
class ShardLocation:
    """A parsed ``data.shards`` value plus how to reach it (retries, timeouts, cache)."""

    spec: str
    kind: Literal["local", "http", "pipe"]
    retries: int = 3
    timeout: float = 60.0
    cache_dir: str = ""

    @classmethod
    def parse(cls, spec: "str | Path | ShardLocation", *, retries: int = 3, timeout: float = 60.0,
              cache_dir: str = "") -> "ShardLocation":
        """``spec`` as a local folder, ``http(s)://`` base URL or ``pipe:`` template; ShardError when malformed."""
        if isinstance(spec, ShardLocation):
            return spec
        s = str(spec).strip()
        if s.startswith(("http://", "https://")):
            kind = "http"
        elif s.startswith("pipe:"):
            if "{}" not in s:
                raise ShardError(f"data.shards: the pipe command {s!r} has no {{}} for the file name; for example "
                                 f"'pipe:aws s3 cp s3://bucket/fer2013/{{}} -'")
            kind = "pipe"
        elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", s):
            raise ShardError(f"data.shards: {s!r} is not a local folder, an http(s):// base URL or a pipe: command "
                             f"(for s3:// or gs:// use 'pipe:aws s3 cp s3://.../{{}} -' or 'pipe:gsutil cat gs://.../{{}}')")
        else:
            kind = "local"
        return cls(s, kind, retries, timeout, cache_dir)

    @property
    def is_remote(self) -> bool:
        return self.kind != "local"

    def url(self, name: str) -> str:
        """What names file ``name`` of the set: a path, a URL, or ``pipe:COMMAND`` (used in every error)."""
        if self.kind == "local":
            return str(Path(self.spec) / name)
        if self.kind == "http":
            return self.spec.rstrip("/") + "/" + urllib.parse.quote(name)
        if not _SAFE_NAME.match(name):
            raise ShardError(f"{self.spec}: file name {name!r} from the manifest is not safe to put in a shell "
                             f"command (allowed: letters, digits, '.', '_', '-')")
        return self.spec.replace("{}", name)

    def open(self, name: str, *, cache: bool = True) -> BinaryIO:
        """A readable binary stream of file ``name`` (from the cache when one is set and ``cache``)."""
        if cache and self.cache_dir and self.is_remote:
            return open(self._cached(name), "rb")
        return self._open_url(self.url(name))

    def read_text(self, name: str) -> str:
        with self.open(name, cache=False) as fh:
            return fh.read().decode("utf-8")

    def _open_url(self, url: str) -> BinaryIO:
        if self.kind == "local":
            try:
                return open(url, "rb")
            except FileNotFoundError:
                raise ShardError(f"shard {url} listed in the manifest is missing") from None
        if self.kind == "http":
            return io.BufferedReader(_HTTPStream(url, self.retries, self.timeout), _BUFFER)  # type: ignore[return-value]
        return io.BufferedReader(_PipeStream(url[len("pipe:"):], self.timeout), _BUFFER)  # type: ignore[return-value]

    def cache_path(self, name: str) -> Path:
        """Where ``name`` is cached: one sub-folder per ``data.shards`` value, so sets never mix."""
        return Path(self.cache_dir) / hashlib.sha256(self.spec.encode()).hexdigest()[:16] / name

    def _cached(self, name: str) -> Path:
        dest = self.cache_path(name)
        if dest.is_file():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(f"{dest.name}.part-{os.getpid()}")
        try:
            with self._open_url(self.url(name)) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, _BUFFER)
            os.replace(part, dest)  # atomic: another rank or worker sees all of it or nothing
        finally:
            part.unlink(missing_ok=True)
        return dest


# ------------------------------------------------------------------------------------------ HTTP


class _HTTPStream(io.RawIOBase):
    """An HTTP GET as a raw stream that survives cut connections: up to ``retries`` reconnects per file,
    resuming at the byte it stopped (``Range``; skipping ahead when the server ignores it)."""

    def __init__(self, url: str, retries: int, timeout: float) -> None:
        super().__init__()
        self.url, self.retries, self.timeout = url, retries, timeout
        self.pos = 0
        self.total: int | None = None
        self.failures = 0
        self.resp: http.client.HTTPResponse | None = None
        self._connect()

    def readable(self) -> bool:
        return True

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        if self.failures > self.retries:
            of = f" of {self.total}" if self.total is not None else ""
            raise ShardError(f"{self.url}: gave up after {self.failures} failed attempts (data.retries={self.retries}) "
                             f"at byte {self.pos}{of}: {exc}") from None
        time.sleep(min(2.0, 0.2 * 2 ** (self.failures - 1)))

    def _drop(self) -> None:
        if self.resp is not None:
            try:
                self.resp.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped anyway
                pass
            self.resp = None

    def _connect(self) -> None:
        while True:
            headers = {"Range": f"bytes={self.pos}-"} if self.pos else {}
            try:
                resp = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers), timeout=self.timeout)
            except urllib.error.HTTPError as exc:
                exc.close()
                if exc.code in (408, 429) or exc.code >= 500:
                    self._failed(exc)
                    continue
                raise ShardError(f"{self.url}: HTTP {exc.code} {exc.reason}") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                self._failed(exc)
                continue
            length = resp.headers.get("Content-Length")
            if self.pos and resp.status == 206:
                if self.total is None and length is not None:
                    self.total = self.pos + int(length)
                self.resp = resp
                return
            if length is not None:
                self.total = int(length)
            try:
                _skip(resp, self.pos)  # server ignored Range (or this is the first request, pos 0)
            except (OSError, http.client.HTTPException, EOFError) as exc:
                resp.close()
                self._failed(exc)
                continue
            self.resp = resp
            return

    def readinto(self, b: Any) -> int:
        while True:
            try:
                n = self.resp.readinto(b) if self.resp is not None else 0
            except (OSError, http.client.HTTPException) as exc:  # reset, timeout, IncompleteRead
                err: BaseException = exc
            else:
                if n or not len(b):
                    self.pos += n
                    return n
                if self.total is None or self.pos >= self.total:
                    return 0
                err = EOFError(f"connection closed after {self.pos} of {self.total} bytes")
            self._drop()
            self._failed(err)
            self._connect()

    def close(self) -> None:
        self._drop()
        super().close()


def _skip(resp: Any, n: int) -> None:
    while n > 0:
        got = len(resp.read(min(n, _BUFFER)))
        if got == 0:
            raise EOFError("connection closed while skipping to the resume point")
        n -= got


# ------------------------------------------------------------------------------------------ pipe


class _PipeStream(io.RawIOBase):
    """Stdout of ``sh -c COMMAND`` as a raw stream; a non-zero exit, or no output for ``timeout`` seconds,
    is a ShardError naming the command.

    The command runs in its own process group; :meth:`close` kills the group if it still runs and
    always waits for it (no zombies), whether the stream was read to the end or abandoned.
    """

    def __init__(self, command: str, timeout: float) -> None:
        super().__init__()
        self.command, self.timeout = command, timeout
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._stderr, start_new_session=True)  # noqa: S602 - the user's command

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], self.timeout)
        if not ready:
            raise ShardError(f"pipe command {self.command!r} produced no output for {self.timeout:g} s "
                             f"(data.timeout); stopped it")
        n = os.readv(fd, [b])
        if n == 0 and len(b):
            try:
                status = self.proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                raise ShardError(f"pipe command {self.command!r} closed its output but did not exit within "
                                 f"{self.timeout:g} s (data.timeout)") from None
            if status != 0:
                self._stderr.seek(0)
                tail = self._stderr.read()[-1000:].decode("utf-8", "replace").strip()
                raise ShardError(f"pipe command {self.command!r} exited with status {status}"
                                 + (f": {tail}" if tail else ""))
        return n

    def close(self) -> None:
        if not self.closed:
            if self.proc.poll() is None:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    try:
                        os.killpg(self.proc.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        self.proc.wait(timeout=5)
                        break
                    except subprocess.TimeoutExpired:
                        continue
            self.proc.wait()
            self.proc.stdout.close()
            self._stderr.close()
        super().close()


# --------------------------------------------------------------------------------------- reading


def _clean(exc: BaseException) -> str:
    """An exception's message without the `` @ <stream>`` webdataset appends to it."""
    text = str(exc.args[0]) if exc.args else type(exc).__name__
    return text.split(" @ ", 1)[0]


def tar_members(stream: BinaryIO, where: str, skip: tuple[str, ...] = (".json",)) -> Iterator[dict]:
    """webdataset's ``tar_file_iterator`` contract (``{"fname", "data"}`` per regular member, in order) from
    a stream, parsing the 512-byte headers directly: ~8x less CPU than ``tarfile``'s streaming mode,
    which was most of a streamed sample's cost (README section 7, ``tools/bench_data.py``).

    Reads what Python's ``tarfile`` writes (ustar, GNU long names, pax ``path``); members whose
    name ends with one of ``skip`` are read past unparsed. Raises ShardError naming ``where`` for a
    malformed header or a stream that ends inside a member; a stream ending at a member boundary
    ends the iteration (the caller's sample count check then names the shard).
    """
    read = stream.read
    offset = 0
    long_name: bytes | None = None
    while True:
        header = read(512)
        if len(header) < 512:
            if header and any(header):
                raise ShardError(f"shard {where} is truncated: partial tar header at byte {offset}")
            return
        if header[0] == 0:  # end-of-archive blocks
            return
        if header[257:262] != b"ustar":
            raise ShardError(f"shard {where} is not a valid tar file (no ustar header at byte {offset})")
        field = header[124:136]
        if field[0] & 0x80:  # GNU base-256 size
            size = int.from_bytes(field[1:], "big")
        else:
            try:
                size = int(field.rstrip(b"\0 ") or b"0", 8)
            except ValueError:
                raise ShardError(f"shard {where} is not a valid tar file (bad size field at byte {offset})") from None
        padded = (size + 511) & ~511
        body = read(padded)
        if len(body) < padded:
            raise ShardError(f"shard {where} is truncated: the member at byte {offset} needs {size} bytes, "
                             f"the stream ended after {max(0, len(body))}")
        offset += 512 + padded
        kind = header[156]
        if kind == 0x4C:  # 'L': GNU long name of the next member
            long_name = body[:size].split(b"\0", 1)[0]
            continue
        if kind == 0x78:  # 'x': pax header of the next member
            for record in body[:size].split(b"\n"):
                _, _, kv = record.partition(b" ")
                if kv.startswith(b"path="):
                    long_name = kv[5:]
            continue
        if kind not in (0x30, 0x00, 0x37):  # directories, links, global headers: no member data
            long_name = None
            continue
        if long_name is not None:
            raw, long_name = long_name, None
        else:
            raw = header[:100].split(b"\0", 1)[0]
            if header[345] != 0:
                raw = header[345:500].split(b"\0", 1)[0] + b"/" + raw
        fname = raw.decode("utf-8", "replace")
        if fname.endswith(skip):
            continue
        yield {"fname": fname, "data": body[:size]}


def read_shard(location: ShardLocation, name: str, count: int | None, num_classes: int
               ) -> Iterator[tuple[str, bytes, int]]:
    """``(key, png bytes, class index)`` of every sample of shard ``name``, in tar order.

    webdataset's ``tar_file_iterator`` and ``group_by_keys`` read the stream (``json`` members are
    skipped unread). ShardError naming the URL for: an unreadable or truncated tar, a sample
    without png/cls or with a class outside ``0..num_classes-1``, and (once the shard is read to
    its end) a sample count other than ``count``.
    """
    from webdataset.tariterators import group_by_keys

    where = location.url(name)

    def reraise(exc: BaseException) -> bool:
        if isinstance(exc, ShardError):
            raise ShardError(_clean(exc)) from None
        raise ShardError(f"shard {where} is truncated or not a valid tar file ({type(exc).__name__}: "
                         f"{_clean(exc)})") from None

    n = 0
    with location.open(name) as stream:
        try:
            files = tar_members(stream, where)
            for sample in group_by_keys(({**f, "__url__": where} for f in files), handler=reraise):
                key = sample["__key__"]
                png, cls = sample.get("png"), sample.get("cls")
                if png is None or cls is None:
                    raise ShardError(f"shard {where}: sample {key!r} has no {'png' if png is None else 'cls'} file")
                try:
                    label = int(cls)
                except ValueError:
                    raise ShardError(f"shard {where}: sample {key!r} has a non-integer cls {cls!r}") from None
                if not 0 <= label < num_classes:
                    raise ShardError(f"shard {where}: sample {key!r} has class {label}, outside the manifest's "
                                     f"{num_classes} classes")
                if count is not None and n == count:
                    raise ShardError(f"shard {where} holds more than the {count} samples the manifest says; it was "
                                     f"changed after sharding: re-shard or restore it")
                yield key, png, label
                n += 1
        except ShardError:
            raise
        except Exception as exc:  # noqa: BLE001 - tarfile's errors on a broken stream, named
            raise ShardError(f"shard {where} is truncated or not a valid tar file ({type(exc).__name__}: "
                             f"{_clean(exc)})") from exc
    if count is not None and n != count:
        raise ShardError(f"shard {where} holds {n} samples but the manifest says {count}; it was changed after "
                         f"sharding (or cut short): re-shard or restore it")


def sha256_of(location: ShardLocation, name: str) -> str:
    """sha256 of file ``name`` as the loader reads it (through the cache when one is set)."""
    digest = hashlib.sha256()
    with location.open(name) as fh:
        for chunk in iter(lambda: fh.read(_BUFFER), b""):
            digest.update(chunk)
    return digest.hexdigest()
