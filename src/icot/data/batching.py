"""Turning encoded rows into padded tensors, and removing CoT tokens from whole batches.

Everything here works on whole batches with tensor operations: no Python loop over examples.
"""

from __future__ import annotations

import numpy as np
import torch

from icot.data.layout import EncodedSet

IGNORE = -100


def collate(data: EncodedSet, indices, pad_id: int, drop_cot: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded batch of full sequences (or, with drop_cot, sequences without their CoT).

    Returns input_ids, attention_mask, labels (-100 on the prompt and padding), position_ids,
    first_sep (index of the first SEP), cot_len and length per row.
    """
    indices = np.asarray(indices, dtype=np.int64)
    source, valid, lengths = row_sources(data, indices, drop_cot)
    n_cot = np.zeros_like(lengths) if drop_cot else data.n_cot[indices]
    ids = np.where(valid, data.tokens[np.where(valid, source, 0)], pad_id)
    return finish_batch(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(lengths),
                        torch.from_numpy(data.n_prompt[indices] - 1), torch.from_numpy(n_cot))


def row_sources(data: EncodedSet, indices: np.ndarray, drop_cot: bool = False):
    """Where each column of collate's right-padded batch of rows `indices` reads in data.tokens:
    (source [rows, width], valid [rows, width]: inside its row, lengths [rows]). With drop_cot a row
    reads its prompt, then jumps over its CoT."""
    starts = data.offsets[indices]
    lengths = data.offsets[indices + 1] - starts
    n_prompt, n_cot = data.n_prompt[indices], data.n_cot[indices]
    if drop_cot:
        lengths = lengths - n_cot
    cols = np.arange(int(lengths.max()))[None, :]
    source = starts[:, None] + cols
    if drop_cot:
        source = source + np.where(cols >= n_prompt[:, None], n_cot[:, None], 0)
    return source, cols < lengths[:, None], lengths


def finish_batch(input_ids, lengths, first_sep, cot_len, position_ids=None) -> dict[str, torch.Tensor]:
    cols = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
    attention_mask = (cols < lengths[:, None]).long()
    labels = input_ids.masked_fill((cols <= first_sep[:, None]) | (attention_mask == 0), IGNORE)
    if position_ids is None:
        position_ids = cols.expand_as(input_ids) * attention_mask
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "position_ids": position_ids,
        "first_sep": first_sep,
        "cot_len": cot_len,
        "length": lengths,
    }


def remove_cot(batch: dict[str, torch.Tensor], n_remove: torch.Tensor, side: str = "left",
               keep_position: bool = False, pad_id: int = 0, gap_placement: str = "authors") -> dict[str, torch.Tensor]:
    """Delete `n_remove[i]` CoT tokens from row i (clipped to its CoT), from the left or right end.

    Without keep_position, positions are renumbered 0..n-1. With it, as in the authors' code
    (`position_ids[b, removal_from-1:] += removal_to - removal_from`), every kept token keeps its
    original position except the one just before the removed span (the first SEP for left
    removal), which moves up to the slot of the last removed token. So each kept token is
    predicted from the same position that predicted it with the whole CoT. gap_placement "in_place"
    leaves that token where it was too: every kept token keeps its position.
    A float `values` tensor in the batch (one value per token) moves with the tokens.
    """
    ids, lengths, first_sep, cot_len = batch["input_ids"], batch["length"], batch["first_sep"], batch["cot_len"]
    n_remove = torch.minimum(n_remove.to(cot_len.device), cot_len)
    cot_start = first_sep + 1
    start = cot_start if side == "left" else cot_start + cot_len - n_remove
    end = start + n_remove
    cols = torch.arange(ids.shape[1], device=ids.device)[None, :]
    keep = (cols < lengths[:, None]) & ~((cols >= start[:, None]) & (cols < end[:, None]))
    new_lengths = lengths - n_remove
    width = int(new_lengths.max())
    dest = keep.long().cumsum(1) - 1
    rows, src_cols = keep.nonzero(as_tuple=True)
    new_ids = ids.new_full((ids.shape[0], width), pad_id)
    new_ids[rows, dest[rows, src_cols]] = ids[rows, src_cols]
    position_ids = None
    if keep_position:
        position_ids = torch.zeros_like(new_ids)
        before_span = (src_cols == start[rows] - 1) & (n_remove[rows] > 0) & (gap_placement == "authors")
        position_ids[rows, dest[rows, src_cols]] = batch["position_ids"][rows, src_cols] + n_remove[rows] * before_span
    new_batch = finish_batch(new_ids, new_lengths, first_sep, cot_len - n_remove, position_ids)
    if "values" in batch:
        new_batch["values"] = _move_values(batch["values"], start, end, rows, src_cols, dest[rows, src_cols], new_ids.shape)
    return new_batch


def _move_values(values, start, end, rows, src_cols, dest_cols, shape) -> torch.Tensor:
    """Per-token values (NaN: none) moved with their tokens; the token before the removed span takes
    the last removed token's value, as it takes that token's position."""
    values = values.clone()
    moved = (end > start).nonzero(as_tuple=True)[0]
    values[moved, start[moved] - 1] = values[moved, end[moved] - 1]
    out = values.new_full(shape, float("nan"))
    out[rows, dest_cols] = values[rows, src_cols]
    return out


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask for generation."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def batch_indices_by_length(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Indices grouped into batches of similar length (for evaluation), longest first."""
    order = np.argsort(-lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
