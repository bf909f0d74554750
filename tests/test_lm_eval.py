"""lm-evaluation-harness's `icot` model type and icot's task YAMLs score as `icot eval` does."""

import json
import logging

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional extra lmeval: "
                                                "pip install -e '.[lmeval]'")

from conftest import REFERENCE, ROOT, mult_examples, run_cli  # noqa: E402
from icot import load  # noqa: E402
from icot.data.format import format_line, read_examples  # noqa: E402
from icot.errors import UserError  # noqa: E402
from icot.lm_eval import TASKS_DIR, IcotLM, answer_of  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

MODEL_3X3 = ROOT / "models" / "mult3x3-micro-stepwise"
MODEL_4X4 = ROOT / "models" / "mult4x4-tiny-stepwise"


def task_yaml(folder, name: str, data_file) -> None:
    """A task of one's own: icot's shared settings, another data file."""
    (folder / f"{name}.yaml").write_text(f"include: {TASKS_DIR / '_icot_template_yaml'}\ntask: {name}\n"
                                         f"dataset_kwargs:\n  data_file: {data_file}\n")


def evaluate_task(tmp_path, model, task: str, limit=None) -> dict:
    manager = TaskManager(include_path=[str(TASKS_DIR), str(tmp_path)], include_defaults=False)
    return lm_eval.simple_evaluate(model="icot", model_args=f"pretrained={model}", tasks=[task], limit=limit,
                                   batch_size=64, device="cpu", task_manager=manager, log_samples=True)


def test_lm_eval_scores_each_example_as_icot_eval(tmp_path):
    # 40 3x3 questions the 3x3 model answers, 10 3x2 ones it answers wrongly: an accuracy neither 0 nor 1
    lines = [format_line(e) for e in mult_examples(3, 3, 40, seed=2028) + mult_examples(3, 2, 10, seed=2028)]
    data = tmp_path / "mixed.txt"
    data.write_text("\n".join(lines) + "\n")
    task_yaml(tmp_path, "mixed_3x3_3x2", data)

    result = evaluate_task(tmp_path, MODEL_3X3, "mixed_3x3_3x2")
    samples = sorted(result["samples"]["mixed_3x3_3x2"], key=lambda s: s["doc_id"])
    expected = load(MODEL_3X3).evaluate(data)

    assert [s["exact_match"] == 1.0 for s in samples] == [p["correct"] for p in expected["predictions"]]
    assert [answer_of(s["filtered_resps"][0]) for s in samples] == [p["answer"] for p in expected["predictions"]]
    assert result["results"]["mixed_3x3_3x2"]["exact_match,none"] == expected["accuracy"]
    assert 0 < expected["accuracy"] < 1
    assert samples[0]["arguments"][0][0] == lines[0].split("||")[0] + "||"  # the prompt: the line's input, then ||


def test_icot_lm_eval_command_runs_a_shipped_task(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the shipped tasks name the papers' files relative to the checkout
    out = tmp_path / "results"
    assert run_cli("lm-eval", "--model", "icot", "--model_args", f"pretrained={MODEL_4X4}", "--tasks", "icot_mult_4x4",
                   "--limit", "20", "--batch_size", "16", "--output_path", out) == 0
    [results] = out.rglob("results_*.json")
    accuracy = json.loads(results.read_text())["results"]["icot_mult_4x4"]["exact_match,none"]
    assert accuracy == load(MODEL_4X4).evaluate(REFERENCE / "mult" / "4x4_test.txt", max_examples=20)["accuracy"]
    assert "icot_mult_4x4" in capsys.readouterr().out


def test_a_task_naming_a_missing_file_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/reference here
    assert run_cli("lm-eval", "--model", "icot", "--model_args", f"pretrained={MODEL_3X3}", "--tasks", "icot_mult_4x4",
                   "--output_path", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "icot_mult_4x4" in err and "data/reference/mult/4x4_test.txt: no such file" in err
    assert not (tmp_path / "out").exists()


def test_a_task_file_of_ones_own_naming_a_missing_file_is_one_error(tmp_path):
    task_yaml(tmp_path, "mine", tmp_path / "absent.txt")
    with pytest.raises(UserError, match=r"absent\.txt: no such file"):
        evaluate_task(tmp_path, MODEL_3X3, "mine")


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_the_shipped_tasks_read_their_files(monkeypatch):
    monkeypatch.chdir(ROOT)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert set(manager.all_subtasks) == {"icot_gsm8k", *(f"icot_mult_{n}x{n}" for n in (4, 5, 7, 9, 11))}
    records, task_logger = Records(), logging.getLogger("lm_eval.api.task")
    task_logger.addHandler(records)
    try:
        gsm8k = manager.load("icot_gsm8k")["tasks"]["icot_gsm8k"]
    finally:
        task_logger.removeHandler(records)
    assert records.messages == []  # lm-eval's advice on custom_dataset arguments, which misleads here, is filtered
    docs = list(gsm8k.test_docs())
    first = read_examples(REFERENCE / "gsm8k" / "test.txt")[0]
    assert len(docs) == 1319 and gsm8k.doc_to_text(docs[0]) == first.question + "||" and docs[0]["answer"] == first.answer


@pytest.fixture(scope="module")
def model_3x3():
    return IcotLM(pretrained=str(MODEL_3X3), device="cpu")


def request(context: str, **kwargs) -> Instance:
    return Instance(request_type="generate_until", doc={}, arguments=(context, kwargs), idx=0)


def test_generate_until_writes_the_rest_of_the_line_and_respects_until(model_3x3):
    assert model_3x3.generate_until([request("7 0 9 * 5 5 5||", until=["\n"])]) == [" #### 5 8 3 3 0 5"]
    assert model_3x3.generate_until([request("7 0 9 * 5 5 5||", until=["3 3"])]) == [" #### 5 8 "]


@pytest.mark.parametrize("call, message", [
    (lambda lm: lm.loglikelihood([]), "generation-only"),
    (lambda lm: lm.loglikelihood_rolling([]), "generation-only"),
    (lambda lm: lm.generate_until([request("1 2 3 * 4 5 6|| #### 0 0 0\n\n7 0 9 * 5 5 5||")]), "--num_fewshot 0"),
    (lambda lm: lm.generate_until([request("7 0 9 * 5 5 5||", do_sample=True)]), "decodes greedily"),
    (lambda lm: lm.generate_until([request("7 0 9 * 5 5 5||", top_p=0.9)]), "top_p: not supported"),
])
def test_what_icot_cannot_answer_is_refused_in_one_line(model_3x3, call, message):
    with pytest.raises(UserError, match=message):
        call(model_3x3)


def test_icot_lm_eval_refuses_another_include_path(capsys):
    assert run_cli("lm-eval", "--model", "icot", "--tasks", "icot_mult_4x4", "--include_path", "elsewhere") == 2
    assert "give your task YAML files in --tasks by path" in capsys.readouterr().err
