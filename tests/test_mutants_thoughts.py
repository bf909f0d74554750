"""Direct tests of methods/thoughts.py, methods/coconut.py and methods/codi.py for their mutants (issue 50):
fast calls with the expected rows, counts, losses and messages written out, or an independent reference
computation (a full recompute without the KV cache); micro models, no training run. docs/RESULTS.md,
"Mutation testing", lists the mutants each one kills."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from icot.data.format import Example
from icot.data.layout import Layout, encode
from icot.data.tokenizers import word_tokenizer
from icot.errors import UserError
from icot.methods.thoughts import (BEGIN, END, LATENT, ThoughtLM, ThoughtPredictor, ThoughtTokens, add_thought_tokens,
                                   check_thought_tokens, continuous_forward, generate_with_thoughts, thought_batch)
from icot.models import build_preset

IGNORE = -100
# two examples of different prompt lengths: `1 * 2 E 2 + 0 E #### 2 E` and `3 4 * 5 E 1 5 + 2 0 E #### 3 5 E`
# (E: the end-of-text token, SEP and EOS of a word tokenizer)
EXAMPLES = [Example("1 * 2", "2 + 0", "2"), Example("3 4 * 5", "1 5 + 2 0", "3 5")]


def toy_tokenizer(extra: str = ""):
    return word_tokenizer([f"{e.question} {e.cot} #### {e.answer}" for e in EXAMPLES] + [extra])


@pytest.fixture(scope="module")
def toy():
    """(tokenizer with the thought tokens, their ids, the encoded EXAMPLES, a micro GPT-2 with their rows)."""
    tokenizer = toy_tokenizer()
    torch.manual_seed(0)
    lm = build_preset("micro", len(tokenizer), tokenizer.eos_token_id)
    marks = add_thought_tokens(tokenizer, lm)
    return tokenizer, marks, encode(tokenizer, Layout.for_tokenizer(tokenizer), EXAMPLES), lm.eval()


def ids_of(tokenizer, words: str, marks: ThoughtTokens | None = None, pad: int | None = None) -> list[int]:
    """Token ids of space-separated words: E end of text, B, L, T the thought tokens, P `pad`, I IGNORE."""
    named = {"B": marks and marks.begin, "L": marks and marks.latent, "T": marks and marks.end, "P": pad, "I": IGNORE,
             "E": tokenizer.eos_token_id}
    return [named[w] if w in named else tokenizer.convert_tokens_to_ids(w) for w in words.split()]


# ----- thoughts.py: the tokens -------------------------------------------------------------------------

def test_thought_tokens_as_a_dict_in_field_order():
    assert ThoughtTokens(5, 6, 7).as_dict() == {"begin": 5, "end": 6, "latent": 7}
    assert list(ThoughtTokens(5, 6, 7).as_dict()) == ["begin", "end", "latent"]


def test_thought_tokens_are_added_as_special_tokens_with_rows_like_the_init_token():
    tokenizer = toy_tokenizer("<<")
    n = len(tokenizer)
    torch.manual_seed(0)
    lm = build_preset("micro", n, tokenizer.eos_token_id)
    marks = add_thought_tokens(tokenizer, lm)
    assert marks == ThoughtTokens(n, n + 1, n + 2) and len(tokenizer) == n + 3
    assert tokenizer.convert_ids_to_tokens([n, n + 1, n + 2]) == [BEGIN, END, LATENT]
    assert all(tokenizer.added_tokens_decoder[i].special for i in (n, n + 1, n + 2))
    assert tokenizer.decode([n, 5, n + 2], skip_special_tokens=True) == tokenizer.decode([5])
    weights = lm.get_input_embeddings().weight
    assert weights.shape[0] == n + 3
    source = weights[tokenizer.convert_tokens_to_ids("<<")]
    for new in (n, n + 1, n + 2):
        assert torch.equal(weights[new], source)
    assert not torch.equal(source, weights[tokenizer.eos_token_id])
    assert not weights.requires_grad or weights.grad is None
    assert lm.get_input_embeddings().weight.requires_grad  # set without autograd, still a parameter


def test_thought_tokens_start_as_the_end_of_text_row_where_the_init_token_is_unknown_or_several():
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = toy_tokenizer()  # no `<<`: the word tokenizer reads it as <unk>
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))
    tables = (lm.get_input_embeddings().weight, lm.get_output_embeddings().weight)
    assert tables[0].data_ptr() != tables[1].data_ptr()  # untied: both tables take the rows
    marks = add_thought_tokens(tokenizer, lm)
    tables = (lm.get_input_embeddings().weight, lm.get_output_embeddings().weight)
    for weights in tables:
        assert weights.shape[0] == len(tokenizer)
        for new in marks.as_dict().values():
            assert torch.equal(weights[new], weights[tokenizer.eos_token_id])
        assert not torch.equal(weights[tokenizer.unk_token_id], weights[tokenizer.eos_token_id])


def test_thought_tokens_already_there_are_kept_with_their_rows(capfd):
    tokenizer = toy_tokenizer("<<")
    torch.manual_seed(0)
    lm = build_preset("micro", len(tokenizer), tokenizer.eos_token_id)
    marks = add_thought_tokens(tokenizer, lm)
    with torch.no_grad():
        lm.get_input_embeddings().weight[marks.end] = 0.5
    n = len(tokenizer)
    assert add_thought_tokens(tokenizer, lm) == marks and len(tokenizer) == n
    assert (lm.get_input_embeddings().weight[marks.end] == 0.5).all()  # not set again
    bigger = build_preset("micro", n - 3, tokenizer.eos_token_id)  # the tokenizer has them, the model not yet
    mean = bigger.get_input_embeddings().weight.detach().mean(0)
    assert add_thought_tokens(tokenizer, bigger) == marks
    assert bigger.get_input_embeddings().num_embeddings == n
    # the model's own initialization for rows nobody sets, without transformers' mean resizing (and its warning)
    assert (bigger.get_input_embeddings().weight[-3:] - mean).abs().max() > 0.01
    assert capfd.readouterr().err == ""


def test_check_thought_tokens_compares_the_tokenizers_ids_with_the_records():
    tokenizer = toy_tokenizer()
    marks = add_thought_tokens(tokenizer, build_preset("micro", len(tokenizer), tokenizer.eos_token_id))
    check_thought_tokens(tokenizer, marks, "m")
    for wrong in (ThoughtTokens(marks.end, marks.begin, marks.latent), ThoughtTokens(marks.begin, marks.end, 0)):
        with pytest.raises(UserError) as error:
            check_thought_tokens(tokenizer, wrong, "models/x")
        assert str(error.value) == "models/x: the tokenizer's thought tokens differ from those in icot.json"


# ----- thoughts.py: the rows ---------------------------------------------------------------------------

def test_thought_batch_aligns_each_bot_and_labels_after_eot(toy):
    tokenizer, marks, data, _ = toy
    batch = thought_batch(data, [1, 0], [2, 3], [1, 2], marks, 99)
    assert list(batch) == ["input_ids", "attention_mask", "labels", "position_ids"]
    assert {v.dtype for v in batch.values()} == {torch.int64}
    ids = [ids_of(tokenizer, "3 4 * 5 E B L T + 2 0 E #### 3 5 E", marks),
           ids_of(tokenizer, "P 1 * 2 E B L L T E #### 2 E P P P", marks, 99)]
    assert batch["input_ids"].tolist() == ids
    assert batch["attention_mask"].tolist() == [[1] * 16, [0] + [1] * 12 + [0] * 3]
    assert batch["labels"].tolist() == [ids_of(tokenizer, "I I I I I I I I + 2 0 E #### 3 5 E"),
                                        ids_of(tokenizer, "I I I I I I I I I E #### 2 E I I I")]
    assert batch["position_ids"].tolist() == [list(range(16)), [0] + list(range(12)) + [11, 11, 11]]
    one = thought_batch(data, np.array([0]), [0], [0], marks, 99)  # nothing removed, no thought
    assert one["input_ids"].tolist() == [ids_of(tokenizer, "1 * 2 E B T 2 + 0 E #### 2 E", marks)]
    assert one["labels"].tolist() == [ids_of(tokenizer, "I I I I I I 2 + 0 E #### 2 E")]
    same_prompts = thought_batch(data, [0, 0], [3, 0], [2, 0], marks, 99)  # the longer row after the thoughts
    assert same_prompts["input_ids"].tolist() == [ids_of(tokenizer, "1 * 2 E B L L T E #### 2 E P", marks, 99),
                                                  ids_of(tokenizer, "1 * 2 E B T 2 + 0 E #### 2 E", marks)]


# ----- thoughts.py: the forward pass -----------------------------------------------------------------

def recomputed(lm, ids, mask, positions, latent_id, project=None):
    """No cache: each thought column filled in order from a full pass over the columns before it."""
    embeds = lm.get_input_embeddings()(ids)
    for col in sorted(set((ids == latent_id).nonzero()[:, 1].tolist())):
        state = lm(inputs_embeds=embeds[:, :col], attention_mask=mask[:, :col], position_ids=positions[:, :col],
                   output_hidden_states=True).hidden_states[-1][:, -1]
        fed = project(state) if project is not None else state
        embeds = torch.where((ids[:, col] == latent_id)[:, None, None] & (torch.arange(ids.shape[1]) == col)[None, :, None],
                             fed[:, None], embeds)
    return lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, output_hidden_states=True)


def calls_of(lm):
    """(columns, mask width, use_cache, output_hidden_states, a cache given) of each forward call of `lm`."""
    calls = []

    def hook(module, args, kwargs):
        width = kwargs["inputs_embeds"].shape[1] if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"].shape[1]
        given = kwargs.get("cache", kwargs.get("past_key_values")) is not None
        calls.append((width, kwargs["attention_mask"].shape[1], kwargs.get("use_cache"),
                      kwargs.get("output_hidden_states"), given))
    return calls, lm.register_forward_pre_hook(hook, with_kwargs=True)


def assert_same_at(mask, got, expected, atol=1e-5):
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("project", [False, True])
def test_continuous_forward_feeds_each_thought_the_state_before_it(toy, project):
    tokenizer, marks, data, lm = toy
    torch.manual_seed(1)
    projection = nn.Linear(128, 128) if project else None
    batch = thought_batch(data, [1, 0], [2, 3], [1, 2], marks, tokenizer.eos_token_id)  # thoughts in columns 6 and 7
    args = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    calls, handle = calls_of(lm)
    try:
        out = continuous_forward(lm, *args, marks.latent, projection, output_hidden_states=True)
        plain = continuous_forward(lm, *args, marks.latent, projection)
    finally:
        handle.remove()
    assert calls == [(6, 6, True, True, True), (1, 7, True, True, True), (1, 8, True, True, True),
                     (8, 16, True, True, True)] + [(6, 6, True, True, True), (1, 7, True, True, True),
                                                   (1, 8, True, True, True), (8, 16, True, False, True)]
    reference = recomputed(lm, *args, marks.latent, projection)
    mask = batch["attention_mask"]
    assert out.logits.shape == plain.logits.shape == (2, 16, len(tokenizer)) and plain.hidden_states is None
    assert_same_at(mask, out.logits, reference.logits)
    assert_same_at(mask, plain.logits, reference.logits)
    assert len(out.hidden_states) == 3
    for got, expected in zip(out.hidden_states, reference.hidden_states, strict=True):
        assert got.shape == (2, 16, 128)
        assert_same_at(mask, got, expected)
    without = continuous_forward(lm, *args, marks.latent, nn.Identity() if project else (lambda s: 2 * s))
    assert not torch.allclose(without.logits[mask.bool()], out.logits[mask.bool()], atol=1e-3)  # the thoughts count


def test_continuous_forward_gradients_flow_through_the_fed_back_states(toy):
    tokenizer, marks, data, lm = toy
    torch.manual_seed(1)
    projection = nn.Linear(128, 128)
    batch = thought_batch(data, [0, 1], [3, 2], [2, 1], marks, tokenizer.eos_token_id)
    args = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    continuous_forward(lm, *args, marks.latent, projection).logits[:, -1].sum().backward()
    got = projection.weight.grad.clone()
    projection.zero_grad()
    recomputed(lm, *args, marks.latent, projection).logits[:, -1].sum().backward()
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, projection.weight.grad, atol=1e-5, rtol=1e-4)
    lm.zero_grad()


def test_continuous_forward_without_thoughts_is_one_plain_pass_and_with_them_last_ends_there(toy):
    tokenizer, marks, data, lm = toy
    batch = thought_batch(data, [0, 1], [0, 0], [0, 0], marks, tokenizer.eos_token_id)
    args = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    calls, handle = calls_of(lm)
    try:
        out = continuous_forward(lm, *args, marks.latent, output_hidden_states=True)
        plain = continuous_forward(lm, *args, marks.latent)
        ids = batch["input_ids"][:, :8].clone()
        ids[:, -1] = marks.latent  # a thought in the last column: no pass after the thoughts
        last = continuous_forward(lm, ids, batch["attention_mask"][:, :8], batch["position_ids"][:, :8], marks.latent,
                                  output_hidden_states=True)
    finally:
        handle.remove()
    assert calls == [(17, 17, False, True, False), (17, 17, False, False, False), (7, 7, True, True, True),
                     (1, 8, True, True, True)]
    reference = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], output_hidden_states=True)
    mask = batch["attention_mask"]
    assert_same_at(mask, out.logits, reference.logits)
    assert_same_at(mask, plain.logits, reference.logits) and plain.hidden_states is None
    assert len(out.hidden_states) == 3
    for got, expected in zip(out.hidden_states, reference.hidden_states, strict=True):
        assert_same_at(mask, got, expected)
    expected = recomputed(lm, ids, batch["attention_mask"][:, :8], batch["position_ids"][:, :8], marks.latent)
    assert last.logits.shape == (2, 8, len(tokenizer))
    assert_same_at(batch["attention_mask"][:, :8], last.logits, expected.logits)
    assert [h.shape for h in last.hidden_states] == [(2, 8, 128)] * 3


def test_thought_lm_runs_the_continuous_forward_and_saves_the_plain_lm(toy, tmp_path):
    from transformers import AutoModelForCausalLM

    tokenizer, marks, data, lm = toy
    torch.manual_seed(2)
    projection = nn.Linear(128, 128)
    model = ThoughtLM(lm, marks.latent, projection)
    assert model.lm is lm and model.latent_id == marks.latent and model.project is projection
    assert ThoughtLM(lm, 7).project is None and ThoughtLM(lm, 7).latent_id == 7
    batch = thought_batch(data, [1, 0], [2, 3], [1, 2], marks, tokenizer.eos_token_id)
    out = model(batch["input_ids"], batch["attention_mask"], batch["position_ids"], labels=batch["labels"])
    expected = recomputed(lm, batch["input_ids"], batch["attention_mask"], batch["position_ids"], marks.latent, projection)
    assert_same_at(batch["attention_mask"], out.logits, expected.logits)
    assert out.hidden_states is None
    model.write(tokenizer, tmp_path / "m", {"thoughts": 3})
    assert json.loads((tmp_path / "m" / "icot.json").read_text()) == {"thoughts": 3}
    assert not (tmp_path / "m" / ThoughtLM.modules_file).exists()
    assert json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.get_input_embeddings().weight, lm.get_input_embeddings().weight)


# ----- thoughts.py: the predictor ----------------------------------------------------------------------

def test_thought_predictor_plans_the_whole_cot_and_teacher_forces_its_rows(toy):
    tokenizer, marks, data, lm = toy
    predictor = ThoughtPredictor(ThoughtLM(lm, marks.latent), tokenizer, cot_removed=math.inf, marks=marks, thoughts=2)
    assert predictor.n_thoughts == 2
    assert predictor.plan(data, [1, 0]) == ([5, 3], [2, 2])
    assert all(type(n) is int for n in predictor.plan(data, np.array([1]))[0])
    predictor.layout = Layout(sep_id=tokenizer.eos_token_id, bos_id=None, pad_id=98)
    batch = predictor.teacher_forced(data, [1, 0])
    expected = thought_batch(data, [1, 0], [5, 3], [2, 2], marks, 98)
    assert list(batch) == list(expected)
    for key in expected:
        assert torch.equal(batch[key], expected[key])
    assert batch["input_ids"][1, 0] == 98
    meta = ThoughtPredictor(build_preset("micro", len(tokenizer), 0).to("meta"), tokenizer, marks=marks, thoughts=1)
    assert {v.device.type for v in meta.teacher_forced(data, [0]).values()} == {"meta"}


def test_thought_predictor_generates_after_its_thoughts_with_its_projection(toy):
    tokenizer, marks, data, lm = toy
    torch.manual_seed(3)
    projection = nn.Linear(128, 128)
    predictor = ThoughtPredictor(ThoughtLM(lm, marks.latent, projection), tokenizer, marks=marks, thoughts=2)
    stop = tokenizer.convert_tokens_to_ids("####")
    predictor.layout = Layout(sep_id=stop, bos_id=None, pad_id=tokenizer.convert_tokens_to_ids("9"))
    prompts = [data.row(0)[:4].tolist(), data.row(1)[:5].tolist()]
    got = predictor.generate(prompts, 6)
    assert got == generate_with_thoughts(lm, prompts, marks, 2, stop, predictor.layout.pad_id, 6, projection)
    assert got != generate_with_thoughts(lm, prompts, marks, 2, stop, predictor.layout.pad_id, 6)
    assert got != generate_with_thoughts(lm, prompts, marks, 1, stop, predictor.layout.pad_id, 6, projection)
    assert got != generate_with_thoughts(lm, prompts, marks, 2, tokenizer.eos_token_id, predictor.layout.pad_id, 6,
                                         projection)
    assert max(map(len, got)) == 6


# ----- coconut.py ------------------------------------------------------------------------------------

def method_config(tmp_path, method: str, **settings):
    from icot.methods.codi import CodiConfig
    from icot.methods.coconut import CoconutConfig

    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "train.txt").write_text("1 * 2||2 + 0 #### 2\n")
    files = dict(train_file=str(tmp_path / "train.txt"), out=str(tmp_path / "run"))
    return {"coconut": CoconutConfig, "codi": CodiConfig}[method](**{**files, **settings})


@pytest.mark.parametrize("settings, message", [
    (dict(c_thought=0), "config: c_thought and max_latent_stage must be at least 1"),
    (dict(max_latent_stage=0), "config: c_thought and max_latent_stage must be at least 1"),
    (dict(epochs_per_stage=0.0), "config: epochs_per_stage must be positive, got 0.0"),
    (dict(epochs_per_stage=math.nan), "config: epochs_per_stage must be positive, got nan"),
    (dict(first_stage=-1), "config: first_stage must be in 0..max_latent_stage+1, got -1"),
    (dict(first_stage=5, max_latent_stage=3), "config: first_stage must be in 0..max_latent_stage+1, got 5"),
    (dict(uniform_prob=-0.01), "config: uniform_prob must be in [0, 1], got -0.01"),
    (dict(uniform_prob=1.01), "config: uniform_prob must be in [0, 1], got 1.01"),
    (dict(steps="separator"), "config: steps 'separator' needs step_separator (the string between two steps)"),
    (dict(out=None), "config: out is required (the run directory)"),
])
def test_coconut_settings_are_checked_with_one_line_errors(tmp_path, settings, message):
    with pytest.raises(UserError) as error:
        method_config(tmp_path, "coconut", **settings).validate()
    assert str(error.value) == message


@pytest.mark.parametrize("settings", [dict(), dict(c_thought=1, max_latent_stage=1, first_stage=2, uniform_prob=1.0),
                                      dict(first_stage=0, uniform_prob=0.0, epochs_per_stage=0.01),
                                      dict(steps="separator", step_separator=";")])
def test_coconut_settings_that_are_accepted(tmp_path, settings):
    method_config(tmp_path, "coconut", **settings).validate()


def test_the_curriculum_needs_a_cot_of_two_steps_and_a_step_at_the_last_latent_stage():
    from icot.methods.coconut import check_curriculum

    check_curriculum([[1, 3], [2, 5, 9]], ["a", "b"], "steps mult", 3)
    for ends in ([[4], [], [7]], []):
        with pytest.raises(UserError) as error:
            check_curriculum(ends, ["", "2 + 0", "x"], "steps separator ';'", 1)
        assert str(error.value) == ("steps separator ';': no training CoT splits into more than one step (e.g. '2 + 0'), "
                                    "so stage 1 would replace every whole CoT; expected steps that split it (mult for "
                                    "multiplication, gsm8k for <<...>> steps, or separator with a step_separator the "
                                    "CoTs hold)")
    with pytest.raises(UserError) as error:
        check_curriculum([[1, 3], [2, 5, 9]], ["a", "b"], "steps auto (mult)", 4)
    assert str(error.value) == ("max_latent_stage 4: the longest training CoT has 3 steps under steps auto (mult), so "
                                "stages past 3 have no step left to replace; expected at most 3")


def coconut_trainer(tmp_path, toy=None, **settings):
    from icot.methods.coconut import CoconutTrainer

    trainer = CoconutTrainer(method_config(tmp_path, "coconut", **settings), resume=True, best_dir=tmp_path / "b")
    if toy is not None:
        tokenizer, marks, data, _ = toy
        trainer.tokenizer, trainer.marks, trainer.layout = tokenizer, marks, Layout(tokenizer.eos_token_id, None, 97)
        trainer.train_data, trainer.step_ends, trainer.step_kind = data, [[1, 3], [2, 5]], "mult"
    return trainer


def test_a_coconut_trainer_starts_at_first_stage_and_passes_its_arguments_on(tmp_path):
    trainer = coconut_trainer(tmp_path, first_stage=2, max_latent_stage=4)
    assert (trainer.stage, trainer.resets, trainer.marks, trainer.step_kind, trainer.step_ends) == (2, 0, None, None, [])
    assert trainer.resume is True and trainer.best_dir == tmp_path / "b" and trainer.final_stage == 5
    assert type(trainer).keeps_examples is True and type(trainer).supports_gradient_checkpointing is False
    defaults = type(trainer)(trainer.config)
    assert defaults.resume is False and defaults.best_dir == tmp_path / "run" / "best"
    assert trainer.method_state() == {"stage": 2, "optimizer_resets": 0} and trainer.postfix() == {"stage": 2}
    trainer.load_method_state({"stage": 3, "optimizer_resets": 4})
    assert (trainer.stage, trainer.resets) == (3, 4)
    assert trainer.method_state() == {"stage": 3, "optimizer_resets": 4} and trainer.postfix() == {"stage": 3}


def test_coconut_builds_a_thought_lm_with_the_new_tokens(tmp_path):
    trainer = coconut_trainer(tmp_path)
    tokenizer = toy_tokenizer()
    lm = build_preset("micro", len(tokenizer), tokenizer.eos_token_id)
    model = trainer.build_model(tokenizer, lm)
    assert trainer.marks == ThoughtTokens(len(tokenizer) - 3, len(tokenizer) - 2, len(tokenizer) - 1)
    assert type(model) is ThoughtLM and model.lm is lm and model.latent_id == trainer.marks.latent
    assert model.project is None


def test_coconut_splits_the_training_cots_into_steps_and_checks_the_curriculum(tmp_path, toy):
    tokenizer, marks, _, _ = toy
    examples = [Example("1 * 2", "2 + 0", "2"), Example("3 4 * 5", "1 5 + 2 0 ; 7", "3 5")]
    trainer = coconut_trainer(tmp_path, steps="separator", step_separator=";", max_latent_stage=1)
    trainer.tokenizer, trainer.files = tokenizer, {"train": "train.txt"}
    trainer.train_data = encode(tokenizer, Layout.for_tokenizer(tokenizer), examples)
    trainer.prepare_data()
    assert trainer.step_kind == "separator" and trainer.step_ends == [[3], [6, 7]]
    assert trainer.train_data.examples is None
    mult = coconut_trainer(tmp_path, max_latent_stage=2)
    mult.tokenizer, mult.files = tokenizer, {"train": "train.txt"}
    mult.train_data = encode(tokenizer, Layout.for_tokenizer(tokenizer), EXAMPLES)
    mult.prepare_data()
    assert mult.step_kind == "mult" and mult.step_ends == [[1, 3], [2, 5]]
    too_far = coconut_trainer(tmp_path, max_latent_stage=3)
    too_far.tokenizer, too_far.files = tokenizer, {"train": "train.txt"}
    too_far.train_data = encode(tokenizer, Layout.for_tokenizer(tokenizer), EXAMPLES)
    with pytest.raises(UserError, match=r"^max_latent_stage 3: the longest training CoT has 2 steps under steps auto "
                                        r"\(mult\), so"):
        too_far.prepare_data()
    unsplit = coconut_trainer(tmp_path, steps="separator", step_separator=";", max_latent_stage=1)
    unsplit.tokenizer, unsplit.files = tokenizer, {"train": "train.txt"}
    unsplit.train_data = encode(tokenizer, Layout.for_tokenizer(tokenizer), EXAMPLES)
    with pytest.raises(UserError, match=r"^steps separator ';': no training CoT splits .* \(e.g. '2 \+ 0'\), so stage 1"):
        unsplit.prepare_data()
    no_cot = coconut_trainer(tmp_path)
    no_cot.tokenizer, no_cot.files = tokenizer, {"train": "train.txt"}
    no_cot.train_data = encode(tokenizer, Layout.for_tokenizer(tokenizer), [Example("1 * 2", "", "2")])
    with pytest.raises(UserError, match="^train.txt: no training example has a CoT"):
        no_cot.prepare_data()


def test_the_stage_advances_every_epochs_per_stage_up_to_the_final_stage(tmp_path):
    trainer = coconut_trainer(tmp_path, epochs_per_stage=0.5, first_stage=1, max_latent_stage=3)
    trainer.steps_per_epoch = 5
    assert trainer.steps_per_stage() == 2  # round(2.5)
    assert [trainer.stage_at(step) for step in range(9)] == [1, 1, 2, 2, 3, 3, 4, 4, 4]
    trainer.config.epochs_per_stage = 1.5
    assert trainer.steps_per_stage() == 8  # round(7.5)
    trainer.config.epochs_per_stage, trainer.steps_per_epoch = 0.1, 3
    assert trainer.steps_per_stage() == 1 and type(trainer.steps_per_stage()) is int  # at least one step
    trainer.config.epochs_per_stage = 1.0
    assert trainer.steps_per_stage() == 3
    assert [trainer.stage_at(step) for step in range(0, 12, 2)] == [1, 1, 2, 3, 3, 4]


def test_a_run_that_ends_before_the_final_stage_is_refused(tmp_path):
    trainer = coconut_trainer(tmp_path, epochs_per_stage=2.0, first_stage=1, max_latent_stage=2, max_steps=13)
    trainer.steps_per_epoch, trainer.total_steps = 3, 13  # the final stage 3 starts at (3 - 1) * 6 = 12
    trainer.check_run_length()
    trainer.total_steps = 12
    with pytest.raises(UserError) as error:
        trainer.check_run_length()
    assert str(error.value) == ("coconut: the run trains 12 steps (max_steps 13), but the final stage 3 (every CoT step a "
                                "thought) starts at step 12 (2 stages of 6 steps: epochs_per_stage 2.0 x 3 steps per "
                                "epoch), so its best model would be one of stage 2; expected max_steps above 12 (or fewer "
                                "epochs_per_stage)")
    by_epochs = coconut_trainer(tmp_path, epochs_per_stage=1.0, max_latent_stage=1, epochs=2)
    by_epochs.steps_per_epoch, by_epochs.total_steps = 2, 3
    with pytest.raises(UserError, match=r"^coconut: the run trains 3 steps \(epochs 2\), but the final stage 2 .* starts at "
                                        r"step 4 \(2 stages of 2 steps: .*one of stage 1;"):
        by_epochs.check_run_length()
    by_epochs.total_steps = 5
    by_epochs.check_run_length()


def test_lr_drop_step_past_the_run_is_warned_about_by_the_base_check(tmp_path, capsys, monkeypatch):
    import icot.errors

    monkeypatch.setattr(icot.errors, "_warned", set())  # a warning is written once per process
    trainer = coconut_trainer(tmp_path, max_latent_stage=1, epochs_per_stage=1.0, lr_drop_step=50)
    trainer.steps_per_epoch, trainer.total_steps = 2, 10
    trainer.check_run_length()
    assert "lr_drop_step 50: the run ends after step 10" in capsys.readouterr().err


def stepped(trainer, steps: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(stage, resets, moments left) after on_step_begin at each (step, batch_in_epoch)."""
    weight = nn.Parameter(torch.ones(2))
    trainer.optimizer = torch.optim.AdamW([weight])
    seen = []
    for step, batch in steps:
        weight.grad = torch.ones(2)
        trainer.optimizer.step()  # AdamW now holds moments
        trainer.progress.step, trainer.progress.batch_in_epoch = step, batch
        trainer.on_step_begin()
        seen.append((trainer.stage, trainer.resets, len(trainer.optimizer.state)))
    return seen


