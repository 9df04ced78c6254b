"""trainer.config: YAML + dotted overrides, type checks, round trips, every shipped config."""
import dataclasses
import pathlib

import pytest
import yaml

from trainer.config import (ConfigError, TrainConfig, apply_overrides, config_to_dict,
                            load_config)

REPO = pathlib.Path(__file__).resolve().parents[2]
SHIPPED = sorted(str(p) for p in (REPO / "configs").glob("*.yaml"))

EXAMPLE_YAML = """\
# python -m trainer.main --config example.yaml
data:
  kind: synthetic
  synthetic: {users: 50, items: 40, interactions: 500}
model:
  name: neumf
  hidden: [16, 8]
embedding:
  method: hash
  hash_buckets: {items: 10, users: 20}
cel:
  users: {enabled: true, max_clusters: 8}
  reassign_at: [3, 7]
train:
  lr: 1e-3
  epochs: 2
tracking:
  loggers: [jsonl]
"""


def test_defaults():
    cfg = TrainConfig()
    assert cfg.data.kind == "synthetic" and cfg.data.synthetic.interactions == 100_000
    assert cfg.model.name == "mf" and cfg.model.hidden == [64, 32]
    assert cfg.cel.items.enabled and cfg.cel.items.max_clusters == 50
    assert not cfg.cel.users.enabled
    assert cfg.cel.reassign_rule == "reference" and cfg.cel.reassign_keep_prob == 0.31
    assert cfg.tracking.loggers == ["stdout", "jsonl", "wandb"] and cfg.tracking.wandb_mode is None
    assert load_config(None, []) == cfg


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = load_config(None, ["train.lr=0.5", "cel.users.enabled=true", "model.hidden=[3]",
                             "embedding.qr_collisions={items: 4}", "run.name=abc"])
    d = config_to_dict(cfg)
    assert d["train"]["lr"] == 0.5 and d["embedding"]["qr_collisions"] == {"items": 4}
    assert TrainConfig.from_dict(d) == cfg
    path = tmp_path / "dumped.yaml"
    path.write_text(yaml.safe_dump(d))
    assert load_config(str(path), []) == cfg


def test_partial_sections_merge_into_their_own_defaults(tmp_path):
    path = tmp_path / "example.yaml"
    path.write_text(EXAMPLE_YAML)
    cfg = load_config(str(path), [])
    assert cfg.data.synthetic.users == 50 and cfg.data.synthetic.clusters == 8   # default kept
    assert cfg.cel.users.enabled and cfg.cel.users.max_clusters == 8
    assert cfg.cel.items.enabled and cfg.cel.items.max_clusters == 50           # items default
    assert cfg.cel.reassign_at == [3, 7]
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.embedding.hash_buckets == {"items": 10, "users": 20}


def test_nested_overrides_scalars_lists_dicts(tmp_path):
    path = tmp_path / "example.yaml"
    path.write_text(EXAMPLE_YAML)
    cfg = load_config(str(path), [
        "train.lr=0.01", "cel.items.max_clusters=17", "model.name=two_tower",
        "model.hidden=[128, 64, 32]", "embedding.hash_buckets.items=1000",
        "cel.reassign_at=null", "train.max_steps=1e3", "run.resume=false",
        "tracking.loggers=[stdout]", "data.synthetic={seed: 3}", "ray.cpus_per_worker=1",
    ])
    assert cfg.train.lr == 0.01
    assert cfg.cel.items.max_clusters == 17 and cfg.cel.items.enabled
    assert cfg.model.name == "two_tower" and cfg.model.hidden == [128, 64, 32]
    assert cfg.embedding.hash_buckets == {"items": 1000, "users": 20}   # merged into the dict
    assert cfg.cel.reassign_at is None
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.run.resume is False
    assert cfg.tracking.loggers == ["stdout"]
    assert cfg.data.synthetic.seed == 3 and cfg.data.synthetic.users == 50
    assert cfg.ray.cpus_per_worker == 1.0 and isinstance(cfg.ray.cpus_per_worker, float)
    # later overrides win; the original object is untouched
    again = apply_overrides(cfg, ["train.lr=0.2", "train.lr=0.3"])
    assert again.train.lr == 0.3 and cfg.train.lr == 0.01


