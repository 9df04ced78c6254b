"""PNG plots of benchmark results and of one training run (matplotlib, Agg; no display needed).

    python -m bench.report --plots DIR [--run RUN_DIR]

From bench/results/*.json, one `quality_vs_bytes_<name>.png` per results file that has a quality
metric and a byte count (QUALITY_SOURCES; files not there are skipped with a note). From a run
directory (RUN_DIR, as the trainer prints it): `cluster_count.png` (clusters per table over the
training step, from phases.jsonl and metrics.jsonl), `cluster_sizes.png` (the last logged cluster
size distribution per table, metrics.jsonl), `phase_time.png` (split and reassignment seconds per
epoch, phases.jsonl). Every function returns the path it wrote, or None with a note printed when
its input is missing.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from collections import defaultdict
from typing import Callable, Iterable

DPI = 100
RUN_FILES = ("metrics.jsonl", "phases.jsonl")
RUN_PLOTS = ("cluster_count.png", "cluster_sizes.png", "phase_time.png")
# phases.jsonl names tables as the trainer does (user, item); metrics name them by config key
_METRIC_KEY = {"user": "users", "item": "items"}


class Source:
    """A results file plotted as quality vs bytes: the first metric / byte key its records hold."""

    def __init__(self, name: str, metrics: tuple[str, ...], bytes_keys: tuple[str, ...],
                 label: str, higher_is_better: bool, spread: str | None = None,
                 samples: str | None = None, point_key: str | None = None):
        self.name, self.metrics, self.bytes_keys = name, metrics, bytes_keys
        self.label, self.higher_is_better = label, higher_is_better
        # optional record keys: `spread` an error bar (+-, e.g. the std over seeds), `samples`
        # a list of the values the metric is the mean of (drawn as small dots), `point_key` the
        # text each point is labelled with (default: CEL's cluster counts)
        self.spread, self.samples, self.point_key = spread, samples, point_key


QUALITY_SOURCES = (
    Source("quality_ml100k", ("best_val_rmse", "val_rmse"), ("embedding_bytes",),
           "validation RMSE", False),
    Source("ctr", ("val_auc",), ("embedding_bytes",), "validation AUC", True),
    Source("surprise_peers", ("val_rmse",), ("item_side_bytes", "embedding_bytes"),
           "validation RMSE", False),
    Source("retrieval", ("recall_at_20",), ("item_side_bytes", "embedding_bytes"),
           "recall@20", True),
    Source("compression", ("auc", "val_auc"), ("embedding_bytes", "item_side_bytes"),
           "AUC", True, spread="auc_std", samples="auc_seeds", point_key="budget"),
)


def _say(note: Callable[[str], None] | None, text: str) -> None:
    (note or print)(text)


def _figure(width: float, height: float):
    import matplotlib                                           # lazy: only --plots needs it
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure                        # no pyplot, no global state
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig, path: pathlib.Path, footer: str) -> pathlib.Path:
    fig.text(0.995, 0.002, footer, ha="right", va="bottom", fontsize=7, color="0.4")
    fig.get_layout_engine().set(h_pad=0.12)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _panels(fig, n: int, ncols: int = 2):
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return flat[:n]


def human_bytes(n: float) -> str:
    """20656 -> '20.7 kB' (powers of 1000, as the byte axis reads)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n} B"


def _bytes_axis(ax) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: human_bytes(x)))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _point_label(r: dict, key: str | None = None) -> str | None:
    """CEL points carry their cluster counts ('k=50', 'k=50/u100'); with `key`, every point
    its record's `key` value."""
    if key is not None:
        return None if r.get(key) is None else str(r[key])
    if r.get("item_clusters") is None:
        return None
    return f"k={r['item_clusters']}" + (f"/u{r['user_clusters']}" if r.get("user_clusters") else "")