def events(tmp_path) -> list[dict]:
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("reset, expected, logged", [
    ("stage", [(0, 0, 1), (0, 0, 1), (1, 1, 0), (1, 1, 1), (2, 2, 0), (2, 2, 1)], [True, True]),
    ("epoch", [(0, 0, 1), (0, 0, 1), (1, 1, 0), (1, 1, 1), (2, 2, 0), (2, 2, 1)], [True, True]),
    ("never", [(0, 0, 1), (0, 0, 1), (1, 0, 1), (1, 0, 1), (2, 0, 1), (2, 0, 1)], [False, False]),
])
def test_on_step_begin_moves_the_stage_and_resets_the_optimizer_as_configured(tmp_path, reset, expected, logged):
    trainer = coconut_trainer(tmp_path, reset_optimizer=reset, epochs_per_stage=1.0, max_latent_stage=3)
    trainer.steps_per_epoch = 2
    assert stepped(trainer, [(0, 0), (1, 1), (2, 0), (3, 1), (4, 0), (5, 1)]) == expected
    assert events(tmp_path) == [{"event": "stage", "step": 2, "stage": 1, "optimizer_reset": logged[0]},
                                {"event": "stage", "step": 4, "stage": 2, "optimizer_reset": logged[1]}]


def test_the_optimizer_resets_from_the_second_step_on(tmp_path):
    for reset in ("epoch", "stage"):
        trainer = coconut_trainer(tmp_path / reset, reset_optimizer=reset, epochs_per_stage=1.0, max_latent_stage=3)
        trainer.steps_per_epoch = 1  # every step begins an epoch and a stage
        assert stepped(trainer, [(0, 0), (1, 0), (2, 0)]) == [(0, 0, 1), (1, 1, 0), (2, 2, 0)]


