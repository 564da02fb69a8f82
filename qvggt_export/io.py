"""Atomic artifact writing, content hashing, verified caches, the build folder's lock, and the one place
where running out of disk or memory becomes a one-line error (docs/faults.md)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import BusyError, QVGGTError, ResourceError
from .log import logger

# Every temporary file or folder a writer here makes is named `.NAME.<random>.tmp` beside its target.
TMP_SUFFIX = ".tmp"
# OSError codes that mean the disk (or the process's file-size limit) is full, not that the path is wrong.
RESOURCE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                   errno.EFBIG: "file size limit exceeded"}
_OS_ERROR_IN_MESSAGE = re.compile(r"os error (\d+)")  # how safetensors' Rust writer reports an OSError
# How allocators that raise a generic error say they ran out: torch's CPU allocator (a RuntimeError), ONNX
# Runtime's arena and C++'s operator new (ONNX Runtime's RuntimeException).
ALLOCATION_FAILURES = ("DefaultCPUAllocator: can't allocate memory", "Failed to allocate memory", "bad allocation",
                       "std::bad_alloc")
_ALLOCATION = re.compile(r"[Tt]ried to allocate ([\d.]+ ?\w+)")
CONTENT_HASH = "qvggt_content_sha256"  # key of the content hash a cache file carries


# ---------------------------------------------------------------------------------------- resources


def _safetensor_error() -> type[Exception]:
    from safetensors import SafetensorError

    return SafetensorError


def resource_exceptions() -> tuple[type[BaseException], ...]:
    """The exception types that may mean a resource ran out (resource_error tells which do)."""
    return OSError, MemoryError, RuntimeError, _safetensor_error()


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")  # a torch error can only come from an imported torch
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return any(text in str(exc) for text in ALLOCATION_FAILURES)


def resource_error(exc: BaseException, doing: str = "") -> ResourceError | None:
    """The one-line error when `exc` means the disk or the memory ran out (OSError ENOSPC / EDQUOT / EFBIG,
    safetensors' wrapping of them, MemoryError, torch's CPU and CUDA out-of-memory errors, an allocator's
    ALLOCATION_FAILURES message); None for anything else. `doing`: what was going on ("writing X")."""
    where = f" {doing}" if doing else (f" ({exc.filename})" if getattr(exc, "filename", None) else "")
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and isinstance(exc, _safetensor_error()):
        match = _OS_ERROR_IN_MESSAGE.search(str(exc))
        code = int(match.group(1)) if match else None
    if code in RESOURCE_ERRNOS:
        return ResourceError(f"{RESOURCE_ERRNOS[code]}{where}; free some space (or raise the limit) and rerun")
    if _is_out_of_memory(exc):
        match = _ALLOCATION.search(str(exc))
        tried = f" (tried to allocate {match.group(1)})" if match else ""
        return ResourceError(f"out of memory{where}{tried}; use fewer or smaller views, or a machine with more memory")
    return None


@contextlib.contextmanager
def resource_errors(doing: str) -> Iterator[None]:
    """Turns running out of disk or memory inside the block into ResourceError; everything else passes."""
    try:
        yield
    except resource_exceptions() as exc:
        error = resource_error(exc, doing)
        if error is None:
            raise
        raise error from None


def _cannot_write(directory: Path, exc: OSError) -> QVGGTError:
    return resource_error(exc, f"writing to {directory}") or QVGGTError(
        f"cannot write to {directory}: {exc.strerror or exc}")


# ---------------------------------------------------------------------------------------- writing


def make_dirs(directory: str | os.PathLike) -> list[Path]:
    """mkdir -p; returns the folders it created, outermost first (remove_empty_dirs undoes it)."""
    directory = Path(directory)
    missing, d = [], directory
    while not os.path.lexists(d) and d != d.parent:
        missing.append(d)
        d = d.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        remove_empty_dirs(missing[::-1])
        raise _cannot_write(directory, exc) from None
    return missing[::-1]


def remove_empty_dirs(created: list[Path]) -> None:
    for d in reversed(created):
        with contextlib.suppress(OSError):  # not empty (someone else wrote there) or gone: leave it
            d.rmdir()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renamed onto it only if the block succeeds. On failure the
    temporary file and the folders made for it are removed; a full disk is a ResourceError."""
    path = Path(path)
    created = make_dirs(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        remove_empty_dirs(created)
        raise _cannot_write(path.parent, exc) from None
    os.close(fd)
    tmp = Path(tmp)
    done = False
    try:
        with resource_errors(f"writing {path}"):
            yield tmp
            # mkstemp creates 0600; give the artifact the permissions a plain open() would.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        done = True
    finally:
        if tmp.exists():
            tmp.unlink()
        if not done:
            remove_empty_dirs(created)


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


class removed_on_error:  # noqa: N801 (used as a context manager, like contextlib's)
    """The folders among `paths` that do not exist when this is made are removed again, with everything in
    them, if the `with` block raises: a command that fails leaves nothing where it created folders. A kill
    (SIGKILL, Ctrl-C) leaves them for the next run to resume from."""

    def __init__(self, *paths: str | os.PathLike | None) -> None:
        self.new = [Path(p) for p in paths if p is not None and not os.path.lexists(p)]

    def __enter__(self) -> "removed_on_error":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and issubclass(exc_type, Exception):
            for p in self.new:
                shutil.rmtree(p, ignore_errors=True)


def remove_stale_temporaries(*folders: str | os.PathLike) -> list[Path]:
    """Deletes the temporary files and folders (`.NAME.<random>.tmp`) that a killed writer left in `folders`
    (not below them); call it only while holding their lock. Returns what it removed."""
    stale = [p for folder in folders if Path(folder).is_dir() for p in Path(folder).glob(f".*{TMP_SUFFIX}")
             if p.name.count(".") >= 3]
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return stale


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Holds an exclusive lock (flock) on `path` for the block; BusyError at once when another process holds
    it. The lock goes with the process: a killed holder never leaves a stale lock."""
    import fcntl

    path = Path(path)
    make_dirs(path.parent)
    try:
        handle = open(path, "a+")
    except OSError as exc:
        raise _cannot_write(path.parent, exc) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            raise BusyError(f"{what} is in use by another process{f' (pid {holder})' if holder.isdigit() else ''}; "
                            "wait for it to finish, or choose another folder") from None
        with contextlib.suppress(OSError):  # the pid is for the message above only; a full disk may refuse it
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------- hashing


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def sha256_tensors(named_tensors) -> str:
    """Content hash of (name, tensor) pairs: names, dtypes, shapes and every byte (not sums)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in named_tensors:
        t = tensor.detach().cpu().contiguous()
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """safetensors file written atomically and reproducibly: the same tensors and metadata give the same
    bytes. (The safetensors writer emits metadata in hash-map order, different on every call; the header
    is rewritten in place with sorted metadata keys: same length, same tensor entries.)"""
    from safetensors.torch import save_file

    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "r+b") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            meta = header.pop("__metadata__", None)
            ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}) | header
            text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
            if len(text) > n:  # reordering keys cannot lengthen it; this would be a format change upstream
                raise RuntimeError(f"unexpected safetensors header layout in {path}")
            f.seek(8)
            f.write(text + b" " * (n - len(text)))
    return Path(path)


