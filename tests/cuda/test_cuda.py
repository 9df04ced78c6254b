"""CEL on CUDA against CPU: the ops, ClusteredEmbeddingBagCollection's forward and backward, a
split and a reassignment give on the device what they give on CPU, and the training step runs
under `torch.cuda.set_sync_debug_mode("error")`.

`pytest -m cuda` runs these on the CUDA device; without one they are skipped, unless
`CEL_TEST_DEVICE=cpu` (what `scripts/gpu_check.sh --cpu`, and so the CI smoke test, sets) runs
the same comparisons with the CPU as the "device", so that they cannot rot on CPU-only machines;
the sync check then uses the CPU stand-in `tests.host_sync.no_host_sync`."""
import contextlib
import copy
import os

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cel_torchrec.algorithm import cluster_grad_scale, gpca_split, remap_ids, segment_count, segment_covariance
from cel_torchrec.modules import ClusteredEmbeddingBagCollection, ClusteringConfig
from cel_torchrec.phases import run_reassignment
from tests.host_sync import no_host_sync

DEVICE = os.environ.get("CEL_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE is None, reason="no CUDA device (CEL_TEST_DEVICE=cpu "
                                                        "runs these comparisons on CPU)")]
D, USERS, ITEMS = 8, 300, 500


def close(got, want, **kw):
    torch.testing.assert_close(got.cpu() if torch.is_tensor(got) else got, want, **kw)


def test_the_ops_give_on_the_device_what_they_give_on_cpu():
    g = torch.Generator().manual_seed(0)
    n, m, b = 5000, 40, 2048
    assignment = torch.randint(0, m, (n,), generator=g, dtype=torch.int32)
    ids = torch.randint(0, n, (b,), generator=g)
    clusters = remap_ids(assignment, ids)
    counts = segment_count(assignment, m)
    dev = torch.device(DEVICE)
    close(remap_ids(assignment.to(dev), ids.to(dev)), clusters)
    close(segment_count(assignment.to(dev), m), counts)
    for mode in ("batch", "members", "none"):
        close(cluster_grad_scale(ids.to(dev), clusters.to(dev), counts.to(dev), mode),
              cluster_grad_scale(ids, clusters, counts, mode))
    grads = torch.randn(b, D, generator=g, dtype=torch.float64)
    for got, want in zip(segment_covariance(grads.to(dev), clusters.to(dev), m),
                         segment_covariance(grads, clusters, m)):
        close(got, want)
    parents = torch.topk(counts, 4).indices
    members = torch.nonzero(torch.isin(assignment.long(), parents)).flatten()
    member_grads = torch.randn(members.numel(), D, generator=g)
    for method in ("sign", "median"):
        want = gpca_split(assignment, m, m + 4, parents, members, member_grads, method=method)
        got = gpca_split(assignment.to(dev), m, m + 4, parents.to(dev), members.to(dev),
                         member_grads.to(dev), method=method)
        close(got.parents, want.parents)
        close(got.children, want.children)
        moved = dict(zip(want.moved_entities.tolist(), want.moved_to.tolist()))
        assert dict(zip(got.moved_entities.tolist(), got.moved_to.tolist())) == moved


def collection(device, pooling=PoolingType.SUM, **clustering):
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name="user", embedding_dim=D, num_embeddings=USERS, feature_names=["user_id"]),
              EmbeddingBagConfig(name="item", embedding_dim=D, num_embeddings=ITEMS,
                                 feature_names=["item_id", "history"], pooling=pooling)]
    cfg = {"max_clusters": 16, "init_clusters": 4, **clustering}
    emb = ClusteredEmbeddingBagCollection(tables, {"item": ClusteringConfig(**cfg)},
                                          device=torch.device(device), seed=1)
    with torch.no_grad():
        for p in emb.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    emb.begin_split_window("item")
    return emb


def batch(device, seed, size=64, multi_hot=True):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.cat([torch.ones(2 * size, dtype=torch.long),
                         torch.randint(0, 4, (size,), generator=g) if multi_hot else torch.ones(size, dtype=torch.long)])
    n = int(lengths[2 * size:].sum())
    values = torch.cat([torch.randint(0, USERS, (size,), generator=g),
                        (torch.rand(size, generator=g) ** 2 * ITEMS).long(),
                        torch.randint(0, ITEMS, (n,), generator=g)])
    k = KeyedJaggedTensor(keys=["user_id", "item_id", "history"], values=values, lengths=lengths)
    k.length_per_key(), k.offset_per_key()
    label = torch.randint(1, 6, (size,), generator=g).float()
    return k.to(torch.device(device)), label.to(torch.device(device))


