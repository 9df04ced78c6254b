"""Retrieval on implicit feedback: the ranking metrics against a per-user brute force, the BPR and
sampled-softmax losses against their formulas, config errors, and training runs whose recall
beats an untrained model's (CEL with splits and reassignments, and the full table)."""
import json
import math
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.trainer.test_train_e2e import tiny_config
from trainer.config import ConfigError
from trainer.dist import init_distributed
from trainer.loop import TrainRecipe
from trainer.models import GMF, ITEM, USER, MatrixFactorization
from trainer.retrieval import KS, NegativeSampler, RankingEvaluator, RetrievalObjective, _pair_kjt
from trainer.worker import run_worker


class _Lookup:
    """A stand-in for the embedding collection: fixed user and item rows."""

    def __init__(self, users: torch.Tensor, items: torch.Tensor):
        self.users, self.items = users, items

    def __call__(self, kjt):
        u, i = self.users[kjt[USER].values()], self.items[kjt[ITEM].values()]
        return type("Pooled", (), {"to_dict": lambda self: {USER: u, ITEM: i}})()


def _write(path: pathlib.Path, users, items, labels) -> None:
    path.mkdir(parents=True)
    pq.write_table(pa.table({USER: pa.array(users, pa.int64()), ITEM: pa.array(items, pa.int64()),
                             "label": pa.array(labels, pa.float32())}), path / "part-0.parquet")


def _brute_force(scores: np.ndarray, train: dict, val: dict, cold_item: np.ndarray,
                 cold_user: np.ndarray) -> dict:
    out: dict[str, list] = {}
    for u, positives in val.items():
        s = scores[u].copy()
        s[list(train.get(u, ()))] = -np.inf
        ranked = list(np.argsort(-s, kind="stable"))
        for k in KS:
            top = ranked[:k]
            for slice_, rel in (("", positives), ("_cold_items", {i for i in positives if cold_item[i]})):
                if not rel:
                    continue
                hits = [1.0 if i in rel else 0.0 for i in top]
                n = min(k, len(rel))
                recall = sum(hits) / n
                ndcg = (sum(h / math.log2(r + 2) for r, h in enumerate(hits))
                        / sum(1 / math.log2(r + 2) for r in range(n)))
                out.setdefault(f"recall_at_{k}{slice_}", []).append(recall)
                out.setdefault(f"ndcg_at_{k}{slice_}", []).append(ndcg)
                if slice_ == "" and cold_user[u]:
                    out.setdefault(f"recall_at_{k}_cold_users", []).append(recall)
                    out.setdefault(f"ndcg_at_{k}_cold_users", []).append(ndcg)
    return {k: float(np.mean(v)) for k, v in out.items()}


def test_ranking_metrics_equal_a_per_user_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    num_users, num_items, d = 40, 90, 6
    tu, ti = rng.integers(0, num_users, 900), rng.integers(0, num_items, 900)
    vu, vi = rng.integers(0, num_users, 300), rng.integers(0, num_items, 300)
    vl = (rng.random(300) < 0.8).astype(np.float32)       # label-0 rows are no positives
    _write(tmp_path / "train", tu, ti, np.ones(tu.size))
    _write(tmp_path / "val", vu, vi, vl)
    users, items = torch.randn(num_users, d + 1), torch.randn(num_items, d + 1)
    model = MatrixFactorization(d)
    user_counts = np.bincount(tu, minlength=num_users)
    item_counts = np.bincount(ti, minlength=num_items)
    # a small score budget: several user chunks per evaluation
    ev = RankingEvaluator(tmp_path, "val", num_users, num_items, user_counts, item_counts,
                          cold_threshold=10, score_budget_bytes=4 * num_items * 7)
    got = ev.evaluate(_Lookup(users, items), model, init_distributed(), torch.device("cpu"))
    with torch.no_grad():
        scores = model.score_matrix(users, items).numpy()
    train, val = {}, {}
    for u, i in zip(tu, ti):
        train.setdefault(int(u), set()).add(int(i))
    for u, i, y in zip(vu, vi, vl):
        if y > 0:
            val.setdefault(int(u), set()).add(int(i))
    want = _brute_force(scores, train, val, item_counts < 10, user_counts < 10)
    assert got["count_ranking_users"] == len(val)
    assert 0 < got["count_ranking_users_cold_items"] < len(val)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert 0 < got["recall_at_50"] < 1 and got["recall_at_10"] <= got["recall_at_50"]


