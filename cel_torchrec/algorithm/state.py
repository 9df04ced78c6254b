"""Cluster state of one clustered embedding table: the entity -> cluster assignment map and its
counters. Pure torch; an nn.Module only so that its buffers ride along in state_dict/.to()."""
from __future__ import annotations

import torch
from torch import nn

from cel_torchrec.algorithm.ops import segment_count


def map_dtype_for(max_clusters: int, choice: str = "int32") -> torch.dtype:
    """The assignment map's dtype: int32, or (`auto`) the narrowest signed integer type holding
    every cluster id in `[0, max_clusters)`."""
    if choice == "int32":
        return torch.int32
    if choice != "auto":
        raise ValueError(f"map_dtype must be 'int32' or 'auto', got {choice!r}")
    for dtype in (torch.int8, torch.int16):
        if max_clusters - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int32


class ClusterState(nn.Module):
    """Assignment map (`int32[num_entities]` or a narrower signed type, `map_dtype`; values in
    `[0, num_active)`), active-cluster count,
    capacity (`max_clusters`, rows of the cluster table) and per-entity interaction counters.

    Cluster-level counters (members, interactions) are cached and kept current incrementally:
    per step by `count_interactions` (batch-sized work), per split by `move_entities` (work
    proportional to the entities moved). Any other write to the map or the per-entity counters
    (reassignment, checkpoint load) is noticed through the tensors' version counters and the
    caches are rebuilt once with a `bincount` / `index_add_` over the map (a phase-time O(N)).
    Per-entity interaction counters are int32 (4 bytes per entity, like the default map).
    """

    def __init__(self, num_entities: int, max_clusters: int, init_clusters: int = 1,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 map_dtype: torch.dtype = torch.int32):
        super().__init__()
        if map_dtype not in (torch.int8, torch.int16, torch.int32):
            raise ValueError(f"map_dtype must be int8, int16 or int32, got {map_dtype}")
        if max_clusters - 1 > torch.iinfo(map_dtype).max:
            raise ValueError(f"a {map_dtype} map cannot hold {max_clusters} clusters")
        if num_entities <= 0:
            raise ValueError(f"num_entities must be positive, got {num_entities}")
        if not 1 <= init_clusters <= max_clusters:
            raise ValueError(f"need 1 <= init_clusters ({init_clusters}) <= max_clusters ({max_clusters})")
        if init_clusters > num_entities:
            raise ValueError(f"init_clusters ({init_clusters}) exceeds num_entities ({num_entities})")
        self.num_entities = num_entities
        self.capacity = max_clusters
        if init_clusters == 1:
            assignment = torch.zeros(num_entities, dtype=torch.int32)
        else:
            # a random balanced start; every initial cluster non-empty
            perm = torch.randperm(num_entities, generator=generator)
            assignment = torch.empty(num_entities, dtype=torch.int32)
            assignment[perm] = (torch.arange(num_entities) % init_clusters).to(torch.int32)
        self.register_buffer("assignment", assignment.to(device=device, dtype=map_dtype))
        self.register_buffer("num_active_t", torch.tensor(init_clusters, dtype=torch.int64))
        self.register_buffer("entity_interactions", torch.zeros(num_entities, dtype=torch.int32,
                                                                device=device))
        self._member_counts_key: tuple | None = None
        self._member_counts: torch.Tensor | None = None
        self._interactions_key: tuple | None = None
        self._cluster_interactions: torch.Tensor | None = None

    @property
    def num_active(self) -> int:
        return int(self.num_active_t.item())

    @num_active.setter
    def num_active(self, value: int) -> None:
        if not 1 <= value <= self.capacity:
            raise ValueError(f"num_active {value} outside [1, {self.capacity}]")
        self.num_active_t.fill_(value)

    def _map_key(self) -> tuple:
        return (self.assignment.data_ptr(), self.assignment._version)

    def _counts_key(self) -> tuple:
        return (*self._map_key(), self.entity_interactions.data_ptr(),
                self.entity_interactions._version)

    def member_counts(self) -> torch.Tensor:
        """Members per cluster row, `int64[capacity]` (do not modify). Cached: recomputed only
        when the map changed outside `move_entities` (the tensor's version counter tells), so the
        per-step cost is O(1), not O(entities)."""
        if self._member_counts_key != self._map_key():
            self._member_counts = segment_count(self.assignment, self.capacity)
            self._member_counts_key = self._map_key()
        return self._member_counts

    def interaction_counts(self) -> torch.Tensor:
        """Observed training interactions per cluster row, `int64[capacity]` (do not modify)."""
        if self._interactions_key != self._counts_key():
            self._cluster_interactions = torch.zeros(
                self.capacity, dtype=torch.int64, device=self.assignment.device
            ).index_add_(0, self.assignment.long(), self.entity_interactions.long())
            self._interactions_key = self._counts_key()
        return self._cluster_interactions

    def count_interactions(self, entity_ids: torch.Tensor, sign: int = 1) -> None:
        """Add one observed training interaction per occurrence in `entity_ids` (batch-sized
        work: the per-cluster counters are updated in place). `sign=-1` takes such counts back,
        for lookups that are no interactions (ELSA's catalogue rows in a training lookup); a
        count never goes below zero."""
        if sign not in (1, -1):
            raise ValueError(f"sign must be 1 or -1, got {sign}")
        ids = entity_ids.long()
        fresh = self._interactions_key == self._counts_key()
        delta = torch.full_like(ids, sign, dtype=torch.int32)
        self.entity_interactions.index_add_(0, ids, delta)
        if sign < 0 and ids.numel() and int(self.entity_interactions.index_select(0, ids).min()) < 0:
            self.entity_interactions.index_add_(0, ids, -delta)      # undo, then refuse
            raise ValueError("count_interactions(sign=-1) would take back more interactions than "
                             "an entity holds")
        if fresh:
            self._cluster_interactions.index_add_(0, self.assignment.index_select(0, ids).long(),
                                                  delta.long())
            self._interactions_key = self._counts_key()

    def move_entities(self, entities: torch.Tensor, to: torch.Tensor) -> None:
        """Move `entities` to clusters `to`, keeping the cluster counters current in O(moved)."""
        if entities.numel() == 0:
            return
        ents = entities.long()
        members = self.member_counts()
        inter = self.interaction_counts()
        old = self.assignment.index_select(0, ents).long()
        new = to.long()
        ones = torch.ones_like(ents)
        members.index_add_(0, old, -ones).index_add_(0, new, ones)
        moved = self.entity_interactions.index_select(0, ents).long()
        inter.index_add_(0, old, -moved).index_add_(0, new, moved)
        self.assignment.index_copy_(0, ents, new.to(self.assignment.dtype))
        self._member_counts_key = self._map_key()
        self._interactions_key = self._counts_key()

    def check_invariants(self) -> None:
        """Raise if the map is out of range or an active cluster is empty."""
        a = self.assignment
        m = self.num_active
        if a.numel() and (int(a.min()) < 0 or int(a.max()) >= m):
            raise AssertionError(f"assignment out of [0, {m}): min {int(a.min())} max {int(a.max())}")
        empty = (self.member_counts()[:m] == 0).nonzero().flatten()
        if empty.numel():
            raise AssertionError(f"empty active clusters: {empty.tolist()[:10]}")

    def extra_repr(self) -> str:
        return f"num_entities={self.num_entities}, capacity={self.capacity}, num_active={self.num_active}"
