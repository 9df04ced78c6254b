"""Typed training configuration: nested dataclasses loaded from YAML plus dotted `key=value`
overrides (`train.lr=0.01 cel.items.max_clusters=50 model.hidden=[128,64]`).

Values are parsed with `yaml.safe_load` and checked against the dataclass field types; an unknown
key or a wrong type raises `ConfigError` (a `ValueError`) naming the dotted key. Fields with a
fixed set of values are `Literal` types (the library's from `cel_torchrec.choices`) and are
checked too. Partial sections merge into the defaults, so a YAML file only states what
differs.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

import yaml

from cel_torchrec.choices import BatchScope, LiteScoring, ReassignMode, ShardingType
from cel_torchrec.config import ClusteringConfig as LibraryClusteringConfig


class ConfigError(ValueError):
    """An invalid config: unknown key, wrong type or value outside its choices."""


# ----------------------------------------------------------------------------- schema
@dataclass
class SyntheticConfig:
    """Parameters of the planted-cluster synthetic dataset (built on first use, cached)."""

    users: int = 2000
    items: int = 1000
    interactions: int = 100_000
    clusters: int = 8
    seed: int = 0
    label: Literal["rating", "click"] = "rating"


@dataclass
class SyntheticCtrConfig:
    """Parameters of the Criteo-like synthetic click dataset of `data.kind: synthetic_ctr`
    (`data_pipeline.synthetic_ctr`, built on first use, cached): `rows` rows, `dense` dense and
    `categorical` categorical features whose vocabularies spread from `vocab_min` to
    `vocab_max` values, and a click model planted over `clusters` clusters per feature."""

    rows: int = 200_000
    vocab_max: int = 20_000
    vocab_min: int = 10
    categorical: int = 26
    dense: int = 13
    clusters: int = 16
    seed: int = 0


@dataclass
class DataConfig:
    """Where the data comes from and how it is batched. Entities with fewer than
    `cold_threshold` training interactions count as cold in the sliced metrics."""

    kind: Literal["synthetic", "synthetic_ctr", "path"] = "synthetic"
    path: str | None = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    synthetic_ctr: SyntheticCtrConfig = field(default_factory=SyntheticCtrConfig)
    cache_dir: str = "data/cache"
    batch_size: int = 1024
    eval_batch_size: int = 8192
    reader: Literal["local", "ray"] = "local"
    cold_threshold: int = 5


@dataclass
class ModelConfig:
    """The interaction model on top of the embeddings. `embedding_dim` is the latent width d;
    the embedding tables may be wider (see `trainer.models.embedding_dim_for`)."""

    name: Literal["mf", "neumf", "two_tower", "dlrm", "deepfm", "gmf"] = "mf"
    embedding_dim: int = 32
    hidden: list[int] = field(default_factory=lambda: [64, 32])
    # dlrm: the dense arch's hidden widths (its last layer is embedding_dim)
    dense_hidden: list[int] = field(default_factory=lambda: [64])
    dropout: float = 0.0
    init_std: float = 0.1


@dataclass
class EmbeddingConfig:
    """Which entity embedding collection: CEL or a baseline. Per-feature budgets of the
    baselines are keyed `users` / `items`."""

    method: Literal["cel", "full", "hash", "qr", "sparse", "cce", "cerp"] = "cel"
    hash_buckets: dict[str, int] = field(default_factory=dict)
    qr_collisions: dict[str, int] = field(default_factory=dict)
    # > 0: every table with at least `min_cardinality` rows is compressed by `method` to about
    # 1/compression of its full bytes (the total budget split by cardinality; CEL: clusters
    # after its int32 map, hash: buckets, QR: collisions), the `cel.items` settings serving
    # every clustered table; smaller tables stay full. 0: the per-table settings above and
    # `cel.users` / `cel.items`
    compression: float = 0.0
    min_cardinality: int = 1000
    # sparse | cce | cerp (`cel_torchrec.modules.compact`; sized by `compression` only).
    # cce: column chunks (halved until two tables of >= 1 row fit the budget next to the int32
    # maps) and the fraction of training its per-epoch k-means runs in (the paper's 75%)
    cce_chunks: int = 4
    cce_until: float = 0.75
    # cerp: meta tables before pruning, in multiples of the budget's rows; the weight of the
    # regulariser that makes an id's two meta rows' non-zeros complementary
    cerp_dense_factor: float = 2.0
    cerp_reg: float = 1e-3


@dataclass(frozen=True)
class ClusteringConfig(LibraryClusteringConfig):
    """How one table (`cel.users` / `cel.items`) is clustered: the library's
    `cel_torchrec.config.ClusteringConfig`, whose fields (defaults, choices, meaning) are declared
    there only and are keys here, plus the trainer's two switches below. The library's
    `entity_bias_column` is no key (it stays None here): the builder derives it from
    `entity_bias` (`trainer.builders.library_clustering`)."""

    not_keys: ClassVar[tuple[str, ...]] = ("entity_bias_column",)

    enabled: bool = False
    # MF only: one unclustered scalar bias per entity (counted in embedding bytes), in the
    # bias column d; entity_bias_decay pulls it toward zero
    entity_bias: bool = False


@dataclass
class CelConfig:
    """Per-table clustering plus the split/reassignment schedule (see
    `cel_torchrec.algorithm.ClusterSchedule`): split every `split_interval` units while below
    `split_until`; reassign at `reassign_at`, or by `reassign_rule` (`reference`: at
    `reassign_period * n - 1` for n = 1 or prime; `every`: every `reassign_period`; `none`)."""

    items: ClusteringConfig = field(
        default_factory=lambda: ClusteringConfig(enabled=True, max_clusters=50))
    users: ClusteringConfig = field(
        default_factory=lambda: ClusteringConfig(enabled=False, max_clusters=50))
    split_interval: int = 10
    split_until: int = 800
    reassign_at: list[int] | None = None
    reassign_rule: Literal["reference", "every", "none"] = "reference"
    reassign_period: int = 40
    # > 0 (with interval_unit=step): reassign this many times per epoch, whatever the dataset
    # size (reassign_period becomes steps_per_epoch / this, rule `every`); None: reassign_period
    reassign_per_epoch: float | None = None
    interval_unit: Literal["step", "epoch"] = "step"
    reassign_keep_prob: float = 0.31
    # an entity moves only if its loss falls by more than this many times the mean training
    # loss per interaction (0: any improvement, the reference's argmin)
    reassign_min_gain: float = 0.0
    # > 0: a split window closes when its candidates' members have been seen this many times
    # on average (in data, so alike at any table size; capped at one epoch), instead of every
    # `split_interval` steps. splits_per_event 0 then doubles the clusters per event.
    split_coverage: float = 0.0
    # reassignment: exact (every entity with data x every cluster, streamed over cluster blocks
    # in O(entities) memory, one pass over the training data per block), lite (CEL-Lite: the
    # entities seen since the last reassignment, each over its cluster + the `lite_k` clusters
    # nearest its one-step desired embedding, scored on those recent interactions, at most
    # `lite_buffer_samples` of them), or auto: exact while entities x max_clusters <= 2^25
    # (one pass, <= 256 MiB of float64 losses), else lite
    reassign_mode: Literal["auto", ReassignMode] = "auto"
    lite_k: int = 8
    # how Lite scores a candidate on a recent interaction: exact (the model's own loss with the
    # row moved: one forward of batch x (lite_k + 1) rows per batch and feature for models
    # without a linear form) or linearised (the loss of the model's first-order expansion in the
    # moved row, from the first pass's gradients: no second forward; the same for linear models).
    # Default linearised: on synth-ctr (1e6 rows) and binary ML-100K, DLRM and DeepFM, the AUCs
    # of the two agree within 0.0023 either way and Lite runs 20-35x faster
    # (bench/results/ctr.json)
    lite_scoring: LiteScoring = "linearised"
    lite_buffer_samples: int = 1 << 21
    freeze_after: int | None = None
    # synthetic data only: start every clustered table from the planted clusters (num_active =
    # their count, needs max_clusters >= it); with reassign_rule=none and split_until=0 nothing
    # moves, an oracle whose RMSE is the floor learned clusters should approach
    init_from_planted: bool = False


@dataclass
class OptimConfig:
    """Optimisation. `l2` is an explicit penalty on the looked-up embeddings (mean over the
    batch of squared norms); `weight_decay` goes to the optimizer."""

    epochs: int = 10
    max_steps: int | None = None
    lr: float = 0.01
    optimizer: Literal["adam", "adagrad", "sgd"] = "adam"
    weight_decay: float = 0.0
    l2: float = 0.0
    seed: int = 0
    eval_every_steps: int | None = None
    # bpr / softmax: retrieval on implicit feedback (every row with label > 0 a positive;
    # trainer.retrieval): BPR over `negatives` uniform negatives per positive, or sampled
    # softmax over the batch's other items; evaluated by recall@K / NDCG@K over the catalogue
    loss: Literal["mse", "bce", "bpr", "softmax"] = "mse"
    negatives: int = 1
    # ranking metrics: at most this many of the split's users (a fixed random sample; 0: all)
    ranking_eval_users: int = 20000
    # intra-op threads per process (0: torch's default). One by default: the ops are small, and
    # on a shared 2-core machine OpenMP's spinning threads made steps ~10x slower.
    num_threads: int = 1
    # tables on FBGEMM's fused kernels + fused optimizer (sharded by DMP, 1 rank for a single
    # process: a step touches only the batch's rows) instead of a torch optimizer over every
    # row: auto (whenever possible), on (or fail saying why not), off (one process only).
    # YAML reads on/off as true/false; both spellings work. See trainer.tables.
    fused_tables: Literal["auto", "on", "off", True, False] = "auto"


@dataclass
class RunConfig:
    """Run directory `dir/name` (name defaults to a timestamp), checkpoints and resumption."""

    dir: str = "runs"
    name: str | None = None
    checkpoint_every_steps: int | None = None
    resume: bool = True


@dataclass
class DistConfig:
    """Process-group backend (`auto` or `nccl` on GPUs: `cpu:gloo,cuda:nccl`, i.e. nccl for CUDA
    tensors and gloo for host-side ones; `auto` on CPU: gloo), the table sharding type, and for
    `grad_average: batch` tables where the distinct members are counted: in the `global` batch
    (exact, one all-gather per step) or in each rank's `local` batch (no communication)."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    sharding: ShardingType = "table_wise"
    batch_scope: BatchScope = "global"


