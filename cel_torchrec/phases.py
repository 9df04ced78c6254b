"""Cluster phases as a library API: GPCA splits and loss-based reassignment (exact, or CEL-Lite)
of any clustered table of a `ClusteredEmbeddingBagCollection` or its sharded twin, for any
TorchRec training loop. The collection owns the per-table state and the split itself; the
reassignment passes here need the caller's interaction model and loss:

- `batches` yield `(kjt, dense, label)` (the KJT the collection looks up; `dense` any tensor with
  one row per sample, or None; `label` `[b]`);
- `model(pooled, dense) -> [b]` predictions from the pooled embeddings (`pooled`: feature name ->
  `[b, D]`, as `collection(kjt).to_dict()` gives) -- the part of the model above the embedding
  lookup (for TorchRec's DLRM: its dense, interaction and over arches);
- `loss`: `mse` or `bce` (logits), per sample.

A clustered table may be looked up by several features: each occurrence of an entity in any of
them is one of its interactions, scored with the sample's other embeddings as they are. Every
function takes `env` (anything with `rank`, `world_size` and `distributed`, default: the
current `torch.distributed` group, or one process): multi-process runs reduce each entity's
scores to an owner rank and return the same decision on every rank. Models linear in an
entity's embedding may expose `linear_form(pooled, dense, feature) -> (x, const)` with
`pred = x . e + const`, which scores candidates with one product and skips autograd."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from cel_torchrec.choices import REASSIGN_MODES
from cel_torchrec.algorithm import ReassignPlan, decide_reassignment_from_best
# the phase schedule is part of this API (a training loop asks it what to run at each step)
from cel_torchrec.algorithm import (REASSIGN, SPLIT, ClusterSchedule,  # noqa: F401
                                    coverage_window_steps)


@dataclass(frozen=True)
class Ranks:
    """This process's rank among `world_size` (what the phases need of a process group)."""

    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def current(cls) -> "Ranks":
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


