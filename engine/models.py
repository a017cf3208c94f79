"""Load the policy, the reference and the tokenizer; choose device and dtype; wrap LoRA.

Dropout is switched off everywhere: with dropout on, the policy and the reference score the
same text differently and the DPO log-ratio starts non-zero (docs/algorithms.md, Shared conventions).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.errors import ModelError
from engine.nonfinite import check_weights
from engine.sharding import is_sharded
from engine.shared_prompts import SHARED_PROMPT_KEYS, run_completions, run_prompts, shares_prompts_exactly

if TYPE_CHECKING:  # wrap_lora reads a RunSpec but needs nothing of engine.spec at run time
    from engine.spec import RunSpec

log = logging.getLogger("cherry.engine")

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(
            f"device '{requested}' was asked for but no CUDA GPU is visible; use --set device=cpu (or auto)"
        )
    if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelError("device 'mps' was asked for but MPS is not available; use --set device=cpu (or auto)")
    return torch.device(requested)


def has_native_bf16(device: torch.device) -> bool:
    """Whether the run's own GPU has bf16 tensor cores (compute capability 8.0, Ampere, and later). torch's
    `is_bf16_supported()` also says yes where bf16 is only emulated (V100, T4: slow, and attention falls
    back to its quadratic-memory kernel), and asks about the current GPU rather than the run's."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The compute dtype a run asks for (its matmuls); trainable weights stay fp32 whatever this is (`Precision`)."""
    if requested == "auto":
        if device.type == "cuda" and has_native_bf16(device):
            return torch.bfloat16
        return torch.float32
    if requested == "bf16" and device.type == "cuda" and not has_native_bf16(device):
        raise ModelError(
            f"dtype bf16 has no tensor cores on this GPU ({torch.cuda.get_device_name(device)}); "
            "use --set dtype=fp16 (mixed precision with loss scaling) or --set dtype=fp32"
        )
    if requested == "fp16" and device.type != "cuda":
        raise ModelError(
            f"dtype fp16 needs a CUDA GPU (its loss scaling is GPU-only) and this run is on {device.type}; "
            "use --set dtype=bf16 (mixed precision, works on the CPU) or --set dtype=fp32"
        )
    return DTYPE_NAMES[requested]


@dataclass
class Precision:
    """Mixed precision as training frameworks do it: trainable weights and optimizer state in fp32,
    forward passes under autocast in `compute` (bf16 or fp16), fp16 with a gradient scaler so small
    gradients do not underflow. A bf16 copy of a weight cannot take an Adam step at usual learning
    rates (1e-6 is far below bf16's spacing near 0.02), which is why weights are never trained in bf16.
    """

    compute: torch.dtype
    device: torch.device
    scaler: torch.amp.GradScaler | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.compute == torch.float16:
            self.scaler = torch.amp.GradScaler(self.device.type)

    @property
    def frozen_dtype(self) -> torch.dtype:
        """Models that never train (reference, LoRA base) may live in bf16 to save memory; fp16 weights
        of a model trained in bf16 can overflow, so fp16 runs keep them in fp32 under autocast."""
        return torch.bfloat16 if self.compute == torch.bfloat16 else torch.float32

    def autocast(self):
        if self.compute == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer) -> None:
        """Before clipping: gradients back to their true scale (fp16 only)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)  # skipped when a gradient is inf/NaN; the scale then shrinks
        self.scaler.update()


def upcast_trainable(model: torch.nn.Module) -> torch.nn.Module:
    """Trainable parameters in fp32 (a LoRA adapter or a fresh head on a bf16 base included)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def source_dtype(source: str, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype a model's config says its weights are in (fp32 when it does not say)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise load_error("a model config", source, err) from None
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in DTYPE_NAMES.values() else torch.float32


def _quiet_transformers() -> None:
    # Weight-loading progress bars would flood worker logs.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover - logging is cosmetic
        pass


def load_error(what: str, source: str, err: Exception) -> ModelError:
    local = Path(source).expanduser().exists()
    if local:
        return ModelError(f"could not load {what} from '{source}': {err}")
    return ModelError(
        f"could not load {what} '{source}': it is not a local directory and the hub did not provide it ({err.__class__.__name__}). "
        "Give a local directory saved with save_pretrained, or check the hub id and your network"
    )


def load_tokenizer(source: str, trust_remote_code: bool = False, chat_template: str | None = None):
    """The tokenizer of `source`, with a pad token, and `chat_template` (the setting's value) in place of its own."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise load_error("a tokenizer", source, err) from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"the tokenizer of '{source}' has no EOS token; completions need one to end")
    if tokenizer.pad_token_id is None:
        # Padding is always masked out, so reusing EOS as the pad token is safe.
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        from engine.chat_templates import template_text

        tokenizer.chat_template = template_text(chat_template)
    return tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _without_weights(auto_class, source: str, dtype: torch.dtype, trust_remote_code: bool, **config_overrides):
    """`auto_class`'s model of `source` with no weights read: its parameters on the meta device (no memory),
    its buffers computed as at construction (rotary frequencies, which no checkpoint holds), tied as
    `from_pretrained` ties them, and the source's generation config. For a rank that receives its shard of
    the weights from rank 0 (engine.sharding.load_sharded)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **config_overrides)
    with init_empty_weights(include_buffers=False):
        model = auto_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()
    model.eval()  # as from_pretrained leaves it
    if model.can_generate():
        with contextlib.suppress(OSError):  # a source without generation_config.json keeps the config's
            model.generation_config = GenerationConfig.from_pretrained(source)
    return model


