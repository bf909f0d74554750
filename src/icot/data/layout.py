"""The sequence layout shared by every method, and tokenized datasets in flat arrays.

    [BOS] input SEP cot SEP #### answer EOS

SEP is the tokenizer's EOS token, as in both papers. BOS is added only for tokenizers whose
BOS differs from EOS (Llama-family); GPT-2's doubles as EOS and is not added. The loss covers
every token after the first SEP; the prompt at inference is `[BOS] input SEP`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import chain

import numpy as np
from tqdm.auto import tqdm

from icot.data.format import Example
from icot.errors import UserError

ANSWER_MARK = "####"


@dataclass(frozen=True)
class Layout:
    sep_id: int
    bos_id: int | None
    pad_id: int

    @classmethod
    def for_tokenizer(cls, tokenizer) -> "Layout":
        eos = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        return cls(sep_id=eos, bos_id=bos if bos is not None and bos != eos else None, pad_id=pad)

    @property
    def prefix(self) -> list[int]:
        return [] if self.bos_id is None else [self.bos_id]


@dataclass
class EncodedSet:
    """Tokenized examples: full sequences concatenated in `tokens`, row i at offsets[i]:offsets[i+1].

    n_prompt[i] counts [BOS] input SEP; n_cot[i] the CoT tokens after it. The rest of the row is
    SEP, the answer segment (`#### answer`) and EOS.
    """

    tokens: np.ndarray
    offsets: np.ndarray
    n_prompt: np.ndarray
    n_cot: np.ndarray
    examples: list[Example] | None = None

    def __len__(self) -> int:
        return len(self.n_prompt)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def prompt(self, i: int) -> list[int]:
        return self.row(i)[: self.n_prompt[i]].tolist()

    def target(self, i: int) -> np.ndarray:
        """Everything after the first SEP: cot SEP #### answer EOS."""
        return self.row(i)[self.n_prompt[i] :]


def whitespace_vocab(tokenizer) -> tuple[dict, int | None, dict] | None:
    """(vocab, unk id, replacements) if the tokenizer only splits on whitespace and looks words up
    (our word-level tokenizer); such text is tokenized ~10x faster by a dict lookup than through the
    tokenizer call. Replacements: the one normalizer such a tokenizer may have, a string replaced
    by a word of its vocabulary (a saved model's reads the data format's `||` as SEP, icot.export)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    state = json.loads(backend.to_str())
    pre, normalizer = state.get("pre_tokenizer") or {}, state.get("normalizer")
    vocab = state["model"].get("vocab")
    if state["model"]["type"] != "WordLevel" or pre.get("type") != "WhitespaceSplit":
        return None
    if normalizer is None:
        return vocab, tokenizer.unk_token_id, {}
    if normalizer.get("type") != "Replace" or "String" not in normalizer["pattern"] or normalizer["content"] not in vocab:
        return None
    return vocab, tokenizer.unk_token_id, {normalizer["pattern"]["String"]: f" {normalizer['content']} "}


def token_lists(tokenizer, texts: list[str], words) -> list[list[int]]:
    """Token ids of each text (no special tokens); `words` from whitespace_vocab takes the fast path."""
    if words is not None:
        vocab, unk, replacements = words
        for old, new in replacements.items():
            texts = [text.replace(old, new) for text in texts]
        return [[vocab.get(w, unk) for w in text.split()] for text in texts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode(tokenizer, layout: Layout, examples: list[Example], keep_examples: bool = True,
           desc: str = "tokenizing", chunk: int = 65536) -> EncodedSet:
    """Tokenize examples into an EncodedSet, in chunks so that 800k-line files stay in memory bounds."""
    chunks, n_prompt, n_cot, lengths = [], [], [], []
    prefix, sep = layout.prefix, [layout.sep_id]
    words = whitespace_vocab(tokenizer)
    with tqdm(total=len(examples), desc=desc, unit="ex", leave=False, disable=len(examples) < 2 * chunk) as bar:
        for start in range(0, len(examples), chunk):
            batch = examples[start : start + chunk]
            questions = token_lists(tokenizer, [e.question for e in batch], words)
            cots = token_lists(tokenizer, [e.cot for e in batch], words)
            answers = token_lists(tokenizer, [f"{ANSWER_MARK} {e.answer}" for e in batch], words)
            rows = [prefix + q + sep + c + sep + a + sep for q, c, a in zip(questions, cots, answers)]
            chunks.append(np.fromiter(chain.from_iterable(rows), dtype=np.int32))
            lengths.extend(map(len, rows))
            n_prompt.extend(len(prefix) + len(q) + 1 for q in questions)
            n_cot.extend(map(len, cots))
            bar.update(len(batch))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    return EncodedSet(tokens, offsets, np.asarray(n_prompt, np.int64), np.asarray(n_cot, np.int64),
                      examples if keep_examples else None)


def check_fits(data: EncodedSet, max_positions: int | None, name: str) -> None:
    if max_positions is None or len(data) == 0:
        return
    longest = int(data.lengths.max())
    if longest > max_positions:
        i = int(data.lengths.argmax())
        raise UserError(
            f"{name}: example {i + 1} is {longest} tokens long but the model has only {max_positions} "
            f"positions; use a model with more positions or shorter examples (max_len_drop: true drops them)"
        )
