"""Ray Train driver: Parquet splits through Ray Data, N TorchTrainer workers, checkpoints and
restarts, progress on the driver, a final metrics table.

    python -m jobs.ray_train --config configs/synthetic_small.yaml              # local Ray
    python -m jobs.ray_train --config configs/x.yaml ray.num_workers=4 ray.gpus_per_worker=1
    python -m jobs.submit --address http://head:8265 --config configs/x.yaml    # as a Ray job

Every worker runs `worker_fn(config: dict, ctx: RayWorkerContext) -> dict`; the default is
`trainer.worker:ray_worker_entry`, imported lazily inside the worker (the trainer never imports
`jobs`: it receives the context object as an argument). Keys read here (nested dict):
`ray.{address, num_workers, cpus_per_worker, gpus_per_worker, max_failures, num_cpus,
storage_path, checkpoints_to_keep, datasets, shuffle_buffer_batches}`, `run.{dir, name, resume}`,
`data.{path, kind, batch_size, reader}`, `dist.backend`, `train.seed`.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import logging
import math
import os
import pathlib
import shutil
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

if TYPE_CHECKING:  # ray and numpy stay lazy: `import jobs.ray_train` must be cheap
    import numpy as np
    import ray.data
    import ray.train

DEFAULT_WORKER = "trainer.worker:ray_worker_entry"
# Ray Train's print patch re-logs every print of a worker whose stdout Ray has wrapped, so each
# line reached the console twice; off, a print is a print (trainer.logs keeps the console quiet)
QUIET_RAY_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# Lines Ray's own processes print for reasons of Ray's own, dropped from the driver's console
# unless --verbose (RAY_DEDUP_LOGS_SKIP_REGEX, read when `ray` is imported; the Ray session's
# log files under /tmp/ray/session_*/logs keep them)
QUIET_RAY_SKIP = (
    r"has constructor arguments in the object store and max_restarts",  # Ray Train's PreemptionWatcher
    r"Progress bars disabled\. To enable",          # ray.data_progress_bars=false (ours draw instead)
    r"Dataset \S+ execution finished in",            # each worker's shard read, every epoch
    r"ExecutionOptions\.exclude_resources|self\.exclude_resources = exclude_resources",  # Ray Train's
)                                                   # DatasetManager on a deprecated Ray Data option
# a local Ray started here runs without the dashboard, so the State API that Ray Train's
# placement-group cleaner polls every few seconds is never there: its warning says only that
QUIET_LOCAL_RAY_SKIP = (r"Failed to query Ray Train Controller actor state",)
RAY_RUN_NAME = "ray_train"          # Ray's own files: RUN_DIR/ray_train/checkpoint_*, state
WorkerFn = Callable[[dict, "RayWorkerContext"], Any]


# ----------------------------------------------------------------------------- config
def get(config: Mapping, dotted: str, default: Any = None) -> Any:
    """`get(cfg, "ray.num_workers", 2)`: a nested lookup that tolerates missing levels."""
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return default if node is None else node


def set_dotted(config: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = config
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value


def load_config_dict(path: str | os.PathLike, overrides: Sequence[str] = ()) -> dict:
    """YAML file -> nested dict, then `a.b.c=value` overrides (values parsed as YAML scalars, so
    `ray.num_workers=2` is an int and `run.resume=true` a bool)."""
    import yaml
    text = pathlib.Path(path).read_text()
    config = yaml.safe_load(text) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        set_dotted(config, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return config


# ----------------------------------------------------------------------------- worker side
@dataclasses.dataclass
class RayWorkerContext:
    """What a worker function gets from Ray Train: its rank, the dataset shards, and a way to
    report metrics + checkpoints. A plain object passed to the trainer (which never imports
    `jobs`); see docs/interfaces.md "## Ray jobs"."""

    rank: int
    world_size: int
    local_rank: int
    dataset_rows: dict[str, int]            # rows in each split before sharding (driver's count)
    shuffle_buffer_batches: int = 4
    seed: int = 0
    _checkpoint_dir: str | None = dataclasses.field(default=None, repr=False)
    _checkpoint_resolved: bool = dataclasses.field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def has_split(self, split: str) -> bool:
        return split in self.dataset_rows

    def num_batches(self, split: str, batch_size: int, drop_last: bool = False) -> int:
        """Batches this rank yields per epoch. Shards are equal (`split` / `streaming_split(equal=
        True)` drops the remainder), so every rank computes the same number without talking."""
        rows = self.dataset_rows[split] // self.world_size
        return rows // batch_size if drop_last else math.ceil(rows / batch_size)

    def iter_batches(self, split: str, batch_size: int, epoch: int = 0, *,
                     shuffle: bool | None = None, drop_last: bool = False
                     ) -> Iterator[dict[str, np.ndarray]]:
        """One epoch of this rank's shard as numpy dicts (`user_id`, `item_id`, `label`, ...;
        schema dtypes, as data_pipeline.local yields). Call once per epoch on every rank; `shuffle` (default: train only) is a local shuffle
        buffer of `shuffle_buffer_batches` batches seeded by (seed, epoch, rank)."""
        import ray.train

        from data_pipeline.ray_data import iter_numpy_batches
        if not self.has_split(split):
            raise KeyError(f"no Ray dataset {split!r} was given to this run "
                           f"(have {sorted(self.dataset_rows)}); see ray.datasets")
        shard = ray.train.get_dataset_shard(split)
        shuffle = (split == "train") if shuffle is None else shuffle
        buffer = batch_size * self.shuffle_buffer_batches if shuffle else None
        seed = (self.seed * 1_000_003 + epoch * 1009 + self.rank) if shuffle else None
        return iter_numpy_batches(shard, batch_size, local_shuffle_seed=seed,
                                  local_shuffle_buffer_size=buffer, drop_last=drop_last)

    def report(self, metrics: Mapping[str, Any], checkpoint_dir: str | os.PathLike | None = None
               ) -> None:
        """Every rank calls this the same number of times (it is a barrier). Rank 0 passes the
        directory it has finished writing; Ray copies it into run storage, and after a worker
        failure `latest_checkpoint_dir()` returns that copy on every rank."""
        import ray.train
        checkpoint = (ray.train.Checkpoint.from_directory(os.fspath(checkpoint_dir))
                      if checkpoint_dir is not None else None)
        ray.train.report(_plain_metrics(metrics), checkpoint=checkpoint)

    def wait_committed(self, timeout_s: float | None = None) -> None:
        """Block until Ray has registered every report so far. A worker that crashes right
        after `report` can otherwise lose that report's checkpoint (seen with Ray 2.60)."""
        import ray.train
        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=timeout_s)

    def latest_checkpoint_dir(self) -> str | None:
        """A local directory holding the last reported checkpoint (None on a fresh start). The
        same on every rank; copied to local disk first when storage is remote."""
        if not self._checkpoint_resolved:
            import ray.train
            checkpoint = ray.train.get_checkpoint()
            self._checkpoint_dir = _local_directory(checkpoint) if checkpoint else None
            self._checkpoint_resolved = True
        return self._checkpoint_dir


