"""Linear probes: they find a planted signal, not noise; targets are right; the CLI is usable."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import run_cli
from icot.data.format import Example, read_examples, write_examples
from icot.data.layout import Layout, encode
from icot.data.mult import MultTask, mult_example, parse_operands, sample_splits
from icot.data.tokenizers import word_tokenizer
from icot.models import build_preset, save_model
from icot.probe.linear import Split, code_labels, majority_accuracy, probe_accuracy
from icot.probe.targets import MISSING, cot_token_quantities, informative, mult_digits, mult_quantities
from test_cli_errors import one_line_error


def test_probe_decodes_a_planted_linear_signal_and_stays_at_chance_on_noise():
    rng = np.random.default_rng(0)
    n, width, classes = 600, 32, 5
    planted = rng.integers(0, classes, n)
    noise = rng.integers(0, classes, n)
    sparse = np.where(rng.random(n) < 0.5, planted, MISSING)  # the planted signal, defined on half the examples
    centroids = rng.normal(size=(classes, width))
    features = torch.from_numpy(rng.normal(size=(n, width)) + 1.5 * centroids[planted]).float()
    split = Split.random(n, 0.25, seed=0)
    coded = code_labels(np.stack([planted, noise, sparse], axis=1), split, max_classes=50)
    accuracy = probe_accuracy(features, coded, split)
    majority = majority_accuracy(coded, split)
    assert accuracy[0] > 0.95 and accuracy[2] > 0.95
    assert accuracy[1] < majority[1] + 0.08 and majority[1] < 0.3  # chance is 0.2


def test_constant_features_give_the_majority_answer_not_amplified_rounding_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (300, 1))
    labels[:150] = 0  # a clear majority class
    features = torch.full((300, 8), 0.1234567) + torch.zeros(300, 8).uniform_(0, 1e-9)  # the same state everywhere
    split = Split.random(300, 0.25, seed=0)
    coded = code_labels(labels, split, max_classes=50)
    assert probe_accuracy(features, coded, split) == pytest.approx(majority_accuracy(coded, split))


def test_split_is_fixed_by_its_seed_and_disjoint():
    a, b = Split.random(100, 0.25, seed=3), Split.random(100, 0.25, seed=3)
    assert np.array_equal(a.train, b.train) and len(a.held_out) == 25
    assert not set(a.train) & set(a.held_out)


def _cot_from_digits(a: int, b: int) -> tuple[str, str]:
    """The CoT and answer text rebuilt from mult_digits alone, by the data format's rules."""
    digits = mult_digits(a, b)
    n, m = len(str(a)), len(str(b))

    def number(prefix: str, width: int) -> str:
        return " ".join(str(digits[f"{prefix}[{j}]"]) for j in range(width))

    steps = [number("p0", n + 1)]
    for i in range(1, m):
        steps.append("+ " + number(f"p{i}", n + 1 + i))
        if i < m - 1:
            steps.append(f"( {number(f's{i}', n + 1 + i)} )")
    return " ".join(steps), number("ans", n + m)


@pytest.mark.parametrize("a, b", [(3719, 3349), (123, 456), (999, 999), (100, 100), (7, 98765), (98765, 7), (55, 4321)])
def test_multiplication_targets_are_the_digits_the_cot_writes(a, b):
    example = mult_example(a, b)
    assert _cot_from_digits(a, b) == (example.cot, example.answer)


def test_constant_and_duplicate_quantities_are_left_out():
    pairs = sample_splits(MultTask(3, 3), {"probe": 200}, seed=0)["probe"]
    kept, left_out = informative(mult_quantities([mult_example(a, b) for a, b in pairs], "data.txt"))
    names = [q.name for q in kept]
    assert left_out["p1[0]"] == "constant" and left_out["p2[1]"] == "constant"
    assert left_out["s1[0]"] == "same as p0[0]" and left_out["ans[0]"] == "same as p0[0]"
    assert names[:4] == ["p0[0]", "p0[1]", "p0[2]", "p0[3]"] and "ans[5]" in names


def test_cot_token_quantities_label_the_kth_token_and_mark_short_cots():
    examples = [Example("1 * 2", "a b c", "2"), Example("3 * 4", "a d", "12"), Example("5 * 6", "e b c", "30")]
    tokenizer = word_tokenizer(f"{e.question} {e.cot} {e.answer}" for e in examples)
    data = encode(tokenizer, Layout.for_tokenizer(tokenizer), examples)
    quantities = cot_token_quantities(data, count=5, path="data.txt", tokenizer=tokenizer)
    assert [q.name for q in quantities] == ["cot[0]", "cot[1]", "cot[2]"]
    first, second, third = (q.labels for q in quantities)
    assert first[0] == first[1] != first[2]  # a, a, e
    assert second[0] == second[2] != second[1]  # b, d, b
    assert third[1] == MISSING and third[0] == third[2]


# ----- the command --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def probe_setup(tmp_path_factory):
    """A 3x3 data file and two random-initialised micro models (probing needs no trained model)."""
    root = tmp_path_factory.mktemp("probe")
    pairs = sample_splits(MultTask(3, 3), {"probe": 240}, seed=1)["probe"]
    examples = [mult_example(a, b) for a, b in pairs]
    data = root / "probe.txt"
    write_examples(data, examples)
    tokenizer = word_tokenizer(f"{e.question} {e.cot} {e.answer}" for e in examples)
    models = []
    for seed, method in [(0, "explicit"), (1, "nocot")]:
        torch.manual_seed(seed)
        model = build_preset("micro", len(tokenizer), tokenizer.eos_token_id, max_positions=64)
        save_model(model, tokenizer, root / method, {"method": method})
        models.append(root / method)
    return root, data, models