def test_the_optimizer_resets_at_each_epoch_or_each_stage_change_only(tmp_path):
    # two epochs a stage: an epoch begins at steps 2, 4, 6; the stage changes at 4 only
    steps = [(0, 0), (1, 1), (2, 0), (3, 1), (4, 0), (5, 1), (6, 0)]
    by_epoch = coconut_trainer(tmp_path / "e", reset_optimizer="epoch", epochs_per_stage=2.0, first_stage=1)
    by_epoch.steps_per_epoch = 2
    assert stepped(by_epoch, steps) == [(1, 0, 1), (1, 0, 1), (1, 1, 0), (1, 1, 1), (2, 2, 0), (2, 2, 1), (2, 3, 0)]
    assert events(tmp_path / "e") == [{"event": "stage", "step": 4, "stage": 2, "optimizer_reset": True}]
    by_stage = coconut_trainer(tmp_path / "s", reset_optimizer="stage", epochs_per_stage=2.0, first_stage=1)
    by_stage.steps_per_epoch = 2
    assert stepped(by_stage, steps) == [(1, 0, 1), (1, 0, 1), (1, 0, 1), (1, 0, 1), (2, 1, 0), (2, 1, 1), (2, 1, 1)]
    late = coconut_trainer(tmp_path / "l", reset_optimizer="stage", epochs_per_stage=1.0, first_stage=2)
    late.steps_per_epoch = 2
    assert stepped(late, [(0, 0)]) == [(2, 0, 1)]  # the first step never resets, the stage is already first_stage
    assert not (tmp_path / "l" / "run" / "metrics.jsonl").exists()
    at_start = coconut_trainer(tmp_path / "z", reset_optimizer="stage", epochs_per_stage=1.0)
    at_start.steps_per_epoch, at_start.stage = 2, 3  # a stage other than the scheduled one at step 0: logged, no reset
    assert stepped(at_start, [(0, 0)]) == [(0, 0, 1)]
    assert events(tmp_path / "z") == [{"event": "stage", "step": 0, "stage": 0, "optimizer_reset": False}]


