"""The tokenised-data cache: `prepare`'s result kept on disk, so a second run on the same data starts
without re-tokenising.

The key hashes everything the examples depend on: the data files' contents (a local file or
directory) or a hub dataset's `datasets` fingerprint, what is taken of each source (config, splits,
columns, column map, weight), the tokenizer (its full serialised state:
vocabulary, merges, normaliser, added and special tokens, chat template, class), every setting that
changes the examples (data kind, max lengths, over-long policy, eval split and seed, max rows,
splits) and `CACHE_VERSION`, raised whenever the example layout changes.

One file per key, `<key>.npz`: the examples' columns (engine.data.examples: every token-id list of a
key flattened into an int32 array with offsets, the rest of each example as a JSON document).
Loaded memory-mapped, never unpickled (no code runs on load). Written to a temporary file in the same
directory and renamed into place, so concurrent runs never read a half-written file (the last writer
wins; both wrote the same thing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from engine.data.examples import Examples, IdColumn

log = logging.getLogger("cherry.engine")

CACHE_VERSION = 3
# init_kwargs that say where and how a tokenizer was loaded (HF_HUB_OFFLINE sets local_files_only), not
# what it does: the same tokenizer loaded from another path or offline keeps its key.
_WHERE_LOADED_FROM = frozenset(
    {"name_or_path", "is_local", "local_files_only", "cache_dir", "revision", "token", "_commit_hash", "vocab_file"}
)
_HASH_BLOCK = 2**22


def _hash_file(digest: Any, path: Path) -> None:
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)


def source_fingerprint(source: Any) -> str | None:
    """sha256 of a local data file's or directory's contents (names included); None for anything else."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(os.fspath(source)).expanduser()
    digest = hashlib.sha256()
    if path.is_file():
        _hash_file(digest, path)
    elif path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(path)).encode() + b"\0")
            _hash_file(digest, file)
    else:
        return None  # a hub id: its content is not known without fetching it
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of everything about a tokenizer that changes token ids or rendered text."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        digest.update(backend.to_str().encode())  # the whole tokenizer.json: model, merges, normaliser, ...
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for name in ("chat_template", "bos_token", "eos_token", "pad_token", "unk_token", "padding_side"):
        digest.update(f"\0{name}={getattr(tokenizer, name, None)!r}".encode())
    settings = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items() if k not in _WHERE_LOADED_FROM}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_key(fingerprints: list[str | None], tokenizer: Any, settings: dict[str, Any]) -> str | None:
    """The cache key of `prepare`'s result from its sources' fingerprints (engine.data.sources.fingerprint,
    with what each source takes), the tokenizer and the settings; None when a source has no fingerprint."""
    if any(part is None for part in fingerprints):
        return None
    parts = [str(part) for part in fingerprints]
    parts.append(tokenizer_fingerprint(tokenizer))
    parts.append(json.dumps({**settings, "cache_version": CACHE_VERSION}, sort_keys=True))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def save(path: Path, payload: dict[str, Any], splits: dict[str, Examples]) -> None:
    """Write `payload` (JSON-able) and the splits' columns atomically to `path`."""
    import numpy as np

    arrays: dict[str, Any] = {}
    meta = {"payload": payload, "splits": {}}
    for name, examples in splits.items():
        meta["splits"][name] = list(examples.ids)
        for key, column in examples.ids.items():
            arrays[f"{name}/{key}/ids"] = column.values
            arrays[f"{name}/{key}/offsets"] = column.offsets
            arrays[f"{name}/{key}/present"] = column.present
        arrays[f"{name}/rest"] = examples.rest
        arrays[f"{name}/rest_offsets"] = examples.rest_offsets
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        # mkstemp makes it owner-only (0600), like every file Cherry writes: a cache holds the dataset's text
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mapped_members(path: Path) -> dict[str, Any]:
    """The arrays of an uncompressed .npz (what `save` writes) memory-mapped where they lie in the file:
    a run reads only the pages of the examples it trains on, and loading costs no copy of the file."""
    import struct
    import zipfile

    import numpy as np

    arrays = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                raise ValueError(f"unexpected member {info.filename}")
            f.seek(info.header_offset)
            header = f.read(30)  # the local file header: its name and extra field lengths end it
            if header[:4] != b"PK\x03\x04":
                raise ValueError(f"no local header for {info.filename}")
            name_length, extra_length = struct.unpack("<HH", header[26:30])
            f.seek(info.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(f)
            if dtype.hasobject:
                raise ValueError(f"{info.filename} holds Python objects")  # never unpickled
            order = "F" if fortran_order else "C"
            if int(np.prod(shape)) == 0:
                arrays[info.filename[:-4]] = np.empty(shape, dtype=dtype, order=order)
            else:
                arrays[info.filename[:-4]] = np.memmap(
                    path, dtype=dtype, mode="r", offset=f.tell(), shape=shape, order=order
                )
    return arrays


def load(path: Path) -> tuple[dict[str, Any], dict[str, Examples]] | None:
    """(payload, splits) from `path`, or None when it is missing or unreadable (then it is rebuilt).
    The examples stay columns (engine.data.examples), memory-mapped: a dict is built only when an
    example is read."""
    if not path.is_file():
        return None
    try:
        arrays = _mapped_members(path)
        meta = json.loads(arrays["meta"].tobytes())
        splits = {}
        for name, keys in meta["splits"].items():
            ids = {
                key: IdColumn(*(arrays[f"{name}/{key}/{part}"] for part in ("ids", "offsets", "present")))
                for key in keys
            }
            splits[name] = Examples(ids, arrays[f"{name}/rest"], arrays[f"{name}/rest_offsets"])
    except Exception as exc:  # noqa: BLE001 - a damaged cache file is rebuilt, never fatal
        log.warning("tokenised-data cache %s is unreadable (%s); tokenising again", path, exc)
        return None
    return meta["payload"], splits