def all_reduce_(tensor: torch.Tensor, env, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce across ranks (no-op on one process)."""
    if env.distributed:
        import torch.distributed as dist
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def _env(env):
    return Ranks.current() if env is None else env


def _features(emb, table: str) -> list[str]:
    """The features that look up `table` (a collection without `table_features`: the table's
    configs)."""
    if hasattr(emb, "table_features"):
        return emb.table_features(table)
    return [f for t in emb.embedding_bag_configs() if t.name == table for f in t.feature_names]


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


def _pooled(emb, kjt) -> dict:
    return emb(kjt).to_dict()


def candidate_losses(model, embs: dict, dense, label: torch.Tensor, feature: str, loss: str,
                     candidates: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample losses `[b, K]` of a batch whose `feature` embedding is replaced by each of K
    candidate rows: `candidates` is `[K, D]` (the same K for every sample) or `[b, K, D]` (a
    candidate set per sample). Models linear in the entity's embedding (`model.linear_form`,
    e.g. MF) score with one product; any other model runs one batched forward of `b * K` rows
    (the caller bounds `b * K`). `offsets` `[b, D]`: the entities' own unclustered parameters
    added to every candidate (per-entity biases)."""
    b = label.numel()
    per_sample = candidates.dim() == 3
    k = candidates.shape[-2]
    linear = getattr(model, "linear_form", None)
    if linear is not None:
        x, const = linear(embs, dense, feature)
        width = x.shape[1]
        if per_sample:
            pred = (candidates[:, :, :width] * x[:, None, :]).sum(-1) + const[:, None]
        else:
            pred = x @ candidates[:, :width].T + const[:, None]           # [b, K]
        if offsets is not None:
            pred = pred + (x * offsets[:, :width]).sum(1, keepdim=True)
        return per_sample_loss(pred, label[:, None].expand(b, k), loss)
    expanded = {key: v.repeat_interleave(k, dim=0) for key, v in embs.items()}
    rows = candidates.reshape(b * k, -1) if per_sample else candidates.repeat(b, 1)
    if offsets is not None:
        rows = rows + offsets.repeat_interleave(k, dim=0)
    expanded[feature] = rows
    d_exp = None if dense is None else dense.repeat_interleave(k, dim=0)
    pred = model(expanded, d_exp)
    return per_sample_loss(pred, label.repeat_interleave(k), loss).view(b, k)


def _id_view(emb, kjt, feature: str):
    """`(ids, sample, share)` of `feature`: its ids and, unless every bag holds one unweighted
    id (the direct path, both None), each id's sample and its factor in its bag's pooled
    output (`bag_shares`)."""
    ids = kjt[feature].values().long()
    shares = getattr(emb, "bag_shares", None)
    sample, share = shares(kjt, feature) if shares is not None else (None, None)
    return ids, sample, share


def _direct(view) -> bool:
    """Whether an `_id_view` takes the direct path (every bag one unweighted id)."""
    return view[1] is None and view[2] is None


def _id_inputs(embs: dict, dense, label, feature: str, ids, sample, share, current_rows,
               assignment):
    """Each id's view of its sample for the per-id path: the sample's pooled embeddings, dense
    features and label, and `base` `[n, D]`: the feature's pooled embedding without this id's
    current row (so that cluster row `r` gives `base + share * r`: only this id's row changes,
    the rest of its bag and its own unclustered parameters stay)."""
    n = ids.numel()
    if sample is None:
        sample = torch.arange(n, device=ids.device)
    if share is None:
        share = torch.ones(n, device=ids.device)
    e = {k: v[sample] for k, v in embs.items()}
    share = share.to(e[feature].dtype)
    base = e[feature] - share[:, None] * current_rows[assignment[ids].long()].to(e[feature].dtype)
    return e, None if dense is None else dense[sample], label[sample], base, share


def _valid(item) -> bool:
    # (kjt, dense, label) or, from a padded multi-rank pass, (kjt, dense, label, valid):
    # an invalid (padding) batch still runs the lookup (collectives) but adds nothing
    return len(item) <= 3 or bool(item[3])


def _accumulate_block_losses(emb, model, batches: Iterable, table: str, features: list[str],
                             loss: str, rows: torch.Tensor, matrix: torch.Tensor,
                             counts: torch.Tensor | None, max_rows: int = 1 << 18,
                             current_rows: torch.Tensor | None = None) -> None:
    """Add to `matrix[entity]` `[N, b]` each interaction's losses under the cluster rows `rows`
    `[b, D]` (every feature of `table`, chunks of at most `max_rows` sample x cluster cells), and
    to `counts[entity]` (if given) one per interaction. An interaction is one id of a bag:
    multi-hot and weighted bags score each id with only its own row changed (`current_rows`:
    all active cluster rows, which those need)."""
    offsets_of = getattr(emb, "entity_offsets", None)   # entities' own unclustered parameters
    chunk = max(1, max_rows // rows.shape[0])
    assignment = emb.cluster_states[table].assignment
    for item in batches:
        kjt, dense, label = item[:3]
        embs = _pooled(emb, kjt)
        if not _valid(item):
            continue
        for feature in features:                          # a loop over features, not entities
            ids, sample, share = _id_view(emb, kjt, feature)
            if counts is not None:
                counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
            if not _direct((ids, sample, share)):
                e, d, y, base, sh = _id_inputs(embs, dense, label, feature, ids, sample, share,
                                               current_rows, assignment)
                for start in range(0, ids.numel(), chunk):    # chunks of ids, bounded count
                    sl = slice(start, start + chunk)
                    cands = base[sl, None, :] + sh[sl, None, None] * rows[None].to(base.dtype)
                    losses = candidate_losses(model, {k: v[sl] for k, v in e.items()},
                                              None if d is None else d[sl], y[sl], feature,
                                              loss, cands)
                    matrix.index_add_(0, ids[sl], losses.double())
                continue
            offsets = offsets_of(table, ids) if offsets_of is not None else None
            for start in range(0, label.numel(), chunk):   # chunks of samples, bounded count
                sl = slice(start, start + chunk)
                losses = candidate_losses(model, {k: v[sl] for k, v in embs.items()},
                                          None if dense is None else dense[sl], label[sl],
                                          feature, loss, rows,
                                          None if offsets is None else offsets[sl])
                matrix.index_add_(0, ids[sl], losses.double())


@torch.no_grad()
def reassign_losses(emb, model, batches: Iterable, table: str, loss: str, env=None,
                    max_rows: int = 1 << 18, return_counts: bool = False,
                    clusters: tuple[int, int] | None = None):
    """Summed training loss of every entity of `table` under the active cluster rows
    `clusters = (first, last)` (default: all), over all interactions in `batches` (this rank's
    share, all-reduced across ranks). Returns the entity ids that have data and their loss rows
    `[n, last - first]`. Memory `O(entities x block)`: `run_reassignment` streams blocks."""
    env = _env(env)
    features = _features(emb, table)
    state = emb.cluster_states[table]
    everything = emb.cluster_rows(table)
    lo, hi = clusters if clusters is not None else (0, everything.shape[0])
    rows = everything[lo:hi]
    m = rows.shape[0]
    n = state.num_entities
    counts = torch.zeros(n, dtype=torch.int32, device=rows.device)
    matrix = torch.zeros(n, m, dtype=torch.float64, device=rows.device)
    _accumulate_block_losses(emb, model, batches, table, features, loss, rows, matrix, counts,
                             max_rows, current_rows=everything)
    all_reduce_(counts, env)
    all_reduce_(matrix, env)
    seen = (counts > 0).nonzero().flatten()
    if return_counts:
        return seen, matrix[seen], counts[seen]
    return seen, matrix[seen]


def _owner_bounds(n: int, world: int) -> list[int]:
    """Entity ranges owned by each rank: rank r owns `[bounds[r], bounds[r+1])`."""
    return [n * r // world for r in range(world + 1)]


def _reduce_rows_to_owners(matrix: torch.Tensor, env: object) -> torch.Tensor:
    """Sum `[N, b]` over ranks into each row's owner (a reduce per owner's contiguous range,
    i.e. a reduce-scatter by entity); returns this rank's owned rows."""
    if not env.distributed:
        return matrix
    import torch.distributed as dist
    bounds = _owner_bounds(matrix.shape[0], env.world_size)
    for r in range(env.world_size):
        part = matrix[bounds[r]:bounds[r + 1]]
        if part.numel():
            dist.reduce(part, dst=r)
    return matrix[bounds[env.rank]:bounds[env.rank + 1]]


def _all_gather_owned(part: torch.Tensor, n: int, env: object) -> torch.Tensor:
    """Concatenate every rank's owned range (in entity order) on every rank."""
    if not env.distributed:
        return part
    import torch.distributed as dist
    bounds = _owner_bounds(n, env.world_size)
    longest = max(bounds[r + 1] - bounds[r] for r in range(env.world_size))
    padded = torch.zeros((longest, *part.shape[1:]), dtype=part.dtype, device=part.device)
    padded[: part.shape[0]] = part
    gathered = [torch.empty_like(padded) for _ in range(env.world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([gathered[r][: bounds[r + 1] - bounds[r]] for r in range(env.world_size)])


@torch.no_grad()
def exact_proposal(emb, model, make_batches: Callable[[], Iterable], table: str, loss: str,
                   env=None, memory_bytes: int = 256 << 20, pooled_below: int | None = None):
    """Exact reassignment proposal for every entity of `table` with data: its best active
    cluster over all its training interactions, in `O(entities)` memory. The clusters are
    streamed in blocks of `b = memory_bytes / (8 N)` (one pass over the data per block: a
    single pass whenever `N x M` float64 fits the budget); each block's `[N, b]` losses are
    reduced to the entities' owner ranks, which keep a running best. Returns `(seen, best,
    gain, counts, pooled, mean_loss)`, identical on every rank; `pooled` is the per-cluster
    summed loss of the entities with data but fewer than `pooled_below` interactions, or None;
    `mean_loss` the training loss per interaction at the current assignment."""
    env = _env(env)
    features = _features(emb, table)
    state = emb.cluster_states[table]
    n, m = state.num_entities, state.num_active
    block = int(max(1, min(m, memory_bytes // max(8 * n, 1))))
    bounds = _owner_bounds(n, env.world_size)
    lo, hi = bounds[env.rank], bounds[env.rank + 1]
    old = state.assignment[lo:hi].long()
    best = torch.zeros(hi - lo, dtype=torch.long)
    best_loss = torch.full((hi - lo,), float("inf"), dtype=torch.float64)
    old_loss = torch.zeros(hi - lo, dtype=torch.float64)
    pooled = torch.zeros(m, dtype=torch.float64) if pooled_below is not None else None
    pooled_cold = None
    counts = None
    for first in range(0, m, block):                      # blocks of clusters, bounded count
        last = min(m, first + block)
        everything = emb.cluster_rows(table)
        rows = everything[first:last]
        matrix = torch.zeros(n, last - first, dtype=torch.float64)
        c = torch.zeros(n, dtype=torch.int32) if counts is None else None
        _accumulate_block_losses(emb, model, make_batches(), table, features, loss, rows,
                                 matrix, c, current_rows=everything)
        if c is not None:
            counts = all_reduce_(c, env)
            if pooled_below is not None:
                pooled_cold = (counts > 0) & (counts < pooled_below)
        owned = _reduce_rows_to_owners(matrix, env)               # [hi - lo, b]
        vals, idx = owned.min(dim=1)                              # first minimum: lower id
        better = vals < best_loss
        best = torch.where(better, idx + first, best)
        best_loss = torch.where(better, vals, best_loss)
        in_block = (old >= first) & (old < last)
        old_loss[in_block] = owned[in_block, old[in_block] - first]
        if pooled is not None:
            pooled[first:last] = owned[pooled_cold[lo:hi]].sum(0)
        del matrix, owned
    if pooled is not None:
        all_reduce_(pooled, env)
    best = _all_gather_owned(best, n, env)
    gain = _all_gather_owned(old_loss - best_loss, n, env)
    seen = (counts > 0).nonzero().flatten()
    total = all_reduce_(old_loss.sum().reshape(1), env)
    mean_loss = float(total[0]) / max(int(counts.sum()), 1)
    return seen, best[seen], gain[seen], counts[seen], pooled, mean_loss


class RecentInteractions:
    """The training batches since the last reassignment (references to the batches the step
    already built, no copy), at most `max_samples` samples (the oldest are dropped): what
    CEL-Lite scores its candidates on, so that it needs no extra pass over the training data."""

    def __init__(self, max_samples: int = 1 << 20):
        self.max_samples = int(max_samples)
        self._batches: list[tuple] = []
        self._samples = 0

    def add(self, kjt, dense, label) -> None:
        self._batches.append((kjt, dense, label))
        self._samples += int(label.numel())
        while self._samples > self.max_samples and len(self._batches) > 1:
            self._samples -= int(self._batches.pop(0)[2].numel())

    def clear(self) -> None:
        self._batches, self._samples = [], 0

    def __iter__(self):
        return iter(list(self._batches))

    def __len__(self) -> int:
        return self._samples

    def state_dict(self) -> dict:
        """The buffered batches as plain tensors (KJT keys, values, lengths, weights; dense;
        label), for a checkpoint: a resumed run scores its next CEL-Lite reassignment on the
        same interactions as an uninterrupted one."""
        return {"max_samples": self.max_samples,
                "batches": [{"keys": list(kjt.keys()), "values": kjt.values(),
                             "lengths": kjt.lengths(), "weights": kjt.weights_or_none(),
                             "dense": dense, "label": label}
                            for kjt, dense, label in self._batches]}

    def load_state_dict(self, state: dict) -> None:
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        self.clear()
        for b in state["batches"]:
            kjt = KeyedJaggedTensor(keys=b["keys"], values=b["values"], lengths=b["lengths"],
                                    weights=b["weights"])
            self.add(kjt, b["dense"], b["label"])


def _gauss_newton(model, embs: dict, dense, label, feature: str, loss: str):
    """Per-sample gradient of the loss w.r.t. the `feature` embedding `[b, D]` and a scalar
    Gauss-Newton curvature `[b]` (`w * |d pred / d e|^2 / D`, w = 2 for MSE, p(1-p) for BCE)."""
    e = embs[feature].detach().requires_grad_(True)
    with torch.enable_grad():
        pred = model({**embs, feature: e}, dense)
        jac = torch.autograd.grad(pred.sum(), e)[0]            # rows: each sample's own d pred/d e
    pred = pred.detach()
    if loss == "mse":
        dl, w = 2.0 * (pred - label), torch.full_like(pred, 2.0)
    else:
        p = torch.sigmoid(pred)
        dl, w = p - label, p * (1 - p)
    return dl[:, None] * jac, w * (jac * jac).sum(1) / jac.shape[1]


def _linear_gradient(pred: torch.Tensor, label: torch.Tensor, x: torch.Tensor, d: int,
                     loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradient `[b, d]` (zero past x's width) and Gauss-Newton curvature `[b]` of the
    loss w.r.t. the embedding of a model linear in it (`pred = x . e + const`), in closed form."""
    if loss == "mse":
        dl, w = 2.0 * (pred - label), torch.full_like(pred, 2.0)
    else:
        p = torch.sigmoid(pred)
        dl, w = p - label, p * (1 - p)
    g = torch.zeros(label.numel(), d, dtype=x.dtype)
    g[:, :x.shape[1]] = dl[:, None] * x
    return g, w * (x * x).sum(1) / d


def _linear_losses(x: torch.Tensor, const: torch.Tensor, label: torch.Tensor,
                   candidates: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-sample losses `[b, K]` of a model linear in the entity's embedding (`pred = x . e +
    const`) under per-sample candidate rows `candidates` `[b, K, D]`."""
    width = x.shape[1]
    pred = torch.bmm(candidates[:, :, :width], x[:, :, None])[:, :, 0] + const[:, None]
    return per_sample_loss(pred, label[:, None].expand_as(pred), loss)


@torch.no_grad()
def lite_proposal(emb, model, recent: Iterable, table: str, loss: str, env=None,
                  k: int = 8, max_rows: int = 1 << 18, cache_bytes: int = 128 << 20):
    """CEL-Lite proposal: only the entities seen in `recent` (the interactions since the last
    reassignment), each over `k + 1` candidates: its cluster and the `k` clusters nearest to its
    desired embedding after one Gauss-Newton step (`c - sum g / sum h` over its recent
    interactions), scored exactly on those interactions. Memory O(seen x (k + D)) beside the
    batches; multi-process: each rank reduces its rows by entity, the reduced rows are merged
    over ranks, then each entity's candidate losses are reduced to its owner rank. Returns
    `(seen, best, gain, counts, mean_loss)`, same on every rank (`mean_loss`: the recent loss
    per interaction at the current assignment).

    Models linear in the entity's embedding (`model.linear_form`, e.g. MF) take the gradient in
    closed form (`dl * x`, no autograd) and keep each sample's `(x, const)` from the first pass
    for scoring (float32, at most `cache_bytes`; batches past it are looked up again), so the
    second pass runs no embedding lookup."""
    from cel_torchrec.distributed.collectives import all_gather_rows
    env = _env(env)
    features = _features(emb, table)
    state = emb.cluster_states[table]
    rows = emb.cluster_rows(table)
    m, d = rows.shape
    batches = list(recent)
    offsets_of = getattr(emb, "entity_offsets", None)
    linear = getattr(model, "linear_form", None)
    # the first `n_cache` batch positions keep their (x, const, label): the same positions on
    # every rank, so that all ranks skip the same lookups of the second pass (sharded lookups
    # are collectives; a padding batch at a cached position is skipped)
    n_cache = 0
    # multi-hot or weighted bags score per id (no cache): then no position caches, so that
    # every rank runs the same lookups
    per_id = torch.tensor([int(any(not _direct(_id_view(emb, item[0], f))
                                   for item in batches if _valid(item) for f in features))])
    if env.distributed:
        all_reduce_(per_id, env, op="max")
    if linear is not None and batches and not int(per_id[0]):
        largest = torch.tensor([max(int(item[2].numel()) for item in batches)])
        if env.distributed:
            all_reduce_(largest, env, op="max")
        n_cache = cache_bytes // max(int(largest[0]) * (d + 2) * 4 * len(features), 1)
    # pass 1: per-entity count, curvature and gradient; ids in (batch, feature) order
    ids_l, gh_l, cache = [], [], []
    for j, item in enumerate(batches):
        kjt, dense, label = item[:3]
        embs = _pooled(emb, kjt)
        if not _valid(item):
            cache.append(None)
            continue
        kept = []
        pred = model(embs, dense) if linear is not None else None
        for feature in features:
            ids, sample, share = _id_view(emb, kjt, feature)
            direct = _direct((ids, sample, share))
            if linear is not None:
                x, const = linear(embs, dense, feature)
                g, h = _linear_gradient(pred, label, x, d, loss)
                offsets = offsets_of(table, ids) if offsets_of is not None and direct else None
                if offsets is not None:
                    const = const + (x * offsets[:, :x.shape[1]]).sum(1)
                if direct:
                    kept.append((x.float(), const.float(), label.float()))
            else:
                g, h = _gauss_newton(model, embs, dense, label, feature, loss)
            if not direct:
                # each id: its share of its sample's gradient, its share squared of the curvature
                if sample is not None:
                    g, h = g[sample], h[sample]
                if share is not None:
                    g, h = g * share[:, None].to(g.dtype), h * (share * share).to(h.dtype)
            ids_l.append(ids)
            gh_l.append(torch.cat([torch.ones_like(h)[:, None], h[:, None], g], dim=1))
        cache.append(kept if linear is not None and j < n_cache else None)
    ids = torch.cat(ids_l) if ids_l else torch.zeros(0, dtype=torch.long)
    seen, inverse = torch.unique(ids, return_inverse=True)
    stats = torch.zeros(seen.numel(), d + 2, dtype=torch.float64)    # count, h, g per entity
    at = 0
    for part in gh_l:
        stats.index_add_(0, inverse[at:at + part.shape[0]], part.double())
        at += part.shape[0]
    del gh_l
    if env.distributed:          # merge the ranks' per-entity rows
        packed = all_gather_rows(torch.cat([seen.double()[:, None], stats], dim=1), None)
        seen, inverse_global = torch.unique(packed[:, 0].long(), return_inverse=True)
        stats = torch.zeros(seen.numel(), d + 2, dtype=torch.float64)
        stats.index_add_(0, inverse_global, packed[:, 1:])
        del packed
        inverse = None
    counts, h_sum, g_sum = stats[:, 0], stats[:, 1], stats[:, 2:]
    current = state.assignment[seen].long()
    desired = rows[current].double() - g_sum / h_sum.clamp_min(1e-12)[:, None]
    kk = min(k, m)
    cands = torch.empty(seen.numel(), kk + 1, dtype=torch.long)
    rows64 = rows.double()
    step = max(1, max_rows // m)
    for start in range(0, seen.numel(), step):             # chunks of entities, bounded count
        sl = slice(start, start + step)
        dist2 = torch.cdist(desired[sl], rows64)
        cands[sl, 1:] = dist2.topk(kk, dim=1, largest=False).indices
    cands[:, 0] = current                               # column 0: the current cluster
    del stats, desired
    # pass 2: exact losses of each recent interaction under its entity's candidates
    losses = torch.zeros(seen.numel(), kk + 1, dtype=torch.float64)
    chunk = max(1, max_rows // (kk + 1))
    at = 0
    for j, (item, kept) in enumerate(zip(batches, cache)):
        kjt, dense, label = item[:3]
        if kept is None and j < n_cache:        # a padding batch at a cached position
            continue
        if kept is None:
            embs = _pooled(emb, kjt)      # (a padding batch still runs its lookup)
            if not _valid(item):
                continue
        for fi, feature in enumerate(features):
            ids, sample, share = _id_view(emb, kjt, feature)
            slot = (inverse[at:at + ids.numel()] if inverse is not None
                    else torch.searchsorted(seen, ids))
            at += ids.numel()
            if not _direct((ids, sample, share)):      # (never cached: see n_cache)
                e, dd, y, base, sh = _id_inputs(embs, dense, label, feature, ids, sample, share,
                                                rows, state.assignment)
                for start in range(0, ids.numel(), chunk):
                    sl = slice(start, start + chunk)
                    cand_rows = base[sl, None, :] + sh[sl, None, None] * rows[cands[slot[sl]]].to(base.dtype)
                    lc = candidate_losses(model, {key: v[sl] for key, v in e.items()},
                                          None if dd is None else dd[sl], y[sl], feature, loss,
                                          cand_rows)
                    losses.index_add_(0, slot[sl], lc.double())
                continue
            if kept is None:
                offsets = offsets_of(table, ids) if offsets_of is not None else None
            for start in range(0, label.numel(), chunk):
                sl = slice(start, start + chunk)
                cand_rows = rows[cands[slot[sl]]]
                if kept is not None:
                    x, const, lab = kept[fi]
                    lc = _linear_losses(x[sl], const[sl], lab[sl], cand_rows, loss)
                else:
                    lc = candidate_losses(model, {key: v[sl] for key, v in embs.items()},
                                          None if dense is None else dense[sl], label[sl],
                                          feature, loss, cand_rows,
                                          None if offsets is None else offsets[sl])
                losses.index_add_(0, slot[sl], lc.double())
    del cache
    if env.distributed:          # each entity's losses summed at its owner, then shared
        owner = torch.bucketize(seen, torch.tensor(_owner_bounds(state.num_entities, env.world_size)[1:-1]),
                                right=True)
        losses = _reduce_sparse_to_owners(losses, owner, env)
    vals, pick = losses.min(dim=1)          # first minimum: the current cluster on ties
    best = cands.gather(1, pick[:, None])[:, 0]
    gain = losses[:, 0] - vals
    mean_loss = float(losses[:, 0].sum()) / max(float(counts.sum()), 1.0)
    return seen, best, gain, counts.to(torch.int32), mean_loss


def _reduce_sparse_to_owners(rows: torch.Tensor, owner: torch.Tensor, env: object) -> torch.Tensor:
    """Rows sorted by owner rank: sum each owner's block over ranks at that owner (one reduce per
    owner), then share the owners' results (all-gather), so every rank gets the global sums."""
    import torch.distributed as dist
    out = torch.empty_like(rows)
    starts = torch.searchsorted(owner, torch.arange(env.world_size + 1)).tolist()
    for r in range(env.world_size):
        part = rows[starts[r]:starts[r + 1]].contiguous()
        if part.numel():
            dist.reduce(part, dst=r)
        out[starts[r]:starts[r + 1]] = part
    mine = out[starts[env.rank]:starts[env.rank + 1]].contiguous()
    for r in range(env.world_size):
        part = mine if r == env.rank else torch.empty_like(out[starts[r]:starts[r + 1]])
        if part.numel():
            dist.broadcast(part, src=r)
        out[starts[r]:starts[r + 1]] = part
    return out


EXACT_MAX_CELLS = 1 << 25


def resolve_reassign_mode(mode: str, emb) -> str | None:
    """`mode` (exact | lite | auto) with `auto` resolved: exact while every clustered table's
    `entities x max_clusters` loss cells fit in one pass (<= 2^25 float64, 256 MiB), else lite.
    Exact reads all training data once per block of clusters, so past that size its cost grows
    with `entities x clusters x interactions`; Lite's stays proportional to the interactions
    since the last reassignment. None when `emb` is None or has no clustered table."""
    if mode not in (*REASSIGN_MODES, "auto"):
        raise ValueError(f"reassign mode must be exact|lite|auto, got {mode!r}")
    if emb is None or not emb.clustered_tables:
        return None
    if mode != "auto":
        return mode
    cells = max(s.num_entities * s.capacity for s in
                (emb.cluster_states[t] for t in emb.clustered_tables))
    return "exact" if cells <= EXACT_MAX_CELLS else "lite"


def run_reassignment(emb, model, batches, table: str, *, loss: str, generator: torch.Generator,
                     env=None, keep_prob: float = 0.31,
                     optimizer: torch.optim.Optimizer | None = None, mode: str = "exact",
                     recent: Iterable | None = None, lite_k: int = 8,
                     memory_bytes: int = 256 << 20, lite_cache_bytes: int = 128 << 20,
                     min_gain: float = 0.0) -> tuple[ReassignPlan, PhaseReport]:
    """Reassignment of `table`'s entities, `exact` (every entity with data, every cluster, over
    `batches`: an iterable, or a callable returning a fresh one per cluster block) or `lite`
    (CEL-Lite over `recent`); the same decision on every rank (identical reduced proposals and
    identically seeded generators). An entity moves only if its loss falls by more than
    `min_gain` times the mean loss per interaction (a likelihood-ratio test: with few
    interactions the argmin over many clusters mostly fits noise)."""
    if mode not in REASSIGN_MODES:
        raise ValueError(f"reassign mode must be one of {REASSIGN_MODES}, got {mode!r}")
    env = _env(env)
    t0 = time.perf_counter()
    was_training = emb.training
    emb.eval()
    state = emb.cluster_states[table]
    ccfg = emb.clustering_config(table)
    policy = getattr(ccfg, "unseen_policy", "stay")
    min_count = max(int(getattr(ccfg, "cold_interactions", 1)), 1)
    if hasattr(emb, "sync_statistics"):
        emb.sync_statistics([table])
    try:
        if mode == "exact":
            if callable(batches):
                make = batches
            else:
                materialised = list(batches)
                make = lambda: iter(materialised)   # noqa: E731
            # entities with too few interactions are treated like entities without data
            seen, best, gain, counts, pooled, mean_loss = exact_proposal(
                emb, model, make, table, loss, env, memory_bytes=memory_bytes,
                pooled_below=min_count if policy == "pooled" else None)
        else:
            seen, best, gain, counts, mean_loss = lite_proposal(emb, model, recent if recent is not None else batches,
                                                     table, loss, env, k=lite_k,
                                                     cache_bytes=lite_cache_bytes)
            pooled = None
    finally:
        emb.train(was_training)
    unseen_to, unseen = None, None
    if policy != "stay":
        if mode == "exact":
            cold = counts < min_count
            if policy == "pooled" and bool(cold.any()):
                unseen_to = int(torch.argmin(pooled[: state.num_active]))
            else:
                unseen_to = int(torch.argmax(state.interaction_counts()[: state.num_active]))
        else:
            # Lite sees only recent data: "cold" is judged by the lifetime interaction counters
            lifetime = state.entity_interactions.cpu()
            cold = lifetime[seen] < min_count
            unseen = lifetime < min_count
            unseen[seen[~cold]] = False
            unseen_to = int(torch.argmax(state.interaction_counts()[: state.num_active]))
        seen, best, gain = seen[~cold], best[~cold], gain[~cold]
    plan = decide_reassignment_from_best(state.assignment, state.num_active, seen, best, gain,
                                         keep_prob=keep_prob, generator=generator,
                                         unseen_to=unseen_to, unseen=unseen,
                                         min_gain=min_gain * mean_loss)
    emb.apply_reassignment(table, plan, optimizer)
    report = PhaseReport("reassign", table, time.perf_counter() - t0, state.num_active,
                         {"moved": plan.num_moved, "entities_with_data": int(seen.numel()),
                          "kept_by_damping": plan.num_kept_by_damping,
                          "kept_below_min_gain": plan.num_kept_below_min_gain,
                          "mean_loss": mean_loss,
                          "kept_to_avoid_empty": plan.num_kept_to_avoid_empty,
                          "refilled": int(plan.row_dst.numel()), "mode": mode})
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
