"""Models that answer through plain transformers (icot.export): every method's saved directory,
loaded with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` and run with
`generate`, writes what icot writes; `icot export` gives older directories the same; ICoT-KD is
refused with the reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, mult_examples, run_cli, true_answer
from test_cli_errors import one_line_error

from icot.data.format import Example, write_examples

MAX_NEW = 24  # 2x2 explicit: 8 CoT tokens, SEP, ####, 4 digits, EOS; below generate.STATIC_FROM: icot's own cache
COMMON = ["--model", "micro", "--lr", "3e-3", "--batch-size", "16", "--log-every", "5", "--seed", "3"]
RUNS = {  # 32 examples, batch 16: 2 optimizer steps an epoch; a few steps teach some of the layout, not the products
    "explicit": ["--max-steps", "10"],
    "nocot": ["--max-steps", "10"],
    "stepwise": ["--max-steps", "10", "--remove-per-epoch", "4", "--keep-position"],  # 2x2 CoTs: 8 tokens, gone at step 4
    "coconut": ["--max-steps", "8", "--c-thought", "1", "--max-latent-stage", "2", "--epochs-per-stage", "1"],
    "codi": ["--max-steps", "6", "--thoughts", "2", "--projection-dim", "32"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """2x2 training data (no valid or test split: training does no evaluation); beside it, a test
    file of 2x2, 3x2 and 3x3 questions (three prompt lengths: left padding)."""
    out = tmp_path_factory.mktemp("mult2")
    (out / "data").mkdir()
    write_examples(out / "data" / "train.txt", mult_examples(2, 2, 32, seed=0))
    write_examples(out / "test.txt", mult_examples(2, 2, 4, seed=1) + mult_examples(3, 2, 2, seed=2)
                   + mult_examples(3, 3, 2, seed=3))
    return out


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, Path]:
    """One briefly trained model directory (RUN/best) per method, as `icot train` saves it."""
    root = tmp_path_factory.mktemp("runs")
    for method, extra in RUNS.items():
        assert run_cli("train", "--method", method, "--data", data / "data", "--out", root / method, *COMMON, *extra) == 0
    return {method: root / method / "best" for method in RUNS}


def questions(data: Path) -> list[str]:
    from icot.data.format import read_examples

    return [e.question for e in read_examples(data / "test.txt")]


def icot_generation(model_dir: Path, asked: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, generated tokens) as icot answers: its loader, its prompts, its decoding."""
    from icot.data.layout import encode
    from icot.methods import load_predictor

    predictor = load_predictor(model_dir)
    encoded = encode(predictor.tokenizer, predictor.layout, [Example(q, "", "") for q in asked])
    prompts = [encoded.prompt(i) for i in range(len(asked))]
    return prompts, predictor.generate(prompts, MAX_NEW)