def test_probe_command_compares_models_and_writes_json_table_and_heatmap(probe_setup, capsys):
    root, data, (explicit, nocot) = probe_setup
    out = root / "out"
    assert run_cli("probe", "--model", explicit, "--model", nocot, "--data", data, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "### explicit: at SEP" in printed and "### nocot: last 7 input positions, concatenated" in printed
    result = json.loads((out / "probe.json").read_text())
    assert [m["label"] for m in result["models"]] == ["explicit", "nocot"]
    assert result["train_examples"] == 180 and result["held_out_examples"] == 60
    sep = result["models"][0]["accuracy"]["sep"]
    assert list(sep) == ["emb", "L1", "L2"] and set(sep["L1"]) == {q["name"] for q in result["quantities"]}
    # a known answer: entering layer 1 at SEP every example has the same state (SEP's embedding at
    # the same position: every 3x3 prompt is as long), so each probe there answers a most frequent
    # training value (the majority; either one of a tie) for every held-out example
    examples = read_examples(data)
    split = Split.random(len(examples), 0.25, seed=0)
    digits = [mult_digits(*parse_operands(e.question)) for e in examples]
    for name in (q["name"] for q in result["quantities"]):
        counts = Counter(digits[i][name] for i in split.train)
        shares = {round(sum(digits[i][name] == value for i in split.held_out) / len(split.held_out), 4)
                  for value, count in counts.items() if count == max(counts.values())}
        assert all(model["accuracy"]["sep"]["emb"][name] in shares for model in result["models"]), name
    assert (out / "probe.png").stat().st_size > 10_000 and (out / "probe.md").read_text().count("| majority |") == 4


def test_probe_command_reads_cot_tokens_for_any_task(probe_setup, capsys):
    root, data, (explicit, _) = probe_setup
    out = root / "cot"
    assert run_cli("probe", "--model", explicit, "--data", data, "--out", out, "--targets", "cot", "--at", "sep",
                   "--cot-tokens", "7") == 0
    result = json.loads((out / "probe.json").read_text())
    assert result["targets"] == "cot" and list(result["models"][0]["accuracy"]) == ["sep"]
    # cot[4] is always '+' and cot[5] the zero that shifts partial product 1
    assert [q["name"] for q in result["quantities"]] == ["cot[0]", "cot[1]", "cot[2]", "cot[3]", "cot[6]"]
    assert result["left_out"] == {"cot[4]": "constant", "cot[5]": "constant"}


def test_probe_bad_input_is_one_line(probe_setup, tmp_path, capsys):
    root, data, (explicit, _) = probe_setup
    line = one_line_error(capsys, run_cli("probe", "--model", tmp_path / "none", "--data", data, "--out", tmp_path / "o"))
    assert "none: no such directory" in line
    words = tmp_path / "words.txt"
    words.write_text("1 2 3 * 4 5 6||1 2 #### 3\n" * 9 + "hello there * 4 5 6||1 2 #### 3\n")
    line = one_line_error(capsys, run_cli("probe", "--model", explicit, "--data", words, "--out", tmp_path / "o"))
    assert f"{words}:10:" in line and "does not know 'hello'" in line
    sums = tmp_path / "sums.txt"
    sums.write_text("1 2 + 3 4||4 6 #### 4 6\n" * 20)
    line = one_line_error(capsys, run_cli("probe", "--model", explicit, "--data", sums, "--targets", "mult",
                                          "--out", tmp_path / "o"))
    assert f"{sums}:1: not a multiplication input" in line and "--targets cot" in line
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "probe.json").write_text("{}")
    line = one_line_error(capsys, run_cli("probe", "--model", explicit, "--data", data, "--out", tmp_path / "o"))
    assert "probe.json exists; pass --overwrite" in line
    line = one_line_error(capsys, run_cli("probe", "--model", explicit, "--data", data, "--out", tmp_path / "p",
                                          "--held-out", "1.5"))
    assert "--held-out 1.5" in line
    line = one_line_error(capsys, run_cli("probe", "--model", explicit, "--data", data, "--out", tmp_path / "p",
                                          "--at", "middle"))
    assert "--at middle" in line


def test_hidden_states_do_not_depend_on_batching_or_padding(probe_setup):
    from icot.methods import load_predictor
    from icot.probe.features import prompt_states

    _, _, (explicit, _) = probe_setup
    predictor = load_predictor(explicit)
    questions = ["1 2 * 3 4 5", "1 2 3 * 4 5 6", "7 * 8", "9 9 9 * 1"]  # prompts of different lengths
    data = encode(predictor.tokenizer, predictor.layout, [Example(q, "1", "2") for q in questions])
    batched = prompt_states(predictor, data, window=2, batch_size=4, progress=False)
    alone = prompt_states(predictor, data, window=2, batch_size=1, progress=False)
    assert torch.allclose(batched.sep, alone.sep, atol=1e-5) and torch.allclose(batched.inputs, alone.inputs, atol=1e-5)
    assert batched.sep.shape == (3, 4, 128) and batched.inputs.shape == (3, 4, 2 * 128)
    ids = torch.tensor([data.prompt(0)])
    reference = predictor.model(input_ids=ids, output_hidden_states=True).hidden_states
    assert all(torch.allclose(batched.sep[layer, 0], reference[layer][0, -1], atol=1e-5) for layer in range(3))
    assert torch.allclose(batched.inputs[1, 0], reference[1][0, -3:-1].flatten(), atol=1e-5)
