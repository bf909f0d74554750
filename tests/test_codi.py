"""CODI (methods/codi.py, codi_model.py): the two tasks' rows, projected thoughts, distillation, the runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import (checked_eval, checked_predict, modules_after_predict, product_is_right, run_cli, stopped_during,
                      thought_toy, training_modules)
from torch import nn

from icot.cli import build_train_config
from icot.data.steps import token_step_ends
from icot.methods.thoughts import generate_with_thoughts, thought_batch
from icot.methods.codi import (CodiTrainer, answer_offset, answer_offsets, distill_columns, distillation_loss,
                               teacher_batch, teacher_cot_lengths)
from icot.methods.codi_model import CodiModel, projection_mlp
from icot.models import build_preset

ARCHS = ["micro", "tiny-llama"]
SHAPE = {"dim": 48, "dropout": 0.0, "layer_norm": True}


@pytest.fixture(scope="module")
def toy():
    return thought_toy()



def codi_model(arch, tokenizer, marks, seed=0, shape=SHAPE):
    torch.manual_seed(seed)
    lm = build_preset(arch, len(tokenizer), tokenizer.eos_token_id)
    return CodiModel(lm, marks.latent, shape).eval()


def both_tasks(toy, indices, thoughts=3):
    tokenizer, marks, layout, data = toy
    kept = teacher_cot_lengths(tokenizer, data, "mult", None)[indices]
    teacher = teacher_batch(data, indices, kept, layout.pad_id)
    student = thought_batch(data, indices, data.n_cot[indices].tolist(), [thoughts] * len(indices), marks, layout.pad_id)
    offsets = torch.from_numpy(answer_offsets(tokenizer, data)[indices])
    return teacher, student, *distill_columns(teacher, student, offsets, marks.end)


# ----- rows -----------------------------------------------------------------------------------------

def test_projection_is_the_authors_mlp():
    mlp = projection_mlp(32, 48, 0.1, layer_norm=True)
    assert [type(m) for m in mlp] == [nn.Dropout, nn.Linear, nn.GELU, nn.Linear, nn.LayerNorm]
    assert (mlp[1].in_features, mlp[1].out_features, mlp[3].out_features, mlp[0].p) == (32, 48, 32, 0.1)
    assert [type(m) for m in projection_mlp(32, 48, 0.0, layer_norm=False)][-1] is nn.Linear


def test_teacher_drops_the_last_step_and_both_tasks_distil_at_the_token_before_the_answer(toy):
    tokenizer, marks, layout, data = toy
    indices = [0, 4]  # 3x3 (4 steps) and 2x3 (2 steps)
    teacher, student, teacher_at, student_at = both_tasks(toy, indices)
    ends = token_step_ends(tokenizer, [data.examples[i].cot for i in indices], "mult")
    assert teacher["cot_len"].tolist() == [ends[0][-2], ends[1][-2]]
    mark = tokenizer.convert_tokens_to_ids("####")
    for b, i in enumerate(indices):
        row, n_prompt, n_cot = data.row(i).tolist(), int(data.n_prompt[i]), int(data.n_cot[i])
        kept = ends[b][-2]
        expected = row[: n_prompt + kept] + row[n_prompt + n_cot :]  # CoT without its last step, SEP #### answer EOS
        length = int(teacher["attention_mask"][b].sum())
        assert teacher["input_ids"][b, :length].tolist() == expected
        assert (teacher["labels"][b, :n_prompt] == -100).all() and (teacher["labels"][b, n_prompt:length] != -100).all()
        answer = tokenizer(data.examples[i].answer, add_special_tokens=False)["input_ids"]
        for rows, at in ((teacher, teacher_at), (student, student_at)):
            assert rows["input_ids"][b, at[b]] == mark
            assert rows["input_ids"][b, at[b] + 1 : at[b] + 1 + len(answer)].tolist() == answer
    assert (student["input_ids"] == marks.latent).sum(1).tolist() == [3, 3]


class _Pieces:
    """A stand-in tokenizer: decode joins the pieces (a Llama tokenizer may give '####' then a lone space)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_the_distilled_token_skips_a_lone_space_after_the_mark():
    assert answer_offset(_Pieces(["####", " ", "1", "8"]), (0, 1, 2, 3)) == 1
    assert answer_offset(_Pieces(["####", " 18"]), (0, 1)) == 0
    assert answer_offset(_Pieces(["##", "##", " 1", "8"]), (0, 1, 2, 3)) == 1


