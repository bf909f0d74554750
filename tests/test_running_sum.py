"""The running-sum auxiliary loss (Bai et al. 2025) for stepwise internalization on multiplication."""

import json
import math
import random

import numpy as np
import pytest
import torch

from icot.data.batching import collate, remove_cot
from icot.data.layout import Layout, encode
from icot.data.mult import mult_example, parse_operands, running_values
from icot.data.tokenizers import word_tokenizer
from icot.methods import running_sum
from conftest import checked_eval, mult_examples, run_cli


def bai_c_hats(a: int, b: int) -> list[int]:
    """ĉ of each answer digit as the authors of the paper compute it (ajyl/icot, experiments/probe_c_hat.py)."""
    a_digits, b_digits = [int(d) for d in str(a)[::-1]], [int(d) for d in str(b)[::-1]]
    c_hats = []
    for k in range(len(a_digits) + len(b_digits)):
        pair_sum = sum(a_digits[i] * b_digits[k - i] for i in range(k + 1) if i < len(a_digits) and k - i < len(b_digits))
        c_hats.append(pair_sum + (c_hats[-1] // 10 if c_hats else 0))
    return c_hats


def values_of(a: int, b: int) -> tuple[list[float], list[float]]:
    cot, answer = running_values([int(d) for d in reversed(str(a))], [int(d) for d in reversed(str(b))])
    return cot[0].tolist(), answer[0].tolist()


def test_values_by_hand_for_12_times_34():
    # CoT `8 4 0 + 0 6 3 0`, answer `8 0 4 0`: column 1 of the answer is 1*4 + 2*3 = 10, carrying 1 into column 2
    assert mult_example(12, 34).cot == "8 4 0 + 0 6 3 0"
    cot, answer = values_of(12, 34)
    assert cot[:3] == [8, 4, 0] and math.isnan(cot[3]) and cot[4:] == [0, 6, 3, 0]
    assert answer == [8, 10, 4, 0]


@pytest.mark.parametrize("digits", [(4, 4), (3, 5), (5, 2)])
def test_every_digit_is_its_value_mod_10_and_answer_values_are_bai_c_hats(digits):
    rng = random.Random(0)
    for _ in range(300):
        a, b = (rng.randrange(10 ** (d - 1), 10**d) for d in digits)
        example = mult_example(a, b)
        cot, answer = values_of(a, b)
        words = example.cot.split() + example.answer.split()
        assert len(words) == len(cot) + len(answer)
        for word, value in zip(words, cot + answer):
            assert (int(value) % 10 == int(word)) if word.isdigit() else math.isnan(value)
        assert answer == bai_c_hats(a, b)


def test_the_table_labels_every_example_of_mixed_shapes_at_its_own_tokens():
    examples = [e for pair in zip(mult_examples(3, 3, 5, seed=1), mult_examples(2, 4, 5, seed=2)) for e in pair]
    tokenizer = word_tokenizer([f"{e.question} {e.cot} #### {e.answer}" for e in examples])
    data = encode(tokenizer, Layout.for_tokenizer(tokenizer), examples)
    table = running_sum.value_table(data)
    for i, example in enumerate(examples):
        words = tokenizer.convert_ids_to_tokens(data.row(i).tolist())
        labels = table[data.offsets[i] : data.offsets[i + 1]] * running_sum.SCALE
        labelled = [(word, round(float(v))) for word, v in zip(words, labels) if not np.isnan(v)]
        cot, answer = values_of(*parse_operands(example.question))
        assert [v for _, v in labelled] == [v for v in cot + answer if not math.isnan(v)]
        assert all(int(word) == v % 10 for word, v in labelled)


@pytest.fixture
def toy_batch():
    examples = mult_examples(3, 3, 6, seed=1)
    tokenizer = word_tokenizer([f"{e.question} {e.cot} #### {e.answer}" for e in examples])
    layout = Layout.for_tokenizer(tokenizer)
    data = encode(tokenizer, layout, examples)
    batch = collate(data, np.arange(len(data)), layout.pad_id)
    values = running_sum.batch_values(running_sum.value_table(data), data, torch.arange(len(data)))
    return tokenizer, layout, batch, values


@pytest.mark.parametrize("side", ["left", "right"])
def test_values_follow_their_tokens_through_removal_and_the_token_before_the_gap_holds_the_last_removed(toy_batch, side):
    tokenizer, layout, batch, values = toy_batch
    n = torch.tensor([0, 1, 3, 7, 12, 40])  # 40: the whole CoT (24 tokens)
    removed = remove_cot({**batch, "values": values}, n, side, True, layout.pad_id)
    moved = removed["values"]
    assert moved.shape == removed["input_ids"].shape
    for row in range(len(n)):
        k = min(int(n[row]), int(batch["cot_len"][row]))
        before_gap = int(batch["first_sep"][row]) + (0 if side == "left" else int(batch["cot_len"][row]) - k)
        for col, token in enumerate(removed["input_ids"][row].tolist()):
            word, value = tokenizer.convert_ids_to_tokens(token), moved[row, col].item()
            if col == before_gap and k > 0:
                last_removed = before_gap + k
                assert value == values[row, last_removed].item() or (math.isnan(value) and math.isnan(values[row, last_removed]))
            elif word.isdigit() and col > batch["first_sep"][row]:
                assert round(value * running_sum.SCALE) % 10 == int(word)
            else:
                assert math.isnan(value)
    if side == "left":  # with 7 removed the first SEP holds ĉ of the CoT's 7th token (the second partial product's)
        assert moved[3, batch["first_sep"][3]] == values[3, batch["first_sep"][3] + 7]


def test_probe_loss_is_the_mean_squared_error_over_labelled_tokens():
    predicted = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]])
    values = torch.tensor([[1.5, math.nan, 3.0], [math.nan, math.nan, 2.0]])
    assert running_sum.probe_loss(predicted, values).item() == pytest.approx((0.25 + 0 + 9) / 3)
    assert running_sum.probe_loss(predicted, torch.full_like(values, math.nan)).item() == 0