@dataclass
class RayConfig:
    """Ray Train resources (fractional CPUs keep Ray Data from starving on small machines) and
    what the Ray driver (`jobs.ray_train`) reads; the workers ignore these keys."""

    num_workers: int = 2
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    max_failures: int = 0
    # a running cluster's address (None: $RAY_ADDRESS, else a local Ray started by the driver)
    address: str | None = None
    # CPUs of the local Ray the driver starts (None: Ray counts the machine's)
    num_cpus: float | None = None
    # where Ray Train keeps results and checkpoints (None: run.dir/run.name); may be a URI
    storage_path: str | None = None
    checkpoints_to_keep: int = 2
    # splits streamed through Ray Data (the others are read locally by the workers)
    datasets: list[str] = field(default_factory=lambda: ["train"])
    # batches each worker's Ray Data shuffle buffer holds
    shuffle_buffer_batches: int = 4
    # Ray Data's own progress bars on the driver (off: one line per epoch instead)
    data_progress_bars: bool = False


@dataclass
class TrackingConfig:
    """Metric loggers (rank 0 only). `wandb_mode` None: online if WANDB_API_KEY is set (or
    WANDB_MODE says otherwise), else offline files that `wandb sync` can upload later."""

    loggers: list[str] = field(default_factory=lambda: ["stdout", "jsonl", "wandb"])
    wandb_project: str = "cel-torchrec"
    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    log_every_steps: int = 50
    # third-party logging below ERROR (TorchRec's planner, FBGEMM, Ray Train) on the console
    # too, not only in RUN_DIR/logs/rank<R>.log (`--verbose` sets it); see trainer.logs
    verbose: bool = False
    # progress bars (rank 0) for epochs, evaluation and reassignment passes; see trainer.progress
    progress: bool = True


