"""Hostile model directories and questions (issue 44, classes 8-11): a model directory missing a
piece or holding a foreign one, a tampered icot.json, predict's verdict against eval's score, and
questions the model's vocabulary cannot read. Each is one error line naming the file and what is
expected (or a warning where the answer may still be right), never a silent wrong result."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, mult_examples, run_cli
from icot.answers import AnswerMatcher
from icot.data.format import Example, format_line, write_examples
from icot.data.mult import mult_example
from icot.evaluate import Predictor
from icot.predict import Prediction

SHIPPED = ROOT / "models" / "mult3x3-micro-stepwise"
TINY_4X4 = ROOT / "models" / "mult4x4-tiny-stepwise"  # twice micro's width


def one_line_error(capsys, code) -> str:
    """Exit code 2 and one error line of its own (progress bars may come before it), no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("icot: error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err and "probably a bug" not in err, err
    return errors[0]


def warnings_of(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("icot: warning: ")]


@pytest.fixture
def model(tmp_path) -> Path:
    """A copy of the shipped 3x3 stepwise model (keep_position, gap 24), to tamper with."""
    shutil.copytree(SHIPPED, tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def questions(tmp_path) -> Path:
    """Four 3x3 questions in the data-file format."""
    write_examples(tmp_path / "test.txt", mult_examples(3, 3, 4, seed=44))
    return tmp_path / "test.txt"


def command(kind: str, model: Path, questions: Path) -> list:
    if kind == "eval":
        return ["eval", "--model", model, "--data", questions]
    return ["predict", "--model", model, "123*456"]


# ----- 8: a model directory missing a piece, or holding a foreign one --------------------------------

def _config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **changes}))


def _llama_config(model: Path) -> None:
    from icot.models import build_preset

    build_preset("tiny-llama", vocab_size=23, eos_id=0).config.save_pretrained(model)


def _bigger_tokenizer(model: Path) -> None:
    from icot.data.tokenizers import word_tokenizer

    word_tokenizer(["apples pears plums"] + [f"w{i}" for i in range(20)]).save_pretrained(model)


def _unlink(*names):
    return lambda model: [(model / name).unlink() for name in names]


INCOMPLETE = {
    "no tokenizer files": (_unlink("tokenizer.json", "tokenizer_config.json"), "no tokenizer files"),
    "no tokenizer.json": (_unlink("tokenizer.json"), "no tokenizer files"),
    "a Llama config beside GPT-2 weights": (_llama_config, "do not match the LlamaForCausalLM"),
    "a wider config": (lambda m: _config(m, n_embd=256), "28 of another shape (e.g. transformer.h.0."),
    "a deeper config": (lambda m: _config(m, n_layer=3), "missing (e.g. transformer.h.2."),
    "a shallower config": (lambda m: _config(m, n_layer=1), "unexpected (e.g. transformer.h.1."),
    "a larger vocabulary in config": (lambda m: _config(m, vocab_size=40), "1 of another shape (e.g. transformer.wte"),
    "another model's weights": (lambda m: shutil.copy(TINY_4X4 / "model.safetensors", m), "of another shape"),
    "a larger tokenizer": (_bigger_tokenizer, "tokens but the model only 23"),
}


@pytest.mark.parametrize("kind", ["eval", "predict"])
@pytest.mark.parametrize("case", INCOMPLETE)
def test_incomplete_or_foreign_model_directories(model, questions, capsys, case, kind):
    tamper, fragment = INCOMPLETE[case]
    tamper(model)
    line = one_line_error(capsys, run_cli(*command(kind, model, questions)))
    assert f"model {model}" in line and fragment in line and "expected" in line, line


@pytest.mark.parametrize("kind", ["eval", "predict"])
def test_a_model_without_icot_json_is_decoded_with_a_warning(model, questions, capsys, kind):
    (model / "icot.json").unlink()
    assert run_cli(*command(kind, model, questions)) == 0
    (line,) = warnings_of(capsys)
    assert f"model {model}: no icot.json" in line and "plain causal LM" in line


# ----- 9: a tampered icot.json ----------------------------------------------------------------------

