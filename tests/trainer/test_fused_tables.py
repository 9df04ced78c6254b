"""Fused tables in every run: single-process runs shard their tables with TorchRec's DMP on a
1-rank group (FBGEMM's fused kernels and optimizer), so a step touches only the batch's rows;
the torch-optimizer path is kept only where FBGEMM has no fused kind (decided, with its reason,
by `trainer.tables.choose_table_update`)."""
import pytest
import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel

from cel_torchrec.distributed import ShardedClusteredEmbeddingBagCollection
from tests.trainer.test_train_e2e import ROOT, TINY
from trainer.config import load_config
from trainer.dist import init_distributed
from trainer.loop import TrainRecipe
from trainer.tables import choose_table_update


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")      # one tiny synthetic dataset for the module


def config(tmp_path, cache, *extra):
    return load_config(str(ROOT / "configs/synthetic_small.yaml"),
                       [*TINY, f"run.dir={tmp_path / 'runs'}", f"data.cache_dir={cache}",
                        "run.name=fused", *extra])


def recipe_for(tmp_path, cache, *extra) -> TrainRecipe:
    recipe = TrainRecipe(config(tmp_path, cache, *extra), init_distributed())
    recipe.setup()
    return recipe


def _model_params(recipe) -> int:
    return sum(p.numel() for g in recipe.optimizer.param_groups for p in g["params"])


def test_single_process_cel_and_full_runs_use_fused_tables(tmp_path, cache, capsys):
    cel = recipe_for(tmp_path, cache)                                  # adagrad (the config's)
    assert isinstance(cel.emb, DistributedModelParallel)
    assert isinstance(cel.cel, ShardedClusteredEmbeddingBagCollection)   # phases drive it
    assert (cel.tables.fused, cel.tables.kind, cel.env.world_size) == (True, "EXACT_ADAGRAD", 1)
    # the dense optimizer holds the interaction model only: the tables update in backward
    assert _model_params(cel) == sum(p.numel() for p in cel.model.parameters())
    assert not isinstance(cel.model, nn.parallel.DistributedDataParallel)   # one rank: no DDP
    full = recipe_for(tmp_path, cache, "embedding.method=full", "run.name=full",
                      "train.optimizer=sgd")
    assert isinstance(full.emb, DistributedModelParallel) and full.cel is None
    assert _model_params(full) == sum(p.numel() for p in full.model.parameters())
    out = capsys.readouterr().out
    assert "[train] tables: fused FBGEMM EXACT_ADAGRAD (DMP, 1 rank, table_wise)" in out
    assert "[train] tables: fused FBGEMM EXACT_SGD (DMP, 1 rank, table_wise)" in out
    assert init_distributed().backend is None     # the recipe's 1-rank group is its own business
    cel.cleanup(), full.cleanup()


def _tables(recipe) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in recipe.emb.state_dict().items():
        if key.endswith(".weight"):
            shards = value.local_shards()
            assert len(shards) == 1 and shards[0].tensor.shape == value.size()   # 1 rank: all
            out[key.split(".")[-2]] = shards[0].tensor.detach().clone()
    return out


