"""Export a trained run for serving: a compact, versioned directory that needs neither the
training checkpoint nor TorchRec's sharding to score.

    python -m trainer.export --run RUN_DIR --out DIR [--overwrite]

Reads RUN_DIR/checkpoint (the last one: every run saves one at its end), from a single-process
or a sharded run of any world size (the sharded tables are read from the DCP checkpoint in one
process), and writes to DIR (atomically: DIR.tmp renamed over DIR):

    manifest.json            format, version, the training commit, the model, and per feature its
                             table kind, files, shapes, dtypes, bytes and the unknown-id row
    model.pt                 the interaction model's weights (a state dict of tensors only)
    tables/<table>.*.npy     per table, what its kind needs:
        clustered  assignment int32 [N] (int8/int16 under map_dtype=auto), clusters float32 [C_active, D],
                   entity_bias float32 [N] (MF with cel.<table>.entity_bias)
        full       weight [N, D]
        hash       weight [buckets, D]        (row = hash_ids(id, buckets, salt))
        qr         quotient [ceil(N/m), D], remainder [m, D]   (combined by mult or add)
        every kind unknown float32 [D]: the row an id outside the vocabulary gets
    vocab/<entity>.parquet   raw id -> dense id (with training counts), from the dataset

The row an unknown raw id gets: for a clustered table the new-entity cluster (where the table's
`unseen_policy` put the entities without training data: the cluster holding most of them under
`pooled` / `largest`, else the cluster with the most training interactions) with a zero entity
bias; for the other kinds the mean row over the table's entities.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

import numpy as np
import torch

FORMAT = "cel-serving-export"
VERSION = 1
CHUNK = 1 << 16          # entities per chunk when a row must be composed (hash / QR means)


# ----------------------------------------------------------------------------- reading a run
def _run_config(run_dir: pathlib.Path, state: dict):
    from trainer.config import TrainConfig
    if "config" in state:
        return TrainConfig.from_dict(state["config"])
    path = run_dir / "config.json"                 # checkpoints written before the config was
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: the checkpoint holds no config and there is no "
                                f"config.json beside it")
    return TrainConfig.from_dict(json.loads(path.read_text()))


def load_trained(run_dir: str | pathlib.Path):
    """(config, dataset dir, meta, unsharded embedding collection, interaction model, state) of
    a run's last checkpoint, on the CPU, in this process (no process group)."""
    from data_pipeline.dataset import load_meta
    from trainer.builders import build_embedding_collection, resolve_dataset, table_specs
    from trainer.dist import DistEnv
    from trainer.models import CTR_MODELS, build_model

    run_dir = pathlib.Path(run_dir)
    ckpt = run_dir / "checkpoint"
    if not (ckpt / "state.pt").exists():
        raise FileNotFoundError(f"{run_dir}: no checkpoint (expected {ckpt / 'state.pt'}); "
                                f"is this a run directory of a finished run?")
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    cfg = _run_config(run_dir, state)
    data_dir = pathlib.Path(state["data_dir"]) if state.get("data_dir") else None
    if data_dir is None or not (data_dir / "meta.json").exists():
        data_dir = resolve_dataset(cfg, DistEnv(rank=0, world_size=1, local_rank=0,
                                                device=torch.device("cpu"), backend=None))
    meta = load_meta(data_dir)
    emb = build_embedding_collection(cfg, meta.num_users, meta.num_items, torch.device("cpu"),
                                     meta.sparse_features)
    if state.get("tables", "torch" if "emb" in state else "sharded") == "torch":
        emb.load_state_dict(state["emb"])
    else:                         # DCP shards of any world size, read whole in one process
        import torch.distributed.checkpoint as dcp
        import warnings
        target = emb.state_dict()
        with warnings.catch_warnings():       # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": target}, checkpoint_id=str(ckpt / "sharded"), no_dist=True)
        emb.load_state_dict(target)
    features = [f for _, f, _ in table_specs(cfg, meta.num_users, meta.num_items,
                                             meta.sparse_features)]
    num_dense = len(meta.dense_features) if cfg.model.name in CTR_MODELS else 0
    model = build_model(cfg.model, num_dense=num_dense, seed=cfg.train.seed,
                        features=features if cfg.model.name in CTR_MODELS else None)
    model.load_state_dict(_strip_ddp(state["model"]))
    emb.eval(), model.eval()
    return cfg, data_dir, meta, emb, model, state


