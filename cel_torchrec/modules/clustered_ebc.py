"""ClusteredEmbeddingBagCollection: a drop-in for TorchRec's EmbeddingBagCollection whose
clustered tables hold one row per *cluster*; entity ids are remapped to cluster ids through each
table's assignment map before a stock EmbeddingBagCollection looks them up.

Shaped like TorchRec's managed-collision modules: an id-remapping module (`ClusterRemapper`)
composed in front of a stock collection (`_embedding_bag_collection`), so the sharder can compose
the stock sharder for the cluster table.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from cel_torchrec.choices import SPLIT_GRADIENTS, UNSEEN_POLICIES
from cel_torchrec.config import ClusteringConfig
from cel_torchrec.algorithm import (ClusterState, ReassignPlan, SplitPlan, SplitWindow,
                                    apply_split, choose_clusters, cluster_grad_scale, gpca_split,
                                    map_dtype_for, remap_ids)


class ClusterStates(nn.Module):
    """Table name -> ClusterState. (nn.ModuleDict reserves names such as `items`.)"""

    def __getitem__(self, name: str) -> ClusterState:
        return self._modules[name]  # type: ignore[return-value]

    def __setitem__(self, name: str, state: ClusterState) -> None:
        self.add_module(name, state)

    def __contains__(self, name: object) -> bool:
        return name in self._modules

    def __iter__(self):
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    def as_dict(self) -> dict[str, ClusterState]:
        return dict(self._modules)  # type: ignore[arg-type]


class RemappedFeature(NamedTuple):
    """One clustered feature of a remapped batch: its entity ids and their cluster ids (int64,
    one per id of the feature's bags), and how each id's embedding enters its bag's pooled
    output. `sample`: the bag (sample) of each id, None when every bag holds exactly one id (id
    i is sample i). `share`: each id's factor in its bag's pooled output, i.e. its share of the
    bag's gradient (its KJT weight; `1 / bag length` under MEAN pooling), None where all are 1."""

    key: str
    table: str
    entity_ids: torch.Tensor
    cluster_ids: torch.Tensor
    sample: torch.Tensor | None = None
    share: torch.Tensor | None = None

    @property
    def multi_hot(self) -> bool:
        return self.sample is not None


class ClusterRemapper(nn.Module):
    """Per clustered table: its ClusterState; `forward` maps a KJT's entity ids to cluster ids."""

    def __init__(self, tables: list[EmbeddingBagConfig], clustering: dict[str, ClusteringConfig],
                 device: torch.device | None = None, seed: int = 0, is_weighted: bool = False):
        super().__init__()
        self.is_weighted = bool(is_weighted)
        names = {t.name for t in tables}
        unknown = set(clustering) - names
        if unknown:
            raise ValueError(f"clustering names unknown tables {sorted(unknown)}; tables: {sorted(names)}")
        generator = torch.Generator().manual_seed(seed)
        self.states = ClusterStates()
        self.feature_to_table: dict[str, str] = {}
        self.mean_pooled: set[str] = set()          # clustered tables with MEAN pooling
        for t in tables:
            if t.name not in clustering:
                continue
            cfg = clustering[t.name]
            if t.pooling not in (PoolingType.SUM, PoolingType.MEAN):
                raise ValueError(f"clustered table {t.name!r}: pooling must be SUM or MEAN, "
                                 f"got {t.pooling}")
            if t.pooling == PoolingType.MEAN:
                if self.is_weighted:
                    raise ValueError(f"clustered table {t.name!r}: weighted MEAN pooling is not "
                                     f"supported (TorchRec's EmbeddingBag weighs SUM bags only)")
                self.mean_pooled.add(t.name)
            self.states[t.name] = ClusterState(t.num_embeddings, cfg.max_clusters, cfg.init_clusters,
                                               generator=generator, device=device,
                                               map_dtype=map_dtype_for(cfg.max_clusters,
                                                                       cfg.map_dtype))
            for f in t.feature_names:
                self.feature_to_table[f] = t.name
        self.always_multi_hot = {name for name, cfg in clustering.items() if cfg.bags == "multi_hot"}
        # feature -> int64[3] on the ids' device: (-lowest id, highest id, 1 if a batch taken as
        # one-hot unread was not): checks deferred off the step on accelerators (`check_inputs`)
        self._deferred: dict[str, torch.Tensor] = {}
        self.defer_checks: bool | None = None     # None: defer on accelerators, not on CPU

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        return self.remap(features)[0]

    def features_of(self, table: str) -> list[str]:
        """The features that look up clustered table `table`, in table-config order."""
        if table not in self.states:
            raise KeyError(f"{table!r} is not a clustered table; clustered: {list(self.states)}")
        return [f for f, t in self.feature_to_table.items() if t == table]

    def remap(self, features: KeyedJaggedTensor
              ) -> tuple[KeyedJaggedTensor, list[RemappedFeature]]:
        """The KJT with every clustered feature's entity ids replaced by cluster ids, and per
        clustered feature its entity and cluster ids (slices of the KJT's values, so the gradient
        hook needs no `to_dict()` of either KJT) with each id's bag and pooling share."""
        weights = features.weights_or_none()
        if (weights is not None) != self.is_weighted:
            raise ValueError("the KJT carries weights but the collection was built with "
                             "is_weighted=False (they would be ignored)" if weights is not None
                             else "the collection is weighted (is_weighted=True) but the KJT "
                             "carries no weights")
        if not self.feature_to_table:
            return features, []
        values = features.values()
        offsets = features.offset_per_key()
        new_values = values.clone()
        remapped = []
        for i, key in enumerate(features.keys()):      # loop over features, not entities
            table = self.feature_to_table.get(key)
            if table is None:
                continue
            start, end = offsets[i], offsets[i + 1]
            ids = values[start:end]
            state = self.states[table]
            lengths = _key_lengths(features, i)
            defer = (self.defer_checks if self.defer_checks is not None
                     else ids.device.type != "cpu")
            one_hot = check_feature_ids(key, ids, lengths, state.num_entities,
                                        self._deferred if defer else None,
                                        multi_hot=table in self.always_multi_hot)
            if defer:     # unchecked ids stay in range until `check_inputs` reports them
                ids = ids.clamp(0, state.num_entities - 1)
            cluster_ids = remap_ids(state.assignment, ids)
            new_values[start:end] = cluster_ids.to(values.dtype)
            sample, share = bag_shares(lengths, ids.numel(), one_hot, table in self.mean_pooled,
                                       None if weights is None else weights[start:end])
            remapped.append(RemappedFeature(key, table, ids, cluster_ids, sample, share))
        # the same layout: hand on its per-key lengths/offsets, so the lookup reads no lengths
        kjt = KeyedJaggedTensor(keys=features.keys(), values=new_values,
                                lengths=features.lengths(), offsets=features.offsets(),
                                weights=weights, stride=features.stride(),
                                length_per_key=features.length_per_key(),
                                offset_per_key=features.offset_per_key())
        return kjt, remapped

    def check_inputs(self) -> None:
        """Raise for what the deferred checks saw since the start (accelerators only; on CPU
        every batch is checked as it comes): an id outside its table, or a feature taken as
        one-hot (as many ids as bags) whose bags were not. One host read."""
        if not self._deferred:
            return
        keys = list(self._deferred)
        seen = torch.stack([self._deferred[k] for k in keys]).tolist()
        for key, (neg_low, high, not_one_hot) in zip(keys, seen):
            table = self.feature_to_table[key]
            n = self.states[table].num_entities
            if high >= 0 and (-neg_low < 0 or high >= n):
                raise IndexError(f"feature {key!r}: ids must be in [0, {n}), got ids in "
                                 f"[{-neg_low}, {high}]")
            if not_one_hot:
                raise ValueError(
                    f"feature {key!r}: a batch held as many ids as bags but not one id per bag, "
                    f"and was looked up as one-hot (on an accelerator the bags are not read in "
                    f"the step); set ClusteringConfig(bags='multi_hot') for table {table!r}")


def bag_shares(lengths: torch.Tensor, num_ids: int, one_hot: bool, mean: bool,
               weights: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(each id's bag or None if one-hot, each id's factor in its bag's pooled output or None
    if all 1) for one feature's bag `lengths` (see `RemappedFeature`)."""
    sample = share = None
    if not one_hot:
        sample = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device),
                                         lengths.long(), output_size=num_ids)
        if mean:
            share = 1.0 / lengths.float().clamp_min(1).index_select(0, sample)
    if weights is not None:
        w = weights.float()
        share = w if share is None else share * w
    return sample, share


