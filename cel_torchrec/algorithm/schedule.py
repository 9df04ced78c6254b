"""When cluster operations run: (step or epoch) -> which of split / reassign happen now."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

SPLIT = "split"
REASSIGN = "reassign"


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    f = 2
    while f * f <= n:
        if n % f == 0:
            return False
        f += 1
    return True


def reference_reassign_points(period: int, until: int) -> list[int]:
    """The reference's reassignment points `period*n - 1` for n = 1 or prime, below `until`
    (period 40, until 800: 39, 79, 119, 199, 279, 439, 519, 679, 759)."""
    return [period * n - 1 for n in range(1, until // period + 2)
            if (n == 1 or _is_prime(n)) and period * n - 1 < until]


@dataclass(frozen=True)
class ClusterSchedule:
    """Split every `split_interval` units (at `t % split_interval == 0`, `t > 0`) while
    `t < split_until`; reassign at `reassign_at` (explicit points) or, by rule `reference`,
    at `reassign_period * n - 1` for n = 1 or prime below `split_until`; `every`: at every
    multiple of `reassign_period` minus one; `none`: never. `unit` says whether `t` counts
    optimizer steps or finished epochs. Past `freeze_after` nothing runs (fine-tuning phase)."""

    split_interval: int = 10
    split_until: int = 800
    reassign_rule: str = "reference"
    reassign_period: int = 40
    reassign_at: tuple[int, ...] | None = None
    unit: str = "step"
    freeze_after: int | None = None
    _reassign_points: frozenset = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.split_interval <= 0:
            raise ValueError("split_interval must be positive")
        if self.unit not in ("step", "epoch"):
            raise ValueError(f"unit must be 'step' or 'epoch', got {self.unit!r}")
        if self.reassign_at is not None:
            points = set(self.reassign_at)
        elif self.reassign_rule == "reference":
            points = set(reference_reassign_points(self.reassign_period, self.split_until))
        elif self.reassign_rule == "every":
            if self.reassign_period <= 0:
                raise ValueError("reassign_period must be positive")
            points = set()      # arithmetic (see _is_reassign): O(1) memory for any split_until
        elif self.reassign_rule == "none":
            points = set()
        else:
            raise ValueError(f"reassign_rule must be reference|every|none, got {self.reassign_rule!r}")
        object.__setattr__(self, "_reassign_points", frozenset(points))

    @classmethod
    def reference(cls) -> "ClusterSchedule":
        """The authors' ML-100K schedule: split every 10 steps until 800, reference reassigns."""
        return cls(split_interval=10, split_until=800, reassign_rule="reference", reassign_period=40)

    def actions(self, t: int) -> frozenset[str]:
        """Operations due at time `t` (a step index, or an epoch index when unit == 'epoch')."""
        if self.freeze_after is not None and t >= self.freeze_after:
            return frozenset()
        ops = set()
        if 0 < t < self.split_until and t % self.split_interval == 0:
            ops.add(SPLIT)
        if self._is_reassign(t):
            ops.add(REASSIGN)
        return frozenset(ops)

    def _is_every(self) -> bool:
        return self.reassign_at is None and self.reassign_rule == "every"

    def _is_reassign(self, t: int) -> bool:
        if self._is_every():
            return 0 <= t < self.split_until and (t + 1) % self.reassign_period == 0
        return t in self._reassign_points

    @property
    def reassign_points(self) -> list[int]:
        """Every reassignment point (for rule `every` this list is split_until/period long)."""
        if self._is_every():
            return list(range(self.reassign_period - 1, self.split_until, self.reassign_period))
        return sorted(self._reassign_points)

    def last_point(self) -> int:
        """Last time at which any operation may run."""
        last_split = ((self.split_until - 1) // self.split_interval) * self.split_interval
        if self._is_every():
            n = self.split_until // self.reassign_period      # points p*k-1 < until
            return max(last_split, self.reassign_period * n - 1) if n > 0 else last_split
        return max([last_split, *self._reassign_points])


def coverage_window_steps(state, candidates, coverage: float, global_batch: int,
                          max_steps: int | None = None) -> int:
    """Training steps a split window stays open so that its candidates' members are seen
    `coverage` times on average: `coverage * members / (share * global_batch)`, where `share` is
    the candidates' share of the interactions counted so far (their share of the members before
    any were counted). Expressed in data, not steps, the same `coverage` behaves alike at 1e3
    and 1e7 entities; `max_steps` caps it (e.g. one epoch). `state` is a `ClusterState`; the
    cost is O(capacity)."""
    if coverage <= 0:
        raise ValueError(f"coverage must be positive, got {coverage}")
    cands = candidates.long()
    if cands.numel() == 0:
        return 1
    members = float(state.member_counts()[cands].sum())
    inter = state.interaction_counts()
    total = float(inter.sum())
    share = float(inter[cands].sum()) / total if total > 0 else members / state.num_entities
    share = max(share, members / state.num_entities * 1e-3, 1e-12)
    steps = math.ceil(coverage * members / (share * max(global_batch, 1)))
    steps = max(steps, 1)
    return min(steps, max_steps) if max_steps else steps
