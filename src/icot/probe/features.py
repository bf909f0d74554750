"""Hidden states of a model over its prompts `[BOS] input SEP`, at every layer.

The prompt is all that an implicit model sees before it answers, and causal attention makes
each prompt position's states independent of what follows, so one prompt-only forward pass
gives the same states as the full sequence. Layer l's features are the hidden states
*entering* decoder layer l (row 0: the embeddings' output), captured with forward pre-hooks,
plus a last row: the model's final hidden states (after its final norm). The pre-hooks are
registered inside the predictor's own prompt context, so a method that rewrites hidden states
(ICoT-KD at SEP) is probed on the states its layers really receive.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from icot.data.layout import EncodedSet
from icot.errors import located
from icot.evaluate import Predictor
from icot.generate import left_padded
from icot.models import decoder_layers, layer_input_hooks


@dataclass
class PromptStates:
    """Per layer row: states at SEP (examples, hidden) and at the last `window` input positions
    before SEP, concatenated (examples, window * hidden)."""

    layer_names: list[str]
    sep: torch.Tensor  # (layers + 1, examples, hidden)
    inputs: torch.Tensor  # (layers + 1, examples, window * hidden)
    window: int

    def site(self, name: str) -> torch.Tensor:
        return {"sep": self.sep, "input": self.inputs}[name]


def layer_names(model) -> list[str]:
    """`emb` (input to the first layer), `L1`..`Ln` (output of layer k, input to layer k+1);
    the last row is the final hidden state after the model's final norm."""
    n = len(decoder_layers(model))
    return ["emb"] + [f"L{k}" for k in range(1, n + 1)]


def input_window(data: EncodedSet, cap: int) -> int:
    """Input positions probed: the shortest input in the data (so every example has them), at most `cap`."""
    shortest_input = int(data.n_prompt.min()) - 1  # without SEP (and BOS, if any, counts as input)
    return max(1, min(cap, shortest_input))


@torch.no_grad()
def prompt_states(predictor: Predictor, data: EncodedSet, window: int, batch_size: int = 256,
                  progress: bool = True) -> PromptStates:
    """Run every prompt once (in batches, no gradients) and keep the states the probes read."""
    model = predictor.model
    device = predictor.device
    sep_parts, input_parts = [], []
    starts = range(0, len(data), batch_size)
    for start in tqdm(starts, desc="hidden states", leave=False, disable=not progress):
        prompts = [data.prompt(i) for i in range(start, min(start + batch_size, len(data)))]
        states = _batch_states(predictor, prompts, device)  # (layers + 1, batch, width, hidden), left-padded
        sep_parts.append(states[:, :, -1])
        input_parts.append(states[:, :, -1 - window : -1].flatten(2))
    return PromptStates(layer_names(model), torch.cat(sep_parts, 1), torch.cat(input_parts, 1), window)


def _batch_states(predictor: Predictor, prompts: list[list[int]], device) -> torch.Tensor:
    """Hidden states of left-padded prompts, so that SEP is the last column of every row."""
    ids, mask = left_padded(prompts, predictor.layout.pad_id, device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    entering: list[torch.Tensor] = []
    method_context = predictor.prompt_context(ids, mask)
    with method_context if method_context is not None else nullcontext():
        # append() returns None, so the hooks only record: the layers run on unchanged states
        with layer_input_hooks(predictor.model, lambda index, hidden: entering.append(hidden)):
            out = predictor.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                  output_hidden_states=True, use_cache=False, logits_to_keep=1)
    rows = entering + [out.hidden_states[-1]]
    return torch.stack(rows).float().cpu()


def check_tokenizable(predictor: Predictor, data: EncodedSet, path) -> None:
    """Refuse data written in words the model's tokenizer does not know: they would all read as
    <unk>. Only the input and CoT matter here (the answer is never probed)."""
    unk = predictor.tokenizer.unk_token_id
    if unk is None:
        return
    row = np.repeat(np.arange(len(data)), data.lengths)
    position_in_row = np.arange(len(data.tokens)) - data.offsets[row]
    probed = position_in_row < (data.n_prompt + data.n_cot)[row]
    bad_rows = row[probed & (data.tokens == unk)]
    if len(bad_rows) == 0:
        return
    i = int(bad_rows[0])
    example = data.examples[i]
    unknown = [w for w in f"{example.question} {example.cot}".split()
               if unk in predictor.tokenizer(w, add_special_tokens=False)["input_ids"]]
    raise located(path, i + 1, f"the model's tokenizer does not know {', '.join(repr(w) for w in unknown[:3])}; "
                               "probe it on data written like its training data")
