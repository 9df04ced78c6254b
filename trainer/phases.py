"""Cluster phases at safe points of training: GPCA splits and exact loss-based reassignment.

The embedding collection (unsharded `ClusteredEmbeddingBagCollection` or its sharded twin) owns
the per-table state and the split itself; this module drives the reassignment pass over the
training data, which needs the interaction model and the loss."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from cel_torchrec.algorithm import ReassignPlan, accumulate_candidate_losses, decide_reassignment
from trainer.dist import DistEnv, all_reduce_

# feature of each clustered table
TABLE_FEATURE = {"user": "user_id", "item": "item_id"}
OTHER_FEATURE = {"user_id": "item_id", "item_id": "user_id"}


@dataclass
class PhaseReport:
    kind: str
    table: str
    seconds: float
    num_clusters: int
    detail: dict


def per_sample_loss(pred: torch.Tensor, label: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "mse":
        return (pred - label) ** 2
    if loss == "bce":
        return torch.nn.functional.binary_cross_entropy_with_logits(pred, label, reduction="none")
    raise ValueError(f"train.loss must be mse|bce, got {loss!r}")


@torch.no_grad()
def reassign_losses(emb, model, batches: Iterable, table: str, loss: str, env: DistEnv,
                    max_rows: int = 1 << 18, return_counts: bool = False):
    """Summed training loss of every entity of `table` under every active cluster row, over all
    interactions in `batches` (this rank's share, all-reduced across ranks). Returns the entity
    ids that have data and their loss rows `[n, M]`.

    Models that are linear in the entity's embedding (`model.linear_form`, e.g. MF) score every
    sample against every cluster with one matmul `[B, D] x [D, M]`; any other model runs batched
    forward passes with each sample repeated once per candidate cluster (chunked to `max_rows`).
    Either way the result is the exact loss, with no Python loop over entities or clusters."""
    feature = TABLE_FEATURE[table]
    state = emb.cluster_states[table]
    rows = emb.cluster_rows(table)
    m = rows.shape[0]
    n = state.num_entities
    linear = getattr(model, "linear_form", None)
    counts = torch.zeros(n, dtype=torch.int64, device=rows.device)
    matrix = torch.zeros(n, m, dtype=torch.float64, device=rows.device)
    identity = torch.arange(n, device=rows.device)
    offsets_of = getattr(emb, "entity_offsets", None)   # entities' own unclustered parameters
    for item in batches:
        # (kjt, dense, label) or, from a padded multi-rank pass, (kjt, dense, label, valid):
        # an invalid (padding) batch still runs the lookup (collectives) but adds nothing
        kjt, dense, label = item[:3]
        embs = emb(kjt).to_dict()
        if len(item) > 3 and not item[3]:
            continue
        entity_ids = kjt[feature].values().long()
        offsets = offsets_of(table, entity_ids) if offsets_of is not None else None
        counts.index_add_(0, entity_ids, torch.ones_like(entity_ids))
        chunk = max(1, max_rows // m)
        for start in range(0, label.numel(), chunk):       # chunks of samples, bounded count
            sl = slice(start, start + chunk)
            b = label[sl].numel()
            if linear is not None:
                x, const = linear({k: v[sl] for k, v in embs.items()},
                                  None if dense is None else dense[sl], feature)
                pred = x @ rows[:, :x.shape[1]].T + const[:, None]      # [b, M] (padding cols unused)
                if offsets is not None:
                    pred = pred + (x * offsets[sl, :x.shape[1]]).sum(1, keepdim=True)
                losses = per_sample_loss(pred, label[sl, None].expand(b, m), loss)
            else:
                expanded = {k: v[sl].repeat_interleave(m, dim=0) for k, v in embs.items()}
                expanded[feature] = rows.repeat(b, 1)
                if offsets is not None:
                    expanded[feature] = expanded[feature] + offsets[sl].repeat_interleave(m, dim=0)
                d_exp = None if dense is None else dense[sl].repeat_interleave(m, dim=0)
                pred = model(expanded, d_exp)
                losses = per_sample_loss(pred, label[sl].repeat_interleave(m), loss).view(b, m)
            accumulate_candidate_losses(matrix, identity, entity_ids[sl], losses)
    all_reduce_(counts, env)
    all_reduce_(matrix, env)
    seen = (counts > 0).nonzero().flatten()
    if return_counts:
        return seen, matrix[seen], counts[seen]
    return seen, matrix[seen]


def run_reassignment(emb, model, batches: Iterable, table: str, *, loss: str, env: DistEnv,
                     keep_prob: float, generator: torch.Generator,
                     optimizer: torch.optim.Optimizer | None) -> tuple[ReassignPlan, PhaseReport]:
    """Exact reassignment of `table`'s entities; the same decision on every rank (identical
    reduced losses and identically seeded generators)."""
    t0 = time.perf_counter()
    was_training = emb.training
    emb.eval()
    try:
        seen, losses, counts = reassign_losses(emb, model, batches, table, loss, env,
                                               return_counts=True)
    finally:
        emb.train(was_training)
    state = emb.cluster_states[table]
    ccfg = getattr(emb, "_clustering", {}).get(table)
    policy = getattr(ccfg, "unseen_policy", "stay")
    unseen_to = None
    if policy != "stay":
        # entities with too few interactions are treated like entities without data
        cold = counts < max(int(getattr(ccfg, "cold_interactions", 1)), 1)
        if policy == "pooled" and bool(cold.any()):
            unseen_to = int(torch.argmin(losses[cold].sum(0)[: state.num_active]))
        else:
            unseen_to = int(torch.argmax(state.interaction_counts()[: state.num_active]))
        seen, losses = seen[~cold], losses[~cold]
    plan = decide_reassignment(state.assignment, state.num_active, seen, losses,
                               keep_prob=keep_prob, generator=generator, unseen_to=unseen_to)
    emb.apply_reassignment(table, plan, optimizer)
    report = PhaseReport("reassign", table, time.perf_counter() - t0, state.num_active,
                         {"moved": plan.num_moved, "entities_with_data": int(seen.numel()),
                          "kept_by_damping": plan.num_kept_by_damping,
                          "kept_to_avoid_empty": plan.num_kept_to_avoid_empty,
                          "refilled": int(plan.row_dst.numel())})
    return plan, report


def run_split(emb, table: str, optimizer, reopen: Callable[[], None] | None = None) -> PhaseReport:
    """Split the open window's candidates of `table`, then open the next window (`reopen`, or
    `emb.begin_split_window`)."""
    t0 = time.perf_counter()
    window = emb.split_window(table)
    recorded, dropped = window.num_rows, window.dropped
    plan = emb.split(table, optimizer=optimizer)
    (reopen or (lambda: emb.begin_split_window(table)))()
    state = emb.cluster_states[table]
    return PhaseReport("split", table, time.perf_counter() - t0, state.num_active,
                       {"splits": plan.num_splits, "skipped": int(plan.skipped.numel()),
                        "moved": int(plan.moved_entities.numel()),
                        "recorded_entities": recorded, "dropped_occurrences": dropped})
