"""ICoT-KD: teacher-state positions and extraction, the SEP hooks, the emulator, saving and
reloading, batched inference, and the whole pipeline through the CLI (GPT-2 and Llama shapes)."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import (checked_eval, checked_predict, modules_after_predict, mult_examples, product_is_right, run_cli,
                      training_modules)
from icot.data.batching import collate
from icot.data.format import read_examples
from icot.data.layout import Layout, encode
from icot.data.tokenizers import word_tokenizer
from icot.evaluate import evaluate
from icot.methods import load_predictor
from icot.methods.kd.predictor import KDPredictor
from icot.methods.kd.modules import (CoupledModel, MindReadingStudent, ThoughtEmulator, load_coupled, load_emulator,
                                     load_student)
from icot.methods.kd.predictor import answer_only
from icot.methods.kd.states import (SUBSETS, extract_teacher_states, few_thoughts_warning, positions_inside_cot,
                                    replaced_at, source_layers, teacher_cot_tokens, teacher_positions)
from icot.models import build_preset, decoder_layers

ARCHS = ["micro", "tiny-llama"]


# ----- positions t_l ---------------------------------------------------------------------------

def formula(first, second, layers, delta):
    """The spec, one example at a time: t_l = round(first + l·Δ), clipped to the second SEP."""
    step = (second - first) / (layers - 1) if delta == "dynamic" else delta
    return [min(round(first + l * step), second) for l in range(layers)]


@pytest.mark.parametrize("delta", ["dynamic", 1, 3])
@pytest.mark.parametrize("layers", [2, 5, 12])
def test_diagonal_positions_follow_the_formula(delta, layers):
    rng = np.random.default_rng(layers)
    first = torch.tensor(rng.integers(3, 9, 16))
    second = first + torch.tensor(rng.integers(1, 30, 16))
    got = teacher_positions(first, second, layers, delta, "diagonal")
    expected = [formula(f, s, layers, delta) for f, s in zip(first.tolist(), second.tolist())]
    assert got.tolist() == expected


def test_positions_clip_at_the_second_sep_and_columns_and_rows():
    first, second = torch.tensor([2, 4]), torch.tensor([9, 6])
    assert teacher_positions(first, second, 5, 3, "diagonal").tolist() == [[2, 5, 8, 9, 9], [4, 6, 6, 6, 6]]
    assert teacher_positions(first, second, 4, "dynamic", "first_column").tolist() == [[2] * 4, [4] * 4]
    assert teacher_positions(first, second, 4, "dynamic", "last_column").tolist() == [[9] * 4, [6] * 4]
    diagonal = teacher_positions(first, second, 4, "dynamic", "diagonal")
    for row in ("top_row", "bottom_row"):
        assert torch.equal(teacher_positions(first, second, 4, "dynamic", row), diagonal)
    assert source_layers("bottom_row", 3) == [0, 0, 0] and source_layers("top_row", 3) == [2, 2, 2]
    assert source_layers("diagonal", 3) == source_layers("last_column", 3) == [0, 1, 2]


# ----- small models and data ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy():
    """A tokenizer and 16 examples of 3x3 and 2x3 multiplication (prompts of two lengths)."""
    examples = mult_examples(3, 3, 8, seed=1) + mult_examples(2, 3, 8, seed=2)
    tokenizer = word_tokenizer([f"{e.question} {e.cot} {e.answer}" for e in examples])
    layout = Layout.for_tokenizer(tokenizer)
    return tokenizer, layout, encode(tokenizer, layout, examples)


def lm(arch, tokenizer, seed=0):
    torch.manual_seed(seed)
    return build_preset(arch, len(tokenizer), tokenizer.eos_token_id).eval()


def full_batch(data, layout, n=None):
    return collate(data, np.arange(n or len(data)), layout.pad_id)


# ----- reading teacher states, writing states at SEP ----------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_extracted_states_are_the_normalised_inputs_of_each_layer(arch, toy):
    tokenizer, layout, data = toy
    teacher = lm(arch, tokenizer)
    batch = full_batch(data, layout)
    with torch.no_grad():
        hidden = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         position_ids=batch["position_ids"], output_hidden_states=True).hidden_states
    layers = len(decoder_layers(teacher))
    second = batch["first_sep"] + batch["cot_len"] + 1
    rows = torch.arange(len(second))
    for subset in SUBSETS:
        positions = teacher_positions(batch["first_sep"], second, layers, "dynamic", subset)
        expected = torch.stack([hidden[s][rows, positions[:, l]] for l, s in enumerate(source_layers(subset, layers))], 1)
        got = extract_teacher_states(teacher, batch, "dynamic", subset)
        torch.testing.assert_close(got, F.layer_norm(expected, expected.shape[-1:]), rtol=1e-5, atol=1e-5)
        assert got.shape == (len(data), layers, teacher.config.hidden_size)


def recording(model, store):
    """Pre-hooks appending every decoder layer's input to `store` (in hook order)."""
    def record(module, args, kwargs):
        store.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    return [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in decoder_layers(model)]


