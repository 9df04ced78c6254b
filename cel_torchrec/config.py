"""The library's configuration: `ClusteringConfig`, how one table is clustered. Pure Python (no
torch import), so the trainer's typed config reuses it, field by field, without loading the
stack; `cel_torchrec.modules` re-exports it. Fields with a fixed set of values are annotated
with the `Literal` types of `cel_torchrec.choices`, and a value outside them is refused when the
config is built."""
from __future__ import annotations

import typing
from dataclasses import dataclass, fields

from cel_torchrec.choices import (Bags, GradAverage, MapDtype, SplitCriterion, SplitGradient,
                                  SplitMethod, UnseenPolicy)


def check_choices(cfg: object) -> None:
    """Raise `ValueError` naming the field if a `Literal`-typed field of dataclass `cfg` holds a
    value outside its type."""
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        tp = hints[f.name]
        if typing.get_origin(tp) is typing.Literal and getattr(cfg, f.name) not in typing.get_args(tp):
            raise ValueError(f"{type(cfg).__name__}.{f.name}: {getattr(cfg, f.name)!r} is not one "
                             f"of {', '.join(repr(c) for c in typing.get_args(tp))}")


@dataclass(frozen=True)
class ClusteringConfig:
    """How one table is clustered: budget (`max_clusters` rows), start (`init_clusters`),
    gradient averaging (`batch` | `members` | `none`) and split policy (`split_criterion`: what
    ranks the clusters that split; `split_method`: members divide by the `sign` of their
    projection on the gradients' principal direction, or at its `median`).

    `entity_bias_column`: if set, every entity also owns one unclustered scalar (a per-entity
    bias, counted in `embedding_bytes`) added to that column of its looked-up embedding (for MF,
    the bias column `d`). `unseen_policy`: where reassignment puts entities without training
    data: `stay` (wherever splits left them) or `largest` (the cluster with the most training
    interactions, a sensible default for cold entities) or `pooled` (the cluster with the lowest
    loss on the pooled interactions of all cold entities); entities with fewer than
    `cold_interactions` training interactions are handled like entities without data.
    `entity_bias_decay`: an L2 pull of every per-entity bias toward zero at every step (a
    per-entity ridge, which shrinks rarely seen entities toward their cluster's bias).

    `splits_per_event`: clusters split per event (0: every active cluster with two or more
    members, i.e. the cluster count doubles per event until `max_clusters`). `window_rows`: most
    entities a split window records (None: `max(4096, num_entities // 16)`, at most
    `num_entities`); members it does
    not record stay with their parent. `split_gradient`: what GPCA decomposes per member, the
    gradient `sum` over its interactions (the reference) or its `mean` (every informed member
    weighs the same).

    `bags`: how the features of the table hold their ids. `auto`: a batch whose bags all hold
    one id takes the direct lookup; any other the per-id layout (exact for bags of any length).
    On CPU the bags are read to tell; on an accelerator, where reading them would stall the
    step on a host sync, a feature with as many ids as bags is taken as one-hot unread and the
    collection's `check_inputs()` (run by the phases, and by the trainer when it logs) raises
    if such a batch was not. `multi_hot`: always the per-id layout (for multi-hot features whose
    batches can hold exactly as many ids as bags).
    `map_dtype`: the assignment map's integers. `int32` (4 bytes per entity, the spec's map), or
    `auto`: the narrowest signed type that holds every cluster id of `max_clusters` (int8 up to
    128 clusters, int16 up to 32,768, else int32). Stored so in training and in the serving
    export, and counted so in `embedding_bytes`; lookups widen the batch's ids only."""

    max_clusters: int
    init_clusters: int = 1
    grad_average: GradAverage = "batch"
    split_criterion: SplitCriterion = "interactions"
    split_method: SplitMethod = "sign"
    splits_per_event: int = 1
    entity_bias_column: int | None = None
    unseen_policy: UnseenPolicy = "stay"
    cold_interactions: int = 1
    entity_bias_decay: float = 0.0
    window_rows: int | None = None
    split_gradient: SplitGradient = "sum"
    bags: Bags = "auto"
    map_dtype: MapDtype = "int32"

    def __post_init__(self) -> None:
        check_choices(self)

    def window_rows_for(self, num_entities: int) -> int:
        if self.window_rows is not None:
            return max(1, int(self.window_rows))
        # a window holds at most one row per entity: never more rows than the table has
        return max(1, min(num_entities, max(4096, num_entities // 16)))