REMOVED = object()  # the field is taken out

BAD_FIELDS = {
    "negative position_gap": ({"position_gap": -5}, "'position_gap' is -5; expected a whole number of at least 0"),
    "position_gap as a string": ({"position_gap": "24"}, "'position_gap' is \"24\""),
    "fractional position_gap": ({"position_gap": 2.5}, "'position_gap' is 2.5"),
    "position_gap_from null": ({"position_gap_from": None}, "'position_gap_from' is null"),
    "keep_position as a string": ({"keep_position": "true"}, "'keep_position' is \"true\"; expected true or false"),
    "keep_position as a number": ({"keep_position": 1}, "'keep_position' is 1"),
    "unknown method": ({"method": "stepwize"}, "'method' is \"stepwize\"; expected one of \"explicit\""),
    "unknown answer_match": ({"answer_match": "fuzzy"}, "'answer_match' is \"fuzzy\"; expected one of \"normalized\""),
    "cot_removed a word": ({"cot_removed": "most"}, "'cot_removed' is \"most\"; expected \"all\" or"),
    "cot_removed negative": ({"cot_removed": -1}, "'cot_removed' is -1"),
    "unknown removal_side": ({"removal_side": "middle"}, "'removal_side' is \"middle\"; expected one of \"left\""),
    "unknown gap_placement": ({"gap_placement": "anywhere"}, "'gap_placement'"),
    "step as a string": ({"step": "21500"}, "'step' is \"21500\""),
    "unknown task": ({"task": "division"}, "'task' is \"division\""),
    "no method": ({"method": REMOVED}, "'method' is missing"),
    "Coconut without its tokens": ({"method": "coconut"}, "'thought_tokens' is missing; an icot coconut model's"),
    "Coconut with a bad stage": ({"method": "coconut", "thought_tokens": {"begin": 20, "end": 21, "latent": 22},
                                  "coconut_stage": "2", "c_thought": 1, "max_latent_stage": 3, "steps": "mult"},
                                 "'coconut_stage' is \"2\""),
    "CODI without its projection": ({"method": "codi", "thoughts": 6,
                                     "thought_tokens": {"begin": 20, "end": 21, "latent": 22}},
                                    "'projection' is missing"),
    "CODI with no thoughts": ({"method": "codi", "thoughts": 0, "projection": None,
                               "thought_tokens": {"begin": 20, "end": 21, "latent": 22}},
                              "'thoughts' is 0; expected a whole number of at least 1"),
    "thought tokens of text": ({"thought_tokens": {"begin": "<bot>"}}, "'thought_tokens' is {\"begin\": \"<bot>\"}"),
    "ICoT-KD without a stage": ({"method": "kd"}, "'kd_stage' is missing"),
    "ICoT-KD of an unknown stage": ({"method": "kd", "kd_stage": "teacher"}, "'kd_stage' is \"teacher\""),
    "ICoT-KD student without teacher": ({"method": "kd", "kd_stage": "student", "delta": "dynamic",
                                         "subset": "diagonal"}, "'teacher' is missing"),
    "ICoT-KD bad delta": ({"delta": "-1"}, "'delta' is \"-1\"; expected \"dynamic\" or"),
    "ICoT-KD emulator with zero temperature": ({"method": "kd", "kd_stage": "emulator", "mixture_size": 1,
                                                "softmax_temperature": 0}, "'softmax_temperature' is 0"),
    "keep_position without position_gap": ({"position_gap": REMOVED}, "'position_gap' is missing"),
}