@dataclass
class TrainConfig:
    """The whole configuration of one training run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    cel: CelConfig = field(default_factory=CelConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @classmethod
    def from_dict(cls, d: dict | None) -> "TrainConfig":
        """Defaults updated by the (possibly partial, nested) dict `d`, type-checked."""
        return _merge(cls(), d or {}, "")


# ----------------------------------------------------------------------------- public API
def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults <- YAML file at `path` (if any) <- `key=value` overrides, in that order."""
    data: Any = {}
    if path is not None:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    cfg = TrainConfig.from_dict(data)
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: TrainConfig, overrides: list[str] | tuple[str, ...]) -> TrainConfig:
    """A new config with each `a.b.c=value` applied (value parsed as YAML). A dotted key may
    reach into a dict field (`embedding.hash_buckets.items=1000`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=0.01)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: cannot parse {raw!r} as YAML: {exc}") from None
        cfg = _merge(cfg, _nest(cfg, key.split("."), value, ""), "")
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict (JSON/YAML-serialisable) of a config, for logging and checkpoints:
    `dataclasses.asdict` over the config keys (a section's `not_keys` are left out)."""
    return _plain(cfg)


# ----------------------------------------------------------------------------- internals
def _keys(section: Any) -> list[dataclasses.Field]:
    """The fields of a section (dataclass or instance) that are config keys: all but the
    names in its `not_keys` (fields it inherits from the library but derives, never reads)."""
    hidden = getattr(section, "not_keys", ())
    return [f for f in dataclasses.fields(section) if f.name not in hidden]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in _keys(value)}
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return copy.deepcopy(value)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _nest(cfg: Any, parts: list[str], value: Any, prefix: str) -> dict:
    """`["a", "b"], v` -> `{"a": {"b": v}}`, validating the path on the way; an override
    that reaches into a dict field merges into that dict's current value."""
    head, rest = parts[0], parts[1:]
    where = prefix.rstrip(".") or "the top level"
    if not dataclasses.is_dataclass(cfg):
        raise ConfigError(f"cannot set {prefix + head!r}: {where} is a "
                          f"{type(cfg).__name__}, not a section")
    names = [f.name for f in _keys(cfg)]
    if head not in names:
        raise ConfigError(f"unknown key {prefix + head!r}; valid keys at {where}: "
                          f"{', '.join(names)}")
    if not rest:
        return {head: value}
    current = getattr(cfg, head)
    if isinstance(current, dict):
        merged = dict(current)
        merged_value = merged
        for p in rest[:-1]:
            merged_value = merged_value.setdefault(p, {})
            if not isinstance(merged_value, dict):
                raise ConfigError(f"cannot set a key inside the non-mapping value at {p!r}")
        merged_value[rest[-1]] = value
        return {head: merged}
    return {head: _nest(current, rest, value, f"{prefix}{head}.")}


