"""Atomic artifact writing and content hashing shared by every stage."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import QVGGTError


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renamed onto it only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise QVGGTError(f"cannot write to {path.parent}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp creates 0600; give the artifact the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


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
