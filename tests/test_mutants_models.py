"""Direct tests of methods/coconut_model.py, methods/codi_model.py, methods/registry.py and
methods/__init__.py for their mutants (issue 50): fast calls with the expected rows, counts, tensors and
messages written out, or an independent reference (the LM called directly); micro models saved to a temporary
directory, no training run. docs/RESULTS.md, "Mutation testing", lists the mutants each one kills."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import icot.errors
import icot.methods
from icot.data.format import Example
from icot.data.layout import Layout, encode
from icot.data.tokenizers import word_tokenizer
from icot.errors import UserError
from icot.methods import registry
from icot.methods.coconut_model import CoconutPredictor, load_coconut_predictor, removed_and_thoughts
from icot.methods.codi_model import CodiModel, load_codi_predictor, projection_mlp
from icot.methods.thoughts import ThoughtLM, add_thought_tokens, continuous_forward, thought_batch
from icot.models import build_preset

# CoTs of 3 and 2 steps split by ";": `a b ; c ; d e` has step ends [3, 5, 7] in word tokens, `f ; g` [2, 3]
EXAMPLES = [Example("1 * 2", "a b ; c ; d e", "2"), Example("3 4 * 5", "f ; g", "3 5")]
SHAPE = {"dim": 16, "dropout": 0.5, "layer_norm": True}


@pytest.fixture(scope="module")
def toy():
    """(tokenizer with the thought tokens, their ids, the encoded EXAMPLES, a micro GPT-2 with their rows)."""
    tokenizer = word_tokenizer([f"{e.question} {e.cot} #### {e.answer}" for e in EXAMPLES])
    torch.manual_seed(0)
    lm = build_preset("micro", len(tokenizer), tokenizer.eos_token_id)
    marks = add_thought_tokens(tokenizer, lm)
    return tokenizer, marks, encode(tokenizer, Layout.for_tokenizer(tokenizer), EXAMPLES), lm.eval()


@pytest.fixture(scope="module")
def saved(toy, tmp_path_factory):
    """The toy LM and tokenizer saved as a Hugging Face directory (no icot.json) with a CODI projection beside it."""
    tokenizer, marks, _, lm = toy
    folder = tmp_path_factory.mktemp("saved")
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(1)
    model = CodiModel(lm, marks.latent, SHAPE)
    save_file(model.extra_state_dict(), str(folder / CodiModel.modules_file))
    return folder, model.extra_state_dict()


# ----- coconut_model.py --------------------------------------------------------------------------------

def test_removed_and_thoughts_at_each_stage():
    ends = [4, 10, 17, 24]
    assert removed_and_thoughts(0, ends, 2, 3) == (0, 0)
    assert removed_and_thoughts(1, ends, 2, 3) == (4, 2)
    assert removed_and_thoughts(2, ends, 3, 3) == (10, 6)
    assert removed_and_thoughts(3, ends, 2, 3) == (17, 6)  # the last latent stage: its steps only
    assert removed_and_thoughts(4, ends, 2, 3) == (24, 6)  # beyond it: the whole CoT, max_latent_stage * c thoughts
    assert removed_and_thoughts(3, [4, 10], 2, 3) == (10, 6)  # fewer steps than the stage: every step gone
    assert removed_and_thoughts(2, [], 2, 3) == (0, 4)  # no CoT: nothing to remove, thoughts still
    assert removed_and_thoughts(5, [], 2, 3) == (0, 6)


def test_coconut_plan_splits_the_steps_with_the_separator(toy):
    tokenizer, marks, data, lm = toy
    predictor = CoconutPredictor(ThoughtLM(lm, marks.latent), tokenizer, cot_removed=math.inf, marks=marks, stage=2,
                                 c_thought=3, max_latent_stage=2, steps="separator", step_separator=";")
    assert predictor.plan(data, [0, 1]) == ([5, 3], [6, 6])
    assert predictor.plan(data, [1]) == ([3], [6])
    predictor.stage = 1
    assert predictor.plan(data, [0, 1]) == ([3, 2], [3, 3])
    predictor.stage = 3  # beyond the last latent stage: the whole CoT, no split
    assert data.n_cot.tolist() == [7, 3]
    assert predictor.plan(data, [1, 0]) == ([3, 7], [6, 6])
    predictor.steps, predictor.step_separator, predictor.stage = "mult", None, 1  # no `+` or `(`: one step each
    assert predictor.plan(data, [0, 1]) == ([7, 3], [3, 3])


def coconut_meta(marks, **changes) -> dict:
    meta = {"method": "coconut", "thought_tokens": marks.as_dict(), "coconut_stage": 2, "c_thought": 3,
            "max_latent_stage": 4, "steps": "separator", "step_separator": ";"}
    return {**meta, **changes}


def test_a_saved_coconut_model_loads_with_its_settings(toy, saved):
    tokenizer, marks, data, lm = toy
    folder, _ = saved
    predictor = load_coconut_predictor(folder, coconut_meta(marks), device="cpu", dtype=torch.float64)
    assert type(predictor) is CoconutPredictor and type(predictor.model) is ThoughtLM
    assert (predictor.stage, predictor.c_thought, predictor.max_latent_stage) == (2, 3, 4)
    assert (predictor.steps, predictor.step_separator, predictor.marks) == ("separator", ";", marks)
    assert predictor.cot_removed == math.inf and predictor.n_thoughts == 6
    assert predictor.model.latent_id == marks.latent and predictor.model.project is None
    assert not predictor.model.lm.training and predictor.model.lm.dtype == torch.float64
    assert predictor.tokenizer.get_vocab() == tokenizer.get_vocab()
    weights = predictor.model.lm.get_input_embeddings().weight
    assert torch.equal(weights, lm.get_input_embeddings().weight.double())
    assert predictor.plan(data, [0]) == ([5], [6])
    no_separator = coconut_meta(marks, steps="mult")
    del no_separator["step_separator"]
    predictor = load_coconut_predictor(folder, no_separator)
    assert predictor.step_separator is None and predictor.steps == "mult"
    assert predictor.model.lm.dtype == torch.float32 and not predictor.model.lm.training
    assert predictor.model.lm.device.type == "cpu"
    moved = load_coconut_predictor(folder, coconut_meta(marks), device="meta")  # a device other than the CPU it loads on
    assert moved.model.lm.device.type == "meta" and not moved.model.lm.training


@pytest.mark.parametrize("drop, missing", [("thought_tokens", "'thought_tokens'"), ("coconut_stage", "'coconut_stage'"),
                                           ("c_thought", "'c_thought'"), ("max_latent_stage", "'max_latent_stage'"),
                                           ("steps", "'steps'")])
def test_an_incomplete_coconut_record_is_one_line(toy, saved, drop, missing):
    folder, _ = saved
    meta = coconut_meta(toy[1])
    del meta[drop]
    with pytest.raises(UserError) as error:
        load_coconut_predictor(folder, meta)
    assert str(error.value) == f"{folder}/icot.json: not a complete Coconut record (missing {missing})"


def test_coconut_thought_tokens_of_the_wrong_kind_or_ids_are_one_line(toy, saved):
    folder, _ = saved
    marks = toy[1]
    with pytest.raises(UserError, match=r"^.*/icot\.json: not a complete Coconut record \(missing .*\)$"):
        load_coconut_predictor(folder, coconut_meta(marks, thought_tokens=None))
    with pytest.raises(UserError) as error:
        load_coconut_predictor(folder, coconut_meta(marks, thought_tokens={"begin": marks.end, "end": marks.begin,
                                                                             "latent": marks.latent}))
    assert str(error.value) == f"{folder}: the tokenizer's thought tokens differ from those in icot.json"


# ----- codi_model.py -----------------------------------------------------------------------------------

def test_projection_mlp_layers_names_and_sizes():
    mlp = projection_mlp(8, 12, 0.25, layer_norm=True)
    assert list(dict(mlp.named_children())) == ["dropout", "up", "act", "down", "ln"]
    assert [type(m) for m in mlp] == [nn.Dropout, nn.Linear, nn.GELU, nn.Linear, nn.LayerNorm]
    assert mlp.dropout.p == 0.25 and mlp.act.approximate == "none"
    assert (mlp.up.in_features, mlp.up.out_features, mlp.down.in_features, mlp.down.out_features) == (8, 12, 12, 8)
    assert mlp.ln.normalized_shape == (8,)
    plain = projection_mlp(8, 12, 0.0, layer_norm=False)
    assert list(dict(plain.named_children())) == ["dropout", "up", "act", "down"] and plain.dropout.p == 0.0
    x = torch.randn(3, 8)
    expected = plain.down(torch.nn.functional.gelu(plain.up(x)))
    assert torch.allclose(plain(x), expected)


def test_codi_model_projection_follows_the_lm(toy):
    tokenizer, marks, _, lm = toy
    model = CodiModel(lm, marks.latent, SHAPE)
    assert model.latent_id == marks.latent and model.lm is lm and model.kind == "CODI"
    assert model.modules_file == "codi_projection.safetensors"
    assert (model.projection.up.in_features, model.projection.up.out_features, model.projection.dropout.p) == (
        lm.config.n_embd, 16, 0.5)
    assert type(model.projection[-1]) is nn.LayerNorm
    assert CodiModel(lm, marks.latent, {"dim": 8, "dropout": 0.0, "layer_norm": False}).projection[-1].out_features == (
        lm.config.n_embd)
    assert CodiModel(lm, marks.latent, None).projection is None
    torch.manual_seed(0)
    double = build_preset("micro", len(tokenizer), tokenizer.eos_token_id).double()
    projection = CodiModel(double, marks.latent, SHAPE).projection
    assert {p.dtype for p in projection.parameters()} == {torch.float64}
    assert CodiModel(double, marks.latent, None).thought_lm().project is None
    assert {p.device.type for p in projection.parameters()} == {"cpu"}
    on_meta = CodiModel(double.to("meta"), marks.latent, SHAPE).projection  # an LM off the CPU: the projection follows
    assert {(p.device.type, p.dtype) for p in on_meta.parameters()} == {("meta", torch.float64)}


def test_codi_forward_runs_the_teacher_rows_and_the_students_thoughts(toy):
    tokenizer, marks, data, lm = toy
    torch.manual_seed(2)
    model = CodiModel(lm, marks.latent, {**SHAPE, "dropout": 0.0}).eval()
    pad = Layout.for_tokenizer(tokenizer).pad_id
    student = thought_batch(data, [0, 1], [7, 3], [2, 2], marks, pad)
    teacher = thought_batch(data, [0, 1], [0, 0], [0, 0], marks, pad)
    teacher["position_ids"] = teacher["position_ids"] + 3  # shifted: they must reach the LM
    assert (teacher["attention_mask"] == 0).any()
    with torch.no_grad():
        teacher_out, student_out = model(teacher, student)
        reference = lm(input_ids=teacher["input_ids"], attention_mask=teacher["attention_mask"],
                       position_ids=teacher["position_ids"], output_hidden_states=True)
        unmasked = lm(input_ids=teacher["input_ids"], position_ids=teacher["position_ids"])
        thought = continuous_forward(lm, student["input_ids"], student["attention_mask"], student["position_ids"],
                                     marks.latent, model.projection, output_hidden_states=True)
        raw = continuous_forward(lm, student["input_ids"], student["attention_mask"], student["position_ids"],
                                 marks.latent, None, output_hidden_states=True)
    assert torch.allclose(teacher_out.logits, reference.logits, atol=1e-6)
    assert not torch.allclose(teacher_out.logits, unmasked.logits, atol=1e-4)
    assert len(teacher_out.hidden_states) == lm.config.n_layer + 1 and teacher_out.past_key_values is None
    assert torch.allclose(student_out.logits, thought.logits, atol=1e-6)
    assert not torch.allclose(student_out.logits, raw.logits, atol=1e-4)
    assert len(student_out.hidden_states) == lm.config.n_layer + 1
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(student_out.hidden_states, thought.hidden_states))


def test_codi_thought_lm_carries_the_projection(toy):
    _, marks, _, lm = toy
    model = CodiModel(lm, marks.latent, SHAPE)
    thought = model.thought_lm()
    assert type(thought) is ThoughtLM and thought.lm is lm and thought.latent_id == marks.latent
    assert thought.project is model.projection


def codi_meta(marks, **changes) -> dict:
    return {"method": "codi", "thought_tokens": marks.as_dict(), "thoughts": 3, "projection": SHAPE, **changes}


def test_a_saved_codi_model_loads_with_its_projection(toy, saved):
    tokenizer, marks, data, lm = toy
    folder, state = saved
    predictor = load_codi_predictor(folder, codi_meta(marks, thoughts=3.0), device="cpu", dtype=torch.float64)
    assert type(predictor).__name__ == "ThoughtPredictor" and type(predictor.model) is ThoughtLM
    assert predictor.thoughts == 3 and type(predictor.thoughts) is int and predictor.n_thoughts == 3
    assert predictor.marks == marks and predictor.cot_removed == math.inf and predictor.model.latent_id == marks.latent
    project = predictor.model.project
    assert not project.training and not predictor.model.lm.training and project.dropout.p == 0.5
    loaded = {k: v for k, v in predictor.model.project.state_dict().items()}
    assert set(loaded) == {k.removeprefix("projection.") for k in state}
    assert all(torch.equal(loaded[k.removeprefix("projection.")], v.double()) for k, v in state.items())
    assert {p.dtype for p in project.parameters()} == {torch.float64} and predictor.model.lm.dtype == torch.float64
    assert predictor.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert predictor.plan(data, [0, 1]) == ([7, 3], [3, 3])
    plain = load_codi_predictor(folder, codi_meta(marks))
    assert plain.model.lm.dtype == torch.float32 and not plain.model.project.training
    assert plain.model.lm.device.type == "cpu"
    moved = load_codi_predictor(folder, codi_meta(marks), device="meta")  # a device other than the CPU it loads on
    assert moved.model.lm.device.type == "meta" and {p.device.type for p in moved.model.project.parameters()} == {"meta"}
    assert not moved.model.lm.training and not moved.model.project.training


@pytest.mark.parametrize("drop", ["thought_tokens", "thoughts", "projection"])
def test_an_incomplete_codi_record_is_one_line(toy, saved, drop):
    folder, _ = saved
    meta = codi_meta(toy[1])
    del meta[drop]
    with pytest.raises(UserError) as error:
        load_codi_predictor(folder, meta)
    assert str(error.value) == f"{folder}/icot.json: not a complete CODI record (missing '{drop}')"


def test_codi_thought_tokens_that_differ_or_a_missing_projection_are_one_line(toy, saved, tmp_path):
    folder, _ = saved
    marks = toy[1]
    with pytest.raises(UserError, match=r"^.*/icot\.json: not a complete CODI record \(missing .*\)$"):
        load_codi_predictor(folder, codi_meta(marks, thought_tokens=None))
    swapped = {"begin": marks.latent, "end": marks.end, "latent": marks.begin}
    with pytest.raises(UserError) as error:
        load_codi_predictor(folder, codi_meta(marks, thought_tokens=swapped))
    assert str(error.value) == f"{folder}: the tokenizer's thought tokens differ from those in icot.json"
    bare = tmp_path / "bare"
    toy[3].save_pretrained(bare)
    toy[0].save_pretrained(bare)
    with pytest.raises(UserError) as error:
        load_codi_predictor(bare, codi_meta(marks))
    assert str(error.value) == f"{bare}: no codi_projection.safetensors (not a saved CODI model)"


# ----- registry.py -------------------------------------------------------------------------------------

def test_methods_are_registered_in_order_with_their_trainers_and_loaders():
    from icot.methods.baselines import ExplicitTrainer, NoCotTrainer
    from icot.methods.coconut import CoconutTrainer

    assert list(registry.METHODS) == ["explicit", "nocot", "stepwise", "kd", "coconut", "codi"]
    assert registry.get("explicit").trainer_class() is ExplicitTrainer
    assert registry.get("nocot").trainer_class() is NoCotTrainer
    assert registry.get("coconut").trainer_class() is CoconutTrainer
    assert registry.get("coconut").load_predictor() is load_coconut_predictor
    assert registry.get("codi").load_predictor() is load_codi_predictor
    assert registry.get("explicit").load_predictor() is None and registry.get("stepwise").load_predictor() is None


def test_load_reads_module_colon_attribute():
    from icot.methods.baselines import ExplicitTrainer

    assert registry._load("icot.methods.baselines:ExplicitTrainer") is ExplicitTrainer
    assert registry._load("icot.methods.coconut_model:removed_and_thoughts") is removed_and_thoughts


def test_register_adds_once_and_get_names_the_choices(monkeypatch):
    monkeypatch.setattr(registry, "METHODS", {"a": registry.METHODS["explicit"]})
    method = registry.Method("new", "s", "c", "icot.methods.baselines:NoCotTrainer")
    assert registry.register(method) is method and registry.METHODS == {"a": registry.METHODS["a"], "new": method}
    assert registry.get("new") is method
    with pytest.raises(ValueError) as error:
        registry.register(registry.Method("new", "other", "c", "x:y"))
    assert str(error.value) == "method new is registered already" and registry.METHODS["new"] is method
    with pytest.raises(UserError) as error:
        registry.get("old")
    assert str(error.value) == "method 'old' is unknown; choose one of a, new"


# ----- methods/__init__.py ------------------------------------------------------------------------------

def test_trainer_class_and_trainers_by_name():
    from icot.methods.codi import CodiTrainer
    from icot.methods.kd.pipeline import KDTrainer
    from icot.methods.stepwise import StepwiseTrainer

    assert icot.methods.trainer_class("codi") is CodiTrainer
    assert icot.methods.trainer_class("stepwise") is StepwiseTrainer
    every = icot.methods.trainers()
    assert list(every) == ["explicit", "nocot", "stepwise", "kd", "coconut", "codi"]
    assert every["kd"] is KDTrainer and every["codi"] is CodiTrainer
    with pytest.raises(UserError, match="^method 'x' is unknown; choose one of explicit, nocot"):
        icot.methods.trainer_class("x")


def fake_predictor(n_positions, n_thoughts=0, keep_position=False, gap=0, gap_from=0):
    model = SimpleNamespace(config=SimpleNamespace(n_positions=n_positions))
    return SimpleNamespace(model=model, n_thoughts=n_thoughts, keep_position=keep_position, position_gap=gap,
                           position_gap_from=gap_from)


def test_reserved_positions_by_method():
    reserved = icot.methods._reserved_positions
    assert reserved({"method": "coconut"}, fake_predictor(10, 6)) == {
        "min(coconut_stage, max_latent_stage) * c_thought thoughts": 6}
    assert reserved({"method": "codi"}, fake_predictor(10, 4)) == {"thoughts": 4}
    assert reserved({"method": "stepwise"}, fake_predictor(10, 4, True, 5, 2)) == {"position_gap": 5,
                                                                                  "position_gap_from": 2}
    assert reserved({}, fake_predictor(10, 4, True, 5, 2)) == {"position_gap": 5, "position_gap_from": 2}
    assert reserved({"method": "stepwise"}, fake_predictor(10, 4)) == {}


def test_reserved_positions_must_leave_room(tmp_path):
    check = icot.methods.check_reserved_positions
    check(tmp_path, {"method": "codi"}, fake_predictor(10, 9))
    check(tmp_path, {"method": "codi"}, fake_predictor(None, 900))
    check(tmp_path, {}, fake_predictor(10))
    with pytest.raises(UserError) as error:
        check(tmp_path, {"method": "codi"}, fake_predictor(10, 10))
    assert str(error.value) == (f"{tmp_path}/icot.json: thoughts 10 take 10 of the model's 10 positions (config.json); "
                                "expected fewer, leaving room for the question and its answer")
    with pytest.raises(UserError) as error:
        check(tmp_path, {"method": "stepwise"}, fake_predictor(10, 0, True, 7, 4))
    assert str(error.value) == (f"{tmp_path}/icot.json: position_gap 7, position_gap_from 4 take 11 of the model's 10 "
                                "positions (config.json); expected fewer, leaving room for the question and its answer")


def test_load_predictor_dispatches_on_icot_json(toy, saved, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(icot.errors, "_warned", set())
    tokenizer, marks, data, lm = toy
    folder, _ = saved
    plain = icot.methods.load_predictor(folder)  # no icot.json: a plain causal LM, with a warning
    assert type(plain).__name__ == "Predictor" and not plain.model.training
    assert (f"icot: warning: model {folder}: no icot.json beside it, so how it was trained (method, CoT removal, positions) is "
        "unknown; decoding it as a plain causal LM, which is wrong for a model trained otherwise\n") in capsys.readouterr().err
    (folder / "icot.json").write_text(json.dumps(coconut_meta(marks)))
    try:
        coconut = icot.methods.load_predictor(folder, dtype=torch.float64)
        assert type(coconut) is CoconutPredictor and coconut.stage == 2 and coconut.model.lm.dtype == torch.float64
        assert coconut.model.lm.device.type == "cpu"
        assert icot.methods.load_predictor(folder, device="meta").model.lm.device.type == "meta"
        (folder / "icot.json").write_text(json.dumps(coconut_meta(marks, coconut_stage=200, c_thought=300)))
        with pytest.raises(UserError, match=r"min\(coconut_stage, max_latent_stage\) \* c_thought thoughts 1200 take "
                                            r"1200 of the model's \d+ positions"):
            icot.methods.load_predictor(folder)
        (folder / "icot.json").write_text(json.dumps({"method": "coconut"}))
        with pytest.raises(UserError, match="field 'thought_tokens' is missing"):
            icot.methods.load_predictor(folder)
    finally:
        (folder / "icot.json").unlink()
    assert "warning" not in capsys.readouterr().err


def test_load_predictor_refuses_a_preset_and_a_folder_without_a_tokenizer(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(icot.errors, "_warned", set())
    with pytest.raises(UserError) as error:  # not a directory: no icot.json to read, so no warning of a missing one
        icot.methods.load_predictor(tmp_path / "missing")
    assert str(error.value) == (f"model {tmp_path}/missing: no such directory; expected a model directory (e.g. "
                                "RUN/best) or a hub id")
    assert capsys.readouterr().err == ""
    with pytest.raises(UserError) as error:
        icot.methods.load_predictor("micro")
    assert str(error.value) == ("model micro: a preset is an untrained model shape for 'icot train'; give a trained "
                                "model directory, e.g. RUN/best")
    monkeypatch.chdir(tmp_path)
    toy[3].save_pretrained(tmp_path / "micro")  # a directory named like a preset is a model, not the preset
    with pytest.raises(UserError) as error:
        icot.methods.load_predictor("micro")
    assert str(error.value).startswith("model micro: no tokenizer files (tokenizer.json, vocab.json, tokenizer.model")


def test_load_predictor_names_the_folder_of_a_tokenizer_too_large_or_an_icot_json_that_cannot_answer(toy, tmp_path,
                                                                                                     monkeypatch):
    monkeypatch.setattr(icot.errors, "_warned", set())
    lm = toy[3]
    large = word_tokenizer([" ".join(f"w{i}" for i in range(lm.config.vocab_size + 5))])
    lm.save_pretrained(tmp_path / "large")
    large.save_pretrained(tmp_path / "large")
    with pytest.raises(UserError) as error:
        icot.methods.load_predictor(tmp_path / "large")
    assert str(error.value) == (f"model {tmp_path}/large: its tokenizer has {len(large)} tokens but the model only "
                                f"{lm.config.vocab_size} (config.json vocab_size); expected the tokenizer saved with "
                                "the model")
    lm.save_pretrained(tmp_path / "student")
    toy[0].save_pretrained(tmp_path / "student")
    (tmp_path / "student" / "icot.json").write_text(json.dumps({"method": "kd", "kd_stage": "student"}))
    with pytest.raises(UserError) as error:  # loads (kd_stage), but a student answers from its teacher's states
        icot.methods.load_predictor(tmp_path / "student")
    assert str(error.value).startswith(f"{tmp_path}/student/icot.json: field 'teacher' is missing; an icot kd model")
