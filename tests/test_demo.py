"""`icot demo --quick`: every method trains, is measured and lands in the table and the plot."""

import json

from conftest import product_is_right, run_cli
from test_cli_errors import one_line_error


def test_quick_demo_runs_every_method(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_cli("demo", "--quick", "--out", out, "--jobs", "2") == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert list(results) == ["nocot", "explicit", "stepwise", "kd"]
    import icot

    for name, r in results.items():
        assert r["examples_per_s_batch1"] > 0 and r["train_examples"] > 0
        # the accuracy is the share of the 50 test questions the saved model answers with their product, checked here
        predictions = icot.load(out / name / "best").evaluate(out / "data" / "test.txt")["predictions"]
        assert len(predictions) == 50 and r["accuracy"] == sum(map(product_is_right, predictions)) / 50
    # a model trained from the explicit one also carries its training cost; ICoT-KD that of its four stages
    assert results["stepwise"]["train_examples"] > results["explicit"]["train_examples"]
    kd_stages = [json.loads(line) for stage in ("teacher", "student", "emulator", "couple")
                 for line in (out / "kd" / stage / "metrics.jsonl").read_text().splitlines()]
    for key in ("train_seconds", "train_cpu_seconds"):
        assert results["kd"][key] == sum(r[key] for r in kd_stages if r.get("event") == "end")
    assert {r["model"] for r in results.values()} == {"micro", "nano-deep"} and results["kd"]["model"] == "nano-deep"
    assert json.loads((out / "stepwise" / "best" / "icot.json").read_text())["cot_removed"] == "all"
    table = (out / "results.md").read_text()
    assert all(f"| {name} | {r['model']} |" in table for name, r in results.items())
    assert "| training time | training CPU time |" in table  # wall time overstates a run that shared its core
    assert (out / "stepwise_accuracy_vs_removed.png").stat().st_size > 10_000
    # trained side by side in two processes, each run's output in its own log
    assert all("test accuracy" in (out / "logs" / f"{name}.log").read_text() for name in results)
    capsys.readouterr()
    line = one_line_error(capsys, run_cli("demo", "--quick", "--out", out))  # never replaced silently
    assert "pass --overwrite" in line and (out / "results.json").exists()


def test_runs_are_grouped_by_what_they_start_from_and_the_costliest_group_starts_first():
    import torch

    from icot.demo import DemoPlan, chains, default_jobs, schedule

    plan = DemoPlan()
    assert chains(plan) == [["nocot"], ["explicit", "stepwise"], ["kd"]]
    assert default_jobs(plan) == (1 if torch.cuda.is_available() else 3)  # on a CPU every group at once, however many cores
    # kd: 7500 steps of a 6-layer model; explicit -> stepwise: 8500 of a 2-layer one; nocot, cut to 3000 here
    plan.runs["nocot"]["max_steps"] = 3000
    assert schedule(plan) == [["kd"], ["explicit", "stepwise"], ["nocot"]]


def test_demo_jobs_must_be_positive(tmp_path, capsys):
    line = one_line_error(capsys, run_cli("demo", "--quick", "--out", tmp_path / "d", "--jobs", "0"))
    assert "--jobs 0: must be at least 1" in line and not (tmp_path / "d").exists()


def test_an_error_in_a_worker_process_reaches_the_user_as_itself(tmp_path):
    import pytest

    from icot.demo import DemoPlan, make_data, train_all
    from icot.errors import UserError

    plan = DemoPlan(train=200, valid=20, test=20, runs={
        "nocot": {"method": "nocot", "lr": 1e-3, "max_steps": 2, "eval_every": 2},
        "explicit": {"method": "explicit", "lr": -1.0, "max_steps": 2, "eval_every": 2}})
    with pytest.raises(UserError, match="lr must be positive"):
        train_all(plan, make_data(plan, tmp_path), tmp_path, jobs=2)