def multi_hot_ids(remapped: list[RemappedFeature]) -> int:
    """The most ids of one multi-hot feature in `remapped` (0: every clustered bag is one-hot)."""
    return max((int(f.entity_ids.numel()) for f in remapped if f.multi_hot), default=0)


def per_id_layout(kjt: KeyedJaggedTensor, remapped: list[RemappedFeature],
                  extra_rows: int | None = None) -> tuple[KeyedJaggedTensor, int]:
    """The lookup KJT of a training batch with multi-hot clustered features: the batch's `B`
    bags as they are, followed, for every multi-hot clustered feature, by one single-id bag per
    id (rows `B .. B + n`; other features get empty bags there), stride `B + max n`. One stock
    lookup then gives both the pooled values (first `B` rows) and each id's own row, through
    which its exact gradient share flows (see `combine_per_id`). `extra_rows` (at least
    `multi_hot_ids(remapped)`) fixes the stride at `B + extra_rows`, for shardings whose output
    dist needs the same stride on every rank. Batch-sized work."""
    expanded = {f.key for f in remapped if f.multi_hot}
    batch = kjt.stride()
    n_max = multi_hot_ids(remapped)
    stride = batch + (n_max if extra_rows is None else max(int(extra_rows), n_max))
    values, lengths, offsets = kjt.values(), kjt.lengths(), kjt.offset_per_key()
    weights = kjt.weights_or_none()
    vals, lens, wts, per_key = [], [], [], []
    for i, key in enumerate(kjt.keys()):                 # a loop over features
        v = values[offsets[i]:offsets[i + 1]]
        vals.append(v)
        lens.append(lengths[i * batch:(i + 1) * batch])
        if weights is not None:
            wts.append(weights[offsets[i]:offsets[i + 1]])
        n = int(v.numel()) if key in expanded else 0
        per_key.append(int(v.numel()) + n)
        if n:
            vals.append(v)
            lens.append(torch.ones(n, dtype=lengths.dtype, device=lengths.device))
            if weights is not None:
                wts.append(torch.ones(n, dtype=weights.dtype, device=weights.device))
        lens.append(torch.zeros(stride - batch - n, dtype=lengths.dtype, device=lengths.device))
    out = KeyedJaggedTensor(keys=kjt.keys(), values=torch.cat(vals), lengths=torch.cat(lens),
                            weights=torch.cat(wts) if weights is not None else None,
                            stride=stride, length_per_key=per_key)
    return out, stride