def test_ranking_sample_of_users_is_fixed_and_capped(tmp_path):
    rng = np.random.default_rng(1)
    _write(tmp_path / "train", rng.integers(0, 50, 400), rng.integers(0, 30, 400), np.ones(400))
    _write(tmp_path / "val", np.arange(50), rng.integers(0, 30, 50), np.ones(50))
    make = lambda: RankingEvaluator(tmp_path, "val", 50, 30, np.ones(50), np.ones(30), 5,  # noqa: E731
                                    max_users=12, seed=3)
    a, b = make(), make()
    assert a.users.size == 12 and np.array_equal(a.users, b.users)


def test_bpr_loss_is_the_pairwise_logistic_loss():
    torch.manual_seed(0)
    obj = RetrievalObjective("bpr", num_items=20, negatives=3, item_counts=torch.ones(20), seed=0)
    users, items = torch.tensor([0, 1, 2, 3]), torch.tensor([5, 6, 7, 8])
    label = torch.tensor([1.0, 1.0, 0.0, 1.0])                 # row 2 is no positive
    kjt, _, wlabel = obj.training_batch(_pair_kjt(users, items), None, label)
    assert kjt.stride() == 16 and wlabel.tolist()[:4] == label.tolist() and wlabel[4:].sum() == 0
    assert torch.equal(kjt[USER].values(), users.repeat(4))
    neg = kjt[ITEM].values()[4:].view(3, 4)
    U, I = torch.randn(4, 4), torch.randn(20, 4)
    model = GMF(4)
    embs = {USER: U.repeat(4, 1), ITEM: I[kjt[ITEM].values()]}
    loss, per_row = obj.losses(model, kjt, embs, None, wlabel)
    pos = (U * I[items]).sum(1)
    negs = (U.unsqueeze(0) * I[neg]).sum(-1)                   # [3, 4]
    pair = -torch.nn.functional.logsigmoid(pos - negs)
    keep = label > 0
    assert loss.item() == pytest.approx(pair[:, keep].mean().item(), rel=1e-6)
    assert per_row.shape == (16,) and per_row[2] == 0 and per_row[4 + 2] == 0


def test_sampled_softmax_is_logq_corrected_with_duplicates_masked():
    torch.manual_seed(0)
    counts = torch.tensor([9.0, 1.0, 4.0, 0.0, 2.0])
    obj = RetrievalObjective("softmax", num_items=5, negatives=1, item_counts=counts, seed=0)
    users, items = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 0, 4])   # item 0 twice
    label = torch.ones(4)
    kjt, _, _ = obj.training_batch(_pair_kjt(users, items), None, label)
    assert kjt.stride() == 4                                   # in-batch: no widening
    U, I = torch.randn(4, 4), torch.randn(5, 4)
    model = GMF(4)
    loss, per_row = obj.losses(model, kjt, {USER: U, ITEM: I[items]}, None, label)
    q = (counts + 1) / (counts + 1).sum()
    want = []
    for r in range(4):
        logits = [float(U[r] @ I[items[c]] - torch.log(q[items[c]])) for c in range(4)
                  if c == r or items[c] != items[r]]
        own = float(U[r] @ I[items[r]] - torch.log(q[items[r]]))
        want.append(-own + math.log(sum(math.exp(x) for x in logits)))
    assert per_row.tolist() == pytest.approx(want, rel=1e-5)
    assert loss.item() == pytest.approx(float(np.mean(want)), rel=1e-5)


def test_negative_sampler_is_uniform_and_reproducible():
    a, b = NegativeSampler(50, 2, seed=4), NegativeSampler(50, 2, seed=4)
    x = a.draw(20000, "cpu")
    assert torch.equal(x, b.draw(20000, "cpu"))
    counts = torch.bincount(x, minlength=50).float()
    assert counts.min() > 300 and counts.max() < 500 and int(x.max()) == 49


@pytest.mark.parametrize("extra, match", [
    (["model.name=neumf"], "model.name must be one of"),
    (["train.negatives=0"], "train.negatives must be >= 1"),
])
def test_retrieval_config_errors(tmp_path, extra, match):
    recipe = TrainRecipe(tiny_config(tmp_path, "train.loss=bpr", *extra), init_distributed())
    with pytest.raises(ConfigError, match=match):
        recipe.setup()


def _recall(tmp_path, name, *extra):
    return run_worker(tiny_config(tmp_path, f"run.name={name}", "train.epochs=3", *extra))