# ----------------------------------------------------------------------------- quality vs bytes
def quality_vs_bytes(data: dict, source: Source, out_dir: str | pathlib.Path,
                     note: Callable[[str], None] | None = None,
                     origin: str | None = None) -> pathlib.Path | None:
    """One panel per (dataset, model) of a parsed results file (read from `origin`, named in the
    footer): `source`'s metric against the byte count (log x), one line per method."""
    records = data.get("records", [])
    metric = next((m for m in source.metrics if any(r.get(m) is not None for r in records)), None)
    nbytes = next((b for b in source.bytes_keys if any(r.get(b) for r in records)), None)
    if metric is None or nbytes is None:
        _say(note, f"[plots] skipped quality_vs_bytes_{source.name}.png: its records have no "
                   f"{'/'.join(source.metrics)} with {'/'.join(source.bytes_keys)}")
        return None
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r.get(metric) is not None and r.get(nbytes):
            groups[(r.get("dataset"), r.get("model"))].append(r)
    fig = _figure(10, 3.6 * math.ceil(len(groups) / 2) + 0.4)
    for ax, ((dataset, model), rows) in zip(_panels(fig, len(groups)), sorted(groups.items(), key=str)):
        by_method: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            by_method[str(r.get("method", "?"))].append(r)
        for i, (method, pts) in enumerate(by_method.items()):
            pts.sort(key=lambda r: r[nbytes])
            xs, ys = [r[nbytes] for r in pts], [r[metric] for r in pts]
            spread = ([r.get(source.spread) or 0.0 for r in pts]
                      if source.spread and any(r.get(source.spread) is not None for r in pts) else None)
            if spread is not None:
                ax.errorbar(xs, ys, yerr=spread, marker="o", linewidth=1, markersize=5,
                            capsize=3, color=f"C{i}", label=method)
            else:
                ax.plot(xs, ys, marker="o", linewidth=1, markersize=5, color=f"C{i}", label=method)
            if source.samples:
                for r in pts:
                    values = r.get(source.samples) or []
                    ax.plot([r[nbytes]] * len(values), values, linestyle="none", marker=".",
                            markersize=3, color=f"C{i}", alpha=0.5)
            for r in pts:
                if (text := _point_label(r, source.point_key)) is not None:
                    ax.annotate(text, (r[nbytes], r[metric]), textcoords="offset points",
                                xytext=(4, 4), fontsize=7, color="0.3")
        _bytes_axis(ax)
        ax.set_xlabel(f"{nbytes} (bytes, log scale)")
        better = "higher" if source.higher_is_better else "lower"
        ax.set_ylabel(f"{source.label} ({metric}; {better} is better)")
        ax.set_title(" / ".join(str(x) for x in (dataset, model) if x) or source.name, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, title="method", title_fontsize=8)
    bars = (f" (bars: ±{source.spread}" + (f", dots: {source.samples}" if source.samples else "")
            + ")") if source.spread and any(r.get(source.spread) is not None for r in records) else ""
    fig.suptitle(f"{source.name}: {source.label} vs {nbytes.replace('_', ' ')}{bars}")
    where = data.get("device") or data.get("machine", "")
    return _save(fig, pathlib.Path(out_dir) / f"quality_vs_bytes_{source.name}.png",
                 f"{origin or f'bench/results/{source.name}.json'}, "
                 f"commit {data.get('commit', '?')}, {where}")


def quality_plots(results_dir: str | pathlib.Path, out_dir: str | pathlib.Path,
                  names: Iterable[str] | None = None,
                  note: Callable[[str], None] | None = None) -> list[pathlib.Path]:
    """quality_vs_bytes for every QUALITY_SOURCES file in `results_dir` (or only `names`)."""
    wanted = set(names) if names else None
    for name in sorted((wanted or set()) - {s.name for s in QUALITY_SOURCES}):
        _say(note, f"[plots] {name}: no quality-vs-bytes plot for this results file (plotted: "
                   f"{', '.join(s.name for s in QUALITY_SOURCES)})")
    written = []
    for source in QUALITY_SOURCES:
        if wanted is not None and source.name not in wanted:
            continue
        path = pathlib.Path(results_dir) / f"{source.name}.json"
        if not path.is_file():
            _say(note, f"[plots] skipped quality_vs_bytes_{source.name}.png: "
                       f"{os.path.relpath(path)} not found")
            continue
        out = quality_vs_bytes(json.loads(path.read_text()), source, out_dir, note,
                               origin=os.path.relpath(path))
        if out is not None:
            written.append(out)
    return written


