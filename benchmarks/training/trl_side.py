"""The TRL side of `cherry bench METHOD --against trl`, run in its own child process.

Only this module imports TRL (installed by the `bench` extra); nothing in a training run imports it.
It trains the case benchmarks/training/against.py wrote with TRL's own trainer for the method, set to what
the Cherry side computes: fp32 on the chosen device, the same batch, learning rate (constant),
gradient clipping, beta and loss type, no label smoothing, a `max_length` every row fits, the same
reference model, the reference scored per batch (TRL's default), no evaluation and no checkpoints.
"""

from __future__ import annotations

import tempfile
import time

import torch


def _common_args(case, out_dir: str) -> dict:
    return dict(
        output_dir=out_dir,
        per_device_train_batch_size=case.geometry.batch,
        gradient_accumulation_steps=1,
        max_steps=case.total_steps,
        learning_rate=case.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=case.seed,
        data_seed=case.seed,
        bf16=False,
        fp16=False,
        use_cpu=not case.device.startswith("cuda"),
        dataloader_num_workers=0,
        disable_tqdm=True,
        remove_unused_columns=True,
    )


def _trainer(case, out_dir: str, model, tokenizer, dataset):
    from trl import (
        DPOConfig,
        DPOTrainer,
        GRPOConfig,
        GRPOTrainer,
        KTOConfig,
        KTOTrainer,
        RLOOConfig,
        RLOOTrainer,
        SFTConfig,
        SFTTrainer,
    )

    from benchmarks.training.reward import bench_reward

    args = _common_args(case, out_dir)
    if case.method in ("dpo", "kto"):
        ref = _load(case.ref_dir, case.device)
        if case.method == "dpo":
            config = DPOConfig(
                **args, beta=case.beta, loss_type=["sigmoid"], label_smoothing=0.0, max_length=case.max_length
            )
            return DPOTrainer(model, ref, args=config, train_dataset=dataset, processing_class=tokenizer)
        config = KTOConfig(
            **args, beta=case.beta, desirable_weight=1.0, undesirable_weight=1.0, max_length=case.max_length
        )
        return KTOTrainer(model, ref, args=config, train_dataset=dataset, processing_class=tokenizer)
    if case.method == "sft":
        config = SFTConfig(**args, max_length=case.max_length, completion_only_loss=True, packing=False)
        return SFTTrainer(model, args=config, train_dataset=dataset, processing_class=tokenizer)
    shape = case.geometry
    online = dict(
        num_generations=shape.group,
        max_completion_length=case.new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        num_iterations=1,
        use_vllm=False,
        log_completions=False,
    )
    # TRL counts completions per device batch: prompts x group.
    args["per_device_train_batch_size"] = shape.batch * shape.group
    if case.method == "grpo":
        config = GRPOConfig(**args, **online, loss_type="dapo", scale_rewards="group")
        return GRPOTrainer(
            model, reward_funcs=bench_reward, args=config, train_dataset=dataset, processing_class=tokenizer
        )
    config = RLOOConfig(**args, **online)
    return RLOOTrainer(model, reward_funcs=bench_reward, args=config, train_dataset=dataset, processing_class=tokenizer)


def _load(path: str, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)


def run_trl(case, clock_class) -> dict:
    # TRL's trainers imported before the clock starts (trl loads them lazily): their memory is not the run's.
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOTrainer, GRPOTrainer, KTOTrainer, RLOOTrainer, SFTTrainer  # noqa: F401

    clock = clock_class(case.device)
    tokenizer = AutoTokenizer.from_pretrained(case.model_dir)
    model = _load(case.model_dir, case.device)
    dataset = load_dataset("json", data_files=case.data_file, split="train")
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = _trainer(case, out_dir, model, tokenizer, dataset)

        class StepEnd(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                clock.step_end()

        trainer.add_callback(StepEnd())
        compute_loss = trainer.compute_loss

        def recording_compute_loss(model, inputs, *args, **kwargs):
            out = compute_loss(model, inputs, *args, **kwargs)
            loss = out[0] if isinstance(out, tuple) else out
            if clock.first_loss is None:
                clock.first_loss = float(loss.detach())
                # tokens the step trains on: every sequence the batch holds (KTO: its mismatched KL rows too)
                clock.tokens.append(
                    int(sum(v.sum() for k, v in inputs.items() if k.endswith("attention_mask") and torch.is_tensor(v)))
                )
            return out

        trainer.compute_loss = recording_compute_loss
        if hasattr(trainer, "_generate_single_turn"):
            generate = trainer._generate_single_turn

            def timed_generate(*args, **kwargs):
                started = time.perf_counter()
                out = generate(*args, **kwargs)
                clock.rollout_seconds.append(time.perf_counter() - started)
                return out

            trainer._generate_single_turn = timed_generate
        trainer.train()
    return clock.result(case)