def _merge(base: Any, data: Any, prefix: str) -> Any:
    """`base` (a dataclass instance) with the keys of mapping `data` replaced, recursively."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in _keys(base)}
    hints = _hints(type(base))
    updates = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown key {dotted!r}; valid keys at {where}: "
                              f"{', '.join(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            updates[key] = _merge(getattr(base, key), value if value is not None else {},
                                  dotted + ".")
        else:
            updates[key] = _coerce(value, tp, dotted)
    return dataclasses.replace(base, **updates)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` checked (and minimally converted) against type annotation `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(errors) == 1:               # `X | None`: X's own message (e.g. its choices)
            raise ConfigError(errors[0])
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        # equal and of the same type: True does not stand for 1, nor 1 for True
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(c) for c in args)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list ({_type_name(tp)}), got "
                              f"{type(value).__name__} {value!r}")
        (item_tp,) = args or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping ({_type_name(tp)}), got "
                              f"{type(value).__name__} {value!r}")
        key_tp, val_tp = args or (Any, Any)
        return {_coerce(k, key_tp, f"{key} (key)"): _coerce(v, val_tp, f"{key}.{k}")
                for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _as_float(value)          # 1e5 / "1e5" / 100000.0 -> 100000
        if number is not None and math.isfinite(number) and number == int(number):
            return int(number)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        number = _as_float(value)          # YAML 1.1 reads `1e-3` as a string
        if number is not None:
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)              # e.g. run.name=2024
    else:
        raise ConfigError(f"{key}: unsupported field type {tp!r}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None
