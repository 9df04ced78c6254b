"""Collectives of sharded CEL: reduce split statistics and loss matrices across ranks, agree on
decisions, gather and copy cluster rows (and fused optimizer state) wherever they live.

Every function here is a collective: all ranks of `group` call it in the same order with
tensors of the same shape. With no initialised process group (or world size 1) they degrade to
local no-ops, so the same code runs unsharded."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def world_size(group: dist.ProcessGroup | None = None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank(group: dist.ProcessGroup | None = None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def backend_device_types(group: dist.ProcessGroup | None = None) -> frozenset[str]:
    """The device types whose tensors `group`'s backend takes: `cpu:gloo,cuda:nccl` -> cpu and
    cuda; plain `nccl` -> cuda only; plain `gloo` -> cpu and cuda."""
    return device_types_of(str(dist.get_backend_config(group)))


def device_types_of(backend_config: str) -> frozenset[str]:
    """`backend_device_types` of a backend config string (`cpu:gloo,cuda:nccl`, `nccl`, ...)."""
    types: set[str] = set()
    for part in backend_config.split(","):
        device, _, backend = part.strip().rpartition(":")
        if device:
            types.add(device)
        else:
            types |= {"cuda"} if backend == "nccl" else {"cpu", "cuda"}
    return frozenset(types)


def collective_device(group: dist.ProcessGroup | None = None,
                      like: torch.Tensor | None = None) -> torch.device:
    """A device `group`'s backend takes tensors on: `like`'s own where it can, else the CPU,
    else (a CUDA-only backend such as plain nccl) the current CUDA device."""
    if world_size(group) <= 1:
        return like.device if like is not None else torch.device("cpu")
    types = backend_device_types(group)
    if like is not None and like.device.type in types:
        return like.device
    if "cpu" in types:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def to_backend(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """`tensor` itself if `group`'s backend takes its device, else a copy on one it takes (copy
    an in-place collective's result back with `tensor.copy_`)."""
    dev = collective_device(group, tensor)
    return tensor if tensor.device == dev else tensor.to(dev)


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def all_reduce_(tensor: torch.Tensor, op: str = "sum",
                group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Reduce (`sum` | `min` | `max`) `tensor` over ranks in place (and return it), on a device
    the backend takes."""
    if world_size(group) > 1:
        moved = to_backend(tensor, group)
        dist.all_reduce(moved, op=_REDUCE_OPS[op], group=group)
        if moved is not tensor:
            tensor.copy_(moved)
    return tensor


def reduce_(tensor: torch.Tensor, dst: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum `tensor` over ranks into rank `dst`'s copy (in place), on a device the backend takes."""
    if world_size(group) > 1:
        moved = to_backend(tensor, group)
        dist.reduce(moved, dst=dst, group=group)
        if moved is not tensor:
            tensor.copy_(moved)
    return tensor


def all_reduce_sum_(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum `tensor` over ranks in place (and return it)."""
    return all_reduce_(tensor, "sum", group)


def all_reduce_sum_many_(tensors: list[torch.Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Sum several tensors over ranks in place, one collective per dtype (flattened and
    concatenated, so many small statistics cost one round trip)."""
    if world_size(group) <= 1 or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group_tensors in by_dtype.values():
        flat = to_backend(torch.cat([t.reshape(-1) for t in group_tensors]), group)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        start = 0
        for t in group_tensors:
            n = t.numel()
            t.copy_(flat[start:start + n].view_as(t))
            start += n


def broadcast_object(obj: Any, src: int = 0, group: dist.ProcessGroup | None = None) -> Any:
    """Rank `src`'s `obj` on every rank (pickled; for small decisions such as split plans).
    Tensors come back on CPU; callers move them."""
    if world_size(group) <= 1:
        return obj
    box = [obj if rank(group) == src else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, src) if group is not None else src,
                               group=group)
    return box[0]


def broadcast_(tensor: torch.Tensor, src: int = 0, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Overwrite `tensor` with rank `src`'s copy (in place)."""
    if world_size(group) > 1:
        moved = to_backend(tensor, group)
        dist.broadcast(moved, src=dist.get_global_rank(group, src) if group is not None else src,
                       group=group)
        if moved is not tensor:
            tensor.copy_(moved)
    return tensor


def all_gather_variable(ids: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenation over ranks of 1-D tensors whose lengths may differ (two collectives: the
    lengths, then the padded values)."""
    n = world_size(group)
    if n <= 1:
        return ids
    length = torch.tensor([ids.numel()], dtype=torch.int64, device=collective_device(group, ids))
    lengths = [torch.zeros_like(length) for _ in range(n)]
    dist.all_gather(lengths, length, group=group)
    sizes = [int(x) for x in lengths]
    longest = max(sizes)
    gathered = all_gather_padded(ids, longest, fill=0, group=group)
    return torch.cat([gathered[r * longest: r * longest + s] for r, s in enumerate(sizes)])


def all_gather_rows(rows: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenation over ranks (in rank order) of 2-D tensors whose row counts may differ;
    the transport runs on the backend's device and the result comes back on `rows`' device."""
    n = world_size(group)
    if n <= 1:
        return rows
    dev = collective_device(group)
    width = rows.shape[1]
    flat = all_gather_variable(rows.reshape(-1).to(dev), group)
    return flat.reshape(-1, width).to(rows.device)


def all_gather_padded(values: torch.Tensor, length: int, fill: int = -1,
                      group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """ONE all-gather of a 1-D tensor padded with `fill` to `length` (a bound every rank agrees
    on, so no round for the sizes): the `[world_size * length]` concatenation over ranks."""
    if values.numel() > length:
        raise ValueError(f"all_gather_padded: {values.numel()} values exceed the bound {length}")
    padded = torch.full((length,), fill, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    n = world_size(group)
    if n <= 1:
        return padded
    moved = to_backend(padded, group)
    parts = [torch.empty_like(moved) for _ in range(n)]
    dist.all_gather(parts, moved, group=group)
    return torch.cat(parts).to(values.device)


def replicas_equal(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> bool:
    """Whether `tensor` is bitwise the same on every rank (compares rank 0's copy)."""
    if world_size(group) <= 1:
        return True
    ref = tensor.clone()
    broadcast_(ref, 0, group)
    same = torch.tensor([1 if torch.equal(ref, tensor) else 0], dtype=torch.int64)
    all_reduce_(same, "min", group)
    return bool(int(same))


@dataclass
class LocalShard:
    """One shard of a sharded table that this rank holds: a view of its weights
    `[rows, cols]` placed at (`row_offset`, `col_offset`) of the full table, and views of its
    fused optimizer states (each `[rows]` row-wise or `[rows, cols]` element-wise)."""

    weight: torch.Tensor
    row_offset: int
    col_offset: int
    states: list[torch.Tensor]
    replicated: bool = False   # data-parallel: every rank holds the full table

    @property
    def rows(self) -> int:
        return int(self.weight.shape[0])

    @property
    def cols(self) -> int:
        return int(self.weight.shape[1])

    def state_view(self, i: int) -> torch.Tensor:
        """State `i` as `[rows, 1]` (row-wise) or `[rows, cols]`."""
        return self.states[i].view(self.rows, -1)


def _contribute(shards: list[LocalShard], rows: torch.Tensor, width: int, state_index: int | None,
                dtype: torch.dtype) -> torch.Tensor:
    """This rank's part of the full rows `rows` (zeros elsewhere), `[len(rows), width]`.
    A row-wise state of a shard is written at the shard's first column."""
    device = rows.device
    out = torch.zeros(rows.numel(), width, dtype=dtype, device=device)
    for shard in shards:
        if shard.replicated:
            continue
        local = rows - shard.row_offset
        here = (local >= 0) & (local < shard.rows)
        if not bool(here.any()):
            continue
        source = shard.weight if state_index is None else shard.state_view(state_index)
        values = source[local[here].to(source.device)].to(dtype=dtype, device=device)
        c0 = shard.col_offset
        out[here, c0:c0 + values.shape[1]] = values
    return out


def gather_rows(shards: list[LocalShard], rows: torch.Tensor, width: int,
                group: dist.ProcessGroup | None = None, state_index: int | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Full rows `rows` of a sharded table (or of its optimizer state `state_index`) on every
    rank, `[len(rows), width]`: every rank writes what it holds, then one all-reduce sums the
    disjoint parts. Works for table-, column-, row- and table-column-wise shards alike."""
    replicated = [s for s in shards if s.replicated]
    if replicated:   # data-parallel: every rank already has every row
        source = replicated[0].weight if state_index is None else replicated[0].state_view(state_index)
        return source[rows.to(source.device)].to(dtype=dtype, device=rows.device)
    return all_reduce_sum_(_contribute(shards, rows, width, state_index, dtype), group)


def write_rows(shards: list[LocalShard], rows: torch.Tensor, values: torch.Tensor,
               state_index: int | None = None) -> None:
    """Write full rows `values` `[len(rows), width]` into the parts of `rows` this rank holds
    (the inverse of `gather_rows`; local, no communication)."""
    for shard in shards:
        local = rows - shard.row_offset
        here = (local >= 0) & (local < shard.rows)
        if not bool(here.any()):
            continue
        target = shard.weight if state_index is None else shard.state_view(state_index)
        c0 = 0 if shard.replicated else shard.col_offset
        part = values[here][:, c0:c0 + target.shape[1]]
        target[local[here].to(target.device)] = part.to(dtype=target.dtype, device=target.device)


@torch.no_grad()
def copy_rows(shards: list[LocalShard], src: torch.Tensor, dst: torch.Tensor, width: int,
              group: dist.ProcessGroup | None = None) -> None:
    """Copy full table rows `src -> dst` together with every fused optimizer state, wherever the
    rows live: one all-reduce per tensor kind (weights, each state) brings the source rows to
    every rank, then each rank writes the destination parts it holds."""
    if src.numel() == 0:
        return
    num_states = max((len(s.states) for s in shards), default=0)
    num_states = int(all_reduce_max_int(num_states, group))
    kinds: list[int | None] = [None, *range(num_states)]
    for kind in kinds:
        usable = [s for s in shards if kind is None or kind < len(s.states)]
        # the same dtype on every rank (a rank may hold no shard): float64 carries float32
        # weights and states, and integer counters below 2**53, exactly
        dtype = torch.float32 if kind is None else torch.float64
        values = gather_rows(usable, src, width, group, state_index=kind, dtype=dtype)
        write_rows(usable, dst, values, state_index=kind)


def all_reduce_max_int(value: int, group: dist.ProcessGroup | None = None) -> int:
    if world_size(group) <= 1:
        return value
    return int(all_reduce_(torch.tensor([value], dtype=torch.int64), "max", group))
