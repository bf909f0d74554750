"""Continuous thoughts, shared by Coconut and CODI: the marker tokens, rows holding thought
placeholders, a forward pass that feeds each thought the last hidden state before it, decoding
after the thoughts, and the predictor of a model that answers that way."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from icot.data.batching import IGNORE
from icot.data.layout import EncodedSet
from icot.errors import UserError
from icot.evaluate import Predictor
from icot.generate import cache_kwargs, cache_of, decode_greedy, decoding_cache, left_padded
from icot.models import LMWithModules, save_model

BEGIN, END, LATENT = "<|start-latent|>", "<|end-latent|>", "<|latent|>"  # the authors' token names (run.py)
INIT_FROM = "<<"  # new token embeddings start as this token's (run.py: "it helps stabilize the training")


# ----- the thought tokens ---------------------------------------------------------------------


@dataclass(frozen=True)
class ThoughtTokens:
    begin: int
    end: int
    latent: int  # placeholder id of a thought position; its embedding is never read

    def as_dict(self) -> dict:
        return {"begin": self.begin, "end": self.end, "latent": self.latent}


def add_thought_tokens(tokenizer, model) -> ThoughtTokens:
    """The three marker tokens, added as special tokens (with the embedding rows they need) unless
    the tokenizer has them already (a Coconut model trained on): they are saved with the tokenizer."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (BEGIN, END, LATENT) if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # the new rows are set below
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = ThoughtTokens(*tokenizer.convert_tokens_to_ids([BEGIN, END, LATENT]))
    if missing:
        _init_like_known_token(tokenizer, model, list(ids.as_dict().values()))
    return ids


def check_thought_tokens(tokenizer, marks: ThoughtTokens, path) -> None:
    """A saved model's tokenizer holds the thought tokens its icot.json names."""
    if tokenizer.convert_tokens_to_ids([BEGIN, END, LATENT]) != list(marks.as_dict().values()):
        raise UserError(f"{path}: the tokenizer's thought tokens differ from those in icot.json")


@torch.no_grad()
def _init_like_known_token(tokenizer, model, new_ids: list[int]) -> None:
    known = tokenizer.encode(INIT_FROM, add_special_tokens=False)
    one_known = len(known) == 1 and known[0] != tokenizer.unk_token_id
    source = known[0] if one_known else tokenizer.eos_token_id
    tables = (model.get_input_embeddings(), model.get_output_embeddings())
    for weights in {id(m.weight): m.weight for m in tables if m is not None}.values():
        weights[new_ids] = weights[source].clone()


def thought_batch(data: EncodedSet, indices, removed: list[int], thoughts: list[int], marks: ThoughtTokens,
                  pad_id: int) -> dict[str, torch.Tensor]:
    """Rows `[BOS] input SEP <bot> thoughts <eot> CoT[removed:] SEP #### answer EOS`, left-padded so
    that every <bot> sits in the same column; labels only after <eot>."""
    indices = np.asarray(indices, dtype=np.int64)
    rows, heads = [], []
    for i, r, n in zip(indices, removed, thoughts):
        row, n_prompt = data.row(i), int(data.n_prompt[i])
        head = np.concatenate([row[:n_prompt], [marks.begin], np.full(n, marks.latent), [marks.end]])
        rows.append(np.concatenate([head, row[n_prompt + r :]]).astype(np.int64))
        heads.append(len(head))
    left = data.n_prompt[indices].max() - data.n_prompt[indices]  # aligns every <bot>
    width = int(max(pad + len(row) for pad, row in zip(left, rows)))
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for b, (pad, row, head) in enumerate(zip(left, rows, heads)):
        ids[b, pad : pad + len(row)] = row
        mask[b, pad : pad + len(row)] = 1
        labels[b, pad + head : pad + len(row)] = row[head:]
    mask_t = torch.from_numpy(mask)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": mask_t, "labels": torch.from_numpy(labels),
            "position_ids": (mask_t.cumsum(1) - 1).clamp(min=0)}


@dataclass
class ThoughtOutput:
    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None  # every layer's, embeddings first, at every column


