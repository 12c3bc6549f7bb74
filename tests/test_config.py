"""The configuration model: YAML loading, validation messages, the shipped example configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from dq_ops.config import DQConfig
from dq_ops.errors import DQInputError

CONFIGS = Path(__file__).resolve().parents[1] / "deployments" / "configs"


def test_the_bundled_default_config_file_equals_the_defaults():
    assert DQConfig.from_yaml(CONFIGS / "fashion-mnist.yaml") == DQConfig()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_validate(path):
    assert isinstance(DQConfig.from_yaml(path), DQConfig)


def test_yaml_round_trip(tmp_path):
    config = DQConfig.model_validate({"sampling": {"ratios": [0.3, 0.05]}, "bins": {"num_bins": 4}})
    path = tmp_path / "c.yaml"
    path.write_text(config.to_yaml())
    assert DQConfig.from_yaml(path) == config
    assert config.sampling.ratios == [0.05, 0.3]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sampling: {ratios: [0.1, 1.5]}", "sampling.ratios"),
        ("bins: {num_bins: 0}", "bins.num_bins"),
        ("patches: {drop_ratio: 1.0}", "patches.drop_ratio"),
        ("cluster: {kind: address}", "cluster.address"),
        ("bins: {nmu_bins: 3}", "bins.nmu_bins"),
        ("dataset: {format: tfrecord}", "dataset.format"),
        ("- just a list", "expected a mapping"),
        ("bins: [unclosed", "not valid YAML"),
    ],
)
def test_bad_configs_name_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DQInputError) as error:
        DQConfig.from_yaml(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(DQInputError, match="nope.yaml: config file not found"):
        DQConfig.from_yaml(tmp_path / "nope.yaml")


def test_auto_bin_weights_follow_the_modality():
    from dq_ops.config import SamplingConfig

    assert SamplingConfig().rule_for("images") == "budget-aware"
    assert SamplingConfig().rule_for("texts") == "uniform"
    assert SamplingConfig(bin_weights="uniform").rule_for("images") == "uniform"