def test_row_stages_draw_from_the_trainers_generator(tmp_path):
    trainer = coconut_trainer(tmp_path, uniform_prob=0.5)
    trainer.stage = 7
    torch.manual_seed(0)
    first = [trainer.row_stages(4, [0, 2, 5, 30]) for _ in range(20)]
    reference = torch.Generator().manual_seed(trainer.config.seed)
    expected = []
    for _ in range(20):
        mixed = (torch.rand(4, generator=reference) < 0.5).tolist()
        drawn = [int(torch.randint(n + 1, (1,), generator=reference)) for n in (0, 2, 5, 30)]
        expected.append([d if m else 7 for m, d in zip(mixed, drawn)])
    assert first == expected
    assert {s for row in first for s in row} > {7} and all(0 <= row[1] <= 2 or row[1] == 7 for row in first)
    assert all(type(s) is int for row in first for s in row)
    every = coconut_trainer(tmp_path, uniform_prob=1.0)
    drawn = [every.row_stages(2, [0, 1]) for _ in range(30)]
    assert {row[0] for row in drawn} == {0} and {row[1] for row in drawn} == {0, 1}
    never = coconut_trainer(tmp_path, uniform_prob=0.0)
    never.stage = 2
    assert [never.row_stages(3, [0, 1, 9]) for _ in range(5)] == [[2, 2, 2]] * 5


