"""Tests aimed at the mutants that survived the mutation audit of the suite (M06 ... M29, issue 50):
each checks the mutated behaviour itself, against a hand-computed value or an independent path."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import mult_examples, thought_toy
from icot.cli import build_train_config
from icot.data.format import Example
from icot.data.layout import Layout, encode
from icot.data.tokenizers import word_tokenizer
from icot.models import build_preset, decoder_layers





# ----- M06: stepwise pretraining keeps the whole CoT, whatever the smoothing ------------------------

def test_pretraining_keeps_every_cot_token_with_finite_smoothing(mult3_data, tmp_path):
    """Kills M06 (smoothing offsets also drawn during pretraining, so pretraining rows lose CoT tokens)."""
    from icot.methods.stepwise import StepwiseTrainer

    class Recording(StepwiseTrainer):
        def training_batch(self, batch):
            before = batch["cot_len"].clone()
            pretraining = self.schedule.in_pretraining(self.progress.step)
            out = super().training_batch(batch)
            self.__dict__.setdefault("seen", []).append((pretraining, before, out["cot_len"].clone()))
            return out

    # 32 examples, batch 8: 4 steps an epoch; 2 epochs (8 steps, 64 rows) of pretraining, then 1 epoch of removal.
    # With lambda 1 an offset is 0 with probability 1 - 1/e: a drawn offset shortens ~37% of the rows.
    _, config = build_train_config(None, "stepwise", [
        "--data", str(mult3_data), "--model", "micro", "--out", str(tmp_path / "run"), "--batch-size", "8",
        "--epochs", "3", "--pretrain-epochs", "2", "--remove-per-epoch", "1", "--removal-smoothing-lambda", "1",
        "--eval-every", "1000", "--save-every", "1000", "--max-eval-examples", "4", "--log-every", "100"])
    trainer = Recording(config)
    trainer.fit()
    pretraining = [(before, after) for pre, before, after in trainer.seen if pre]
    assert len(pretraining) == 8 and all(before.tolist() == [24] * 8 for before, _ in pretraining)
    assert all(torch.equal(before, after) for before, after in pretraining)  # nothing removed: the whole CoT
    # after pretraining the count is 0 and only the offsets remove tokens: some rows do lose some
    removal = [(before, after) for pre, before, after in trainer.seen if not pre]
    assert len(removal) == 4 and any((after < before).any() for before, after in removal)


# ----- M11: right-side keep_position models decode at their training positions ---------------------

def test_a_trained_right_side_model_is_decoded_with_its_training_positions(mult3_data, tmp_path):
    """Kills M11 (the inference position gap for right-side removal starts one token early: a
    trainer's position_gap() is `typical - size - 1`, and no gap at all once the whole CoT is gone)."""
    from icot.methods.stepwise import StepwiseTrainer

    class Recording(StepwiseTrainer):
        def training_batch(self, batch):
            index = batch["index"].clone()
            out = super().training_batch(batch)
            self.__dict__.setdefault("rows", {})[self.current] = (index, out["position_ids"].clone(), out["length"].clone())
            return out

    # batch 32: one step an epoch and one token more each step; all 24 from the 4th step on: counts 0, 1, 2, inf
    _, config = build_train_config(None, "stepwise", [
        "--data", str(mult3_data), "--model", "micro", "--out", str(tmp_path / "run"), "--batch-size", "32",
        "--epochs", "4", "--remove-per-epoch", "1", "--remove-all-when-remove-beyond", "3", "--removal-side", "right",
        "--keep-position", "--removal-smoothing-lambda", "inf", "--eval-every", "1000", "--save-every", "1000",
        "--max-eval-examples", "2", "--log-every", "100"])
    trainer = Recording(config)
    trainer.fit()
    assert sorted(trainer.rows, key=float) == [0, 1, 2, math.inf]
    model, data = trainer.unwrapped_model, trainer.train_data
    for count in (1, 2, math.inf):
        trainer.current = count  # the count the predictor was trained with, as after a run that ended there
        predictor = trainer.predictor(model)
        predictor.layout = dataclasses.replace(predictor.layout, sep_id=len(trainer.tokenizer))  # never stops
        index, positions, lengths = trainer.rows[count]
        for row in (0, 17):
            i, length = int(index[row]), int(lengths[row])
            prompt = data.prompt(i)
            fed = []
            hook = model.register_forward_pre_hook(
                lambda module, args, kwargs: fed.extend(kwargs["position_ids"][0].tolist()), with_kwargs=True)
            try:
                predictor.generate([prompt], length - len(prompt))
            finally:
                hook.remove()
            assert fed == positions[row, : length - 1].tolist(), (count, row)
    # by hand, for a 3x3 row (prompt of 8 tokens, 24 CoT tokens): with 2 removed from the right, the
    # 22nd CoT token (the last kept, at 8 + 21 = 29) moves up to 31, and the SEP after it to 32;
    # with the whole CoT removed, the prompt's SEP moves up to the last CoT token's 31
    assert trainer.rows[2][1][0, 28:31].tolist() == [28, 31, 32]
    assert trainer.rows[math.inf][1][0, 6:9].tolist() == [6, 31, 32]


# ----- M15: evaluate() scores answers with the configured matcher -----------------------------------

def test_evaluate_normalises_answers_as_configured():
    """Kills M15 (evaluation compares raw strings, ignoring answer_match)."""
    from icot.answers import AnswerMatcher
    from icot.evaluate import Predictor, evaluate

    examples = [Example("q 1", "c", "1000"), Example("q 2", "c", "18")]
    written = ["1,000", "18.00"]  # the same numbers as the references, written otherwise
    tokenizer = word_tokenizer(["q 1 2 c #### 1000 18 1,000 18.00"])
    layout = Layout.for_tokenizer(tokenizer)
    data = encode(tokenizer, layout, examples)
    torch.manual_seed(0)
    model = build_preset("micro", len(tokenizer), tokenizer.eos_token_id).eval()

    class Scripted(Predictor):
        """Writes `c SEP #### <written answer> SEP` for each prompt."""

        def generate(self, prompts, max_new_tokens):
            answers = {tuple(data.prompt(i)): w for i, w in enumerate(written)}
            ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
            sep = self.layout.sep_id
            return [ids("c") + [sep] + ids(f"#### {answers[tuple(p)]}") + [sep] for p in prompts]

    predictor = Scripted(model, tokenizer)
    normalized = evaluate(predictor, data, progress=False, matcher=AnswerMatcher("normalized"))
    assert [p["answer"] for p in normalized.predictions] == written
    assert normalized.accuracy == 1.0 and all(p["correct"] for p in normalized.predictions)
    assert evaluate(predictor, data, progress=False).accuracy == 1.0  # normalized is the default
    exact = evaluate(predictor, data, progress=False, matcher=AnswerMatcher("exact"))
    assert exact.accuracy == 0.0 and not any(p["correct"] for p in exact.predictions)


# ----- M24: Coconut and CODI generation feed each thought the last layer's state -------------------

@pytest.mark.parametrize("method", ["coconut", "codi"])
def test_generation_feeds_each_thought_the_last_hidden_state_before_it(method):
    """Kills M24 (generation feeds each thought the second-to-last layer's state instead of the last
    one's, so a model is decoded with thoughts it was never trained on)."""
    from icot.methods.codi_model import CodiModel
    from icot.methods.thoughts import ThoughtLM, ThoughtPredictor

    tokenizer, marks, layout, data = thought_toy()
    torch.manual_seed(0)
    lm = build_preset("micro", len(tokenizer), tokenizer.eos_token_id)
    if method == "codi":
        model = CodiModel(lm, marks.latent, {"dim": 48, "dropout": 0.0, "layer_norm": True}).eval()
        thought_lm, project = model.thought_lm(), model.projection
    else:
        thought_lm, project = ThoughtLM(lm.eval(), marks.latent), None
    predictor = ThoughtPredictor(thought_lm, tokenizer, cot_removed=math.inf, marks=marks, thoughts=3)
    calls = []
    hook = lm.register_forward_hook(lambda m, args, kwargs, out: calls.append((kwargs.get("inputs_embeds"), out)),
                                    with_kwargs=True)
    try:
        generated = predictor.generate([data.prompt(i) for i in (0, 4, 1)], 6)
    finally:
        hook.remove()
    assert len(generated) == 3 and calls[0][0] is None and all(calls[j][0] is not None for j in (1, 2, 3))
    assert calls[4][0] is None  # <eot>, a token again
    with torch.no_grad():
        for j in (1, 2, 3):  # each thought: the previous pass's last-layer state at its last column (projected)
            state = calls[j - 1][1].hidden_states[-1][:, -1:]
            expected = project(state) if project is not None else state
            torch.testing.assert_close(calls[j][0], expected, rtol=0, atol=1e-6)
            second_to_last = calls[j - 1][1].hidden_states[-2][:, -1:]
            assert not torch.allclose(state, second_to_last, atol=1e-3)  # the two layers do differ here


# ----- M26: CODI's loss weights scale their own parts ----------------------------------------------

def test_codi_loss_weights_scale_their_own_parts(mult3_data, tmp_path):
    """Kills M26 (the teacher and student cross-entropy weights swapped)."""
    from icot.methods.codi import CodiTrainer

    w_t, w_s, w_d = 0.5, 2.0, 0.25
    _, config = build_train_config(None, "codi", [
        "--data", str(mult3_data), "--out", str(tmp_path / "run"), "--model", "micro", "--batch-size", "8",
        "--thoughts", "2", "--projection-dim", "64", "--log-every", "1", "--max-steps", "3", "--eval-every", "1000",
        "--max-eval-examples", "2", "--teacher-loss-weight", str(w_t), "--student-loss-weight", str(w_s),
        "--distill-loss-weight", str(w_d)])
    CodiTrainer(config).fit()
    steps = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(steps) == 3
    for r in steps:
        assert abs(r["teacher_ce"] - r["student_ce"]) > 0.05  # a swap of their weights would show
        assert r["loss"] == pytest.approx(w_t * r["teacher_ce"] + w_s * r["student_ce"] + w_d * r["distill"], rel=1e-4)


# ----- M27: ICoT-KD's student reads the teacher's states of the batch with its CoT ------------------

def test_the_mind_reading_student_reads_the_teachers_states_of_the_gold_cot(mult3_data, tmp_path, monkeypatch):
    """Kills M27 (stage (a) reads the teacher's states from the CoT-less batch)."""
    from icot.data.format import read_examples
    from icot.methods.kd.stages import StudentTrainer
    from icot.models import save_model
    from conftest import run_cli

    examples = read_examples(mult3_data / "train.txt")
    tokenizer = word_tokenizer([f"{e.question} {e.cot} #### {e.answer}" for e in examples])
    torch.manual_seed(0)
    teacher = tmp_path / "teacher"
    save_model(build_preset("micro", len(tokenizer), tokenizer.eos_token_id), tokenizer, teacher, {"method": "explicit"})
    seen = []
    original = StudentTrainer.teacher_states

    def recording(self, batch_with_cot):
        seen.append({k: batch_with_cot[k].clone() for k in ("cot_len", "first_sep", "input_ids")})
        return original(self, batch_with_cot)

    monkeypatch.setattr(StudentTrainer, "teacher_states", recording)
    assert run_cli("train", "--method", "kd", "--stage", "student", "--teacher-dir", teacher, "--data", mult3_data,
                   "--out", tmp_path / "run", "--model", "micro", "--batch-size", "16", "--max-steps", "2",
                   "--eval-every", "1000",
                   "--max-eval-examples", "2") == 0
    assert len(seen) == 2  # one batch of 16 a step
    for batch in seen:
        assert batch["cot_len"].tolist() == [24] * 16  # every 3x3 CoT, whole
        # and the rows hold it: after the first SEP come the CoT's digits, not `#### answer`
        rows = torch.arange(16)
        after_sep = tokenizer.convert_ids_to_tokens(batch["input_ids"][rows, batch["first_sep"] + 1].tolist())
        assert all(word.isdigit() for word in after_sep)


# ----- M28: the running-sum probe reads the output of its layer -------------------------------------

@pytest.mark.parametrize("arch", ["micro", "tiny-llama"])
def test_the_probe_reads_the_output_of_its_layer(arch):
    """Kills M28 (the probe reads the input of running_sum_layer instead of its output)."""
    from icot.methods.running_sum import ProbedLM

    examples = mult_examples(3, 3, 4, seed=1)
    tokenizer = word_tokenizer([f"{e.question} {e.cot} #### {e.answer}" for e in examples])
    data = encode(tokenizer, Layout.for_tokenizer(tokenizer), examples)
    ids = torch.tensor([data.row(i).tolist() for i in range(len(data))])  # 3x3: every row is as long
    torch.manual_seed(0)
    lm = build_preset(arch, len(tokenizer), tokenizer.eos_token_id).eval()
    for layer, watched in ((0, "layer 0"), (-1, "lm head")):
        model = ProbedLM(lm, layer).eval()
        probe_input, reference = [], []
        handles = [model.probe.register_forward_pre_hook(lambda m, args: probe_input.append(args[0]))]
        if watched == "layer 0":  # the output of decoder layer 0, as the layer returns it
            handles.append(decoder_layers(lm)[0].register_forward_hook(
                lambda m, args, out: reference.append(out[0] if isinstance(out, tuple) else out)))
        else:  # the last layer's output (after the final norm): what the LM head reads
            handles.append(lm.get_output_embeddings().register_forward_pre_hook(lambda m, args: reference.append(args[0])))
        with torch.no_grad():
            out, predicted = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        for handle in handles:
            handle.remove()
        assert len(probe_input) == len(reference) == 1, watched
        torch.testing.assert_close(probe_input[0], reference[0], rtol=0, atol=0)
        torch.testing.assert_close(predicted, model.probe(reference[0]).squeeze(-1))


# ----- M29: --overwrite refuses a user's directory that happens to hold a config.yaml ---------------

def test_overwrite_refuses_a_users_directory_with_a_config_yaml(tmp_path):
    """Kills M29 (--overwrite treats any directory holding a config.yaml as icot's own)."""
    from icot.errors import UserError
    from icot.paths import check_fresh_dir

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: settings\n")
    (mine / "notes.txt").write_text("my notes\n")
    with pytest.raises(UserError, match="replaces only a directory icot wrote"):
        check_fresh_dir(mine, "--out", overwrite=True)
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml", "notes.txt"]
    for record in ("metrics.jsonl", "checkpoints"):  # with a run record beside it, it is a run of icot's
        run = tmp_path / record
        run.mkdir()
        (run / "config.yaml").write_text("method: explicit\n")
        (run / record).mkdir() if record == "checkpoints" else (run / record).write_text("{}\n")
        assert check_fresh_dir(run, "--out", overwrite=True) is True


# ----- mutmut survivors of data/steps.py (docs/RESULTS.md, "Mutation testing") ---------------------

def test_auto_steps_are_gsm8k_only_for_cots_that_begin_and_end_with_an_expression():
    """Kills data.steps.x_resolve_kind__mutmut_21 (`startswith("<<") and endswith(">>")` -> `or`)
    and the message mutants 29, 32, 33 (the whole message is checked)."""
    from icot.data.steps import resolve_kind
    from icot.errors import UserError

    refused = ("config: cannot tell how these CoTs split into steps; set steps to gsm8k, mult or separator "
               "(with step_separator)")
    assert resolve_kind("auto", [Example("q", "<<2*3=6>> <<6+1=7>>", "7")], None) == "gsm8k"
    for cot in ("<<2*3=6>> so 6", "so <<2*3=6>>"):  # an expression at one end only: not gsm8k data
        with pytest.raises(UserError) as error:
            resolve_kind("auto", [Example("q", "<<1+1=2>>", "2"), Example("q", cot, "6")], None)
        assert str(error.value) == refused, cot


def test_step_separator_errors_name_the_setting():
    """Kills data.steps.x_check_separator's message mutants (the whole messages are checked)."""
    from icot.data.steps import check_separator
    from icot.errors import UserError

    with pytest.raises(UserError) as error:
        check_separator("separator", None)
    assert str(error.value) == "config: steps 'separator' needs step_separator (the string between two steps)"
    with pytest.raises(UserError) as error:
        check_separator("mult", ";")
    assert str(error.value) == "config: step_separator ';' is read only with steps: separator, got steps: mult"
    check_separator("separator", ";")
    check_separator("gsm8k", None)


def merging_tokenizer():
    """A character BPE (no pre-tokenizer) with one merge, `;` + `b` -> `;b`: it tokenizes `a;b` as
    `a`, `;b`, so the prefix `a;` (the step before `;`'s boundary) is no prefix of the whole CoT's tokens."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, ";": 3, ";b": 4}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[(";", "b")]))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")


def test_a_tokenizer_that_merges_across_a_step_boundary_is_refused_naming_the_example():
    """Kills data.steps.x_token_step_ends__mutmut_44 (the message -> None), 45 and 46 (`example {i + 1}`
    -> `{i - 1}`, `{i + 2}`) and 47 (the excerpt `[:80]` -> `[:81]`)."""
    from icot.data.steps import token_step_ends
    from icot.errors import UserError

    tokenizer = merging_tokenizer()
    assert tokenizer("a;ab", add_special_tokens=False)["input_ids"] == [1, 3, 1, 2]
    assert tokenizer("a;b", add_special_tokens=False)["input_ids"] == [1, 4]  # the merge, across the boundary
    assert token_step_ends(tokenizer, ["a;ab", "aa;a"], "separator", ";") == [[2, 4], [3, 4]]
    long_cot = "a" * 100 + ";b"  # example 2 of 3: the first splits cleanly, the second does not
    with pytest.raises(UserError) as error:
        token_step_ends(tokenizer, ["a;ab", long_cot, "a;b"], "separator", ";")
    assert str(error.value) == ("example 2: the tokenizer does not split the CoT at its step boundaries "
                                f"('{'a' * 80}'); use steps 'separator' with a separator after which it does")


def test_unsplit_error_quotes_the_first_nonempty_cot_or_an_empty_one():
    """Kills data.steps.x_unsplit_error__mutmut_3, 5, 6 (the default for no CoT: None -> TypeError,
    none -> StopIteration, "XXXX"), 8 (the excerpt `[:60]` -> `[:61]`) and the message mutants 9, 10, 11."""
    from icot.data.steps import unsplit_error

    tail = ("expected steps that split it (mult for multiplication, gsm8k for <<...>> steps, "
            "or separator with a step_separator the CoTs hold)")
    assert str(unsplit_error("steps mult", ["", ""], "stage 1 would replace every whole CoT")) == (
        "steps mult: no training CoT splits into more than one step (e.g. ''), so stage 1 would replace "
        f"every whole CoT; {tail}")
    assert str(unsplit_error("steps gsm8k", ["", "1" * 70, "2 2"], "it removes tokens")) == (
        f"steps gsm8k: no training CoT splits into more than one step (e.g. '{'1' * 60}'), so it removes tokens; "
        f"{tail}")


# ----- mutmut survivors of generate.py ------------------------------------------------------------

def test_split_generation_splits_at_the_first_and_second_stop():
    """Kills generate.x_split_generation__mutmut_8 (the answer starts two tokens after the first SEP)."""
    from icot.generate import split_generation

    sep = 0
    assert split_generation([5, 6, sep, 7, 8, sep], sep) == ([5, 6], [7, 8], True)
    assert split_generation([5, sep, 7, 8], sep) == ([5], [7, 8], False)  # cut before its EOS
    assert split_generation([sep, sep], sep) == ([], [], True)
    assert split_generation([5, 6], sep) == ([5, 6], [], False)


# ----- mutmut survivors of evaluate.py ------------------------------------------------------------

def test_describe_unknown_names_at_most_five_words_and_the_ascii_hint():
    """Kills evaluate.x_describe_unknown__mutmut_7 (the words' joint), 9 (six words named instead of
    five) and 14 (the hint's case)."""
    from icot.evaluate import describe_unknown

    assert describe_unknown(["a", "b", "c", "d", "e", "f"]) == "the model's vocabulary has no 'a', 'b', 'c', 'd', 'e'"
    assert describe_unknown(["x", "٣"]) == "the model's vocabulary has no 'x', '٣'; write digits as ASCII 0-9"
    assert describe_unknown(["café"]) == "the model's vocabulary has no 'café'"  # not ASCII, but no digit


def test_unknown_words_are_located_by_example_number_in_a_list_and_by_line_in_a_file(capsys):
    """Kills evaluate.x__check_part__mutmut_8 (examples given as a list located as `where:N`, like
    lines of a file); the whole warning is checked."""
    from icot.errors import new_command
    from icot.evaluate import check_known_tokens

    examples = mult_examples(3, 3, 4, seed=44)
    tokenizer = word_tokenizer([f"{e.question} {e.cot} #### {e.answer}" for e in examples])
    examples[2] = Example(examples[2].question + " apples", examples[2].cot, examples[2].answer)
    data = encode(tokenizer, Layout.for_tokenizer(tokenizer), examples)
    tail = "the model's vocabulary has no 'apples'; 1 of 4 questions have words it cannot read and will score wrong"
    for where, numbered, place in (("4 examples", False, "4 examples, example 3"), ("test.txt", True, "test.txt:3")):
        new_command()
        capsys.readouterr()
        check_known_tokens(tokenizer, data, where, numbered_lines=numbered)
        assert capsys.readouterr().err == f"icot: warning: {place}: {tail}\n"


def test_unknown_words_in_every_answer_are_one_error_naming_the_first():
    """Kills evaluate.x__check_part__mutmut_27 and the error's other message mutants (the whole
    message is checked), for answers and questions."""
    from icot.errors import UserError
    from icot.evaluate import check_known_tokens

    examples = mult_examples(3, 3, 4, seed=44)
    tokenizer = word_tokenizer([f"{e.question} {e.cot} #### {e.answer}" for e in examples])
    layout = Layout.for_tokenizer(tokenizer)
    for part, changed in (("answer", [Example(e.question, e.cot, e.answer + " apples") for e in examples]),
                          ("question", [Example(e.question + " pears", e.cot, e.answer) for e in examples])):
        with pytest.raises(UserError) as error:
            check_known_tokens(tokenizer, encode(tokenizer, layout, changed), "test.txt", numbered_lines=True)
        word = "apples" if part == "answer" else "pears"
        assert str(error.value) == (f"test.txt:1: the model's vocabulary has no '{word}', and no {part} can be read "
                                    f"whole; expected {part}s written like the model's training data")


def test_unknown_words_in_some_answers_are_words_it_cannot_write(capsys):
    """Kills evaluate.x__check_part__mutmut_31 (answers said to hold words the model cannot `read`)."""
    from icot.errors import new_command
    from icot.evaluate import check_known_tokens

    examples = mult_examples(3, 3, 4, seed=44)
    tokenizer = word_tokenizer([f"{e.question} {e.cot} #### {e.answer}" for e in examples])
    examples[1] = Example(examples[1].question, examples[1].cot, examples[1].answer + " apples")
    new_command()
    capsys.readouterr()
    check_known_tokens(tokenizer, encode(tokenizer, Layout.for_tokenizer(tokenizer), examples), "test.txt", True)
    assert capsys.readouterr().err == ("icot: warning: test.txt:2: the model's vocabulary has no 'apples'; 1 of 4 "
                                       "answers have words it cannot write and will score wrong\n")


@pytest.fixture(scope="module")
def saved_micro(tmp_path_factory):
    """A saved micro model (random weights) and its tokenizer, with an empty icot.json."""
    from icot.models import save_model

    tokenizer = word_tokenizer(["1 2 3"])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("saved") / "model"
    save_model(build_preset("micro", len(tokenizer), tokenizer.eos_token_id), tokenizer, path, {})
    return path


LOADED_SETTINGS = {  # icot.json -> (cot_removed, removal_side, keep_position, position_gap, position_gap_from, gap_placement)
    "nothing said: the defaults": ({}, (0, "left", False, 0, 0, "authors")),
    "0.2 on, right side": ({"cot_removed": 5, "removal_side": "right", "keep_position": True, "position_gap": 7,
                            "position_gap_from": 3, "gap_placement": "in_place"}, (5, "right", True, 7, 3, "in_place")),
    "0.2 on, all removed": ({"cot_removed": "all", "keep_position": True, "position_gap": 24, "position_gap_from": 0},
                            (math.inf, "left", True, 24, 0, "authors")),
    "before 0.2 (no position_gap_from)": ({"cot_removed": 4, "keep_position": True, "position_gap": 4,
                                           "gap_placement": "authors"}, (4, "left", True, 4, 1, "in_place")),
    # without keep_position there is no gap, wherever icot.json says it would start (evaluate.saved_gap)
    "before 0.2, without keep_position": ({"cot_removed": 4, "position_gap_from": 2}, (4, "left", False, 0, 0, "authors")),
}


@pytest.mark.parametrize("case", LOADED_SETTINGS)
def test_a_loaded_model_takes_its_inference_settings_from_its_metadata(case, saved_micro, capsys):
    """Kills load_plain_predictor mutants that change a default or the reading of an icot.json
    field (expected values written here, field by field); no warning for these."""
    from icot.errors import new_command
    from icot.evaluate import load_plain_predictor

    meta, expected = LOADED_SETTINGS[case]
    new_command()
    capsys.readouterr()
    p = load_plain_predictor(saved_micro, meta)
    assert (p.cot_removed, p.removal_side, p.keep_position, p.position_gap, p.position_gap_from, p.gap_placement) == expected
    assert isinstance(p.cot_removed, float) and not p.model.training
    assert icot_lines(capsys.readouterr().err) == []


def icot_lines(err: str) -> list[str]:
    """icot's own lines of stderr (not the progress bars of the weights' loading)."""
    return [line for line in err.splitlines() if line.startswith("icot:")]


def test_a_model_from_before_0_2_with_right_side_removal_is_loaded_with_a_warning(saved_micro, capsys):
    """Kills the load_plain_predictor mutants of the warning (its condition and its text)."""
    from icot.errors import new_command
    from icot.evaluate import load_plain_predictor

    new_command()
    capsys.readouterr()
    p = load_plain_predictor(saved_micro, {"cot_removed": 3, "removal_side": "right", "keep_position": True, "position_gap": 3})
    assert (p.removal_side, p.position_gap_from, p.gap_placement) == ("right", 1, "in_place")
    assert icot_lines(capsys.readouterr().err) == [
        f"icot: warning: {saved_micro} was trained by icot before 0.2 with keep_position and right-side removal, "
        "whose positions at inference this version cannot reproduce; retrain it"]
    new_command()
    load_plain_predictor(saved_micro, {"cot_removed": 3, "removal_side": "right", "keep_position": False})
    load_plain_predictor(saved_micro, {"cot_removed": 3, "removal_side": "right", "keep_position": True,
                                       "position_gap_from": 2})
    assert icot_lines(capsys.readouterr().err) == []  # not before 0.2 with keep_position: nothing to warn of


def test_a_loaded_model_is_put_on_the_device_and_dtype_asked_for(saved_micro):
    """Kills load_plain_predictor mutants 3, 5 (dtype not passed on), 7, 8, 9 (the device ignored or
    None). The `meta` device stands for a GPU: it moves the parameters without one."""
    from icot.evaluate import load_plain_predictor

    p = load_plain_predictor(saved_micro, {}, device="meta", dtype=torch.bfloat16)
    assert p.device.type == "meta" and {q.dtype for q in p.model.parameters()} == {torch.bfloat16}
    p = load_plain_predictor(saved_micro, {})
    assert p.device.type == "cpu" and {q.dtype for q in p.model.parameters()} == {torch.float32}


def small_predictor(**settings):
    """A Predictor over a random micro model and a word tokenizer of `c 1 2 ####`."""
    from icot.evaluate import Predictor

    tokenizer = word_tokenizer(["a b c d 1 2 3 5 6 ####"])
    torch.manual_seed(0)
    return Predictor(build_preset("micro", len(tokenizer), tokenizer.eos_token_id).eval(), tokenizer, **settings)


def test_a_predictor_decodes_cot_and_answer_and_knows_a_cut_generation():
    """Kills Predictor.decode and Predictor.finished mutants: (cot, answer) of generations with and
    without `####`, with and without their stops, with special tokens inside, and which of them
    ended by a stop."""
    p = small_predictor()
    ids = lambda text: p.tokenizer(text, add_special_tokens=False)["input_ids"]
    sep = p.layout.sep_id
    assert p.layout == Layout(sep_id=0, bos_id=None, pad_id=0)  # the word tokenizer's EOS, id 0
    assert p.decode(ids("c d") + [sep] + ids("#### 1 2") + [sep]) == ("c d", "1 2")
    assert p.decode(ids("c") + [sep] + ids("2 1") + [sep]) == ("c", "2 1")  # no mark: the answer as written
    assert p.decode(ids("c") + [sep] + ids("####")) == ("c", "")
    assert p.decode(ids("c d 1")) == ("c d 1", "")  # no SEP: all CoT
    assert p.decode([sep, sep]) == ("", "")
    unk = p.tokenizer.unk_token_id  # a special token generated inside the CoT or the answer is not text
    assert p.decode(ids("c") + [unk] + ids("d") + [sep] + ids("#### 1") + [unk] + [sep]) == ("c d", "1")
    assert p.finished(ids("c 1"), 5) and p.finished(ids("c 1") + [sep], 3)  # under the budget; a stop at it
    assert not p.finished(ids("c 1 2"), 3) and not p.finished(ids("c 1 2"), 2)  # cut at (or past) the budget
    assert p.finished([], 1) and not p.finished([], 0)


def test_a_predictor_opens_a_position_gap_only_with_keep_position():
    """Kills Predictor.gap mutants."""
    from icot.generate import PositionGap

    assert small_predictor(position_gap=5, position_gap_from=2).gap() == PositionGap()
    assert small_predictor(keep_position=True, position_gap=5, position_gap_from=2).gap() == PositionGap(5, 2)
    assert small_predictor(keep_position=True).gap() == PositionGap(0, 0)


def test_sequences_correct_counts_rows_right_at_every_target():
    """Kills sequences_correct mutants: rows counted by hand."""
    from icot.evaluate import sequences_correct

    labels = torch.tensor([[-100, 3, 1, -100], [-100, -100, 2, 2], [-100, 1, 1, 1], [-100, -100, -100, -100]])
    predicted = torch.tensor([[3, 1, 0, 0], [0, 2, 2, 4], [1, 1, 2, 0], [0, 0, 0, 0]])  # the next token, per position
    logits = torch.nn.functional.one_hot(predicted, 5).float()
    # row 0: 3, 1 right, its last column has no target; row 1: 2, 2 right; row 2: its 3rd target wrong;
    # row 3: no target at all: right
    assert int(sequences_correct(logits, labels)) == 3
    labels[1, 3] = 4  # row 1's last target is scored against the prediction before it (2), not its own column's (4)
    assert int(sequences_correct(logits, labels)) == 2


def test_eval_metrics_are_every_field_but_the_predictions():
    """Kills EvalResult.metrics mutants."""
    from icot.evaluate import EvalResult

    result = EvalResult(0.5, 0.75, 1.25, 10.0, 7.5, 4, 0.4, [{"answer": "1"}])
    assert result.metrics() == {"accuracy": 0.5, "token_accuracy": 0.75, "loss": 1.25, "examples_per_s": 10.0,
                                "mean_generated_tokens": 7.5, "examples": 4, "generation_seconds": 0.4}


def test_timing_synchronizes_a_cuda_device_and_nothing_else(monkeypatch):
    """Kills evaluate._sync mutants (on a CPU-only machine: torch.cuda.synchronize recorded, not run)."""
    from icot import evaluate as ev

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    ev._sync(torch.device("cpu"))
    ev._sync(torch.device("meta"))
    assert calls == []
    ev._sync(torch.device("cuda", 1))
    assert calls == [torch.device("cuda", 1)]


def test_unknown_words_in_the_cot_alone_are_no_concern_and_one_example_is_checked(capsys):
    """Kills check_known_tokens mutants 26 (the first CoT token counted with the question) and 5
    (data of one example left unchecked)."""
    from icot.errors import UserError, new_command
    from icot.evaluate import check_known_tokens

    examples = mult_examples(3, 3, 4, seed=44)
    tokenizer = word_tokenizer([f"{e.question} {e.cot} #### {e.answer}" for e in examples])
    layout = Layout.for_tokenizer(tokenizer)
    cot_words = [Example(e.question, "zzz " + e.cot + " zzz", e.answer) for e in examples]  # the CoT's first and last
    new_command()
    capsys.readouterr()
    check_known_tokens(tokenizer, encode(tokenizer, layout, cot_words), "test.txt", numbered_lines=True)
    assert capsys.readouterr().err == ""
    one = [Example(examples[0].question + " pears", examples[0].cot, examples[0].answer)]
    with pytest.raises(UserError, match=r"^test.txt:1: the model's vocabulary has no 'pears', and no question"):
        check_known_tokens(tokenizer, encode(tokenizer, layout, one), "test.txt", numbered_lines=True)


def test_an_unknown_first_word_belongs_to_its_own_example(capsys):
    """Kills check_known_tokens mutant 16 (`searchsorted(side="left")`: a row's first token counted as
    the end of the row before it, so as that example's answer)."""
    from icot.errors import new_command
    from icot.evaluate import check_known_tokens

    examples = mult_examples(3, 3, 4, seed=44)
    tokenizer = word_tokenizer([f"{e.question} {e.cot} #### {e.answer}" for e in examples])
    examples[1] = Example("pears " + examples[1].question, examples[1].cot, examples[1].answer)
    new_command()
    capsys.readouterr()
    check_known_tokens(tokenizer, encode(tokenizer, Layout.for_tokenizer(tokenizer), examples), "test.txt", True)
    assert capsys.readouterr().err == ("icot: warning: test.txt:2: the model's vocabulary has no 'pears'; 1 of 4 "
                                       "questions have words it cannot read and will score wrong\n")


TEACHER_FORCED = {  # settings -> the CoTs left of `a b c` and `a b` (None: the positions of the whole rows)
    "nothing removed": (dict(), ["a b c", "a b"]),
    "1 from the left": (dict(cot_removed=1), ["b c", "b"]),
    "2 from the left": (dict(cot_removed=2), ["c", ""]),
    "2 from the right": (dict(cot_removed=2, removal_side="right"), ["a", ""]),
    "all": (dict(cot_removed=math.inf), ["", ""]),
}


@pytest.mark.parametrize("case", TEACHER_FORCED)
def test_the_teacher_forced_layout_is_the_rows_without_the_removed_cot_tokens(case):
    """Kills Predictor.teacher_forced mutants: its rows compared with the encoding of the examples
    with those CoT tokens deleted by hand (positions renumbered, prompt and padding unscored)."""
    from icot.data.batching import IGNORE

    settings, cots = TEACHER_FORCED[case]
    examples = [Example("1 2", "a b c", "5"), Example("3", "a b", "6")]
    p = small_predictor(**settings)
    tokenizer = p.tokenizer
    batch = p.teacher_forced(encode(tokenizer, p.layout, examples), [0, 1])
    expected = encode(tokenizer, p.layout, [Example(e.question, cot, e.answer) for e, cot in zip(examples, cots)])
    assert batch["cot_len"].tolist() == [len(c.split()) for c in cots]
    for i in range(2):
        row, n = expected.row(i).tolist(), len(expected.row(i))
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert batch["input_ids"][i, :n].tolist() == row and batch["position_ids"][i, :n].tolist() == list(range(n))
        prompt = expected.n_prompt[i]
        assert batch["labels"][i].tolist() == [IGNORE] * prompt + row[prompt:] + [IGNORE] * (batch["labels"].shape[1] - n)


@pytest.mark.parametrize("placement, sep_position", [("authors", 5), ("in_place", 2)])
def test_the_teacher_forced_layout_keeps_the_positions_of_the_whole_cot(placement, sep_position):
    """Kills teacher_forced mutants of keep_position: `1 2 SEP a b c SEP #### 5 EOS` without its CoT
    keeps every position (the SEP before the CoT moves to the last CoT token's slot, authors' way)."""
    examples = [Example("1 2", "a b c", "5")]
    p = small_predictor(cot_removed=math.inf, keep_position=True, position_gap=3, gap_placement=placement)
    batch = p.teacher_forced(encode(p.tokenizer, p.layout, examples), [0])
    ids = lambda text: p.tokenizer(text, add_special_tokens=False)["input_ids"]
    sep = p.layout.sep_id
    assert batch["input_ids"].tolist() == [ids("1 2") + [sep, sep] + ids("#### 5") + [sep]]
    assert batch["position_ids"].tolist() == [[0, 1, sep_position, 6, 7, 8, 9]]


def test_the_teacher_forced_batch_is_on_the_models_device():
    """Kills teacher_forced mutant 44 (`.to(None)`): the `meta` device stands for a GPU."""
    p = small_predictor(cot_removed=1)
    p.model.to("meta")
    batch = p.teacher_forced(encode(p.tokenizer, p.layout, [Example("1 2", "a b c", "5")]), [0])
    assert {v.device.type for v in batch.values()} == {"meta"}


def test_token_scores_by_hand():
    """Kills evaluate.x_token_scores__mutmut_21 (wrong tokens counted as right; the random-logits test
    in test_fast_paths has as many of each). Logits `log 2` at the argmax and 0 elsewhere (3 tokens):
    cross-entropy log 2 where the argmax is the target, log 4 where it is not."""
    from icot.evaluate import token_scores

    big = math.log(2)
    logits = torch.zeros(2, 4, 3)
    for row, col, top in ((0, 0, 0), (0, 1, 0), (0, 2, 2), (1, 1, 1), (1, 2, 0), (1, 3, 2)):
        logits[row, col, top] = big
    labels = torch.tensor([[-100, 0, 1, 2], [-100, -100, 1, -100]])  # targets: 0, 1, 2 then (row 1) 1
    loss, correct, count = token_scores(logits, labels)
    assert (int(correct), int(count)) == (3, 4)  # row 0: 0 right, 1 wrong (0 predicted), 2 right; row 1: 1 right
    assert float(loss) == pytest.approx(3 * math.log(2) + math.log(4))  # 3 right at log 2, 1 wrong at log 4


def test_left_padded_prompts_are_on_the_device_asked_for():
    """Kills generate.x_left_padded__mutmut_23 and 24 (`.to(None)`: ids or mask left on the CPU); the
    `meta` device stands for a GPU."""
    from icot.generate import left_padded

    ids, mask = left_padded([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long
    ids, mask = left_padded([[5, 6, 7], [8]], pad_id=0, device="meta")
    assert ids.device.type == mask.device.type == "meta"


# ----- paths.py: its pure rules, by direct calls (no mutmut run of paths.py yet) -------------------

@pytest.mark.parametrize("name, local", [
    (".", True), ("..", True), ("./m", True), ("../m", True), ("~", True), ("~/m", True), ("/m", True),
    (".\\m", True), ("..\\m", True), ("a/b/c", True), ("a\\b\\c", True), ("here/m", True), ("here\\m", True),
    ("gpt2", False), ("owner/name", False), ("m", False), ("", False), ("here", False), ("nowhere/m", False)])
def test_is_local_path_tells_a_path_from_a_hub_id(name, local, tmp_path, monkeypatch):
    """Kills paths.x_is_local_path mutants: each rule of its docstring, one name each (`here` exists
    in the current directory, `nowhere` does not)."""
    from icot.paths import is_local_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    assert is_local_path(name) is local


@pytest.mark.parametrize("field, names_a_path", [
    ("data", True), ("model", True), ("tokenizer", True), ("train_file", True), ("teacher_dir", True),
    ("out", False), ("method", False), ("file", False), ("models", False), ("dir_count", False)])
def test_the_config_fields_that_name_inputs(field, names_a_path):
    """Kills paths.x__names_a_path mutants."""
    from icot.paths import _names_a_path

    assert _names_a_path(field) is names_a_path


def test_input_paths_are_the_existing_paths_of_path_fields_nested_ones_included(tmp_path):
    """Kills paths.x_input_paths mutants."""
    from icot.paths import input_paths

    @dataclasses.dataclass
    class Inner:
        teacher_dir: str
        count_file: int = 3

    @dataclasses.dataclass
    class Outer:
        data: str
        out: str
        train_file: str
        model: str
        inner: Inner
        tokenizer: str | None = None

    for name in ("d", "o", "t", "x"):
        (tmp_path / name).mkdir()
    config = Outer(str(tmp_path / "d"), str(tmp_path / "o"), str(tmp_path / "missing"), "gpt2", Inner(str(tmp_path / "t")))
    assert input_paths(config) == [tmp_path / "d", tmp_path / "t"]  # out is no input; gpt2 and missing do not exist


def test_is_ours_by_marker_model_or_run_records(tmp_path):
    """Kills paths.x_is_ours and x_mark_as_ours mutants: each kind of directory icot wrote, and
    a config.yaml alone, or records without one, which are not."""
    from icot.paths import MARKER, is_ours, mark_as_ours

    def folder(name, *files):
        path = tmp_path / name
        path.mkdir()
        for f in files:
            (path / f).parent.mkdir(parents=True, exist_ok=True)
            (path / f).mkdir() if f == "checkpoints" else (path / f).write_text("{}")
        return path

    marked = folder("marked")
    mark_as_ours(marked)
    assert (marked / MARKER).read_text() == "written by icot: --overwrite may replace this directory\n"
    assert is_ours(marked) and is_ours(folder("model", "icot.json"))
    for records in (["metrics.jsonl"], ["checkpoints"], ["best/icot.json"]):
        assert is_ours(folder("run-" + records[0].replace("/", "-"), "config.yaml", *records))
        assert not is_ours(folder("records-" + records[0].replace("/", "-"), *records))  # without config.yaml
    assert not is_ours(folder("config-only", "config.yaml", "notes.txt"))
    assert not is_ours(folder("marker-dir", MARKER + "/x"))  # a directory named .icot is no marker
    assert not is_ours(folder("empty"))


def test_refuse_overlap_and_input_scope_by_direct_calls(tmp_path):
    """Kills paths.x_refuse_overlap and x_input_scope mutants: an output that is, holds, or lies inside
    an input icot wrote is refused, whole message checked; one inside a plain data directory is not."""
    from icot.errors import UserError
    from icot.paths import input_scope, mark_as_ours, refuse_overlap

    data, run = tmp_path / "data", tmp_path / "run"
    (data / "sub").mkdir(parents=True)
    (run / "best").mkdir(parents=True)
    mark_as_ours(run)
    refuse_overlap(data / "sub" / "out", "--out", [data, tmp_path / "elsewhere"])  # inside a plain directory: fine
    refuse_overlap(tmp_path / "out", "--out", [data, run / "best"])
    cases = [(data, [data], f"--out {data}: is the input {data}; write the output somewhere else"),
             (tmp_path, [tmp_path.parent / "y", data],
              f"--out {tmp_path}: holds the input {data}; write the output somewhere else"),
             (run / "new", [run], f"--out {run / 'new'}: lies inside the input {run}, which icot may replace; "
                                  "write the output somewhere else")]
    for out, inputs, message in cases:
        with pytest.raises(UserError) as error:
            refuse_overlap(out, "--out", inputs)
        assert str(error.value) == message
    assert input_scope(run / "best") == run.resolve()  # a model in a run: the run around it
    assert input_scope(data / "sub") == (data / "sub").resolve()
    (run / "best" / "icot.json").write_text("{}")
    (tmp_path / "outer").mkdir()
    assert input_scope(run / "best") == run.resolve()


def test_check_output_file_by_direct_calls(tmp_path):
    """Kills paths.x_check_output_file mutants: each refusal, whole message checked, and what passes."""
    from icot.errors import UserError
    from icot.paths import check_output_file, mark_as_ours

    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    mark_as_ours(run)
    data = tmp_path / "test.txt"
    data.write_text("1 * 2||2 #### 2\n")
    old = tmp_path / "old.json"
    old.write_text("{}")
    (run / "notes.json").write_text("{}")
    check_output_file(tmp_path / "new.json", "--json", False, [data, tmp_path / "missing"])
    check_output_file(old, "--json", True, [data])
    refusals = [
        ((tmp_path, "--json", True, []), f"--json {tmp_path}: is a directory; expected a file name"),
        ((data, "--json", True, [tmp_path / "missing", data]), f"--json {data}: is the input file {data}; write to another file"),
        ((data / "x.json", "--json", False, []), f"--json {data}: {data} is a file, not a directory"),
        ((run / "eval.json", "--json", True, [run / "best"]),
         f"--json {run / 'eval.json'}: lies inside {run.resolve()}, an input of this command; write it elsewhere"),
        ((old, "--json", False, []), f"{old} exists; pass --overwrite to replace it"),
        ((run / "notes.json", "--json", True, []),
         f"--json {run / 'notes.json'}: belongs to {run.resolve()}, which icot wrote (a run, demo or model), and "
         "--overwrite replaces no file of it; write to another file"),
    ]
    for args, message in refusals:
        with pytest.raises(UserError) as error:
            check_output_file(*args)
        assert str(error.value) == message, args
    check_output_file(run / "fresh.json", "--json", False, [])  # a new file beside a run's files: fine


def test_check_fresh_dir_by_direct_calls(tmp_path, monkeypatch):
    """Kills paths.x_check_fresh_dir, x_check_output_dir and x__check_writable mutants: what it
    returns (True: an old run of icot's to delete first), each refusal, whole message checked."""
    from icot.errors import UserError
    from icot.paths import check_fresh_dir, mark_as_ours

    empty, new, run, mine = tmp_path / "empty", tmp_path / "new" / "deeper", tmp_path / "run", tmp_path / "mine"
    for folder in (empty, run, mine):
        folder.mkdir()
    mark_as_ours(run)
    (mine / "notes.txt").write_text("x")
    (tmp_path / "file").write_text("x")
    assert check_fresh_dir(empty, "--out", False) is False and check_fresh_dir(new, "--out", False) is False
    assert check_fresh_dir(run, "--out", True) is True
    (tmp_path / "link").symlink_to(run)
    monkeypatch.chdir(run)
    refusals = [
        ((tmp_path / "file", "--out", True), f"--out {tmp_path / 'file'}: exists and is not a directory; expected a directory"),
        ((tmp_path / "file" / "x", "--out", True),
         f"--out {tmp_path / 'file' / 'x'}: {tmp_path / 'file'} is a file, not a directory"),
        ((mine, "--out", False, (), " (hint)"), f"{mine}: exists and is not empty; pass --overwrite to replace it (hint)"),
        ((mine, "--out", False), f"{mine}: exists and is not empty; pass --overwrite to replace it"),
        ((mine, "--out", True), f"--out {mine}: --overwrite replaces only a directory icot wrote (with its .icot marker), "
                                "and this one is not; remove it yourself or choose another directory"),
        ((tmp_path / "link", "--out", True), f"--out {tmp_path / 'link'}: is a symbolic link (to {run.resolve()}); give the "
                                             "directory itself to replace it"),
        ((run, "--out", True), f"--out {run}: is or holds the current directory, which icot does not delete; choose "
                               "another directory"),
        ((run / "x", "--out", False, [run]), f"--out {run / 'x'}: lies inside the input {run}, which icot may replace; "
                                             "write the output somewhere else"),
    ]
    for args, message in refusals:
        with pytest.raises(UserError) as error:
            check_fresh_dir(*args)
        assert str(error.value) == message, args
    monkeypatch.chdir(tmp_path)
    assert check_fresh_dir(run, "--out", True) is True  # the cwd now above it: fine


def test_an_output_directory_is_tried_for_writing_where_it_would_go(tmp_path, monkeypatch):
    """Kills paths.x__check_writable mutants 6 (the try made in the default temporary directory) and
    7 (its message None). A read-only directory is simulated (the tests may run as root, which
    writes anywhere): creating a file there fails as the system would say it."""
    import tempfile

    from icot.errors import UserError
    from icot.paths import check_output_dir

    locked = tmp_path / "locked"
    locked.mkdir()
    real = tempfile.TemporaryFile

    def temporary_file(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == locked.absolute():
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file)
    check_output_dir(tmp_path / "new" / "run", "--out")  # its nearest existing directory, tmp_path, is writable
    with pytest.raises(UserError) as error:
        check_output_dir(locked / "new" / "run", "--out")
    assert str(error.value) == f"--out {locked / 'new' / 'run'}: cannot write in {locked.absolute()} (Permission denied)"


def test_check_local_dir_by_direct_calls(tmp_path, monkeypatch):
    """Kills paths.x_check_local_dir mutants: a model directory passes, a hub id is left to the hub,
    and a file, a missing local path or a pipe among the files is refused, whole message checked."""
    import os

    from icot.errors import UserError
    from icot.paths import check_local_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "sub").mkdir()
    (tmp_path / "weights.bin").write_text("x")
    check_local_dir("model", "--model")
    check_local_dir(str(tmp_path / "model"), "--model")
    check_local_dir("gpt2", "--model")  # not here, not a path: a hub id
    check_local_dir("owner/name", "--tokenizer")
    refusals = [
        ("weights.bin", "--model weights.bin: is a file; expected a model directory (e.g. RUN/best) or a hub id"),
        ("./nothing", "--tokenizer ./nothing: no such directory; expected a model directory (e.g. RUN/best) or a hub id"),
        ("model/missing", "--model model/missing: no such directory; expected a model directory (e.g. RUN/best) or a hub id"),
    ]
    for name, message in refusals:
        with pytest.raises(UserError) as error:
            check_local_dir(name, message.split()[0])
        assert str(error.value) == message
    os.mkfifo(tmp_path / "model" / "pipe")
    with pytest.raises(UserError) as error:
        check_local_dir("model", "--model")
    assert str(error.value) == ("--model model: pipe is not a regular file (a pipe or a device); expected the files a "
                                "model directory holds")


def test_write_file_replaces_the_whole_file(tmp_path):
    """Kills paths.x_write_file mutants."""
    from icot.paths import write_file

    path = tmp_path / "f.txt"
    path.write_text("old, longer content\n")
    write_file(path, "new\n")
    assert path.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_one_writer_holds_a_lock_a_second_writer_cannot_take(tmp_path):
    """Kills paths.x__try_lock and x__locked_file mutants: the lock beside the folder holds the
    writer's pid, a second taker is refused naming it, and the lock file goes with the block."""
    import os

    from icot.errors import UserError
    from icot.paths import _locked_file, _try_lock, one_writer

    first, second = open(tmp_path / "f", "a+"), open(tmp_path / "f", "a+")
    try:
        assert _try_lock(first) is True and _try_lock(second) is False  # two open files: flock tells them apart
    finally:
        first.close()
        second.close()
    run = tmp_path / "run"
    lock = tmp_path / ".run.lock"
    with one_writer(run):
        assert lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(UserError) as error:
            _locked_file(lock, run.resolve())
        assert str(error.value) == (f"{run.resolve()}: in use by another icot command (process {os.getpid()}); one "
                                    "command writes it at a time: wait for that one to end or stop it")
    assert not lock.exists()
    handle = _locked_file(lock, run)  # free again: opened and locked
    try:
        assert lock.exists() and os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino and not handle.closed
    finally:
        handle.close()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError) as error:
        _locked_file(tmp_path / "file" / ".run.lock", run)
    assert str(error.value) == f"{run}: cannot create its lock file {tmp_path / 'file' / '.run.lock'} (File exists)"
