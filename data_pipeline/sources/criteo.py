"""Criteo Kaggle / Terabyte TSV -> a prepared dataset, streaming in two passes.

Each line: label (0/1), 13 integer features I1..I13, 26 hex categorical features C1..C26, tab
separated, empty fields allowed (missing). Kaggle ships one `train.txt`; Terabyte ships
`day_0` .. `day_23` (optionally .gz). Rows are chronological, so the timestamp is the global
row index.

Criteo has no users or items; two categorical columns play those roles (`user_col`, `item_col`,
default C3 and C4, both large in Kaggle), the other 24 become sparse_<C> features, and the
integers become dense_<I> = log(1 + max(x, 0)) (missing -> 0), DLRM's usual transform.
Missing categoricals are the raw value "" (their own id).

Pass 1 counts rows and builds each categorical vocabulary (sorted raw hex strings); pass 2
maps values to dense ids (`pyarrow.compute.index_in`) and writes the splits. Memory holds the
vocabularies, not the data. Splits: `temporal` by row index (the default, last 1/7 validates:
Kaggle's seventh day) or `random` by a seeded hash of the row index.
"""
from __future__ import annotations

import os
import pathlib
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from data_pipeline import schema
from data_pipeline.dataset import (DatasetMeta, SplitWriter, atomic_output_dir, check_output,
                                   progress_bar, vocab_table, write_table)
from data_pipeline.errors import DataError

INT_COLUMNS = [f"I{i}" for i in range(1, 14)]
CAT_COLUMNS = [f"C{i}" for i in range(1, 27)]
NAMES = ["label", *INT_COLUMNS, *CAT_COLUMNS]
TYPES = {"label": pa.int64(), **{c: pa.int64() for c in INT_COLUMNS},
         **{c: pa.string() for c in CAT_COLUMNS}}
BLOCK_BYTES = 32 << 20


def criteo_files(src: str | os.PathLike) -> list[pathlib.Path]:
    """The input files: the path itself, or train.txt / day_N[.gz] / *.tsv / *.txt in it."""
    src = pathlib.Path(src)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise DataError(f"{src}: no such file or directory")
    if (src / "train.txt").is_file():
        return [src / "train.txt"]
    days = [p for p in src.iterdir() if re.fullmatch(r"day_\d+(\.gz)?", p.name)]
    if days:
        return sorted(days, key=lambda p: int(re.search(r"\d+", p.name).group()))
    files = sorted(p for p in src.iterdir() if p.suffix in (".tsv", ".txt") and p.is_file())
    if not files:
        raise DataError(f"{src}: no Criteo files found (train.txt, day_N[.gz], *.tsv, *.txt)")
    return files


def _batches(files: list[pathlib.Path], bar):
    """(file, first row of the batch within the file, batch) for every block of every file."""
    for path in files:
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: empty input (0 bytes)")
        stream = pa.input_stream(str(path), compression="gzip" if path.suffix == ".gz" else None)
        read_options = pacsv.ReadOptions(column_names=NAMES, block_size=BLOCK_BYTES)
        parse_options = pacsv.ParseOptions(delimiter="\t", quote_char=False)
        convert_options = pacsv.ConvertOptions(column_types=TYPES, strings_can_be_null=True,
                                                null_values=[""])
        row = 0
        try:
            reader = pacsv.open_csv(stream, read_options=read_options, parse_options=parse_options,
                                    convert_options=convert_options)
            position = 0
            for batch in reader:
                yield path, row, batch
                row += batch.num_rows
                now = stream.tell()
                bar.update(max(0, now - position))
                position = now
        except pa.ArrowInvalid as exc:
            raise DataError(f"{path}: {_explain(str(exc), row)}") from None
        finally:
            stream.close()


def _explain(message: str, row_offset: int) -> str:
    """Turn pyarrow's "In CSV column #3: Row #7: ..." into column names."""
    first = message.splitlines()[0]
    match = re.search(r"column #(\d+)", first)
    if match and int(match.group(1)) < len(NAMES):
        first = first.replace(match.group(0), f"column '{NAMES[int(match.group(1))]}'")
    return f"cannot parse ({first}; block starting at row {row_offset})"


