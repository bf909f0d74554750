"""Weight-decay groups: every weight decays (ICoT-SI's and Coconut's authors), or matrices only, as
transformers' Trainer groups them (CODI's authors, CODI's default here)."""

import pytest
import torch

from icot.api import trainer_for
from icot.data.format import write_examples
from conftest import mult_examples


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wd")
    write_examples(folder / "train.txt", mult_examples(2, 2, 16, seed=0))
    return folder


def step_with_zero_gradients(trainer) -> dict:
    """{name: (before, after)} over one AdamW step where every gradient is 0: Adam's update is then 0,
    and only decoupled weight decay moves a weight, by a factor (1 - lr * weight_decay)."""
    trainer.load_data()
    optimizer = trainer.new_optimizer()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for p in trainer.model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return {n: (before[n], p.detach()) for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("method, matrices_only", [("explicit", False), ("codi", True)])
def test_which_weights_decay(data, tmp_path, method, matrices_only):
    settings = {"method": method, "data": str(data), "out": str(tmp_path / "run"), "model": "micro", "lr": 0.1,
                "weight_decay": 0.5, "cpu": True}
    trainer = trainer_for(settings)
    assert trainer.config.decay_matrices_only is matrices_only  # each method's default
    moved = step_with_zero_gradients(trainer)
    decayed = 1 - 0.1 * 0.5
    norms = {f"{m}.weight" for m, module in trainer.model.named_modules() if isinstance(module, torch.nn.LayerNorm)}
    undecayed = norms | {n for n in moved if n.endswith(".bias")} if matrices_only else set()
    assert len(norms) >= 5 and (not matrices_only or len(undecayed) > len(norms))  # 2 blocks x 2, ln_f (, CODI's)
    for name, (before, after) in moved.items():
        expected = before if name in undecayed else before * decayed
        assert torch.allclose(after, expected, rtol=1e-6, atol=1e-7), name
