"""The Python API (icot.train, icot.load, icot.generate_mult) and `icot predict`'s output."""

import json
import re
import subprocess
import sys

import pytest

import icot
from conftest import ROOT, product_is_right, run_cli, true_answer
from icot.data.format import parse_line, read_examples
from icot.data.mult import mult_example


def test_train_load_predict_evaluate_and_resume(mult3_data, tmp_path):
    run = icot.train({"method": "explicit", "data": mult3_data, "model": "micro"}, out=tmp_path / "run", lr=3e-3,
                     batch_size=32, epochs=100, max_steps=6, eval_every=3)
    assert run == tmp_path / "run" and (run / "best" / "model.safetensors").is_file()
    end = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    model = icot.load(run / "best", device="cpu")
    result = model.evaluate(mult3_data / "test.txt")
    assert result["accuracy"] == end["test_accuracy"] and len(result["predictions"]) == result["examples"] == 32
    # and it is the share of the 32 questions answered with their product, checked here
    assert result["accuracy"] == sum(map(product_is_right, result["predictions"])) / 32
    assert result["answer_match"] == "normalized" and result["data"] == str(mult3_data / "test.txt")
    examples = read_examples(mult3_data / "test.txt")
    assert model.evaluate(examples, max_examples=5)["examples"] == 5
    assert model.predict("123*456") == model.generate("3 2 1 * 6 5 4").ordinary_answer  # either way of typing it
    # a second icot.train in the same process (the training module's import must not shadow the function)
    assert icot.train(resume=run, max_steps=8) == run
    assert [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]["step"] == 8


def test_errors_are_user_errors_with_the_commands_message(mult3_data, explicit_run, tmp_path):
    with pytest.raises(icot.UserError, match="lr: expected a number, got 'fast'"):
        icot.train(data=mult3_data, out=tmp_path / "r", lr="fast")
    with pytest.raises(icot.UserError, match="unknown key 'learning_rate'"):
        icot.train(data=mult3_data, out=tmp_path / "r", learning_rate=0.1)
    with pytest.raises(icot.UserError, match="--batch-size 8: .* a resume continues the same run"):
        icot.train(resume=explicit_run, batch_size=8)
    with pytest.raises(icot.UserError, match="no such directory"):
        icot.load(tmp_path / "none" / "model")
    model = icot.load(explicit_run / "best")
    with pytest.raises(icot.UserError, match="--batch-size 0: must be at least 1"):
        model.evaluate(mult3_data / "test.txt", batch_size=0)
    with pytest.raises(icot.UserError, match="answer matching 'fuzzy' is unknown"):
        model.evaluate(mult3_data / "test.txt", answer_match="fuzzy")
    with pytest.raises(icot.UserError, match="vocabulary has no 'hello'"):
        model.predict("hello")
    with pytest.raises(icot.UserError, match="--digits '4by4'"):
        icot.generate_mult("4by4", tmp_path / "d")
    assert not (tmp_path / "r").exists() and not (tmp_path / "d").exists()


def test_generate_mult_writes_the_splits(tmp_path):
    files = icot.generate_mult("2x3", tmp_path / "d", train=50, valid=0, test=10, seed=3)
    assert files == {"test": tmp_path / "d" / "test.txt", "train": tmp_path / "d" / "train.txt"}
    train, test = read_examples(files["train"]), read_examples(files["test"])
    assert len(train) == 50 and len(test) == 10 and not {e.question for e in train} & {e.question for e in test}
    with pytest.raises(icot.UserError, match="exists; pass --overwrite"):
        icot.generate_mult("2x3", tmp_path / "d", train=50, valid=0, test=10)


def test_import_icot_loads_no_heavy_library():
    code = "import sys, icot; print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'yaml') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    answer = re.search(r"^12\*34 = (\S*)$", printed, re.M).group(1)
    accuracy = float(re.search(r"^test accuracy: (\S+)$", printed, re.M).group(1))
    # what was printed is what the saved model answers, and the accuracy is the share of the 100
    # test questions it answers with their product, checked here
    model = icot.load(tmp_path / "runs" / "2x2-explicit" / "best")
    assert model.predict("12*34") == answer
    predictions = model.evaluate(tmp_path / "data" / "2x2" / "test.txt")["predictions"]
    assert len(predictions) == 100 and accuracy == sum(map(product_is_right, predictions)) / 100
    assert (tmp_path / "runs" / "2x2-explicit" / "best" / "README.md").is_file()


# ----- icot predict --------------------------------------------------------------------------------

def test_predict_prints_the_question_as_typed_and_the_answer_in_ordinary_digits(explicit_run, mult3_data, capsys):
    best = explicit_run / "best"
    example = read_examples(mult3_data / "train.txt")[0]
    a, b = (int("".join(reversed(part.split()))) for part in example.question.split(" * "))
    assert run_cli("predict", "--model", best, f"{a}*{b}", f"{a} x {b}", example.question) == 0
    lines = capsys.readouterr().out.splitlines()
    # the model memorised its 32 examples: right, with its CoT shown in ordinary digits too
    partial = a * (b % 10)
    assert lines[0].startswith(f"{a}*{b} = {a * b}  (correct; CoT: {partial} + ")
    assert lines[1].startswith(f"{a} x {b} = {a * b}  (correct; CoT: ")
    assert lines[2] == lines[0]  # typed as in the data file, shown in ordinary digits
    assert run_cli("predict", "--model", best, "--papers-format", f"{a}*{b}") == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert parse_line(line, "output", 1) == mult_example(a, b)  # what it wrote: the data line itself


def test_predict_says_when_the_answer_is_wrong(explicit_run, mult3_data):
    model = icot.load(explicit_run / "best")
    example = read_examples(mult3_data / "train.txt")[0]
    a, b = (int("".join(reversed(part.split()))) for part in example.question.split(" * "))
    memorised = model.generate(f"{a}*{b}")  # one of its 32 examples: right, as computed here
    assert memorised.answer == true_answer(example.question) and memorised.line().startswith(f"{a}*{b} = {a * b}  (correct")
    prediction = model.generate("999*999")  # not among them: whatever it answers, the verdict is the product's
    right = prediction.answer.split() == true_answer("9 9 9 * 9 9 9").split()
    assert prediction.line().startswith("999*999 = ") and model.predict("9 9 9 * 9 9 9") == prediction.ordinary_answer
    assert ("(correct" in prediction.line()) is right and ("(wrong: 999*999 = 998001" in prediction.line()) is not right
    # a model that answers 999*999 with the product of a and b: wrong, says so, and shows what it answered
    tokens = model.predictor.generate([model.predictor.layout.prefix + model.predictor.tokenizer(
        example.question, add_special_tokens=False)["input_ids"] + [model.predictor.layout.sep_id]], 64)
    model.predictor.generate = lambda prompts, max_new_tokens: tokens
    wrong = model.generate("999*999").line()
    shown = wrong[len("999*999 = "):].split("  (")[0]
    assert shown.lstrip("0") == str(a * b) and wrong[len(f"999*999 = {shown}  ("):].startswith("wrong: 999*999 = 998001")
