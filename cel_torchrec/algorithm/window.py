"""Split windows: the per-entity gradients that decide the next GPCA split of one table.

A window opens with a set of candidate clusters and records, for every member of a candidate
that the training data *shows* it, the gradient of the loss w.r.t. that entity's looked-up
embedding (summed over its interactions) and its interaction count. Members the window never
sees have no row: they do not take part in the split and stay with their parent cluster.

Memory is bounded and independent of the candidates' size: one persistent `int32[N]` slot map per
table (allocated once, reset per event only where the last window wrote) and at most `max_rows`
gradient rows, grown on demand. Work per step is batch-sized; work per event is proportional to
the entities the window recorded, never to the table's entities. Pure torch; the cross-rank
merge is injected (`gather`), so the unsharded and the sharded collection share this class.

Recording reads nothing back to the host (no sync on CUDA): the row count lives on the device,
rows are reserved for a host-side bound (rows so far + ids recorded since the window opened,
at most `max_rows`), and occurrences that get no row are sent to one spare row at the end.
"""
from __future__ import annotations

from typing import Callable

import torch


class SplitWindow:
    """The open split window of one table (see the module docstring)."""

    def __init__(self, num_entities: int, capacity: int, dim: int, max_rows: int,
                 device: torch.device | str | None = None):
        if max_rows <= 0:
            raise ValueError(f"max_rows must be positive, got {max_rows}")
        self.dim = dim
        self.max_rows = int(max_rows)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # one spare entry at the end (index num_entities): where the ids that get no row write
        self.slot_of_entity = torch.full((num_entities + 1,), -1, dtype=torch.int32, device=self.device)
        self.in_candidate = torch.zeros(capacity, dtype=torch.bool, device=self.device)
        self.candidates = torch.empty(0, dtype=torch.long, device=self.device)
        # `rows + 1` allocated: the last one is the spare row (see the module docstring)
        self._entities = torch.zeros(1, dtype=torch.long, device=self.device)
        self._grads = torch.zeros(1, dim, dtype=torch.float32, device=self.device)
        self._counts = torch.zeros(1, dtype=torch.float32, device=self.device)
        self._rows = torch.zeros((), dtype=torch.long, device=self.device)
        self._dropped = torch.zeros((), dtype=torch.long, device=self.device)
        self._bound = 0           # host-side upper bound of the rows in use
        self.is_open = False

    @property
    def num_rows(self) -> int:
        """Entities recorded (a host read)."""
        return int(self._rows)

    @property
    def dropped(self) -> int:
        """Occurrences not recorded because the window was full (a host read)."""
        return int(self._dropped)

    # ------------------------------------------------------------------ lifecycle
    def open(self, candidates: torch.Tensor) -> None:
        """Start recording the members of `candidates` (and forget the previous window)."""
        n = self.num_rows
        if n:
            self.slot_of_entity.index_fill_(0, self._entities[:n], -1)
        self._grads.zero_()
        self._counts.zero_()
        self.in_candidate.zero_()
        self.candidates = candidates.long().to(self.device)
        self.in_candidate[self.candidates] = True
        self._rows.zero_()
        self._dropped.zero_()
        self._bound = 0
        self.is_open = True

    def restore(self, candidates: torch.Tensor, entities: torch.Tensor, grads: torch.Tensor,
                counts: torch.Tensor | None = None) -> None:
        """Reopen a window saved with `state()` (rows in the saved order)."""
        self.open(candidates)
        n = int(entities.numel())
        if n:
            self._reserve(n)
            ents = entities.long().to(self.device)
            self._entities[:n] = ents
            self._grads[:n] = grads.to(self.device, torch.float32)
            self._counts[:n] = (counts.to(self.device, torch.float32) if counts is not None
                                else torch.ones(n, device=self.device))
            self.slot_of_entity[ents] = torch.arange(n, dtype=torch.int32, device=self.device)
            self._rows.fill_(n)
            self._bound = n

    def state(self) -> dict[str, torch.Tensor]:
        """This rank's rows: candidates, entity ids, gradient sums, interaction counts."""
        n = self.num_rows
        return {"candidates": self.candidates, "entities": self._entities[:n],
                "grads": self._grads[:n], "counts": self._counts[:n]}

    # ------------------------------------------------------------------ recording
    def record(self, entity_ids: torch.Tensor, cluster_ids: torch.Tensor,
               grads: torch.Tensor) -> None:
        """Add per-sample gradients of looked-up embeddings for the samples whose entity is in a
        candidate cluster (batch-sized work; new entities get the next free rows)."""
        if not self.is_open or self.candidates.numel() == 0 or entity_ids.numel() == 0:
            return
        n_ent = self.slot_of_entity.numel() - 1
        ids = entity_ids.long()
        keep = self.in_candidate.index_select(0, cluster_ids.long())
        slots = self.slot_of_entity.index_select(0, ids)
        # new entities, each once, ascending (a sort, not `unique`: no data-dependent shape)
        key = torch.where(keep & (slots < 0), ids, n_ent)
        s = torch.sort(key).values
        first = s < n_ent
        first[1:] &= s[1:] != s[:-1]
        rank = torch.cumsum(first, 0) - 1
        new_slot = self._rows + rank
        take = first & (new_slot < self.max_rows)      # full: later newcomers stay with their parent
        self._bound = min(self.max_rows, self._bound + ids.numel())
        self._reserve(self._bound)
        spare = self._entities.numel() - 1
        self._entities.index_put_((torch.where(take, new_slot, spare),), s)
        self.slot_of_entity.index_put_((torch.where(take, s, n_ent),),
                                       torch.where(take, new_slot, -1).to(torch.int32))
        self._rows.add_(take.sum()).clamp_(max=self.max_rows)
        slots = self.slot_of_entity.index_select(0, ids)
        ok = keep & (slots >= 0)
        self._dropped.add_((keep & (slots < 0)).sum())
        dst = torch.where(ok, slots.long(), spare)
        self._grads.index_add_(0, dst, grads.to(torch.float32))
        self._counts.index_add_(0, dst, ok.to(torch.float32))

    def _reserve(self, rows: int) -> None:
        """At least `rows` rows (plus the spare one), growing geometrically up to `max_rows`."""
        have = self._entities.numel() - 1
        if rows <= have:
            return
        size = min(self.max_rows, max(rows, 2 * have, 1024))
        grow = size + 1 - have
        dev = self.device
        self._entities = torch.cat([self._entities[:have], torch.zeros(grow, dtype=torch.long, device=dev)])
        self._grads = torch.cat([self._grads[:have], torch.zeros(grow, self.dim, device=dev)])
        self._counts = torch.cat([self._counts[:have], torch.zeros(grow, device=dev)])

    # ------------------------------------------------------------------ reading
    def rows(self, gather: Callable[[torch.Tensor], torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(entity ids ascending, gradient sums `[n, d]`, interaction counts `[n]`) of the
        window, merged over ranks when `gather` concatenates a tensor's rows from every rank
        (the same result on every rank). Work is O(rows recorded)."""
        n = self.num_rows
        ents, grads, counts = self._entities[:n], self._grads[:n], self._counts[:n]
        if gather is not None:
            packed = torch.cat([ents.to(torch.float64)[:, None], counts.double()[:, None],
                                grads.double()], dim=1)
            packed = gather(packed)
            ents, counts, grads = packed[:, 0].long(), packed[:, 1], packed[:, 2:]
        uniq, inverse = torch.unique(ents, return_inverse=True)
        g = torch.zeros(uniq.numel(), self.dim, dtype=torch.float64, device=ents.device)
        c = torch.zeros(uniq.numel(), dtype=torch.float64, device=ents.device)
        g.index_add_(0, inverse, grads.double())
        c.index_add_(0, inverse, counts.double())
        return uniq, g.float(), c.float()

    def nbytes(self) -> int:
        """Bytes held: the slot map plus the allocated rows."""
        return int(self.slot_of_entity.numel() * 4 + self._entities.numel() * 8
                   + self._grads.numel() * 4 + self._counts.numel() * 4)
