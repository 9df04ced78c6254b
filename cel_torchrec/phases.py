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
`pred = x . e + const`, which scores candidates with one product and skips autograd. Models
that can score many candidate rows at once without repeating the batch (a nonlinear function
of a product, like ELSA's phase model) may expose `candidate_predictions(pooled, dense,
feature, candidates) -> [b, K]` for candidates `[K, D]` (shared) or `[b, K, D]` (per sample);
exact reassignment then skips the `b * K`-row forward."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from cel_torchrec.choices import LITE_SCORINGS, REASSIGN_MODES
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
    """In-place all-reduce across ranks (no-op on one process), on a device the backend takes."""
    if env.distributed:
        from cel_torchrec.distributed.collectives import all_reduce_ as reduce_
        reduce_(tensor, op)
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
    batched = getattr(model, "candidate_predictions", None)
    if linear is None and batched is not None:
        cands = candidates
        if offsets is not None:
            cands = (cands if per_sample else cands[None].expand(b, -1, -1)) + offsets[:, None, :]
        pred = batched(embs, dense, feature, cands)
        return per_sample_loss(pred, label[:, None].expand(b, k), loss)
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
    from cel_torchrec.distributed.collectives import reduce_
    bounds = _owner_bounds(matrix.shape[0], env.world_size)
    for r in range(env.world_size):
        part = matrix[bounds[r]:bounds[r + 1]]
        if part.numel():
            reduce_(part, dst=r)
    return matrix[bounds[env.rank]:bounds[env.rank + 1]]


def _all_gather_owned(part: torch.Tensor, n: int, env: object) -> torch.Tensor:
    """Concatenate every rank's owned range (in entity order) on every rank."""
    if not env.distributed:
        return part
    import torch.distributed as dist
    from cel_torchrec.distributed.collectives import to_backend
    bounds = _owner_bounds(n, env.world_size)
    longest = max(bounds[r + 1] - bounds[r] for r in range(env.world_size))
    padded = torch.zeros((longest, *part.shape[1:]), dtype=part.dtype, device=part.device)
    padded[: part.shape[0]] = part
    padded = to_backend(padded)
    gathered = [torch.empty_like(padded) for _ in range(env.world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([gathered[r][: bounds[r + 1] - bounds[r]]
                      for r in range(env.world_size)]).to(part.device)


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


def _jacobians(model, embs: dict, dense, features: list[str]):
    """Predictions `[b]` and, for every feature in `features`, each sample's `d pred / d e`
    `[b, D]` of its pooled embedding, from one backward pass (a sample's prediction depends on
    its own rows only, so the gradient of the summed predictions holds them row by row)."""
    leaves = {f: embs[f].detach().requires_grad_(True) for f in features}
    with torch.enable_grad():
        pred = model({**embs, **leaves}, dense)
        jacs = torch.autograd.grad(pred.sum(), [leaves[f] for f in features], allow_unused=True)
    return pred.detach(), {f: torch.zeros_like(embs[f]) if j is None else j
                           for f, j in zip(features, jacs)}


def _linear_gradient(pred: torch.Tensor, label: torch.Tensor, x: torch.Tensor, d: int,
                     loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-interaction gradient `[n, d]` (zero past x's width) and Gauss-Newton curvature `[n]`
    of the loss w.r.t. an entity row that enters the prediction as `x . row + const`."""
    if loss == "mse":
        dl, w = 2.0 * (pred - label), torch.full_like(pred, 2.0)
    else:
        p = torch.sigmoid(pred)
        dl, w = p - label, p * (1 - p)
    g = torch.zeros(label.numel(), d, dtype=x.dtype, device=x.device)
    g[:, :x.shape[1]] = dl[:, None] * x
    return g, w * (x * x).sum(1) / d


def _linear_losses(x: torch.Tensor, const: torch.Tensor, label: torch.Tensor,
                   candidates: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-interaction losses `[n, K]` of predictions `x . row + const` under candidate rows
    `candidates` `[n, K, D]`."""
    width = x.shape[1]
    pred = torch.bmm(candidates[:, :, :width].to(x.dtype), x[:, :, None])[:, :, 0] + const[:, None]
    return per_sample_loss(pred, label[:, None].expand_as(pred), loss)


def _first_order_forms(emb, model, kjt, dense, label, features_of: dict, rows: dict,
                       assignment: dict, linear):
    """One recent batch, every clustered table: the pooled lookups and, per (table, feature),
    each id's `(ids, x, const, y, pred)` with the prediction as a function of that id's cluster
    row `r` written `x . r + const` (exact for `linear_form` models; otherwise the first-order
    expansion at the current row, `x = share * d pred / d e`). `const` holds the rest of the
    sample: its other ids, the id's own unclustered parameters and every other feature."""
    embs = _pooled(emb, kjt)
    features = list(dict.fromkeys(f for fs in features_of.values() for f in fs))
    if linear is not None:
        pred = model(embs, dense)
        xs = {f: linear(embs, dense, f)[0] for f in features}
    else:
        pred, xs = _jacobians(model, embs, dense, features)
    forms = {}
    for table, fs in features_of.items():
        for feature in fs:
            ids, sample, share = _id_view(emb, kjt, feature)
            x, p, y = xs[feature], pred, label
            if sample is not None:
                x, p, y = x[sample], p[sample], y[sample]
            if share is not None:
                x = x * share[:, None].to(x.dtype)
            current = rows[table][assignment[table][ids].long(), :x.shape[1]].to(x.dtype)
            forms[(table, feature)] = (ids, x, p - (x * current).sum(1), y, p)
    return embs, forms


@torch.no_grad()
def lite_proposals(emb, model, recent: Iterable, tables: list[str], loss: str, env=None,
                   k: int = 8, max_rows: int = 1 << 18, cache_bytes: int = 128 << 20,
                   scoring: str = "linearised") -> dict:
    """CEL-Lite proposals for every table in `tables` from one pass over `recent` (the
    interactions since the last reassignment): only the entities seen there, each over `k + 1`
    candidates, its cluster and the `k` clusters nearest to its desired embedding after one
    Gauss-Newton step (`c - sum g / sum h` over its recent interactions), scored on those
    interactions. Returns table -> `(seen, best, gain, counts, mean_loss)`, the same on every
    rank (`mean_loss`: the recent loss per interaction at the current assignment).

    The first pass looks each batch up once and takes every table's gradients together (one
    closed-form product for `linear_form` models, otherwise one backward for all features), so
    its cost is about one training step per batch whatever the number of tables. `scoring`:
    `exact` evaluates the model itself under each candidate (one forward of `b * (k + 1)` rows
    per batch and feature for models without a linear form); `linearised` scores the loss of the
    model's first-order expansion in the moved row (exact for `linear_form` models, for which
    both are the same), from per-interaction `(x, const)` kept from the first pass (float32, at
    most `cache_bytes`; batches past it are looked up and differentiated again) -- no model
    forward in the second pass. Memory O(seen x (k + D)) beside the batches; multi-process:
    each rank reduces its rows by entity, the reduced rows are merged over ranks, then each
    entity's candidate losses are reduced to its owner rank."""
    from cel_torchrec.distributed.collectives import all_gather_rows
    if scoring not in LITE_SCORINGS:
        raise ValueError(f"lite scoring must be one of {LITE_SCORINGS}, got {scoring!r}")
    env = _env(env)
    tables = list(tables)
    features_of = {t: _features(emb, t) for t in tables}
    states = {t: emb.cluster_states[t] for t in tables}
    rows = {t: emb.cluster_rows(t) for t in tables}
    assignment = {t: states[t].assignment for t in tables}
    batches = list(recent)
    offsets_of = getattr(emb, "entity_offsets", None)
    linear = getattr(model, "linear_form", None)
    by_form = linear is not None or scoring == "linearised"
    # the first `n_cache` batch positions keep their forms: the same positions on every rank, so
    # that all ranks skip the same lookups of the second pass (sharded lookups are collectives;
    # a padding batch at a cached position is skipped)
    n_cache = 0
    if by_form and batches:
        width = max(r.shape[1] for r in rows.values()) + 4       # x, const, label, id
        largest = torch.tensor([max(sum(int(item[0][f].values().numel())
                                        for fs in features_of.values() for f in fs)
                                    for item in batches)])
        if env.distributed:
            all_reduce_(largest, env, op="max")
        n_cache = cache_bytes // max(int(largest[0]) * width * 4, 1)
    # pass 1: per-entity count, curvature and gradient; ids in (batch, feature) order
    ids_l = {t: [] for t in tables}
    gh_l = {t: [] for t in tables}
    cache = []
    for j, item in enumerate(batches):
        kjt, dense, label = item[:3]
        if not _valid(item):
            _pooled(emb, kjt)       # (a padding batch still runs its lookup)
            cache.append(None)
            continue
        _, forms = _first_order_forms(emb, model, kjt, dense, label, features_of, rows,
                                      assignment, linear)
        for (table, _), (ids, x, _, y, p) in forms.items():
            g, h = _linear_gradient(p, y, x, rows[table].shape[1], loss)
            ids_l[table].append(ids)
            gh_l[table].append(torch.cat([torch.ones_like(h)[:, None], h[:, None], g], dim=1))
        cache.append({key: (f[0], f[1].float(), f[2].float(), f[3].float())
                      for key, f in forms.items()} if by_form and j < n_cache else None)
        del forms
    seen, inverse, counts, cands = {}, {}, {}, {}
    for table in tables:
        state, r = states[table], rows[table]
        m, d = r.shape
        ids = torch.cat(ids_l[table]) if ids_l[table] else torch.zeros(0, dtype=torch.long)
        s, inv = torch.unique(ids, return_inverse=True)
        stats = torch.zeros(s.numel(), d + 2, dtype=torch.float64)    # count, h, g per entity
        at = 0
        for part in gh_l[table]:
            stats.index_add_(0, inv[at:at + part.shape[0]], part.double())
            at += part.shape[0]
        gh_l[table] = None
        if env.distributed:          # merge the ranks' per-entity rows
            packed = all_gather_rows(torch.cat([s.double()[:, None], stats], dim=1), None)
            s, inverse_global = torch.unique(packed[:, 0].long(), return_inverse=True)
            stats = torch.zeros(s.numel(), d + 2, dtype=torch.float64)
            stats.index_add_(0, inverse_global, packed[:, 1:])
            del packed
            inv = None
        count, h_sum, g_sum = stats[:, 0], stats[:, 1], stats[:, 2:]
        current = state.assignment[s].long()
        desired = r[current].double() - g_sum / h_sum.clamp_min(1e-12)[:, None]
        kk = min(k, m)
        c = torch.empty(s.numel(), kk + 1, dtype=torch.long)
        r64 = r.double()
        step = max(1, max_rows // m)
        for start in range(0, s.numel(), step):             # chunks of entities, bounded count
            sl = slice(start, start + step)
            c[sl, 1:] = torch.cdist(desired[sl], r64).topk(kk, dim=1, largest=False).indices
        c[:, 0] = current                               # column 0: the current cluster
        seen[table], inverse[table], counts[table], cands[table] = s, inv, count, c
        del stats, desired
    # pass 2: the losses of each recent interaction under its entity's candidates
    losses = {t: torch.zeros(seen[t].numel(), cands[t].shape[1], dtype=torch.float64)
              for t in tables}
    at = {t: 0 for t in tables}
    chunk = max(1, max_rows // (k + 1))

    def slots(table, ids):
        inv = inverse[table]
        out = (inv[at[table]:at[table] + ids.numel()] if inv is not None
               else torch.searchsorted(seen[table], ids))
        at[table] += ids.numel()
        return out

    for j, (item, kept) in enumerate(zip(batches, cache)):
        kjt, dense, label = item[:3]
        if kept is None and j < n_cache:        # a padding batch at a cached position
            continue
        if kept is None:
            if not _valid(item):
                _pooled(emb, kjt)       # (a padding batch still runs its lookup)
                continue
            if by_form:
                _, forms = _first_order_forms(emb, model, kjt, dense, label, features_of, rows,
                                              assignment, linear)
                kept = {key: f[:4] for key, f in forms.items()}
                del forms
        if kept is not None:
            for (table, _), (ids, x, const, y) in kept.items():
                slot = slots(table, ids)
                for start in range(0, ids.numel(), chunk):
                    sl = slice(start, start + chunk)
                    lc = _linear_losses(x[sl], const[sl], y[sl], rows[table][cands[table][slot[sl]]],
                                        loss)
                    losses[table].index_add_(0, slot[sl], lc.double())
            continue
        embs = _pooled(emb, kjt)
        for table in tables:
            rows_t, cands_t = rows[table], cands[table]
            for feature in features_of[table]:
                ids, sample, share = _id_view(emb, kjt, feature)
                slot = slots(table, ids)
                if not _direct((ids, sample, share)):
                    e, dd, y, base, sh = _id_inputs(embs, dense, label, feature, ids, sample,
                                                    share, rows_t, assignment[table])
                    for start in range(0, ids.numel(), chunk):
                        sl = slice(start, start + chunk)
                        cand_rows = (base[sl, None, :]
                                     + sh[sl, None, None] * rows_t[cands_t[slot[sl]]].to(base.dtype))
                        lc = candidate_losses(model, {key: v[sl] for key, v in e.items()},
                                              None if dd is None else dd[sl], y[sl], feature,
                                              loss, cand_rows)
                        losses[table].index_add_(0, slot[sl], lc.double())
                    continue
                offsets = offsets_of(table, ids) if offsets_of is not None else None
                for start in range(0, label.numel(), chunk):
                    sl = slice(start, start + chunk)
                    lc = candidate_losses(model, {key: v[sl] for key, v in embs.items()},
                                          None if dense is None else dense[sl], label[sl],
                                          feature, loss, rows_t[cands_t[slot[sl]]],
                                          None if offsets is None else offsets[sl])
                    losses[table].index_add_(0, slot[sl], lc.double())
    del cache
    out = {}
    for table in tables:
        lo = losses[table]
        if env.distributed:          # each entity's losses summed at its owner, then shared
            bounds = _owner_bounds(states[table].num_entities, env.world_size)[1:-1]
            owner = torch.bucketize(seen[table], torch.tensor(bounds), right=True)
            lo = _reduce_sparse_to_owners(lo, owner, env)
        vals, pick = lo.min(dim=1)          # first minimum: the current cluster on ties
        best = cands[table].gather(1, pick[:, None])[:, 0]
        mean_loss = float(lo[:, 0].sum()) / max(float(counts[table].sum()), 1.0)
        out[table] = (seen[table], best, lo[:, 0] - vals, counts[table].to(torch.int32),
                      mean_loss)
    return out


def lite_proposal(emb, model, recent: Iterable, table: str, loss: str, env=None,
                  k: int = 8, max_rows: int = 1 << 18, cache_bytes: int = 128 << 20,
                  scoring: str = "linearised"):
    """`lite_proposals` of one table: `(seen, best, gain, counts, mean_loss)`."""
    return lite_proposals(emb, model, recent, [table], loss, env, k=k, max_rows=max_rows,
                          cache_bytes=cache_bytes, scoring=scoring)[table]


def _reduce_sparse_to_owners(rows: torch.Tensor, owner: torch.Tensor, env: object) -> torch.Tensor:
    """Rows sorted by owner rank: sum each owner's block over ranks at that owner (one reduce per
    owner), then share the owners' results (all-gather), so every rank gets the global sums."""
    from cel_torchrec.distributed.collectives import broadcast_, reduce_
    out = torch.empty_like(rows)
    starts = torch.searchsorted(owner, torch.arange(env.world_size + 1,
                                                    device=owner.device)).tolist()
    for r in range(env.world_size):
        part = rows[starts[r]:starts[r + 1]].contiguous()
        if part.numel():
            reduce_(part, dst=r)
        out[starts[r]:starts[r + 1]] = part
    mine = out[starts[env.rank]:starts[env.rank + 1]].contiguous()
    for r in range(env.world_size):
        part = mine if r == env.rank else torch.empty_like(out[starts[r]:starts[r + 1]])
        if part.numel():
            broadcast_(part, src=r)
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


def run_reassignments(emb, model, batches, tables: list[str], *, loss: str,
                      generator: torch.Generator, env=None, keep_prob: float = 0.31,
                      optimizer: torch.optim.Optimizer | None = None, mode: str = "exact",
                      recent: Iterable | None = None, lite_k: int = 8,
                      lite_scoring: str = "linearised", memory_bytes: int = 256 << 20,
                      lite_cache_bytes: int = 128 << 20,
                      min_gain: float = 0.0) -> list[tuple[ReassignPlan, PhaseReport]]:
    """Reassignment of the entities of each table in `tables`, `exact` (every entity with data,
    every cluster, over `batches`: an iterable, or a callable returning a fresh one per cluster
    block; one table after the other, each after the plans before it are applied) or `lite`
    (CEL-Lite over `recent`: every table's proposal from one shared pass, see `lite_proposals`,
    before any plan is applied); the same decision on every rank (identical reduced proposals
    and identically seeded generators). An entity moves only if its loss falls by more than
    `min_gain` times the mean loss per interaction (a likelihood-ratio test: with few
    interactions the argmin over many clusters mostly fits noise). Each report's `seconds`: the table's own
    exact pass or decision, plus an equal share of a shared Lite pass."""
    if mode not in REASSIGN_MODES:
        raise ValueError(f"reassign mode must be one of {REASSIGN_MODES}, got {mode!r}")
    if lite_scoring not in LITE_SCORINGS:
        raise ValueError(f"lite scoring must be one of {LITE_SCORINGS}, got {lite_scoring!r}")
    env = _env(env)
    tables = list(tables)
    t0 = time.perf_counter()
    emb.check_inputs()          # the input checks deferred off the training step
    if hasattr(emb, "sync_statistics"):
        emb.sync_statistics(tables)
    was_training = emb.training
    out = []

    def decide(table, proposal, seconds):
        t1 = time.perf_counter()
        plan, detail = _decide_and_apply(emb, table, proposal, mode, generator, keep_prob,
                                         optimizer, min_gain)
        detail["mode"] = mode
        if mode == "lite":
            detail["lite_scoring"] = lite_scoring
        out.append((plan, PhaseReport("reassign", table, seconds + time.perf_counter() - t1,
                                      emb.cluster_states[table].num_active, detail)))

    if mode == "exact":     # one table after the other: each sees the plans applied before it
        if callable(batches):
            make = batches
        else:
            materialised = list(batches)
            make = lambda: iter(materialised)   # noqa: E731
        for table in tables:
            t1 = time.perf_counter()
            ccfg = emb.clustering_config(table)
            pooled_below = (max(int(getattr(ccfg, "cold_interactions", 1)), 1)
                            if getattr(ccfg, "unseen_policy", "stay") == "pooled" else None)
            emb.eval()
            try:    # entities with too few interactions are treated like entities without data
                proposal = exact_proposal(emb, model, make, table, loss, env,
                                          memory_bytes=memory_bytes, pooled_below=pooled_below)
            finally:
                emb.train(was_training)
            decide(table, proposal, time.perf_counter() - t1)
        return out
    emb.eval()
    try:
        lite = lite_proposals(emb, model, recent if recent is not None else batches, tables,
                              loss, env, k=lite_k, cache_bytes=lite_cache_bytes,
                              scoring=lite_scoring)
    finally:
        emb.train(was_training)
    shared = (time.perf_counter() - t0) / max(len(tables), 1)
    for table in tables:
        seen, best, gain, counts, mean_loss = lite.pop(table)
        decide(table, (seen, best, gain, counts, None, mean_loss), shared)
    return out


def _decide_and_apply(emb, table: str, proposal, mode: str, generator, keep_prob: float,
                      optimizer, min_gain: float) -> tuple[ReassignPlan, dict]:
    """One table's plan from its proposal (the unseen policy, damping, the gain test), applied."""
    seen, best, gain, counts, pooled, mean_loss = proposal
    state = emb.cluster_states[table]
    ccfg = emb.clustering_config(table)
    policy = getattr(ccfg, "unseen_policy", "stay")
    min_count = max(int(getattr(ccfg, "cold_interactions", 1)), 1)
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
    return plan, {"moved": plan.num_moved, "entities_with_data": int(seen.numel()),
                  "kept_by_damping": plan.num_kept_by_damping,
                  "kept_below_min_gain": plan.num_kept_below_min_gain,
                  "mean_loss": mean_loss,
                  "kept_to_avoid_empty": plan.num_kept_to_avoid_empty,
                  "refilled": int(plan.row_dst.numel())}


def run_reassignment(emb, model, batches, table: str, **kwargs) -> tuple[ReassignPlan, PhaseReport]:
    """`run_reassignments` of one table: its `(plan, report)`."""
    return run_reassignments(emb, model, batches, [table], **kwargs)[0]


def run_split(emb, table: str, optimizer, reopen: Callable[[], None] | None = None) -> PhaseReport:
    """Split the open window's candidates of `table`, then open the next window (`reopen`, or
    `emb.begin_split_window`)."""
    t0 = time.perf_counter()
    emb.check_inputs()          # the input checks deferred off the training step
    window = emb.split_window(table)
    recorded, dropped = window.num_rows, window.dropped
    plan = emb.split(table, optimizer=optimizer)
    (reopen or (lambda: emb.begin_split_window(table)))()
    state = emb.cluster_states[table]
    return PhaseReport("split", table, time.perf_counter() - t0, state.num_active,
                       {"splits": plan.num_splits, "skipped": int(plan.skipped.numel()),
                        "moved": int(plan.moved_entities.numel()),
                        "recorded_entities": recorded, "dropped_occurrences": dropped})
