"""Metric logging behind one small protocol: stdout, JSONL and Weights & Biases.

Only rank 0 logs: `build_loggers` hands every other rank a no-op logger. W&B is imported lazily
and runs offline unless `WANDB_API_KEY` is set (offline runs land in `RUN_DIR/wandb/offline-run-*`
and can be uploaded later with `wandb sync`). `read_wandb_offline_run` reads such a run back
(config, history, summary) without the network, for tests and debugging.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import struct
import sys
import time
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class MetricLogger(Protocol):
    """Where metrics go. `log` takes flat dicts of numbers (lists/arrays become histograms
    where the backend supports them)."""

    def log_config(self, config: dict) -> None: ...

    def log(self, metrics: dict, step: int) -> None: ...

    def log_summary(self, summary: dict) -> None: ...

    def close(self) -> None: ...


def to_jsonable(value: Any) -> Any:
    """Plain JSON value: tensors and numpy values unwrapped, non-finite floats -> None."""
    if hasattr(value, "detach"):                                 # torch.Tensor
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 and value.dim() == 0 else value.tolist()
    elif hasattr(value, "tolist") and not isinstance(value, (str, bytes)):   # numpy
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _is_sequence(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return True
    shape = getattr(value, "shape", None)                        # numpy array or tensor
    return shape is not None and len(shape) > 0


def _flatten(values: Any) -> list:
    """Nested lists (a 2-D array's `tolist()`) as one flat list."""
    if isinstance(values, list):
        return [x for v in values for x in _flatten(v)]
    return [values]


# ----------------------------------------------------------------------------- loggers
class NullLogger:
    """Discards everything (ranks other than 0, or `tracking.loggers=[]`)."""

    def log_config(self, config: dict) -> None:
        pass

    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_summary(self, summary: dict) -> None:
        pass

    def close(self) -> None:
        pass


class StdoutLogger:
    """One compact line per call: `[step 50] train_loss=0.4123 epoch=0 ...`, printed around the
    open progress bars (`trainer.progress.console_write`). The console line leaves out what
    metrics.jsonl and W&B keep in full: sequences (histograms), counts (`*_count*`), an MSE
    beside its RMSE, and the item slices (`*_cold_items`, `*_warm_items`) that have the
    `*_cold` / `*_warm` aliases. The summary is not printed: the entry points end with their
    own table of the final metrics."""

    def __init__(self, stream=None):
        self.stream = stream

    @staticmethod
    def _shown(key: str, metrics: dict) -> bool:
        if "_count" in key:
            return False
        if "_mse" in key and key.replace("_mse", "_rmse", 1) in metrics:
            return False
        for side in ("_cold", "_warm"):
            if f"{side}_items" in key and key.replace(f"{side}_items", side, 1) in metrics:
                return False
        return True

    @staticmethod
    def _format(metrics: dict) -> str:
        parts = []
        for key, value in metrics.items():
            value = to_jsonable(value)
            if isinstance(value, (list, dict)) or not StdoutLogger._shown(key, metrics):
                continue
            parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
        return " ".join(parts)

    def _print(self, line: str) -> None:
        from trainer.progress import console_write
        console_write(line, self.stream)

    def log_config(self, config: dict) -> None:
        pass                                   # the trainer prints its own header line

    def log(self, metrics: dict, step: int) -> None:
        self._print(f"[step {step}] {self._format(metrics)}")

    def log_summary(self, summary: dict) -> None:
        pass                                   # the entry points print the final metrics table

    def close(self) -> None:
        pass


class JsonlLogger:
    """`{"step": ..., "time": ..., **metrics}` per line, flushed at once so a crash loses
    nothing. The config and the summary go to `config.json` / `summary.json` beside it."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def _write_json(self, name: str, payload: dict) -> None:
        target = self.path.with_name(name)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(to_jsonable(payload), indent=2, sort_keys=True) + "\n")
        tmp.replace(target)

    def log_config(self, config: dict) -> None:
        self._write_json("config.json", config)

    def log(self, metrics: dict, step: int) -> None:
        record = {"step": int(step), "time": time.time(), **to_jsonable(dict(metrics))}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def log_summary(self, summary: dict) -> None:
        self._write_json("summary.json", summary)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def resolve_wandb_mode(mode: str | None) -> str:
    """Explicit `mode` > `WANDB_MODE` > online when `WANDB_API_KEY` is set > offline."""
    if mode:
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class WandbLogger:
    """A W&B run whose files live under `run_dir` (`run_dir/wandb/...`). Sequence values (e.g.
    `cluster_sizes_<table>`, members per cluster) are logged as `wandb.Histogram`, scalars (e.g.
    `num_clusters_<table>`) as numbers; every row carries `STEP_METRIC`, the training step, which
    `define_metric` makes the x axis of all charts. `log_summary` fills the run summary."""

    STEP_METRIC = "step"

    def __init__(self, project: str, run_dir: str | os.PathLike, config: dict | None = None,
                 mode: str | None = None, name: str | None = None, run_id: str | None = None,
                 resume: str | None = None, settings: dict | None = None):
        import wandb                                             # lazy: optional at import time

        self._wandb = wandb
        self.mode = resolve_wandb_mode(mode)
        run_dir = pathlib.Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, dir=str(run_dir), config=config or {},
                              mode=self.mode, name=name, id=run_id, resume=resume,
                              # console "off": no capture of the run's own console (its
                              # lines are in RUN_DIR/logs); quiet: no 30-line summary; offline,
                              # silent: one line below instead of W&B's three
                              settings=wandb.Settings(**{"console": "off", "quiet": True,
                                                         "silent": self.mode == "offline",
                                                         **(settings or {})}))
        if self.mode == "offline":
            from trainer.progress import console_write
            console_write(f"[tracking] W&B offline run {self.run.settings.sync_dir} "
                          f"(`wandb sync` uploads it)")
        # charts plot over the training step (not W&B's own row counter); histograms included
        self.run.define_metric(self.STEP_METRIC)
        self.run.define_metric("*", step_metric=self.STEP_METRIC)
        self._closed = False
        self._pending: dict = {}             # this step's metrics, merged until the step moves on
        self._pending_step: int | None = None
        self._warned: set[str] = set()

    def _convert(self, metrics: dict) -> dict:
        """Sequences -> `wandb.Histogram` of their finite numbers (an empty one is left out of
        the row with a one-time note on stderr, never logged as a raw list); the rest as plain
        JSON values."""
        out = {}
        for key, value in metrics.items():
            if _is_sequence(value):
                values = [v for v in _flatten(to_jsonable(value))
                          if isinstance(v, (int, float)) and not isinstance(v, bool)]
                if values:
                    out[key] = self._wandb.Histogram(values)
                elif key not in self._warned:
                    self._warned.add(key)
                    print(f"[tracking] W&B: {key} has no finite numbers at this step; left out "
                          "of the row (no histogram)", file=sys.stderr, flush=True)
            else:
                out[key] = to_jsonable(value)
        return out

    def log_config(self, config: dict) -> None:
        self.run.config.update(to_jsonable(config), allow_val_change=True)

    def log(self, metrics: dict, step: int) -> None:
        """Several calls at one step become one history row; the row is committed when a later
        step arrives (or at summary/close), so an explicit summary is never overwritten by a
        history row that W&B would otherwise flush late."""
        step = int(step)
        if self._pending_step is not None and step != self._pending_step:
            self._flush()
        self._pending_step = step
        self._pending.update(self._convert(metrics))

    def _flush(self) -> None:
        if self._pending_step is not None:
            self.run.log({**self._pending, self.STEP_METRIC: self._pending_step},
                         step=self._pending_step, commit=True)
        self._pending, self._pending_step = {}, None

    def log_summary(self, summary: dict) -> None:
        self._flush()
        for key, value in summary.items():
            if not _is_sequence(value):
                self.run.summary[key] = to_jsonable(value)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._flush()
            self.run.finish()


class MultiLogger:
    """Fans every call out to several loggers; `close` closes them all even if one fails."""

    def __init__(self, loggers: list):
        self.loggers = list(loggers)

    def log_config(self, config: dict) -> None:
        for logger in self.loggers:
            logger.log_config(config)

    def log(self, metrics: dict, step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def log_summary(self, summary: dict) -> None:
        for logger in self.loggers:
            logger.log_summary(summary)

    def close(self) -> None:
        errors = []
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as exc:                             # noqa: BLE001 - close the rest
                errors.append(exc)
        if errors:
            raise errors[0]


LOGGER_NAMES = ("stdout", "jsonl", "wandb")


def build_loggers(tracking_cfg, run_dir: str | os.PathLike, config_dict: dict | None,
                  rank: int) -> MetricLogger:
    """The loggers named in `tracking_cfg.loggers` (stdout | jsonl -> RUN_DIR/metrics.jsonl |
    wandb), on rank 0 only; other ranks get a `NullLogger`. A W&B run that fails to start
    (e.g. online without network) is reported on stderr and left out rather than ending the
    training run."""
    if rank != 0:
        return NullLogger()
    unknown = [n for n in tracking_cfg.loggers if n not in LOGGER_NAMES]
    if unknown:
        raise ValueError(f"tracking.loggers: unknown {unknown}; choose from {LOGGER_NAMES}")
    run_dir = pathlib.Path(run_dir)
    loggers: list = []
    for name in tracking_cfg.loggers:
        if name == "stdout":
            loggers.append(StdoutLogger())
        elif name == "jsonl":
            loggers.append(JsonlLogger(run_dir / "metrics.jsonl"))
        elif name == "wandb":
            try:
                loggers.append(WandbLogger(tracking_cfg.wandb_project, run_dir, config_dict,
                                           mode=tracking_cfg.wandb_mode, name=run_dir.name))
            except Exception as exc:                             # noqa: BLE001
                print(f"[tracking] W&B disabled for this run: {type(exc).__name__}: {exc}",
                      file=sys.stderr, flush=True)
    return MultiLogger(loggers)


# ----------------------------------------------------------------------------- reading back
_LOG_BLOCK = 32768
_LOG_HEADER = struct.Struct("<IHB")          # crc32c, length, chunk type (LevelDB log format)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(path: pathlib.Path) -> list[bytes]:
    """Raw records of a `.wandb` transaction log: a 7-byte `:W&B` file header, then LevelDB log
    chunks in 32 KiB blocks (records may span blocks)."""
    buf = path.read_bytes()
    if buf[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log")
    records, pending, pos = [], b"", 7
    while pos + _LOG_HEADER.size <= len(buf):
        left = _LOG_BLOCK - pos % _LOG_BLOCK
        if left < _LOG_HEADER.size:                              # block trailer padding
            pos += left
            continue
        _, length, kind = _LOG_HEADER.unpack_from(buf, pos)
        pos += _LOG_HEADER.size
        data = buf[pos:pos + length]
        pos += length
        if kind == 0 and length == 0:
            pos += _LOG_BLOCK - pos % _LOG_BLOCK if pos % _LOG_BLOCK else 0
            continue
        if kind == _FULL:
            records.append(data)
        elif kind == _FIRST:
            pending = data
        elif kind == _MIDDLE:
            pending += data
        elif kind == _LAST:
            records.append(pending + data)
            pending = b""
    return records


def _set_path(target: dict, item) -> None:
    value = json.loads(item.value_json)
    keys = list(item.nested_key) or [item.key]
    for k in keys[:-1]:
        target = target.setdefault(k, {})
    target[keys[-1]] = value


def read_wandb_offline_run(path: str | os.PathLike) -> dict:
    """Config, history rows, summary, project and name of a W&B run from its `.wandb` file,
    given the file, its `offline-run-*` directory, or a directory containing one `wandb/` run
    (the latest is taken)."""
    from wandb.proto import wandb_internal_pb2                   # lazy

    path = pathlib.Path(path)
    if path.is_dir():
        files = sorted(path.glob("run-*.wandb")) or sorted(path.glob("wandb/*run-*/run-*.wandb"),
                                                           key=lambda p: p.parent.name)
        if not files:
            raise FileNotFoundError(f"no .wandb run file under {path}")
        path = files[-1]
    out: dict = {"config": {}, "history": [], "summary": {}, "project": None, "name": None}
    for data in _wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["project"] = record.run.project
            out["name"] = record.run.display_name
            for item in record.run.config.update:
                _set_path(out["config"], item)
        elif kind == "config":
            for item in record.config.update:
                _set_path(out["config"], item)
            for item in record.config.remove:
                out["config"].pop(item.key, None)
        elif kind == "history":
            row: dict = {}
            for item in record.history.item:
                _set_path(row, item)
            out["history"].append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _set_path(out["summary"], item)
    out["config"].pop("_wandb", None)
    return out
