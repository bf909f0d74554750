"""The two baselines of both papers: explicit CoT (also the teacher) and no CoT."""

from __future__ import annotations

from dataclasses import dataclass

from icot.trainer import TrainConfig, Trainer


@dataclass
class ExplicitConfig(TrainConfig):
    method: str = "explicit"


class ExplicitTrainer(Trainer):
    """Train on `input SEP cot SEP #### answer EOS`; the model writes its CoT, then answers."""

    config_class = ExplicitConfig

    def metadata(self) -> dict:
        return {"cot_removed": 0}


@dataclass
class NoCotConfig(TrainConfig):
    method: str = "nocot"


class NoCotTrainer(Trainer):
    """Train on `input SEP SEP #### answer EOS`; the model answers at once."""

    config_class = NoCotConfig
    drop_cot = True

    def metadata(self) -> dict:
        return {"cot_removed": "all"}
