"""Every experiment shipped in configs/ is a valid config: known keys, valid values, a method."""

from pathlib import Path

import pytest

from icot.cli import build_train_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    assert len(CONFIGS) >= 20


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds(path):
    trainer_cls, config = build_train_config(path, None, [])
    assert config.method in path.stem.replace("-", "_").split("_")
    assert config.out and Path(config.out).name == path.stem
