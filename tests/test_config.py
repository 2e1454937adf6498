"""Config tree: YAML loading, --set overrides, validation messages naming field and fix."""
import pytest

from dist_fair.config import JobConfig, load_config, parse_override
from dist_fair.errors import ConfigError


def test_defaults_are_valid_and_round_trip(tmp_path):
    config = load_config()
    assert isinstance(config, JobConfig)
    config.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == config


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("run_dir: runs/x\nknn:\n  k: 40\n  index: hnsw\ncluster:\n  threshold: 0.5\n")
    config = load_config(path, ["knn.k=20", "train.lr=3e-4", "cluster.threshold=null", "eval.groups=[race]"])
    assert config.run_dir == "runs/x"
    assert config.knn.k == 20 and config.knn.index == "hnsw"
    assert config.train.lr == pytest.approx(3e-4)
    assert config.cluster.threshold is None
    assert config.eval.groups == ["race"]


@pytest.mark.parametrize("override, needle", [
    ("knn.k=1", "knn.k"),
    ("knn.index=annoy", "knn.index"),
    ("knn.k=abc", "knn.k"),
    ("data.preset=tiny", "data.preset"),
    ("fair.rho=[0.5, 0.6]", "fair.rho"),
    ("cluster.val_fraction=1.5", "cluster.val_fraction"),
    ("knn.nosuch=3", "knn.nosuch"),
    ("train.precision=fp8", "train.precision"),
])
def test_bad_values_name_the_field(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_override("knn.k")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_shards_source_requires_folder():
    with pytest.raises(ConfigError, match="data.shards"):
        load_config(None, ["data.source=shards"])


def test_preset_accepts_the_calibrated_presets_and_refuses_others():
    import pytest

    from dist_fair.config import load_config
    from dist_fair.errors import ConfigError

    assert load_config(None, ["data.preset=realistic"]).data.preset == "realistic"
    assert load_config(None, ["data.preset=my_fit.yaml"]).data.preset == "my_fit.yaml"
    with pytest.raises(ConfigError, match="data.preset"):
        load_config(None, ["data.preset=lfw-ish"])
