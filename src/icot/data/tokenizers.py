"""Tokenizers: a word-level one for space-separated arithmetic, any pretrained one, or a
byte-level BPE trained on the user's data. All are Hugging Face fast tokenizers, so they
save with `save_pretrained` and load with `AutoTokenizer.from_pretrained`.

Every tokenizer must have an EOS token: it is also the separator (SEP) of the sequence
layout, as in both papers.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from icot.errors import UserError
from icot.paths import replacing, writing_aside

EOS = "<|endoftext|>"
UNK = "<unk>"
MAX_VOCAB = 1_000_000  # far above any real tokenizer's (about 256k at most)
# Always in the word vocabulary, so that any arithmetic file tokenizes without <unk>.
ARITHMETIC_WORDS = [str(d) for d in range(10)] + ["+", "-", "*", "/", "=", "(", ")", ".", ",", "####", "||"]


def word_tokenizer(texts) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every space-separated word in `texts`."""
    words = set(ARITHMETIC_WORDS)
    for text in texts:
        words.update(text.split())
    vocab = {EOS: 0, UNK: 1}
    for word in sorted(words):
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return _wrap(core, unk_token=UNK)


def _wrap(core: Tokenizer, **extra) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=EOS, **extra)
    tokenizer.model_max_length = 1_000_000  # positions are the model's limit, not the tokenizer's
    return tokenizer


def train_bpe(files, vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) trained on the text of data files."""
    from icot.data.format import read_examples

    if not 300 <= vocab_size <= MAX_VOCAB:  # the trainer allocates for the requested size up front
        raise UserError(f"--vocab-size {vocab_size}: expected 300 (256 bytes plus merges) to {MAX_VOCAB:,}")
    texts = []
    for path in files:
        for ex in read_examples(path):
            texts.extend([ex.question, ex.cot, f"#### {ex.answer}"])
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    core.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return _wrap(core)


def load_tokenizer(name_or_path: str):
    """A pretrained tokenizer from a local directory or a hub id."""
    from icot.paths import check_local_dir

    check_local_dir(name_or_path, "tokenizer")
    _check_special_tokens_file(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        where = "directory" if os.path.isdir(name_or_path) else "hub id"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load tokenizer from {where} '{name_or_path}': {first}") from None
    return ensure_special_tokens(tokenizer, name_or_path)


def _check_special_tokens_file(name_or_path: str) -> None:
    """A local tokenizer.json comes with its tokenizer_config.json: without it, transformers takes
    EOS for the unknown token and pads with nothing, and the model's answers change silently."""
    folder = Path(name_or_path)
    if (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise UserError(f"tokenizer {folder}: tokenizer.json without its tokenizer_config.json (the EOS, padding and "
                        "unknown tokens); expected both files as save_pretrained writes them")


def ensure_special_tokens(tokenizer, name: str):
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer '{name}' has no EOS token; icot uses EOS as the separator and needs one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


PORTABLE_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}
LOAD_STATE = ("is_local", "local_files_only")  # how transformers 5 was asked to load it, not tokenizer settings


def portable_config(directory) -> None:
    """A tokenizer_config.json every supported transformers loads: transformers 5 names its fast
    tokenizer class `TokenizersBackend`, which 4.x does not know; `PreTrainedTokenizerFast` is the
    same class in 5 (an alias) and the fast tokenizer in 4.x. The load flags 5 writes are dropped.
    Rewrites `directory`/tokenizer_config.json, as save_pretrained wrote it, in place."""
    path = Path(directory) / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = PORTABLE_CLASS.get(config.get("tokenizer_class"), config.get("tokenizer_class"))
    for key in LOAD_STATE:
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")  # what save_pretrained may write


def save_tokenizer(tokenizer, out: str | os.PathLike) -> None:
    """save_pretrained into a directory beside `out`, then its files copied into `out` together
    (paths.replacing, nested): an interruption leaves the old tokenizer, never half a new one."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kept = "the tokenizer there before, if any, is left as it was"
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.", ignore_cleanup_errors=True) as tmp, \
            writing_aside(Path(tmp), f"tokenizer {out}", kept), contextlib.ExitStack() as stack:
        tokenizer.save_pretrained(tmp)
        portable_config(tmp)
        for file in sorted(Path(tmp).iterdir()):
            stack.enter_context(replacing(out / file.name, binary=True)).write(file.read_bytes())