# ----- thoughts and the distillation --------------------------------------------------------------

def naive_student_logits(model, ids, mask, positions, latent_id):
    """No cache: fill each thought with the projected last hidden state before it, recomputing all."""
    embeds = model.lm.get_input_embeddings()(ids).clone()
    for col in sorted(set((ids == latent_id).nonzero()[:, 1].tolist())):
        hidden = model.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                          output_hidden_states=True).hidden_states[-1]
        rows = ids[:, col] == latent_id
        embeds[rows, col] = model.projection(hidden[rows, col - 1])
    return model.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_thoughts_are_the_projected_previous_state(arch, toy):
    tokenizer, marks, layout, data = toy
    model = codi_model(arch, tokenizer, marks)
    teacher, student, _, _ = both_tasks(toy, [0, 4, 5])
    with torch.no_grad():
        _, out = model(teacher, student)
        reference = naive_student_logits(model, student["input_ids"], student["attention_mask"], student["position_ids"],
                                         marks.latent)
        model.projection = None  # raw states instead: a different computation
        _, raw = model(teacher, student)
    real = student["attention_mask"].bool()
    assert torch.allclose(out.logits[real], reference[real], atol=1e-4)
    assert not torch.allclose(out.logits[real], raw.logits[real], atol=1e-2)
    assert len(out.hidden_states) == model.num_layers + 1 and out.hidden_states[0].shape[1] == student["input_ids"].shape[1]


def test_distillation_is_smooth_l1_over_teacher_std_averaged_over_layers():
    torch.manual_seed(0)
    student = [torch.randn(3, 5, 8, requires_grad=True) for _ in range(2)]
    teacher = [torch.randn(3, 6, 8, requires_grad=True) for _ in range(2)]
    s_at, t_at = torch.tensor([0, 4, 2]), torch.tensor([5, 1, 3])
    loss = distillation_loss(student, teacher, s_at, t_at)
    rows = torch.arange(3)
    expected = sum(nn.functional.smooth_l1_loss(s[rows, s_at], t[rows, t_at]) / t[rows, t_at].std()
                   for s, t in zip(student, teacher)) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    l2 = distillation_loss(student, teacher, s_at, t_at, kind="l2")
    expected_l2 = sum(nn.functional.mse_loss(s[rows, s_at], t[rows, t_at]) / t[rows, t_at].var()
                      for s, t in zip(student, teacher)) / 2
    assert l2.item() == pytest.approx(expected_l2.item(), rel=1e-5)
    loss.backward()
    assert all(t.grad is None for t in teacher) and all(s.grad.abs().sum() > 0 for s in student)


