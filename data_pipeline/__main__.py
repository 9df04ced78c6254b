"""python -m data_pipeline prepare|synth|synth-ctr|inspect ...

  python -m data_pipeline prepare movielens --src ../shared/datasets/ml-100k --out data/ml100k
  python -m data_pipeline prepare csv --src ratings.tsv --out data/x --delimiter '\\t' \\
      --columns user=uid,item=iid,label=rating,timestamp=ts
  python -m data_pipeline prepare movielens --src ml-1m --out data/ml1m-click --label-kind click
  python -m data_pipeline prepare movielens --src ml-1m --out data/ml1m-cce --drop-ratings 3 \\
      --label-kind click --click-threshold 4 --split leave-last --k 2
  python -m data_pipeline prepare criteo --src data/criteo-kaggle --out data/criteo --min-count 4
  python -m data_pipeline synth --out data/synth --users 2000 --items 1000 \\
      --interactions 100000 --clusters 8 --seed 0
  python -m data_pipeline synth-ctr --out data/ctr --rows 1000000 --vocab-max 1000000
  python -m data_pipeline inspect data/ml100k

Bad input exits with status 2 and `error: <file, column, row, value>` on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from data_pipeline.errors import DataError
from data_pipeline.splits import METHODS


def _add_split_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--split", choices=METHODS, default=default,
                   help=f"how to split train/val (default: {default})")
    p.add_argument("--ratio", type=float, default=0.8, help="random: training fraction")
    p.add_argument("--seed", type=int, default=0, help="reference/random: permutation seed")
    p.add_argument("--k", type=int, default=1, help="leave-last: interactions per user to hold out")
    p.add_argument("--cut", type=int, default=None, help="temporal: first validation timestamp")
    p.add_argument("--cut-quantile", type=float, default=None,
                   help="temporal: cut at this quantile of timestamps")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prepare = sub.add_parser("prepare", help="convert a source to a prepared Parquet dataset")
    kinds = prepare.add_subparsers(dest="kind", required=True)

    ml = kinds.add_parser("movielens", help="u.data / ratings.dat / ratings.csv (auto-detected)")
    ml.add_argument("--src", required=True)
    ml.add_argument("--out", required=True)
    ml.add_argument("--label-kind", choices=["rating", "click"], default="rating",
                    help="rating: the raw rating; click: 1 if rating >= --click-threshold else 0")
    ml.add_argument("--click-threshold", type=float, default=None,
                    help="with --label-kind click: ratings >= this are clicks (default: 4)")
    ml.add_argument("--drop-ratings", default=None, metavar="R[,R...]",
                    help="remove rows with these ratings before ids are compacted and the split "
                         "is made (e.g. 3: the CCE paper's protocol with --label-kind click)")
    _add_split_args(ml, "reference")

    csv = kinds.add_parser("csv", help="any delimited interaction file with a column map")
    csv.add_argument("--src", required=True)
    csv.add_argument("--out", required=True)
    csv.add_argument("--columns", required=True,
                     help="ROLE=COLUMN,...; roles user,item,label[,timestamp,sparse_X,dense_Y]; "
                          "without a header, columns are 0-based positions")
    csv.add_argument("--delimiter", default=",", help="field separator ('\\t' for tab)")
    csv.add_argument("--no-header", action="store_true", help="the file has no header line")
    csv.add_argument("--label-kind", choices=["rating", "click"], default="rating")
    csv.add_argument("--id-type", choices=["int", "string"], default="int")
    _add_split_args(csv, "random")

    criteo = kinds.add_parser("criteo", help="Criteo Kaggle/Terabyte TSV (streamed)")
    criteo.add_argument("--src", required=True)
    criteo.add_argument("--out", required=True)
    criteo.add_argument("--user-col", default="C3",
                        help="categorical column written as user_id (default: C3)")
    criteo.add_argument("--item-col", default="C4",
                        help="categorical column written as item_id (default: C4)")
    criteo.add_argument("--min-count", type=int, default=1,
                        help="values seen fewer times (over all rows) share the OOV id 0 "
                             "(default: 1, keep every value)")
    _add_split_args(criteo, "temporal")

    synth = sub.add_parser("synth", help="planted-cluster synthetic interactions")
    synth.add_argument("--out", required=True)
    synth.add_argument("--users", type=int, default=2000)
    synth.add_argument("--items", type=int, default=1000)
    synth.add_argument("--interactions", type=int, default=100_000)
    synth.add_argument("--clusters", type=int, default=8)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--label", choices=["rating", "click"], default="rating")
    synth.add_argument("--val-ratio", type=float, default=0.2)
    synth.add_argument("--overwrite", action="store_true")

    ctr = sub.add_parser("synth-ctr", help="planted-cluster synthetic Criteo-like clicks")
    ctr.add_argument("--out", required=True)
    ctr.add_argument("--rows", type=int, required=True)
    ctr.add_argument("--vocab-max", type=int, default=1_000_000,
                     help="the largest vocabulary (user_id); sizes spread log-uniformly down to 10")
    ctr.add_argument("--categorical", type=int, default=26,
                     help="categorical features: user_id, item_id, sparse_C3.. (default: 26)")
    ctr.add_argument("--dense", type=int, default=13, help="dense features dense_I1.. (default: 13)")
    ctr.add_argument("--clusters", type=int, default=16, help="planted clusters per feature")
    ctr.add_argument("--seed", type=int, default=0)
    ctr.add_argument("--val-ratio", type=float, default=0.1)
    ctr.add_argument("--overwrite", action="store_true")

    inspect = sub.add_parser("inspect", help="print a JSON summary of a prepared dataset")
    inspect.add_argument("dir")
    return parser


def _float_list(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DataError(f"{flag} must be a comma-separated list of numbers, got {text!r}") from None


def _split_kwargs(args) -> dict:
    return dict(split=args.split, seed=args.seed, ratio=args.ratio, k=args.k, cut=args.cut,
                cut_quantile=args.cut_quantile, overwrite=args.overwrite)


def run(args: argparse.Namespace) -> dict:
    if args.command == "inspect":
        from data_pipeline.inspect import summarize
        return summarize(args.dir)
    start = time.perf_counter()
    if args.command == "synth":
        from data_pipeline.synthetic import generate_synthetic
        meta = generate_synthetic(args.out, users=args.users, items=args.items,
                                  interactions=args.interactions, clusters=args.clusters,
                                  seed=args.seed, label=args.label, val_ratio=args.val_ratio,
                                  overwrite=args.overwrite)
    elif args.command == "synth-ctr":
        from data_pipeline.synthetic_ctr import generate_synthetic_ctr
        meta = generate_synthetic_ctr(args.out, rows=args.rows, vocab_max=args.vocab_max,
                                      categorical=args.categorical, dense=args.dense,
                                      clusters=args.clusters, seed=args.seed,
                                      val_ratio=args.val_ratio, overwrite=args.overwrite)
    elif args.kind == "movielens":
        from data_pipeline.sources.movielens import prepare_movielens
        kw = _split_kwargs(args)
        meta = prepare_movielens(args.src, args.out, label_kind=args.label_kind,
                                 click_threshold=args.click_threshold,
                                 drop_ratings=_float_list(args.drop_ratings, "--drop-ratings"),
                                 **kw)
    elif args.kind == "csv":
        from data_pipeline.sources.csv import parse_column_map, prepare_csv
        delimiter = args.delimiter.encode().decode("unicode_escape")
        meta = prepare_csv(args.src, args.out, columns=parse_column_map(args.columns),
                           delimiter=delimiter, header=not args.no_header,
                           label_kind=args.label_kind, id_type=args.id_type, **_split_kwargs(args))
    else:
        from data_pipeline.sources.criteo import prepare_criteo
        kw = _split_kwargs(args)
        kw.pop("k")
        meta = prepare_criteo(args.src, args.out, user_col=args.user_col, item_col=args.item_col,
                              min_count=args.min_count, **kw)
    rows = sum(meta.splits.values())
    return {"out": args.out, "users": meta.num_users, "items": meta.num_items, "rows": rows,
            "splits": meta.splits, "label_kind": meta.label_kind, "split": meta.split,
            "seconds": round(time.perf_counter() - start, 3)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
