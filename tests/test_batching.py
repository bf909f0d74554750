import numpy as np
import pytest
import torch

from icot.data.batching import IGNORE, collate, remove_cot
from icot.data.format import Example
from icot.data.layout import Layout, encode
from icot.data.tokenizers import word_tokenizer


def random_examples(rng, n):
    examples = []
    for _ in range(n):
        words = lambda k: " ".join(str(rng.integers(10)) for _ in range(k))
        examples.append(Example(words(rng.integers(1, 6)), words(rng.integers(0, 12)), words(rng.integers(1, 5))))
    return examples


@pytest.fixture()
def data():
    rng = np.random.default_rng(0)
    examples = random_examples(rng, 64)
    tokenizer = word_tokenizer(["0 1 2 3 4 5 6 7 8 9"])
    layout = Layout.for_tokenizer(tokenizer)
    return encode(tokenizer, layout, examples), layout


def reference_removal(row, n_prompt, n_cot, n, side, keep_position, placement="authors"):
    """Plain per-example removal: the spec, written as simply as possible. Positions with
    keep_position follow the authors' arithmetic (Internalize_CoT_Step_by_Step, src/train.py):
    `position_ids[removal_from-1:] += removal_to - removal_from`, then cut to the new length."""
    n = min(n, n_cot)
    start = n_prompt if side == "left" else n_prompt + n_cot - n
    kept = [i for i in range(len(row)) if not start <= i < start + n]
    ids = [row[i] for i in kept]
    positions = list(range(len(row)))
    if keep_position and placement == "authors":
        positions[start - 1 :] = [p + n for p in positions[start - 1 :]]
    positions = kept if keep_position and placement == "in_place" else positions[: len(kept)]
    labels = [t if i >= n_prompt else IGNORE for i, t in enumerate(ids)]
    return ids, positions, labels


def test_keep_position_puts_the_gap_before_the_first_sep():
    """A toy row `q0 q1 SEP c0 c1 c2 SEP #### a EOS` (indices 0..9) with 2 CoT tokens removed from the left:
    SEP moves to position 4 (the slot of c1, the last removed) and c2 keeps position 5, where it was
    predicted with the whole CoT; from the right, c0 moves to 4 and the second SEP keeps 6."""
    tokenizer = word_tokenizer(["q c a"])
    layout = Layout.for_tokenizer(tokenizer)
    data = encode(tokenizer, layout, [Example("q q", "c c c", "a")])
    batch = collate(data, [0], layout.pad_id)
    left = remove_cot(batch, torch.tensor([2]), "left", keep_position=True, pad_id=layout.pad_id)
    assert left["position_ids"][0].tolist() == [0, 1, 4, 5, 6, 7, 8, 9]
    right = remove_cot(batch, torch.tensor([2]), "right", keep_position=True, pad_id=layout.pad_id)
    assert right["position_ids"][0].tolist() == [0, 1, 2, 5, 6, 7, 8, 9]
    whole = remove_cot(batch, torch.tensor([3]), "left", keep_position=True, pad_id=layout.pad_id)
    assert whole["position_ids"][0].tolist() == [0, 1, 5, 6, 7, 8, 9]


def test_collate_matches_rows(data):
    data, layout = data
    idx = [5, 0, 17, 3]
    batch = collate(data, idx, layout.pad_id)
    for r, i in enumerate(idx):
        n = len(data.row(i))
        assert batch["input_ids"][r, :n].tolist() == data.row(i).tolist()
        assert batch["attention_mask"][r].sum() == n
        assert (batch["labels"][r, : data.n_prompt[i]] == IGNORE).all()
        assert batch["labels"][r, data.n_prompt[i] : n].tolist() == data.row(i)[data.n_prompt[i] :].tolist()
    nocot = collate(data, idx, layout.pad_id, drop_cot=True)
    for r, i in enumerate(idx):
        row = data.row(i).tolist()
        expected = row[: data.n_prompt[i]] + row[data.n_prompt[i] + data.n_cot[i] :]
        assert nocot["input_ids"][r, : len(expected)].tolist() == expected


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("keep_position,placement", [(False, "authors"), (True, "authors"), (True, "in_place")])
def test_vectorised_removal_matches_per_example_reference(data, side, keep_position, placement):
    data, layout = data
    gen = torch.Generator().manual_seed(1)
    for trial in range(20):
        idx = torch.randperm(len(data), generator=gen)[:16].tolist()
        batch = collate(data, idx, layout.pad_id)
        n = torch.randint(0, 15, (16,), generator=gen)  # often beyond the CoT: clipping
        out = remove_cot(batch, n, side, keep_position, layout.pad_id, placement)
        for r, i in enumerate(idx):
            ids, positions, labels = reference_removal(data.row(i).tolist(), int(data.n_prompt[i]), int(data.n_cot[i]),
                                                       int(n[r]), side, keep_position, placement)
            length = len(ids)
            assert out["length"][r] == length
            assert out["input_ids"][r, :length].tolist() == ids
            assert out["labels"][r, :length].tolist() == labels
            assert (out["labels"][r, length:] == IGNORE).all() and (out["attention_mask"][r, length:] == 0).all()
            assert out["position_ids"][r, :length].tolist() == positions
            assert out["cot_len"][r] == data.n_cot[i] - min(int(n[r]), int(data.n_cot[i]))
