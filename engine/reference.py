"""The frozen reference policy, in whichever form is cheapest.

- a separate frozen model (`ref_model`, or a second copy of the starting weights);
- the policy itself with its LoRA adapters disabled (no second copy in memory);
- a table of log-probs precomputed once per dataset and cached on disk, keyed by the
  reference's weights, the tokenised data and the settings that change the numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Iterator

import torch

from engine.distributed import World
from engine.shared_prompts import batch_logps

log = logging.getLogger("cherry.engine")


class Reference:
    def __init__(self, *, model: torch.nn.Module | None = None, adapter_policy: torch.nn.Module | None = None):
        if (model is None) == (adapter_policy is None):
            raise ValueError("give exactly one of model or adapter_policy")
        self._model = model
        self._adapter_policy = adapter_policy

    @contextlib.contextmanager
    def model(self) -> Iterator[torch.nn.Module]:
        """The reference as a module (for generation or scoring), e.g. the adapter-disabled policy."""
        if self._model is not None:
            yield self._model
        else:
            with self._adapter_policy.disable_adapter():
                yield self._adapter_policy

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
        with self.model() as ref:
            return batch_logps(ref, batch, temperature).sums


def fingerprint_model(source: str, dtype: torch.dtype) -> str:
    """Identity of a model's weights: file contents for a local dir, the id for a hub model."""
    digest = hashlib.sha256(f"{dtype}".encode())
    path = Path(source)
    if path.is_dir():
        for file in sorted(path.iterdir()):
            if file.suffix not in (".safetensors", ".bin", ".json") or not file.is_file():
                continue
            digest.update(file.name.encode())
            size = file.stat().st_size
            digest.update(str(size).encode())
            with open(file, "rb") as f:
                if size <= 256 * 2**20:
                    digest.update(f.read())
                else:  # huge shards: their size plus both ends is identity enough for a cache key
                    digest.update(f.read(2**20))
                    f.seek(-(2**20), 2)
                    digest.update(f.read())
    else:
        digest.update(source.encode())
    return digest.hexdigest()[:16]


def fingerprint_examples(examples: list[dict], keys: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for ex in examples:
        for key in keys:
            digest.update(json.dumps(ex[key]).encode())
    return digest.hexdigest()[:16]


class PrecomputedReference:
    """Reference log-probs looked up by example index instead of recomputed every step."""

    def __init__(self, tables: dict[str, torch.Tensor]):
        self.tables = tables  # split -> [n_examples, rows_per_example]

    def lookup(self, split: str, index: torch.Tensor) -> torch.Tensor:
        # Batches put all first rows (e.g. chosen), then all second rows (rejected).
        return self.tables[split][index].T.reshape(-1)

    @classmethod
    def build(
        cls,
        splits: dict[str, list[dict]],
        collate: Callable[[list[dict]], dict[str, torch.Tensor]],
        reference: Reference,
        *,
        rows_per_example: int,
        batch_size: int,
        device: torch.device,
        cache_file: Path | None,
        world: World = World(),
    ) -> "PrecomputedReference":
        """Every rank calls it: rank 0 reads the cache (all ranks load it when it holds the table), or
        each rank computes its share of the batches and the rows are gathered, so no rank waits alone on
        the collective timeout while one computes the whole table. Rank 0 writes the cache."""
        cached = _read_cache(cache_file) if cache_file is not None and world.is_main else None
        if world.broadcast(cached is not None):
            log.info("reference log-probs: loaded from cache %s", cache_file)
            return cls(cached if cached is not None else _read_cache(cache_file))
        tables = {}
        for split, examples in splits.items():
            starts = list(range(0, len(examples), batch_size))
            rows = []
            for start in world.shard(starts):
                chunk = examples[start : start + batch_size]
                batch = {k: v.to(device) for k, v in collate(chunk).items()}
                sums = reference.logps(batch).float().cpu()
                rows.append(sums.reshape(rows_per_example, len(chunk)).T)
            rows = [table for share in world.gather(rows) for table in share]  # shards are contiguous, in order
            tables[split] = torch.cat(rows) if rows else torch.zeros(0, rows_per_example)
        if cache_file is not None and world.is_main:
            from safetensors.torch import save_file

            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            save_file({split: table.contiguous() for split, table in tables.items()}, str(tmp))
            tmp.replace(cache_file)
            log.info("reference log-probs: computed and cached in %s", cache_file)
        return cls(tables)


def _read_cache(cache_file: Path) -> dict[str, torch.Tensor] | None:
    """The cached tables, or None when there is no cache or it cannot be read (it is then computed again).

    Safetensors holds only tensors, so a cache file from a shared home never runs code when read.
    """
    if not cache_file.exists():
        return None
    from safetensors.torch import load_file

    try:
        return load_file(str(cache_file))
    except Exception as err:  # noqa: BLE001 - truncated or not safetensors: recompute and replace it
        log.warning("reference log-probs: the cache %s cannot be read (%s); computing them again", cache_file, err)
        return None
