"""No host sync in the training step: the step of ClusteredEmbeddingBagCollection (lookup,
backward with its gradient hook, loss statistics, an open split window) and the trainer's step
run under `tests.host_sync.no_host_sync`, the CPU stand-in for CUDA's sync debug mode, with the
input checks deferred as on an accelerator; the deferred checks still catch bad input, and the
deferred path computes what the host-checked one does."""
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cel_torchrec.modules import ClusteredEmbeddingBagCollection, ClusteringConfig
from tests.host_sync import HostSync, no_host_sync

D, N = 4, 40


def collection(pooling=PoolingType.SUM, defer=True, **clustering):
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name="t", embedding_dim=D, num_embeddings=N,
                                 feature_names=["a", "b"], pooling=pooling)]
    cfg = {"max_clusters": 8, "init_clusters": 3, **clustering}
    emb = ClusteredEmbeddingBagCollection(tables, {"t": ClusteringConfig(**cfg)})
    emb._remapper.defer_checks = defer
    emb.begin_split_window("t")
    return emb


def kjt(values, lengths):
    k = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor(values), lengths=torch.tensor(lengths))
    k.length_per_key(), k.offset_per_key()     # the layout a data loader computes on the host
    return k


ONE_HOT = ([3, 7, 7, 30, 1, 2, 39, 0], [1] * 8)                 # 4 samples, 1 id per bag
MULTI_HOT = ([3, 7, 7, 30, 1, 2, 39, 0, 5], [2, 0, 3, 1, 1, 2])  # 3 samples, bags of 0..3 ids


def step(emb, batch):
    d = emb(batch).to_dict()
    loss = (d["a"] * d["b"]).sum(1) ** 2
    loss.mean().backward()
    emb.observe_losses(loss.detach())


def results(emb):
    rows = emb.window_rows("t")
    return [emb.table_weight("t").grad.clone(), *rows]


def test_the_detector_catches_host_reads_and_data_dependent_shapes():
    x = torch.arange(5)
    for read in (lambda: x.sum().item(), lambda: x.tolist(), lambda: float(x[0]),
                 lambda: x[x > 2], lambda: torch.unique(x), lambda: torch.bincount(x),
                 lambda: bool(x.any())):
        with pytest.raises(HostSync), no_host_sync():
            read()
    with no_host_sync():        # fixed-shape device work passes
        torch.zeros(5).index_add_(0, x, torch.ones(5)).cumsum(0)


@pytest.mark.parametrize("bags", [ONE_HOT, MULTI_HOT], ids=["one_hot", "multi_hot"])
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("clustering", [
    {"grad_average": "batch", "split_criterion": "loss"},
    {"grad_average": "members", "split_criterion": "grad_norm", "entity_bias_column": 0}])
def test_a_training_step_reads_nothing_back_and_matches_the_host_checked_step(bags, pooling, clustering):
    emb = collection(pooling, **clustering)
    for _ in range(2):       # the second step starts from the cached member counts
        batch = kjt(*bags)
        with no_host_sync():
            step(emb, batch)
    emb.check_inputs()
    ref = collection(pooling, defer=False, **clustering)
    for _ in range(2):
        step(ref, kjt(*bags))
    for got, want in zip(results(emb), results(ref)):
        torch.testing.assert_close(got, want)
    assert emb.split_window("t").num_rows > 0


def test_a_full_window_records_as_before_without_reading_its_row_count():
    emb, batch = collection(window_rows=3), kjt(*MULTI_HOT)
    with no_host_sync():
        step(emb, batch)
    ref = collection(defer=False, window_rows=3)
    step(ref, kjt(*MULTI_HOT))
    for got, want in zip(results(emb), results(ref)):
        torch.testing.assert_close(got, want)
    assert emb.split_window("t").num_rows == 3 and emb.split_window("t").dropped > 0


def test_deferred_checks_report_an_id_out_of_range_at_check_inputs():
    emb, batch = collection(), kjt([3, N + 5, 1, 2], [1, 1, 1, 1])
    with no_host_sync():
        emb(batch)
    with pytest.raises(IndexError, match=rf"feature 'a': ids must be in \[0, {N}\), got ids in \[3, {N + 5}\]"):
        emb.check_inputs()
    with pytest.raises(IndexError, match="ids must be in"):     # on CPU: at once
        collection(defer=False)(kjt([3, N + 5, 1, 2], [1, 1, 1, 1]))


def test_bags_taken_as_one_hot_unread_are_reported_and_multi_hot_tables_are_exact():
    # feature a: lengths [2, 1, 0], 3 ids in 3 bags: taken as one-hot without reading the bags
    batch = ([3, 7, 9, 1, 2, 5], [2, 1, 0, 1, 1, 1])
    emb = collection()
    step(emb, kjt(*batch))
    with pytest.raises(ValueError, match="bags='multi_hot'"):
        emb.check_inputs()
    exact, exact_batch = collection(bags="multi_hot"), kjt(*batch)
    with no_host_sync():
        step(exact, exact_batch)
    exact.check_inputs()
    ref = collection(defer=False)            # the host check reads the bags
    step(ref, kjt(*batch))
    for got, want in zip(results(exact), results(ref)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mode", ["exact", "lite"])
def test_the_trainers_step_reads_nothing_back(tmp_path, mode):
    from torch.utils._python_dispatch import _disable_current_modes

    from tests.trainer.test_train_e2e import tiny_config
    from trainer.dist import init_distributed
    from trainer.loop import TrainRecipe
    from trainer.sources import synchronised
    recipe = TrainRecipe(tiny_config(tmp_path, "train.fused_tables=off", f"cel.reassign_mode={mode}"),
                         init_distributed())
    recipe.setup()
    recipe.cel._remapper.defer_checks = True
    torch_step = recipe.optimizer.step

    def unchecked_step(*a, **k):   # torch's Adam reads its CPU step counters: torch's own concern
        with _disable_current_modes(), torch._C.DisableTorchFunction():
            return torch_step(*a, **k)
    recipe.optimizer.step = unchecked_step
    batches = iter(synchronised(recipe.train_source.epoch(0), recipe.env))
    recipe.emb.begin_split_window("item")
    losses = []
    for _ in range(3):
        batch = next(batches)
        with no_host_sync():
            losses.append(recipe._train_step(*batch))
    recipe.cel.check_inputs()
    assert all(torch.is_tensor(x) and x.dim() == 0 for x in losses)
    assert recipe.emb.split_window("item").num_rows > 0