# ---------------------------------------------------------------------------------------- caches
#
# A cache file carries the hash of its own content; one that cannot be read or does not match its hash
# is discarded with one warning line and the caller recomputes it.


def discard_cache(path: str | os.PathLike, reason: str) -> None:
    logger.warning("%s is damaged (%s); discarded, recomputing it", path, reason)
    with contextlib.suppress(FileNotFoundError):
        Path(path).unlink()


def _tensors_digest(tensors: dict, metadata: dict[str, str]) -> str:
    return sha256_json({"tensors": sha256_tensors(sorted(tensors.items())),
                        "metadata": {k: v for k, v in metadata.items() if k != CONTENT_HASH}})


def save_cache_tensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """save_safetensors with the content hash (tensors and metadata) that load_cache_tensors checks."""
    metadata = dict(metadata or {})
    return save_safetensors(tensors, path, {**metadata, CONTENT_HASH: _tensors_digest(tensors, metadata)})


def load_cache_tensors(path: str | os.PathLike) -> tuple[dict, dict[str, str]] | None:
    """(tensors, metadata) of a cache file save_cache_tensors wrote; None when it is missing, or unreadable
    or altered (then discarded, with one warning)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        discard_cache(path, f"unreadable: {str(exc).splitlines()[0][:120]}")
        return None
    if metadata.get(CONTENT_HASH) != _tensors_digest(tensors, metadata):
        discard_cache(path, "its content does not match its hash")
        return None
    return tensors, metadata


def write_cache_json(path: str | os.PathLike, obj: dict) -> None:
    """write_json with the content hash that read_cache_json checks."""
    body = json.loads(json.dumps({k: v for k, v in obj.items() if k != CONTENT_HASH}))  # as it reads back
    write_json(path, {**body, CONTENT_HASH: sha256_json(body)})


def read_json_or_discard(path: str | os.PathLike):
    """The JSON value in `path`; None when it is missing, or unreadable (then discarded, with one warning)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
        discard_cache(path, f"unreadable: {type(exc).__name__}")
        return None


def read_cache_json(path: str | os.PathLike) -> dict | None:
    """What write_cache_json wrote (without the hash); None when it is missing, or unreadable or altered
    (then discarded, with one warning)."""
    obj = read_json_or_discard(path)
    if obj is None:
        return None
    if not isinstance(obj, dict) or obj.get(CONTENT_HASH) != sha256_json(
            {k: v for k, v in obj.items() if k != CONTENT_HASH}):
        discard_cache(path, "its content does not match its hash")
        return None
    obj.pop(CONTENT_HASH)
    return obj
