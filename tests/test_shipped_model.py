"""The implicit models shipped in models/ answer without CoT, right after install."""

import json

import pytest
from conftest import ROOT, mult_examples, run_cli
from icot.data.format import write_examples

MODEL_3X3 = ROOT / "models" / "mult3x3-micro-stepwise"
MODEL_4X4 = ROOT / "models" / "mult4x4-tiny-stepwise"


@pytest.mark.parametrize("model, question, line", [
    (MODEL_3X3, "907*555", "907*555 = 503385  (correct)\n"),
    (MODEL_4X4, "1234*5678", "1234*5678 = 7006652  (correct)\n"),
])
def test_shipped_model_multiplies_without_cot(capsys, model, question, line):
    assert run_cli("predict", "--model", model, question) == 0
    assert capsys.readouterr().out == line


# Fresh questions come from another seed than the training lines (for 3x3 ~1 in 4 lies in its
# 200k training lines; for 4x4 about 1 in 100 in its 808k). Measured on 1000 such questions:
# 3x3 0.998, 4x4 see models/mult4x4-tiny-stepwise/README.md.
@pytest.mark.parametrize("model, digits, tokens", [(MODEL_3X3, 3, 9), (MODEL_4X4, 4, 11)])
def test_shipped_model_on_fresh_questions(tmp_path, model, digits, tokens):
    questions = tmp_path / "fresh.txt"
    write_examples(questions, mult_examples(digits, digits, 300, seed=2027))
    assert run_cli("eval", "--model", model, "--data", questions, "--json", tmp_path / "r.json") == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["accuracy"] >= 0.97 and result["mean_generated_tokens"] == tokens