def test_a_row_mixes_only_on_a_draw_below_uniform_prob(tmp_path):
    trainer = coconut_trainer(tmp_path, uniform_prob=0.0)
    trainer.stage = 9
    trainer.rng = torch.Generator().manual_seed(1)
    torch.rand(2753120, generator=trainer.rng)  # torch's CPU generator seeded 1 then draws exactly 0.0
    state = trainer.rng.get_state()
    assert torch.rand(1, generator=trainer.rng).item() == 0.0
    trainer.rng.set_state(state)
    assert trainer.row_stages(1, [5]) == [9]  # 0.0 < 0.0 is false: probability 0 never mixes


def test_coconut_training_rows_replace_each_rows_steps_at_its_stage(tmp_path, toy):
    from types import SimpleNamespace

    tokenizer, marks, data, _ = toy
    trainer = coconut_trainer(tmp_path, toy, c_thought=2, max_latent_stage=1)
    trainer.stage = 1
    batch = trainer.training_batch({"index": torch.tensor([1, 0])})
    expected = thought_batch(data, [1, 0], [2, 1], [2, 2], marks, 97)  # the first step of each: 2 and 1 tokens
    assert list(batch) == list(expected) and all(torch.equal(batch[k], expected[k]) for k in expected)
    trainer.stage = 2  # past max_latent_stage: the whole CoT, max_latent_stage * c_thought thoughts
    batch = trainer.training_batch({"index": torch.tensor([0, 1])})
    expected = thought_batch(data, [0, 1], [3, 5], [2, 2], marks, 97)
    assert all(torch.equal(batch[k], expected[k]) for k in expected)
    trainer.accelerator = SimpleNamespace(device=torch.device("meta"))
    assert {v.device.type for v in trainer.training_batch({"index": torch.tensor([0])}).values()} == {"meta"}


def test_coconut_training_rows_take_the_stages_drawn_per_row(tmp_path, toy):
    tokenizer, marks, data, _ = toy
    trainer = coconut_trainer(tmp_path, toy, c_thought=1, max_latent_stage=2, uniform_prob=1.0)
    draws = torch.Generator().manual_seed(trainer.config.seed)
    torch.rand(2, generator=draws)
    stages = [int(torch.randint(n + 1, (1,), generator=draws)) for n in (2, 2)]
    plan = {0: (0, 0), 1: (1, 1), 2: (3, 2)}, {0: (0, 0), 1: (2, 1), 2: (5, 2)}  # (removed, thoughts) by stage
    batch = trainer.training_batch({"index": torch.tensor([0, 1])})
    expected = thought_batch(data, [0, 1], [plan[0][stages[0]][0], plan[1][stages[1]][0]],
                             [plan[0][stages[0]][1], plan[1][stages[1]][1]], marks, 97)
    assert all(torch.equal(batch[k], expected[k]) for k in expected)


def test_the_final_form_is_a_step_trained_at_the_final_stage(tmp_path):
    trainer = coconut_trainer(tmp_path, epochs_per_stage=1.0, max_latent_stage=1)
    trainer.steps_per_epoch = 2  # the final stage 2 from step 4
    forms = []
    for step in range(7):
        trainer.progress.step = step
        forms.append(trainer.in_final_form())
    assert forms == [False, False, False, False, False, True, True]
    trainer = coconut_trainer(tmp_path, epochs_per_stage=1.0, max_latent_stage=1, first_stage=2)
    trainer.steps_per_epoch, trainer.progress.step = 2, 0
    assert not trainer.in_final_form()  # no step trained yet
    trainer.progress.step = 1
    assert trainer.in_final_form()


def test_coconut_loss_is_the_token_scores_of_the_continuous_forward(tmp_path, toy):
    from icot.evaluate import token_scores

    tokenizer, marks, data, lm = toy
    trainer = coconut_trainer(tmp_path, toy)
    batch = thought_batch(data, [1, 0], [2, 1], [2, 2], marks, tokenizer.eos_token_id)
    model = ThoughtLM(lm, marks.latent)
    loss = trainer.compute_loss(model, batch)
    logits = recomputed(lm, batch["input_ids"], batch["attention_mask"], batch["position_ids"], marks.latent).logits
    expected = token_scores(logits, batch["labels"])
    assert loss.loss_sum.item() == pytest.approx(expected[0].item(), rel=1e-5)
    assert (loss.correct.item(), loss.count.item()) == (expected[1].item(), expected[2].item()) and loss.count == 14
    assert loss.metrics == {}


def test_coconut_batch_lengths_are_the_rows_at_the_stage_of_the_epochs_first_step(tmp_path, toy):
    trainer = coconut_trainer(tmp_path, toy, c_thought=2, max_latent_stage=1, epochs_per_stage=0.5)
    trainer.steps_per_epoch = 4  # a stage every 2 steps: epochs 0, 1, 2 begin at stages 0, 2, 2 (the final one)
    # lengths 11 and 15, step ends [1, 3] and [2, 5]; each row also gains <bot> and <eot>
    assert trainer.batch_lengths(0).tolist() == [13, 17]
    trainer.config.epochs_per_stage = 1.0
    assert trainer.batch_lengths(1).tolist() == [11 - 1 + 2 + 2, 15 - 2 + 2 + 2]  # stage 1
    assert trainer.batch_lengths(2).tolist() == [11 - 3 + 2 + 2, 15 - 5 + 2 + 2]  # stage 2: every step
    trainer.config.c_thought = 3
    assert trainer.batch_lengths(1).tolist() == [11 - 1 + 3 + 2, 15 - 2 + 3 + 2]


def test_coconut_predictor_and_metadata_carry_the_stage_and_settings(tmp_path, toy):
    from icot.methods.coconut_model import CoconutPredictor

    tokenizer, marks, _, lm = toy
    trainer = coconut_trainer(tmp_path, toy, c_thought=2, max_latent_stage=3, steps="separator", step_separator=";")
    trainer.stage, trainer.step_kind = 4, "separator"
    model = ThoughtLM(lm, marks.latent)
    predictor = trainer.predictor(model)
    assert type(predictor) is CoconutPredictor and predictor.model is model and predictor.tokenizer is tokenizer
    assert (predictor.cot_removed, predictor.stage, predictor.c_thought, predictor.max_latent_stage) == (math.inf, 4, 2, 3)
    assert (predictor.marks, predictor.steps, predictor.step_separator) == (marks, "separator", ";")
    assert trainer.metadata() == {"coconut_stage": 4, "c_thought": 2, "max_latent_stage": 3, "thoughts": 6,
                                  "thought_tokens": marks.as_dict(), "steps": "separator", "step_separator": ";"}
    trainer.stage = 2
    assert trainer.metadata()["thoughts"] == 4 and trainer.metadata()["coconut_stage"] == 2