def _local_directory(checkpoint: ray.train.Checkpoint) -> str:
    import pyarrow.fs
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem) and os.path.isdir(checkpoint.path):
        return checkpoint.path
    return checkpoint.to_directory()


def _plain_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Tensors and numpy scalars -> Python numbers, so reports serialise cheaply."""
    out = {}
    for key, value in metrics.items():
        if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
            value = value.item()
        out[key] = value
    return out


def ray_context(dataset_rows: Mapping[str, int] | None = None, *, seed: int = 0,
                shuffle_buffer_batches: int = 4) -> RayWorkerContext:
    """The context of the calling Ray Train worker (call inside `train_loop_per_worker`)."""
    import ray.train
    tc = ray.train.get_context()
    return RayWorkerContext(rank=tc.get_world_rank(), world_size=tc.get_world_size(),
                            local_rank=tc.get_local_rank(), dataset_rows=dict(dataset_rows or {}),
                            seed=seed, shuffle_buffer_batches=shuffle_buffer_batches)


def resolve_worker(worker_fn: WorkerFn | str) -> WorkerFn:
    """A callable, or "package.module:function" imported now (inside the worker process)."""
    if callable(worker_fn):
        return worker_fn
    module, _, name = worker_fn.partition(":")
    return getattr(importlib.import_module(module), name)


def _worker_loop(worker_fn: WorkerFn | str, dataset_rows: dict[str, int], config: dict) -> Any:
    """`train_loop_per_worker`: build the context, run the worker; rank 0's return value is the
    run's `Result.return_value`."""
    from trainer.logs import quiet_console      # before the worker imports TorchRec / FBGEMM
    quiet_console(bool(get(config, "tracking.verbose", False)))
    ctx = ray_context(dataset_rows, seed=int(get(config, "train.seed", 0)),
                      shuffle_buffer_batches=int(get(config, "ray.shuffle_buffer_batches", 4)))
    return resolve_worker(worker_fn)(config, ctx)


