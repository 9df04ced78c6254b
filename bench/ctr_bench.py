"""CTR quality at equal embedding bytes: CEL, full, hashing and quotient-remainder under DLRM
and DeepFM, on the Criteo-like synthetic dataset (`synth-ctr`) and on binary MovieLens-100K
(rating >= 4 is a click).

    python -m bench.ctr_bench [--rows 1000000] [--vocab-max 100000] [--compression 12]
                              [--ml-compression 4,8] [--models dlrm,deepfm] [--epochs 2]
                              [--ml-src ../shared/datasets/ml-100k] [--skip-ml]

Every large table (>= --min-cardinality rows) of a run is compressed by the same rule
(`embedding.compression`: its bytes to about 1/compression of full, CEL counting its int32 map);
the others stay full. Same model, optimizer (Adagrad, fused FBGEMM tables), learning rate and
epochs for every method; no per-method tuning. Each run is a `python -m trainer.main`
subprocess whose metrics.json is read back. Writes bench/results/ctr.json.
"""
from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile

from bench.common import print_table, write_results
from bench.quality_ml100k import CONFIGS, ROOT, run_trainer

# the base config: the embedded CTR default (DLRM, Adagrad, d = 16, Lite once per epoch, the
# embedded default's CEL schedule), the same settings for every method; the data is the bench's
CONFIGS["ctr"] = "configs/ctr_small.yaml"

METHODS = ("full", "cel", "hash", "qr")
COMMON = ["data.kind=path"]
COLUMNS = ["dataset", "model", "method", "lite_scoring", "compression", "embedding_bytes", "val_auc",
           "val_logloss", "val_ne", "val_auc_cold", "train_time_s", "reassign_time_s"]


def prepare(args, work: pathlib.Path) -> dict[str, pathlib.Path]:
    data = {}
    synth = ROOT / "data" / f"ctr_synth_{args.rows}_{args.vocab_max}"
    if not (synth / "meta.json").exists():
        subprocess.run([sys.executable, "-m", "data_pipeline", "synth-ctr", "--out", str(synth),
                        "--rows", str(args.rows), "--vocab-max", str(args.vocab_max),
                        "--overwrite"], check=True, cwd=ROOT)
    data["synthetic_ctr"] = synth
    if not args.skip_ml:
        ml = ROOT / "data" / "ml100k_click"
        if not (ml / "meta.json").exists():
            subprocess.run([sys.executable, "-m", "data_pipeline", "prepare", "movielens",
                            "--src", str(args.ml_src), "--out", str(ml), "--label-kind", "click",
                            "--overwrite"], check=True, cwd=ROOT)
        data["ml100k_click"] = ml
    return data


def oracle_auc(path: pathlib.Path) -> float:
    """Validation AUC of the planted click logit itself (synthetic data): the ceiling a learned
    model approaches."""
    import numpy as np
    import pyarrow.parquet as pq

    from data_pipeline.dataset import load_meta
    from data_pipeline.synthetic_ctr import CtrModel
    from trainer.metrics import auc_score
    meta = load_meta(path)
    t = pq.read_table(path / "val")
    model = CtrModel(meta.extra["synthetic_ctr"])
    columns = ["user_id", "item_id", *(f"sparse_C{c}" for c in range(3, len(model.features) + 1))]
    ids = [t.column(c).to_numpy().astype(np.int64) for c in columns]
    dense = np.stack([t.column(c).to_numpy() for c in meta.dense_features], axis=1)
    return auc_score(model.logit(ids, dense), t.column("label").to_numpy())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--vocab-max", type=int, default=100_000)
    ap.add_argument("--compression", type=float, default=12.0)
    ap.add_argument("--ml-compression", default="4,8")
    ap.add_argument("--min-cardinality", type=int, default=1000)
    ap.add_argument("--models", default="dlrm,deepfm")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--ml-src", default=str(ROOT.parent / "shared" / "datasets" / "ml-100k"))
    ap.add_argument("--lite-scoring", default="exact",
                    help="comma list of cel.lite_scoring values; CEL runs once with each")
    ap.add_argument("--skip-ml", action="store_true")
    ap.add_argument("--name", default="ctr")
    args = ap.parse_args()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        data = prepare(args, work)
        oracle = oracle_auc(data["synthetic_ctr"])
        print(f"[bench] synthetic_ctr: planted-logit val AUC {oracle:.4f}", flush=True)
        for dataset, path in data.items():
            ml = dataset.startswith("ml100k")
            ratios = [float(x) for x in args.ml_compression.split(",")] if ml else [args.compression]
            min_card = 500 if ml else args.min_cardinality
            for model in args.models.split(","):
                for method in args.methods.split(","):
                    scorings = args.lite_scoring.split(",") if method == "cel" else [None]
                    for ratio, scoring in ((r, sc) for r in ([None] if method == "full" else ratios)
                                           for sc in scorings):
                        name = f"{dataset}-{model}-{method}-{ratio}-{scoring}"
                        over = [*COMMON, f"model.name={model}", f"embedding.method={method}",
                                f"train.epochs={args.epochs}", f"embedding.min_cardinality={min_card}"]
                        if ratio is not None:
                            over.append(f"embedding.compression={ratio}")
                        if scoring is not None:
                            over.append(f"cel.lite_scoring={scoring}")
                        print(f"[bench] {name}", flush=True)
                        m = run_trainer("ctr", over, path, work, name)
                        records.append({"dataset": dataset, "model": model, "method": method,
                                        "lite_scoring": scoring, "target_compression": ratio,
                                        **{k: m.get(k) for k in COLUMNS if k in m},
                                        "clusters": sum(v for k, v in m.items()
                                                        if k.startswith("num_clusters_")) or None})
                        print(f"[bench] {name}: val_auc {m.get('val_auc'):.4f}, "
                              f"{m.get('embedding_bytes')} bytes, train {m.get('train_time_s'):.1f} s",
                              flush=True)
            # the achieved compression of each run, against the full run of its model
            for rec in records:
                if rec["dataset"] != dataset:
                    continue
                full = next(r for r in records if r["dataset"] == dataset
                            and r["model"] == rec["model"] and r["method"] == "full")
                rec["compression"] = round(full["embedding_bytes"] / rec["embedding_bytes"], 2)
                rec["auc_minus_full"] = round(rec["val_auc"] - full["val_auc"], 4)
    print_table(records, [*COLUMNS, "clusters", "auc_minus_full"])
    write_results(args.name, records, rows=args.rows, vocab_max=args.vocab_max,
                  config=CONFIGS["ctr"], settings=COMMON, epochs=args.epochs, synthetic_oracle_auc=round(oracle, 4))


if __name__ == "__main__":
    main()