@pytest.mark.parametrize("case", BAD_FIELDS)
def test_tampered_metadata_fields(model, questions, capsys, case):
    changes, fragment = BAD_FIELDS[case]
    meta = {**json.loads((model / "icot.json").read_text()), **changes}
    (model / "icot.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not REMOVED}))
    line = one_line_error(capsys, run_cli(*command("eval", model, questions)))
    assert f"{model / 'icot.json'}: field {fragment}" in line, line


BAD_FILES = {
    "not JSON": (b'{"method": "stepwise",', "invalid JSON"),
    "a list": (b"[1, 2]", "expected a JSON object of icot's metadata, got [1, 2]"),
    "a string": (b'"stepwise"', "got \"stepwise\""),
    "not UTF-8": (b'{"method": "step\xffwise"}', "not valid UTF-8 text"),
    "empty": (b"", "invalid JSON"),
    "nested 100000 deep": (b"[" * 100_000 + b"]" * 100_000, "nested too deep"),
}


@pytest.mark.parametrize("kind", ["eval", "predict"])
@pytest.mark.parametrize("case", BAD_FILES)
def test_tampered_metadata_files(model, questions, capsys, case, kind):
    content, fragment = BAD_FILES[case]
    (model / "icot.json").write_bytes(content)
    line = one_line_error(capsys, run_cli(*command(kind, model, questions)))
    assert f"{model / 'icot.json'}: " in line and fragment in line, line


def test_a_directory_named_icot_json(model, questions, capsys):
    (model / "icot.json").unlink()
    (model / "icot.json").mkdir()
    line = one_line_error(capsys, run_cli(*command("eval", model, questions)))
    assert f"{model / 'icot.json'}: not a file" in line


@pytest.mark.parametrize("kind", ["eval", "predict"])
def test_a_tokenizer_json_without_its_config(model, questions, capsys, kind):
    """Without tokenizer_config.json, transformers takes EOS for the unknown token: answers change silently."""
    (model / "tokenizer_config.json").unlink()
    line = one_line_error(capsys, run_cli(*command(kind, model, questions)))
    assert f"tokenizer {model}: tokenizer.json without its tokenizer_config.json" in line, line


@pytest.mark.parametrize("kind", ["eval", "predict"])
@pytest.mark.parametrize("changes", [{"position_gap": 100_000}, {"position_gap_from": 5000},
                                     {"position_gap": 600, "position_gap_from": 600}], ids=str)
def test_a_position_gap_past_the_models_positions(model, questions, capsys, kind, changes):
    (model / "icot.json").write_text(json.dumps({**json.loads((model / "icot.json").read_text()), **changes}))
    line = one_line_error(capsys, run_cli(*command(kind, model, questions)))
    assert f"{model / 'icot.json'}: position_gap" in line and "of the model's 1024 positions" in line, line


@pytest.mark.parametrize("meta, thoughts, field", [
    ({"method": "codi"}, 10**7, "thoughts 10000000"),
    ({"method": "coconut"}, 10**12, "min(coconut_stage, max_latent_stage) * c_thought thoughts 1000000000000"),
    ({"method": "codi"}, 1024, "thoughts 1024"),
])
def test_thoughts_past_the_models_positions(meta, thoughts, field):
    from types import SimpleNamespace

    from icot.errors import UserError
    from icot.methods import check_reserved_positions

    predictor = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(n_positions=1024)), n_thoughts=thoughts)
    with pytest.raises(UserError, match="take .* of the model's 1024 positions") as error:
        check_reserved_positions("m", meta, predictor)
    assert str(error.value).startswith(f"{Path('m') / 'icot.json'}: {field} take"), error.value
    check_reserved_positions("m", meta, SimpleNamespace(model=predictor.model, n_thoughts=1000))


# ----- 10: predict's verdict is eval's score ---------------------------------------------------------

WRITTEN = {  # (a, b, the answer as the model writes it: least significant digit first)
    "a leading zero": (999, 999, "1 0 0 8 9 9 0"),
    "right": (999, 999, "1 0 0 8 9 9"),
    "the padding zero left out": (100, 100, "0 0 0 0 1"),
    "padded as the data": (100, 100, "0 0 0 0 1 0"),
    "300 zeros for 0*0": (0, 0, " ".join("0" * 300)),
    "one zero for 0*0": (0, 0, "0"),
    "0*0 as the data": (0, 0, "0 0"),
    "a wrong digit": (907, 555, "5 8 3 3 0 6"),
    "a stray word": (907, 555, "5 8 3 3 0 5 apples"),
    "nothing": (907, 555, ""),
}


