"""Small helpers: progress bars, atomic writes, natural sort, hashing, clip locks."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path


def tqdm(*args, disable: bool = False, **kwargs):
    """``tqdm.tqdm`` that draws only on a terminal: with stderr redirected (a log file, a pipe) the bars,
    whose redraws and nested positions are carriage returns and cursor-up escape codes, are off."""
    from tqdm import tqdm as bar

    return bar(*args, disable=True if disable else None, **kwargs)  # None: off unless the output is a TTY


def natural_key(name: str) -> list:
    """Sort key for '2.png' < '10.png'."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems


def hidden_name(name: str, tail: str, room: int = 0) -> str:
    """``.<name><tail>`` for a temporary or lock file beside ``name``, or ``.<hash><tail>`` (16 hex digits of
    its sha256) when that plus ``room`` bytes would pass NAME_MAX: a legal 250-byte clip name still gets one."""
    full = f".{name}{tail}"
    if len(full.encode()) + room <= NAME_MAX:
        return full
    return f".{hashlib.sha256(name.encode()).hexdigest()[:16]}{tail}"


def temp_sibling(path: str | Path, suffix: str = "") -> Path:
    """A unique hidden temporary name beside ``path`` (same folder, so rename is atomic)."""
    path = Path(path)
    tail = f".tmp{suffix}"  # mkstemp puts 8 random characters between prefix and tail
    fd, tmp = tempfile.mkstemp(prefix=hidden_name(path.name, ".", 8 + len(tail.encode())), suffix=tail, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


def temp_dir_sibling(path: str | Path) -> Path:
    """A unique hidden temporary folder beside ``path`` (normal permissions, unlike mkdtemp's 0700)."""
    path = Path(path)
    tmp = tempfile.mkdtemp(prefix=hidden_name(path.name, ".", 8 + 4), suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o777 & ~_umask())
    return Path(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path, keep_suffix: bool = True) -> Iterator[Path]:
    """Yield a temporary file name beside ``path``; rename it to ``path`` only if the block succeeds.

    The temporary name keeps ``path``'s suffix (``.x.mp4.tmp.mp4``) so format guessing works.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path, path.suffix if keep_suffix else "")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it becomes ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_sibling(path)
    try:
        yield tmp
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} appeared while it was being written")
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


ENV_PG_TIMEOUT = "SDATC_PG_TIMEOUT_S"  # the process group's timeout in seconds (tests shorten it)


def process_state():
    """accelerate's PartialState for this process. On a machine without CUDA it is asked for CPU
    explicitly, so ``accelerate launch --multi_gpu`` / torchrun on CPU really forms a gloo group
    (PartialState() alone reads ACCELERATE_USE_CPU only through an Accelerator). ``$SDATC_PG_TIMEOUT_S``
    sets the process group's timeout (torch's default otherwise: 10 minutes for NCCL, 30 for gloo)."""
    import datetime

    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    kwargs = {}
    if os.environ.get(ENV_PG_TIMEOUT):
        kwargs["timeout"] = datetime.timedelta(seconds=float(os.environ[ENV_PG_TIMEOUT]))
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available(), **kwargs)


def shared_run_id(state) -> str:
    """An id that this run's processes share (in their clip locks, to tell each other from other runs): rank 0's,
    gathered once before any work, so that every process has done what precedes this call."""
    run_id = uuid.uuid4().hex
    if state.num_processes == 1:
        return run_id
    from accelerate.utils import gather_object

    return gather_object([run_id])[0]


def process_report(state) -> tuple[str, str | None]:
    """A line saying how many processes this run has, and a warning when the launcher asked for more: plain
    ``accelerate launch --num_processes N`` on a machine without GPUs starts one process (it sets MASTER_ADDR,
    but no WORLD_SIZE); torchrun's WORLD_SIZE above the group's size also warns."""
    n = state.num_processes
    line = f"processes: {n} ({state.backend} on {state.device.type}, rank 0 reports)" if n > 1 else "processes: 1"
    world = os.environ.get("WORLD_SIZE")
    if world and world.isdigit() and int(world) > n:
        return line, f"the launcher asked for {world} processes, but this runs as {n}"
    if not world and os.environ.get("MASTER_ADDR") and n == 1:
        return line, ("the launcher was asked for several processes, but this runs as one: on a machine without "
                      "GPUs use ACCELERATE_USE_CPU=1 .venv/bin/accelerate launch --multi_gpu --num_processes N ...")
    return line, None


def read_state_dict(path: str | Path, what: str) -> dict:
    """A state dict from ``.safetensors`` or a torch file (``weights_only``: never unpickles code);
    an unreadable file is an SdatcError naming ``what``."""
    import torch

    from sdatc.errors import SdatcError

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SdatcError(f"cannot read {what} {path}: {e}") from e


def report_json(result: dict, path: str | Path, line: str) -> Path:
    """Write a benchmark result as indented JSON to ``path`` (atomically) and print the one-line summary
    ``line`` with where the JSON went."""
    import json

    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    print(f"{line} (every field: {path})")
    return Path(path)


def temp_siblings(path: str | Path) -> list[Path]:
    """The temporaries that ``temp_sibling`` / ``temp_dir_sibling`` made for ``path`` and that still exist
    (left by a writer that was killed: swept when its clip's lock is taken over)."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp(\.[A-Za-z0-9]+)?")  # mkstemp's 8 chars
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return [path.parent / n for n in names if pattern.fullmatch(n)]


# Clip locks (A50). A live holder touches its locks' mtime every heartbeat; a lock whose holder cannot be
# checked through its PID (another machine, boot or PID namespace) is stale once its mtime is older than an
# expiry: 3 heartbeats in another PID namespace of this kernel (same clock, same file cache), else
# $SDATC_LOCK_EXPIRY_S (another machine: room for clock skew and NFS attribute caching).
ENV_LOCK_HEARTBEAT = "SDATC_LOCK_HEARTBEAT_S"  # default 10 s
ENV_LOCK_EXPIRY = "SDATC_LOCK_EXPIRY_S"  # default 600 s
EMPTY_LOCK_GRACE_S = 30.0  # an empty or unreadable lock younger than this is held (its creator may be writing it)

_HELD: dict[str, str] = {}  # lock path -> token, for the locks this process holds
_HELD_GUARD = threading.Lock()
_heartbeat_thread: threading.Thread | None = None


def _env_seconds(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


def lock_heartbeat_s() -> float:
    """How often a live holder touches its locks ($SDATC_LOCK_HEARTBEAT_S, default 10 s)."""
    return _env_seconds(ENV_LOCK_HEARTBEAT, 10)


def _beat_once() -> None:
    """Touch every lock this process holds (its mtime says the holder is alive)."""
    with _HELD_GUARD:
        paths = list(_HELD)
    for p in paths:
        with contextlib.suppress(OSError):
            os.utime(p)


def _heartbeat() -> None:
    while True:
        time.sleep(lock_heartbeat_s())
        _beat_once()


def _hold(path: Path, token: str | None) -> None:
    """Record (token) or forget (None) a lock this process holds; the heartbeat thread starts with the first."""
    global _heartbeat_thread
    with _HELD_GUARD:
        if token is None:
            _HELD.pop(str(path), None)
            return
        _HELD[str(path)] = token
        if _heartbeat_thread is None or not _heartbeat_thread.is_alive():
            _heartbeat_thread = threading.Thread(target=_heartbeat, name="sdatc-lock-heartbeat", daemon=True)
            _heartbeat_thread.start()


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _pid_ns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks after boot, /proc/<pid>/stat field 22): with the PID, it names
    one process (a reused PID has another start time). None where /proc cannot tell."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after the command name, which may hold spaces and parentheses
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _link_new(src: Path, dst: Path, data: bytes) -> None:
    """Make ``dst`` with ``src``'s contents, atomically, or raise FileExistsError: a hard link (the lock never
    exists empty; atomic on NFS too), else (file systems without hard links) an exclusive create and write."""
    try:
        os.link(src, dst)
        return
    except FileExistsError:
        raise
    except OSError:
        pass
    fd = os.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class ClipClaim:
    """An exclusive claim on one output (``<folder>/.<name>.lock``, hashed for very long names) so that
    processes sharing an output folder, on one machine or several, never restore the same clip at once.

        claim = ClipClaim(out, name, outputs=[out / f"{name}.mp4"], run=run_id)
        if claim.acquire():
            try: ...restore...
            finally: claim.release()
        else: claim.holder (the lock's contents), claim.expires_in (None: the holder is alive)

    The lock is JSON (host, boot id, PID namespace, PID, process start time, run, a token), written to a
    temporary and hard-linked into place, so it never exists empty. It is stale, and taken over, when: on
    this kernel and in this PID namespace, its process is gone, its PID has another start time (reused), or
    its PID is ours (an earlier run in a container, PID 1 again); elsewhere, when its heartbeat stops (see
    above). A taken-over lock's dead holder's temporary ``outputs`` are removed. ``release`` removes the lock
    only while it is still this claim's.
    """

    def __init__(self, folder: str | Path, name: str, outputs: list[Path] | tuple = (), run: str | None = None):
        # room for the ".<token>.stale" / ".<token>.tmp" siblings: a legal 250-byte clip name gets a hashed lock
        self.path = Path(folder) / hidden_name(name, ".lock", room=40)
        self.outputs = [Path(o) for o in outputs]
        self.run = run
        self.token = uuid.uuid4().hex
        self.held = False
        self.holder: dict | None = None  # after a refused acquire: the lock's contents ({} if unreadable)
        self.expires_in: float | None = None  # after a refused acquire: seconds until it is stale; None: live
        self.took_over: dict | None = None  # the stale lock this claim replaced

    def _contents(self) -> bytes:
        pid = os.getpid()
        return json.dumps({"host": socket.gethostname(), "boot": _read("/proc/sys/kernel/random/boot_id"),
                           "pidns": _pid_ns(), "pid": pid, "start": _start_time(pid), "run": self.run,
                           "token": self.token, "created": time.time()}).encode()

    def _judge(self, data: bytes, mtime: float) -> tuple[dict, float | None]:
        """(the holder, seconds until the lock is stale: <= 0 stale, None while its holder is alive)."""
        age = max(0.0, time.time() - mtime)
        try:
            holder = json.loads(data)
            pid = int(holder["pid"])
        except (ValueError, KeyError, TypeError):
            return {}, EMPTY_LOCK_GRACE_S - age  # empty (being written) or not ours: stale once old
        if _HELD.get(str(self.path)) == holder.get("token"):
            return holder, None  # this very process holds it (another claim object)
        boot = _read("/proc/sys/kernel/random/boot_id")
        same_kernel = boot is not None and holder.get("boot") == boot
        if ((same_kernel and holder.get("pidns") == _pid_ns())
                or (boot is None and holder.get("host") == socket.gethostname())):
            if pid == os.getpid() or not _alive(pid):
                return holder, 0.0  # gone, or an earlier process that had our PID (a rerun in a container)
            start = _start_time(pid)
            if start is not None and holder.get("start") not in (None, start):
                return holder, 0.0  # the PID was reused by another process
            return holder, None
        expiry = 3 * lock_heartbeat_s() if same_kernel else _env_seconds(ENV_LOCK_EXPIRY, 600)
        return holder, expiry - age  # the PID cannot be checked from here: the heartbeat decides

    def _create(self) -> bool:
        data = self._contents()
        tmp = self.path.with_name(f"{self.path.name}.{self.token}.tmp")
        tmp.write_bytes(data)
        try:
            _link_new(tmp, self.path, data)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _remove_stale(self, data: bytes) -> bool:
        """Move the lock judged stale aside; True if it was that one (not a lock another process made since)."""
        aside = self.path.with_name(f"{self.path.name}.{self.token}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = aside.read_bytes()
            if moved != data:  # another process took the stale lock over first: give its lock back
                with contextlib.suppress(FileExistsError):
                    _link_new(aside, self.path, moved)
                return False
            return True
        finally:
            aside.unlink(missing_ok=True)

    def _sweep(self) -> None:
        """Remove the dead holder's temporary outputs, and lock temporaries left by dead processes."""
        for out in self.outputs:
            for tmp in temp_siblings(out):
                if tmp.is_dir() and not tmp.is_symlink():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)
        pattern = re.compile(rf"{re.escape(self.path.name)}\.[0-9a-f]{{32}}\.(tmp|stale)")
        for name in os.listdir(self.path.parent):
            p = self.path.parent / name
            with contextlib.suppress(OSError):
                if pattern.fullmatch(name) and time.time() - p.stat().st_mtime > EMPTY_LOCK_GRACE_S:
                    p.unlink()

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.holder = self.expires_in = None
        for _ in range(3):
            if self._create():
                self.held = True
                _hold(self.path, self.token)
                if self.took_over is not None:
                    self._sweep()
                return True
            try:
                data, mtime = self.path.read_bytes(), self.path.stat().st_mtime
            except FileNotFoundError:
                continue  # released in between: try again
            holder, expires_in = self._judge(data, mtime)
            if expires_in is None or expires_in > 0:
                self.holder, self.expires_in, self._refused_at = holder, expires_in, time.monotonic()
                return False
            if self._remove_stale(data):
                self.took_over = holder
        return False

    def wait_until_stale(self, limit: float | None = None) -> None:
        """After a refused ``acquire``: sleep until the lock counts as stale when that is at most ``limit`` s
        away (default 3 heartbeats + 1 s: a holder in another container of this machine that may have died),
        else return at once; then try ``acquire`` again."""
        if self.expires_in is None:
            return
        left = self._refused_at + self.expires_in - time.monotonic()
        if left <= (3 * lock_heartbeat_s() + 1 if limit is None else limit):
            time.sleep(max(0.0, left) + 0.2)

    def release(self) -> None:
        """Remove the lock if it is still this claim's (never one another process has taken over since)."""
        if not self.held:
            return
        self.held = False
        _hold(self.path, None)
        try:
            mine = json.loads(self.path.read_bytes()).get("token") == self.token
        except (OSError, ValueError, AttributeError):
            mine = False
        if mine:
            self.path.unlink(missing_ok=True)

    def describe_holder(self) -> str:
        """Who holds the lock, for messages: 'host NAME pid N' (or 'an unreadable lock')."""
        h = self.holder or {}
        return f"host {h['host']} pid {h['pid']}" if "host" in h and "pid" in h else "an unreadable lock"