# ----- codi.py ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    (dict(thoughts=0), "config: thoughts and projection_dim must be at least 1"),
    (dict(projection_dim=0), "config: thoughts and projection_dim must be at least 1"),
    (dict(projection_dropout=1.0), "config: projection_dropout must be in [0, 1), got 1.0"),
    (dict(projection_dropout=-0.1), "config: projection_dropout must be in [0, 1), got -0.1"),
    (dict(warmup_ratio=1.0), "config: warmup_ratio must be in [0, 1), got 1.0"),
    (dict(warmup_ratio=-0.1), "config: warmup_ratio must be in [0, 1), got -0.1"),
    (dict(teacher_loss_weight=-0.1), "config: the loss weights must not be negative, and student_loss_weight must be "
                                     "positive (the student is the model that answers)"),
    (dict(distill_loss_weight=-1.0), "config: the loss weights must not be negative, and student_loss_weight must be "
                                     "positive (the student is the model that answers)"),
    (dict(student_loss_weight=0.0), "config: the loss weights must not be negative, and student_loss_weight must be "
                                    "positive (the student is the model that answers)"),
    (dict(steps="separator"), "config: steps 'separator' needs step_separator (the string between two steps)"),
    (dict(include_last_step=True, steps="mult"), "config: steps and step_separator say which step the teacher's CoT "
                                                 "drops; they are read only with include_last_step: false"),
    (dict(include_last_step=True, step_separator=";"), "config: steps and step_separator say which step the teacher's "
                                                       "CoT drops; they are read only with include_last_step: false"),
    (dict(out=None), "config: out is required (the run directory)"),
])
def test_codi_settings_are_checked_with_one_line_errors(tmp_path, settings, message):
    with pytest.raises(UserError) as error:
        method_config(tmp_path, "codi", **settings).validate()
    assert str(error.value) == message


@pytest.mark.parametrize("settings", [dict(), dict(thoughts=1, projection_dim=1, projection_dropout=0.0, warmup_ratio=0.0),
                                      dict(projection_dropout=0.99, warmup_ratio=0.99, teacher_loss_weight=0.0,
                                           distill_loss_weight=0.0, student_loss_weight=0.01),
                                      dict(include_last_step=True), dict(steps="separator", step_separator=";"),
                                      dict(projection=False)])
def test_codi_settings_that_are_accepted_without_a_warning(tmp_path, settings, capsys, monkeypatch):
    import icot.errors

    monkeypatch.setattr(icot.errors, "_warned", set())
    method_config(tmp_path, "codi", **settings).validate()
    assert capsys.readouterr().err == ""


def test_projection_settings_without_the_projection_are_warned_about(tmp_path, capsys, monkeypatch):
    import icot.errors

    monkeypatch.setattr(icot.errors, "_warned", set())
    method_config(tmp_path, "codi", projection=False, projection_dim=64, projection_layer_norm=False).validate()
    assert capsys.readouterr().err == ("icot: warning: config: projection_dim, projection_layer_norm: read only with "
                                       "projection: true (projection: false has none to shape)\n")
    method_config(tmp_path, "codi", projection=False, projection_dropout=0.5).validate()
    assert "config: projection_dropout: read only" in capsys.readouterr().err
    method_config(tmp_path, "codi", projection_dim=64, projection_layer_norm=False).validate()
    assert capsys.readouterr().err == ""


def test_projection_shape_is_its_three_settings_or_none(tmp_path):
    from icot.methods.codi import projection_shape

    config = method_config(tmp_path, "codi", projection_dim=40, projection_dropout=0.25, projection_layer_norm=False)
    assert projection_shape(config) == {"dim": 40, "dropout": 0.25, "layer_norm": False}
    assert projection_shape(method_config(tmp_path, "codi")) == {"dim": 768, "dropout": 0.0, "layer_norm": True}
    config.projection = False
    assert projection_shape(config) is None


class Pieces:
    """A stand-in tokenizer: decode joins the pieces of the ids, and each call is recorded."""

    def __init__(self, pieces: dict):
        self.pieces, self.calls = pieces, []

    def decode(self, ids):
        self.calls.append(list(ids))
        return "".join(self.pieces[i] for i in ids)


def test_the_answer_offset_is_the_last_token_that_still_decodes_to_the_mark():
    from icot.methods.codi import answer_offset

    def offset(*pieces):
        return answer_offset(Pieces(dict(enumerate(pieces))), tuple(range(len(pieces))))

    assert offset("####", " ", "1", "8") == 1  # a lone space after the mark
    assert offset("####", " 18") == 0
    assert offset("##", "##", " 1", "8") == 1
    assert offset("#", "###", "", " ", "5") == 3  # the last of several prefixes that decode to the mark
    assert offset("####") == 0 and offset("x", "y", "z") == 0 and offset("#", "#", "#") == 0
    assert offset("####", "5", " ", " ") == 0  # past the answer's first character nothing counts
    tokenizer = Pieces({0: "####", 1: " ", 2: "7", 3: " "})
    assert answer_offset(tokenizer, (0, 1, 2, 3)) == 1 and tokenizer.calls == [[0], [0, 1], [0, 1, 2]]


def test_answer_offsets_decode_each_distinct_answer_segment_once(toy):
    from icot.methods.codi import answer_offsets

    tokenizer, _, _, _ = toy
    data = encode(tokenizer, Layout.for_tokenizer(tokenizer), [EXAMPLES[0], EXAMPLES[1], EXAMPLES[0]])
    mark, two, three, five = (tokenizer.convert_tokens_to_ids(w) for w in ("####", "2", "3", "5"))
    pieces = Pieces({mark: "####", two: " 2", three: " ", five: "5"})
    offsets = answer_offsets(pieces, data)
    assert offsets.dtype == np.int64 and offsets.tolist() == [0, 1, 0]
    assert sorted(pieces.calls) == [[mark], [mark], [mark, three]]


def test_the_teacher_keeps_the_cot_up_to_its_last_step(toy):
    from icot.methods.codi import teacher_cot_lengths

    tokenizer, _, _, _ = toy
    examples = EXAMPLES + [Example("2 * 3", "6", "6"), Example("2 * 4", "", "8"), Example("1 * 2", "2 ; 0 ; 5", "2")]
    data = encode(tokenizer, Layout.for_tokenizer(tokenizer), examples)
    kept = teacher_cot_lengths(tokenizer, data, "mult", None)
    assert kept.dtype == np.int64 and kept.tolist() == [1, 2, 0, 0, 0]
    assert teacher_cot_lengths(tokenizer, data, "separator", ";").tolist() == [0, 0, 0, 0, 4]


def test_the_teacher_rows_are_right_padded_with_the_kept_cot(toy):
    from icot.methods.codi import teacher_batch

    tokenizer, _, data, _ = toy
    batch = teacher_batch(data, [1, 0], np.array([2, 0]), 99)
    assert batch["input_ids"].tolist() == [ids_of(tokenizer, "3 4 * 5 E 1 5 E #### 3 5 E"),
                                           ids_of(tokenizer, "1 * 2 E E #### 2 E P P P P", pad=99)]
    assert batch["attention_mask"].tolist() == [[1] * 12, [1] * 8 + [0] * 4]
    assert batch["labels"].tolist() == [ids_of(tokenizer, "I I I I I 1 5 E #### 3 5 E"),
                                        ids_of(tokenizer, "I I I I E #### 2 E I I I I")]
    assert batch["cot_len"].tolist() == [2, 0] and batch["first_sep"].tolist() == [4, 3]
    assert batch["position_ids"][:, :8].tolist() == [list(range(8)), list(range(8))]
    whole = teacher_batch(data, [0], [3], 99)
    assert whole["input_ids"].tolist() == [ids_of(tokenizer, "1 * 2 E 2 + 0 E #### 2 E")]