@pytest.mark.parametrize("override, fragment", [
    ("train.lrr=0.1", "'train.lrr'"),
    ("bogus=1", "'bogus'"),
    ("cel.items.max_cluster=3", "'cel.items.max_cluster'"),
])
def test_unknown_key_lists_valid_keys(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert fragment in msg and "valid keys" in msg
    if override.startswith("train."):
        assert "lr" in msg and "epochs" in msg
    if override.startswith("cel.items"):
        assert "max_clusters" in msg and "split_method" in msg


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  nam: mf\n")
    with pytest.raises(ConfigError, match=r"'model.nam'.*valid keys at model: name"):
        load_config(str(path), [])


@pytest.mark.parametrize("override, key", [
    ("train.lr=abc", "train.lr"),
    ("train.epochs=1.5", "train.epochs"),
    ("cel.items.enabled=3", "cel.items.enabled"),
    ("model.hidden=5", "model.hidden"),
    ("model.hidden=[1, x]", "model.hidden[1]"),
    ("embedding.hash_buckets={items: many}", "embedding.hash_buckets.items"),
    ("model.name=transformer", "model.name"),
    ("cel.items.split_method=random", "cel.items.split_method"),
    ("dist.batch_scope=everywhere", "dist.batch_scope"),
    ("train.seed=true", "train.seed"),
    ("cel=3", "cel"),
    ("model.hidden.x=1", "model.hidden"),
])
def test_wrong_type_or_value_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert key in str(err.value)


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("path", SHIPPED or ["<example>"],
                         ids=[pathlib.Path(p).name for p in SHIPPED] or ["example"])
def test_every_shipped_config_loads(path, tmp_path):
    """Every configs/*.yaml parses and type-checks, and starts with the command that runs it.
    With no shipped configs yet, the example written here stands in (never skipped)."""
    if path == "<example>":
        path = tmp_path / "example.yaml"
        path.write_text(EXAMPLE_YAML)
    cfg = load_config(str(path), [])
    assert isinstance(cfg, TrainConfig)
    assert TrainConfig.from_dict(config_to_dict(cfg)) == cfg
    first = pathlib.Path(path).read_text().lstrip().splitlines()[0]
    assert first.startswith("#"), f"{path} must start with a comment giving its command"


def test_config_dict_is_plain_data():
    d = config_to_dict(TrainConfig())
    yaml.safe_dump(d)                             # only plain types inside
    assert set(d) == {f.name for f in dataclasses.fields(TrainConfig)}


def test_every_key_the_ray_driver_reads_is_declared():
    """`python -m jobs.ray_train ... ray.num_cpus=2` failed with `unknown key 'ray.num_cpus'`:
    the driver read keys the typed config did not declare. Each now loads, typed, and the
    driver's fallbacks equal the declared defaults."""
    import re

    import jobs.ray_train as ray_train
    cfg = load_config(None, ["ray.num_cpus=2", "ray.storage_path=/tmp/ray_results",
                             "ray.checkpoints_to_keep=3", "ray.datasets=[train, val]",
                             "ray.shuffle_buffer_batches=8", "ray.data_progress_bars=true"])
    assert (cfg.ray.num_cpus, cfg.ray.storage_path, cfg.ray.checkpoints_to_keep) == (2.0, "/tmp/ray_results", 3)
    assert cfg.ray.datasets == ["train", "val"] and cfg.ray.shuffle_buffer_batches == 8
    assert cfg.ray.data_progress_bars is True
    defaults = config_to_dict(TrainConfig())
    source = pathlib.Path(ray_train.__file__).read_text()
    read = re.findall(r'get\(config, "(ray\.[a-z_]+)"(?:, ([^)]+))?\)', source)
    assert {key for key, _ in read} >= {"ray.num_cpus", "ray.storage_path", "ray.datasets",
                                         "ray.checkpoints_to_keep", "ray.data_progress_bars"}
    for key, fallback in read:
        declared = defaults["ray"][key.split(".")[1]]             # KeyError: undeclared
        if fallback:
            assert yaml.safe_load(fallback) == declared, key
    with pytest.raises(ConfigError, match="ray.num_cpu"):
        load_config(None, ["ray.num_cpu=2"])


def test_the_config_offers_exactly_the_library_choices():
    """One home for every string option: the typed config's choices are the library's Literal
    types (the sharding list used to lack table_column_wise, which the planner accepts)."""
    import typing
    from cel_torchrec import choices
    from trainer.config import ClusteringConfig, CelConfig, DistConfig
    def offered(cls, name):
        return typing.get_args(typing.get_type_hints(cls)[name])
    assert offered(ClusteringConfig, "grad_average") == choices.GRAD_AVERAGES
    assert offered(ClusteringConfig, "split_criterion") == choices.SPLIT_CRITERIA
    assert offered(ClusteringConfig, "split_method") == choices.SPLIT_METHODS
    assert offered(ClusteringConfig, "split_gradient") == choices.SPLIT_GRADIENTS
    assert offered(ClusteringConfig, "unseen_policy") == choices.UNSEEN_POLICIES
    assert offered(CelConfig, "reassign_mode") == ("auto", *choices.REASSIGN_MODES)
    assert offered(DistConfig, "sharding") == choices.SHARDING_TYPES
    assert offered(DistConfig, "batch_scope") == choices.BATCH_SCOPES
    assert load_config(None, ["dist.sharding=table_column_wise"]).dist.sharding == "table_column_wise"


def test_the_cel_sections_are_the_library_clustering_config():
    """One home for each clustering option: the trainer's `cel.<table>` section subclasses the
    library's ClusteringConfig and only adds `enabled` / `entity_bias`, so every library field
    (default, choices) is declared once, there, and a library option cannot go missing."""
    from cel_torchrec.modules import ClusteringConfig as Library
    from trainer.config import ClusteringConfig
    from trainer.builders import library_clustering
    assert issubclass(ClusteringConfig, Library)
    library = {f.name: f for f in dataclasses.fields(Library)}
    ours = {f.name: f for f in dataclasses.fields(ClusteringConfig)}
    assert all(ours[name] is f for name, f in library.items())      # inherited, not redeclared
    assert set(ours) - set(library) == {"enabled", "entity_bias"}
    # the library keeps max_clusters required; the sections' defaults come from CelConfig
    with pytest.raises(TypeError, match="max_clusters"):
        Library()
    defaults = TrainConfig().cel
    assert (defaults.items.enabled, defaults.items.max_clusters) == (True, 50)
    assert (defaults.users.enabled, defaults.users.max_clusters) == (False, 50)
    section = load_config(None, ["cel.items.split_gradient=mean", "cel.items.window_rows=77",
                                 "cel.items.grad_average=members"]).cel.items
    lib = library_clustering(section, 5)
    assert type(lib) is Library
    assert (lib.split_gradient, lib.window_rows, lib.grad_average, lib.entity_bias_column) == \
        ("mean", 77, "members", 5)
    assert lib.max_clusters == section.max_clusters
    assert {f.name: getattr(lib, f.name) for f in dataclasses.fields(Library)} == \
        {name: getattr(section, name) for name in library} | {"entity_bias_column": 5}


def test_the_derived_entity_bias_column_is_no_config_key():
    """`entity_bias_column` is the library's; the trainer derives it from `entity_bias`, so as
    before it is an unknown key, not listed, and left out of the config dict."""
    with pytest.raises(ConfigError, match="unknown key 'cel.items.entity_bias_column'") as err:
        load_config(None, ["cel.items.entity_bias_column=3"])
    assert "entity_bias_column" not in str(err.value).split("valid keys")[1]
    with pytest.raises(ConfigError, match="unknown key 'cel.users.entity_bias_column'"):
        TrainConfig.from_dict({"cel": {"users": {"entity_bias_column": 3}}})
    d = config_to_dict(TrainConfig())
    assert "entity_bias_column" not in d["cel"]["items"] and d["cel"]["items"]["entity_bias"] is False
    assert set(d["cel"]["items"]) == {
        "enabled", "max_clusters", "init_clusters", "grad_average", "split_criterion",
        "split_method", "splits_per_event", "entity_bias", "unseen_policy", "cold_interactions",
        "entity_bias_decay", "window_rows", "split_gradient", "bags", "map_dtype"}


def test_the_typed_config_loads_without_torch():
    """The Ray driver reads the typed config: it (and the library's ClusteringConfig it reuses)
    imports no torch."""
    import subprocess
    import sys
    code = "import sys, trainer.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
