"""Small helpers: atomic writes, natural sort, hashing."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


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


def process_state():
    """accelerate's PartialState for this process. On a machine without CUDA it is asked for CPU
    explicitly, so ``accelerate launch --multi_gpu`` / torchrun on CPU really forms a gloo group
    (PartialState() alone reads ACCELERATE_USE_CPU only through an Accelerator)."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


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


def report_json(result: dict, path: str | Path | None = None) -> str:
    """Print a benchmark result as indented JSON and write it (atomically) to ``path`` when given."""
    import json

    text = json.dumps(result, indent=1)
    print(text)
    if path:
        atomic_write_text(path, text + "\n")
    return text


class ClipClaim:
    """An exclusive claim on one output (``<out>/.<name>.lock``, created atomically) so that processes sharing an
    output folder never restore the same clip at once. A lock whose process is gone (same host) is stale and
    taken over; ``acquire`` returns False while another live process holds it.

        claim = ClipClaim(out, name)
        if claim.acquire():
            try: ...restore...
            finally: claim.release()
    """

    def __init__(self, folder: str | Path, name: str):
        import socket

        self.path = Path(folder) / f".{name}.lock"
        self.me = f"{socket.gethostname()} {os.getpid()}"
        self.held = False

    def _holder_alive(self) -> bool:
        import socket

        try:
            host, pid = self.path.read_text().split()
            pid = int(pid)
        except (OSError, ValueError):
            return False  # unreadable or half-written: treat as stale
        if host != socket.gethostname():
            return True  # another machine's process: it cannot be checked, so it is respected
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._holder_alive():
                    return False
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.me)
            self.held = True
            return True
        return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
