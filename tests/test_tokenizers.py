from transformers import AutoTokenizer

from icot.data.format import read_examples
from icot.data.layout import Layout, encode
from icot.data.tokenizers import EOS, train_bpe, word_tokenizer
from conftest import run_cli


def test_word_tokenizer_round_trip_through_auto_tokenizer(tmp_path, reference):
    examples = read_examples(reference / "mult" / "4x4_test.txt")[:50]
    tokenizer = word_tokenizer(f"{e.question} {e.cot} {e.answer}" for e in examples)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for ex in examples:
        ids = tokenizer(ex.cot, add_special_tokens=False)["input_ids"]
        assert loaded(ex.cot, add_special_tokens=False)["input_ids"] == ids
        assert len(ids) == len(ex.cot.split())  # one token per word
        assert loaded.decode(ids) == ex.cot
    assert loaded.eos_token == EOS and loaded.unk_token_id is not None


def test_layout_positions(reference):
    examples = read_examples(reference / "mult" / "4x4_test.txt")[:3]
    tokenizer = word_tokenizer(f"{e.question} {e.cot} {e.answer}" for e in examples)
    layout = Layout.for_tokenizer(tokenizer)
    data = encode(tokenizer, layout, examples)
    row = data.row(0).tolist()
    sep = tokenizer.eos_token_id
    assert data.n_prompt[0] == 9 + 1 and row[9] == sep  # 4 digits * 4 digits + SEP
    assert row[data.n_prompt[0] + data.n_cot[0]] == sep  # SEP closing the CoT
    assert row[-1] == sep and tokenizer.decode(row[data.n_prompt[0] + data.n_cot[0] + 1 : -1]) == f"#### {examples[0].answer}"


def test_bpe_train_save_load(tmp_path, reference):
    out = tmp_path / "bpe"
    gsm = reference / "gsm8k" / "valid.txt"
    assert run_cli("tokenizer", "train", "--data", gsm, "--vocab-size", "600", "--out", out) == 0
    loaded = AutoTokenizer.from_pretrained(out)
    text = read_examples(gsm)[0].question
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == text and len(ids) < len(text.encode())
    assert len(loaded) == 600 and loaded.eos_token == EOS
    assert run_cli("tokenizer", "train", "--data", gsm, "--vocab-size", "600", "--out", out) == 2  # no overwrite
    fresh = train_bpe([gsm], 600)
    assert fresh(text, add_special_tokens=False)["input_ids"] == ids
