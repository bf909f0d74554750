"""Batched greedy decoding with a KV cache, left padding and per-example stopping.

Generation starts after the prompt `[BOS] input SEP`. A row is finished once it has produced
`stops` stop tokens (SEP closing the CoT, then EOS closing the answer; the two are the same
token). Finished rows are dropped from the batch and its cache, so a batch runs only as long
as its slowest unfinished row and no work is spent on finished ones. A long decode's cache is
allocated once and written in place (transformers' StaticCache, see decoding_cache); the cache
goes through the public forward arguments only.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import StaticCache
from transformers.modeling_outputs import CausalLMOutputWithPast


@dataclass(frozen=True)
class PositionGap:
    """Position-id gap left by removed CoT tokens (stepwise internalization with keep_position).

    As in training (batching.remove_cot), the token just before the removed span and everything
    after it sit `size` positions further on. `from_token` says which token that is, counted
    from the prompt's last token: 0 is the prompt's SEP (left-side removal, or the whole CoT
    removed); k > 0 is the k-th generated token (right-side removal with k CoT tokens kept; with
    the in_place placement the gap opens one token later).
    """

    size: int = 0
    from_token: int = 0


def cache_kwargs(cache) -> dict:
    """The keyword a model's forward takes its KV cache by: `cache` in the transformers releases that
    renamed it (passing `past_key_values` there warns and is to be removed), `past_key_values`
    before. Decided once, by whether the model outputs declare a `cache` field (a feature check,
    not a version compare); cache_of reads the cache back from an output under the same name."""
    return {CACHE_ARGUMENT: cache}


def cache_of(output):
    """The KV cache a forward pass returned (see cache_kwargs)."""
    return getattr(output, CACHE_ARGUMENT)


CACHE_ARGUMENT = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


STATIC_FROM = 32  # new tokens from which a StaticCache decodes faster than the model's DynamicCache (measured)


def decoding_cache(model, prompt_width: int, max_new_tokens: int) -> dict:
    """The cache argument of a batched decode's first forward pass. A DynamicCache (the model's own,
    when none is given) concatenates the whole cache at every step, quadratic in the generated
    length: explicit CoT on 9x9 at batch 128 decoded 1.8x slower on a CPU than with a preallocated
    buffer. So a long decode gets transformers' StaticCache, allocated once for prompt and new
    tokens and written in place; it attends over its whole length at every step, which costs more
    than it saves on short decodes (implicit answers: ~20 tokens). docs/RESULTS.md, "Tested
    versions", has the timings. Finished rows leave either through Cache.reorder_cache. A config
    StaticCache refuses gets the model's own cache."""
    if max_new_tokens < STATIC_FROM:
        return {}
    try:
        return cache_kwargs(StaticCache(config=model.config, max_cache_len=prompt_width + max_new_tokens))
    except (TypeError, ValueError, AttributeError):
        return {}


def left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(p) for p in prompts])
    width = int(lengths.max())
    flat = torch.tensor([t for p in prompts for t in p], dtype=torch.long)
    cols = torch.arange(width)[None, :]
    mask = cols >= (width - lengths)[:, None]
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    ids[mask] = flat
    return ids.to(device), mask.long().to(device)


@torch.no_grad()
def greedy_generate(model, prompts: list[list[int]], stop_id: int, pad_id: int, max_new_tokens: int,
                    stops: int = 2, gap: PositionGap = PositionGap(), prompt_context=None) -> list[list[int]]:
    """Greedy continuation of each prompt, up to and including its `stops`-th stop token.

    prompt_context(ids, mask), if given, returns a context manager (or None) active during the
    prompt's forward pass only (implicit methods use it to act on the hidden states at SEP).
    """
    device = next(model.parameters()).device
    ids, mask = left_padded(prompts, pad_id, device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    if gap.from_token == 0:
        positions[:, -1] += gap.size  # the prompt's SEP takes the slot of the last removed CoT token
    context = prompt_context(ids, mask) if prompt_context else None
    with context if context is not None else nullcontext():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                    **decoding_cache(model, ids.shape[1], max_new_tokens))
    return decode_greedy(model, cache_of(out), mask, out.logits[:, -1].argmax(-1), positions[:, -1] + 1, stop_id,
                         pad_id, max_new_tokens, stops, gap)


@torch.no_grad()
def decode_greedy(model, cache, mask: torch.Tensor, next_tokens: torch.Tensor, next_position: torch.Tensor, stop_id: int,
                  pad_id: int, max_new_tokens: int, stops: int = 2, gap: PositionGap = PositionGap()) -> list[list[int]]:
    """The decoding loop after a prefill: `next_tokens` (the argmax after the prefill) is the
    first generated token, fed at `next_position` with the cache and the mask of everything
    before it. Methods with their own prefill (Coconut's thoughts) continue here."""
    device = next_tokens.device
    batch = len(next_tokens)
    alive = torch.arange(batch, device=device)  # original row of each row still decoding
    stop_count = torch.zeros(batch, dtype=torch.long, device=device)
    generated = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        generated[alive, step] = next_tokens
        lengths[alive] += 1
        stop_count += (next_tokens == stop_id).long()
        running = stop_count < stops
        if not running.all():
            keep = running.nonzero(as_tuple=True)[0]
            if len(keep) == 0:
                break
            alive, stop_count, next_tokens = alive[keep], stop_count[keep], next_tokens[keep]
            next_position, mask = next_position[keep], mask[keep]
            cache.reorder_cache(keep)  # public on every Cache: keeps rows `keep`, in order
        if step == max_new_tokens - 1:
            break
        fed_positions = next_position + (gap.size if 0 < gap.from_token <= step + 1 else 0)
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
        out = model(input_ids=next_tokens[:, None], attention_mask=mask, position_ids=fed_positions[:, None],
                    use_cache=True, **cache_kwargs(cache))
        cache = cache_of(out)
        next_tokens = out.logits[:, -1].argmax(-1)
        next_position = next_position + 1
    lengths, generated = lengths.tolist(), generated.tolist()
    return [row[:n] for row, n in zip(generated, lengths)]


def split_generation(tokens: list[int], stop_id: int) -> tuple[list[int], list[int], bool]:
    """(cot tokens, answer tokens, complete) of one generation: cot SEP answer EOS."""
    if stop_id not in tokens:
        return tokens, [], False
    first = tokens.index(stop_id)
    rest = tokens[first + 1 :]
    if stop_id in rest:
        return tokens[:first], rest[: rest.index(stop_id)], True
    return tokens[:first], rest, False