@pytest.mark.parametrize("arch", ARCHS)
def test_replacement_changes_the_layer_input_at_sep_only(arch, toy):
    tokenizer, layout, data = toy
    model = lm(arch, tokenizer)
    batch = answer_only(full_batch(data, layout), layout.pad_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    sep, rows = batch["first_sep"], torch.arange(len(data))
    new = torch.randn(len(decoder_layers(model)), len(data), model.config.hidden_size)
    seen, before, after = [], [], []

    def new_state(layer, current):
        seen.append(current)
        return new[layer]

    with torch.no_grad():
        plain = model(**inputs).logits
        handles = recording(model, before)  # registered first: sees each layer's input before the swap
        with replaced_at(model, sep, new_state):
            handles += recording(model, after)  # registered last: sees it after the swap
            replaced = model(**inputs).logits
    for handle in handles:
        handle.remove()
    others = torch.ones(batch["input_ids"].shape, dtype=torch.bool)
    others[rows, sep] = False
    for layer, (x, y) in enumerate(zip(before, after)):
        assert torch.equal(seen[layer], x[rows, sep]) and torch.equal(y[rows, sep], new[layer])
        assert torch.equal(y[others], x[others])
    # positions before SEP cannot see it: their logits are bit-identical; SEP's own change
    earlier = torch.arange(batch["input_ids"].shape[1])[None, :] < sep[:, None]
    assert torch.equal(replaced[earlier], plain[earlier])
    assert not torch.allclose(replaced[rows, sep], plain[rows, sep])
    # outside the context the model is plain again
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain)


# ----- the emulator, saving and reloading, batched inference --------------------------------------