# ----------------------------------------------------------------------------- driver side
def _progress_callback(report_lines: bool = True):
    """Prints each report (with `report_lines`) and worker failures on the driver (the callback
    runs in Ray's controller actor, whose stdout Ray forwards to the driver)."""
    import ray.train

    class ProgressCallback(ray.train.UserCallback):
        def __init__(self):
            self.reports = 0
            self.started = time.monotonic()

        def after_report(self, run_context, metrics, checkpoint):
            self.reports += 1
            if not report_lines:
                return
            main = metrics[0] if metrics else {}
            shown = "  ".join(f"{k}={_fmt(v)}" for k, v in main.items() if _scalar(v))
            saved = f"  checkpoint={os.path.basename(checkpoint.path)}" if checkpoint else ""
            print(f"[ray_train] report {self.reports} t={time.monotonic() - self.started:.1f}s  "
                  f"{shown}{saved}", flush=True)

        def after_exception(self, run_context, worker_exceptions):
            for rank, exc in sorted(worker_exceptions.items()):
                first = str(exc).strip().splitlines()[:1]
                print(f"[ray_train] worker rank {rank} failed: {type(exc).__name__}: "
                      f"{first[0] if first else ''}", flush=True)

    return ProgressCallback()


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool))


def _fmt(value: Any) -> str:
    return f"{value:.5g}" if isinstance(value, float) else str(value)


def format_metrics_table(metrics: Mapping[str, Any]) -> str:
    """A two-column text table of the scalar metrics, sorted by key."""
    rows = [(k, _fmt(v)) for k, v in sorted(metrics.items()) if _scalar(v)]
    if not rows:
        return "(no metrics)"
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k:<{width}}  {v}" for k, v in rows), line])


def final_metrics(result: ray.train.Result) -> dict:
    """Rank 0's return value when it is a dict, else the last reported metrics."""
    if isinstance(result.return_value, Mapping):
        return dict(result.return_value)
    return dict(result.metrics or {})


def read_split(data_path: str, split: str) -> ray.data.Dataset:
    """One split of a prepared dataset directory as a Ray Dataset (schema checked first); small
    splits are read once and cached in the object store (see MATERIALIZE_MAX_BYTES)."""
    from data_pipeline.ray_data import MATERIALIZE_MAX_BYTES
    from data_pipeline.ray_data import read_split as pipeline_read_split
    return pipeline_read_split(data_path, split, materialize_max_bytes=MATERIALIZE_MAX_BYTES)


def count_split_rows(data_path: str, split: str) -> int:
    """Rows in one split from the Parquet footers (running a Ray dataset just to count costs
    seconds of task start-up on a small machine)."""
    import pyarrow.dataset
    return pyarrow.dataset.dataset(f"{data_path}/{split}", format="parquet").count_rows()


def resolve_data_dir(config: dict) -> str | None:
    """The prepared dataset directory (absolute): `data.path`, or the cached synthetic dataset
    built here once so that workers do not race to build it. None when neither applies."""
    path = get(config, "data.path")
    if path:
        return os.path.abspath(path)
    if get(config, "data.kind") == "synthetic":
        from data_pipeline.synthetic import ensure_synthetic
        params = dict(get(config, "data.synthetic", {}))
        return os.path.abspath(ensure_synthetic(os.path.abspath(get(config, "data.cache_dir",
                                                                    "data/cache")), **params))
    return None


def _absolute_paths(config: dict) -> dict:
    """Workers may run in another working directory (a Ray job's unpacked working_dir), so the
    paths they share with the driver are made absolute here."""
    config = _deep_copy(config)
    for key in ("run.dir", "data.path", "data.cache_dir"):
        value = get(config, key)
        if isinstance(value, str) and value and "://" not in value:
            set_dotted(config, key, os.path.abspath(value))
    return config