@pytest.mark.parametrize("mode", ["normalized", "exact"])
@pytest.mark.parametrize("case", WRITTEN)
def test_the_verdict_is_the_matchers(case, mode):
    a, b, answer = WRITTEN[case]
    matcher = AnswerMatcher(mode)
    line = Prediction(f"{a}*{b}", mult_example(a, b).question, (a, b), "", answer, matcher).line()
    assert ("(correct" in line) == matcher.same(answer, mult_example(a, b).answer), line
    if "(correct" not in line:
        assert f"wrong: {a}*{b} = {a * b}" in line


@pytest.mark.parametrize("case", [c for c in WRITTEN if WRITTEN[c][0] >= 100])
def test_predict_and_eval_agree(case, tmp_path, capsys, monkeypatch):
    """The CLI's two commands on the same answer, written by a model that always writes it."""
    a, b, answer = WRITTEN[case]
    monkeypatch.setattr(Predictor, "decode", lambda self, tokens: ("", answer))
    write_examples(tmp_path / "one.txt", [mult_example(a, b)])
    assert run_cli("eval", "--model", SHIPPED, "--data", tmp_path / "one.txt", "--json", tmp_path / "out.json") == 0
    scored = json.loads((tmp_path / "out.json").read_text())["predictions"][0]["correct"]
    capsys.readouterr()
    assert run_cli("predict", "--model", SHIPPED, f"{a}*{b}") == 0
    assert ("(correct" in capsys.readouterr().out) == scored


def test_the_verdict_shows_the_zeros_that_make_it_wrong():
    line = Prediction("999*999", mult_example(999, 999).question, (999, 999), "", "1 0 0 8 9 9 0").line()
    assert line == "999*999 = 0998001  (wrong: 999*999 = 998001, written with 6 digits in the data: 998001)"


def test_an_answer_cut_at_the_token_budget_is_wrong():
    line = Prediction("0*0", "0 * 0", (0, 0), "", "0 0", finished=False).line()
    assert "(wrong: 0*0 = 0; its answer did not end within the token budget" in line, line


PADDED = "1 0 0 * 1 0 0||1 0 0 0 + 0 0 0 0 0 ( 1 0 0 0 0 ) + 0 0 0 0 0 0 #### 1 0 0 0 0 0"
WRONG_REFERENCE = "7 0 9 * 5 5 5||5 3 5 4 #### 9 9 9 9 9 9"
AS_WRITTEN = {  # (the data line eval scores, what predict is given, a warning predict gives)
    "zero-padded operands": (PADDED, "1 0 0 * 1 0 0", None),
    "a whole zero-padded line": (PADDED, PADDED, None),
    "a whole line with a wrong reference": (WRONG_REFERENCE, WRONG_REFERENCE, "is not 907*555 = 503385"),
    "0*0 (its zeros run past eval's budget)": (format_line(mult_example(0, 0)), "0*0", "is 1x1 multiplication"),
    "1*1": (format_line(mult_example(1, 1)), "1*1", "is 1x1 multiplication"),
}


@pytest.mark.parametrize("case", AS_WRITTEN)
def test_predict_and_eval_agree_on_questions_as_written(case, tmp_path, capsys):
    line, text, warning = AS_WRITTEN[case]
    (tmp_path / "one.txt").write_text(line + "\n")
    assert run_cli("eval", "--model", SHIPPED, "--data", tmp_path / "one.txt", "--json", tmp_path / "out.json") == 0
    scored = json.loads((tmp_path / "out.json").read_text())["predictions"][0]["correct"]
    capsys.readouterr()
    assert run_cli("predict", "--model", SHIPPED, text) == 0
    captured = capsys.readouterr()
    assert ("(correct" in captured.out) == scored, captured.out
    assert warning is None or warning in captured.err, captured.err


# ----- 11: questions the vocabulary cannot read -------------------------------------------------------

ARABIC, FULLWIDTH = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"), str.maketrans("0123456789", "０１２３４５６７８９")


def _questions(path: Path, foreign: dict[int, str]) -> Path:
    """Four 3x3 examples, line i's question replaced by foreign[i]."""
    examples = mult_examples(3, 3, 4, seed=44)
    write_examples(path, [Example(foreign.get(i, e.question), e.cot, e.answer) for i, e in enumerate(examples, 1)])
    return path


