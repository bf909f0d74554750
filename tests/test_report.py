"""`icot report`: overlaid training curves and a table comparing runs, from run directories."""

import json

import yaml

from conftest import run_cli
from icot.report import comparison_table, plot_run, summarize_run
from test_cli_errors import one_line_error


def make_run(path, config: dict, records: list[dict]):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def training(step, loss, examples, seconds, **extra):
    return {"step": step, "loss": loss, "token_accuracy": 0.5, "tokens_per_s": 1000.0, "examples_per_s": 100.0,
            "examples": examples, "train_seconds": seconds, **extra}


def validation(step, accuracy, per_s, tokens, **extra):
    return {"event": "validation", "step": step, "val_accuracy": accuracy, "val_examples_per_s": per_s,
            "val_mean_generated_tokens": tokens, **extra}


def explicit_run(root):
    """Finished and tested."""
    return make_run(root / "explicit", {"method": "explicit", "model": "micro"}, [
        {"event": "start", "steps_per_epoch": 100},
        training(10, 2.0, 640, 5.0), training(20, 0.5, 1280, 10.0),
        validation(20, 0.9, 300.0, 33.0),
        {"event": "end", "step": 20, "train_seconds": 10.4, "best_step": 20, "best_val_accuracy": 0.9,
         "test_accuracy": 0.953, "test_examples_per_s": 412.34, "test_mean_generated_tokens": 33.0},
    ])


def stepwise_run(root):
    """Still training: CoT tokens being removed, the last ones all at once ('inf')."""
    return make_run(root / "stepwise", {"method": "stepwise", "model": "runs/explicit/best"}, [
        {"event": "start", "steps_per_epoch": 100, "removed": 0.0},
        training(10, 1.0, 640, 6.0, removed=0.0), training(20, 1.5, 1280, 12.0, removed=4.0),
        validation(20, 0.5, 900.0, 12.0, removed=4.0),
        training(30, 1.2, 1920, 18.5, removed="inf"),
        validation(30, 0.25, 1500.5, 8.0, removed="inf"),
    ])


def test_summary_takes_test_then_selected_then_latest_validation(tmp_path):
    tested = summarize_run(explicit_run(tmp_path))
    assert (tested["accuracy"], tested["measured on"], tested["eval examples/s"]) == (0.953, "test", 412.34)
    assert (tested["training examples"], tested["training time (s)"], tested["model"]) == (1280, 10.4, "micro")
    running = summarize_run(stepwise_run(tmp_path))
    assert (running["accuracy"], running["measured on"], running["mean generated tokens"]) == (0.25, "latest validation", 8.0)
    assert (running["training examples"], running["training time (s)"]) == (1920, 18.5)
    untested = make_run(tmp_path / "untested", {"method": "nocot", "model": "micro"}, [
        training(10, 1.0, 640, 6.0), validation(10, 0.4, 50.0, 9.0), validation(20, 0.3, 60.0, 9.0),
        {"event": "end", "step": 20, "train_seconds": 7.0, "best_step": 10, "best_val_accuracy": 0.4},
    ])
    selected = summarize_run(untested)
    assert (selected["accuracy"], selected["measured on"], selected["eval examples/s"]) == (0.4, "best validation", 50.0)


def test_report_writes_overlaid_plots_and_the_table(tmp_path, capsys):
    runs = [explicit_run(tmp_path), stepwise_run(tmp_path)]
    out = tmp_path / "report"
    assert run_cli("report", *runs, "--out", out) == 0
    printed = capsys.readouterr().out
    table = (out / "runs.md").read_text()
    assert table in printed
    rows = table.splitlines()
    assert rows[0].startswith("| run | method | model | accuracy | measured on | eval examples/s |")
    assert rows[2] == "| explicit | explicit | micro | 0.953 | test | 412.3 | 33.0 | 1280 | 10 |"
    assert rows[3] == "| stepwise | stepwise | runs/explicit/best | 0.250 | latest validation | 1500.5 | 8.0 | 1920 | 18 |"
    assert (out / "training.png").stat().st_size > 10_000
    assert not (runs[0] / "plots").exists()  # --out leaves the run directories alone


def test_report_without_out_still_draws_each_runs_own_plot(tmp_path, capsys):
    run = stepwise_run(tmp_path)
    assert run_cli("report", run) == 0
    assert (run / "plots" / "training.png").exists() and "| stepwise |" in capsys.readouterr().out
    assert plot_run(run) == run / "plots" / "training.png"


def test_table_marks_missing_values(tmp_path):
    empty = make_run(tmp_path / "fresh", {"method": "explicit"}, [{"event": "start"}])
    row = comparison_table([summarize_run(empty)]).splitlines()[2]
    assert row == "| fresh | explicit | - | - | - | - | - | - | - |"


def test_report_bad_input_is_one_line(tmp_path, capsys):
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    assert "not a run directory" in one_line_error(capsys, run_cli("report", not_a_run))
    run = explicit_run(tmp_path)
    out = tmp_path / "report"
    out.mkdir()
    (out / "runs.md").write_text("mine")
    line = one_line_error(capsys, run_cli("report", run, "--out", out))
    assert "runs.md exists; pass --overwrite" in line and (out / "runs.md").read_text() == "mine"
    assert run_cli("report", run, "--out", out, "--overwrite") == 0
    assert "| explicit |" in (out / "runs.md").read_text()
    (run / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')  # a damaged line is skipped, and said so
    assert run_cli("report", run) == 0
    assert f"{run / 'metrics.jsonl'}: skipped 1 unreadable line(s) (2)" in capsys.readouterr().err


def test_removal_is_clipped_at_the_longest_cot():
    """A fixed schedule keeps counting past an 8-token CoT (and ends at 'inf'): the plot stops at 8."""
    from icot.report import _removal_points

    records = [{"event": "start", "longest_cot": 8}] + [{"step": s, "loss": 1.0, "removed": r}
                                                        for s, r in [(10, 3), (20, 50), (30, "inf")]]
    assert _removal_points(records) == [(10, 3), (20, 8), (30, 8)]
    assert _removal_points(records[1:])[-1] == (30, float("inf"))  # a run logged without longest_cot
