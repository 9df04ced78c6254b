"""Checkpoints of sharded CEL models.

- Same world size: `save_checkpoint` / `load_checkpoint` write and read the DMP model's state
  (TorchRec ShardedTensors for the tables, replicated cluster-state buffers) and the fused
  optimizer's state with `torch.distributed.checkpoint` (DCP), each rank writing its shards.
- Any world size / sharding (or unsharded): `export_unsharded_state` gathers every table (and
  fused optimizer state) to full tensors on every rank; the result loads into an unsharded
  `ClusteredEmbeddingBagCollection` with `load_state_dict`, or into a model sharded any other
  way with `load_unsharded_state`. Memory: the full tables on every rank, fine up to a few GB.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from cel_torchrec.distributed import collectives as C
from cel_torchrec.distributed.sharded_clustered_ebc import ShardedClusteredEmbeddingBagCollection


def _sync(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, ShardedClusteredEmbeddingBagCollection):
            m.sync_statistics()


def _fused_optimizer(model: nn.Module):
    return getattr(model, "fused_optimizer", None)


def _checkpoint_state(model: nn.Module, with_optimizer: bool) -> dict[str, Any]:
    state: dict[str, Any] = {"model": model.state_dict()}
    optim = _fused_optimizer(model) if with_optimizer else None
    if optim is not None:
        optim_state = optim.state_dict()
        if any(optim_state.get("state", {}).values()):   # EXACT_SGD has no state to save
            state["optimizer"] = optim_state
    return state


def save_checkpoint(model: nn.Module, path: str, with_optimizer: bool = True) -> None:
    """Collective. Save a DMP model (and its fused optimizer state) to directory `path` with DCP;
    pending interaction counters are summed into the replicated cluster state first."""
    _sync(model)
    dcp.save(_checkpoint_state(model, with_optimizer), checkpoint_id=path)


def load_checkpoint(model: nn.Module, path: str, with_optimizer: bool = True) -> None:
    """Collective. Restore what `save_checkpoint` wrote into a model sharded the same way (same
    world size and plan). For another world size use `export_unsharded_state` /
    `load_unsharded_state` (or DCP resharding of the tables; not tested here)."""
    state = _checkpoint_state(model, with_optimizer)
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    if "optimizer" in state:
        _fused_optimizer(model).load_state_dict(state["optimizer"])


# ---------------------------------------------------------------------- unsharded export
def _full_tensor(value: Any, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Every rank's parts of a ShardedTensor / DTensor summed into the full tensor."""
    if isinstance(value, ShardedTensor):
        full = torch.zeros(value.size(), dtype=value.dtype)
        for shard in value.local_shards():
            index = tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets,
                                                         shard.metadata.shard_sizes))
            full[index] = shard.tensor.detach().cpu()
        device = C.collective_device(group)
        return C.all_reduce_sum_(full.to(device), group).cpu()
    if hasattr(value, "full_tensor"):   # DTensor
        return value.full_tensor().detach().cpu()
    return value.detach().cpu().clone() if torch.is_tensor(value) else value


def _load_into(target: Any, full: torch.Tensor) -> None:
    if isinstance(target, ShardedTensor):
        for shard in target.local_shards():
            index = tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets,
                                                         shard.metadata.shard_sizes))
            shard.tensor.detach().copy_(full[index].to(shard.tensor.dtype))
    elif hasattr(target, "to_local"):   # DTensor
        from torch.distributed.tensor import distribute_tensor
        local = distribute_tensor(full.to(target.to_local().device), target.device_mesh,
                                  target.placements).to_local()
        target.to_local().detach().copy_(local)
    else:
        target.detach().copy_(full.to(target.device, target.dtype))


def export_unsharded_state(model: nn.Module, group: dist.ProcessGroup | None = None,
                           with_optimizer: bool = False) -> dict[str, Any]:
    """Collective. The model's state dict with every sharded table gathered to a full CPU
    tensor, on every rank. Keys are the module's own (a DMP-wrapped `ClusteredEmbeddingBagCollection`
    gives exactly the unsharded module's keys). With `with_optimizer`, the fused optimizer's
    per-table states are added under `"optimizer"` (full tensors, keyed as TorchRec names them)."""
    _sync(model)
    out: dict[str, Any] = {k: _full_tensor(v, group) for k, v in model.state_dict().items()}
    optim = _fused_optimizer(model)
    if with_optimizer and optim is not None:
        out["optimizer"] = {param: {name: _full_tensor(v, group) for name, v in states.items()}
                            for param, states in optim.state_dict()["state"].items()}
    return out


def load_unsharded_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Local (no communication). Write full tensors (from `export_unsharded_state`, or an
    unsharded module's `state_dict()`) into this rank's shards of a model sharded any way; the
    fused optimizer state too if `state` has an `"optimizer"` entry."""
    targets = model.state_dict()
    missing = [k for k in targets if k not in state]
    if missing:
        raise KeyError(f"state lacks {missing[:5]}")
    with torch.no_grad():
        for key, target in targets.items():
            _load_into(target, state[key])
        optim = _fused_optimizer(model)
        if "optimizer" in state and optim is not None:
            for param, states in optim.state_dict()["state"].items():
                for name, target in states.items():
                    if torch.is_tensor(target) and param in state["optimizer"]:
                        _load_into(target, state["optimizer"][param][name])
