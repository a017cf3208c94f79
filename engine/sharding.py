"""Fully sharded data parallel (`parallelism: fsdp`): each rank keeps 1/N of the policy's weights, gradients
and optimizer state, for models whose training state does not fit on one GPU.

Built on PyTorch's `fully_shard` (FSDP2): every decoder layer is a unit (the model's own
`_no_split_modules` name them), and the rest (embeddings, final norm, LM head) is the root unit. A unit
gathers its full weights for its forward and backward and frees them after; its gradient is summed
over the ranks and scattered so each rank keeps its shard (`reduce_scatter` with a plain sum: each
rank's loss is already divided by the step's global units, as in the ddp mode).

What this asks of the loops, because every gather is a collective that all ranks must call:
- every rank runs the same number of forward and backward passes per step: a rank whose shard of a
  micro-batch is empty runs a *filler* (real rows of the step, loss x 0), see `micro_shards`;
- a forward that one rank runs alone (rank 0's evaluation and samples, each rank's own rollouts of
  different lengths) runs inside `full_weights`: every rank gathers the whole model first, after which
  forwards need no collective. The full weights are then held on every rank for that time, as the
  ddp mode holds them always;
- checkpoints and the final model are gathered to rank 0 as one full state dict, in the same format
  as a one-process run's, so a run may resume with another `num_processes` or `parallelism`.
The frozen models (reference, reward model, judge) and a value model stay whole on every rank; a value
model's gradients are summed as in the ddp mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from engine.distributed import World, is_shard

T = TypeVar("T")


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules to shard one by one: the model's transformer blocks (the classes its `_no_split_modules`
    names), or failing that, the entries of its longest ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    units = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if units:
        return units
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard_options(world: World, device: torch.device, compute: torch.dtype) -> dict:
    """`fully_shard`'s keyword arguments for a run on `device` computing in `compute`.

    The mesh is on the run's own device type: FSDP's default mesh is on the machine's accelerator, so a
    CPU run on a machine with a GPU would otherwise move its shards to GPU 0. Under mixed precision the
    gathered weights are cast to `compute` once per unit (gradients are summed in fp32): left to autocast,
    each unit's bf16 casts stay alive until the backward, a bf16 copy of the whole model on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    options: dict = {"mesh": init_device_mesh(device.type, (world.size,))}
    if compute != torch.float32:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    return options


def shard_model(
    model: torch.nn.Module, world: World, device: torch.device, compute: torch.dtype = torch.float32
) -> torch.nn.Module:
    """Shard `model` in place over the world's ranks (every rank calls it with the same weights)."""
    _shard(model, world, device, compute)
    _use_chunked_head(model)
    return model


def _use_chunked_head(model: torch.nn.Module) -> None:
    """The chunked LM head calls the body and the head apart: on a sharded model it runs inside the model's
    own forward call, where the root unit's weights (embeddings, final norm, head) are gathered."""
    from engine.logprobs import use_head_inside

    use_head_inside(model, lambda fn: in_own_forward(model, fn))  # its probe is a forward, on every rank
    # FSDP keeps the root unit's weights gathered after a forward (its backward needs them next): shard
    # them again, or the model's parameters, which the optimizer takes, would be the gathered copies.
    for unit in _fsdp_units(model):
        unit.reshard()


def _shard(model: torch.nn.Module, world: World, device: torch.device, compute: torch.dtype) -> None:
    from torch.distributed.fsdp import FSDPModule, fully_shard

    options = shard_options(world, device, compute)
    for unit in _units(model):
        fully_shard(unit, **options)
    fully_shard(model, **options)
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            # Sum, not mean, across ranks; forced to a plain sum because gloo lacks the scaled-sum op.
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)


