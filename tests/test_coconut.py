"""Coconut (methods/coconut.py, coconut_model.py): steps, the curriculum's rows, continuous thoughts, the run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (checked_eval, checked_predict, modules_after_predict, mult_examples, product_is_right, run_cli,
                      same_number, stopped_during, thought_toy, training_modules)
from test_cli_errors import one_line_error

from icot.cli import build_train_config
from icot.data.format import Example
from icot.data.steps import resolve_kind, step_texts, token_step_ends
from icot.data.tokenizers import word_tokenizer
from icot.methods.coconut import CoconutTrainer
from icot.methods.coconut_model import removed_and_thoughts
from icot.methods.thoughts import (ThoughtLM, continuous_forward, generate_with_thoughts,
                                   thought_batch)
from icot.models import build_preset
from icot.trainer import TrainingInterrupted

ARCHS = ["micro", "tiny-llama"]


# ----- steps ------------------------------------------------------------------------------------

def test_multiplication_steps_are_partial_products_and_running_sums():
    cot_3x3 = "8 3 7 0 + 0 5 1 6 0 ( 8 8 8 6 0 ) + 0 0 2 9 4 0"
    assert step_texts(cot_3x3, "mult") == ["8 3 7 0", "+ 0 5 1 6 0", "( 8 8 8 6 0 )", "+ 0 0 2 9 4 0"]
    four = mult_examples(4, 4, 5, seed=0)
    for e in four:
        steps = step_texts(e.cot, "mult")
        assert len(steps) == 6 and " ".join(steps) == e.cot  # 4 partial products, 2 running sums
        assert [s[0] for s in steps[1:]] == ["+", "(", "+", "(", "+"]
    assert step_texts("8 6 3 + 0 2 5 5", "mult") == ["8 6 3", "+ 0 2 5 5"]  # 2x2: no running sum


def test_gsm8k_and_separator_steps_and_auto_detection():
    assert step_texts("<<16-3-4=9>> <<9*2=18>>", "gsm8k") == ["<<16-3-4=9>>", "<<9*2=18>>"]
    assert step_texts("a b ; c ; d", "separator", " ; ") == ["a b ;", "c ;", "d"]
    assert resolve_kind("auto", mult_examples(3, 3, 4, seed=0), None) == "mult"
    assert resolve_kind("auto", [Example("q", "<<1+1=2>> <<2*2=4>>", "4")], None) == "gsm8k"
    from icot.errors import UserError

    with pytest.raises(UserError, match="set steps"):
        resolve_kind("auto", [Example("q", "first then second", "4")], None)


def test_token_step_ends_count_tokens_up_to_each_step():
    examples = mult_examples(3, 3, 3, seed=0)
    tokenizer = word_tokenizer([e.cot for e in examples])
    ends = token_step_ends(tokenizer, [e.cot for e in examples], "mult")
    assert ends == [[4, 10, 17, 24]] * 3  # 4 digits; "+" 5 digits; "(" 5 digits ")"; "+" 6 digits
    assert token_step_ends(tokenizer, [""], "mult") == [[]]


# ----- the curriculum's rows --------------------------------------------------------------------

def test_stage_k_replaces_the_first_k_steps_and_pads_thoughts_past_the_last_stage():
    ends = [4, 10, 17, 24]
    assert removed_and_thoughts(0, ends, 2, 3) == (0, 0)
    assert removed_and_thoughts(1, ends, 2, 3) == (4, 2)
    assert removed_and_thoughts(3, ends, 2, 3) == (17, 6)
    assert removed_and_thoughts(4, ends, 2, 3) == (24, 6)  # every step gone, max_latent_stage * c thoughts
    assert removed_and_thoughts(9, ends, 2, 3) == (24, 6)
    assert removed_and_thoughts(3, [4, 10], 2, 3) == (10, 6)  # fewer steps than the stage: all gone, stage * c


@pytest.fixture(scope="module")
def toy():
    return thought_toy()


def lm(arch, tokenizer, seed=0):
    torch.manual_seed(seed)
    return build_preset(arch, len(tokenizer), tokenizer.eos_token_id).eval()


def test_rows_hold_thoughts_between_markers_and_labels_only_after_them(toy):
    tokenizer, marks, layout, data = toy
    indices = [0, 4]  # a 3x3 row (prompt 8 tokens) and a 2x3 row (prompt 7 tokens)
    batch = thought_batch(data, indices, removed=[4, 0], thoughts=[2, 0], marks=marks, pad_id=layout.pad_id)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    bot = (ids == marks.begin).nonzero()[:, 1]
    assert bot.tolist() == [8, 8]  # the 2x3 row is left-padded by one: the markers line up
    assert mask[0, 0] == 1 and mask[1, 0] == 0
    assert ids[0, 9:11].tolist() == [marks.latent] * 2 and ids[0, 11] == marks.end
    row0 = data.row(0)
    kept = row0[data.n_prompt[0] + 4 :]  # the CoT without its first step (4 tokens), SEP, answer, EOS
    assert ids[0, 12 : 12 + len(kept)].tolist() == kept.tolist()
    assert (labels[0, :12] == -100).all() and labels[0, 12 : 12 + len(kept)].tolist() == kept.tolist()
    assert ids[1, 9] == marks.end and (labels[1, :10] == -100).all() and (labels[1, 10:] != -100).sum() == len(data.row(4)) - 7
    positions = batch["position_ids"]
    assert positions[1, 1].item() == 0 and positions[0, 8].item() == positions[1, 8].item() + 1


# ----- continuous thoughts ----------------------------------------------------------------------

def naive_logits(model, ids, mask, positions, latent_id):
    """No cache: fill each thought with the last hidden state before it, recomputing everything."""
    embeds = model.get_input_embeddings()(ids).clone()
    for col in sorted(set((ids == latent_id).nonzero()[:, 1].tolist())):
        hidden = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                       output_hidden_states=True).hidden_states[-1]
        rows = ids[:, col] == latent_id
        embeds[rows, col] = hidden[rows, col - 1]
    return model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_thoughts_are_the_previous_last_hidden_state_and_match_a_full_recompute(arch, toy):
    tokenizer, marks, layout, data = toy
    model = lm(arch, tokenizer)
    batch = thought_batch(data, [0, 4, 5], removed=[4, 10, 0], thoughts=[2, 4, 0], marks=marks, pad_id=layout.pad_id)
    calls = []
    hook = model.register_forward_hook(lambda m, args, kwargs, out: calls.append((kwargs["inputs_embeds"], out)),
                                       with_kwargs=True)
    with torch.no_grad():
        logits = continuous_forward(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                                    marks.latent).logits
    hook.remove()
    ids = batch["input_ids"]
    assert len(calls) == 1 + 4 + 1  # the prompt, one pass per thought column (the longest row has 4), the rest
    first = calls[0][0].shape[1]  # the prompt pass ends before the first thought column
    embeddings = model.get_input_embeddings()
    for j in range(1, 5):
        fed, col = calls[j][0][:, 0], first + j - 1
        previous = calls[j - 1][1].hidden_states[-1][:, -1]
        latent = ids[:, col] == marks.latent
        assert latent.any() and torch.equal(fed[latent], previous[latent])
        assert torch.equal(fed[~latent], embeddings(ids[~latent, col]))
    with torch.no_grad():
        reference = naive_logits(model, ids, batch["attention_mask"], batch["position_ids"], marks.latent)
    real = batch["attention_mask"].bool()
    assert torch.allclose(logits[real], reference[real], atol=1e-4)


def test_gradients_flow_through_the_thoughts_and_stay_finite(toy):
    tokenizer, marks, layout, data = toy
    model = lm("micro", tokenizer).train()
    batch = thought_batch(data, [0, 4], removed=[24, 10], thoughts=[3, 3], marks=marks, pad_id=layout.pad_id)
    embeds = []
    hook = model.register_forward_hook(lambda m, a, kw, out: embeds.append(kw["inputs_embeds"]), with_kwargs=True)
    logits = continuous_forward(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"], marks.latent).logits
    hook.remove()
    for fed in embeds[1:4]:
        fed.retain_grad()
    logits[batch["labels"] != -100].sum().backward()
    assert all(fed.grad is not None and fed.grad.abs().sum() > 0 for fed in embeds[1:4])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_thought_decoding_equals_one_row_at_a_time(arch, toy):
    tokenizer, marks, layout, data = toy
    model = lm(arch, tokenizer, seed=3)
    prompts = [data.prompt(i) for i in (0, 4, 1, 5)]  # two prompt lengths: left padding
    batched = generate_with_thoughts(model, prompts, marks, 3, layout.sep_id, layout.pad_id, 12)
    single = [generate_with_thoughts(model, [p], marks, 3, layout.sep_id, layout.pad_id, 12)[0] for p in prompts]
    assert batched == single and all(len(g) > 0 for g in batched)
    # decoding continues the teacher-forced computation: its first token is the argmax after <eot>
    batch = thought_batch(data, [0], removed=[24], thoughts=[3], marks=marks, pad_id=layout.pad_id)
    with torch.no_grad():
        logits = ThoughtLM(model, marks.latent)(batch["input_ids"], batch["attention_mask"], batch["position_ids"]).logits
    end_col = (batch["input_ids"][0] == marks.end).nonzero().item()
    assert logits[0, end_col].argmax().item() == single[0][0]


# ----- training runs ------------------------------------------------------------------------------

class RecordingTrainer(CoconutTrainer):
    """Records the AdamW state size at the start of every step, after any reset."""

    def on_step_begin(self):
        super().on_step_begin()
        self.__dict__.setdefault("state_sizes", []).append(len(self.optimizer.optimizer.state))


COMMON = ["--model", "micro", "--lr", "3e-3", "--batch-size", "8", "--c-thought", "1", "--max-latent-stage", "2",
          "--epochs-per-stage", "1", "--log-every", "1", "--seed", "5"]


def train(data, out, *extra, cls=CoconutTrainer):
    _, config = build_train_config(None, "coconut", ["--data", str(data), "--out", str(out), *COMMON, *map(str, extra)])
    trainer = cls(config)
    trainer.fit()
    return trainer, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def coconut_run(mult3_data, tmp_path_factory):
    # 32 examples, batch 8: 4 steps per epoch and per stage; stages 0, 1, 2, 3 (final) over 4 epochs
    out = tmp_path_factory.mktemp("coconut") / "run"
    trainer, records = train(mult3_data, out, "--epochs", "4", "--eval-every", "2", cls=RecordingTrainer)
    return out, trainer, records


def test_stages_advance_with_an_optimizer_reset_at_each_change(coconut_run):
    _, trainer, records = coconut_run
    events = [(r["step"], r["stage"], r["optimizer_reset"]) for r in records if r.get("event") == "stage"]
    assert events == [(4, 1, True), (8, 2, True), (12, 3, True)]
    sizes = trainer.state_sizes
    assert [sizes[s] for s, _, _ in events] == [0, 0, 0] and all(sizes[s + 1] > 0 for s, _, _ in events)
    assert [r["stage"] for r in records if "loss" in r] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4


def test_best_model_is_from_the_final_stage_and_reloads_as_a_plain_hf_model(coconut_run, mult3_data):
    from transformers import AutoModelForCausalLM

    from icot.evaluate import evaluate
    from icot.methods import load_predictor

    out, trainer, records = coconut_run
    meta = json.loads((out / "best" / "icot.json").read_text())
    assert meta["method"] == "coconut" and meta["coconut_stage"] == 3 and meta["thoughts"] == 2 and meta["steps"] == "mult"
    assert meta["step"] in (14, 16)  # validated every 2 steps; the final stage starts after step 12
    hf = AutoModelForCausalLM.from_pretrained(out / "best")
    assert hf.get_input_embeddings().num_embeddings == meta["thought_tokens"]["latent"] + 1
    # the saved model, reloaded, gives the run's own test result
    end = records[-1]
    predictor = load_predictor(out / "best")
    result = evaluate(predictor, trainer.test_data, 7, progress=False)
    assert result.accuracy == end["test_accuracy"] and result.token_accuracy == pytest.approx(end["test_token_accuracy"])
    # and it is the share of the 32 questions answered with their product, checked here
    assert result.accuracy == sum(map(product_is_right, result.predictions)) / 32
    live = trainer.predictor(predictor.model)
    prompts = [trainer.test_data.prompt(i) for i in range(5)]
    assert live.generate(prompts, 20) == predictor.generate(prompts, 20)


def test_eval_and_predict_commands_run_the_saved_model(coconut_run, mult3_data, capsys, tmp_path):
    out, _, records = coconut_run
    result = checked_eval(capsys, out / "best", mult3_data / "test.txt", tmp_path / "eval.json")
    assert result["accuracy"] == records[-1]["test_accuracy"]  # what the run measured on its best model
    checked_predict(capsys, out / "best", 123, 456)


def test_predict_imports_no_training_code(coconut_run):
    """The registry's loader of a Coconut model lives apart from its trainer (coconut_model.py)."""
    out, _, _ = coconut_run
    assert not modules_after_predict(out / "best", "123*456") & training_modules()





