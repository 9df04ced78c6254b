"""Progress bars for the trainer's long loops (epochs, evaluation, reassignment passes).

`progress(iterable, desc=...)` yields the iterable's items unchanged; on rank 0, when enabled
(`tracking.progress`), it also draws a bar:

* in a plain process (`python -m trainer.main`, torchrun): a tqdm bar on stderr, transient
  (leave=False: it clears itself when its loop ends) and always on one console line (nested
  loops share position 0, so a pipe or log file never gets extra newlines from it). Lines
  printed through `console_write` (the stdout metric logger does) go around the bar
  (`tqdm.write`), so they appear once and whole.
* in a Ray Train worker: one `ray.experimental.tqdm_ray` bar per process, which Ray renders on
  the driver. It is reused by every loop (a nested loop takes it over and hands it back), so
  the driver's console gets no line per epoch or pass; `close_progress()` (at the end of the
  run) leaves its last state as the single line it adds. The driver hides the bars while it
  prints the workers' lines.

Other ranks get the plain iterable. Pure Python: tqdm and Ray are imported only when a bar is
drawn.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Iterator

_open_bars = 0                       # plain tqdm bars open in this process
_ray_bar: Any = None                 # this process's tqdm_ray bar, once one was drawn
_ray_stack: list[list] = []          # [desc, total, n] of the loops using it, innermost last


def _env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def in_ray_worker() -> bool:
    """True inside a Ray worker process (a task or actor, e.g. a Ray Train worker)."""
    if "ray" not in sys.modules:
        return False
    try:
        import ray
        worker = ray._private.worker.global_worker
        return ray.is_initialized() and worker.mode == ray.WORKER_MODE
    except Exception:                                            # noqa: BLE001 - no Ray: plain
        return False


def _describe(desc: str, postfix: dict) -> str:
    return " ".join([desc, *(f"{k}={v}" for k, v in postfix.items())])


def progress(iterable: Iterable, *, desc: str, total: int | None = None, enabled: bool = True,
             unit: str = "batch", rank: int | None = None, ray: bool | None = None,
             file: Any = None, **postfix: Any) -> Iterable:
    """`iterable`, with a progress bar on rank 0 when `enabled` (see the module docstring).
    `rank` defaults to $RANK (0 when unset); `ray` (render through tqdm_ray on the driver)
    defaults to whether this is a Ray worker process; `file` is the plain bar's stream
    (default stderr); `postfix` items are shown after the bar (`k=v`)."""
    if not enabled or (_env_rank() if rank is None else rank) != 0:
        return iterable
    if total is None:
        try:
            total = len(iterable)                                # type: ignore[arg-type]
        except (TypeError, AttributeError):
            total = None
    if in_ray_worker() if ray is None else ray:
        return _ray_iter(iterable, _describe(desc, postfix), total, unit)
    return _plain_iter(iterable, desc, total, unit, file, postfix)


def _plain_iter(iterable, desc, total, unit, file, postfix) -> Iterator:
    global _open_bars
    from tqdm import tqdm
    bar = tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, position=0,
               dynamic_ncols=True, mininterval=0.5, file=file if file is not None else sys.stderr)
    if postfix:
        bar.set_postfix(postfix, refresh=False)
    _open_bars += 1
    try:
        yield from bar
    finally:
        _open_bars -= 1
        bar.close()


def _ray_tqdm(desc: str, total: int | None, unit: str):
    from ray.experimental.tqdm_ray import tqdm
    return tqdm(desc=desc, total=total, unit=unit, position=0)


def _ray_iter(iterable, desc, total, unit) -> Iterator:
    global _ray_bar
    if _ray_bar is None:
        _ray_bar = _ray_tqdm(desc, total, unit)
    bar = _ray_bar
    state = [desc, total, 0]
    _ray_stack.append(state)
    bar.total, bar.n = total, 0
    bar.set_description(desc)
    try:
        for item in iterable:
            state[2] += 1
            bar.update(1)
            yield item
    finally:
        _ray_stack.remove(state)
        if _ray_stack:                                           # hand the bar back
            outer_desc, bar.total, bar.n = _ray_stack[-1]
            bar.set_description(outer_desc)


def close_progress(desc: str | None = None, total: int | None = None) -> None:
    """Close this process's Ray-rendered bar (once its run is over; no-op without one). The
    driver keeps its last state as a line: `desc` and `total` (e.g. the run's steps, shown as
    complete) say what that line shows instead of whichever loop ran last."""
    global _ray_bar
    if _ray_bar is not None:
        bar, _ray_bar = _ray_bar, None
        _ray_stack.clear()
        if desc is not None:
            bar.total, bar.n = total, total or 0
            bar.set_description(desc)
        bar.close()


def console_write(line: str, file: Any = None) -> None:
    """Print a line (default stdout); around the open progress bars when there are any."""
    stream = file if file is not None else sys.stdout
    if _open_bars:
        from tqdm import tqdm
        tqdm.write(line, file=stream)
        stream.flush()
    else:
        print(line, file=stream, flush=True)
