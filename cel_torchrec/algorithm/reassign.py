"""Data-driven reassignment: move every entity to the cluster whose embedding gives its training
interactions the lowest loss, with the reference's damping and no-empty-cluster rules."""
from __future__ import annotations

from dataclasses import dataclass

import torch



@dataclass(frozen=True)
class ReassignPlan:
    """The new map plus the cluster rows to copy (`row_src[j]` -> `row_dst[j]`, with optimizer
    state) for clusters that had to be refilled from the largest cluster."""

    new_assignment: torch.Tensor   # int32[N]
    row_src: torch.Tensor          # int64[r]
    row_dst: torch.Tensor          # int64[r]
    num_moved: int
    num_kept_by_damping: int
    num_kept_to_avoid_empty: int
    num_kept_below_min_gain: int = 0


def accumulate_candidate_losses(loss_matrix: torch.Tensor, slot_of_entity: torch.Tensor,
                                entity_ids: torch.Tensor, sample_losses: torch.Tensor) -> None:
    """Add per-sample candidate losses `[B, K]` into the rows of `loss_matrix` `[n_slots, K]` of
    the samples' entities (slot -1: not tracked)."""
    slots = slot_of_entity.index_select(0, entity_ids.long())
    keep = slots >= 0
    loss_matrix.index_add_(0, slots[keep], sample_losses[keep].to(loss_matrix.dtype))


