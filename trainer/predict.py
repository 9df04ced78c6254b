"""Score (user, item) pairs (or any samples of the export's features) with a serving export.

    python -m trainer.predict --export DIR --pairs PAIRS.parquet|.csv [--out SCORES.parquet|.csv]
    python -m trainer.predict --export DIR --user 196 --item 242

PAIRS holds a column per feature of the export (user_id, item_id; a CTR model's sparse_* and
dense_* columns too) with raw ids; the output is those columns plus `score` (the rating for an
MSE model, the click probability for a BCE one). Without --out the first rows are printed.
Ids outside a vocabulary get the table's new-entity row (see trainer.export).
"""
from __future__ import annotations

import argparse
import sys

import pyarrow as pa

from trainer.serving import ServingModel, read_rows, write_rows


def main(argv: list[str] | None = None) -> pa.Table:
    parser = argparse.ArgumentParser(prog="python -m trainer.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, help="a directory written by trainer.export")
    parser.add_argument("--pairs", help="Parquet or CSV of samples (raw ids)")
    parser.add_argument("--user", help="one raw user id (with --item)")
    parser.add_argument("--item", help="one raw item id (with --user)")
    parser.add_argument("--out", help="write the scores here (.parquet or .csv)")
    args = parser.parse_args(argv)
    model = ServingModel(args.export)
    if args.pairs:
        table = read_rows(args.pairs, id_columns=list(model.features))
    elif args.user is not None and args.item is not None:
        table = pa.table({"user_id": [args.user], "item_id": [args.item]})
    else:
        parser.error("give --pairs FILE, or --user and --item")
    missing = [c for c in [*model.features, *model.dense_features] if c not in table.column_names]
    if missing:
        raise ValueError(f"{args.pairs or 'the pair'}: missing columns {missing} (the export "
                         f"scores {list(model.features)} + dense {model.dense_features})")
    columns = {c: table.column(c).to_numpy(zero_copy_only=False) for c in model.dense_features}
    columns.update({f: table.column(f).combine_chunks() for f in model.features})
    scores = model.predict(columns)
    out = table.append_column("score", pa.array(scores))
    if args.out:
        write_rows(out, args.out)
        print(f"[predict] {out.num_rows:,} scores written to {args.out}")
    else:
        shown = out.slice(0, 20).to_pylist()
        print("  ".join(f"{k:>10}" for k in [*model.features, "score"]))
        for row in shown:
            print("  ".join([*(f"{str(row[f]):>10}" for f in model.features),
                             f"{row['score']:>10.4f}"]))
        if out.num_rows > len(shown):
            print(f"... {out.num_rows - len(shown):,} more (use --out FILE)")
    return out


if __name__ == "__main__":
    from data_pipeline.errors import DataError
    try:
        main()
    except (ValueError, FileNotFoundError, KeyError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