def _deep_copy(config: Any) -> Any:
    if isinstance(config, Mapping):
        return {k: _deep_copy(v) for k, v in config.items()}
    if isinstance(config, list):
        return [_deep_copy(v) for v in config]
    return config


def init_ray(config: Mapping) -> bool:
    """Attach to `ray.address` / $RAY_ADDRESS (set inside a Ray job), else start a local Ray
    owned by this process ("local": never silently attach to someone else's `ray start`).
    Returns True when this call started Ray (so the caller shuts it down)."""
    import ray
    if ray.is_initialized():
        return False
    for key, value in QUIET_RAY_ENV.items():     # a local Ray's workers inherit them
        os.environ.setdefault(key, value)
    address = get(config, "ray.address") or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {"address": address, "log_to_driver": True}
    if not get(config, "tracking.verbose", False):     # "Started a local Ray instance." etc.
        kwargs["logging_level"] = logging.WARNING
    if address == "local":
        kwargs.update(include_dashboard=False, num_cpus=get(config, "ray.num_cpus"))
    ray.init(**kwargs)
    return True


def run_ray_training(config: dict, worker_fn: WorkerFn | str = DEFAULT_WORKER, *,
                     datasets: dict[str, ray.data.Dataset] | None = None,
                     storage_path: str | None = None, name: str | None = None,
                     progress: bool = True, report_lines: bool = True) -> ray.train.Result:
    """Train with `ray.num_workers` TorchTrainer workers each running `worker_fn(config, ctx)`.

    `datasets` default: the splits in `ray.datasets` (default ["train"]) read from the prepared
    dataset directory (`resolve_data_dir`); each worker reads its equal shard through
    `ctx.iter_batches`. Checkpoints land in `storage_path/name` (default `ray.storage_path` or
    RUN_DIR = run.dir/run.name, and "ray_train"; on several nodes it must be shared: NFS, s3://); with `run.resume` false a previous run's Ray state there is
    cleared first (Ray would otherwise resume from it). Worker failures restart the whole group
    up to `ray.max_failures` times from the last checkpoint. Raises ray.train.TrainingFailedError
    when the run fails for good. `progress`: print worker failures on the driver, and with
    `report_lines` each report too. Without `tracking.verbose`, Ray Train's and Ray Data's own
    logging below WARNING / ERROR stays in the Ray session's log files."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.ingest import ShardMaterializedDataConfig

    config = _absolute_paths(config)
    started_ray = init_ray(config)
    verbose = bool(get(config, "tracking.verbose", False))
    if not verbose:
        _quiet_ray_data_console()
    try:
        ray.data.DataContext.get_current().enable_progress_bars = bool(
            get(config, "ray.data_progress_bars", False))
        if datasets is None:
            data_dir = resolve_data_dir(config)
            datasets, dataset_rows = {}, {}
            if data_dir is not None:
                if get(config, "data.kind") == "synthetic":
                    set_dotted(config, "data.kind", "path")     # built above; workers just read
                set_dotted(config, "data.path", data_dir)
                for split in get(config, "ray.datasets", ["train"]):
                    datasets[split] = read_split(data_dir, split)
                    dataset_rows[split] = count_split_rows(data_dir, split)
        else:
            dataset_rows = {split: ds.count() for split, ds in datasets.items()}
        if datasets and get(config, "data.reader") is None:
            set_dotted(config, "data.reader", "ray")

        num_workers = int(get(config, "ray.num_workers", 2))
        cpus = float(get(config, "ray.cpus_per_worker", 0.5))
        gpus = float(get(config, "ray.gpus_per_worker", 0))
        resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        run_dir = os.path.join(os.path.abspath(get(config, "run.dir", "runs")),
                               str(get(config, "run.name", "run")))
        storage_path = storage_path or get(config, "ray.storage_path") or run_dir
        if "://" not in storage_path:
            storage_path = os.path.abspath(storage_path)
        name = name or RAY_RUN_NAME
        ray_run_dir = os.path.join(storage_path, name)
        if not get(config, "run.resume", False) and os.path.isdir(ray_run_dir):
            print(f"[ray_train] run.resume=false: clearing the previous Ray state {ray_run_dir}",
                  flush=True)
            shutil.rmtree(ray_run_dir)

        trainer = TorchTrainer(
            functools.partial(_worker_loop, worker_fn, dataset_rows),
            train_loop_config=config,
            torch_config=TorchConfig(backend=_backend(config, gpus > 0)),
            scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=gpus > 0,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=name, storage_path=storage_path,
                failure_config=ray.train.FailureConfig(
                    max_failures=int(get(config, "ray.max_failures", 0))),
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=get(config, "ray.checkpoints_to_keep", 2)),
                callbacks=[_progress_callback(report_lines)] if progress else None,
                logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING")),
            datasets=datasets or None,
            dataset_config=ShardMaterializedDataConfig(datasets_to_split="all").presplit(
                datasets or {}, num_workers),
        )
        print(f"[ray_train] {num_workers} workers x {resources}  datasets "
              f"{dataset_rows or '(none: workers read locally)'}  storage {ray_run_dir}",
              flush=True)
        return trainer.fit()
    finally:
        if started_ray:
            ray.shutdown()


def _quiet_ray_data_console() -> None:
    """Ray Data's console handler on the driver: its records below ERROR go only to its file in
    the Ray session (the policy of trainer.logs for the workers' third-party logging)."""
    import ray.data  # noqa: F401 - installs Ray Data's logging configuration

    from trainer.logs import QuietThirdParty
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                and not any(isinstance(f, QuietThirdParty) for f in handler.filters):
            handler.addFilter(QuietThirdParty())


def quiet_ray_env(config: Mapping, verbose: bool = False) -> dict[str, str]:
    """Environment for a quiet console from a driver that has not imported `ray` yet: the skip
    regex above, and for a local Ray `RAY_AUTH_MODE=token` (what Ray chooses by default, set
    explicitly so that Ray does not warn that it chose it). Nothing with `verbose`."""
    if verbose:
        return {}
    local = (get(config, "ray.address") or os.environ.get("RAY_ADDRESS") or "local") == "local"
    skip = QUIET_RAY_SKIP + (QUIET_LOCAL_RAY_SKIP if local else ())
    env = {"RAY_DEDUP_LOGS_SKIP_REGEX": "|".join(f"(?:{p})" for p in skip)}
    if local:
        env["RAY_AUTH_MODE"] = "token"
    return env


def _backend(config: Mapping, cuda: bool) -> str:
    """The process-group backend, chosen by the trainer's one chooser."""
    from trainer.dist import choose_backend
    return choose_backend(get(config, "dist.backend", "auto"), cuda=cuda)


# ----------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.ray_train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--worker", default=DEFAULT_WORKER,
                        help="worker function as module:function (default %(default)s)")
    parser.add_argument("--verbose", action="store_true",
                        help="third-party logging on the console too (tracking.verbose=true)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (tracking.progress=false)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    if args.verbose:
        args.overrides = [*args.overrides, "tracking.verbose=true"]
    if args.no_progress:
        args.overrides = [*args.overrides, "tracking.progress=false"]
    if not os.path.isfile(args.config):
        print(f"error: config file {args.config} not found", file=sys.stderr)
        return 2
    if args.worker == DEFAULT_WORKER:
        from trainer.config import ConfigError, config_to_dict, load_config
        try:   # validate the whole trainer config here, before any worker starts
            # the driver hands workers Ray Data shards: read them unless the command line says local
            config = config_to_dict(load_config(args.config, ["data.reader=ray", *args.overrides]))
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    else:   # another worker function reads its own keys: pass the YAML through as it is
        config = load_config_dict(args.config, args.overrides)

    for key, value in quiet_ray_env(config, bool(get(config, "tracking.verbose", False))).items():
        os.environ.setdefault(key, value)            # before `ray` is imported
    import ray.train
    try:   # the trainer prints its own line per logged step: no report lines beside them
        result = run_ray_training(config, args.worker, report_lines=args.worker != DEFAULT_WORKER
                                  or bool(get(config, "tracking.verbose", False)))
    except ray.train.TrainingFailedError as exc:
        print(f"[ray_train] FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    metrics = final_metrics(result)
    last = (f"  last checkpoint {os.path.basename(result.checkpoint.path)}"
            if result.checkpoint is not None else "")
    print(f"[ray_train] finished; Ray run dir {result.path}{last}")
    if args.worker == DEFAULT_WORKER:   # the trainer's headline metrics; metrics.json has all
        from trainer.main import HEADLINE
        metrics = {k: metrics[k] for k in HEADLINE if k in metrics} or metrics
    print(format_metrics_table(metrics), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
