"""A full disk: one message for every file a run writes, and folders that are written whole or not at all.

A checkpoint, the final model and the value model are written to `<name>.tmp` and renamed when
complete; a write that fails removes its partial folder, so the checkpoint before it stays the one
a resume continues from. Libraries report a full disk in their own ways (an OSError with ENOSPC,
safetensors' "StorageFull", torch.save's "file write failed"): `is_disk_full` knows them.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Callable

from engine.errors import CherryError

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# torch.save says "file write failed" or "unexpected pos N vs M" when a write comes up short
_FULL_WORDS = ("no space left", "storagefull", "disk quota exceeded", "file write failed", "unexpected pos")


class DiskFullError(CherryError):
    """A run's file could not be written: its disk (or quota) is full."""


def is_disk_full(err: BaseException, path: Path | None = None, needed: int | None = None) -> bool:
    """Whether `err` says the disk is full; or, for a write of about `needed` bytes into `path` that
    failed with a message that does not say, whether `path` has less room than that."""
    if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
        return True
    text = str(err).lower()
    if any(words in text for words in _FULL_WORDS):
        return True
    free = free_bytes(path) if path is not None and needed else None
    return free is not None and free < needed


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem that holds `path` (its nearest existing folder); None if unknown."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def size_text(n: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


RUN_ADVICE = (
    "The last complete checkpoint is kept: free space there and resume the run (`cherry resume RUN`, or "
    "`cherry train --resume DIR`), or move the run directory to a disk with room and resume it there "
    "(new runs go elsewhere with `--out DIR`)"
)


def disk_full_error(what: str, path: Path, needed: int | None = None, advice: str = RUN_ADVICE) -> DiskFullError:
    """The one message for a full disk: what was being written where, how much it needs (when known),
    how much is free, and the ways on (`advice`; a run's by default)."""
    free = free_bytes(path)
    room = []
    if needed:
        room.append(f"it needs about {size_text(needed)}")
    if free is not None:
        room.append(f"{size_text(free)} is free there")
    return DiskFullError(
        f"the disk is full: writing {what} to {path} failed" + (f" ({', '.join(room)})" if room else "") + ". " + advice
    )


def write_folder(folder: Path, write: Callable[[Path], None], what: str, needed: int | None = None) -> Path:
    """`write(tmp)` fills `<folder>.tmp`, which then replaces `folder`: a write that fails (a full disk,
    a kill) never leaves a half-written `folder`, and removes its partial `.tmp`."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err, folder.parent, needed):
            raise disk_full_error(what, folder.parent, needed) from None
        raise
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def write_text(path: Path, text: str) -> None:
    """A small run file (spec.yaml, summary.json), with the full-disk message when it cannot be written."""
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_error(Path(path).name, Path(path).parent) from None
        raise


def tensor_bytes(tensors) -> int:
    """Bytes of the tensors in `tensors` (nested dicts and lists of them, as a state dict holds)."""
    import torch

    if torch.is_tensor(tensors):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, dict):
        return sum(tensor_bytes(v) for v in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return sum(tensor_bytes(v) for v in tensors)
    return 0
