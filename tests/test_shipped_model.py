"""The implicit 3x3 model shipped in models/ answers without CoT, right after install."""

import json

from conftest import ROOT, mult_examples, run_cli
from icot.data.format import write_examples

MODEL = ROOT / "models" / "mult3x3-micro-stepwise"


def test_shipped_model_multiplies_without_cot(capsys):
    assert run_cli("predict", "--model", MODEL, "907*555") == 0
    assert capsys.readouterr().out == "907*555 = 503385  (correct)\n"


def test_shipped_model_on_fresh_questions(tmp_path, capsys):
    questions = tmp_path / "fresh.txt"
    write_examples(questions, mult_examples(3, 3, 300, seed=2027))  # another seed: ~1 in 4 lies in its 200k training lines
    assert run_cli("eval", "--model", MODEL, "--data", questions, "--json", tmp_path / "r.json") == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["accuracy"] >= 0.97 and result["mean_generated_tokens"] == 9  # measured 0.998 on 1000