def mf_sufficient_stats(x: torch.Tensor, residual: torch.Tensor, slots: torch.Tensor,
                        num_slots: int, chunk_rows: int = 8192,
                        out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-entity sufficient statistics of a dot-product model whose prediction is linear in the
    entity's embedding: `pred = x . c + const`, `residual = y - const`. Returns `sum r^2 [n]`,
    `sum r x [n, D]`, `sum x x^T [n, D, D]` over each entity's interactions. With `out`, the
    statistics are added into those tensors in place (accumulation over batches)."""
    keep = slots >= 0
    x, residual, slots = x[keep].double(), residual[keep].double(), slots[keep]
    d = x.shape[1]
    if out is None:
        out = (torch.zeros(num_slots, dtype=torch.float64, device=x.device),
               torch.zeros(num_slots, d, dtype=torch.float64, device=x.device),
               torch.zeros(num_slots, d, d, dtype=torch.float64, device=x.device))
    s_rr, s_rx, s_xx = out
    s_rr.index_add_(0, slots, residual * residual)
    s_rx.index_add_(0, slots, residual[:, None] * x)
    for start in range(0, x.shape[0], chunk_rows):   # row chunks bound the [rows, D, D] temporary
        xc = x[start:start + chunk_rows]
        s_xx.index_add_(0, slots[start:start + chunk_rows], xc[:, :, None] * xc[:, None, :])
    return s_rr, s_rx, s_xx


def mf_loss_matrix(s_rr: torch.Tensor, s_rx: torch.Tensor, s_xx: torch.Tensor,
                   cluster_rows: torch.Tensor) -> torch.Tensor:
    """Closed-form summed squared error `[n, M]` of every entity under every cluster row:
    `L(k) = sum r^2 - 2 c_k . sum r x + c_k^T (sum x x^T) c_k`, in O(n M D^2) without data."""
    c = cluster_rows.double()
    quad = ((s_xx @ c.T) * c.T[None]).sum(dim=1)      # [n, D, M] -> [n, M]; no n*D*D*M temporary
    return s_rr[:, None] - 2.0 * s_rx @ c.T + quad


def decide_reassignment(assignment: torch.Tensor, num_active: int, entity_ids: torch.Tensor,
                        loss_matrix: torch.Tensor, *, keep_prob: float = 0.31,
                        generator: torch.Generator | None = None,
                        unseen_to: int | None = None) -> ReassignPlan:
    """Reassign the entities `entity_ids` (those with training data), whose losses under each
    active cluster are the rows of `loss_matrix` `[n, >= num_active]`: `argmin_k L_i(k)` (ties to
    the lower id), then the rules of `decide_reassignment_from_best`."""
    device = assignment.device
    ent = entity_ids.long().to(device)
    losses = loss_matrix[:, :num_active].to(device)
    best = torch.argmin(losses, dim=1)           # first minimum -> lower id on ties
    old = assignment.long()[ent]
    gain = losses.gather(1, old[:, None])[:, 0] - losses.gather(1, best[:, None])[:, 0]
    return decide_reassignment_from_best(assignment, num_active, ent, best, gain,
                                         keep_prob=keep_prob, generator=generator,
                                         unseen_to=unseen_to)


def decide_reassignment_from_best(assignment: torch.Tensor, num_active: int,
                                  entity_ids: torch.Tensor, best: torch.Tensor, gain: torch.Tensor,
                                  *, keep_prob: float = 0.31,
                                  generator: torch.Generator | None = None,
                                  unseen_to: int | None = None,
                                  unseen: torch.Tensor | None = None,
                                  min_gain: float = 0.0) -> ReassignPlan:
    """Reassign the entities `entity_ids` to their proposed clusters `best` (each with `gain`,
    the loss it saves by moving: `L(old) - L(best)`, >= 0). Memory O(N), whatever the number of
    clusters, so exact (streamed over cluster blocks) and CEL-Lite (a few candidates per entity)
    reassignment share it.

    1. proposal: `best`, kept only where `gain > min_gain` (a significance threshold; 0: any
       strict improvement);
    2. damping: each entity keeps its old cluster with probability `keep_prob`;
    3. an entity stays if leaving would empty its cluster (per emptied cluster, the leaver with
       the smallest loss gain stays; ties to the lower entity id);
    4. any active cluster still empty is refilled: it copies the largest cluster's row and takes a
       random half of that cluster's members.
    Entities not in `entity_ids` keep their cluster, or, with `unseen_to`, move to that cluster
    (before rule 3, so that no cluster is left empty by it); `unseen` (bool `[N]`, disjoint from
    `entity_ids`) narrows who moves there. Random draws use `generator` only."""
    device = assignment.device
    old_all = assignment.long()
    ent = entity_ids.long().to(device)
    best = best.long().to(device)
    gain = gain.to(device)
    old = old_all[ent]
    moving = best != old
    below = moving & (gain <= min_gain) if min_gain > 0 else torch.zeros_like(moving)
    moving = moving & ~below
    draws = torch.rand(ent.numel(), generator=generator, device="cpu").to(device)
    damped = moving & (draws < keep_prob)
    moving = moving & ~damped

    # rule 3: clusters that every member would leave keep their cheapest leaver. Keeping a leaver
    # can empty the cluster it was heading to, so repeat to a fixpoint (each round keeps >= 1).
    new_all = old_all.clone()
    if unseen_to is not None:
        if unseen is None:
            unseen = torch.ones(old_all.numel(), dtype=torch.bool, device=device)
            unseen[ent] = False
        new_all[unseen.to(device)] = int(unseen_to)
    # rule 3 protects clusters non-empty after the unseen move; one emptied by that move alone
    # is refilled by rule 4
    before = torch.bincount(new_all, minlength=num_active)
    new_all[ent[moving]] = best[moving]
    kept_empty = 0
    while True:
        after = torch.bincount(new_all, minlength=num_active)
        emptied = (before > 0) & (after == 0)
        if not bool(emptied.any()):
            break
        idx = moving.nonzero().flatten()
        from_emptied = idx[emptied[old[idx]]]
        cl = old[from_emptied]
        least_gain = torch.full((num_active,), torch.inf, dtype=gain.dtype, device=device)
        least_gain.scatter_reduce_(0, cl, gain[from_emptied], reduce="amin")
        cand = from_emptied[gain[from_emptied] == least_gain[cl]]
        cand_cl = old[cand]
        min_ent = torch.full((num_active,), old_all.numel(), dtype=torch.long, device=device)
        min_ent.scatter_reduce_(0, cand_cl, ent[cand], reduce="amin")
        stay = cand[ent[cand] == min_ent[cand_cl]]
        new_all[ent[stay]] = old[stay]
        moving[stay] = False
        kept_empty += int(stay.numel())

    # rule 4: refill clusters that are still empty (rare repair path, one pass per empty cluster)
    counts = torch.bincount(new_all, minlength=num_active)
    src_rows, dst_rows = [], []
    for empty_cluster in (counts[:num_active] == 0).nonzero().flatten().tolist():
        largest = int(torch.argmax(counts))
        members = (new_all == largest).nonzero().flatten()
        perm = torch.randperm(members.numel(), generator=generator).to(device)
        half = members[perm[: members.numel() // 2]]
        new_all[half] = empty_cluster
        counts[largest] -= half.numel()
        counts[empty_cluster] += half.numel()
        src_rows.append(largest)
        dst_rows.append(empty_cluster)
    return ReassignPlan(
        new_assignment=new_all.to(assignment.dtype),
        row_src=torch.tensor(src_rows, dtype=torch.long, device=device),
        row_dst=torch.tensor(dst_rows, dtype=torch.long, device=device),
        num_moved=int((new_all != old_all).sum()),
        num_kept_by_damping=int(damped.sum()),
        num_kept_below_min_gain=int(below.sum()),
        num_kept_to_avoid_empty=kept_empty,
    )
