"""Export a finished run's weights: a LoRA adapter merged into its base, or the full model copied."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from engine.diskspace import disk_full_error, is_disk_full
from engine.errors import CherryError


def export_run(run_dir: str | Path, out_dir: str | Path, *, merge: bool) -> Path:
    """Write weights loadable by `AutoModelForCausalLM.from_pretrained(out_dir)`, plus the tokenizer."""
    final = Path(run_dir) / "final"
    if not final.exists():
        raise CherryError(f"{run_dir} has no final/ weights: export needs a completed run (resume it first)")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CherryError(f"--out {out_dir} exists and is not empty; choose a new directory")
    adapter_config = final / "adapter_config.json"
    if adapter_config.exists() and not merge:
        raise CherryError(f"{run_dir} holds a LoRA adapter; pass --merge to write full weights merged into its base")
    try:
        if not adapter_config.exists():
            shutil.copytree(final, out_dir, dirs_exist_ok=True)  # already full weights
        else:
            _merge(final, adapter_config, out_dir)
    except Exception as err:
        if not is_disk_full(err):
            raise
        shutil.rmtree(out_dir, ignore_errors=True)  # it was empty or absent: nothing of the user's is lost
        copying = not adapter_config.exists()  # a copy needs final/'s size; a merge, the base model's
        needed = sum(f.stat().st_size for f in final.rglob("*") if f.is_file()) if copying else None
        raise disk_full_error(
            "the exported model", out_dir, needed, "Nothing was exported; free space there or give another --out"
        ) from None
    return out_dir


def _merge(final: Path, adapter_config: Path, out_dir: Path) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    try:
        model = AutoPeftModelForCausalLM.from_pretrained(final)
    except OSError as err:
        raise CherryError(f"could not load the adapter's base model '{base}': {err}") from None
    merged = model.merge_and_unload()
    merged.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(final).save_pretrained(out_dir)
