"""Gradient-PCA ("GPCA") splits: choose clusters, find the principal direction of their members'
gradients, divide members by the sign (or median) of their projection on it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cel_torchrec.choices import SPLIT_CRITERIA, SPLIT_METHODS
from cel_torchrec.algorithm.ops import segment_covariance


@dataclass(frozen=True)
class SplitPlan:
    """What a split event decided: cluster `parents[j]` gives the entities `moved_entities` whose
    `moved_to` equals `children[j]` to the new row `children[j]`, which starts as a copy of the
    parent's row (and optimizer state). `skipped` lists candidates whose split left a side empty."""

    parents: torch.Tensor        # int64[s]
    children: torch.Tensor       # int64[s]
    moved_entities: torch.Tensor  # int64[n_moved]
    moved_to: torch.Tensor       # int64[n_moved]
    skipped: torch.Tensor        # int64[k]

    @property
    def num_splits(self) -> int:
        return int(self.parents.numel())


def choose_clusters(criterion: str, num_active: int, k: int, *, member_counts: torch.Tensor,
                    interaction_counts: torch.Tensor | None = None,
                    grad_norms: torch.Tensor | None = None,
                    loss_sums: torch.Tensor | None = None) -> torch.Tensor:
    """Top-`k` active clusters (with at least two members) by `criterion`, ties to the lower id.

    interactions: most training interactions (reference default); members: most members;
    grad_norm: largest norm of the summed gradient; loss / mean_loss: largest summed / mean loss
    over the cluster's interactions."""
    members = member_counts[:num_active].to(torch.float64)
    if criterion == "interactions":
        score = _need(interaction_counts, criterion)[:num_active].to(torch.float64)
    elif criterion == "members":
        score = members
    elif criterion == "grad_norm":
        score = _need(grad_norms, criterion)[:num_active].to(torch.float64)
    elif criterion == "loss":
        score = _need(loss_sums, criterion)[:num_active].to(torch.float64)
    elif criterion == "mean_loss":
        inter = _need(interaction_counts, criterion)[:num_active].to(torch.float64)
        score = _need(loss_sums, criterion)[:num_active].to(torch.float64) / inter.clamp_min(1)
    else:
        raise ValueError(f"split criterion must be one of {SPLIT_CRITERIA}, got {criterion!r}")
    score = torch.where(members >= 2, score, torch.full_like(score, -torch.inf))
    eligible = int((members >= 2).sum())
    k = min(k, eligible)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=member_counts.device)
    # stable sort on the negated score keeps the lower id first among ties
    order = torch.sort(-score, stable=True).indices
    return order[:k].to(member_counts.device)


def _need(t: torch.Tensor | None, criterion: str) -> torch.Tensor:
    if t is None:
        raise ValueError(f"split criterion {criterion!r} needs its statistic")
    return t


def top_eigenvectors(scatter: torch.Tensor, iters: int = 48) -> torch.Tensor:
    """Top eigenvector of each symmetric PSD matrix `[S, d, d]` by batched power iteration in
    the matrices' dtype, started from each matrix's largest-norm column (deterministic; never
    orthogonal to the top eigenvector unless that column is zero). `iters` squarings would be
    faster but lose float32 precision; 48 multiplications resolve eigengaps of a few percent
    (tests check the result against `torch.linalg.eigh`)."""
    s, d, _ = scatter.shape
    if s == 0:
        return scatter.new_zeros(0, d)
    norms = scatter.norm(dim=1)                                     # column norms [S, d]
    v = torch.gather(scatter, 2, norms.argmax(dim=1)[:, None, None].expand(s, d, 1))[:, :, 0]
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    for _ in range(iters):           # fixed count, batched over segments (no loop over clusters)
        w = torch.bmm(scatter, v[:, :, None])[:, :, 0]
        v = w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return v


def principal_directions(grads: torch.Tensor, segment_ids: torch.Tensor, num_segments: int,
                         solver: str = "power") -> tuple[torch.Tensor, torch.Tensor]:
    """For each segment: mean gradient `[S, d]` and top eigenvector `[S, d]` of the centred
    scatter matrix `X^T X`: batched float32 power iteration (`power`, default) or a batched
    float64 `eigh` (`eigh`, the check)."""
    if solver == "eigh":
        work = grads.to(torch.float64)
        _, mean, scatter = segment_covariance(work, segment_ids, num_segments)
        top = torch.linalg.eigh(scatter)[1][:, :, -1]          # eigenvalues ascending -> last
    elif solver == "power":
        work = grads.to(torch.float32)
        _, mean, scatter = segment_covariance(work, segment_ids, num_segments)
        top = top_eigenvectors(scatter)
    else:
        raise ValueError(f"solver must be power|eigh, got {solver!r}")
    # fix the eigenvector's arbitrary sign: largest-magnitude component positive (deterministic)
    pivot = top.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(torch.gather(top, 1, pivot)).clamp_min(0) * 2 - 1
    return mean, top * sign


