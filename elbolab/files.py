"""Files that are either whole or absent, and that are checked when they are read.

Every file elbolab writes goes to a temporary file in the same folder, is flushed and fsynced,
and is renamed over its target (``os.replace`` is atomic on POSIX and Windows), so a crash or a
SIGKILL at any moment leaves either the old file or the new one, never a mix: bytes through
:func:`atomic_write`, writers that need a file name (netCDF, figures) through :func:`atomic_path`.

Tensors are stored as safetensors, whose header carries the format version and a SHA-256 of
every tensor's name, dtype, shape and bytes: a truncated file fails to parse, a flipped byte fails
the checksum, and a file from a newer elbolab is refused by version, each with a message naming
the file. Nothing is unpickled: safetensors holds raw tensors, settings and records are JSON.
"""

from __future__ import annotations

__all__ = [
    "FORMAT_VERSION",
    "atomic_path",
    "atomic_write",
    "load_tensors",
    "read_json",
    "remove_stale_temporaries",
    "save_tensors",
    "write_json",
]

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from elbolab.errors import InputError

FORMAT_VERSION = 1


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for writers that need a file name; on success it becomes ``path``.

    The body writes the temporary file (``to_netcdf(tmp)``, ``savefig(tmp)``); when it returns,
    the file is fsynced and renamed over ``path``, and the folder fsynced. When it raises, the
    temporary file is removed and ``path`` is left as it was. The temporary's name is
    ``.<name>.<random>.tmp`` (what :func:`remove_stale_temporaries` deletes), so writers that
    choose a format from the file name's extension must be told the format of ``path``.
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # /dev/stdout, a named pipe: nothing to rename over
        yield path
        return
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename; a new file gets the umask's mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_write(path: str | Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)


def remove_stale_temporaries(path: str | Path) -> None:
    """Delete the temporary files a process killed in the middle of :func:`atomic_path` of ``path`` left."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Write a JSON object atomically (NaN allowed, as Python's json writes it)."""
    atomic_write(path, json.dumps(payload, indent=2, allow_nan=True).encode())


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object; a missing, unreadable or non-object file is an :class:`InputError`."""
    path = Path(path)
    try:
        payload = json.loads(path.read_bytes().decode())
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(payload, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(payload).__name__}")
    return payload


def save_tensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors as one safetensors file, atomically, with format version and checksum.

    Each tensor is copied to the CPU first: modules that share networks (a ladder guide and its
    model) hold the same storage under two names, which safetensors refuses.
    """
    tensors = {name: value.detach().to("cpu", copy=True).contiguous() for name, value in tensors.items()}
    header = dict(metadata or {}) | {"format_version": str(FORMAT_VERSION), "sha256": _checksum(tensors)}
    atomic_write(path, safetensors_bytes(tensors, metadata=header))


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a safetensors file written by :func:`save_tensors`: its tensors and header metadata.

    Raises:
        InputError: the file is missing, not safetensors (truncated, corrupted, a pickle), from a
            newer format version, or its tensors do not match the checksum in its header.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(f"{path}: not a readable safetensors file, truncated or corrupted ({reason})") from None
    version = metadata.get("format_version", str(FORMAT_VERSION))
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise InputError(
            f"{path}: written in format version {version}, newer than this elbolab reads ({FORMAT_VERSION}); "
            "upgrade elbolab to load it"
        )
    expected = metadata.get("sha256")
    if expected is not None and expected != _checksum(tensors):
        raise InputError(f"{path}: corrupted: its tensors do not match the checksum recorded when it was written")
    return {name: value.to(device) for name, value in tensors.items()}, metadata


def _checksum(tensors: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name]
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    """Flush a written file's bytes to the disk (through a descriptor of its own, writable for Windows)."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask (reading it means setting it: put it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable; not every platform can open a folder (Windows cannot)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
