"""A deliberately plain stepwise-internalization training loop: the baseline our Trainer is measured against.

It does what the papers' original code does, the straightforward way: batches in random order padded
to the longest row, CoT tokens removed one example at a time with a Python loop and torch.cat (the
separator positions found per row), eager attention, and a bare PyTorch loop (AdamW, clipping).
It computes the same loss as our loop on the same rows, so the two can be compared step for step.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

IGNORE = -100


def sep_position(row: torch.Tensor, sep_id: int, skip: int = 0) -> int:
    """Index of the (skip+1)-th separator in one row."""
    return int((row == sep_id).nonzero()[skip])


def pad_rows(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)


def plain_collate(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, lengths) of rows padded to the longest one."""
    tensors = [torch.tensor(r, dtype=torch.long) for r in rows]
    return pad_rows(tensors, pad_id), torch.tensor([len(r) for r in rows])


def remove_per_example(ids: torch.Tensor, lengths: torch.Tensor, n_remove: torch.Tensor, sep_id: int,
                       bos: bool, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Delete n_remove[i] CoT tokens from the left of row i's CoT (clipped to it), one row at a time.

    The CoT runs from after the first SEP to the second SEP (a BOS equal to SEP is not in our
    layout, so the first SEP is the first occurrence, after a BOS when there is one).
    """
    kept_rows, kept_lengths = [], []
    for i in range(ids.shape[0]):
        row = ids[i, : int(lengths[i])]
        first = sep_position(row[1:] if bos else row, sep_id) + int(bos)
        second = first + 1 + sep_position(row[first + 1 :], sep_id)
        start, end = first + 1, min(first + 1 + int(n_remove[i]), second)
        kept = torch.cat((row[:start], row[end:]), dim=-1)
        kept_rows.append(kept)
        kept_lengths.append(len(kept))
    return pad_rows(kept_rows, pad_id), torch.tensor(kept_lengths)


def plain_labels(ids: torch.Tensor, lengths: torch.Tensor, sep_id: int, bos: bool) -> torch.Tensor:
    """Targets: every token after the first SEP, padding ignored; found row by row."""
    labels = ids.clone()
    for i in range(ids.shape[0]):
        first = sep_position(ids[i, int(bos) :], sep_id) + int(bos)
        labels[i, : first + 1] = IGNORE
        labels[i, int(lengths[i]) :] = IGNORE
    return labels


def plain_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets. Like the papers' code, no attention mask:
    padding is on the right, so causal attention keeps it out of every target's context."""
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=IGNORE)


class PlainStepwiseLoop:
    """Mid-schedule stepwise internalization: each example drops `scheduled + o` leading CoT tokens.

    `rows` are full token sequences `[BOS] input SEP cot SEP #### answer EOS`; `offsets` the
    smoothing distribution P(o). Batches are random and padded to their longest row.
    """

    def __init__(self, model, rows: list[list[int]], sep_id: int, pad_id: int, bos: bool, scheduled: int,
                 offsets: torch.Tensor, batch_size: int, lr: float, weight_decay: float, max_grad_norm: float,
                 device: torch.device, bf16: bool, seed: int):
        self.model, self.rows, self.sep_id, self.pad_id, self.bos = model, rows, sep_id, pad_id, bos
        self.scheduled, self.offsets, self.batch_size = scheduled, offsets, batch_size
        self.max_grad_norm, self.device = max_grad_norm, device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next_indices(self) -> list[int]:
        if len(self.order) < self.batch_size:
            self.order = torch.randperm(len(self.rows), generator=self.generator).tolist()
        batch, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return batch

    def step(self, indices: list[int]) -> tuple[torch.Tensor, int, int]:
        """One optimizer step on the given rows: (loss, tokens after removal, padded slots fed)."""
        ids, lengths = plain_collate([self.rows[i] for i in indices], self.pad_id)
        ids = ids.to(self.device)
        offsets = torch.multinomial(self.offsets, len(indices), replacement=True, generator=self.generator)
        ids, lengths = remove_per_example(ids, lengths, self.scheduled + offsets, self.sep_id, self.bos, self.pad_id)
        labels = plain_labels(ids, lengths, self.sep_id, self.bos)
        with self.autocast:
            loss = plain_loss(self.model, ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), int(lengths.sum()), ids.numel()