@pytest.mark.parametrize("method", ["full", "hash", "qr"])
def test_a_fused_step_changes_only_the_batch_rows(tmp_path, cache, method):
    extra = {"full": [], "hash": ["embedding.hash_buckets={users: 64, items: 32}"],
             "qr": ["embedding.qr_collisions={items: 8}"]}[method]
    recipe = recipe_for(tmp_path, cache, f"embedding.method={method}", f"run.name={method}", *extra)
    assert recipe.tables.fused and isinstance(recipe.emb, DistributedModelParallel)
    batches = iter(recipe.train_source.epoch(0))
    recipe._train_step(*next(batches))        # the second step then starts with optimizer state
    kjt, dense, label = next(batches)
    before = _tables(recipe)
    recipe._train_step(kjt, dense, label)
    after = _tables(recipe)
    ids = {"user": kjt["user_id"].values().long(), "item": kjt["item_id"].values().long()}
    if method == "hash":
        from cel_torchrec.modules.baselines import hash_ids
        ids = {"user": hash_ids(ids["user"], 64, 0), "item": hash_ids(ids["item"], 32, 1)}
    if method == "qr":
        ids = {"user": ids["user"], "item__q": ids["item"] // 8, "item__r": ids["item"] % 8}
    assert set(after) == set(ids)
    for table, rows in ids.items():
        touched = torch.zeros(before[table].shape[0], dtype=torch.bool)
        touched[rows] = True
        changed = (after[table] != before[table]).any(1)
        assert torch.equal(after[table][~touched], before[table][~touched]), table   # bitwise
        assert changed[touched].all(), table          # and the batch's rows did move
        if method == "full":
            assert (~touched).any()
    recipe.cleanup()


def test_fused_adagrad_matches_torch_adagrad(tmp_path, cache):
    """EXACT_ADAGRAD gets torch's eps (1e-10) and starts its accumulator at 0, as torch does:
    the full model's tables after 20 steps agree to float rounding."""
    steps = ["embedding.method=full", "train.max_steps=20", "train.epochs=1"]
    fused = recipe_for(tmp_path, cache, *steps, "run.name=a")
    dense = recipe_for(tmp_path, cache, *steps, "run.name=b", "train.fused_tables=off")
    assert fused.tables.fused and not dense.tables.fused
    fused.train(), dense.train()
    a = _tables(fused)
    for table, weight in dense.emb.state_dict().items():
        name = table.split(".")[-2]
        torch.testing.assert_close(a[name], weight, atol=1e-5, rtol=0)
    fused.cleanup(), dense.cleanup()


def _cfg(*extra):
    return load_config(str(ROOT / "configs/synthetic_small.yaml"), list(extra))


class _WithBias(nn.Module):
    entity_biases = nn.ParameterDict({"item": nn.Parameter(torch.zeros(3))})


def test_the_torch_path_is_kept_only_where_fbgemm_has_no_fused_kind():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    plain = nn.Module()
    adam = choose_table_update(_cfg("train.optimizer=adam"), cpu, 1, plain)
    assert not adam.fused and not adam.sharded and adam.kind == "Adam"
    assert "fused ADAM runs on CUDA only" in adam.reason
    assert choose_table_update(_cfg("train.optimizer=adam"), cuda, 1, plain).kind == "ADAM"
    bias = choose_table_update(_cfg(), cpu, 1, _WithBias())
    assert not bias.fused and "entity_bias" in bias.reason
    wd = choose_table_update(_cfg("train.weight_decay=0.01"), cpu, 1, plain)
    assert not wd.fused and "weight_decay" in wd.reason
    dp = choose_table_update(_cfg("dist.sharding=data_parallel"), cpu, 1, plain)
    assert not dp.fused and not dp.sharded
    line = adam.describe(1, "table_wise")
    assert line.startswith("[train] tables: torch Adam (dense: every row, every step) because ")
    # on: fused or an error saying why not; off: the torch optimizer (YAML's on/off are bools)
    assert choose_table_update(_cfg("train.fused_tables=on"), cpu, 1, plain).fused
    with pytest.raises(ValueError, match="fused_tables=on, but train.optimizer=adam"):
        choose_table_update(_cfg("train.fused_tables=on", "train.optimizer=adam"), cpu, 1, plain)
    off = choose_table_update(_cfg("train.fused_tables=off"), cpu, 1, plain)
    assert not off.fused and off.reason == "train.fused_tables=off"
    # several processes always shard: what keeps the tables off the fused kernels is an error
    assert choose_table_update(_cfg(), cpu, 2, plain).fused
    with pytest.raises(ValueError, match="runs on CUDA only"):
        choose_table_update(_cfg("train.optimizer=adam"), cpu, 2, plain)
    with pytest.raises(ValueError, match="one process only"):
        choose_table_update(_cfg("train.fused_tables=off"), cpu, 2, plain)


def test_resume_refuses_a_checkpoint_with_the_other_kind_of_tables(tmp_path, cache):
    first = recipe_for(tmp_path, cache, "embedding.method=full", "train.max_steps=2")
    first.train()                                  # writes runs/fused/checkpoint (sharded)
    assert (tmp_path / "runs" / "fused" / "checkpoint" / "sharded").is_dir()
    again = recipe_for(tmp_path, cache, "embedding.method=full", "train.max_steps=2",
                       "run.resume=true")
    assert again.step == first.step == 2
    with pytest.raises(ValueError, match="holds sharded tables, this run has torch ones"):
        recipe_for(tmp_path, cache, "embedding.method=full", "run.resume=true",
                   "train.fused_tables=off")
    first.cleanup(), again.cleanup()