def train(data, out, *extra) -> list[dict]:
    assert run_cli("train", "--method", "stepwise", "--data", data, "--model", "micro", "--out", out, "--lr", "3e-3",
                   "--batch-size", "32", "--log-every", "5", "--keep-position", "--pretrain-epochs", "10",
                   "--remove-per-epoch", "0.5", *extra) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_probe_learns_is_saved_beside_a_plain_model_and_weight_zero_is_plain_stepwise(mult3_data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    records = train(mult3_data, tmp_path / "probed", "--epochs", "40", "--running-sum-weight", "1", "--eval-every", "40")
    mse = [r["running_sum_mse"] for r in records if "loss" in r]
    assert len(mse) == 8 and mse[-1] < mse[0] / 4
    best = tmp_path / "probed" / "best"
    assert (best / "running_sum_probe.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(best)  # the plain Hugging Face model, the probe beside it
    result = checked_eval(capsys, best, mult3_data / "test.txt", tmp_path / "eval.json")  # the probe is left out
    assert result["accuracy"] == records[-1]["test_accuracy"]

    plain = train(mult3_data, tmp_path / "plain", "--epochs", "10", "--running-sum-weight", "0")
    assert not any("running_sum_mse" in r for r in plain)
    assert not (tmp_path / "plain" / "best" / "running_sum_probe.safetensors").exists()


def test_the_weight_scales_the_probe_term_of_the_loss(mult3_data, tmp_path):
    # the first logged loss, before any step has changed the model: CE + weight * mse (same seed, same batches)
    first = lambda rs: next(r for r in rs if "loss" in r)
    base = first(train(mult3_data, tmp_path / "w0", "--epochs", "1", "--log-every", "1", "--running-sum-weight", "1e-9"))
    heavy = first(train(mult3_data, tmp_path / "w3", "--epochs", "1", "--log-every", "1", "--running-sum-weight", "3"))
    assert heavy["running_sum_mse"] == pytest.approx(base["running_sum_mse"], rel=1e-4)
    assert heavy["loss"] == pytest.approx(base["loss"] + 3 * base["running_sum_mse"], rel=1e-4)


@pytest.mark.parametrize("args,fragment", [
    (["--running-sum-weight", "-1"], "running_sum_weight must be >= 0"),
    (["--running-sum-weight", "1", "--running-sum-layer", "2"], "running_sum_layer 2 is not a layer of this 2-layer model"),
])
def test_bad_probe_settings_are_one_line_errors(mult3_data, tmp_path, capsys, args, fragment):
    from test_cli_errors import one_line_error

    line = one_line_error(capsys, run_cli("train", "--method", "stepwise", "--data", mult3_data, "--model", "micro",
                                          "--out", tmp_path / "r", *args))
    assert fragment in line


def test_data_that_is_not_multiplication_is_a_one_line_error(tmp_path, capsys):
    from test_cli_errors import one_line_error

    (tmp_path / "train.txt").write_text("what is two and two||two and two #### 4\n")
    line = one_line_error(capsys, run_cli("train", "--method", "stepwise", "--data", tmp_path, "--model", "micro",
                                          "--out", tmp_path / "r", "--running-sum-weight", "1"))
    assert "training example 1 is not a multiplication" in line