@pytest.mark.parametrize("loss", ["bpr", "softmax"])
def test_retrieval_training_beats_an_untrained_model(tmp_path, loss):
    """CEL (users and items clustered, splits and reassignments) trained with each ranking loss
    ranks held-out positives far better than the same model untrained."""
    base = [f"train.loss={loss}", "train.lr=0.05"]
    untrained = _recall(tmp_path, "untrained", *base, "train.max_steps=0", "train.epochs=1")
    trained = _recall(tmp_path, "trained", *base)
    assert trained["val_recall_at_20"] > 1.5 * untrained["val_recall_at_20"] + 0.02
    assert trained["best_val_recall_at_20"] >= trained["val_recall_at_20"]
    assert trained["num_clusters_items"] > 1 and trained["num_clusters_users"] > 1
    phases = [json.loads(x) for x in
              (tmp_path / "runs" / "trained" / "phases.jsonl").read_text().splitlines()]
    assert {"split", "reassign"} <= {p["kind"] for p in phases}
    for key in ("val_ndcg_at_20", "val_recall_at_50_cold_users", "val_recall_at_10_cold_items"):
        assert key in trained


def test_full_table_bpr_export_recommends_the_trained_models_top_items(tmp_path):
    """The full table trained with BPR learns (recall well above chance) and its serving
    export recommends what the trained model's ranking puts first."""
    from trainer.export import export_run
    from trainer.serving import ServingModel
    metrics = _recall(tmp_path, "full", "train.loss=bpr", "embedding.method=full", "train.lr=0.05")
    assert metrics["val_recall_at_20"] > 0.15        # 20 of 200 items at random: about 0.1
    out = tmp_path / "export"
    export_run(tmp_path / "runs" / "full", out)
    served = ServingModel(out)
    raw_users = [str(x) for x in served.vocabulary(USER).to_pylist()[:3]]
    items, scores = served.recommend(raw_users, k=5)
    dense_users = served.dense_ids(USER, raw_users)
    all_items = np.arange(len(served.vocabulary(ITEM)))
    for row, u in enumerate(dense_users):
        s = served.score_dense({USER: np.full(all_items.size, u), ITEM: all_items}).numpy()
        want = served.vocabulary(ITEM).take(pa.array(np.argsort(-s, kind="stable")[:5])).to_pylist()
        assert items[row] == [str(x) for x in want]
        assert np.all(np.diff(scores[row]) <= 1e-6)


class _ServedLookup:
    """An export's rows behind the collection's call signature."""

    def __init__(self, served):
        self.served = served

    def __call__(self, kjt):
        u = self.served.embed(USER, kjt[USER].values().numpy())
        i = self.served.embed(ITEM, kjt[ITEM].values().numpy())
        return type("Pooled", (), {"to_dict": lambda self: {USER: u, ITEM: i}})()


@pytest.mark.dist
def test_two_process_row_wise_retrieval_run_ranks_as_its_export_does(tmp_path):
    """A 2-rank row-wise sharded CEL run with sampled softmax: its distributed ranking metrics
    (each rank scores its share of the users, sums all-reduced) equal a one-process evaluation
    of its serving export."""
    import os
    import subprocess
    import sys

    from tests.trainer.test_train_e2e import ROOT, TINY
    from trainer.export import export_run
    from trainer.serving import ServingModel
    torchrun = pathlib.Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "trainer.main", "--config",
           str(ROOT / "configs/synthetic_small.yaml"), *TINY, "train.max_steps=30",
           "train.loss=softmax", "dist.sharding=row_wise", f"run.dir={tmp_path / 'runs'}",
           f"data.cache_dir={tmp_path / 'cache'}", "run.name=tr"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tr"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    manifest = export_run(run_dir, tmp_path / "export")
    served = ServingModel(tmp_path / "export")
    data_dir = pathlib.Path(manifest["data_dir"])
    from data_pipeline.dataset import load_meta, load_train_counts
    meta = load_meta(data_dir)
    ev = RankingEvaluator(data_dir, "val", meta.num_users, meta.num_items,
                          np.array(load_train_counts(data_dir, "users")),
                          np.array(load_train_counts(data_dir, "items")), cold_threshold=5)
    got = ev.evaluate(_ServedLookup(served), served.model, init_distributed(), torch.device("cpu"))
    assert got["count_ranking_users"] == metrics["val_count_ranking_users"] > 100
    for key in ("recall_at_10", "recall_at_20", "ndcg_at_20", "recall_at_50_cold_users",
                "recall_at_20_cold_items"):
        want = metrics[f"val_{key}"]
        assert (got[key] == pytest.approx(want, abs=1e-6)) if want is not None else math.isnan(got[key]), key