def _strip_ddp(state_dict: dict) -> dict:
    """A DistributedDataParallel model's keys carry `module.`; the bare model's do not."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


# ----------------------------------------------------------------------------- table parts
def table_parts(emb: torch.nn.Module, table: str, feature: str, rows: int, index: int,
                train_counts: np.ndarray) -> tuple[dict, dict[str, np.ndarray]]:
    """(spec, arrays) of one table: what `trainer.serving` needs to look up its rows."""
    from cel_torchrec.modules import (ClusteredEmbeddingBagCollection,
                                      HashedEmbeddingBagCollection, QREmbeddingBagCollection)
    if isinstance(emb, ClusteredEmbeddingBagCollection) and table in emb.clustered_tables:
        st = emb.cluster_states[table]
        cfg = emb.clustering_config(table)
        assignment = st.assignment.detach().cpu().numpy()      # its own dtype (map_dtype)
        clusters = emb.cluster_rows(table).cpu().numpy().astype(np.float32)
        new_cluster, rule = new_entity_cluster(assignment, train_counts, st.num_active,
                                               cfg.unseen_policy, cfg.cold_interactions)
        arrays = {"assignment": assignment, "clusters": clusters,
                  "unknown": clusters[new_cluster].copy()}
        spec = {"kind": "clustered", "num_clusters": int(st.num_active),
                "new_entity_cluster": int(new_cluster), "new_entity_rule": rule}
        if table in emb.entity_biases:
            arrays["entity_bias"] = emb.entity_biases[table].detach().cpu().numpy().astype(np.float32)
            spec["bias_column"] = int(cfg.entity_bias_column)
        return spec, arrays
    compact = table in getattr(emb, "compressed_tables", lambda: ())()
    if compact:                     # sparse / CCE / CERP: the collection writes its own arrays
        spec, arrays = emb.export_table(table)
    elif hasattr(emb, "params"):    # a compact collection's full table
        spec, arrays = {"kind": "full"}, {"weight": emb.params[table].detach().cpu().numpy()}
    elif isinstance(emb, HashedEmbeddingBagCollection) and table in emb._buckets:
        bags = emb._embedding_bag_collection.embedding_bags
        spec = {"kind": "hash", "buckets": int(emb._buckets[table]), "salt": int(index)}
        arrays = {"weight": bags[table].weight.detach().cpu().numpy()}
    elif isinstance(emb, QREmbeddingBagCollection) and table in emb._collisions:
        bags = emb._embedding_bag_collection.embedding_bags
        spec = {"kind": "qr", "collisions": int(emb._collisions[table]), "combine": emb._combine}
        arrays = {"quotient": bags[f"{table}__q"].weight.detach().cpu().numpy(),
                  "remainder": bags[f"{table}__r"].weight.detach().cpu().numpy()}
    else:
        bags = getattr(emb, "_embedding_bag_collection", emb).embedding_bags
        spec = {"kind": "full"}
        arrays = {"weight": bags[table].weight.detach().cpu().numpy()}
    from trainer.serving import lookup_rows
    torch_arrays = {k: torch.from_numpy(v) for k, v in arrays.items()}
    total = torch.zeros(lookup_rows(spec, torch_arrays, torch.zeros(1, dtype=torch.long)).shape[1],
                        dtype=torch.float64)
    for start in range(0, rows, CHUNK):          # the mean row, O(N) in chunks
        ids = torch.arange(start, min(rows, start + CHUNK))
        total += lookup_rows(spec, torch_arrays, ids).double().sum(0)
    arrays["unknown"] = (total / max(rows, 1)).float().numpy()
    return spec, arrays


def new_entity_cluster(assignment: np.ndarray, train_counts: np.ndarray, num_active: int,
                       unseen_policy: str, cold_interactions: int) -> tuple[int, str]:
    """The cluster an entity the table has never seen gets, and the rule that chose it."""
    counts = np.asarray(train_counts[: assignment.size], dtype=np.int64)
    cold = counts < max(int(cold_interactions), 1)
    if unseen_policy in ("pooled", "largest") and cold.any():
        members = np.bincount(assignment[cold], minlength=num_active)
        return int(members.argmax()), f"where unseen_policy={unseen_policy} put the cold entities"
    interactions = np.bincount(assignment, weights=counts, minlength=num_active)
    return int(interactions.argmax()), "the cluster with the most training interactions"


# ----------------------------------------------------------------------------- writing
def _vocab_entity(feature: str) -> str:
    return {"user_id": "users", "item_id": "items"}.get(feature, feature)


def _training_commit(state: dict) -> str:
    from trainer.checkpointing import code_commit
    return state.get("commit") or f"unknown (exported at {code_commit()})"


def export_run(run_dir: str | pathlib.Path, out: str | pathlib.Path,
               overwrite: bool = False) -> dict:
    """Write the serving export of `run_dir` to `out`; returns the manifest."""
    from data_pipeline.dataset import load_vocab
    from trainer.builders import table_specs
    from trainer.config import config_to_dict

    out = pathlib.Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    t0 = time.perf_counter()
    cfg, data_dir, meta, emb, model, state = load_trained(run_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tables").mkdir(parents=True)
    (tmp / "vocab").mkdir()
    files: dict[str, dict] = {}

    def save(rel: str, array: np.ndarray) -> None:
        np.save(tmp / rel, np.ascontiguousarray(array))
        files[rel] = {"shape": list(array.shape), "dtype": str(array.dtype),
                      "bytes": int(array.nbytes)}

    features = {}
    specs = table_specs(cfg, meta.num_users, meta.num_items, meta.sparse_features)
    for index, (table, feature, rows) in enumerate(specs):
        entity = _vocab_entity(feature)
        vocab = load_vocab(data_dir, entity)
        counts = np.asarray(vocab.column("train_count").to_numpy(), dtype=np.int64)
        spec, arrays = table_parts(emb, table, feature, rows, index, counts)
        spec.update(table=table, num_entities=int(rows), vocab=f"vocab/{entity}.parquet",
                    files={})
        for name, array in arrays.items():
            rel = f"tables/{table}.{name}.npy"
            save(rel, array)
            spec["files"][name] = rel
        spec["bytes"] = sum(files[r]["bytes"] for n, r in spec["files"].items() if n != "unknown")
        shutil.copyfile(data_dir / "vocab" / f"{entity}.parquet", tmp / spec["vocab"])
        features[feature] = spec
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(weights, tmp / "model.pt")
    dense_bytes = int(sum(v.numel() * v.element_size() for v in weights.values()))
    from trainer.models import CTR_MODELS      # only CTR models read dense features
    dense_features = list(meta.dense_features) if cfg.model.name in CTR_MODELS else []
    manifest = {
        "format": FORMAT, "version": VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "training_commit": _training_commit(state),
        "run_dir": str(pathlib.Path(run_dir).resolve()), "step": int(state["step"]),
        "epoch": int(state["epoch"]), "world_size": int(state.get("world_size", 1)),
        "method": cfg.embedding.method, "loss": cfg.train.loss,
        "label_kind": meta.label_kind, "data_dir": str(pathlib.Path(data_dir).resolve()),
        "model": config_to_dict(cfg.model),
        "dense_features": dense_features,
        "features": features,
        "files": files,
        "embedding_bytes": int(sum(f["bytes"] for f in features.values())),
        "dense_model_bytes": dense_bytes,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    manifest["seconds"] = time.perf_counter() - t0
    return manifest


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the run directory (RUN_DIR)")
    parser.add_argument("--out", required=True, help="the export directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    from trainer.logs import quiet_console
    quiet_console(False)
    manifest = export_run(args.run, args.out, overwrite=args.overwrite)
    print(f"[export] {args.out}: {manifest['method']} {manifest['model']['name']}, step "
          f"{manifest['step']}, commit {manifest['training_commit']}, embedding bytes "
          f"{manifest['embedding_bytes']:,}, dense model bytes {manifest['dense_model_bytes']:,} "
          f"({manifest['seconds']:.1f} s)")
    for feature, spec in manifest["features"].items():
        extra = (f", {spec['num_clusters']} clusters, new entities -> cluster "
                 f"{spec['new_entity_cluster']}" if spec["kind"] == "clustered" else "")
        print(f"  {feature}: {spec['kind']}, {spec['num_entities']:,} entities, "
              f"{spec['bytes']:,} bytes{extra}")
    return manifest


if __name__ == "__main__":
    from data_pipeline.errors import DataError
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