def test_emulator_learns_the_teacher_states(toy):
    tokenizer, layout, data = toy
    full = full_batch(data, layout)
    targets = extract_teacher_states(lm("micro", tokenizer), full, "dynamic", "diagonal")
    batch = answer_only(full, layout.pad_id)
    emulator = ThoughtEmulator(lm("micro", tokenizer, seed=1), mixture_size=4, softmax_temperature=1.0)
    optimizer = torch.optim.Adam(emulator.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        emulated = emulator(batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["first_sep"])
        loss = (emulated - targets).pow(2).sum(dim=(1, 2)).mean() / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert emulated.shape == targets.shape
    assert losses[-1] < 0.2 * losses[0]


def test_token_mixture_is_teacher_forced_in_training_and_takes_the_argmax_at_inference(toy):
    tokenizer, layout, data = toy
    full = full_batch(data, layout)
    targets = extract_teacher_states(lm("micro", tokenizer), full, 1, "diagonal")
    tokens = teacher_cot_tokens(full, 2, 1, "diagonal")  # t_1: the first CoT token, which varies
    assert tokens[:, 0].unique().tolist() == [layout.sep_id] and len(tokens[:, 1].unique()) > 3
    batch = answer_only(full, layout.pad_id)
    prompts = (batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["first_sep"])
    emulator = ThoughtEmulator(lm("micro", tokenizer, seed=1), mixture="token")
    assert emulator.mixture_size == len(tokenizer)
    optimizer = torch.optim.Adam(emulator.parameters(), lr=3e-3)
    for _ in range(60):
        emulated, logits = emulator.emulate(*prompts, cot_tokens=tokens)
        loss = (emulated - targets).pow(2).sum(dim=(1, 2)).mean() / 2 + F.cross_entropy(logits.transpose(1, 2), tokens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        forced, logits = emulator.emulate(*prompts, cot_tokens=tokens)
        assert torch.equal(logits.argmax(dim=-1), tokens)
        # having learned to pick the teacher's tokens, inference (argmax) gives the teacher-forced thoughts ...
        assert torch.allclose(emulator(*prompts), forced)
        # ... and the component is what the thought depends on
        assert not torch.allclose(emulator.emulate(*prompts, cot_tokens=(tokens + 1) % len(tokenizer))[0], forced)


def test_depth_warning_counts_the_teacher_states_inside_the_cot():
    two_layers = few_thoughts_warning([24, 24, 20], 2, "dynamic", "diagonal")
    assert "only 0 of the 2 teacher states" in two_layers and "median 24 tokens" in two_layers
    assert "at least 4 layers" in two_layers
    # 4 layers, dynamic: t_0 and t_3 are the SEPs, two inside; an integer delta of 8 keeps three inside
    assert "delta: 8" in few_thoughts_warning([24], 4, "dynamic", "diagonal")
    assert positions_inside_cot(24, 4, 8, "diagonal") == 3 and few_thoughts_warning([24], 4, 8, "diagonal") is None
    assert few_thoughts_warning([24], 6, "dynamic", "diagonal") is None
    assert "only 0 of the 6" in few_thoughts_warning([24], 6, 30, "diagonal")  # t_1 on is past the CoT
    assert "too short" in few_thoughts_warning([2], 12, "dynamic", "diagonal")  # 12 states, 2 distinct tokens
    assert few_thoughts_warning([24], 2, "dynamic", "first_column") is None  # the ablation reads a SEP by design


def coupled_model(arch, tokenizer, mixture="soft"):
    mixture_size = 3 if mixture == "soft" else 1
    emulator = ThoughtEmulator(lm(arch, tokenizer, seed=1), mixture_size, softmax_temperature=0.5, mixture=mixture)
    return CoupledModel(emulator, MindReadingStudent(lm(arch, tokenizer, seed=2))).eval()


@pytest.mark.parametrize("arch, mixture", [(ARCHS[0], "soft"), (ARCHS[1], "soft"), (ARCHS[0], "token")])
def test_saved_stages_reload_and_give_identical_outputs(arch, mixture, toy, tmp_path):
    tokenizer, layout, data = toy
    model = coupled_model(arch, tokenizer, mixture)
    emulator_meta = {"method": "kd", "kd_stage": "emulator", "mixture_size": 3, "softmax_temperature": 0.5}
    if mixture == "token":  # without the key: a soft emulator of icot 0.1
        emulator_meta["mixture"] = mixture
    model.student.save(tokenizer, tmp_path / "student", {"method": "kd", "kd_stage": "student"})
    model.emulator.save(tokenizer, tmp_path / "emulator", emulator_meta)
    model.save(tokenizer, tmp_path / "coupled", {"method": "kd", "kd_stage": "coupled"}, emulator_meta)
    batch = answer_only(full_batch(data, layout), layout.pad_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        thoughts = model.emulator(**inputs, positions=batch["first_sep"])
        assert torch.equal(load_emulator(tmp_path / "emulator").eval()(**inputs, positions=batch["first_sep"]), thoughts)
        logits = model.student(thoughts=thoughts, thoughts_at=batch["first_sep"], **inputs).logits
        reloaded = load_student(tmp_path / "student").eval()
        assert torch.equal(reloaded(thoughts=thoughts, thoughts_at=batch["first_sep"], **inputs).logits, logits)
        coupled = model(thoughts_at=batch["first_sep"], **inputs).logits
        assert torch.equal(load_coupled(tmp_path / "coupled").eval()(thoughts_at=batch["first_sep"], **inputs).logits, coupled)
    predictor = load_predictor(tmp_path / "coupled")
    assert isinstance(predictor, KDPredictor)
    prompts = [data.prompt(i) for i in range(len(data))]
    assert predictor.generate(prompts, 6) == KDPredictor(model, tokenizer).generate(prompts, 6)
    # every LM part stays a plain Hugging Face model directory
    for part in ("student", "emulator", "coupled", "coupled/emulator"):
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / part)
        assert plain.config.model_type == model.student.lm.config.model_type


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_1_and_batched_inference_agree(arch, toy):
    tokenizer, layout, data = toy
    predictor = KDPredictor(coupled_model(arch, tokenizer), tokenizer)
    one = evaluate(predictor, data, batch_size=1, max_new_tokens=8, progress=False)
    many = evaluate(predictor, data, batch_size=16, max_new_tokens=8, progress=False)
    assert len(set(data.n_prompt.tolist())) == 2  # left padding is exercised
    assert one.predictions == many.predictions
    assert one.token_accuracy == pytest.approx(many.token_accuracy)


# ----- the pipeline through the CLI ----------------------------------------------------------------

STAGES = ("teacher", "student", "emulator", "couple")


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def kd_run(mult3_data, tmp_path_factory):
    """`icot train --method kd`, every stage of it, on 32 examples of 3x3 multiplication."""
    run = tmp_path_factory.mktemp("kd") / "run"
    code = run_cli("train", "--method", "kd", "--data", mult3_data, "--model", "micro", "--out", run, "--lr", "3e-3",
                   "--batch-size", "16", "--epochs", "20", "--teacher.epochs", "5", "--emulator.epochs", "10",
                   "--couple.lr-drop-step", "30", "--eval-every", "1000", "--log-every", "20")
    assert code == 0
    return run


def test_pipeline_trains_every_stage_and_the_final_model_answers_without_cot(kd_run, mult3_data):
    ends = {stage: records(kd_run / stage)[-1] for stage in STAGES}
    assert all(end["event"] == "end" for end in ends.values())
    assert [ends[s]["step"] for s in STAGES] == [10, 40, 20, 40]
    # normalised states have squared norm H, so predicting zeros would score L·H/2 = 128
    assert ends["emulator"]["test_emulation_loss"] < 0.05 * 128
    final = ends["couple"]
    assert final["test_accuracy"] > 0.5
    # no CoT at all: '####', the 6 answer digits and the EOS that ends the answer
    assert final["test_mean_generated_tokens"] == 7 + 1
    assert (kd_run / "best" / "emulator").is_dir() and not (kd_run / "couple" / "best").exists()
    for stage in ("teacher", "student", "emulator"):
        assert (kd_run / stage / "best" / "model.safetensors").exists()
    assert AutoModelForCausalLM.from_pretrained(kd_run / "best").config.n_layer == 2
    assert (kd_run / "plots" / "stages.png").stat().st_size > 10_000  # a panel per stage


def test_a_stage_drops_its_own_learning_rate(kd_run):
    def logged_lrs(stage):
        return [r["lr"] for r in records(kd_run / stage) if "loss" in r]

    assert logged_lrs("couple") == pytest.approx([3e-3, 3e-3 * 0.3])  # logged at steps 20 and 40; dropped from 30
    assert set(logged_lrs("student")) == {3e-3}  # 40 steps too, the top-level schedule


def test_final_model_reloads_with_identical_outputs_at_any_batch_size(kd_run, mult3_data):
    predictor = load_predictor(kd_run / "best")
    assert isinstance(predictor, KDPredictor)
    data = encode(predictor.tokenizer, predictor.layout, read_examples(mult3_data / "test.txt"))
    one = evaluate(predictor, data, batch_size=1, progress=False)
    many = evaluate(predictor, data, batch_size=32, progress=False)
    assert one.predictions == many.predictions
    assert all(p["cot"] == "" for p in one.predictions)
    final = records(kd_run / "couple")[-1]
    # the model saved at the best validation step answers the same 32 examples identically after reload
    assert one.accuracy == final["test_accuracy"] == final["best_val_accuracy"]
    # and it is the share of the 32 questions answered with their product, checked here
    assert one.accuracy == sum(map(product_is_right, one.predictions)) / 32


def test_eval_and_predict_commands(kd_run, mult3_data, capsys, tmp_path):
    from test_cli_errors import one_line_error

    result = checked_eval(capsys, kd_run / "best", mult3_data / "test.txt", tmp_path / "coupled.json", "--show", "1")
    assert result["accuracy"] == records(kd_run / "couple")[-1]["test_accuracy"] > 0.5
    assert "CoT" not in checked_predict(capsys, kd_run / "best", 123, 456)
    # the stage-(a) student answers in evaluation, reading the teacher's states of the gold CoT
    student = checked_eval(capsys, kd_run / "student" / "best", mult3_data / "test.txt", tmp_path / "student.json")
    assert student["accuracy"] == records(kd_run / "student")[-1]["test_accuracy"]
    assert "gold CoT" in one_line_error(capsys, run_cli("predict", "--model", kd_run / "student" / "best", "123*456"))
    assert "not answers" in one_line_error(capsys, run_cli("eval", "--model", kd_run / "emulator" / "best",
                                                           "--data", mult3_data / "test.txt"))


def test_predict_imports_no_training_code(kd_run):
    """ICoT-KD's loader (kd/predictor.py) needs its modules, not its stages' trainers."""
    assert not modules_after_predict(kd_run / "best", "123*456") & training_modules()


def tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_a_stage_runs_alone_from_saved_models(kd_run, mult3_data, tmp_path):
    out = tmp_path / "couple-only"
    assert run_cli("train", "--method", "kd", "--stage", "couple", "--data", mult3_data, "--out", out, "--lr", "3e-3",
                   "--batch-size", "16", "--student-dir", kd_run / "student" / "best", "--emulator-dir",
                   kd_run / "emulator" / "best", "--couple.freeze-emulator", "--eval-every", "1000") == 0
    assert records(out / "couple")[-1]["step"] == 2 and not (out / "teacher").exists()
    before_emulator, after_emulator = (tensors(d / "model.safetensors")
                                       for d in (kd_run / "emulator" / "best", out / "best" / "emulator"))
    assert all(torch.equal(before_emulator[k], after_emulator[k]) for k in before_emulator)
    before_student, after_student = (tensors(d / "model.safetensors") for d in (kd_run / "student" / "best", out / "best"))
    assert not all(torch.equal(before_student[k], after_student[k]) for k in before_student)
    meta = json.loads((out / "best" / "icot.json").read_text())
    assert meta["kd_stage"] == "coupled" and meta["freeze_emulator"] is True


def test_resume_skips_finished_stages_and_continues_the_interrupted_one(kd_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(kd_run, run)
    metrics = run / "couple" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:-1]) + "\n")  # as if interrupted after its last checkpoint
    before = {stage: (run / stage / "metrics.jsonl").read_text() for stage in STAGES[:3]}
    assert run_cli("train", "--resume", run, "--couple.epochs", "22") == 0
    assert {stage: (run / stage / "metrics.jsonl").read_text() for stage in STAGES[:3]} == before
    couple = records(run / "couple")
    resumed = [r for r in couple if r.get("event") == "resume"]
    assert resumed and resumed[0]["step"] == 40 and couple[-1]["event"] == "end" and couple[-1]["step"] == 44


