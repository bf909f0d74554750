"""Hidden states at chosen positions: reading them out of a teacher, writing them into a model.

Both go through forward pre-hooks on the decoder layers (`icot.models.layer_input_hooks`), so
they work for any Hugging Face causal LM (GPT-2, Llama, ...) without touching its modeling code.
"hidden state entering layer l" is the input of decoder layer l: the embeddings for l = 0.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from icot.models import decoder_layers, layer_input_hooks

DYNAMIC = "dynamic"
SUBSETS = ("diagonal", "first_column", "last_column", "top_row", "bottom_row")


def parse_delta(delta: str) -> str | int:
    """'dynamic' or a positive integer (as text, the config's spelling); ValueError otherwise."""
    if delta == DYNAMIC:
        return DYNAMIC
    if delta.isdigit() and int(delta) > 0:
        return int(delta)
    raise ValueError(delta)


def teacher_positions(first_sep: torch.Tensor, second_sep: torch.Tensor, num_layers: int, delta: str | int,
                      subset: str) -> torch.Tensor:
    """[batch, layers] CoT position t_l whose state feeds layer l.

    diagonal and both rows: t_l = round(first_sep + l·Δ), clipped to the second SEP, with
    Δ = (second_sep − first_sep)/(L − 1) for 'dynamic'. Columns: the first SEP (first_column) or
    the second SEP (last_column) at every layer, the two ends of the diagonal.
    """
    layers = torch.arange(num_layers, device=first_sep.device, dtype=torch.float64)
    first, second = first_sep[:, None].double(), second_sep[:, None].double()
    if subset == "first_column":
        positions = first.expand(-1, num_layers)
    elif subset == "last_column":
        positions = second.expand(-1, num_layers)
    elif delta == DYNAMIC:
        # l·(second − first)/(L − 1) rather than l·Δ: exact at l = L − 1, no drift from a rounded Δ
        positions = torch.round(first + layers * (second - first) / max(num_layers - 1, 1))
    else:
        positions = first + layers * int(delta)
    return torch.minimum(positions, second).long()


def batch_second_sep(batch: dict) -> torch.Tensor:
    return batch["first_sep"] + batch["cot_len"] + 1


def batch_teacher_positions(batch: dict, num_layers: int, delta: str | int, subset: str) -> torch.Tensor:
    """t_l [batch, layers] of a right-padded `input SEP cot SEP ...` batch (collate's keys)."""
    return teacher_positions(batch["first_sep"], batch_second_sep(batch), num_layers, delta, subset)


def teacher_cot_tokens(batch: dict, num_layers: int, delta: str | int, subset: str) -> torch.Tensor:
    """[batch, layers] the token at t_l: what the token mixture's component l stands for."""
    positions = batch_teacher_positions(batch, num_layers, delta, subset)
    return batch["input_ids"].gather(1, positions)


def positions_inside_cot(cot_len: int, num_layers: int, delta: str | int, subset: str) -> int:
    """How many distinct teacher positions fall strictly between the two SEPs of a CoT of
    `cot_len` tokens: the states that can carry a step of the reasoning."""
    first = torch.zeros(1, dtype=torch.long)
    positions = teacher_positions(first, first + cot_len + 1, num_layers, delta, subset)
    return len({p for p in positions[0].tolist() if 0 < p <= cot_len})


def few_thoughts_warning(cot_lengths, num_layers: int, delta: str | int, subset: str) -> str | None:
    """A warning when fewer than 3 teacher states lie inside the typical (median) CoT, else None.

    The column subsets read the SEPs by design (ablations) and get no warning.
    """
    if subset in ("first_column", "last_column") or len(cot_lengths) == 0:
        return None
    cot_len = int(sorted(cot_lengths)[len(cot_lengths) // 2])
    inside = positions_inside_cot(cot_len, num_layers, delta, subset)
    if inside >= 3:
        return None
    return (f"ICoT-KD: only {inside} of the {num_layers} teacher states fall inside the CoT (median {cot_len} tokens, "
            f"delta {delta}); the others sit on the separators, which carry nothing of the reasoning to distil. "
            + _more_thoughts_advice(cot_len, num_layers))


def _more_thoughts_advice(cot_len: int, num_layers: int) -> str:
    if cot_len < 3:
        return "The CoT is too short for three states; KD has little to distil on this data"
    if num_layers < 4:  # t_0 is always the first SEP: at most L − 1 states inside
        return "Use a model with at least 4 layers (the paper: 12 to 24)"
    return f"Use an integer delta that keeps them inside (delta: {cot_len // (num_layers - 1)}) or more layers"


def source_layers(subset: str, num_layers: int) -> list[int]:
    """Which layer's input each of the L extracted states is read from."""
    if subset == "bottom_row":
        return [0] * num_layers
    if subset == "top_row":
        return [num_layers - 1] * num_layers
    return list(range(num_layers))


def normalise(states: torch.Tensor) -> torch.Tensor:
    """LayerNorm without learned parameters: every extracted vector gets mean 0, variance 1."""
    return F.layer_norm(states, states.shape[-1:])


@torch.no_grad()
def extract_teacher_states(teacher, batch: dict, delta: str | int, subset: str) -> torch.Tensor:
    """Normalised teacher states [batch, layers, hidden] from a batch of full sequences.

    `batch` is a right-padded `input SEP cot SEP ...` batch (collate's keys). Only the columns up
    to the last second SEP are run, through the LM without its head.
    """
    num_layers = len(decoder_layers(teacher))
    positions = batch_teacher_positions(batch, num_layers, delta, subset)
    width = int(batch_second_sep(batch).max()) + 1
    sources = source_layers(subset, num_layers)
    rows = torch.arange(len(positions), device=positions.device)
    states: list[torch.Tensor | None] = [None] * num_layers

    def read(layer: int, hidden: torch.Tensor) -> None:
        for l, source in enumerate(sources):
            if source == layer:
                states[l] = hidden[rows, positions[:, l]]

    with layer_input_hooks(teacher, read):
        teacher.base_model(input_ids=batch["input_ids"][:, :width], attention_mask=batch["attention_mask"][:, :width],
                           position_ids=batch["position_ids"][:, :width], use_cache=False)
    return normalise(torch.stack(states, dim=1))


@contextmanager
def replaced_at(model, positions: torch.Tensor, new_state):
    """Within the context, the input of each decoder layer l at (row, positions[row]) is replaced
    by `new_state(l, current)`, current being the [batch, hidden] states there; every other
    position is passed through untouched."""
    rows = torch.arange(len(positions), device=positions.device)

    def swap(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        new = new_state(layer, hidden[rows, positions])
        return hidden.index_put((rows, positions), new.to(hidden.dtype))

    with layer_input_hooks(model, swap):
        yield
