"""Decoding throughput of no-CoT, explicit-CoT and implicit (stepwise) models on a reference test file.

The models are randomly initialised (speed does not depend on the weights), so they would not stop
where trained ones do. Instead the stop token is set to an id the model cannot produce, and every
example generates exactly as many tokens as the trained method emits after the prompt `input SEP`:
explicit CoT `cot SEP #### answer EOS`, implicit and no-CoT `SEP #### answer EOS`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.common import clock, peak_memory, reset_peak_memory, rss_mib, sync
from icot.data.format import read_examples
from icot.data.layout import Layout, encode
from icot.data.tokenizers import word_tokenizer
from icot.evaluate import Predictor
from icot.models import build_preset

METHODS = ("nocot", "explicit", "implicit")


def predictor_for(method: str, model, tokenizer) -> Predictor:
    """The Predictor each method's training saves (stepwise: every CoT token removed, from the left)."""
    removed = 0 if method == "explicit" else math.inf
    predictor = Predictor(model, tokenizer, cot_removed=removed, removal_side="left")
    never = model.config.vocab_size  # argmax over the vocabulary never returns this id
    predictor.layout = dataclasses.replace(predictor.layout, sep_id=never)
    return predictor


def emitted_tokens(method: str, data) -> np.ndarray:
    """Tokens a trained model of `method` generates for each example."""
    after_prompt = data.lengths - data.n_prompt
    return after_prompt if method == "explicit" else after_prompt - data.n_cot


def ours(predictor: Predictor, prompts, counts, batch_size: int) -> int:
    """Our batched greedy decoding (KV cache, finished rows dropped); returns tokens generated."""
    generated = 0
    for start in range(0, len(prompts), batch_size):
        outputs = predictor.generate(prompts[start : start + batch_size], int(counts[start : start + batch_size].max()))
        generated += sum(map(len, outputs))
    return generated


def hf_generate(predictor: Predictor, prompts, counts, batch_size: int) -> int:
    """The plain path: Hugging Face `generate`, one example at a time, exactly counts[i] new tokens."""
    model, device, generated = predictor.model, predictor.device, 0
    for prompt, count in zip(prompts, counts):
        ids = torch.tensor([prompt], device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=int(count),
                             min_new_tokens=int(count), pad_token_id=predictor.layout.pad_id)
        generated += out.shape[1] - ids.shape[1]
    return generated


PATHS = {"ours": ours, "hf": hf_generate}


def run_case(spec: dict) -> dict:
    device = torch.device(spec["device"])
    examples = read_examples(spec["file"])[: spec["examples"]]
    tokenizer = word_tokenizer(f"{e.question} {e.cot} {e.answer}" for e in examples)
    data = encode(tokenizer, Layout.for_tokenizer(tokenizer), examples)
    torch.manual_seed(spec["seed"])
    model = build_preset(spec["model"], len(tokenizer), tokenizer.eos_token_id)
    model = model.to(device=device, dtype=torch.bfloat16 if spec["bf16"] else None).eval()
    predictor = predictor_for(spec["method"], model, tokenizer)
    prompts = [data.prompt(i) for i in range(len(data))]
    counts = emitted_tokens(spec["method"], data)
    decode = PATHS[spec["path"]]
    warmup = min(len(prompts), spec["batch_size"], 8)
    decode(predictor, prompts[:warmup], counts[:warmup], spec["batch_size"])
    rss_before = rss_mib()
    reset_peak_memory(device)
    times = []
    for _ in tqdm(range(spec["repeats"]), desc=f"decode {spec['method']} {spec['path']} b{spec['batch_size']}", leave=False):
        start = clock(device)
        generated = decode(predictor, prompts, counts, spec["batch_size"])
        times.append(clock(device) - start)
    sync(device)
    if generated != int(counts.sum()):
        raise RuntimeError(f"generated {generated} tokens, expected {int(counts.sum())}")
    best = min(times)
    return {"seconds": best, "seconds_all": times, "examples": len(prompts), "generated_tokens": generated,
            "tokens_per_example": float(counts.mean()), "examples_per_s": len(prompts) / best,
            "tokens_per_s": generated / best, **peak_memory(device, rss_before)}