def load_causal_lm(
    source: str, *, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False, weights: bool = True
):
    """The causal LM of `source` on `device`; weights=False: its modules only, weights on the meta device."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    try:
        if not weights:
            model = _without_weights(AutoModelForCausalLM, source, dtype, trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise load_error("a causal LM", source, err) from None
    disable_dropout(model)
    if not weights:
        return model
    check_weights(model, source)  # a NaN here would surface later as a traceback from the first forward
    return model.to(device)


def wrap_lora(model, spec: RunSpec, *, reward_head: bool = False):
    """Add trainable LoRA adapters; the frozen base with adapters disabled is the reference.

    A reward model's fresh `score` head trains and is saved with the adapter (PERL pitfall).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=spec.lora.target_modules,
        task_type="SEQ_CLS" if reward_head else "CAUSAL_LM",
        modules_to_save=["score"] if reward_head else None,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ModelError(f"lora.target_modules={spec.lora.target_modules!r} does not fit this model: {err}") from None


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def load_reward_model(
    source: str, *, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False, weights: bool = True
):
    """A scalar-head sequence classifier; a causal LM checkpoint gets a fresh `score` head. weights=False:
    its modules only, weights on the meta device."""
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    try:
        if not weights:
            model = _without_weights(AutoModelForSequenceClassification, source, dtype, trust_remote_code, num_labels=1)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code
            )
    except Exception as err:
        raise load_error("a reward model", source, err) from None
    disable_dropout(model)
    if not weights:
        return model
    check_weights(model, source)
    return model.to(device)


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward per right-padded row, read at the LAST ATTENDED token (the EOS).

    Decoder models get their head applied to that one hidden state (never relying on pad-token
    ids, which break when pad == eos); encoder classifiers pool as they were trained to.
    """
    inner = (
        model.get_base_model() if hasattr(model, "get_base_model") else model
    )  # a peft wrapper: its LoRA layers stay live
    head = getattr(inner, "score", None)
    if head is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
    last = attention_mask.sum(-1) - 1
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    if is_sharded(model):
        # A sharded model's root unit gathers the head's weights only inside the model's own forward: run
        # it, and read the head's per-position scores as they leave the head. The model's own (pooled)
        # output joins the graph at zero weight: the root unit gathers its weights again for backward
        # when the gradient reaches its outputs.
        scores: list[torch.Tensor] = []
        handle = head.register_forward_hook(lambda _module, _inputs, out: scores.append(out))
        try:
            pooled = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        finally:
            handle.remove()
        return scores[0][rows, last].squeeze(-1).float() + 0.0 * pooled.sum()
    body = getattr(inner, inner.base_model_prefix)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return head(hidden[rows, last]).squeeze(-1).float()


def batch_rewards(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`sequence_rewards` of a batch's rows; a `collate_shared_prompts` batch has each distinct prompt
    (a pair's, for the reward model's chosen and rejected) through the body once where the model allows it."""
    shared = _shared_prompt_rewards(model, batch)
    if shared is not None:
        return shared
    return sequence_rewards(model, batch["input_ids"], batch["attention_mask"])


def _shared_prompt_rewards(model, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The rewards read at each row's last completion token, the prompts through the body once; None where
    the model cannot take that path (a sharded model, no `score` head, activation checkpointing) or where it
    does not give `sequence_rewards`' numbers on the probe (engine/shared_prompts.py)."""
    if any(key not in batch for key in SHARED_PROMPT_KEYS) or is_sharded(model):
        return None
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(inner, "score", None)
    body = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    if head is None or not isinstance(body, torch.nn.Module) or getattr(body, "gradient_checkpointing", False):
        return None

    def shared(b: dict[str, torch.Tensor]) -> torch.Tensor | None:
        prompts = run_prompts(body, b["prompt_ids"], b["prompt_mask"])
        if prompts is None:
            return None
        hidden, _ = run_completions(body, prompts, b["prompt_index"], b["completion_ids"], b["completion_ids_mask"])
        last = b["completion_ids_mask"].sum(-1) - 1
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return head(hidden[rows, last]).squeeze(-1).float()

    def full(b: dict[str, torch.Tensor]) -> torch.Tensor:
        return sequence_rewards(model, b["input_ids"], b["attention_mask"])

    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    return shared(batch) if shares_prompts_exactly(model, vocab, shared, full) else None