# ----------------------------------------------------------------------------- one run
def read_jsonl(path: pathlib.Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_run_dir(path: pathlib.Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in RUN_FILES)


def newest_run(runs_root: str | pathlib.Path) -> pathlib.Path | None:
    """The run directory (holding metrics.jsonl or phases.jsonl) under `runs_root` written last."""
    root = pathlib.Path(runs_root)
    if not root.is_dir():
        return None
    runs = [p for p in root.iterdir() if is_run_dir(p)]
    return max(runs, key=lambda p: max((p / f).stat().st_mtime for f in RUN_FILES
                                       if (p / f).is_file())) if runs else None


def run_commit(run_dir: pathlib.Path) -> str:
    """The training commit the checkpoint recorded (checkpoint/state.pt), else '?'."""
    state = run_dir / "checkpoint" / "state.pt"
    if state.is_file():
        try:
            import torch
            return str(torch.load(state, map_location="cpu", weights_only=True).get("commit") or "?")
        except Exception:                                        # noqa: BLE001 - a footer only
            pass
    return "?"


def _table_key(table: str) -> str:
    return _METRIC_KEY.get(table, table)


def cluster_count(run_dir: pathlib.Path, out_dir: pathlib.Path, footer: str,
                  note: Callable[[str], None] | None = None) -> pathlib.Path | None:
    """Active clusters per table over the training step: a step line through the split and
    reassignment events (phases.jsonl), dots at the logged steps (metrics.jsonl)."""
    phases = read_jsonl(run_dir / "phases.jsonl")
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    events: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for p in phases:
        if p.get("num_clusters") is None:
            continue
        key = _table_key(str(p.get("table")))
        if not events[key] and p.get("kind") == "split" and p.get("splits") is not None:
            events[key].append((0, int(p["num_clusters"]) - int(p["splits"])))   # before it
        events[key].append((int(p["step"]), int(p["num_clusters"])))
    logged: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for m in metrics:
        for k, v in m.items():
            if k.startswith("num_clusters_") and isinstance(v, (int, float)):
                logged[k[len("num_clusters_"):]].append((int(m["step"]), int(v)))
    tables = sorted(set(events) | set(logged))
    if not tables:
        _say(note, f"[plots] skipped cluster_count.png: no num_clusters in {run_dir}/phases.jsonl "
                   "or metrics.jsonl (not a CEL run?)")
        return None
    fig = _figure(8, 4)
    ax = fig.subplots()
    last_step = max(s for pts in (*events.values(), *logged.values()) for s, _ in pts)
    for i, table in enumerate(tables):
        color = f"C{i}"
        pts = sorted(events.get(table, []))
        if pts:
            xs = [s for s, _ in pts] + [last_step]
            ys = [c for _, c in pts] + [pts[-1][1]]
            ax.step(xs, ys, where="post", color=color, label=f"{table} (split/reassign events)")
        if logged.get(table):
            ax.plot(*zip(*sorted(logged[table])), "o", color=color, markersize=4, alpha=0.7,
                    label=f"{table} (logged)")
    from matplotlib.ticker import FuncFormatter
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:,.0f}"))
    ax.set_xlabel("training step")
    ax.set_ylabel("active clusters (log2 scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Cluster count over training: {run_dir.name}")
    return _save(fig, out_dir / "cluster_count.png", footer)


def _gini(sizes: list[int]) -> float:
    xs, n = sorted(sizes), len(sizes)
    total = sum(xs)
    if n == 0 or total == 0:
        return float("nan")
    return sum((2 * (i + 1) - n - 1) * x for i, x in enumerate(xs)) / (n * total)


