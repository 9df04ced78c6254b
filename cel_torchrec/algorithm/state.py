"""Cluster state of one clustered embedding table: the entity -> cluster assignment map and its
counters. Pure torch; an nn.Module only so that its buffers ride along in state_dict/.to()."""
from __future__ import annotations

import torch
from torch import nn


class ClusterState(nn.Module):
    """Assignment map (`int32[num_entities]`, values in `[0, num_active)`), active-cluster count,
    capacity (`max_clusters`, rows of the cluster table) and per-entity interaction counters.

    Cluster-level counters (members, interactions) are derived on demand with `bincount`, so they
    can never drift from the map after splits and reassignments.
    """

    def __init__(self, num_entities: int, max_clusters: int, init_clusters: int = 1,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None):
        super().__init__()
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
        self.register_buffer("assignment", assignment.to(device))
        self.register_buffer("num_active_t", torch.tensor(init_clusters, dtype=torch.int64))
        self.register_buffer("entity_interactions", torch.zeros(num_entities, dtype=torch.int64,
                                                                device=device))
        self._member_counts_key: tuple | None = None
        self._member_counts: torch.Tensor | None = None

    @property
    def num_active(self) -> int:
        return int(self.num_active_t.item())

    @num_active.setter
    def num_active(self, value: int) -> None:
        if not 1 <= value <= self.capacity:
            raise ValueError(f"num_active {value} outside [1, {self.capacity}]")
        self.num_active_t.fill_(value)

    def member_counts(self) -> torch.Tensor:
        """Members per cluster row, `int64[capacity]` (do not modify). Cached: recomputed only
        when the map changed, which the tensor's version counter tells (every in-place write:
        splits, reassignments, checkpoint loads), so the per-step cost is O(1), not O(entities)."""
        key = (self.assignment.data_ptr(), self.assignment._version)
        if self._member_counts_key != key:
            self._member_counts = torch.bincount(self.assignment.long(), minlength=self.capacity)
            self._member_counts_key = key
        return self._member_counts

    def interaction_counts(self) -> torch.Tensor:
        """Observed training interactions per cluster row, `int64[capacity]`."""
        return torch.zeros(self.capacity, dtype=torch.int64, device=self.assignment.device
                           ).index_add_(0, self.assignment.long(), self.entity_interactions)

    def count_interactions(self, entity_ids: torch.Tensor) -> None:
        """Add one observed training interaction per occurrence in `entity_ids`."""
        self.entity_interactions.index_add_(0, entity_ids.long(),
                                            torch.ones_like(entity_ids, dtype=torch.int64))

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