def combine_per_id(kt: KeyedTensor, batch: int, remapped: list[RemappedFeature]) -> KeyedTensor:
    """The `[batch, W]` pooled output of a `per_id_layout` lookup: every feature's pooled value
    is its first `batch` rows, exactly as the stock lookup pools them; for a multi-hot clustered
    feature the gradient bypasses those rows and reaches each id's own row scaled by its share
    (`value.detach() + sum_j share_j (row_j - row_j.detach())`), so each id gets exactly its
    share of its bag's gradient (the fused optimizer sees zero for the pooled rows' ids, which
    are the same rows)."""
    by_key = {f.key: f for f in remapped if f.multi_hot}
    values = kt.values()
    parts = []
    for key, (a, b) in zip(kt.keys(), _column_ranges(kt.length_per_key())):
        f = by_key.get(key)
        pooled = values[:batch, a:b]
        if f is not None:
            rows = values[batch:batch + f.entity_ids.numel(), a:b]
            delta = rows - rows.detach()
            if f.share is not None:
                delta = delta * f.share[:, None].to(delta.dtype)
            pooled = pooled.detach() + torch.zeros_like(pooled).index_add(0, f.sample, delta)
        parts.append(pooled)
    return KeyedTensor(keys=kt.keys(), length_per_key=kt.length_per_key(),
                       values=torch.cat(parts, dim=1), key_dim=kt.key_dim())


class _GradHook(torch.autograd.Function):
    """Identity forward; backward hands the pooled-output gradient to `hook`, which records
    statistics and returns the (averaged) gradient to pass on to the lookup."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, hook) -> torch.Tensor:  # noqa: D401
        ctx.hook = hook
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.hook(grad), None


class LocalReduction:
    """How split-window statistics and decisions combine across processes, for one process:
    nothing to combine. The sharded collection injects its process group's version
    (`cel_torchrec.distributed.sharded_clustered_ebc.GroupReduction`)."""

    is_root = True
    gather_rows = None          # SplitWindow.rows(gather): None merges this process's rows

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum `tensors` in place over processes."""

    def decide(self, fn):
        """`fn()` computed on the root process, the same result on every process."""
        return fn()


