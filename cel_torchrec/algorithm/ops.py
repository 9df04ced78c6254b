"""Vectorised gather/scatter ops of CEL. Every function works on CPU and CUDA tensors alike and
has no Python loop over entities, clusters or samples."""
from __future__ import annotations

import torch

from cel_torchrec.choices import GRAD_AVERAGES as GRAD_AVERAGE_MODES


def remap_ids(assignment: torch.Tensor, entity_ids: torch.Tensor) -> torch.Tensor:
    """Entity ids -> cluster ids (int64), a gather through the assignment map."""
    return assignment.index_select(0, entity_ids.long()).long()


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum rows of `values` by `segment_ids` into `[num_segments, *values.shape[1:]]`."""
    out = torch.zeros((num_segments, *values.shape[1:]), dtype=values.dtype, device=values.device)
    return out.index_add_(0, segment_ids.long(), values)


def segment_count(segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Occurrences of each segment id (all in `[0, num_segments)`), `int64[num_segments]`. An
    `index_add_` into a fixed size, not `bincount`, whose output size is data-dependent (a host
    sync on CUDA)."""
    ids = segment_ids.long()
    out = torch.zeros(num_segments, dtype=torch.long, device=ids.device)
    return out.index_add_(0, ids, torch.ones_like(ids))


def distinct_members_in_batch(entity_ids: torch.Tensor, cluster_ids: torch.Tensor,
                              num_clusters: int) -> torch.Tensor:
    """Number of distinct entities of each cluster present in the batch, `int64[num_clusters]`.
    Sort, then count each entity's first occurrence: no data-dependent shape (`unique` would
    cost a host sync on CUDA every step)."""
    ids = entity_ids.long()
    if ids.numel() == 0:
        return torch.zeros(num_clusters, dtype=torch.long, device=ids.device)
    order = torch.sort(ids).indices
    sorted_ids = ids.index_select(0, order)
    first = torch.ones_like(sorted_ids)
    first[1:] = (sorted_ids[1:] != sorted_ids[:-1]).long()
    out = torch.zeros(num_clusters, dtype=torch.long, device=ids.device)
    return out.index_add_(0, cluster_ids.long().index_select(0, order), first)


def cluster_grad_scale(entity_ids: torch.Tensor, cluster_ids: torch.Tensor,
                       member_counts: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-sample factor applied to the gradient of each looked-up embedding, so that the
    gradient reaching cluster row k is averaged over k's members instead of summed.

    - ``members``: divide by k's total member count (the reference's rule, full batch);
    - ``batch``: divide by the number of distinct members of k present in this batch
      (the mini-batch analogue; ours);
    - ``none``: plain summed gradient.
    """
    if mode == "none":
        return torch.ones(entity_ids.shape[0], dtype=torch.float32, device=entity_ids.device)
    if mode == "members":
        denom = member_counts.index_select(0, cluster_ids.long())
    elif mode == "batch":
        per_cluster = distinct_members_in_batch(entity_ids, cluster_ids, member_counts.numel())
        denom = per_cluster.index_select(0, cluster_ids.long())
    else:
        raise ValueError(f"grad_average must be one of {GRAD_AVERAGE_MODES}, got {mode!r}")
    return 1.0 / denom.clamp_min(1).to(torch.float32)


def scatter_entity_grads(accumulator: torch.Tensor, slot_of_entity: torch.Tensor,
                         entity_ids: torch.Tensor, grads: torch.Tensor) -> None:
    """Add per-sample gradients of looked-up embeddings into per-entity rows of `accumulator`
    (`[num_slots, d]`); entities whose slot is -1 are not tracked."""
    slots = slot_of_entity.index_select(0, entity_ids.long())
    keep = slots >= 0
    accumulator.index_add_(0, slots[keep], grads[keep].to(accumulator.dtype))


def segment_covariance(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int,
                       chunk_rows: int = 65536) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-segment count, mean `[S, d]` and centred scatter matrix `sum (x-mean)(x-mean)^T`
    `[S, d, d]`, accumulated in row chunks so memory stays `O(S d^2 + chunk d^2)`."""
    d = values.shape[1]
    count = segment_count(segment_ids, num_segments)
    total = segment_sum(values, segment_ids, num_segments)
    second = torch.zeros(num_segments, d, d, dtype=values.dtype, device=values.device)
    for start in range(0, values.shape[0], chunk_rows):  # chunks of rows, bounded count
        x = values[start:start + chunk_rows]
        second.index_add_(0, segment_ids[start:start + chunk_rows].long(), x[:, :, None] * x[:, None, :])
    mean = total / count.clamp_min(1)[:, None].to(values.dtype)
    scatter = second - count[:, None, None].to(values.dtype) * mean[:, :, None] * mean[:, None, :]
    return count, mean, scatter
