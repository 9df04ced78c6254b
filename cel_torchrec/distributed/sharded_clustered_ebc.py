"""ShardedClusteredEmbeddingBagCollection: the sharded twin of `ClusteredEmbeddingBagCollection`.

Shaped like TorchRec's sharded managed-collision collection: the replicated `ClusterRemapper`
runs first, on every rank, on that rank's local batch (entity ids -> cluster ids), then a stock
`ShardedEmbeddingBagCollection` distributes the *cluster* ids, looks them up in the sharded
cluster table and distributes the pooled rows back. A callback on the output awaitable puts the
CEL gradient hook (per-cluster averaging, per-entity window gradients) on the pooled output, so
the averaging happens before TorchRec's fused optimizer sees the gradient.

Cluster phases are collectives (see `collectives.py`): statistics are summed over ranks, the
decision is taken on rank 0 and broadcast, and every rank applies it to its replica of the
assignment map and to the cluster rows (plus fused optimizer state) it holds.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.embedding_types import KJTList, ShardedEmbeddingModule
from torchrec.distributed.embeddingbag import (EmbeddingBagCollectionContext,
                                               EmbeddingBagCollectionSharder,
                                               ShardedEmbeddingBagCollection)
from torchrec.distributed.types import Awaitable, LazyAwaitable, ParameterSharding, ShardingEnv
from torchrec.distributed.utils import append_prefix
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from cel_torchrec.algorithm import ReassignPlan
from cel_torchrec.choices import BATCH_SCOPES
from cel_torchrec.distributed import collectives as C
from cel_torchrec.modules.clustered_ebc import (ClusterAccess, ClusteredEmbeddingBagCollection,
                                                ClusteringConfig, ClusterStates, RemappedFeature,
                                                attach_cluster_grad_hook, combine_per_id,
                                                make_split_windows, multi_hot_ids, per_id_layout,
                                                reset_window_sums, table_grad_scales)


_REDUCE_SCATTER_SHARDINGS = ("row_wise", "table_row_wise", "grid_shard")


@dataclass
class ClusteredEmbeddingBagCollectionContext(EmbeddingBagCollectionContext):
    """The stock EBC context plus what the CEL gradient hook needs about the local batch."""

    cel_plans: list = field(default_factory=list)
    cel_global_counts: "_GlobalDistinctMembers | None" = None
    cel_batch: int = 0                 # the local batch size (the lookup's stride may be larger)
    cel_multi_hot: list = field(default_factory=list)    # features looked up per id as well


class GroupReduction:
    """Split-window statistics and decisions over a process group: sums all-reduced, window
    rows gathered, decisions taken on rank 0 and broadcast (see `LocalReduction`)."""

    def __init__(self, group: dist.ProcessGroup | None):
        self._group = group

    @property
    def is_root(self) -> bool:
        return C.rank(self._group) == 0

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return C.all_gather_rows(rows, self._group)

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        C.all_reduce_sum_many_(tensors, self._group)

    def decide(self, fn):
        return C.broadcast_object(fn() if self.is_root else None, 0, self._group)


class ShardedClusteredEmbeddingBagCollection(
        ClusterAccess,
        ShardedEmbeddingModule[KJTList, list[torch.Tensor], KeyedTensor,
                               ClusteredEmbeddingBagCollectionContext]):
    """Sharded `ClusteredEmbeddingBagCollection`: replicated assignment maps, sharded cluster
    table, CEL phases as collectives. Methods with the unsharded module's names have its
    semantics on the *global* batch / data, and must be called on every rank in the same order.

    `batch_scope` only matters for tables with `grad_average == "batch"`: `global` (default)
    divides by the number of distinct members of the cluster in the *global* batch (an
    all-gather of the local entity ids every training step; equals the unsharded module fed the
    global batch); `local` divides by the count in this rank's batch (no communication; the
    summed gradient is then up to `world_size` times larger for clusters seen on several ranks).
    """

    def __init__(self, module: ClusteredEmbeddingBagCollection,
                 table_name_to_parameter_sharding: dict[str, ParameterSharding],
                 ebc_sharder: EmbeddingBagCollectionSharder, env: ShardingEnv,
                 device: torch.device, batch_scope: str = "global",
                 module_fqn: str | None = None) -> None:
        super().__init__(qcomm_codecs_registry=ebc_sharder.qcomm_codecs_registry)
        if batch_scope not in BATCH_SCOPES:
            raise ValueError(f"batch_scope must be one of {BATCH_SCOPES}, got {batch_scope!r}")
        self._env = env
        self._device = device
        self._pg = env.process_group
        self._batch_scope = batch_scope
        self._tables: list[EmbeddingBagConfig] = module.embedding_bag_configs()
        self._clustering: dict[str, ClusteringConfig] = dict(module._clustering)
        self._remapper = module._remapper.to(device)
        self._embedding_bag_collection: ShardedEmbeddingBagCollection = ebc_sharder.shard(
            module._embedding_bag_collection, table_name_to_parameter_sharding, env=env,
            device=device, module_fqn=append_prefix(module_fqn or "", "_embedding_bag_collection"))
        self._dims = {t.name: t.embedding_dim for t in self._tables}
        # row-wise output dists reduce-scatter pooled rows: a multi-hot step's per-id layout
        # (`per_id_layout`) needs one stride on all ranks, agreed by one all-reduce per step
        self._same_stride = C.world_size(self._pg) > 1 and any(
            ps.sharding_type in _REDUCE_SCATTER_SHARDINGS
            for ps in table_name_to_parameter_sharding.values())
        self._windows = make_split_windows(self._tables, self._clustering, device)
        self._reduction = GroupReduction(self._pg)
        self._cluster_grad_sum: dict[str, torch.Tensor] = {}
        self._cluster_loss_sum: dict[str, torch.Tensor] = {}
        self._last_cluster_ids: dict[str, list[tuple]] = {}
        # interactions counted on this rank since the last sync (the replicated buffer
        # `entity_interactions` only ever holds globally summed counts)
        self._pending_interactions = {
            name: torch.zeros(state.num_entities, dtype=torch.int32, device=device)
            for name, state in self._remapper.states.as_dict().items()}
        for name, state in self._remapper.states.as_dict().items():
            reset_window_sums(self._cluster_grad_sum, self._cluster_loss_sum, name,
                              self._clustering[name], state.capacity, self._dims[name], device)

    # ------------------------------------------------------------------ TorchRec plumbing
    def create_context(self) -> ClusteredEmbeddingBagCollectionContext:
        return ClusteredEmbeddingBagCollectionContext()

    def input_dist(self, ctx: ClusteredEmbeddingBagCollectionContext,
                   features: KeyedJaggedTensor) -> Awaitable[Awaitable[KJTList]]:
        # replicated map, local batch, before any all-to-all
        remapped, slices = self._remapper.remap(features)
        if self.training and torch.is_grad_enabled() and slices:
            ctx.cel_batch = features.stride()
            ctx.cel_plans = self._hook_plans(ctx, features.stride(), slices)
            extra = multi_hot_ids(slices)
            if self._same_stride:       # every rank the same stride: agree on the extra rows
                extra = C.all_reduce_max_int(extra, self._pg)
            if extra or any(f.multi_hot for f in slices):
                # (table-wise and column-wise output dists carry each rank's own stride)
                ctx.cel_multi_hot = slices
                remapped = per_id_layout(remapped, slices, extra)[0]
        return self._embedding_bag_collection.input_dist(ctx, remapped)

    def compute(self, ctx: ClusteredEmbeddingBagCollectionContext, dist_input: KJTList
                ) -> list[torch.Tensor]:
        self._gather_global_counts(ctx)
        return self._embedding_bag_collection.compute(ctx, dist_input)

    def output_dist(self, ctx: ClusteredEmbeddingBagCollectionContext, output: list[torch.Tensor]
                    ) -> LazyAwaitable[KeyedTensor]:
        return self._with_hook(ctx, self._embedding_bag_collection.output_dist(ctx, output))

    def compute_and_output_dist(self, ctx: ClusteredEmbeddingBagCollectionContext,
                                input: KJTList) -> LazyAwaitable[KeyedTensor]:
        self._gather_global_counts(ctx)
        return self._with_hook(ctx, self._embedding_bag_collection.compute_and_output_dist(ctx, input))

    def prefetch(self, dist_input: KJTList, forward_stream=None, ctx=None) -> None:
        self._embedding_bag_collection.prefetch(dist_input, forward_stream, ctx)

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        for fqn, _ in self.named_parameters():
            yield append_prefix(prefix, fqn)
        for fqn, _ in self.named_buffers():
            yield append_prefix(prefix, fqn)

    @property
    def unsharded_module_type(self) -> type[ClusteredEmbeddingBagCollection]:
        return ClusteredEmbeddingBagCollection

    # ------------------------------------------------------------------ gradient hook
    def _hook_plans(self, ctx: ClusteredEmbeddingBagCollectionContext, batch: int,
                    slices: list[RemappedFeature]) -> list:
        plans, global_counts = [], None
        if self._batch_scope == "global" and C.world_size(self._pg) > 1:
            batch_features = [f for f in slices
                              if self._clustering[f.table].grad_average == "batch"]
            if batch_features:
                global_counts = _GlobalDistinctMembers(batch_features, self._remapper.states,
                                                       self._pg)
        ctx.cel_global_counts = global_counts
        self._last_cluster_ids = {}
        # local factors only where the global batch's counts do not replace them (each costs a
        # dedup of the feature's ids)
        is_global = [global_counts is not None and f.key in global_counts.keys for f in slices]
        local = iter(table_grad_scales([f for f, g in zip(slices, is_global) if not g],
                                       self._remapper.states, self._clustering))
        for f, by_global in zip(slices, is_global):
            pending = self._pending_interactions[f.table]
            pending.index_add_(0, f.entity_ids.long(),
                               torch.ones_like(f.entity_ids, dtype=torch.int32))
            self._last_cluster_ids.setdefault(f.table, []).append((f.cluster_ids, f.sample))
            # global: counted in backward, from the all-gather run after the input dist
            scale = (functools.partial(global_counts.grad_scale, f.key, f.cluster_ids)
                     if by_global else next(local))
            plans.append((f, scale))
        return plans

    @staticmethod
    def _gather_global_counts(ctx: ClusteredEmbeddingBagCollectionContext) -> None:
        """After TorchRec's input dist, which told every rank's batch size: the one all-gather
        of the global batch's entity ids (counted only when backward needs them)."""
        if ctx.cel_global_counts is not None:
            sizes = [s.batch_size_per_rank for s in ctx.sharding_contexts
                     if getattr(s, "batch_size_per_rank", None)]
            ctx.cel_global_counts.gather(max(sizes[0]) if sizes else None)

    def _with_hook(self, ctx: ClusteredEmbeddingBagCollectionContext,
                   awaitable: LazyAwaitable[KeyedTensor]) -> LazyAwaitable[KeyedTensor]:
        if ctx.cel_plans:
            plans, batch, multi_hot = ctx.cel_plans, ctx.cel_batch, ctx.cel_multi_hot
            awaitable.callbacks.append(lambda kt: self._attach_hook(plans, batch, kt))
            if multi_hot:
                awaitable.callbacks.append(lambda kt: combine_per_id(kt, batch, multi_hot))
        return awaitable

    def _attach_hook(self, plans: list, batch: int, kt: KeyedTensor) -> KeyedTensor:
        return attach_cluster_grad_hook(kt, batch, plans, self._windows, self._cluster_grad_sum)

    def is_weighted(self) -> bool:
        return self._remapper.is_weighted

    # ------------------------------------------------------------------ same API as unsharded
    @property
    def batch_scope(self) -> str:
        return self._batch_scope

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        return self._pg

    def sync_statistics(self, tables: list[str] | None = None) -> None:
        """Collective: add every rank's interactions counted since the last sync into the
        replicated `entity_interactions` (call before reading counters or saving). Exact
        integer sums, the same on every rank."""
        names = self.clustered_tables if tables is None else tables
        # sparse: only the entities counted since the last sync travel, as (table, entity,
        # count) rows in one all-gather, so an event costs O(entities seen), not O(N)
        rows = []
        for i, n in enumerate(names):
            p = self._pending_interactions[n]
            idx = p.nonzero().flatten()
            rows.append(torch.stack([torch.full_like(idx, i), idx, p[idx].long()], dim=1))
            p[idx] = 0
        gathered = C.all_gather_rows(torch.cat(rows) if rows else
                                     torch.zeros(0, 3, dtype=torch.long), self._pg)
        for i, n in enumerate(names):
            mine = gathered[gathered[:, 0] == i]
            counts = self._remapper.states[n].entity_interactions
            counts.index_add_(0, mine[:, 1].to(counts.device),
                              mine[:, 2].to(device=counts.device, dtype=counts.dtype))

    def _sync_before_window(self, table: str) -> None:
        self.sync_statistics([table])

    def _table_dim(self, table: str) -> int:
        return self._dims[table]

    def apply_reassignment(self, table: str, plan: ReassignPlan,
                           optimizer: torch.optim.Optimizer | None = None) -> None:
        """Collective. Install rank 0's reassignment decision on every rank: its map (broadcast,
        so replicas cannot drift even if ranks computed slightly different plans) and its
        refilled rows, copied with their fused optimizer state."""
        state = self._remapper.states[table]
        device = state.assignment.device
        new_assignment = plan.new_assignment.to(device=device, dtype=state.assignment.dtype).clone()
        if C.world_size(self._pg) > 1:
            transport = new_assignment.to(C.collective_device(self._pg))
            C.broadcast_(transport, 0, self._pg)
            new_assignment = transport.to(device)
        rows = C.broadcast_object((plan.row_src.cpu(), plan.row_dst.cpu()), 0, self._pg)
        self.copy_rows(table, rows[0].to(device), rows[1].to(device), optimizer)
        state.assignment.copy_(new_assignment)

    def copy_rows(self, table: str, src: torch.Tensor, dst: torch.Tensor,
                  optimizer: torch.optim.Optimizer | None = None) -> None:
        """Collective. Copy cluster rows `src -> dst` with every fused optimizer state, across
        ranks where needed. `optimizer` (a dense optimizer) is only consulted for data-parallel
        tables, whose rows are plain replicated parameters."""
        shards = self.local_shards(table)
        C.copy_rows(shards, src.long(), dst.long(), self._dims[table], self._pg)
        if optimizer is not None and src.numel():
            for shard in shards:
                if not shard.replicated:
                    continue
                for param_state in optimizer.state.values():
                    for value in param_state.values():
                        if torch.is_tensor(value) and value.data_ptr() != shard.weight.data_ptr() \
                                and value.shape == shard.weight.shape:
                            value[dst] = value[src]

    @torch.no_grad()
    def cluster_rows(self, table: str) -> torch.Tensor:
        """Collective. The active cluster rows `[num_active, D]`, full width, on every rank."""
        state = self._remapper.states[table]
        rows = torch.arange(state.num_active, device=state.assignment.device)
        return self.gather_table(table, rows)

    @torch.no_grad()
    def gather_table(self, table: str, rows: torch.Tensor | None = None,
                     state_index: int | None = None) -> torch.Tensor:
        """Collective. Full rows of `table` (all rows by default), or of its fused optimizer
        state `state_index`, on every rank."""
        if rows is None:
            rows = torch.arange(self._num_rows(table), device=self._device)
        shards = self.local_shards(table)
        if state_index is not None:
            shards = [s for s in shards if state_index < len(s.states)]
        return C.gather_rows(shards, rows.to(self._device), self._dims[table], self._pg,
                             state_index=state_index)

    def _num_rows(self, table: str) -> int:
        if table in self._clustering:
            return self._clustering[table].max_clusters
        return next(t.num_embeddings for t in self._tables if t.name == table)

    def embedding_bytes(self) -> int:
        """Bytes of entity-dependent serving state of the whole (all-ranks) collection: every
        table at full capacity plus the int32 assignment maps (the same number as the unsharded
        module's; each rank holds the maps plus its shards)."""
        total = 0
        for t in self._tables:
            rows = self._num_rows(t.name)
            total += rows * t.embedding_dim * 4
        for state in self._remapper.states.as_dict().values():
            total += state.assignment.numel() * state.assignment.element_size()
        return int(total)

    # ------------------------------------------------------------------ shards
    def local_shards(self, table: str) -> list[C.LocalShard]:
        """The shards of `table` this rank holds: views into TorchRec's fused (TBE) weights and
        their optimizer states, with their place in the full table."""
        out = []
        ebc = self._embedding_bag_collection
        for lookup in ebc._lookups:
            replicated = isinstance(lookup, DistributedDataParallel)
            while isinstance(lookup, DistributedDataParallel):
                lookup = lookup.module
            for emb_module in lookup._emb_modules:
                tables = emb_module.config.embedding_tables
                if not any(t.name == table for t in tables):
                    continue
                weights = emb_module.split_embedding_weights()
                tbe = emb_module.emb_module
                try:
                    states = tbe.split_optimizer_states()
                except (AttributeError, NotImplementedError):
                    states = [[] for _ in tables]
                for i, t in enumerate(tables):
                    if t.name != table:
                        continue
                    md = t.local_metadata
                    row_off, col_off = (md.shard_offsets[0], md.shard_offsets[1]) if md is not None \
                        and not replicated else (0, 0)
                    out.append(C.LocalShard(weight=weights[i], row_offset=int(row_off),
                                            col_offset=int(col_off),
                                            states=list(states[i]) if states else [],
                                            replicated=replicated))
        return out


