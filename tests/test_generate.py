"""Batched greedy decoding (left padding, KV cache, finished rows dropped) equals plain
greedy decoding of each prompt alone, recomputed from scratch at every token."""

import math
from collections import Counter

import pytest
import torch

from icot.generate import STATIC_FROM, greedy_generate
from icot.models import build_preset

VOCAB = 40


def chaotic_model():
    """A random micro model with large weights, so that greedy continuations vary (small random
    weights repeat one token forever)."""
    torch.manual_seed(0)
    model = build_preset("micro", VOCAB, 0).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    return model


@torch.no_grad()
def plain_greedy(model, prompt, stop_id, max_new_tokens, stops=2):
    ids, out = list(prompt), []
    while len(out) < max_new_tokens and out.count(stop_id) < stops:
        token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        out.append(token)
    return out


@pytest.mark.parametrize("static_from", [STATIC_FROM, 10**9], ids=["static-cache", "dynamic-cache"])
def test_batched_decoding_matches_plain_greedy_per_prompt(static_from, monkeypatch):
    monkeypatch.setattr("icot.generate.STATIC_FROM", static_from)
    model = chaotic_model()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, VOCAB, (int(n),), generator=gen).tolist() for n in torch.randint(3, 13, (12,), generator=gen)]
    free = greedy_generate(model, prompts, stop_id=VOCAB, pad_id=0, max_new_tokens=40)  # VOCAB never comes out
    stop = Counter(t for row in free for t in row).most_common(2)[1][0]
    batched = greedy_generate(model, prompts, stop_id=stop, pad_id=0, max_new_tokens=40)
    assert len({len(row) for row in batched}) >= 4  # rows finish at different steps and leave the batch
    assert batched == [plain_greedy(model, p, stop, 40) for p in prompts]


def test_decoding_passes_the_cache_by_its_current_name_without_warnings(recwarn):
    """The KV cache (a StaticCache for a long decode) goes in and out under the name this transformers
    release declares (no deprecated argument: transformers 5.x warns on `past_key_values`), and
    decoding warns nothing."""
    import logging

    from transformers.modeling_outputs import CausalLMOutputWithPast

    from icot.generate import CACHE_ARGUMENT, decoding_cache

    assert CACHE_ARGUMENT in CausalLMOutputWithPast.__dataclass_fields__
    model, seen = chaotic_model(), []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.keys() | {
        type(kwargs.get(CACHE_ARGUMENT)).__name__}), with_kwargs=True)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        greedy_generate(model, [[1, 2, 3], [4, 5]], stop_id=VOCAB, pad_id=0, max_new_tokens=5)
    finally:
        hook.remove()
        logging.getLogger("transformers").removeHandler(handler)
    assert len(seen) == 5 and all(CACHE_ARGUMENT in kwargs for kwargs in seen[1:])
    assert "StaticCache" not in seen[0]  # a short decode: the model's own DynamicCache
    assert type(decoding_cache(model, 3, STATIC_FROM)[CACHE_ARGUMENT]).__name__ == "StaticCache"
    assert not [w for w in recwarn if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not [r for r in records if r.levelno >= logging.WARNING]


def fed_positions(predictor, prompt, max_new_tokens):
    """Position ids the decoder is fed while the predictor generates from one prompt, in order."""
    seen = []
    hook = predictor.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.extend(kwargs["position_ids"][0].tolist()), with_kwargs=True)
    try:
        tokens = predictor.generate([prompt], max_new_tokens)
    finally:
        hook.remove()
    return seen, tokens


@pytest.mark.parametrize("side,removed,gap_from,placement", [("left", math.inf, 0, "authors"), ("left", 2, 0, "authors"),
                                                            ("right", 2, 1, "authors"), ("left", math.inf, 1, "in_place"),
                                                            ("right", 2, 2, "in_place")])
def test_generation_feeds_the_positions_of_training(side, removed, gap_from, placement):
    """keep_position: each token is fed at inference at the position it had in training (remove_cot)."""
    from icot.data.format import Example
    from icot.data.layout import Layout, encode
    from icot.data.tokenizers import word_tokenizer
    from icot.evaluate import Predictor

    tokenizer = word_tokenizer(["1 2 3 * + ####"])
    data = encode(tokenizer, Layout.for_tokenizer(tokenizer), [Example("1 2 * 3", "3 + 6", "3 6")])
    model = build_preset("micro", len(tokenizer), tokenizer.eos_token_id).eval()
    predictor = Predictor(model, tokenizer, cot_removed=removed, removal_side=side, keep_position=True,
                          position_gap=3 if math.isinf(removed) else removed, position_gap_from=gap_from,
                          gap_placement=placement)
    training = predictor.teacher_forced(data, [0])
    length = int(training["length"][0])
    predictor.layout = Layout(sep_id=len(tokenizer), bos_id=None, pad_id=0)  # a stop that never comes: decode the full length
    fed, _ = fed_positions(predictor, data.prompt(0), length - len(data.prompt(0)))
    assert fed == training["position_ids"][0, : length - 1].tolist()