def gpca_split(assignment: torch.Tensor, num_active: int, capacity: int, parents: torch.Tensor,
               member_entities: torch.Tensor, member_grads: torch.Tensor,
               method: str = "sign", solver: str = "power") -> SplitPlan:
    """Split each cluster in `parents` along the first principal component of its members'
    gradients. `member_entities[i]` (int64, distinct) has gradient `member_grads[i]`. Only those
    entities decide and move: members of a parent without a gradient row have no information
    and stay in the parent; rows of entities no longer in a parent are ignored. Work is
    O(rows + parents * d^2), independent of the number of entities in the table.

    sign: projection of the centred gradient < 0 goes to the new cluster (split at the mean);
    median: the lower half by projection goes to the new cluster. A split that would leave either
    side without an informed member is skipped. Children take the next free rows, in the order
    of `parents`."""
    if method not in SPLIT_METHODS:
        raise ValueError(f"split method must be one of {SPLIT_METHODS}, got {method!r}")
    device = assignment.device
    parents = parents.long().to(device)[: max(capacity - num_active, 0)]
    s = parents.numel()
    empty = torch.empty(0, dtype=torch.long, device=device)
    if s == 0:
        return SplitPlan(parents=empty, children=empty, moved_entities=empty, moved_to=empty,
                         skipped=empty)
    seg_of_cluster = torch.full((capacity,), -1, dtype=torch.long, device=device)
    seg_of_cluster[parents] = torch.arange(s, device=device)
    ents = member_entities.long().to(device)
    seg = seg_of_cluster[assignment.index_select(0, ents).long()]
    keep = seg >= 0
    members, member_seg = ents[keep], seg[keep]
    g = member_grads.to(device)[keep]

    mean, direction = principal_directions(g, member_seg, s, solver=solver)
    proj = ((g.to(mean.dtype) - mean[member_seg]) * direction[member_seg]).sum(dim=1)
    if method == "sign":
        # small relative tolerance so that numerically-zero projections stay with the parent
        scale = proj.abs().max().clamp_min(1e-30) if proj.numel() else proj.new_tensor(1.0)
        tol = 1e-9 if proj.dtype == torch.float64 else 1e-5
        to_child = proj < -tol * scale
    else:
        to_child = _lower_half_by_segment(proj, member_seg, s)
    n_child = torch.bincount(member_seg[to_child], minlength=s)
    n_total = torch.bincount(member_seg, minlength=s)
    ok = (n_child > 0) & (n_child < n_total)
    children_of_seg = torch.full((s,), -1, dtype=torch.long, device=device)
    children_of_seg[ok] = num_active + torch.arange(int(ok.sum()), device=device)
    move = to_child & ok[member_seg]
    return SplitPlan(parents=parents[ok], children=children_of_seg[ok],
                     moved_entities=members[move], moved_to=children_of_seg[member_seg[move]],
                     skipped=parents[~ok])


def _lower_half_by_segment(proj: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Mask of the floor(n/2) lowest projections within each segment (vectorised rank)."""
    order = torch.sort(proj, stable=True).indices
    order = order[torch.sort(seg[order], stable=True).indices]   # by segment, then projection
    counts = torch.bincount(seg, minlength=num_segments)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(proj.numel(), device=proj.device) - starts[seg[order]]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank < (counts[seg] // 2)


def apply_split(state, plan: SplitPlan) -> None:
    """Move the plan's entities to their new clusters in place, keeping the state's cluster
    counters current in O(moved), and activate the children (the caller copies the parent
    rows). `state` is a `ClusterState`; a bare assignment tensor is accepted too (no counters)."""
    if isinstance(state, torch.Tensor):
        if plan.moved_entities.numel():
            state[plan.moved_entities] = plan.moved_to.to(state.dtype)
        return
    state.move_entities(plan.moved_entities, plan.moved_to)
    state.num_active = state.num_active + plan.num_splits
