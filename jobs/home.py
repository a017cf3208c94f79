"""Cherry's home: where run directories, caches (and later the store and queue) live.

`$CHERRY_HOME` when set, else `runs/` under the current directory.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path


def cherry_home() -> Path:
    home = Path(os.environ.get("CHERRY_HOME", "runs")).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home.resolve()


def new_run_id(label: str) -> str:
    """A sortable, readable, unique id such as `20261121-194501-dpo-demo`."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-")[:40] or "run"
    base = f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"
    run_id, n = base, 1
    while (cherry_home() / run_id).exists():
        n += 1
        run_id = f"{base}-{n}"
    return run_id


def cache_dir() -> Path:
    return cherry_home() / "cache"
