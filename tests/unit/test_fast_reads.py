"""The reading commands (`cherry ls`, `show`, `metrics`) answer at about the cost of `cherry --help`:
they import neither the data stack (pandas, pyarrow, datasets) nor the training stack (torch,
transformers)."""

from __future__ import annotations

import os
import subprocess
import sys

READS = """
import sys
from pathlib import Path

from jobs.home import store_path
from jobs.store import Store
from tuiapp.cli import app

home = Path(sys.argv[1])
store = Store(store_path(home))
store.create_run("20261121-100000-dpo-demo", {"algorithm": "dpo"}, name="dpo-demo", out_dir=str(home / "r1"))
store.add_metrics("20261121-100000-dpo-demo", 1, {"train/loss": 0.5})
store.close()
for args in (["ls"], ["show", "dpo-demo"], ["metrics", "dpo-demo"]):
    app(args, standalone_mode=False)
heavy = ("pandas", "pyarrow", "datasets", "torch", "transformers")
print("imported:", ",".join(name for name in heavy if name in sys.modules) or "none")
"""


def test_ls_show_and_metrics_import_no_pandas_and_no_torch(tmp_path):
    env_home = {"CHERRY_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", READS, str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, **env_home},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "20261121-100000-dpo-demo" in out and "queued" in out  # ls and show ran on the stored run
    assert "train/loss" in out and "0.5" in out  # metrics printed the logged value
    assert out.strip().splitlines()[-1] == "imported: none"
