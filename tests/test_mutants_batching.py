"""Direct tests of data/batching.py written for its mutants (issue 50): hand-laid rows collated, padded and
cut, each result written out here. Apart from tests/test_mutants_data.py because these need torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icot.data.batching import batch_indices_by_length, collate, finish_batch, left_pad, remove_cot, row_sources
from icot.data.layout import EncodedSet

X = -100  # a label the loss ignores
P = 99  # the pad id the batches below use

# Three rows laid out as [input SEP cot SEP #### answer SEP], SEP = 0 and #### = 3:
#   row 0: input 10,     CoT 21 22 23 (n_prompt 2, n_cot 3)
#   row 1: input 11 12,  CoT 24       (n_prompt 3, n_cot 1)
#   row 2: input 13,     no CoT       (n_prompt 2, n_cot 0)
DATA = EncodedSet(
    tokens=np.array([10, 0, 21, 22, 23, 0, 3, 30, 0, 11, 12, 0, 24, 0, 3, 31, 0, 13, 0, 0, 3, 32, 0], np.int32),
    offsets=np.array([0, 9, 17, 23]), n_prompt=np.array([2, 3, 2]), n_cot=np.array([3, 1, 0]))
ORDER = [1, 0, 2]  # collated in this order: the middle row first, the one without a CoT last


def full_batch():
    return collate(DATA, ORDER, P)


def test_collate_right_pads_whole_rows_and_masks_the_prompt_and_padding_in_the_labels():
    batch = full_batch()
    assert set(batch) == {"input_ids", "attention_mask", "labels", "position_ids", "first_sep", "cot_len", "length"}
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].tolist() == [
        [11, 12, 0, 24, 0, 3, 31, 0, P],
        [10, 0, 21, 22, 23, 0, 3, 30, 0],
        [13, 0, 0, 3, 32, 0, P, P, P]]
    assert batch["attention_mask"].tolist() == [[1] * 8 + [0], [1] * 9, [1] * 6 + [0] * 3]
    assert batch["labels"].tolist() == [
        [X, X, X, 24, 0, 3, 31, 0, X],
        [X, X, 21, 22, 23, 0, 3, 30, 0],
        [X, X, 0, 3, 32, 0, X, X, X]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 0], list(range(9)), [0, 1, 2, 3, 4, 5, 0, 0, 0]]
    assert batch["first_sep"].tolist() == [2, 1, 1] and batch["cot_len"].tolist() == [1, 3, 0]
    assert batch["length"].tolist() == [8, 9, 6]


def test_collate_with_drop_cot_jumps_over_each_cot():
    batch = collate(DATA, np.array(ORDER), P, drop_cot=True)
    assert batch["input_ids"].tolist() == [
        [11, 12, 0, 0, 3, 31, 0],
        [10, 0, 0, 3, 30, 0, P],
        [13, 0, 0, 3, 32, 0, P]]
    assert batch["labels"].tolist() == [[X, X, X, 0, 3, 31, 0], [X, X, 0, 3, 30, 0, X], [X, X, 0, 3, 32, 0, X]]
    assert batch["cot_len"].tolist() == [0, 0, 0] and batch["length"].tolist() == [7, 6, 6]
    assert batch["first_sep"].tolist() == [2, 1, 1]


def test_row_sources_are_offsets_into_the_flat_tokens():
    source, valid, lengths = row_sources(DATA, np.array([2, 1]))
    assert source.tolist() == [[17, 18, 19, 20, 21, 22, 23, 24], [9, 10, 11, 12, 13, 14, 15, 16]]
    assert valid.tolist() == [[True] * 6 + [False] * 2, [True] * 8] and lengths.tolist() == [6, 8]
    source, valid, lengths = row_sources(DATA, np.array([0, 1]), drop_cot=True)
    assert source.tolist() == [[0, 1, 5, 6, 7, 8, 9], [9, 10, 11, 13, 14, 15, 16]]
    assert valid.tolist() == [[True] * 6 + [False], [True] * 7] and lengths.tolist() == [6, 7]


def test_finish_batch_keeps_given_positions_and_works_on_the_device_of_its_tensors():
    ids, lengths, first_sep, cot_len = torch.tensor([[5, 0, 6], [7, 0, P]]), torch.tensor([3, 2]), torch.tensor([1, 1]), \
        torch.tensor([1, 0])
    positions = torch.tensor([[0, 4, 5], [0, 1, 0]])
    batch = finish_batch(ids, lengths, first_sep, cot_len, positions)
    assert batch["position_ids"] is positions and batch["labels"].tolist() == [[X, X, 6], [X, X, X]]
    meta = finish_batch(*(t.to("meta") for t in (ids, lengths, first_sep, cot_len)))
    assert all(t.device.type == "meta" for t in meta.values())


def test_remove_cot_from_the_left_renumbers_positions_and_clips_to_each_cot():
    batch = remove_cot(full_batch(), torch.tensor([1, 2, 5]))  # the defaults: left, no kept positions, pad 0
    assert batch["input_ids"].tolist() == [
        [11, 12, 0, 0, 3, 31, 0],
        [10, 0, 23, 0, 3, 30, 0],
        [13, 0, 0, 3, 32, 0, 0]]
    assert batch["labels"].tolist() == [[X, X, X, 0, 3, 31, 0], [X, X, 23, 0, 3, 30, 0], [X, X, 0, 3, 32, 0, X]]
    assert batch["position_ids"].tolist() == [list(range(7)), list(range(7)), [0, 1, 2, 3, 4, 5, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1] * 7, [1] * 6 + [0]]
    assert batch["cot_len"].tolist() == [0, 1, 0] and batch["length"].tolist() == [7, 7, 6]
    assert batch["first_sep"].tolist() == [2, 1, 1] and "values" not in batch


def test_remove_cot_from_the_right_takes_the_last_cot_tokens():
    batch = remove_cot(full_batch(), torch.tensor([1, 2, 0]), side="right", pad_id=P)
    assert batch["input_ids"].tolist() == [
        [11, 12, 0, 0, 3, 31, 0],
        [10, 0, 21, 0, 3, 30, 0],
        [13, 0, 0, 3, 32, 0, P]]
    assert batch["cot_len"].tolist() == [0, 1, 0]


@pytest.mark.parametrize("side, placement, positions", [
    # the token before the removed span (the first SEP for left removal) moves up to the last removed slot
    ("left", None, [[0, 1, 3, 4, 5, 6, 7], [0, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 0]]),
    ("left", "in_place", [[0, 1, 2, 4, 5, 6, 7], [0, 1, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 0]]),
    ("right", "authors", [[0, 1, 3, 4, 5, 6, 7], [0, 1, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 0]]),
])
def test_remove_cot_with_keep_position_keeps_the_positions_of_the_whole_cot(side, placement, positions):
    extra = {} if placement is None else {"gap_placement": placement}  # None: the default, "authors"
    batch = remove_cot(full_batch(), torch.tensor([1, 2, 0]), side=side, keep_position=True, **extra)
    assert batch["position_ids"].tolist() == positions


def test_remove_cot_moves_per_token_values_with_their_tokens():
    batch = full_batch()
    values = batch["input_ids"].float().masked_fill(batch["attention_mask"] == 0, float("nan"))
    batch = remove_cot({**batch, "values": values}, torch.tensor([1, 2, 5]))
    # the token before the removed span takes the last removed token's value (24, 22); no value: NaN
    assert batch["values"].nan_to_num(-1).tolist() == [
        [11, 12, 24, 0, 3, 31, 0],
        [10, 22, 23, 0, 3, 30, 0],
        [13, 0, 0, 3, 32, 0, -1]]


def test_left_pad_puts_each_prompt_at_the_right_end():
    ids, mask = left_pad([[5, 6, 7], [8]], 9)
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == torch.long and mask.dtype == torch.long


def test_batches_by_length_are_longest_first_and_stable_among_equal_lengths():
    assert [b.tolist() for b in batch_indices_by_length(np.array([3, 7, 5, 7, 1]), 2)] == [[1, 3], [2, 0], [4]]
    # a sort that is not stable reorders ties in an array this long
    batches = batch_indices_by_length(np.tile([2, 1], 100), 100)
    assert [b.tolist() for b in batches] == [list(range(0, 200, 2)), list(range(1, 200, 2))]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_remove_cot_from_a_cuda_batch_with_counts_on_the_cpu():
    batch = {key: value.cuda() for key, value in full_batch().items()}
    out = remove_cot(batch, torch.tensor([1, 2, 5]), keep_position=True)
    assert all(value.device.type == "cuda" for value in out.values())
    assert out["input_ids"].tolist() == [[11, 12, 0, 0, 3, 31, 0], [10, 0, 23, 0, 3, 30, 0], [13, 0, 0, 3, 32, 0, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 3, 4, 5, 6, 7], [0, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 0]]