def test_token_mixture_pipeline_and_the_depth_warning(mult3_data, tmp_path, capsys):
    run = tmp_path / "token"
    assert run_cli("train", "--method", "kd", "--data", mult3_data, "--model", "micro", "--out", run, "--lr", "3e-3",
                   "--batch-size", "16", "--epochs", "10", "--max-steps", "2", "--emulator.mixture", "token",
                   "--emulator.max-steps", "6", "--eval-every", "3") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("icot: warning: ICoT-KD")]
    assert len(warnings) == 1 and "only 0 of the 2 teacher states fall inside the CoT" in warnings[0]
    emulator = records(run / "emulator")
    validations = [r for r in emulator if r.get("event") == "validation"]
    assert [r["step"] for r in validations] == [3, 6]
    # two layers, dynamic delta: t_0 and t_1 are the two SEPs, so every teacher token is SEP, a
    # constant the token mixture has learned to choose by its last check
    assert validations[-1]["val_thought_token_accuracy"] == emulator[-1]["test_thought_token_accuracy"] == 1.0
    for meta in (run / "emulator" / "best" / "icot.json", run / "best" / "emulator" / "icot.json"):
        assert json.loads(meta.read_text())["mixture"] == "token"
    assert load_predictor(run / "best").model.emulator.mixture == "token"
    # six layers spread over 3x3's CoT: no warning
    assert run_cli("train", "--method", "kd", "--data", mult3_data, "--model", "micro-deep", "--out", tmp_path / "deep",
                   "--batch-size", "16", "--max-steps", "1", "--eval-every", "1000", "--stage", "teacher") == 0
    assert "ICoT-KD" not in capsys.readouterr().err