class _GlobalDistinctMembers:
    """Distinct members per cluster in the GLOBAL batch, for the `batch`-averaged features of one
    training step (batch_scope `global`). Every rank's entity ids (features offset into one id
    space) travel in ONE all-gather, padded to a bound all ranks know without talking (the
    largest per-rank batch, from TorchRec's input dist, times the number of features), run
    right after the input dist; the counts are computed when backward first needs a scale.
    Without that bound (variable stride per key) a two-collective gather is used instead.
    (An asynchronous all-gather waited for in backward measured no faster on gloo/CPU, and an
    outstanding gloo work at shutdown is one more thing that can go wrong.)"""

    def __init__(self, features: list[RemappedFeature], states: ClusterStates,
                 group: dist.ProcessGroup | None) -> None:
        self._states = states
        self._group = group
        self.keys: dict[str, tuple[str, int]] = {}          # key -> (table, id offset)
        offset: dict[str, int] = {}                          # table -> id offset
        parts, base = [], 0
        for f in features:      # raw ids: one dedup over the gathered ids does all the work
            if f.table not in offset:       # a table's features share its id range
                offset[f.table] = base
                base += states[f.table].num_entities
            self.keys[f.key] = (f.table, offset[f.table])
            parts.append(f.entity_ids.long() + offset[f.table])
        self._local = torch.cat(parts)
        self._gathered: torch.Tensor | None = None
        self._counts: dict[str, torch.Tensor] | None = None

    def gather(self, max_batch_per_rank: int | None) -> None:
        """Collective: gather every rank's ids (once; `None`: no bound known)."""
        if self._gathered is not None:
            return
        if max_batch_per_rank is None:
            self._gathered = C.all_gather_variable(self._local, self._group)
        else:
            # kept padded (the -1 fill lies outside every table's range): no masked select,
            # so no data-dependent shape
            self._gathered = C.all_gather_padded(self._local, max_batch_per_rank * len(self.keys),
                                                 fill=-1, group=self._group)
        # the gradient hook keeps this object until backward: it must not keep the process group
        self._group = self._local = None

    def counts(self) -> dict[str, torch.Tensor]:
        if self._counts is None:
            if self._gathered is None:
                raise RuntimeError("global batch counts used before the all-gather "
                                   "(compute / compute_and_output_dist did not run)")
            # distinct ids: sorted, each counted at its first occurrence (a sort, no `unique`
            # and no host read: the shapes never depend on the data)
            ids = torch.sort(self._gathered.long()).values
            first = torch.ones_like(ids, dtype=torch.bool)
            first[1:] = ids[1:] != ids[:-1]
            self._counts = {}
            per_table: dict[str, torch.Tensor] = {}
            for key, (table, start) in self.keys.items():
                if table in per_table:
                    self._counts[key] = per_table[table]
                    continue
                state = self._states[table]
                inside = first & (ids >= start) & (ids < start + state.num_entities)
                # gather then widen: never convert the whole O(entities) map per step
                local = (ids - start).clamp(0, state.num_entities - 1)
                clusters = state.assignment.index_select(0, local).long()
                counts = torch.zeros(state.capacity, dtype=torch.long, device=ids.device)
                self._counts[key] = per_table[table] = counts.index_add_(0, clusters, inside.long())
        return self._counts

    def grad_scale(self, key: str, cluster_ids: torch.Tensor) -> torch.Tensor:
        denom = self.counts()[key].index_select(0, cluster_ids)
        return 1.0 / denom.clamp_min(1).to(torch.float32)