def continuous_forward(lm, input_ids, attention_mask, position_ids, latent_id: int, project=None,
                       output_hidden_states: bool = False) -> ThoughtOutput:
    """Logits (and with output_hidden_states, every layer's hidden states) of rows holding thought
    placeholders, each thought's input embedding being the last hidden state of the position
    before it (coconut.py, Coconut.forward), passed through `project` if given (CODI's projection).

    One pass up to the first thought column, one single-column pass per column that holds a
    thought in any row (rows without one there take their token's embedding), one pass for the
    rest; the KV cache carries the context. Gradients flow through the fed-back states.
    """
    is_latent = input_ids == latent_id
    embeds = lm.get_input_embeddings()(input_ids)
    columns = is_latent.any(0).nonzero().flatten().tolist()
    if not columns:
        out = lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                 output_hidden_states=output_hidden_states)
        return ThoughtOutput(out.logits, out.hidden_states if output_hidden_states else None)
    first, last = columns[0], columns[-1] + 1
    cache = DynamicCache(config=lm.config)
    out = lm(inputs_embeds=embeds[:, :first], attention_mask=attention_mask[:, :first],
             position_ids=position_ids[:, :first], **cache_kwargs(cache), use_cache=True, output_hidden_states=True)
    passes = [out]
    for col in range(first, last):
        state = out.hidden_states[-1][:, -1]
        fed = torch.where(is_latent[:, col, None], project(state) if project is not None else state, embeds[:, col])
        out = lm(inputs_embeds=fed[:, None], attention_mask=attention_mask[:, : col + 1],
                 position_ids=position_ids[:, col : col + 1], **cache_kwargs(cache), use_cache=True,
                 output_hidden_states=True)
        passes.append(out)
    if last < input_ids.shape[1]:
        passes.append(lm(inputs_embeds=embeds[:, last:], attention_mask=attention_mask, position_ids=position_ids[:, last:],
                         **cache_kwargs(cache), use_cache=True, output_hidden_states=output_hidden_states))
    logits = torch.cat([p.logits for p in passes], dim=1)
    if not output_hidden_states:
        return ThoughtOutput(logits)
    return ThoughtOutput(logits, tuple(torch.cat(layer, dim=1) for layer in zip(*(p.hidden_states for p in passes))))


class ThoughtLM(LMWithModules):
    """A causal LM whose forward runs thought placeholders as continuous thoughts: what Coconut
    trains (every pass inside one forward, as a distributed wrapper needs) and evaluate()'s
    teacher-forced pass calls. Saved and loaded as the plain LM; `project` (CODI's projection, a
    module) maps each fed-back state to the thought's input embedding."""

    kind = "Coconut"

    def __init__(self, lm, latent_id: int, project: nn.Module | None = None):
        super().__init__(lm)
        self.latent_id, self.project = latent_id, project

    def write(self, tokenizer, folder, metadata: dict) -> None:
        save_model(self.lm, tokenizer, folder, metadata)

    def forward(self, input_ids, attention_mask, position_ids, **_) -> ThoughtOutput:
        return continuous_forward(self.lm, input_ids, attention_mask, position_ids, self.latent_id, self.project)


@torch.no_grad()
def generate_with_thoughts(lm, prompts: list[list[int]], marks: ThoughtTokens, n_thoughts: int, stop_id: int,
                           pad_id: int, max_new_tokens: int, project=None) -> list[list[int]]:
    """Greedy decoding after `prompt <bot>`, n_thoughts continuous thoughts (each the last hidden
    state before it, through `project` if given) and `<eot>`, several left-padded rows at once
    with the KV cache; the generated tokens start after <eot>."""
    device = next(lm.parameters()).device
    ids, mask = left_padded([p + [marks.begin] for p in prompts], pad_id, device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = lm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, output_hidden_states=True,
             logits_to_keep=1, **decoding_cache(lm, ids.shape[1] + n_thoughts + 1, max_new_tokens))
    position = positions[:, -1]
    for _ in range(n_thoughts):
        position, mask = position + 1, torch.cat([mask, mask.new_ones(len(ids), 1)], dim=1)
        state = out.hidden_states[-1][:, -1:]
        fed = project(state) if project is not None else state
        out = lm(inputs_embeds=fed, attention_mask=mask, position_ids=position[:, None], **cache_kwargs(cache_of(out)),
                 use_cache=True, output_hidden_states=True)
    position, mask = position + 1, torch.cat([mask, mask.new_ones(len(ids), 1)], dim=1)
    end = torch.full((len(ids), 1), marks.end, dtype=torch.long, device=device)
    out = lm(input_ids=end, attention_mask=mask, position_ids=position[:, None], **cache_kwargs(cache_of(out)),
             use_cache=True)
    return decode_greedy(lm, cache_of(out), mask, out.logits[:, -1].argmax(-1), position + 1, stop_id, pad_id,
                         max_new_tokens)


@dataclass
class ThoughtPredictor(Predictor):
    """A model (`model` a ThoughtLM) that answers after `thoughts` continuous thoughts in place of
    its whole CoT. Teacher forcing (token accuracy) reads the same rows; generation runs the
    thoughts, then decodes."""

    marks: ThoughtTokens = None
    thoughts: int = 0

    @property
    def n_thoughts(self) -> int:
        return self.thoughts

    def plan(self, data: EncodedSet, indices) -> tuple[list[int], list[int]]:
        """(CoT tokens replaced, thoughts) of each row."""
        return [int(data.n_cot[i]) for i in indices], [self.n_thoughts] * len(indices)

    def teacher_forced(self, data: EncodedSet, indices) -> dict[str, torch.Tensor]:
        removed, thoughts = self.plan(data, indices)
        batch = thought_batch(data, indices, removed, thoughts, self.marks, self.layout.pad_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        return generate_with_thoughts(self.model.lm, prompts, self.marks, self.n_thoughts, self.layout.sep_id,
                                      self.layout.pad_id, max_new_tokens, self.model.project)
