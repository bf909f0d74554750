"""`icot demo --quick`: every method trains, is measured and lands in the table and the plot."""

import json
import os

from conftest import product_is_right, run_cli
from test_cli_errors import one_line_error


def test_quick_demo_runs_every_method(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_cli("demo", "--quick", "--out", out, "--jobs", "2", "--seed", "7") == 0
    said = capsys.readouterr().out
    assert said.startswith("icot demo --quick: an install check") and "the models learn nothing" in said
    assert "an install check" in (out / "results.md").read_text()
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
    import torch

    threads = torch.get_num_threads()  # the test process's, as the demo's measurement ran in it
    assert (f"Measured after all training, one model at a time, with {threads} torch thread{'s' * (threads > 1)}: "
            "accuracy and examples/s at batch 64 on every test example, examples/s at batch 1 on the first "
            f"{json.loads((out / 'results.json').read_text())['plan']['speed_examples']}.") in table
    assert (out / "stepwise_accuracy_vs_removed.png").stat().st_size > 10_000
    # --seed is every run's, KD's stages included; the data does not change with it
    import yaml

    configs = [out / name / "config.yaml" for name in ("nocot", "explicit", "stepwise")]
    configs += [out / "kd" / stage / "config.yaml" for stage in ("teacher", "student", "emulator", "couple")]
    assert [yaml.safe_load(c.read_text())["seed"] for c in configs] == [7] * 7 and "Seed 7." in table
    from icot.demo import DemoPlan, make_data

    default_seed = make_data(DemoPlan().quick(), tmp_path / "seed-1234")
    assert all((default_seed / f).read_text() == (out / "data" / f).read_text() for f in ("train.txt", "test.txt"))
    # trained side by side in two processes, each run's output in its own log, KD's stages each in theirs
    logs = {name: (out / "logs" / f"{name}.log").read_text() for name in ["nocot", "explicit", "stepwise", "kd-couple"]}
    assert all("test accuracy" in log for log in logs.values())
    assert all(f"ICoT-KD {stage}: training in" in (out / "logs" / f"kd-{stage}.log").read_text() for stage in
               ("teacher", "student", "emulator"))
    capsys.readouterr()
    line = one_line_error(capsys, run_cli("demo", "--quick", "--out", out))  # never replaced silently
    assert "pass --overwrite" in line and (out / "results.json").exists()


def test_a_task_waits_for_the_models_it_starts_from_and_kd_splits_into_its_stages(tmp_path):
    import torch

    from icot.demo import DemoPlan, default_jobs, make_data, ready_tasks, remaining_cost, run_config, tasks

    plan = DemoPlan()
    graph = tasks(plan, {name: run_config(plan, name, make_data(plan, tmp_path), tmp_path) for name in plan.runs})
    assert {name: task.needs for name, task in graph.items()} == {
        "nocot": (), "explicit": (), "stepwise": ("explicit",), "kd-teacher": (),
        "kd-student": ("kd-teacher",), "kd-emulator": ("kd-teacher",), "kd-couple": ("kd-student", "kd-emulator")}
    assert default_jobs(graph) == (1 if torch.cuda.is_available() else min(len(os.sched_getaffinity(0)), 7))  # a core each
    # steps x layers x width: kd's 6 x 64, micro's 2 x 128; a task's chain is itself and the costliest chain after it
    assert (graph["nocot"].cost, graph["stepwise"].cost, graph["kd-couple"].cost) == (1500 * 256, 8500 * 256, 2000 * 384)
    chains = remaining_cost(graph)
    assert chains["explicit"] == (1500 + 8500) * 256 and chains["kd-teacher"] == (1500 + 1500 + 2000) * 384
    assert chains["kd-emulator"] == (1000 + 2000) * 384 and chains["nocot"] == 1500 * 256
    # two processes: explicit -> stepwise, the longest chain, first and on its own; nocot, the shortest, last
    assert [t.name for t in ready_tasks(graph, set(), set(), chains)] == ["explicit", "kd-teacher", "nocot"]
    assert [t.name for t in ready_tasks(graph, {"explicit"}, {"kd-teacher"}, chains)] == ["stepwise", "nocot"]
    assert [t.name for t in ready_tasks(graph, {"explicit", "kd-teacher"}, {"stepwise"}, chains)] == \
        ["kd-student", "kd-emulator", "nocot"]
    assert [t.name for t in ready_tasks(graph, {"kd-teacher", "kd-student"}, {"explicit"}, chains)] == \
        ["kd-emulator", "nocot"]


def test_demo_jobs_must_be_positive_and_the_seed_a_seed(tmp_path, capsys):
    line = one_line_error(capsys, run_cli("demo", "--quick", "--out", tmp_path / "d", "--jobs", "0"))
    assert "--jobs 0: must be at least 1" in line and not (tmp_path / "d").exists()
    line = one_line_error(capsys, run_cli("demo", "--quick", "--out", tmp_path / "d", "--seed", "-1"))
    assert "--seed -1: expected a whole number from 0 to 2**32 - 1" in line and not (tmp_path / "d").exists()


def test_an_error_in_a_worker_process_reaches_the_user_as_itself(tmp_path):
    import pytest

    from icot.demo import DemoPlan, make_data, train_all
    from icot.errors import UserError

    runs = {"nocot": {"method": "nocot", "lr": 1e-3, "max_steps": 2, "eval_every": 2},
            "explicit": {"method": "explicit", "tokenizer": str(tmp_path / "no-tokenizer"), "max_steps": 2,
                         "eval_every": 2}}
    plan = DemoPlan(train=200, valid=20, test=20, configs=None, runs=runs)
    with pytest.raises(UserError, match="no-tokenizer: no such directory"):
        train_all(plan, make_data(plan, tmp_path), tmp_path, jobs=2)
    assert (tmp_path / "logs" / "explicit.log").exists()  # it was the worker's
    # a setting no config takes stops the demo before any run trains
    runs["explicit"] = {"method": "explicit", "lr": -1.0, "max_steps": 2, "eval_every": 2}
    out = tmp_path / "second"
    with pytest.raises(UserError, match="lr must be positive"):
        train_all(plan, make_data(plan, out), out, jobs=2)
    assert not (out / "logs").exists()


# The demo's runs, each setting as its YAML file declares it (a change to a file is a change to this too).
DECLARED = {
    "nocot": {"method": "nocot", "lr": 2e-3, "max_steps": 1500, "eval_every": 500, "weight_decay": 0.1},
    "explicit": {"method": "explicit", "lr": 2e-3, "max_steps": 1500, "eval_every": 250, "lr_drop_step": 1000},
    "stepwise": {"method": "stepwise", "lr": 1e-3, "max_steps": 8500, "eval_every": 250, "from": "explicit",
                 "keep_position": True, "gap_placement": "in_place", "removal_pace": "adaptive",
                 "pace_max_steps": 600, "reset_optimizer": False, "lr_drop_step": 8000, "weight_decay": 0.3,
                 "running_sum_weight": 1.0},
    "kd": {"method": "kd", "model": "nano-deep", "lr": 1e-3, "eval_every": 250, "weight_decay": 0.1,
           "teacher": {"max_steps": 1500, "lr": 2e-3}, "student": {"max_steps": 1500, "init_from_teacher": True},
           "emulator": {"max_steps": 1000, "mixture": "token", "init_from_teacher": True},
           "couple": {"max_steps": 2000, "lr": 3e-4, "lr_drop_step": 1500}},
}


def test_the_shipped_demo_files_build_as_their_methods_configs_with_the_settings_declared_here(tmp_path):
    from icot import config as cfg
    from icot.demo import CONFIGS, DemoPlan, make_data, plain, run_config

    assert CONFIGS.parent.name == "icot"  # inside the package: `icot demo` runs from an installed wheel
    plan = DemoPlan()
    assert plain(plan.runs) == DECLARED and list(plan.runs) == list(DECLARED)
    data = make_data(plan, tmp_path)
    configs = {}
    for name in plan.runs:
        trainer_cls, configs[name] = run_config(plan, name, data, tmp_path)
        settings = {key: value for key, value in DECLARED[name].items() if key != "from"}
        declared = cfg.build(trainer_cls.config_class, {**cfg.to_dict(configs[name]), **settings})
        assert cfg.to_dict(configs[name]) == cfg.to_dict(declared)
    stepwise, kd = configs["stepwise"], configs["kd"]
    assert type(stepwise).__name__ == "StepwiseConfig" and stepwise.model == str(tmp_path / "explicit" / "best")
    assert (stepwise.lr, stepwise.max_steps, stepwise.running_sum_weight, stepwise.weight_decay) == (1e-3, 8500, 1.0, 0.3)
    assert stepwise.gap_placement == "in_place" and stepwise.keep_position and not stepwise.reset_optimizer
    assert type(kd).__name__ == "KDConfig" and kd.model == "nano-deep" and configs["nocot"].model == "micro"
    assert (kd.couple.max_steps, kd.couple.lr, kd.couple.lr_drop_step) == (2000, 3e-4, 1500)
    assert kd.student.init_from_teacher and kd.emulator.mixture == "token"
    assert all(c.epochs == 10_000 and c.batch_size == 64 for c in configs.values())
    # the install check keeps the files' settings, with far fewer steps
    quick = DemoPlan().quick()
    assert plain(quick.runs["stepwise"])["running_sum_weight"] == 1.0 and quick.runs["kd"]["couple"]["max_steps"] == 20


def test_a_broken_demo_file_is_a_one_line_error_naming_it(tmp_path):
    import shutil

    import pytest

    from icot.demo import CONFIGS, DemoPlan, load_runs, make_data, run_config
    from icot.errors import UserError

    for file in CONFIGS.glob("*.yaml"):
        shutil.copy(file, tmp_path / file.name)
    stepwise = tmp_path / "stepwise.yaml"
    text = stepwise.read_text()
    stepwise.write_text(text.replace("lr: 1.0e-3", "lr: [1.0e-3"))
    with pytest.raises(UserError, match=r"stepwise\.yaml:\d+: invalid YAML") as error:
        load_runs(tmp_path)
    assert str(stepwise) in str(error.value) and "\n" not in str(error.value)
    for setting, broken, message in [("lr: 1.0e-3", "lr: fast", "lr: expected a number, got 'fast'"),
                                     ("lr: 1.0e-3", "lrr: 1.0e-3", "unknown key 'lrr'"),
                                     ("from: explicit", "from: kd", "from: 'kd' is not a run trained before this one")]:
        stepwise.write_text(text.replace(setting, broken))
        plan = DemoPlan(runs=load_runs(tmp_path), configs=tmp_path)
        with pytest.raises(UserError) as error:
            run_config(plan, "stepwise", make_data(plan, tmp_path / "out"), tmp_path / "out")
        assert str(error.value).startswith(f"{stepwise}: {message}") and "\n" not in str(error.value)
