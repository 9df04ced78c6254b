"""How the embedding tables are updated: FBGEMM's fused table-batched kernels with their fused
optimizer (the tables sharded by TorchRec's `DistributedModelParallel`, on 1 rank for a single
process), or a torch optimizer over the unsharded tables. Decided in one place,
`choose_table_update`, which also says why.

The fused optimizer updates only the rows a batch looks up, inside backward. A torch optimizer
steps the whole table every step: it reads and writes every row (0.42 s/step measured at 1e6
rows), so it is kept only where FBGEMM has no fused kind or the sharded collection lacks a
feature:
- `train.optimizer=adam` on CPU: FBGEMM's fused Adam runs on CUDA only (its CPU kernels are
  EXACT_ADAGRAD, EXACT_ROWWISE_ADAGRAD, EXACT_SGD);
- `train.weight_decay > 0`: FBGEMM does not do torch's weight decay (EXACT_SGD ignores it,
  EXACT_ADAGRAD's L2 mode updates differently, and either reaches only the batch's rows);
- `cel.<table>.entity_bias`: the sharded collection has no per-entity biases;
- `dist.sharding=data_parallel` on one process: data-parallel tables are dense replicated
  parameters, stepped by the torch optimizer anyway.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cel_torchrec.distributed import FUSED_KINDS, TORCH_NAMES, fused_params

@dataclass(frozen=True)
class TableUpdate:
    """`sharded`: the tables live in a DMP-sharded collection (every multi-process run, and
    single-process runs on the fused path). `fused`: FBGEMM's fused optimizer updates them in
    backward (so the dense optimizer must not hold them). `reason`: why the torch path was kept
    (empty on the fused path)."""

    sharded: bool
    fused: bool
    optimizer: str                # train.optimizer: adam | adagrad | sgd
    reason: str = ""

    @property
    def kind(self) -> str:
        """FBGEMM's EmbOptimType name on the fused path, torch's optimizer class name otherwise."""
        return FUSED_KINDS[self.optimizer][0] if self.fused else TORCH_NAMES[self.optimizer]

    def fused_params(self, lr: float) -> dict[str, Any]:
        """The sharder's `fused_params`: FBGEMM's optimizer of the same kind, torch's defaults."""
        return fused_params(self.optimizer, lr)

    def describe(self, world_size: int, sharding: str) -> str:
        """The one startup line that says how the tables are updated."""
        ranks = f"{world_size} rank{'s' if world_size > 1 else ''}"
        if self.fused:
            return f"[train] tables: fused FBGEMM {self.kind} (DMP, {ranks}, {sharding})"
        if self.sharded:
            return f"[train] tables: torch {self.kind} (DMP, {ranks}, {sharding}) because {self.reason}"
        return (f"[train] tables: torch {self.kind} (dense: every row, every step) because "
                f"{self.reason}")


def fused_obstacles(cfg, device: torch.device, collection: torch.nn.Module,
                    world_size: int = 1) -> list[str]:
    """Why the tables of `collection` (the unsharded module) cannot use FBGEMM's fused
    optimizer under `cfg` on `device`; empty when they can."""
    out = []
    t = cfg.train
    kind, devices = FUSED_KINDS[t.optimizer]
    if device.type not in devices:
        out.append(f"train.optimizer={t.optimizer}: FBGEMM's fused {kind} runs on "
                   f"{'/'.join(d.upper() for d in devices)} only (on {device.type.upper()} "
                   f"use train.optimizer=adagrad or sgd for fused tables)")
    if t.weight_decay:
        out.append(f"train.weight_decay={t.weight_decay}: FBGEMM's fused kernels do not apply "
                   f"torch's weight decay (use train.l2, the penalty on the batch's embeddings)")
    if len(getattr(collection, "entity_biases", ()) or ()):
        out.append("cel.<table>.entity_bias: the sharded collection has no per-entity bias")
    if cfg.embedding.method in ("cce", "cerp"):
        out.append(f"embedding.method={cfg.embedding.method}: its tables are composed from "
                   f"plain torch parameters (small by design), not a TorchRec EBC, and its "
                   f"phases rewrite them; it runs on one process")
    if world_size == 1 and cfg.dist.sharding == "data_parallel":
        out.append("dist.sharding=data_parallel: data-parallel tables are dense parameters "
                   "stepped by the torch optimizer")
    return out


def choose_table_update(cfg, device: torch.device, world_size: int,
                        collection: torch.nn.Module) -> TableUpdate:
    """`train.fused_tables`: `auto` fused whenever possible, `on` fused or an error saying why
    not, `off` the torch optimizer (one process only). Several processes always shard the
    tables, so there whatever keeps them off the fused kernels is an error (except
    data-parallel sharding, whose replicated tables the torch optimizer steps)."""
    mode, optimizer = cfg.train.fused_tables, cfg.train.optimizer
    mode = {True: "on", False: "off"}.get(mode, mode)     # YAML's on/off are booleans
    if optimizer not in FUSED_KINDS:
        raise ValueError(f"train.optimizer must be adam|adagrad|sgd, got {optimizer!r}")
    obstacles = fused_obstacles(cfg, device, collection, world_size)
    if world_size > 1:
        if mode == "off":
            raise ValueError("train.fused_tables=off runs on one process only: sharded tables "
                             "always use FBGEMM's fused optimizer")
        if obstacles:
            raise ValueError(f"{obstacles[0]}; multi-process runs need fused tables")
        if cfg.dist.sharding == "data_parallel":
            return TableUpdate(sharded=True, fused=False, optimizer=optimizer,
                               reason="dist.sharding=data_parallel replicates the tables")
        return TableUpdate(sharded=True, fused=True, optimizer=optimizer)
    if mode == "off":
        return TableUpdate(sharded=False, fused=False, optimizer=optimizer,
                           reason="train.fused_tables=off")
    if obstacles:
        if mode == "on":
            raise ValueError(f"train.fused_tables=on, but {'; '.join(obstacles)}")
        return TableUpdate(sharded=False, fused=False, optimizer=optimizer,
                           reason="; ".join(obstacles))
    return TableUpdate(sharded=True, fused=True, optimizer=optimizer)