def test_student_and_emulator_can_start_from_the_teacher(kd_run, mult3_data, tmp_path):
    teacher = tensors(kd_run / "teacher" / "best" / "model.safetensors")
    for stage in ("student", "emulator"):
        out = tmp_path / stage
        assert run_cli("train", "--method", "kd", "--stage", stage, "--teacher-dir", kd_run / "teacher" / "best",
                       "--data", mult3_data, "--out", out, "--max-steps", "1", "--lr", "1e-9", "--eval-every", "1000",
                       f"--{stage}.init-from-teacher") == 0
        started = tensors(out / "best" / "model.safetensors")
        assert all(torch.allclose(started[k], teacher[k], atol=1e-6) for k in teacher)
    fresh = tensors(kd_run / "student" / "best" / "model.safetensors")
    assert not all(torch.allclose(fresh[k], teacher[k], atol=1e-6) for k in teacher)


def test_pipeline_runs_on_a_llama_model(mult3_data, tmp_path):
    data, run = tmp_path / "data", tmp_path / "llama"
    data.mkdir()
    lines = (mult3_data / "train.txt").read_text().splitlines(keepends=True)
    (data / "train.txt").write_text("".join(lines))
    (data / "valid.txt").write_text("".join(lines[:8]))  # no test file: no test evaluation per stage
    assert run_cli("train", "--method", "kd", "--data", data, "--model", "tiny-llama", "--out", run, "--lr", "3e-3",
                   "--batch-size", "16", "--max-steps", "2", "--eval-every", "1000", "--max-new-tokens", "8") == 0
    assert [records(run / stage)[-1]["step"] for stage in STAGES] == [2, 2, 2, 2]
    predictor = load_predictor(run / "best")
    assert predictor.model.student.lm.config.model_type == "llama"
    data = encode(predictor.tokenizer, predictor.layout, read_examples(mult3_data / "test.txt")[:8])
    one = evaluate(predictor, data, batch_size=1, max_new_tokens=8, progress=False)
    assert one.predictions == evaluate(predictor, data, batch_size=8, max_new_tokens=8, progress=False).predictions