def score(embs):
    return (embs["user_id"] * (embs["item_id"] + embs["history"])).sum(1) + 3.0


def model(embs, dense):
    return score(embs)


def train(emb, device, steps=4):
    opt = torch.optim.SGD(emb.parameters(), lr=0.05)
    for s in range(steps):
        kjt, label = batch(device, s)
        loss = (score(emb(kjt).to_dict()) - label) ** 2
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        emb.observe_losses(loss.detach())
    emb.check_inputs()
    return opt


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_forward_backward_and_the_split_window_match_cpu(pooling):
    dev, cpu = collection(DEVICE, pooling, split_criterion="loss"), collection("cpu", pooling, split_criterion="loss")
    train(dev, DEVICE), train(cpu, "cpu")
    for name, p in cpu.named_parameters():
        close(dict(dev.named_parameters())[name], p, rtol=1e-4, atol=1e-5)
    for got, want in zip(dev.window_rows("item"), cpu.window_rows("item")):
        close(got, want, rtol=1e-4, atol=1e-5)
    kjt, _ = batch(DEVICE, 99)
    dev.eval(), cpu.eval()
    close(dev(kjt).values(), cpu(batch("cpu", 99)[0]).values(), rtol=1e-4, atol=1e-5)


def test_a_split_and_a_reassignment_match_cpu():
    results = {}
    for device in (DEVICE, "cpu"):
        emb = collection(device)
        opt = train(emb, device)
        plan = emb.split("item", optimizer=opt)
        emb.eval()
        data = [batch(device, 10 + s, multi_hot=False) for s in range(3)]
        reassign, report = run_reassignment(
            emb, model, lambda: ((k, None, y) for k, y in data), "item", loss="mse",
            generator=torch.Generator().manual_seed(5), mode="exact")
        results[device] = (plan.num_splits, emb.cluster_states["item"].num_active,
                           emb.cluster_states["item"].assignment.cpu().clone(),
                           emb.table_weight("item").detach().cpu().clone())
    (s1, a1, m1, w1), (s2, a2, m2, w2) = results[DEVICE], results["cpu"]
    assert (s1, a1) == (s2, a2) and s1 >= 1
    assert torch.equal(m1, m2)
    close(w1, w2, rtol=1e-4, atol=1e-5)


def _step(emb, opt, kjt, label, backward_guard=contextlib.nullcontext):
    loss = (score(emb(kjt).to_dict()) - label) ** 2
    opt.zero_grad()
    with backward_guard():
        loss.mean().backward()
    opt.step()
    if hasattr(emb, "observe_losses"):
        emb.observe_losses(loss.detach())


def _cuda_syncs_in_backward(emb, batches):
    """Host syncs CUDA reports (`set_sync_debug_mode("warn")`) during the backward passes."""
    import warnings
    opt = torch.optim.SGD(emb.parameters(), lr=0.05)
    seen = []

    @contextlib.contextmanager
    def counting():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
        seen.extend(w for w in caught if "synchroniz" in str(w.message))
    for kjt, label in batches:
        _step(emb, opt, kjt, label, counting)
    return len(seen)


def test_the_training_step_reads_nothing_back():
    """Forward, loss statistics and the optimizer step: no host sync at all; the backward:
    none beyond what the stock TorchRec lookup's own backward does (torch's dense embedding
    backward on CUDA may read a segment count back), measured on the same batches with the
    same tables unclustered."""
    emb = collection(DEVICE)
    emb._remapper.defer_checks = True          # what an accelerator does by default
    opt = torch.optim.SGD(emb.parameters(), lr=0.05)
    batches = [batch(DEVICE, s) for s in range(3)]
    train(emb, DEVICE, steps=1)                # warm-up: caches, allocations
    if DEVICE != "cuda":
        with no_host_sync():
            for kjt, label in batches:
                _step(emb, opt, kjt, label)
    else:
        from torchrec.modules.embedding_modules import EmbeddingBagCollection
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

        @contextlib.contextmanager
        def allow():                           # the backward is counted below
            torch.cuda.set_sync_debug_mode("default")
            yield
            torch.cuda.set_sync_debug_mode("error")
        try:
            for kjt, label in batches:
                _step(emb, opt, kjt, label, allow)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        stock = EmbeddingBagCollection(tables=emb.embedding_bag_configs(), device=torch.device(DEVICE))
        assert _cuda_syncs_in_backward(emb, batches) <= _cuda_syncs_in_backward(stock, batches)
    emb.check_inputs()
    assert emb.split_window("item").num_rows > 0
