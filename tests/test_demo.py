"""`icot demo --quick`: every method trains, is measured and lands in the table and the plot."""

import json

from conftest import run_cli
from test_cli_errors import one_line_error


def test_quick_demo_runs_every_method(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_cli("demo", "--quick", "--out", out) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert list(results) == ["nocot", "explicit", "stepwise", "kd"]
    for r in results.values():
        assert 0 <= r["accuracy"] <= 1 and r["examples_per_s_batch1"] > 0 and r["train_examples"] > 0
    # a model trained from the explicit one also carries its training cost; ICoT-KD that of its four stages
    assert results["stepwise"]["train_examples"] > results["explicit"]["train_examples"]
    kd_stages = [json.loads(line) for stage in ("teacher", "student", "emulator", "couple")
                 for line in (out / "kd" / stage / "metrics.jsonl").read_text().splitlines()]
    assert results["kd"]["train_seconds"] == sum(r["train_seconds"] for r in kd_stages if r.get("event") == "end")
    assert {r["model"] for r in results.values()} == {"micro", "micro-deep"} and results["kd"]["model"] == "micro-deep"
    assert json.loads((out / "stepwise" / "best" / "icot.json").read_text())["cot_removed"] == "all"
    table = (out / "results.md").read_text()
    assert all(f"| {name} | {r['model']} |" in table for name, r in results.items())
    assert (out / "stepwise_accuracy_vs_removed.png").stat().st_size > 10_000
    capsys.readouterr()
    line = one_line_error(capsys, run_cli("demo", "--quick", "--out", out))  # never replaced silently
    assert "pass --overwrite" in line and (out / "results.json").exists()
