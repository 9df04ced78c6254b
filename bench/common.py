"""Shared helpers for benchmarks: results files in the convention of DESIGN.md, tables, memory."""
from __future__ import annotations

import json
import os
import pathlib
import platform
import resource
import time
from typing import Any, Iterable

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    from trainer.checkpointing import code_commit
    return code_commit()


# the commit the benchmark started from (a long benchmark may outlive the HEAD it ran)
COMMIT_AT_START = git_commit()


def machine() -> str:
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus"


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_results(name: str, records: list[dict[str, Any]], directory: pathlib.Path | None = None,
                  **extra: Any) -> pathlib.Path:
    """Write bench/results/<name>.json (or `directory`/<name>.json) as {benchmark, commit,
    machine, records, ...}."""
    directory = RESULTS_DIR if directory is None else pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    payload = {"benchmark": name, "commit": COMMIT_AT_START, "machine": machine(),
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra,
               "records": records}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def print_table(records: Iterable[dict[str, Any]], columns: list[str]) -> str:
    """Print (and return) a Markdown table of the given columns."""
    rows = [[_fmt(r.get(c, "")) for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c)
              for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e3 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
