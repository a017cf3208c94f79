"""`Examples`: a list of tokenised examples kept as flat arrays, each example's dict built when it is
first read.

Tokenising (engine/data/prepare.py) and the tokenised-data cache (engine/data/cache.py) both hand
over columns, not dicts: every token-id list of a key flattened into one int32 array with offsets,
and the rest of each example (texts, messages, labels) as one JSON document each in a byte buffer.
Building 60k dicts with a million Python ints per thousand rows costs seconds and gigabytes before
the first step; a training step reads a batch, so only the examples a run touches are ever built.
A built dict is kept: a change to it (KTO's mismatched partner, say) stays, as in a plain list.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

# The id columns (token ids, and the 0/1 mask of multi-turn SFT) of each data kind; the rest is JSON.
ID_KEYS = {
    "preference": ("prompt_ids", "chosen_ids", "rejected_ids"),
    "unpaired": ("prompt_ids", "completion_ids"),
    "sft": ("prompt_ids", "completion_ids", "loss_mask"),
    "prompt": ("prompt_ids",),
}


class IdColumn:
    """One key's lists: `values[offsets[i]:offsets[i + 1]]` is example i's list when `present[i]`."""

    def __init__(self, values: Any, offsets: Any, present: Any):  # numpy arrays: int32, int64, bool
        self.values, self.offsets, self.present = values, offsets, present


class Examples(Sequence):
    """Examples `0..n-1` of one split; `ex["index"]` is the position."""

    def __init__(self, ids: dict[str, IdColumn], rest: Any, rest_offsets: Any):  # numpy arrays: uint8, int64
        self.ids, self.rest, self.rest_offsets = ids, rest, rest_offsets
        self.built: list[dict | None] = [None] * (len(rest_offsets) - 1)

    def __len__(self) -> int:
        return len(self.built)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        ex = self.built[i]
        if ex is None:
            ex = self.built[i] = self._build(i)
        return ex

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    def _build(self, i: int) -> dict:
        ex = {"index": i, **json.loads(self.rest[self.rest_offsets[i] : self.rest_offsets[i + 1]].tobytes())}
        for key, column in self.ids.items():
            if column.present[i]:
                ex[key] = column.values[column.offsets[i] : column.offsets[i + 1]].tolist()
        return ex

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # compared by value, like a list

    def __add__(self, other: Sequence) -> list[dict]:
        return list(self) + list(other)

    def __radd__(self, other: Sequence) -> list[dict]:
        return list(other) + list(self)

    def __repr__(self) -> str:
        return f"Examples({len(self)} examples: {', '.join(self.ids)})"


def from_arrow(table: Any, id_keys: tuple[str, ...]) -> Examples:
    """Examples from an Arrow table with one list<int32> column per id key (null where absent) and a
    `rest` column (large_string) of JSON documents."""
    import numpy as np  # here, not at the top: front ends import engine.data for its cheap checks

    ids = {}
    for key in id_keys:
        column = table.column(key).combine_chunks()
        offsets = column.offsets.to_numpy().astype(np.int64)
        values = column.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
        present = column.is_valid().to_numpy(zero_copy_only=False)
        ids[key] = IdColumn(values.astype(np.int32, copy=False), offsets - offsets[0], present)
    rest = table.column("rest").combine_chunks()
    _, offsets_buffer, data_buffer = rest.buffers()
    rest_offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[rest.offset : rest.offset + len(rest) + 1]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    return Examples(ids, data[rest_offsets[0] : rest_offsets[-1]], rest_offsets - rest_offsets[0])
