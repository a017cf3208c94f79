"""Export a finished run's weights: a LoRA adapter merged into its base, or the full model copied."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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
    if not adapter_config.exists():
        shutil.copytree(final, out_dir, dirs_exist_ok=True)  # already full weights
        return out_dir
    if not merge:
        raise CherryError(f"{run_dir} holds a LoRA adapter; pass --merge to write full weights merged into its base")
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
    return out_dir