class ClusterAccess:
    """The part of the API the unsharded collection and its sharded twin share word for word:
    reading the per-table clustering state, the per-cluster loss sums of the split criteria, and
    the split windows and splits themselves, with the cross-process reduction injected as
    `_reduction` (`LocalReduction` unsharded). A mixin: needs `_remapper`, `_clustering`,
    `_tables`, `_windows`, `_last_cluster_ids` (table -> the last training batch's
    `(cluster ids, their samples or None)`, one pair per feature), `_cluster_grad_sum`, `_cluster_loss_sum`, `_reduction`,
    `_table_dim(table)` and `copy_rows`."""

    @property
    def cluster_states(self) -> ClusterStates:
        return self._remapper.states

    @property
    def clustered_tables(self) -> list[str]:
        return list(self._remapper.states)

    def table_features(self, table: str) -> list[str]:
        """The features (KJT keys) that look up clustered table `table`."""
        return self._remapper.features_of(table)

    def remap(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """`features` with every clustered feature's entity ids replaced by their cluster ids
        (through the current assignment maps; other features unchanged): the KJT the cluster
        table looks up, without the lookup itself (for timing or inspection)."""
        return self._remapper(features)

    def check_inputs(self) -> None:
        """Raise for a bad input batch seen by the checks deferred off the step on an
        accelerator (see `ClusteringConfig.bags`); a no-op on CPU, where each batch is checked
        as it comes. One host read: call it where the loop syncs anyway (logging, phases)."""
        self._remapper.check_inputs()

    def clustering_config(self, table: str) -> ClusteringConfig:
        """How clustered table `table` is clustered."""
        return self._clustering[table]

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return list(self._tables)

    def bag_shares(self, features: KeyedJaggedTensor, key: str
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """For clustered feature `key` of `features`: (each id's sample, or None when every bag
        holds one id; each id's factor in its bag's pooled output, or None when all are 1)."""
        jt = features[key]
        lengths = jt.lengths()
        one_hot = bool(lengths.numel() == 0 or (lengths == 1).all())
        return bag_shares(lengths, jt.values().numel(), one_hot,
                          self._remapper.feature_to_table[key] in self._remapper.mean_pooled,
                          jt.weights_or_none())

    def observe_losses(self, per_sample_loss: torch.Tensor) -> None:
        """Add the last training batch's per-sample losses (this rank's) to the per-cluster loss
        sums the `loss` / `mean_loss` split criteria read (summed over ranks when the next split
        window opens)."""
        loss = per_sample_loss.detach().float()
        for table, per_feature in self._last_cluster_ids.items():
            acc = self._cluster_loss_sum.get(table)
            if acc is not None:     # a table shared by several features: each feature's ids
                for cluster_ids, sample in per_feature:      # (multi-hot: each id its bag's)
                    acc.index_add_(0, cluster_ids, loss if sample is None else loss[sample])

    # ------------------------------------------------------------------ split windows
    def _sync_before_window(self, table: str) -> None:
        """Bring the interaction counters up to date before a window opens (sharded: a sync)."""

    def _reset_sums(self, table: str) -> None:
        state = self._remapper.states[table]
        reset_window_sums(self._cluster_grad_sum, self._cluster_loss_sum, table,
                          self._clustering[table], state.capacity, self._table_dim(table),
                          state.assignment.device)

    def begin_split_window(self, table: str) -> torch.Tensor:
        """Collective when sharded. Choose this table's split candidates (by its criterion, from
        the statistics of the previous window, summed over ranks, decided on the root) and start
        recording their members' gradients. Returns the candidates."""
        state = self._remapper.states[table]
        cfg = self._clustering[table]
        self._sync_before_window(table)
        grad_sum = self._cluster_grad_sum.get(table)
        loss_sum = self._cluster_loss_sum.get(table)
        self._reduction.sum_([t for t in (grad_sum, loss_sum) if t is not None])
        candidates = self._reduction.decide(lambda: choose_clusters(
            cfg.split_criterion, state.num_active, _splits_per_event(cfg, state),
            member_counts=state.member_counts(), interaction_counts=state.interaction_counts(),
            grad_norms=grad_sum.norm(dim=1) if grad_sum is not None else None,
            loss_sums=loss_sum).cpu())
        candidates = candidates.to(state.assignment.device)
        self._windows[table].open(candidates)
        self._reset_sums(table)
        return candidates

    def restore_split_window(self, table: str, candidates: torch.Tensor, entities: torch.Tensor,
                             grads: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        """Reopen a window saved from `window_rows` (global sums), so a resumed run splits
        exactly as it would have: the root holds the sums, other ranks start empty, so the next
        merge gives the same totals."""
        if self._reduction.is_root:
            self._windows[table].restore(candidates, entities, grads, counts)
        else:
            self._windows[table].open(candidates)
        self._reset_sums(table)

    def window_rows(self, table: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Collective when sharded. (candidates, recorded entity ids ascending, their gradient
        sums, their interaction counts) of the open window, merged over ranks (O(rows), not
        O(entities))."""
        w = self._windows[table]
        return (w.candidates, *w.rows(self._reduction.gather_rows))

    def window_gradients(self, table: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Collective when sharded. (candidates, recorded entity ids, their gradient sums)."""
        return self.window_rows(table)[:3]

    def split_window(self, table: str) -> SplitWindow:
        return self._windows[table]

    def split(self, table: str, optimizer: torch.optim.Optimizer | None = None,
              plan: SplitPlan | None = None) -> SplitPlan:
        """Collective when sharded. Split the open window's candidates by GPCA on the merged
        window (or apply `plan`); the root decides, every rank applies the same plan to its map,
        and each child row gets its parent's row and optimizer state wherever they live."""
        state = self._remapper.states[table]
        rows = self.window_rows(table) if plan is None else None

        def decide() -> SplitPlan:
            chosen = plan if plan is not None else plan_split(state, self._clustering[table], *rows)
            return _plan_to(chosen, "cpu")

        plan = _plan_to(self._reduction.decide(decide), state.assignment.device)
        apply_split(state, plan)
        self.copy_rows(table, plan.parents, plan.children, optimizer)
        return plan


def _plan_to(plan: SplitPlan, device) -> SplitPlan:
    return SplitPlan(parents=plan.parents.to(device), children=plan.children.to(device),
                     moved_entities=plan.moved_entities.to(device), moved_to=plan.moved_to.to(device),
                     skipped=plan.skipped.to(device))


class ClusteredEmbeddingBagCollection(ClusterAccess, nn.Module):
    """EmbeddingBagCollection whose `clustering` tables store `max_clusters` cluster rows shared by
    entities. Same KJT in, same KeyedTensor out as the stock collection built from `tables`
    (where each clustered table's `num_embeddings` is its number of entities).

    Bags of any length (empty included) under SUM or MEAN pooling, weighted (`is_weighted`,
    SUM only, as TorchRec's) or not: every id of a bag is one interaction of its entity and gets
    exactly its share of the bag's gradient, both for the per-cluster averaging and for the
    gradients a split window records. A training batch whose clustered bags all hold one id
    takes the direct path; any other is looked up with one extra single-id bag per id of its
    multi-hot clustered features (`per_id_layout`), still one stock lookup."""

    def __init__(self, tables: list[EmbeddingBagConfig], clustering: dict[str, ClusteringConfig],
                 device: torch.device | None = None, seed: int = 0, is_weighted: bool = False):
        super().__init__()
        self._tables = list(tables)
        self._clustering = dict(clustering)
        self._remapper = ClusterRemapper(tables, clustering, device=device, seed=seed,
                                         is_weighted=is_weighted)
        cluster_tables = [dataclasses.replace(t, num_embeddings=clustering[t.name].max_clusters)
                          if t.name in clustering else t for t in tables]
        self._embedding_bag_collection = EmbeddingBagCollection(
            tables=cluster_tables, is_weighted=is_weighted, device=device)
        # optional per-entity scalars outside the clusters (see ClusteringConfig.entity_bias_column)
        self.entity_biases = nn.ParameterDict()
        widths = {t.name: t.embedding_dim for t in tables}
        for name, cfg in clustering.items():
            if cfg.unseen_policy not in UNSEEN_POLICIES:
                raise ValueError(f"unseen_policy must be one of {UNSEEN_POLICIES}, got {cfg.unseen_policy!r}")
            if cfg.entity_bias_column is not None:
                if not 0 <= cfg.entity_bias_column < widths[name]:
                    raise ValueError(f"table {name!r}: entity_bias_column {cfg.entity_bias_column} "
                                     f"outside [0, {widths[name]})")
                n = next(t.num_embeddings for t in tables if t.name == name)
                self.entity_biases[name] = nn.Parameter(torch.zeros(n, device=device))
                if cfg.entity_bias_decay:
                    p = self.entity_biases[name]
                    p.register_hook(lambda g, p=p, w=float(cfg.entity_bias_decay): g + w * p.detach())
        self._windows = make_split_windows(tables, clustering, device)
        self._reduction = LocalReduction()
        self._cluster_grad_sum: dict[str, torch.Tensor] = {}
        self._cluster_loss_sum: dict[str, torch.Tensor] = {}
        self._last_cluster_ids: dict[str, list[tuple]] = {}
        for name, state in self._remapper.states.as_dict().items():
            reset_window_sums(self._cluster_grad_sum, self._cluster_loss_sum, name,
                              clustering[name], state.capacity, widths[name], device)

    def is_weighted(self) -> bool:
        return self._remapper.is_weighted

    # ------------------------------------------------------------------ lookup
    def _table_dim(self, table: str) -> int:
        return self.table_weight(table).shape[1]

    def table_weight(self, table: str) -> torch.Tensor:
        return self._embedding_bag_collection.embedding_bags[table].weight

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        remapped, slices = self._remapper.remap(features)
        if self.training and torch.is_grad_enabled() and slices:
            batch = features.stride()
            multi_hot = any(f.multi_hot for f in slices)
            kt = self._embedding_bag_collection(per_id_layout(remapped, slices)[0] if multi_hot
                                                else remapped)
            kt = self._attach_cluster_hooks(batch, slices, kt)
            if multi_hot:
                kt = combine_per_id(kt, batch, slices)
        else:
            kt = self._embedding_bag_collection(remapped)
        if len(self.entity_biases):
            kt = self._add_entity_biases(slices, kt)
        return kt

    def _add_entity_biases(self, slices: list[RemappedFeature], kt: KeyedTensor) -> KeyedTensor:
        """Add each entity's own scalar to its bias column (after the cluster-gradient hook, so
        the scalar gets its plain per-sample gradient)."""
        columns = dict(zip(kt.keys(), _column_ranges(kt.length_per_key())))
        values = kt.values()
        cols, adds = [], []
        for f in slices:
            if f.table not in self.entity_biases:
                continue
            cols.append(columns[f.key][0] + self._clustering[f.table].entity_bias_column)
            bias = self.entity_biases[f.table][f.entity_ids.long()]
            if f.share is not None:
                bias = bias * f.share.to(bias.dtype)
            if f.multi_hot:           # a bag's entity biases pool like its rows
                bias = torch.zeros(values.shape[0], dtype=bias.dtype,
                                   device=bias.device).index_add(0, f.sample, bias)
            adds.append(bias)
        if not cols:
            return kt
        extra = torch.zeros(values.shape[1], len(cols), dtype=values.dtype, device=values.device)
        extra[torch.tensor(cols, device=values.device), torch.arange(len(cols), device=values.device)] = 1.0
        values = values + torch.stack(adds, dim=1).to(values.dtype) @ extra.T
        return KeyedTensor(keys=kt.keys(), length_per_key=kt.length_per_key(), values=values,
                           key_dim=kt.key_dim())

    def entity_offsets(self, table: str, entity_ids: torch.Tensor) -> torch.Tensor | None:
        """What the entities' own (unclustered) parameters add to their cluster row, `[n, D]`
        (None if nothing): reassignment scores `cluster_row + offset` for every candidate."""
        if table not in self.entity_biases:
            return None
        bias = self.entity_biases[table].detach()[entity_ids.long()]
        out = torch.zeros(entity_ids.numel(), self.table_weight(table).shape[1], dtype=bias.dtype,
                          device=bias.device)
        out[:, self._clustering[table].entity_bias_column] = bias
        return out

    def _attach_cluster_hooks(self, batch: int, slices: list[RemappedFeature],
                              kt: KeyedTensor) -> KeyedTensor:
        plans = []
        self._last_cluster_ids = {}
        for f in slices:
            state = self._remapper.states[f.table]
            state.count_interactions(f.entity_ids)
            self._last_cluster_ids.setdefault(f.table, []).append((f.cluster_ids, f.sample))
        scales = table_grad_scales(slices, self._remapper.states, self._clustering)
        plans = [(f, scale) for f, scale in zip(slices, scales)]
        return attach_cluster_grad_hook(kt, batch, plans, self._windows, self._cluster_grad_sum)

    # --------------------------------------------------------------- cluster ops
    def cluster_rows(self, table: str) -> torch.Tensor:
        """The active cluster rows `[num_active, D]` (detached)."""
        return self.table_weight(table).detach()[: self._remapper.states[table].num_active]

    def apply_reassignment(self, table: str, plan: ReassignPlan,
                           optimizer: torch.optim.Optimizer | None = None) -> None:
        """Install a reassignment decision: new map, refilled rows copied with optimizer state."""
        state = self._remapper.states[table]
        self.copy_rows(table, plan.row_src, plan.row_dst, optimizer)
        state.assignment.copy_(plan.new_assignment)

    @torch.no_grad()
    def copy_rows(self, table: str, src: torch.Tensor, dst: torch.Tensor,
                  optimizer: torch.optim.Optimizer | None = None) -> None:
        """Copy cluster rows `src -> dst`, and the optimizer's per-row state with them."""
        if src.numel() == 0:
            return
        weight = self.table_weight(table)
        weight.data[dst] = weight.data[src]
        if optimizer is not None:
            for value in optimizer.state.get(weight, {}).values():
                if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == weight.shape[0]:
                    value[dst] = value[src]

    def embedding_bytes(self) -> int:
        """Bytes of entity-dependent serving state: every table's rows (cluster tables at full
        capacity) plus the int32 assignment maps."""
        total = sum(p.numel() * p.element_size()
                    for p in self._embedding_bag_collection.parameters())
        total += sum(p.numel() * p.element_size() for p in self.entity_biases.parameters())
        for state in self._remapper.states.as_dict().values():
            total += state.assignment.numel() * state.assignment.element_size()
        return int(total)


def attach_cluster_grad_hook(kt: KeyedTensor, batch: int, plans: list, windows: dict,
                             cluster_grad_sum: dict) -> KeyedTensor:
    """Wrap the lookup output so that its backward, per clustered feature in `plans`
    (`(RemappedFeature, scale)`), records each id's gradient (its share of its bag's) into the
    table's open split window, scales it by `scale` (per-cluster averaging, one factor per id; a
    tensor, or a callable giving it when it depends on a collective still in flight) and adds
    the averaged gradients to the table's per-cluster sums. A one-hot feature's gradients are
    its first `batch` rows; a multi-hot feature's are its per-id rows `batch .. batch + n` of a
    `per_id_layout` lookup, which already carry the shares. Shared by the unsharded module and
    its sharded twin."""
    columns = dict(zip(kt.keys(), _column_ranges(kt.length_per_key())))

    def hook(grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        for f, scale in plans:
            a, b = columns[f.key]
            rows = slice(batch, batch + f.entity_ids.numel()) if f.multi_hot else slice(0, batch)
            share = grad[rows, a:b]
            if not f.multi_hot and f.share is not None:
                share = share * f.share[:, None].to(grad.dtype)
            window = windows.get(f.table)
            if window is not None:
                window.record(f.entity_ids, f.cluster_ids, share)
            if callable(scale):
                scale = scale()
            averaged = out[rows, a:b]
            averaged.mul_(scale[:, None].to(grad.dtype))
            acc = cluster_grad_sum.get(f.table)
            if acc is not None:
                # contiguous: index_add_ from a strided column slice is ~4x slower on CPU
                acc.index_add_(0, f.cluster_ids,
                               (share * scale[:, None].to(grad.dtype)).detach().float().contiguous())
        return out

    values = _GradHook.apply(kt.values(), hook)
    return KeyedTensor(keys=kt.keys(), length_per_key=kt.length_per_key(), values=values,
                       key_dim=kt.key_dim())


def table_grad_scales(slices: list[RemappedFeature], states: ClusterStates,
                      clustering: dict[str, ClusteringConfig]) -> list[torch.Tensor]:
    """Each id's averaging factor (`cluster_grad_scale`), per feature of `slices`; a table
    looked up by several features counts its clusters' distinct members over all of them."""
    by_table: dict[str, list[RemappedFeature]] = {}
    for f in slices:
        by_table.setdefault(f.table, []).append(f)
    scale_of: dict[str, list[torch.Tensor]] = {}
    for table, feats in by_table.items():       # a loop over tables
        entity_ids = torch.cat([f.entity_ids for f in feats]) if len(feats) > 1 else feats[0].entity_ids
        cluster_ids = torch.cat([f.cluster_ids for f in feats]) if len(feats) > 1 else feats[0].cluster_ids
        scale = cluster_grad_scale(entity_ids, cluster_ids, states[table].member_counts(),
                                   clustering[table].grad_average)
        scale_of[table] = list(scale.split([f.entity_ids.numel() for f in feats]))
    return [scale_of[f.table].pop(0) for f in slices]


def make_split_windows(tables: list[EmbeddingBagConfig], clustering: dict[str, ClusteringConfig],
                       device: torch.device | None) -> dict[str, SplitWindow]:
    """One (closed) split window per clustered table."""
    out = {}
    for t in tables:
        cfg = clustering.get(t.name)
        if cfg is None:
            continue
        if cfg.split_gradient not in SPLIT_GRADIENTS:
            raise ValueError(f"split_gradient must be one of {SPLIT_GRADIENTS}, got {cfg.split_gradient!r}")
        out[t.name] = SplitWindow(t.num_embeddings, cfg.max_clusters, t.embedding_dim,
                                  cfg.window_rows_for(t.num_embeddings), device=device)
    return out


def _splits_per_event(cfg: ClusteringConfig, state: ClusterState) -> int:
    return cfg.splits_per_event if cfg.splits_per_event > 0 else state.capacity


def plan_split(state: ClusterState, cfg: ClusteringConfig, candidates: torch.Tensor,
               entities: torch.Tensor, grads: torch.Tensor, counts: torch.Tensor) -> SplitPlan:
    """GPCA split of `candidates` from a window's merged rows (only recorded members move)."""
    if cfg.split_gradient == "mean":
        grads = grads / counts.clamp_min(1)[:, None]
    return gpca_split(state.assignment, state.num_active, state.capacity, candidates,
                      entities, grads, method=cfg.split_method)


def reset_window_sums(grad_sums: dict, loss_sums: dict, table: str, cfg: ClusteringConfig,
                      capacity: int, dim: int, device: torch.device | None) -> None:
    """Start `table`'s per-cluster sums for the next split window, only those its split criterion
    reads (gradient sums for `grad_norm`, loss sums for `loss` / `mean_loss`): each costs an
    `index_add_` per training step. Zeros before the first window, so it chooses by id."""
    grad_sums.pop(table, None)
    loss_sums.pop(table, None)
    if cfg.split_criterion == "grad_norm":
        grad_sums[table] = torch.zeros(capacity, dim, device=device)
    if cfg.split_criterion in ("loss", "mean_loss"):
        loss_sums[table] = torch.zeros(capacity, device=device)


def _key_lengths(features: KeyedJaggedTensor, index: int) -> torch.Tensor:
    """The per-sample bag lengths of the `index`-th key of `features`."""
    stride = features.stride()
    return features.lengths()[index * stride:(index + 1) * stride]


def check_feature_ids(key: str, entity_ids: torch.Tensor, lengths: torch.Tensor,
                      num_entities: int, deferred: dict[str, torch.Tensor] | None = None,
                      multi_hot: bool = False) -> bool:
    """Every id of a clustered feature lies in `[0, num_entities)`; returns whether every bag
    holds exactly one id (the direct lookup path). Without `deferred` (CPU) one host read for
    both, raising at once. With `deferred` (accelerators), no host read: as many ids as bags is
    taken as one-hot, and the id range and that guess are folded into `deferred[key]` on the
    device, for `ClusterRemapper.check_inputs` to report. `multi_hot`: the table's bags are
    declared multi-hot (`ClusteringConfig.bags`): never the direct path."""
    if deferred is not None:
        one_hot = entity_ids.numel() == lengths.numel() and not multi_hot
        if entity_ids.numel() == 0:
            return one_hot
        low, high = torch.aminmax(entity_ids)
        bad = (lengths != 1).any() if one_hot else torch.zeros((), dtype=torch.bool,
                                                               device=lengths.device)
        seen = torch.stack([-low.long(), high.long(), bad.long()])
        acc = deferred.get(key)
        if acc is None:
            deferred[key] = seen
        else:
            torch.maximum(acc, seen, out=acc)
        return one_hot
    parts = ([*torch.aminmax(lengths)] if lengths.numel() else []) + \
            ([*torch.aminmax(entity_ids)] if entity_ids.numel() else [])
    if not parts:
        return not multi_hot
    bounds = torch.stack([p.long() for p in parts]).tolist()
    one_hot = True
    if lengths.numel():
        (low, high), bounds = bounds[:2], bounds[2:]
        one_hot = low == 1 and high == 1
    if bounds:
        low, high = bounds
        if low < 0 or high >= num_entities:
            raise IndexError(f"feature {key!r}: ids must be in [0, {num_entities}), "
                             f"got [{low}, {high}]")
    return one_hot and not multi_hot


def _column_ranges(lengths: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for n in lengths:
        out.append((start, start + n))
        start += n
    return out