def cluster_sizes(run_dir: pathlib.Path, out_dir: pathlib.Path, footer: str,
                  note: Callable[[str], None] | None = None) -> pathlib.Path | None:
    """The last logged `cluster_sizes_<table>` of each table: members per cluster, largest
    first (log y when the sizes span more than 100x)."""
    last: dict[str, tuple[int, list[int]]] = {}
    for m in read_jsonl(run_dir / "metrics.jsonl"):
        for k, v in m.items():
            if k.startswith("cluster_sizes_") and isinstance(v, list) and v:
                last[k[len("cluster_sizes_"):]] = (int(m["step"]), [int(x) for x in v])
    if not last:
        _say(note, f"[plots] skipped cluster_sizes.png: no cluster_sizes_<table> in "
                   f"{run_dir}/metrics.jsonl (not a CEL run?)")
        return None
    fig = _figure(10, 3.8 * math.ceil(len(last) / 2) + 0.3)
    for i, (ax, (table, (step, sizes))) in enumerate(zip(_panels(fig, len(last)), sorted(last.items()))):
        sizes = sorted(sizes, reverse=True)
        ax.bar(range(1, len(sizes) + 1), sizes, width=0.85, color=f"C{i}")
        mean = sum(sizes) / len(sizes)
        ax.axhline(mean, color="0.3", linestyle="--", linewidth=1, label=f"mean {mean:.1f}")
        if sizes[-1] > 0 and sizes[0] / sizes[-1] > 100 or sizes[-1] == 0 and sizes[0] > 100:
            ax.set_yscale("symlog", linthresh=1)
        ax.set_xlabel("cluster rank (largest first)")
        ax.set_ylabel("members per cluster (entities)")
        ax.set_title(f"{table}: {len(sizes)} clusters, {sum(sizes):,} entities, "
                     f"gini {_gini(sizes):.2f} (step {step})", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Final cluster-size distribution: {run_dir.name}")
    return _save(fig, out_dir / "cluster_sizes.png", footer)


def phase_time(run_dir: pathlib.Path, out_dir: pathlib.Path, footer: str,
               note: Callable[[str], None] | None = None) -> pathlib.Path | None:
    """Seconds spent in splits and reassignments per epoch, stacked by phase and table."""
    phases = [p for p in read_jsonl(run_dir / "phases.jsonl") if p.get("seconds") is not None]
    if not phases:
        _say(note, f"[plots] skipped phase_time.png: no events in {run_dir}/phases.jsonl "
                   "(not a CEL run, or no split/reassignment happened)")
        return None
    seconds: dict[tuple[str, str], dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for p in phases:
        seconds[(str(p.get("kind")), _table_key(str(p.get("table"))))][int(p.get("epoch", 0))] \
            += float(p["seconds"])
    epochs = sorted({e for per in seconds.values() for e in per})
    fig = _figure(8, 4)
    ax = fig.subplots()
    bottom = [0.0] * len(epochs)
    order = sorted(seconds, key=lambda kt: (kt[0] != "split", kt))
    for i, (kind, table) in enumerate(order):
        ys = [seconds[(kind, table)].get(e, 0.0) for e in epochs]
        ax.bar([str(e) for e in epochs], ys, bottom=bottom, width=0.6, color=f"C{i}",
               label=f"{kind} {table}")
        bottom = [b + y for b, y in zip(bottom, ys)]
    ax.set_xlabel("epoch (as logged, from 0)")
    ax.set_ylabel("wall time (seconds)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Split and reassignment time per epoch: {run_dir.name}")
    return _save(fig, out_dir / "phase_time.png", footer)


def run_plots(run_dir: str | pathlib.Path, out_dir: str | pathlib.Path,
              note: Callable[[str], None] | None = None) -> list[pathlib.Path]:
    """cluster_count, cluster_sizes and phase_time of one run directory (those it has data for)."""
    run_dir, out_dir = pathlib.Path(run_dir), pathlib.Path(out_dir)
    footer = f"run {run_dir}, commit {run_commit(run_dir)}"
    written = [f(run_dir, out_dir, footer, note) for f in (cluster_count, cluster_sizes, phase_time)]
    return [p for p in written if p is not None]


def write_all(out_dir: str | pathlib.Path, results_dir: str | pathlib.Path,
              run_dir: str | pathlib.Path | None, names: Iterable[str] | None = None,
              note: Callable[[str], None] | None = None) -> list[pathlib.Path]:
    written = quality_plots(results_dir, out_dir, names, note)
    if run_dir is not None:
        written += run_plots(run_dir, out_dir, note)
    return written
