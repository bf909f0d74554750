"""An auxiliary running-sum loss for multiplication (Bai et al. 2025, arXiv 2510.00184).

Bai et al. find that a model which multiplies without CoT holds, at each answer digit, the
running column value ĉ_k = (digit products of column k) + ĉ_{k-1} // 10, and that a linear
regression probe predicting ĉ_k from the hidden states, trained jointly as an auxiliary loss,
lets a 2-layer model learn 4x4 multiplication with no CoT at all. Their probes read attention
heads' outputs at the answer digits; here one linear probe reads a decoder layer's output
(`hidden_states`, any architecture) at every digit token of the CoT and the answer, each labelled
with its own number's ĉ (data/mult.py: running_values); with stepwise removal, the token before
the removed span (the first SEP), which takes the last removed token's position, is labelled with
that token's ĉ: the value the model must now hold inside.

The loss is the mean squared error of ĉ / 10 over the labelled tokens, times running_sum_weight,
added to the cross-entropy. The probe is saved beside the model (running_sum_probe.safetensors); the
model directory stays a plain Hugging Face one.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from icot.data.layout import EncodedSet
from icot.data.mult import operand_digits, running_values
from icot.errors import UserError
from icot.models import LMWithModules

SCALE = 10.0  # ĉ / 10: the values reach ~350 on 4x4


class ProbedLM(LMWithModules):
    """The LM and a linear probe on the output of decoder layer `layer` (negative counts from the end)."""

    modules_file = "running_sum_probe.safetensors"
    kind = "running-sum probe"

    def __init__(self, lm, layer: int):
        super().__init__(lm)
        if not -self.num_layers <= layer < self.num_layers:
            raise UserError(f"config: running_sum_layer {layer} is not a layer of this {self.num_layers}-layer model "
                            f"(0 to {self.num_layers - 1}, or negative from the end)")
        self.layer = layer % self.num_layers
        self.probe = nn.Linear(self.hidden_size, 1).to(device=lm.device, dtype=lm.dtype)

    def forward(self, **inputs):
        """(the LM's output, the probe's ĉ / 10 at every position)."""
        out = self.lm(**inputs, output_hidden_states=True)
        return out, self.probe(out.hidden_states[self.layer + 1]).squeeze(-1)


def value_table(data: EncodedSet) -> np.ndarray:
    """ĉ / 10 for every token of `data` (flat, as data.tokens), NaN where there is none. Needs
    multiplication examples tokenized one token per CoT and answer word (space-separated digits:
    as our word-level tokenizer gives)."""
    values = np.full(len(data.tokens), np.nan, dtype=np.float16)
    for rows, a_digits, b_digits in _operands_by_shape(data):
        cot, answer = running_values(a_digits, b_digits)
        cot_start = data.offsets[rows] + data.n_prompt[rows]
        answer_start = cot_start + data.n_cot[rows] + 2  # after the SEP and `####`
        wrong = (data.n_cot[rows] != cot.shape[1]) | (data.offsets[rows + 1] - answer_start - 1 != answer.shape[1])
        if wrong.any():
            raise UserError(f"running_sum_weight: training example {rows[wrong][0] + 1} does not tokenize to one token "
                            "per digit; "
                            "the running-sum loss needs a tokenizer that gives each digit its own token (tokenizer: word does)")
        values[cot_start[:, None] + np.arange(cot.shape[1])] = cot
        values[answer_start[:, None] + np.arange(answer.shape[1])] = answer
    return values / np.float16(SCALE)


def _operands_by_shape(data: EncodedSet):
    """(example indices, a's digits, b's digits) for each operand shape (digits of a, digits of b);
    a one-line error for an example that is not a multiplication."""
    groups: dict[tuple[int, int], tuple[list, list, list]] = {}
    examples = tqdm(data.examples, desc="running-sum labels", unit="ex", leave=False, disable=len(data) < 100_000)
    for i, example in enumerate(examples):
        try:
            a_digits, b_digits = operand_digits(example.question)
        except ValueError as err:
            raise UserError(f"running_sum_weight: training example {i + 1} is not a multiplication ({err}); "
                            "the running-sum loss is defined for `icot data mult` data only") from None
        rows, a_rows, b_rows = groups.setdefault((len(a_digits), len(b_digits)), ([], [], []))
        rows.append(i), a_rows.append(a_digits), b_rows.append(b_digits)
    return [(np.array(rows), np.array(a), np.array(b)) for rows, a, b in groups.values()]


def batch_values(table: np.ndarray, data: EncodedSet, indices: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of `table` for the batch's example indices, right-padded with NaN to `width` (as collate pads)."""
    rows = indices.cpu().numpy()
    starts, lengths = data.offsets[rows], data.offsets[rows + 1] - data.offsets[rows]
    cols = np.arange(width)[None, :]
    valid = cols < lengths[:, None]
    values = np.where(valid, table[np.where(valid, starts[:, None] + cols, 0)], np.nan)
    return torch.from_numpy(values.astype(np.float32))


def probe_loss(predicted: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the labelled tokens (0 if none is labelled)."""
    labelled = ~torch.isnan(values)
    if not labelled.any():
        return predicted.sum() * 0.0
    return (predicted.float()[labelled] - values[labelled]).pow(2).mean()
