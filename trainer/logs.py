"""Quiet by default: the console shows the run's own lines; third-party logging below ERROR
(TorchRec's planner tables and warnings, FBGEMM's "Successfully loaded" lines, Ray Train's
checkpoint and report chatter) and the library warnings Python's `warnings` module raises there
go only to the run's log file, `RUN_DIR/logs/rank<R>.log`, with everything else logged at INFO
and above. `tracking.verbose=true` lets it all through to the console as well.

`quiet_console` runs first in every worker process (before TorchRec is imported, so its import
time lines are caught and kept for the file); `attach_run_log` then opens the file once the run
directory is known and writes what was held back. Pure Python (no torch import)."""
from __future__ import annotations

import collections
import logging
import pathlib
import sys

THIRD_PARTY = ("torchrec", "fbgemm_gpu", "ray.train", "ray.data", "torch.distributed", "torch.fx")
# loggers that keep their own console handler and do not propagate to the root logger (torch's
# logging setup at import), quieted the same way
OWN_HANDLERS = ("torch",)
_PATHS = tuple(f"/{name.replace('.', '/')}/" for name in THIRD_PARTY)
_filter: "QuietThirdParty | None" = None
_installed = False


class _Held(logging.Handler):
    """The records logged before a run log exists (the newest 10,000)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: collections.deque = collections.deque(maxlen=10_000)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_held: _Held | None = None


def is_third_party(record: logging.LogRecord) -> bool:
    """A record from one of the chatty libraries: by logger name, by the file that logged it
    (FBGEMM logs on the root logger), or a Python warning raised in their code."""
    if record.name.split(".")[0] in {n.split(".")[0] for n in THIRD_PARTY if "." not in n} \
            or record.name.startswith(THIRD_PARTY):
        return True
    where = f"{record.pathname} {record.getMessage()[:300] if record.name == 'py.warnings' else ''}"
    return any(p in where for p in _PATHS)


class QuietThirdParty(logging.Filter):
    """Drops third-party records below ERROR from a console handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not is_third_party(record)


def _console_handlers(root: logging.Logger) -> list[logging.Handler]:
    return [h for h in root.handlers if isinstance(h, logging.StreamHandler)
            and getattr(h, "stream", None) in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)]


def quiet_console(verbose: bool = False) -> None:
    """Quiet this process's console (see the module docstring); idempotent. Without handlers
    (a plain `python` process) a WARNING-level stderr handler stands in for Python's last
    resort, with the filter."""
    global _held, _filter, _installed
    logging.captureWarnings(True)
    root = logging.getLogger()
    if not _installed:
        _installed = True
        _held = _Held()
        root.addHandler(_held)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        if not _console_handlers(root):
            console = logging.StreamHandler(sys.stderr)
            console.setLevel(logging.WARNING)
            root.addHandler(console)
    own = [logging.getLogger(name) for name in OWN_HANDLERS]
    if verbose:
        for h in [*root.handlers, *(h for lg in own for h in lg.handlers)]:
            if _filter is not None:
                h.removeFilter(_filter)
        return
    _filter = _filter or QuietThirdParty()
    for h in [*_console_handlers(root), *(h for lg in own for h in _console_handlers(lg))]:
        h.addFilter(_filter)


def attach_run_log(run_dir: pathlib.Path, rank: int) -> logging.Handler:
    """Open `run_dir/logs/rank<rank>.log` (appended) for every record at INFO and above, with
    what `quiet_console` held back since the process started. Returns the handler, for
    `detach_run_log`."""
    global _held
    path = pathlib.Path(run_dir) / "logs" / f"rank{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    if _held is not None:           # replayed once, into the first run log of the process
        root.removeHandler(_held)
        for record in _held.records:
            handler.handle(record)
        _held = None
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    for name in OWN_HANDLERS:               # their records do not reach the root logger
        if not logging.getLogger(name).propagate:
            logging.getLogger(name).addHandler(handler)
    return handler


def detach_run_log(handler: logging.Handler | None) -> None:
    if handler is not None:
        for name in ("", *OWN_HANDLERS):
            logging.getLogger(name or None).removeHandler(handler)
        handler.close()