def _check_labels(path, row, batch) -> None:
    label = batch.column("label")
    if label.null_count:
        i = int(np.flatnonzero(label.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{path}: column 'label' row {row + i} (line {row + i + 1}): missing value")
    values = label.to_numpy()
    bad = np.flatnonzero((values != 0) & (values != 1))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{path}: column 'label' row {row + i} (line {row + i + 1}): click label "
                        f"must be 0 or 1, got {int(values[i])}")


def _merge_unique(parts: list[pa.Array]) -> pa.Array:
    return pc.unique(pa.chunked_array(parts, type=pa.string()))


def prepare_criteo(src: str | os.PathLike, out: str | os.PathLike, *, user_col: str = "C3",
                   item_col: str = "C4", split: str = "temporal", seed: int = 0,
                   ratio: float = 0.8, cut: int | None = None,
                   cut_quantile: float | None = None, overwrite: bool = False) -> DatasetMeta:
    """Convert Criteo TSV file(s) with two streaming passes (see module docstring)."""
    check_output(out, overwrite)
    for role, column in (("user", user_col), ("item", item_col)):
        if column not in CAT_COLUMNS:
            raise DataError(f"--{role}-col must be one of C1..C26, got {column!r}")
    if user_col == item_col:
        raise DataError("--user-col and --item-col must differ")
    if split not in ("temporal", "random"):
        raise DataError(f"criteo supports --split temporal|random (streaming), got {split!r}")
    if split == "temporal" and cut is None and cut_quantile is None:
        cut_quantile = 6 / 7
    files = criteo_files(src)
    total_bytes = sum(os.path.getsize(p) for p in files)

    # Pass 1: row count, label check, vocabularies.
    pending: dict[str, list[pa.Array]] = {c: [] for c in CAT_COLUMNS}
    merged_size = {c: 0 for c in CAT_COLUMNS}
    num_rows = 0
    with progress_bar(total_bytes, desc="criteo pass 1/2", unit="B") as bar:
        for path, row, batch in _batches(files, bar):
            _check_labels(path, row, batch)
            num_rows += batch.num_rows
            for c in CAT_COLUMNS:
                parts = pending[c]
                parts.append(pc.unique(pc.fill_null(batch.column(c), "")))
                if sum(len(p) for p in parts) > 2 * max(merged_size[c], 1 << 16):
                    pending[c] = [_merge_unique(parts)]
                    merged_size[c] = len(pending[c][0])
    if num_rows == 0:
        raise DataError(f"{files[0]}: empty input (no data rows)")
    vocabs = {}
    for c in CAT_COLUMNS:
        vocab = _merge_unique(pending.pop(c))
        vocabs[c] = vocab.take(pc.sort_indices(vocab))
    if split == "temporal":
        cut_row = int(cut if cut is not None else int(cut_quantile * num_rows))
        if not 0 < cut_row < num_rows:
            raise DataError(f"temporal cut at row {cut_row} leaves an empty split "
                            f"({num_rows} rows)")
        split_info = {"method": "temporal", "cut": cut, "cut_quantile": cut_quantile,
                      "cut_timestamp": cut_row}
    else:
        if not 0.0 < ratio < 1.0:
            raise DataError(f"--ratio must lie in (0, 1), got {ratio}")
        split_info = {"method": "random", "ratio": ratio, "seed": seed}

    # Pass 2: dense ids, splits.
    sparse_columns = [c for c in CAT_COLUMNS if c not in (user_col, item_col)]
    sparse_names = [schema.SPARSE_PREFIX + c for c in sparse_columns]
    dense_names = [schema.DENSE_PREFIX + c for c in INT_COLUMNS]
    arrow_schema = schema.arrow_schema(sparse_names, dense_names)
    counts = {c: np.zeros(len(vocabs[c]), dtype=np.int64) for c in CAT_COLUMNS}
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        writers = {s: SplitWriter(tmp, s, arrow_schema) for s in ("train", "val")}
        global_row = 0
        with progress_bar(total_bytes, desc="criteo pass 2/2", unit="B") as bar:
            for _path, _row, batch in _batches(files, bar):
                n = batch.num_rows
                index = np.arange(global_row, global_row + n, dtype=np.int64)
                global_row += n
                ids = {c: pc.index_in(pc.fill_null(batch.column(c), ""), value_set=vocabs[c])
                       .to_numpy(zero_copy_only=False).astype(np.int64) for c in CAT_COLUMNS}
                columns = {schema.USER: ids[user_col], schema.ITEM: ids[item_col],
                           schema.LABEL: batch.column("label").to_numpy().astype(np.float32),
                           schema.TIMESTAMP: index}
                for c, name in zip(sparse_columns, sparse_names):
                    columns[name] = ids[c]
                for c, name in zip(INT_COLUMNS, dense_names):
                    raw = pc.fill_null(batch.column(c), 0).to_numpy().astype(np.float64)
                    columns[name] = np.log1p(np.maximum(raw, 0.0)).astype(np.float32)
                if split == "temporal":
                    is_train = index < cut_row
                else:
                    is_train = _uniform_hash(index, seed) < ratio
                for c in CAT_COLUMNS:
                    counts[c] += np.bincount(ids[c][is_train], minlength=len(vocabs[c]))
                for name, mask in (("train", is_train), ("val", ~is_train)):
                    if mask.any():
                        writers[name].write(pa.table({k: v[mask] for k, v in columns.items()}))
        splits = {name: w.close() for name, w in writers.items()}
        for name, rows in splits.items():
            if rows == 0:
                raise DataError(f"{files[0]}: split '{name}' would be empty ({split_info})")
        write_table(vocab_table(vocabs[user_col], counts[user_col]), tmp / "vocab" / "users.parquet")
        write_table(vocab_table(vocabs[item_col], counts[item_col]), tmp / "vocab" / "items.parquet")
        for c, name in zip(sparse_columns, sparse_names):
            write_table(vocab_table(vocabs[c], counts[c]), tmp / "vocab" / f"{name}.parquet")
        meta = DatasetMeta(num_users=len(vocabs[user_col]), num_items=len(vocabs[item_col]),
                           splits=splits, label_kind="click",
                           sparse_features={n: len(vocabs[c]) for c, n in zip(sparse_columns, sparse_names)},
                           dense_features=dense_names,
                           source=f"criteo:{','.join(str(p) for p in files)}", split=split_info,
                           extra={"user_col": user_col, "item_col": item_col})
        (tmp / "meta.json").write_text(meta.to_json())
    return meta


def _uniform_hash(index: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (row index, seed) as uniforms in [0, 1): a per-row coin independent of
    how the input is chunked."""
    with np.errstate(over="ignore"):
        z = index.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
