"""GSM8K end to end on a CPU: a BPE tokenizer trained on the training file, a micro model
trained with explicit CoT and with stepwise internalization until the whole CoT is removed,
evaluation on the test file. Accuracy is ~0 at this size; what is checked is that every
stage runs and behaves as it must (loss falls, generations parse, no CoT after removal)."""

import json

import pytest

from icot.data.format import read_examples
from icot.data.layout import Layout, encode
from icot.data.tokenizers import load_tokenizer
from icot.methods import load_predictor
from conftest import checked_eval, run_cli, same_number
from test_cli_errors import one_line_error

TRAIN_EXAMPLES = 128
MAX_NEW_TOKENS = 64
BATCH = 8  # 16 steps per epoch


@pytest.fixture(scope="module")
def gsm8k(reference):
    return reference / "gsm8k"


@pytest.fixture(scope="module")
def bpe(gsm8k, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    assert run_cli("tokenizer", "train", "--data", gsm8k / "train_no_aug.txt", "--vocab-size", "1024", "--out", out) == 0
    return out


def train(gsm8k, bpe, run, *args):
    code = run_cli("train", "--train-file", gsm8k / "train_no_aug.txt", "--valid-file", gsm8k / "valid.txt",
                   "--max-train-examples", TRAIN_EXAMPLES, "--max-eval-examples", 8, "--model", "micro",
                   "--tokenizer", bpe, "--batch-size", BATCH, "--lr", "1e-3", "--log-every", 4, "--eval-every", 1000,
                   "--out", run, *args)
    assert code == 0
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def evaluate_on_test(gsm8k, run, tmp_path, capsys):
    """`icot eval` on the first 16 test questions: they are the file's, in order, each verdict is
    the comparison of numbers made here, and the accuracy printed is the share of right ones."""
    return checked_eval(capsys, run / "best", gsm8k / "test.txt", tmp_path / f"{run.name}.json", "--max-examples", 16,
                        "--max-new-tokens", MAX_NEW_TOKENS, right=same_number)


def test_explicit_cot(gsm8k, bpe, tmp_path, capsys):
    records = train(gsm8k, bpe, tmp_path / "explicit", "--method", "explicit", "--epochs", 3)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 12 and losses[-1] < 0.8 * losses[0]
    result = evaluate_on_test(gsm8k, tmp_path / "explicit", tmp_path, capsys)
    assert result["answer_match"] == "normalized" and result["examples"] == 16
    # each answer and CoT is what the saved model writes, split here: `cot SEP #### answer SEP`
    predictor = load_predictor(tmp_path / "explicit" / "best")
    data = encode(predictor.tokenizer, predictor.layout, read_examples(gsm8k / "test.txt")[:16])
    sep, text = predictor.layout.sep_id, lambda ids: predictor.tokenizer.decode(ids, skip_special_tokens=True).strip()
    for i, tokens in enumerate(predictor.generate([data.prompt(i) for i in range(16)], MAX_NEW_TOKENS)):
        first = tokens.index(sep) if sep in tokens else len(tokens)
        cot, rest = tokens[:first], tokens[first + 1 :]
        answer = text(rest[: rest.index(sep)] if sep in rest else rest)
        assert result["predictions"][i]["cot"] == text(cot)
        assert result["predictions"][i]["answer"] == answer.removeprefix("####").strip()


def test_stepwise_removes_the_whole_cot(gsm8k, bpe, tmp_path, capsys):
    # The paper's remove_all_when_remove_beyond 39 on a schedule scaled to 144 steps: 1 epoch
    # of explicit CoT, then one more token removed every step (16 per epoch of 16 steps), all
    # of it from step 16 + 39 = 55 on, leaving 89 steps without any CoT.
    run = tmp_path / "stepwise"
    records = train(gsm8k, bpe, run, "--method", "stepwise", "--epochs", 9, "--pretrain-epochs", 1,
                    "--remove-per-epoch", 16, "--remove-all-when-remove-beyond", 39, "--answer-match", "exact")
    removals = [r for r in records if r.get("event") == "removal"]
    assert removals[-1]["removed"] == "inf" and removals[-1]["step"] == 55
    assert json.loads((run / "best" / "icot.json").read_text())["cot_removed"] == "all"
    result = evaluate_on_test(gsm8k, run, tmp_path, capsys)
    assert result["answer_match"] == "exact"  # as the model was trained
    # Without CoT a generation is SEP (closing an empty CoT), the answer segment, EOS. A micro
    # model trained for 89 steps writes that for almost every new question (31 and 32 of the
    # first 32 test questions with seeds 1234 and 1 when this was written; 13 to 16 of these 16,
    # depending on the torch thread count); a few may not yet. A model that writes CoT: none.
    predictor = load_predictor(run / "best")
    sep = predictor.layout.sep_id
    data = encode(predictor.tokenizer, predictor.layout, read_examples(gsm8k / "test.txt")[:16])
    generated = predictor.generate([data.prompt(i) for i in range(len(data))], max_new_tokens=32)
    assert result["mean_generated_tokens"] == pytest.approx(sum(map(len, generated)) / len(generated))
    no_cot = [tokens for tokens in generated if tokens[0] == sep]
    assert len(no_cot) >= 12
    assert all(tokens.count(sep) == 2 and tokens[-1] == sep for tokens in no_cot)


def test_max_len_train_says_what_it_keeps_out(gsm8k, bpe, tmp_path, capsys):
    records = train(gsm8k, bpe, tmp_path / "run", "--method", "stepwise", "--max-steps", 1, "--max-len-train", 150)
    tokenizer = load_tokenizer(str(bpe))
    data = encode(tokenizer, Layout.for_tokenizer(tokenizer), read_examples(gsm8k / "train_no_aug.txt")[:TRAIN_EXAMPLES])
    event = next(r for r in records if r.get("event") == "longer_than_max_len_train")
    assert event["with_cot"] == pytest.approx((data.lengths > 150).mean()) and 0 < event["without_cot"] < event["with_cot"]
    assert "of training examples are longer with their whole CoT" in capsys.readouterr().out
    code = run_cli("train", "--method", "stepwise", "--train-file", gsm8k / "valid.txt", "--model", "micro",
                   "--tokenizer", bpe, "--max-len-train", 5, "--out", tmp_path / "short")
    assert "every training example is longer even without its CoT" in one_line_error(capsys, code)