def plain_generation(model_dir: Path, asked: list[str]) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """(prompts, generated tokens up to the second SEP, text after `####`) through transformers alone,
    one left-padded batch, as the model card shows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    inputs = tokenizer([f"{q}||" for q in asked], return_tensors="pt", padding=True)
    width = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=MAX_NEW)
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
    generated, answers = [], []
    for row in out[:, width:].tolist():
        seps = [i for i, t in enumerate(row) if t == tokenizer.eos_token_id]
        generated.append(row[: seps[1] + 1] if len(seps) > 1 else row)
        text = tokenizer.decode(row, skip_special_tokens=True)
        answers.append(text.split("####", 1)[1].strip() if "####" in text else "")
    return prompts, generated, answers


def well_formed(model_dir: Path, tokens: list[int], sep: int) -> bool:
    """`cot SEP #### answer SEP`, with no `####` in the CoT."""
    from transformers import AutoTokenizer

    if tokens.count(sep) != 2:
        return False
    decode = AutoTokenizer.from_pretrained(model_dir).decode
    first = tokens.index(sep)
    return "####" not in decode(tokens[:first]) and decode(tokens[first + 1 :]).startswith("####")


@pytest.mark.parametrize("method", list(RUNS))
def test_plain_transformers_answers_as_icot_does(method, runs, data, tmp_path, capsys):
    model_dir = runs[method]
    meta = json.loads((model_dir / "icot.json").read_text())
    config = json.loads((model_dir / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "icot_model.ICoTGPT2LMHeadModel"}
    if method == "stepwise":
        assert meta["cot_removed"] == "all" and config["icot"]["position_gap"] == meta["position_gap"] == 8
    if method in ("coconut", "codi"):
        assert config["icot"]["thoughts"] == 2
    asked = questions(data)
    icot_prompts, icot_tokens = icot_generation(model_dir, asked)
    plain_prompts, plain_tokens, plain_answers = plain_generation(model_dir, asked)
    assert plain_prompts == icot_prompts  # `question||` is icot's `question SEP`
    assert plain_tokens == icot_tokens  # token for token
    assert run_cli("eval", "--model", model_dir, "--data", data / "test.txt", "--json", tmp_path / "eval.json") == 0
    predictions = json.loads((tmp_path / "eval.json").read_text())["predictions"]
    # where icot's generation is well formed (`cot SEP #### answer EOS`), the text after `####` is icot's answer
    whole = [i for i, t in enumerate(icot_tokens) if well_formed(model_dir, t, config["icot"]["sep_token_id"])]
    assert [plain_answers[i] for i in whole] == [predictions[i]["answer"] for i in whole]


def test_icot_loads_its_directories_without_the_remote_code(runs):
    """icot's own loading is unaffected: the architecture's class, not the one auto_map names."""
    from transformers import GPT2LMHeadModel

    from icot.methods import load_predictor

    for method in ("stepwise", "codi"):
        model = load_predictor(runs[method]).model
        assert type(getattr(model, "lm", model)) is GPT2LMHeadModel


def test_the_model_card_shows_the_plain_transformers_usage(runs):
    card = (runs["stepwise"] / "README.md").read_text()
    assert f'AutoModelForCausalLM.from_pretrained("{runs["stepwise"]}", trust_remote_code=True)' in card
    assert 'tokenizer(["2 1 * 8 9||"], return_tensors="pt")' in card  # 12*98 as a data line writes it
    assert "position_gap" in card


def test_the_tokenizer_fast_path_reads_the_bar_as_the_tokenizer_does(runs):
    from icot.data.layout import token_lists, whitespace_vocab
    from icot.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(str(runs["explicit"]))
    texts = ["1 2 * 3 4||", "1 2 || 3", "#### 5 6"]
    words = whitespace_vocab(tokenizer)
    assert words is not None and token_lists(tokenizer, texts, words) == token_lists(tokenizer, texts, None)
    assert token_lists(tokenizer, texts, None)[0][-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("name, asked", [
    ("mult3x3-micro-stepwise", ["7 0 9 * 5 5 5", "1 2 3 * 6 5 4", "9 9 9 * 9 9 9"]),  # 907*555 first
    ("mult4x4-tiny-stepwise", ["4 3 2 1 * 8 7 6 5", "9 1 7 3 * 9 4 3 3"])])
def test_shipped_models_answer_through_plain_transformers(name, asked):
    """The shipped models answer right through transformers alone (907*555 = 503385, written
    `5 8 3 3 0 5`, digits least significant first), token for token as icot does."""
    model_dir = ROOT / "models" / name
    _, plain_tokens, answers = plain_generation(model_dir, asked)
    assert answers[0] == true_answer(asked[0])  # right (computed here); the others as icot answers them
    assert plain_tokens == icot_generation(model_dir, asked)[1]


def test_a_llama_shape_runs_its_gap_through_its_own_class(tmp_path):
    """Rotary positions (Llama): the class is LlamaForCausalLM's, and a random model's plain decoding
    with a position gap is icot's, token for token."""
    import torch

    from icot.data.tokenizers import word_tokenizer
    from icot.models import build_preset, save_model

    examples = mult_examples(2, 2, 4, seed=4) + mult_examples(3, 2, 2, seed=5)
    tokenizer = word_tokenizer([f"{e.question} {e.cot} {e.answer}" for e in examples])
    torch.manual_seed(0)
    model = build_preset("tiny-llama", len(tokenizer), tokenizer.eos_token_id)
    meta = {"method": "stepwise", "cot_removed": "all", "keep_position": True, "position_gap": 5,
            "position_gap_from": 0, "removal_side": "left", "gap_placement": "authors"}
    save_model(model, tokenizer, tmp_path / "llama", meta)
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "icot_model.ICoTLlamaForCausalLM"}
    asked = [e.question for e in examples]
    assert plain_generation(tmp_path / "llama", asked)[1] == icot_generation(tmp_path / "llama", asked)[1]


# ----- icot export ------------------------------------------------------------------------------

def older(model_dir: Path, out: Path) -> Path:
    """A copy of `model_dir` as icot saved it before the remote code: no icot_model.py, auto_map or `icot`."""
    from icot.data.tokenizers import load_tokenizer

    shutil.copytree(model_dir, out)
    (out / "icot_model.py").unlink()
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in ("auto_map", "icot")}))
    state = json.loads((out / "tokenizer.json").read_text())
    state["normalizer"] = None
    (out / "tokenizer.json").write_text(json.dumps(state))
    assert load_tokenizer(str(out))("1||")["input_ids"] != [load_tokenizer(str(out)).convert_tokens_to_ids("1"), 0]
    return out


def test_export_gives_an_older_directory_the_plain_route(runs, data, tmp_path, capsys):
    old = older(runs["codi"], tmp_path / "old")
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    capsys.readouterr()
    assert run_cli("export", old, tmp_path / "new") == 0
    assert "answers through transformers' AutoModelForCausalLM" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before  # the source is left as it was
    new = tmp_path / "new"
    assert (new / "icot_model.py").read_bytes() == (runs["codi"] / "icot_model.py").read_bytes()
    assert (new / "model.safetensors").read_bytes() == before["model.safetensors"]
    asked = questions(data)
    assert plain_generation(new, asked)[1] == icot_generation(old, asked)[1]
    assert 'trust_remote_code=True' in (new / "README.md").read_text()


def test_export_refuses_what_it_cannot_export_and_writes_nothing(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(tmp_path / "missing", "not a directory"), (empty, "no config.json, icot.json, tokenizer.json, model weights")]
    kd = shutil.copytree(runs["explicit"], tmp_path / "kd")
    (kd / "icot.json").write_text(json.dumps({"method": "kd", "kd_stage": "coupled"}))
    cases.append((kd, "cannot export: an ICoT-KD model answers with two networks"))
    for source, fragment in cases:
        line = one_line_error(capsys, run_cli("export", source, tmp_path / "out"))
        assert fragment in line
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    line = one_line_error(capsys, run_cli("export", runs["explicit"], taken))
    assert "exists and is not an empty directory" in line
    assert [p.name for p in taken.iterdir()] == ["notes.txt"] and (taken / "notes.txt").read_text() == "mine"


def test_a_kd_save_carries_no_remote_code(runs, tmp_path):
    """ICoT-KD's directories get none, nor keep what a directory they started from had."""
    from icot.export import write_remote_code

    folder = shutil.copytree(runs["explicit"], tmp_path / "kd")
    write_remote_code(folder, {"method": "kd", "kd_stage": "coupled"})
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in config and "icot" not in config and not (folder / "icot_model.py").exists()