def test_the_distillation_gradient_does_not_reach_the_teacher_side(toy):
    """The distillation's gradient equals the one with teacher states computed without gradient
    (the authors' separate no_grad pass), and it differs from an undetached one."""
    tokenizer, marks, layout, data = toy
    teacher, student, teacher_at, student_at = both_tasks(toy, [0, 4, 1])
    model = codi_model("micro", tokenizer, marks, seed=2)

    def gradient(teacher_states_of):
        model.zero_grad()
        teacher_out, student_out = model(teacher, student)
        loss = distillation_loss(student_out.hidden_states, teacher_states_of(teacher_out), student_at, teacher_at)
        assert torch.isfinite(loss) and loss > 0
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    ours = gradient(lambda out: out.hidden_states)
    with torch.no_grad():
        frozen = model.lm(**{k: teacher[k] for k in ("input_ids", "attention_mask", "position_ids")},
                          output_hidden_states=True).hidden_states
    assert torch.allclose(ours, gradient(lambda out: frozen), atol=1e-6)
    assert model.projection[1].weight.grad.abs().sum() > 0  # the student side learns through the thoughts

    class Undetached(torch.Tensor):
        def detach(self):
            return self

    leaking = gradient(lambda out: [h.as_subclass(Undetached) for h in out.hidden_states])
    assert not torch.allclose(ours, leaking, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_decoding_equals_one_row_at_a_time_and_continues_teacher_forcing(arch, toy):
    tokenizer, marks, layout, data = toy
    model = codi_model(arch, tokenizer, marks, seed=3)
    prompts = [data.prompt(i) for i in (0, 4, 1, 5)]  # two prompt lengths: left padding
    run = lambda ps: generate_with_thoughts(model.lm, ps, marks, 3, layout.sep_id, layout.pad_id, 12, model.projection)
    batched, single = run(prompts), [run([p])[0] for p in prompts]
    assert batched == single and all(len(g) > 0 for g in batched)
    _, student, _, _ = both_tasks(toy, [0])
    with torch.no_grad():
        logits = model.thought_lm()(student["input_ids"], student["attention_mask"], student["position_ids"]).logits
    end_col = (student["input_ids"][0] == marks.end).nonzero().item()
    assert logits[0, end_col].argmax().item() == single[0][0]


# ----- training runs ------------------------------------------------------------------------------

COMMON = ["--model", "micro", "--batch-size", "8", "--thoughts", "2", "--projection-dim", "64", "--log-every", "1",
          "--seed", "5"]


def train(data, out, *extra, cls=CodiTrainer):
    _, config = build_train_config(None, "codi", ["--data", str(data), "--out", str(out), *COMMON, *map(str, extra)])
    trainer = cls(config)
    trainer.fit()
    return trainer, records(out)


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_files(folder, *splits):
    return [arg for split in splits for arg in (f"--{split}-file", folder / f"{split}.txt")]


@pytest.fixture(scope="module")
def codi_run(mult3_data, tmp_path_factory):
    """12 steps without a valid set: the saved model is the last one."""
    out = tmp_path_factory.mktemp("codi") / "run"
    _, config = build_train_config(None, "codi", [*map(str, train_files(mult3_data, "train", "test")), "--out", str(out),
                                                   *COMMON, "--epochs", "3"])
    trainer = CodiTrainer(config)
    trainer.fit()
    return out, trainer, records(out)


def test_the_three_loss_parts_are_logged_and_weighted_into_the_loss(codi_run):
    _, _, logged = codi_run
    steps = [r for r in logged if "loss" in r]
    assert len(steps) == 12
    for r in steps:
        parts = [r["teacher_ce"], r["student_ce"], r["distill"]]
        assert all(torch.isfinite(torch.tensor(p)) and p > 0 for p in parts)
        assert r["loss"] == pytest.approx(sum(parts), rel=1e-4)
    assert steps[-1]["student_ce"] < steps[0]["student_ce"] and steps[-1]["teacher_ce"] < steps[0]["teacher_ce"]
    lrs = [r["lr"] for r in steps]  # 3% of 12 steps: no warm-up; then cosine decay
    assert lrs[0] == pytest.approx(3e-3) and all(a > b for a, b in zip(lrs, lrs[1:]))


def test_learning_rate_warms_up_decays_by_cosine_then_drops(mult3_data, tmp_path):
    trainer_cls, config = build_train_config(None, "codi", ["--data", str(mult3_data), "--out", str(tmp_path / "r"),
                                                            "--warmup-ratio", "0.2", "--lr-drop-step", "8",
                                                            "--lr-drop-factor", "0.5"])
    trainer = trainer_cls(config)
    trainer.total_steps = 10  # warm-up: 2 steps; cosine over the other 8
    cosine = [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    expected = [0.5, 1.0] + cosine[:6] + [c * 0.5 for c in cosine[6:]]
    assert [trainer.lr_factor(step) for step in range(10)] == pytest.approx(expected)


def test_saved_model_reloads_and_predicts_as_the_live_one(codi_run):
    from transformers import AutoModelForCausalLM

    from icot.evaluate import evaluate
    from icot.methods import load_predictor

    out, trainer, logged = codi_run
    best = out / "best"
    meta = json.loads((best / "icot.json").read_text())
    assert meta["method"] == "codi" and meta["thoughts"] == 2 and meta["projection"]["dim"] == 64
    assert (best / "codi_projection.safetensors").is_file() and "CODI" in (best / "README.md").read_text()
    hf = AutoModelForCausalLM.from_pretrained(best)
    assert hf.get_input_embeddings().num_embeddings == meta["thought_tokens"]["latent"] + 1
    predictor = load_predictor(best)
    result = evaluate(predictor, trainer.test_data, 7, progress=False)
    end = logged[-1]
    assert result.accuracy == end["test_accuracy"] and result.token_accuracy == pytest.approx(end["test_token_accuracy"])
    # and it is the share of the 32 questions answered with their product, checked here
    assert result.accuracy == sum(map(product_is_right, result.predictions)) / 32
    live = trainer.predictor(trainer.accelerator.unwrap_model(trainer.model_wrapped))
    prompts = [trainer.test_data.prompt(i) for i in range(6)]
    assert meta["step"] == end["step"] == 12 and live.generate(prompts, 20) == predictor.generate(prompts, 20)
    # the reloaded projection is the trained one, and it is used: without it the logits change
    live_weights = live.model.project.state_dict()
    assert all(torch.equal(v, live_weights[k]) for k, v in predictor.model.project.state_dict().items())
    batch = predictor.teacher_forced(trainer.test_data, list(range(4)))
    with torch.no_grad():
        with_projection = predictor.model(**batch).logits
        predictor.model.project = None
        assert not torch.allclose(predictor.model(**batch).logits, with_projection, atol=1e-3)


def test_eval_and_predict_commands_run_the_saved_model(codi_run, mult3_data, capsys, tmp_path):
    out, _, logged = codi_run
    result = checked_eval(capsys, out / "best", mult3_data / "test.txt", tmp_path / "eval.json")
    assert result["accuracy"] == logged[-1]["test_accuracy"]  # what the run measured on its saved model
    checked_predict(capsys, out / "best", 123, 456)


def test_predict_imports_no_training_code(codi_run):
    """The registry's loader of a CODI model lives apart from its trainer (codi_model.py)."""
    out, _, _ = codi_run
    assert not modules_after_predict(out / "best", "123*456") & training_modules()





def test_resumed_run_matches_an_uninterrupted_one(mult3_data, tmp_path):
    from safetensors.torch import load_file

    from icot.trainer import TrainingInterrupted

    common = ["--epochs", "3", "--eval-every", "5"]
    _, full = train(mult3_data, tmp_path / "full", *common)
    with pytest.raises(TrainingInterrupted):
        train(mult3_data, tmp_path / "half", *common, cls=stopped_during(CodiTrainer, 3))
    assert run_cli("train", "--resume", tmp_path / "half") == 0
    resumed = records(tmp_path / "half")
    steps = lambda rs: [(r["step"], r["lr"], round(r["loss"], 5), round(r["distill"], 5)) for r in rs if "loss" in r]
    assert steps(resumed) == steps(full) and len(steps(full)) == 12
    for name in ("model.safetensors", "codi_projection.safetensors"):
        a, b = (load_file(tmp_path / run / "best" / name) for run in ("full", "half"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_llama_shape_trains_and_answers(mult3_data, tmp_path, capsys):
    out = tmp_path / "llama"
    assert run_cli("train", "--method", "codi", "--data", mult3_data, "--out", out, *COMMON[2:], "--model",
                   "tiny-llama", "--max-steps", "4", "--include-last-step", "true", "--no-projection") == 0
    meta = json.loads((out / "best" / "icot.json").read_text())
    assert meta["projection"] is None and meta["steps"] is None
    checked_eval(capsys, out / "best", mult3_data / "test.txt", tmp_path / "eval.json")


@pytest.mark.parametrize("args, fragment", [
    (["--thoughts", "0"], "thoughts and projection_dim must be at least 1"),
    (["--projection-dim", "0"], "thoughts and projection_dim must be at least 1"),
    (["--projection-dropout", "1"], "projection_dropout must be in [0, 1)"),
    (["--warmup-ratio", "-0.1"], "warmup_ratio must be in [0, 1)"),
    (["--distill-loss-weight", "-1"], "loss weights must not be negative"),
    (["--student-loss-weight", "0"], "student_loss_weight must be positive"),
    (["--distill-loss", "cosine"], "'cosine' is not one of smooth_l1, l2"),
    (["--lr-schedule", "linear"], "'linear' is not one of cosine, constant"),
    (["--steps", "separator"], "steps 'separator' needs step_separator"),
])
def test_bad_config_values_are_one_line_errors(tmp_path, capsys, args, fragment):
    from test_cli_errors import one_line_error

    (tmp_path / "train.txt").write_text("1 * 2||2 #### 2\n")
    line = one_line_error(capsys, run_cli("train", "--method", "codi", "--data", tmp_path, "--out", tmp_path / "r", *args))
    assert fragment in line
