"""MovieLens ratings -> a prepared dataset. Auto-detects the file format:

ML-100K   u.data        tab-separated user, item, rating, timestamp; no header
ML-1M/10M ratings.dat   `::`-separated, same columns; no header
ML-20M/25M/latest  ratings.csv   comma-separated with header userId,movieId,rating,timestamp

Labels: `label_kind="rating"` (default) keeps the rating; `label_kind="click"` makes a binary
label, 1.0 if rating >= `click_threshold` (default 4) else 0.0, and records label_kind "click"
and the threshold (meta.extra["click_threshold"]).

`drop_ratings` (e.g. `[3]`, the CCE paper's MovieLens protocol): rows with exactly these ratings
are removed first, before ids are compacted and the split is made, so users and items left with
no rows disappear from the vocabularies; recorded as meta.extra["drop_ratings"].
"""
from __future__ import annotations

import os
import pathlib
from typing import Sequence

import numpy as np
import pyarrow as pa

from data_pipeline.dataset import DatasetMeta, check_output
from data_pipeline.errors import DataError
from data_pipeline.sources.common import build_dataset, check_raw, read_delimited, read_header

FORMATS = {"u.data": "ml-100k", "ratings.dat": "ml-1m/10m", "ratings.csv": "ml-20m/25m/latest"}
NAMES = ["user", "item", "rating", "timestamp"]
TYPES = {"user": pa.int64(), "item": pa.int64(), "rating": pa.float64(), "timestamp": pa.int64()}
CSV_HEADER = ["userId", "movieId", "rating", "timestamp"]


def detect(src: str | os.PathLike) -> pathlib.Path:
    """The ratings file of a MovieLens directory (or the file itself), searched one level down."""
    src = pathlib.Path(src)
    if src.is_file():
        if src.name not in FORMATS:
            raise DataError(f"{src}: not a MovieLens ratings file (expected one of "
                            f"{', '.join(FORMATS)})")
        return src
    if not src.is_dir():
        raise DataError(f"{src}: no such file or directory")
    for directory in [src, *sorted(p for p in src.iterdir() if p.is_dir())]:
        for name in FORMATS:
            if (directory / name).is_file():
                return directory / name
    raise DataError(f"{src}: no MovieLens ratings file found (looked for {', '.join(FORMATS)})")


def read_ratings(path: pathlib.Path) -> pa.Table:
    """Columns user, item (int64 raw ids), rating (float64), timestamp (int64), in file order."""
    if path.name == "u.data":
        table = read_delimited(path, delimiter="\t", column_names=NAMES, types=TYPES, header=False)
        header = False
    elif path.name == "ratings.dat":
        data = path.read_bytes().replace(b"::", b"\t")
        table = read_delimited(path, delimiter="\t", column_names=NAMES, types=TYPES, header=False,
                               data=data)
        header = False
    else:
        columns = read_header(path, ",")
        missing = [c for c in CSV_HEADER if c not in columns]
        if missing:
            raise DataError(f"{path}: missing column '{missing[0]}' in header "
                            f"(found: {', '.join(columns)}; expected {', '.join(CSV_HEADER)})")
        names = [NAMES[CSV_HEADER.index(c)] if c in CSV_HEADER else f"_extra{i}"
                 for i, c in enumerate(columns)]
        table = read_delimited(path, delimiter=",", column_names=names, types=TYPES, header=True)
        header = True
    check_raw(table, path, id_columns=("user", "item"), label_column="rating", header=header)
    return table.select(NAMES)


DEFAULT_CLICK_THRESHOLD = 4.0


def prepare_movielens(src: str | os.PathLike, out: str | os.PathLike, *, split: str = "reference",
                      seed: int = 0, ratio: float = 0.8, k: int = 1, cut: int | None = None,
                      cut_quantile: float | None = None, label_kind: str = "rating",
                      click_threshold: float | None = None,
                      drop_ratings: Sequence[float] | None = None,
                      overwrite: bool = False) -> DatasetMeta:
    """Convert a MovieLens ratings file; the default split is the CEL reference split."""
    if label_kind not in ("rating", "click"):
        raise DataError(f"--label-kind must be rating|click, got {label_kind!r}")
    if click_threshold is not None and label_kind != "click":
        raise DataError("--click-threshold applies only with --label-kind click")
    check_output(out, overwrite)
    path = detect(src)
    table = read_ratings(path)
    extra = {}
    if drop_ratings:
        dropped = sorted({float(r) for r in drop_ratings})
        keep = ~np.isin(table.column("rating").to_numpy(), dropped)
        if not keep.any():
            raise DataError(f"{path}: --drop-ratings {','.join(f'{r:g}' for r in dropped)} "
                            f"removes every row")
        table = table.filter(pa.array(keep))
        extra["drop_ratings"] = dropped
    label = table.column("rating").to_numpy()
    if label_kind == "click":
        threshold = float(DEFAULT_CLICK_THRESHOLD if click_threshold is None else click_threshold)
        if not np.isfinite(threshold):
            raise DataError(f"--click-threshold must be finite, got {threshold}")
        label = (label >= threshold).astype(np.float32)
        extra["click_threshold"] = threshold
    return build_dataset(out, user=table.column("user"), item=table.column("item"),
                         label=label, extra=extra or None,
                         timestamp=table.column("timestamp").to_numpy(), label_kind=label_kind,
                         source=f"movielens:{FORMATS[path.name]}:{path}", split=split,
                         split_args=dict(seed=seed, ratio=ratio, k=k, cut=cut,
                                         cut_quantile=cut_quantile), overwrite=overwrite)