UNREADABLE_LINES = {
    "Arabic-Indic digits on line 2": ({2: "٣ ٢ ١ * ٤ ٥ ٦"}, 2, "'٣'", "ASCII 0-9"),
    "fullwidth digits on line 4": ({4: "1 2 3 * ４ 5 6"}, 4, "'４'", "ASCII 0-9"),
    "a word on line 1": ({1: "1 2 3 * 4 5 6 apples"}, 1, "'apples'", "1 of 4 questions"),
    "two lines": ({3: "1 2 3 * 4 5 6 x", 4: "1 2 3 * 4 5 ６"}, 3, "'x'", "2 of 4 questions"),
}


@pytest.mark.parametrize("case", UNREADABLE_LINES)
def test_eval_warns_about_unreadable_questions(case, tmp_path, capsys):
    foreign, lineno, word, more = UNREADABLE_LINES[case]
    data = _questions(tmp_path / "test.txt", foreign)
    assert run_cli("eval", "--model", SHIPPED, "--data", data) == 0
    (line,) = [w for w in warnings_of(capsys) if "vocabulary" in w]  # a first question of words: another task too
    assert f"{data}:{lineno}: the model's vocabulary has no {word}" in line and more in line, line


@pytest.mark.parametrize("digits", [ARABIC, FULLWIDTH], ids=["Arabic-Indic", "fullwidth"])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_eval_refuses_questions_none_of_which_it_can_read(digits, suffix, tmp_path, capsys):
    examples = mult_examples(3, 3, 4, seed=44)
    data = tmp_path / f"test{suffix}"
    write_examples(data, [Example(e.question.translate(digits), e.cot, e.answer) for e in examples])
    line = one_line_error(capsys, run_cli("eval", "--model", SHIPPED, "--data", data))
    assert f"{data}:1: the model's vocabulary has no" in line and "ASCII 0-9" in line and "no question" in line, line


@pytest.mark.parametrize("question", ["٣٧١*٣٣٤", "３７１*３３４", "371*３３４", "٣ ٢ ١ * ٤ ٥ ٦", "371 × 334 apples"])
def test_predict_refuses_questions_it_cannot_read(question, capsys):
    line = one_line_error(capsys, run_cli("predict", "--model", SHIPPED, question))
    assert "the model's vocabulary has no" in line, line
    assert ("ASCII 0-9" in line) == (not question.isascii() and "×" not in question), line


UNWRITABLE_ANSWERS = {  # {line: how its reference answer is rewritten}, the warning's line, its words
    "Arabic-Indic digits on line 3": ({3: lambda a: a.translate(ARABIC)}, 3, "ASCII 0-9; 1 of 4 answers"),
    "a word on line 1": ({1: lambda a: a + " apples"}, 1, "no 'apples'; 1 of 4 answers"),
}


def _answers(path: Path, rewrite: dict) -> Path:
    examples = mult_examples(3, 3, 4, seed=44)
    write_examples(path, [Example(e.question, e.cot, rewrite.get(i, str)(e.answer)) for i, e in enumerate(examples, 1)])
    return path


@pytest.mark.parametrize("case", UNWRITABLE_ANSWERS)
def test_eval_warns_about_reference_answers_it_cannot_write(case, tmp_path, capsys):
    rewrite, lineno, words = UNWRITABLE_ANSWERS[case]
    data = _answers(tmp_path / "test.txt", rewrite)
    assert run_cli("eval", "--model", SHIPPED, "--data", data) == 0
    (line,) = [w for w in warnings_of(capsys) if "vocabulary" in w]
    assert f"{data}:{lineno}: the model's vocabulary has no" in line and words in line, line


def test_eval_refuses_reference_answers_none_of_which_it_can_write(tmp_path, capsys):
    data = _answers(tmp_path / "test.txt", {i: lambda a: a.translate(FULLWIDTH) for i in range(1, 5)})
    line = one_line_error(capsys, run_cli("eval", "--model", SHIPPED, "--data", data))
    assert f"{data}:1: the model's vocabulary has no" in line and "no answer can be read whole" in line, line