@pytest.mark.parametrize("mixing", ["0.0", "0.5"])
def test_resumed_run_matches_an_uninterrupted_one(mult3_data, tmp_path, mixing):
    common = ["--uniform-prob", mixing, "--save-every", "5", "--eval-every", "6", "--epochs", "4"]
    _, full = train(mult3_data, tmp_path / "full", *common)
    with pytest.raises(TrainingInterrupted):
        train(mult3_data, tmp_path / "half", *common, cls=stopped_during(CoconutTrainer, 8))
    assert run_cli("train", "--resume", tmp_path / "half") == 0
    resumed = [json.loads(line) for line in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()]
    losses = lambda rs: [(r["step"], r["stage"], round(r["loss"], 5)) for r in rs if "loss" in r]
    assert losses(resumed) == losses(full) and len(losses(full)) == 16
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / run / "best" / "model.safetensors") for run in ("full", "half"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_uniform_mixing_gives_rows_of_earlier_stages(mult3_data, tmp_path):
    _, config = build_train_config(None, "coconut", ["--data", str(mult3_data), "--out", str(tmp_path / "r"), *COMMON,
                                                      "--uniform-prob", "1.0"])
    trainer = CoconutTrainer(config)
    trainer.stage = 3
    stages = trainer.row_stages(400, [4] * 400)
    assert set(stages) == {0, 1, 2, 3, 4} and abs(stages.count(0) - 80) < 30
    trainer.config.uniform_prob = 0.0
    assert set(trainer.row_stages(50, [4] * 50)) == {3}


def test_a_run_that_ends_before_the_final_stage_is_refused_before_training(mult3_data, tmp_path, capsys):
    """The defaults (1 epoch, 3 epochs a stage) never reach the last stage: no stage-0 model is saved as Coconut's."""
    out = tmp_path / "default"
    line = one_line_error(capsys, run_cli("train", "--method", "coconut", "--data", mult3_data, "--model", "micro",
                                          "--out", out))
    assert "final stage 4" in line and "starts at step 12" in line and "expected max_steps above 12" in line
    assert not (out / "checkpoints").exists() and not (out / "best").exists()


def test_llama_shape_trains_and_answers(mult3_data, tmp_path, capsys):
    out = tmp_path / "llama"
    assert run_cli("train", "--method", "coconut", "--data", mult3_data, "--out", out, *COMMON[2:], "--model",
                   "tiny-llama", "--epochs", "4", "--max-steps", "14") == 0
    meta = json.loads((out / "best" / "icot.json").read_text())
    assert meta["coconut_stage"] == 3 and meta["thoughts"] == 2
    checked_eval(capsys, out / "best", mult3_data / "test.txt", tmp_path / "eval.json")


@pytest.mark.parametrize("args, fragment", [
    (["--c-thought", "0"], "c_thought and max_latent_stage must be at least 1"),
    (["--steps", "separator"], "steps 'separator' needs step_separator"),
    (["--steps", "lines"], "'lines' is not one of auto, gsm8k, mult, separator"),
    (["--uniform-prob", "2"], "uniform_prob must be in [0, 1]"),
    (["--reset-optimizer", "always"], "'always' is not one of stage, epoch, never"),
    (["--first-stage", "9"], "first_stage must be in 0..max_latent_stage+1"),
])
def test_bad_config_values_are_one_line_errors(tmp_path, capsys, args, fragment):
    from test_cli_errors import one_line_error

    (tmp_path / "train.txt").write_text("1 * 2||2 #### 2\n")
    line = one_line_error(capsys, run_cli("train", "--method", "coconut", "--data", tmp_path, "--out", tmp_path / "r", *args))
    assert fragment in line


def test_cots_that_do_not_split_are_a_one_line_error(tmp_path, capsys):
    from test_cli_errors import one_line_error

    (tmp_path / "train.txt").write_text("what is it||first then second #### 4\n")
    line = one_line_error(capsys, run_cli("train", "--method", "coconut", "--data", tmp_path, "--model", "micro",
                                          "--out", tmp_path / "r"))
    assert "cannot tell how these CoTs split into steps" in line


def test_gsm8k_steps_with_a_bpe_tokenizer_train_and_answer(reference, tmp_path, capsys):
    """GSM8K's <<...>> steps end exactly at token boundaries of a byte-level BPE, and a stage-1
    model trains and answers on them."""
    from icot.data.format import read_examples
    from icot.data.tokenizers import load_tokenizer

    gsm8k, bpe = reference / "gsm8k", tmp_path / "bpe"
    assert run_cli("tokenizer", "train", "--data", gsm8k / "train_no_aug.txt", "--vocab-size", "1024", "--out", bpe) == 0
    examples = read_examples(gsm8k / "valid.txt")  # the <<...>> format (train_no_aug has prose CoTs)
    tokenizer = load_tokenizer(str(bpe))
    ends = token_step_ends(tokenizer, [e.cot for e in examples], "gsm8k")
    whole = tokenizer([e.cot for e in examples], add_special_tokens=False)["input_ids"]
    assert [len(e) for e in ends] == [e.cot.count("<<") for e in examples]
    assert all(e[-1] == len(w) and e == sorted(set(e)) for e, w in zip(ends, whole) if e)
    out = tmp_path / "run"
    assert run_cli("train", "--method", "coconut", "--train-file", gsm8k / "valid.txt", "--valid-file",
                   gsm8k / "test.txt", "--max-train-examples", 32, "--max-eval-examples", 4, "--model", "micro",
                   "--tokenizer", bpe, "--batch-size", 8, "--epochs", 3, "--epochs-per-stage", 1, "--max-latent-stage", 1,
                   "--max-new-tokens", 24,
                   "--out", out) == 0
    meta = json.loads((out / "best" / "icot.json").read_text())
    assert meta["steps"] == "gsm8k" and meta["coconut_stage"] == 2 and meta["thoughts"] == 2
    checked_eval(capsys, out / "best", gsm8k / "test.txt", tmp_path / "eval.json", "--max-examples", 4, right=same_number)