@pytest.mark.parametrize("args, fragment", [
    (["--delta", "fast"], "delta must be 'dynamic' or a positive integer, got 'fast'"),
    (["--delta", "0"], "delta must be 'dynamic' or a positive integer"),
    (["--subset", "middle"], "'middle' is not one of diagonal, first_column"),
    (["--stage", "student"], "stage 'student' needs teacher_dir"),
    (["--stage", "magic"], "'magic' is not one of all, teacher"),
    (["--emulator.mixture-size", "0"], "emulator.mixture_size must be at least 1"),
    (["--emulator.softmax-temperature", "0"], "emulator.softmax_temperature must be positive"),
    (["--emulator.mixture", "hard"], "'hard' is not one of soft, token"),
    (["--emulator.mixture", "token", "--emulator.mixture-size", "4"], "the token mixture has one component per"),
    (["--emulator.token-loss-weight", "-1"], "token_loss_weight must not be negative"),
    (["--student.lr", "-1"], "student.lr must be positive"),
    (["--couple.lr-drop-step", "0"], "couple.lr_drop_step must be at least 1"),
    (["--couple.lr-drop-factor", "2"], "couple.lr_drop_factor must be in (0, 1], got 2"),
    (["--student.init-from-teacher", "--student.model", "tiny"], "student.model and student.init_from_teacher both"),
    (["--couple.epochs", "2.5"], "epochs: expected an integer"),
    (["--teacher.learning-rate", "1"], "unknown key 'learning_rate'"),
    (["--teacher-dir", "no/such/dir"], "teacher_dir no/such/dir is not a directory"),
])
def test_bad_config_values_are_one_line_errors(tmp_path, capsys, args, fragment):
    from test_cli_errors import one_line_error

    (tmp_path / "train.txt").write_text("1 * 2||2 #### 2\n")
    line = one_line_error(capsys, run_cli("train", "--method", "kd", "--data", tmp_path, "--out", tmp_path / "r", *args))
    assert fragment in line


def test_saved_models_of_the_wrong_kind_are_refused(kd_run, tmp_path, capsys):
    from test_cli_errors import one_line_error

    (tmp_path / "train.txt").write_text("1 * 2||2 #### 2\n")
    line = one_line_error(capsys, run_cli("train", "--method", "kd", "--stage", "couple", "--data", tmp_path, "--out",
                                          tmp_path / "r", "--student-dir", kd_run / "teacher" / "best",
                                          "--emulator-dir", kd_run / "emulator" / "best"))
    assert "not an ICoT-KD student (its icot.json says explicit)" in line
    line = one_line_error(capsys, run_cli("train", "--method", "kd", "--stage", "student", "--data", tmp_path, "--out",
                                          tmp_path / "r2", "--teacher-dir", kd_run / "teacher" / "best", "--model", "tiny"))
    assert "has 2 layers of width 256 but teacher" in line and "same number of layers and hidden size" in line
