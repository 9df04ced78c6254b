"""Any delimited interaction file -> a prepared dataset, through a column map.

The map names the file's column for each role: user, item, label (required), timestamp
(optional: row order is used when absent), sparse_<name> and dense_<name> (optional extra
features). Without a header line, columns are named by 0-based position ("0", "1", ...).
Ids are integers by default (`id_type="string"` accepts any token); sparse features are
always compacted as strings.
"""
from __future__ import annotations

import os
import pathlib
from typing import Mapping

import numpy as np
import pyarrow as pa

from data_pipeline import schema
from data_pipeline.dataset import DatasetMeta, check_output
from data_pipeline.errors import DataError
from data_pipeline.sources.common import build_dataset, check_raw, read_delimited, read_header

ROLES = ("user", "item", "label", "timestamp")


def parse_column_map(text: str) -> dict[str, str]:
    """"user=uid,item=iid,label=rating" -> {"user": "uid", ...}."""
    mapping = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise DataError(f"--columns: expected ROLE=COLUMN, got {part!r}")
        role, column = (s.strip() for s in part.split("=", 1))
        mapping[role] = column
    return mapping


def prepare_csv(src: str | os.PathLike, out: str | os.PathLike, *, columns: Mapping[str, str],
                delimiter: str = ",", header: bool = True, label_kind: str = "rating",
                id_type: str = "int", split: str = "random", seed: int = 0, ratio: float = 0.8,
                k: int = 1, cut: int | None = None, cut_quantile: float | None = None,
                overwrite: bool = False) -> DatasetMeta:
    """Convert one delimited file with the given column map."""
    check_output(out, overwrite)
    path = pathlib.Path(src)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    for role in columns:
        if role not in ROLES and not role.startswith((schema.SPARSE_PREFIX, schema.DENSE_PREFIX)):
            raise DataError(f"--columns: unknown role {role!r} (use {', '.join(ROLES)}, "
                            f"sparse_<name>, dense_<name>)")
    for role in ("user", "item", "label"):
        if role not in columns:
            raise DataError(f"--columns: the map needs a column for '{role}'")
    if label_kind not in ("rating", "click"):
        raise DataError(f"label kind must be rating|click, got {label_kind!r}")
    if id_type not in ("int", "string"):
        raise DataError(f"id type must be int|string, got {id_type!r}")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: empty input (0 bytes)")
    file_columns = read_header(path, delimiter)
    if not header:
        file_columns = [str(i) for i in range(len(file_columns))]
    for role, column in columns.items():
        if column not in file_columns:
            raise DataError(f"{path}: missing column '{column}' (for {role}; file columns: "
                            f"{', '.join(file_columns)})")
    id_arrow = pa.int64() if id_type == "int" else pa.string()
    types: dict[str, pa.DataType] = {}
    for role, column in columns.items():
        if column in types:
            raise DataError(f"--columns: column {column!r} is mapped twice")
        if role in ("user", "item"):
            types[column] = id_arrow
        elif role == "timestamp":
            types[column] = pa.int64()
        elif role.startswith(schema.SPARSE_PREFIX):
            types[column] = pa.string()
        else:
            types[column] = pa.float64()
    table = read_delimited(path, delimiter=delimiter, column_names=file_columns, types=types,
                           header=header)
    check_raw(table, path, id_columns=(columns["user"], columns["item"]),
              label_column=columns["label"], header=header, label_kind=label_kind)
    for role, column in columns.items():
        if role.startswith(schema.DENSE_PREFIX):
            values = table.column(column).to_numpy()
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                raise DataError(f"{path}: column '{column}' row {int(bad[0])}: value "
                                f"{values[bad[0]]:g} is not finite")
    timestamp = (table.column(columns["timestamp"]).to_numpy() if "timestamp" in columns
                 else np.arange(table.num_rows, dtype=np.int64))
    return build_dataset(
        out, user=table.column(columns["user"]), item=table.column(columns["item"]),
        label=table.column(columns["label"]).to_numpy(), timestamp=timestamp,
        label_kind=label_kind, source=f"csv:{path}", split=split,
        split_args=dict(seed=seed, ratio=ratio, k=k, cut=cut, cut_quantile=cut_quantile),
        sparse={r: table.column(c) for r, c in columns.items() if r.startswith(schema.SPARSE_PREFIX)},
        dense={r: table.column(c).to_numpy() for r, c in columns.items()
               if r.startswith(schema.DENSE_PREFIX)},
        overwrite=overwrite, extra={"column_map": dict(columns)})
