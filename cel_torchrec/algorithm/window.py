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
        self.slot_of_entity = torch.full((num_entities,), -1, dtype=torch.int32, device=self.device)
        self.in_candidate = torch.zeros(capacity, dtype=torch.bool, device=self.device)
        self.candidates = torch.empty(0, dtype=torch.long, device=self.device)
        self._entities = torch.empty(0, dtype=torch.long, device=self.device)
        self._grads = torch.zeros(0, dim, dtype=torch.float32, device=self.device)
        self._counts = torch.zeros(0, dtype=torch.float32, device=self.device)
        self.num_rows = 0
        self.dropped = 0          # occurrences not recorded because the window was full
        self.is_open = False

    # ------------------------------------------------------------------ lifecycle
    def open(self, candidates: torch.Tensor) -> None:
        """Start recording the members of `candidates` (and forget the previous window)."""
        if self.num_rows:
            self.slot_of_entity.index_fill_(0, self._entities[: self.num_rows], -1)
            self._grads[: self.num_rows].zero_()
            self._counts[: self.num_rows].zero_()
        self.in_candidate.zero_()
        self.candidates = candidates.long().to(self.device)
        self.in_candidate[self.candidates] = True
        self.num_rows = 0
        self.dropped = 0
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
            self.num_rows = n

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
        if not self.is_open or self.candidates.numel() == 0:
            return
        keep = self.in_candidate.index_select(0, cluster_ids.long())
        ids = entity_ids.long()[keep]
        if ids.numel() == 0:
            return
        g = grads[keep]
        slots = self.slot_of_entity.index_select(0, ids)
        new = ids[slots < 0]
        if new.numel():
            new = torch.unique(new)
            room = self.max_rows - self.num_rows
            if new.numel() > room:           # full: later newcomers stay with their parent
                new = new[:room]
            k = int(new.numel())
            if k:
                self._reserve(self.num_rows + k)
                self._entities[self.num_rows:self.num_rows + k] = new
                self.slot_of_entity[new] = torch.arange(self.num_rows, self.num_rows + k,
                                                        dtype=torch.int32, device=self.device)
                self.num_rows += k
            slots = self.slot_of_entity.index_select(0, ids)
        ok = slots >= 0
        if not bool(ok.all()):
            self.dropped += int((~ok).sum())
            slots, g = slots[ok], g[ok]
        slots = slots.long()
        self._grads.index_add_(0, slots, g.to(torch.float32))
        self._counts.index_add_(0, slots, torch.ones(slots.numel(), device=self.device))

    def _reserve(self, rows: int) -> None:
        if rows <= self._entities.numel():
            return
        size = min(self.max_rows, max(rows, 2 * self._entities.numel(), 1024))
        grow = size - self._entities.numel()
        dev = self.device
        self._entities = torch.cat([self._entities, torch.zeros(grow, dtype=torch.long, device=dev)])
        self._grads = torch.cat([self._grads, torch.zeros(grow, self.dim, device=dev)])
        self._counts = torch.cat([self._counts, torch.zeros(grow, device=dev)])

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