def test_the_distilled_columns_are_the_offsets_past_the_second_sep_and_past_eot():
    from icot.methods.codi import distill_columns

    teacher = {"first_sep": torch.tensor([4, 3]), "cot_len": torch.tensor([2, 0])}
    student = {"input_ids": torch.tensor([[5, 9, 9, 6, 6], [9, 5, 5, 5, 5]])}
    teacher_at, student_at = distill_columns(teacher, student, torch.tensor([0, 1]), 9)
    assert teacher_at.tolist() == [8, 6] and student_at.tolist() == [3, 3]


def smooth_l1(predicted, target):
    d = (predicted - target).abs()
    return torch.where(d < 1, 0.5 * d**2, d - 0.5).mean()


def test_distillation_loss_by_hand_for_each_kind():
    from icot.methods.codi import distillation_loss

    torch.manual_seed(0)
    student = [torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    teacher = [(torch.randn(2, 6, 4, dtype=torch.float64) * 2).requires_grad_() for _ in range(3)]
    s_at, t_at = torch.tensor([4, 1]), torch.tensor([0, 5])
    picked = [(s[[0, 1], [4, 1]], t[[0, 1], [0, 5]].detach()) for s, t in zip(student, teacher)]
    smooth = distillation_loss(student, teacher, s_at, t_at)
    assert smooth.dtype == torch.float32
    expected = sum(smooth_l1(p, t) / t.std() for p, t in picked) / 3
    assert smooth.item() == pytest.approx(expected.item(), rel=1e-5)
    plain = distillation_loss(student, teacher, s_at, t_at, "smooth_l1", div_std=False)
    assert plain.item() == pytest.approx((sum(smooth_l1(p, t) for p, t in picked) / 3).item(), rel=1e-5)
    l2 = distillation_loss(student, teacher, s_at, t_at, kind="l2")
    assert l2.item() == pytest.approx((sum(((p - t) ** 2).mean() / t.var() for p, t in picked) / 3).item(), rel=1e-5)
    l2_plain = distillation_loss(student, teacher, s_at, t_at, kind="l2", div_std=False)
    assert l2_plain.item() == pytest.approx((sum(((p - t) ** 2).mean() for p, t in picked) / 3).item(), rel=1e-5)
    smooth.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    assert all(t.grad is None for t in teacher)  # the teacher side is detached
    with pytest.raises(ValueError):
        distillation_loss(student, teacher[:2], s_at, t_at)


def test_distillation_loss_reads_half_precision_states_in_float32_on_their_device():
    from icot.methods.codi import distillation_loss

    torch.manual_seed(0)
    student = [torch.randn(2, 3, 64).to(torch.bfloat16)]
    teacher = [(torch.randn(2, 3, 64) * 3).to(torch.bfloat16)]
    at = torch.tensor([1, 2])
    got = distillation_loss(student, teacher, at, at, "l2", div_std=False)
    exact = ((student[0][[0, 1], [1, 2]].float() - teacher[0][[0, 1], [1, 2]].float()) ** 2).mean()
    assert got.dtype == torch.float32 and got.item() == pytest.approx(exact.item(), rel=1e-6)
    on_meta = distillation_loss([s.to("meta") for s in student], [t.to("meta") for t in teacher], at.to("meta"),
                                at.to("meta"))
    assert on_meta.device.type == "meta"


def codi_trainer(tmp_path, toy=None, **settings):
    from icot.methods.codi import CodiTrainer

    trainer = CodiTrainer(method_config(tmp_path, "codi", **settings), resume=True, best_dir=tmp_path / "b")
    if toy is not None:
        tokenizer, marks, data, _ = toy
        trainer.tokenizer, trainer.marks, trainer.layout = tokenizer, marks, Layout(tokenizer.eos_token_id, None, 97)
        trainer.train_data, trainer.files = data, {"train": "train.txt"}
    return trainer


def test_a_codi_trainer_starts_empty_and_builds_the_lm_with_its_projection(tmp_path):
    from icot.methods.codi_model import CodiModel

    trainer = codi_trainer(tmp_path, projection_dim=24, projection_layer_norm=False)
    assert (trainer.marks, trainer.step_kind, trainer.teacher_cot, trainer.answer_offsets) == (None, None, None, None)
    assert trainer.resume is True and trainer.best_dir == tmp_path / "b"
    assert type(trainer).keeps_examples is True and type(trainer).supports_gradient_checkpointing is False
    defaults = type(trainer)(trainer.config)
    assert defaults.resume is False and defaults.best_dir == tmp_path / "run" / "best"
    tokenizer = toy_tokenizer()
    lm = build_preset("micro", len(tokenizer), tokenizer.eos_token_id)
    model = trainer.build_model(tokenizer, lm)
    assert trainer.marks == ThoughtTokens(len(tokenizer) - 3, len(tokenizer) - 2, len(tokenizer) - 1)
    assert type(model) is CodiModel and model.lm is lm and model.latent_id == trainer.marks.latent
    assert model.projection.up.out_features == 24 and not hasattr(model.projection, "ln")
    raw = codi_trainer(tmp_path, projection=False).build_model(toy_tokenizer(), build_preset("micro", 26, 0))
    assert raw.projection is None


def test_codi_prepares_the_teachers_cot_and_the_distilled_offsets(tmp_path, toy):
    tokenizer, _, data, _ = toy
    trainer = codi_trainer(tmp_path, toy)
    trainer.train_data = encode(tokenizer, Layout.for_tokenizer(tokenizer), EXAMPLES)
    trainer.prepare_data()
    assert trainer.step_kind == "mult" and trainer.teacher_cot.tolist() == [1, 2]
    assert trainer.answer_offsets.tolist() == [0, 0] and trainer.train_data.examples is None
    assert trainer.batch_lengths(0).tolist() == [11 - 3 + 1, 15 - 5 + 2]
    whole = codi_trainer(tmp_path, toy, include_last_step=True)
    whole.train_data = encode(tokenizer, Layout.for_tokenizer(tokenizer), EXAMPLES)
    whole.prepare_data()
    assert whole.step_kind is None and whole.teacher_cot.tolist() == [3, 5]
    whole.teacher_cot[0] = 0  # a copy: the data's CoT lengths stay
    assert whole.train_data.n_cot.tolist() == [3, 5] and whole.train_data.examples is None
    assert whole.answer_offsets.tolist() == [0, 0] and whole.batch_lengths(3).tolist() == [11 - 3 + 0, 15]
    by_separator = codi_trainer(tmp_path, toy, steps="separator", step_separator=";")
    by_separator.train_data = encode(tokenizer, Layout.for_tokenizer(tokenizer), [Example("1 * 2", "2 ; 0", "2")])
    by_separator.prepare_data()
    assert by_separator.step_kind == "separator" and by_separator.teacher_cot.tolist() == [2]
    no_cot = codi_trainer(tmp_path, toy, include_last_step=True)
    no_cot.train_data = encode(tokenizer, Layout.for_tokenizer(tokenizer), [Example("1 * 2", "", "2")])
    with pytest.raises(UserError, match="^train.txt: no training example has a CoT"):
        no_cot.prepare_data()


def test_dropping_the_last_step_of_cots_that_never_split_is_refused(tmp_path, toy):
    tokenizer, _, _, _ = toy
    trainer = codi_trainer(tmp_path, toy, steps="separator", step_separator=";")
    trainer.train_data = encode(tokenizer, Layout.for_tokenizer(tokenizer), EXAMPLES)
    with pytest.raises(UserError) as error:
        trainer.prepare_data()
    assert str(error.value) == ("steps separator ';': no training CoT splits into more than one step (e.g. '2 + 0'), so "
                                "dropping its last step leaves the teacher no CoT (include_last_step: true keeps it); "
                                "expected steps that split it (mult for multiplication, gsm8k for <<...>> steps, or "
                                "separator with a step_separator the CoTs hold)")
    auto = codi_trainer(tmp_path, toy)  # auto: the label names what it resolved to
    auto.train_data = encode(tokenizer, Layout.for_tokenizer(tokenizer), [Example("1 * 2", "2", "2"),
                                                                          Example("3 4 * 5", "1 5", "3 5")])
    with pytest.raises(UserError, match=r"^steps auto \(mult\): no training CoT splits into more than one step \(e\.g\. '2'\)"):
        auto.prepare_data()


@pytest.mark.parametrize("settings, total, expected", [
    (dict(warmup_ratio=0.1), 100, {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 55: 0.5, 100: 0.0, 40: 0.5 * (1 + math.cos(math.pi / 3))}),
    (dict(warmup_ratio=0.1, warmup_steps=20), 100, {0: 0.05, 19: 1.0, 20: 1.0, 60: 0.5}),
    (dict(warmup_ratio=0.025), 100, {0: 0.5, 1: 1.0, 2: 1.0, 51: 0.5}),  # round(2.5) = 2 steps of warm-up
    (dict(warmup_ratio=0.0), 10, {0: 1.0, 5: 0.5, 10: 0.0}),
    (dict(warmup_ratio=0.0), 1, {0: 1.0, 1: 0.0}),
    (dict(warmup_ratio=0.0, warmup_steps=1), 1, {0: 1.0, 1: 1.0, 2: 0.0}),
    (dict(warmup_ratio=0.1, lr_schedule="constant"), 100, {0: 0.1, 9: 1.0, 10: 1.0, 99: 1.0}),
    (dict(warmup_ratio=0.0, lr_schedule="constant"), 100, {0: 1.0, 50: 1.0}),
])
def test_codi_learning_rate_warms_up_then_decays_by_cosine_or_stays(tmp_path, settings, total, expected):
    trainer = codi_trainer(tmp_path, **settings)
    trainer.total_steps = total
    assert {step: trainer.schedule_factor(step) for step in expected} == pytest.approx(expected, abs=1e-12)


def test_codi_training_batch_holds_both_tasks_and_their_distilled_columns(tmp_path, toy):
    from types import SimpleNamespace

    tokenizer, marks, data, _ = toy
    trainer = codi_trainer(tmp_path, toy, thoughts=2)
    trainer.teacher_cot, trainer.answer_offsets = np.array([1, 2]), np.array([1, 0])
    batch = trainer.training_batch({"index": torch.tensor([1, 0])})
    assert list(batch) == ["teacher", "student", "teacher_at", "student_at", "input_ids", "attention_mask"]
    teacher, student = batch["teacher"], batch["student"]
    assert teacher["input_ids"].tolist() == [ids_of(tokenizer, "3 4 * 5 E 1 5 E #### 3 5 E"),
                                             ids_of(tokenizer, "1 * 2 E 2 E #### 2 E P P P", pad=97)]
    assert student["input_ids"].tolist() == [ids_of(tokenizer, "3 4 * 5 E B L L T E #### 3 5 E", marks),
                                             ids_of(tokenizer, "P 1 * 2 E B L L T E #### 2 E P", marks, 97)]
    assert student["labels"][0].tolist() == ids_of(tokenizer, "I I I I I I I I I E #### 3 5 E")
    assert batch["teacher_at"].tolist() == [8, 7] and batch["student_at"].tolist() == [10, 11]
    assert batch["input_ids"] is student["input_ids"] and batch["attention_mask"] is student["attention_mask"]
    trainer.accelerator = SimpleNamespace(device=torch.device("meta"))
    on_meta = trainer.training_batch({"index": torch.tensor([0])})
    devices = {v.device.type for rows in (on_meta["teacher"], on_meta["student"]) for v in rows.values()}
    assert devices == {"meta"} and on_meta["teacher_at"].device.type == on_meta["student_at"].device.type == "meta"


def codi_parts(model, batch, kind, div_std):
    """(teacher CE, student CE, distillation, student's correct and counted tokens), recomputed."""
    from icot.evaluate import token_scores
    from icot.methods.codi import distillation_loss

    teacher, student = batch["teacher"], batch["student"]
    out = model.lm(input_ids=teacher["input_ids"], attention_mask=teacher["attention_mask"],
                   position_ids=teacher["position_ids"], output_hidden_states=True)
    thought = recomputed(model.lm, student["input_ids"], student["attention_mask"], student["position_ids"],
                         model.latent_id, model.projection)
    t_sum, _, t_count = token_scores(out.logits, teacher["labels"])
    s_sum, s_correct, s_count = token_scores(thought.logits, student["labels"])
    distill = distillation_loss(thought.hidden_states, out.hidden_states, batch["student_at"], batch["teacher_at"], kind,
                                div_std)
    return (t_sum / t_count).item(), (s_sum / s_count).item(), distill.item(), s_correct.item(), s_count.item()


def test_codi_loss_weights_its_three_parts_and_counts_the_students_tokens(tmp_path, toy):
    from icot.methods.codi_model import CodiModel

    tokenizer, marks, data, lm = toy
    trainer = codi_trainer(tmp_path, toy, thoughts=2, teacher_loss_weight=0.5, student_loss_weight=2.0,
                           distill_loss_weight=3.0, distill_loss="l2", distill_div_std=False)
    trainer.teacher_cot, trainer.answer_offsets = np.array([1, 2]), np.array([0, 0])
    trainer.layout = Layout.for_tokenizer(tokenizer)  # a pad token the model embeds
    torch.manual_seed(4)
    model = CodiModel(lm, marks.latent, {"dim": 16, "dropout": 0.0, "layer_norm": True})
    batch = trainer.training_batch({"index": torch.tensor([1, 0])})
    loss = trainer.compute_loss(model, batch)
    teacher_ce, student_ce, distill, correct, count = codi_parts(model, batch, "l2", False)
    assert count == 9 and (loss.correct.item(), loss.count.item()) == (correct, count)
    assert loss.loss_sum.item() == pytest.approx((0.5 * teacher_ce + 2.0 * student_ce + 3.0 * distill) * count, rel=1e-5)
    assert list(loss.metrics) == ["teacher_ce", "student_ce", "distill"]
    assert [v.item() for v in loss.metrics.values()] == pytest.approx([teacher_ce, student_ce, distill], rel=1e-5)
    assert loss.loss_sum.requires_grad and not any(v.requires_grad for v in loss.metrics.values())
    smooth = codi_trainer(tmp_path, toy, thoughts=2)
    assert smooth.compute_loss(model, batch).metrics["distill"].item() == pytest.approx(
        codi_parts(model, batch, "smooth_l1", True)[2], rel=1e-5)
    batch["teacher"]["labels"][:] = IGNORE  # no teacher token: its part is 0, not 0 / 0
    batch["teacher"]["labels"][0, 6] = ids_of(tokenizer, "5")[0]  # then one token: its loss itself
    one = trainer.compute_loss(model, batch).metrics["teacher_ce"].item()
    batch["teacher"]["labels"][0, 6] = IGNORE
    assert trainer.compute_loss(model, batch).metrics["teacher_ce"].item() == 0.0
    with torch.no_grad():
        logits = lm(input_ids=batch["teacher"]["input_ids"][:1, :6]).logits[0, -1]
    assert one == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.tensor(ids_of(tokenizer, "5"))).item(),
                                rel=1e-5)