def load_sharded(
    load: Callable[..., torch.nn.Module],
    source: str,
    world: World,
    device: torch.device,
    compute: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """The fp32 model `load` (engine.models.load_causal_lm or load_reward_model) makes of `source`, sharded
    over the world's ranks as `shard_model` shards it, with no rank but 0 ever holding all of its weights.

    Every rank builds the model's modules with their weights on the meta device (no memory) and shards
    them, then gives each its shard's memory on `device`; rank 0 alone reads the weights, onto its CPU,
    and sends them tensor by tensor, each rank keeping its shard. Rank 0's host holds the full weights
    once for the time of the loading (the others' never do); a GPU holds its shards and, while it is
    sent, one whole tensor. Every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model = load(source, dtype=torch.float32, device=device, trust_remote_code=trust_remote_code, weights=False)
    full: dict[str, torch.Tensor] = {}
    if world.is_main:
        loaded = load(source, dtype=torch.float32, device=torch.device("cpu"), trust_remote_code=trust_remote_code)
        full = loaded.state_dict()
        # How from_pretrained renamed or converted the checkpoint's weights, which save_pretrained reverts when
        # rank 0 writes checkpoints (without it, transformers also empties the state dict it is given).
        model._weight_conversions = getattr(loaded, "_weight_conversions", None)
        del loaded
    # What the checkpoint lacks (a reward model's fresh head) was drawn on rank 0 alone: every rank goes on
    # from its random state, as each would from its own whole load (a value head is drawn next, the same).
    torch.set_rng_state(world.broadcast(torch.get_rng_state()))
    _shard(model, world, device, compute)
    # Buffers are no weights (rotary frequencies, computed when the modules were built): kept as they are.
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.to_empty(device=device)  # each rank's shards, uninitialised until the weights arrive
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    _use_chunked_head(model)  # as `shard_model` does, now that the weights are in
    return model


def in_own_forward(model: torch.nn.Module, fn: Callable[[], T]) -> T:
    """`fn()` run as the sharded `model`'s forward, for code that calls its parts apart (the body, then
    the head in chunks). FSDP's hooks on the root unit gather its weights before `fn` and free them
    after, and on what `fn` returns register the gather again for the backward, as for the model's own
    outputs. Every rank must call it (the gathers are collectives), as it calls the model."""

    def forward():
        del model.forward  # this call only: a call of the model inside `fn` takes its own forward
        return fn()

    model.forward = forward
    try:
        return model()
    finally:
        model.__dict__.pop("forward", None)


def _fsdp_units(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_weights(model: torch.nn.Module) -> Iterator[None]:
    """Inside, every unit of a sharded `model` holds its full weights, so any rank may run forwards alone
    (generation, evaluation). Every rank must enter it. A model that is not sharded: nothing to do."""
    if not is_sharded(model):
        yield
        return
    units = _fsdp_units(model)
    for unit in units:
        unit.set_reshard_after_forward(False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True)


def _container(models: dict[str, torch.nn.Module]) -> torch.nn.Module:
    """One module holding what the optimizer trains (`{"policy": ..., "value": ...}`), so state-dict names
    and the optimizer's parameter order agree."""
    return torch.nn.ModuleDict({name: m for name, m in models.items() if m is not None})


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The sharded `model`'s full state dict on rank 0's CPU ({} on other ranks). Every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Tied weights (an LM head sharing the embedding) come back gathered twice, as two tensors that
    # `save_pretrained` cannot see are one: keep the name the model itself lists first.
    first = {name for name, _ in model.named_parameters()}
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - first
    return {name: value for name, value in state.items() if name not in tied}


def _trainable_names(models: dict[str, torch.nn.Module]) -> list[str]:
    return [name for name, p in _container(models).named_parameters() if p.requires_grad]


def full_optimizer_state(models: dict[str, torch.nn.Module], optimizer) -> dict:
    """The optimizer's full state on rank 0 ({} elsewhere), keyed as `optimizer.state_dict()` keys it (by
    position), so a checkpoint reads the same whatever wrote it. Every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    by_name = get_optimizer_state_dict(
        _container(models), optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not by_name:
        return {}
    index = {name: i for i, name in enumerate(_trainable_names(models))}
    return {
        "state": {index[name]: value for name, value in by_name["state"].items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]} for group in by_name["param_groups"]
        ],
    }


def load_full_optimizer_state(models: dict[str, torch.nn.Module], optimizer, state: dict) -> None:
    """Load a position-keyed full optimizer state (any checkpoint's) into a sharded run's optimizer: each
    rank keeps its shard. Every rank calls it with the same `state`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _trainable_names(models)
    by_name = {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]],
    }
    set_optimizer_state_dict(
        _container(models), optimizer, optim_state_dict=by_name, options=StateDictOptions(full_state_dict=True)
    )


def clip_sharded_gradients(parameters: list[torch.nn.Parameter], max_norm: float, world: World) -> float:
    """Clip by the global norm when some gradients are shards (summed squares over the ranks) and others are
    whole and equal on every rank (a value model's): returns the norm before clipping."""
    grads = [p.grad for p in parameters if p.grad is not None]
    shard_squares = _sum_of_squares([g.to_local() for g in grads if is_shard(g)])
    whole_squares = _sum_of_squares([g for g in grads if not is_shard(g)])
    norm = (world.sum([shard_squares])[0] + whole_squares) ** 0.5
    scale = max_norm / (norm + 1e-6)
    if scale < 1.0:
        for g in grads:
            g.mul_(scale)
    return norm


def _sum_of_squares(tensors: list[torch.Tensor]) -> float:
    """The tensors' summed squares in float64, read back to the host once (not once per tensor: a GPU
    would otherwise wait for hundreds of reads a step)."""
    if not tensors:
        return 0.0
    return float(torch.stack([t.double().pow(2).sum() for t in tensors]).sum())