def test_codi_postfix_predictor_and_metadata(tmp_path, toy):
    from icot.methods.codi_model import CodiModel

    tokenizer, marks, _, lm = toy
    trainer = codi_trainer(tmp_path, toy, thoughts=3, projection_dim=16, steps="separator", step_separator=";")
    assert trainer.postfix() == {}
    trainer.train_metrics = {"loss": 1.0, "distill": 0.12345}
    assert trainer.postfix() == {"distill": "0.123"}
    model = CodiModel(lm, marks.latent, {"dim": 16, "dropout": 0.0, "layer_norm": True})
    predictor = trainer.predictor(model)
    assert type(predictor) is ThoughtPredictor and predictor.tokenizer is tokenizer and predictor.cot_removed == math.inf
    assert type(predictor.model) is ThoughtLM and predictor.model.lm is lm and predictor.model.project is model.projection
    assert predictor.model.latent_id == marks.latent and predictor.marks == marks and predictor.n_thoughts == 3
    trainer.step_kind = "separator"
    assert trainer.metadata() == {"thoughts": 3, "thought_tokens": marks.as_dict(),
                                  "projection": {"dim": 16, "dropout": 0.0, "layer_norm": True}, "cot_removed": "all",
                                  "steps": "separator", "step_separator": ";"}
