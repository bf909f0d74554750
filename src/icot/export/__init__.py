"""Model directories that answer through plain transformers, without icot.

Every directory icot saves carries `icot_model.py` (this package's remote code: imports only
torch and transformers), named in config.json's `auto_map`, with the method's decoding settings
in config.json's `icot` record; its tokenizer reads the data format's `||` as SEP, so that

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True).generate(**tokenizer(["INPUT||"], ...))

writes what `icot predict` writes, and the answer is the text after `####`. `icot export DIR OUT`
gives an older directory the same files. Each method's route (docs/methods/*.md):

- explicit, nocot: the class only ends generation at the answer (plain generate stops at the
  first SEP, where the CoT ends);
- stepwise: the class also shifts positions by the gap the removed CoT left (keep_position);
- coconut, codi: the class also runs the continuous thoughts (CODI's through its projection);
- kd: refused (KD_REFUSAL says why).

icot itself loads these directories as before, without remote code (transformers uses its own
class when trust_remote_code is not given).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from icot.errors import UserError, warn

REMOTE_FILE = "icot_model.py"
SOURCE = Path(__file__).with_name(REMOTE_FILE)
PROJECTION = "codi_projection.safetensors"  # CodiModel.modules_file, which the remote code reads
BAR = "||"  # the data format's mark between the input and the CoT: SEP in the model's layout
DEFAULT_NEW_TOKENS = 512  # generate's default budget (transformers' own, 20 tokens in all, cuts CoTs short)
KD_REFUSAL = ("an ICoT-KD model answers with two networks, its emulator's predicted hidden states mixed into the "
              "student's layers, which one transformers class with the architecture's weights cannot load")


def plain_settings(meta: dict, sep_id: int) -> dict:
    """config.json's `icot` record: what the remote class does when it answers (icot_model.py)."""
    from icot.evaluate import saved_gap

    method = meta.get("method")
    settings = {"method": method, "sep_token_id": sep_id}
    gap = saved_gap(meta)
    if gap.size:
        settings.update(position_gap=gap.size, gap_from=gap.from_token)
    if method == "coconut":
        thoughts = min(meta["coconut_stage"], meta["max_latent_stage"]) * meta["c_thought"]
        settings.update(thoughts=thoughts, thought_tokens=meta["thought_tokens"])
    elif method == "codi":
        settings.update(thoughts=meta["thoughts"], thought_tokens=meta["thought_tokens"], projection=meta["projection"])
    return settings


def exportable(meta: dict) -> bool:
    return meta.get("method") != "kd"


def write_remote_code(folder, meta: dict) -> None:
    """Into a model directory being written (config.json, tokenizer files and icot.json there): the
    remote code, auto_map and settings, the tokenizer's `||`, generate's defaults. A method that
    cannot answer through one class (ICoT-KD) gets none, nor keeps any it inherited."""
    folder = Path(folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if not exportable(meta):
        _write_json(config_file, {k: v for k, v in config.items() if k not in ("auto_map", "icot")})
        (folder / REMOTE_FILE).unlink(missing_ok=True)
        return
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise UserError(f"{folder}: no tokenizer.json; the remote code needs a fast tokenizer's file to read '{BAR}' "
                        "as SEP")
    architecture = _architecture(config, folder)
    sep_id = _bar_reads_as_sep(tokenizer_file, folder)
    config["auto_map"] = {"AutoModelForCausalLM": f"{Path(REMOTE_FILE).stem}.ICoT{architecture}"}
    config["icot"] = plain_settings(meta, sep_id)
    _write_json(config_file, config)
    shutil.copyfile(SOURCE, folder / REMOTE_FILE)
    _generation_defaults(folder)
    _left_padding(folder / "tokenizer_config.json")


def _architecture(config: dict, folder: Path) -> str:
    """The architecture's own causal-LM class, from transformers' public auto mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))
    if not isinstance(name, str):
        raise UserError(f"{folder}/config.json: model_type {config.get('model_type')!r} has no causal-LM class in "
                        "transformers; expected a transformers causal LM")
    return name


def _bar_reads_as_sep(tokenizer_file: Path, folder: Path) -> int:
    """tokenizer.json rewritten so that `||` is read as the EOS token (SEP): a normalizer replaces
    it by the EOS text, which the tokenizer then matches as its special token. SEP's id."""
    from tokenizers import Tokenizer

    state = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    eos = _eos_text(folder)
    replace = {"type": "Replace", "pattern": {"String": BAR}, "content": eos}
    normalizer = state.get("normalizer")
    if replace not in (normalizer, *(normalizer or {}).get("normalizers", [])[:1]):  # not there yet (a re-save)
        state["normalizer"] = replace if normalizer is None else {"type": "Sequence", "normalizers": [replace, normalizer]}
    for token in state.get("added_tokens", []):
        if token["content"] == eos:
            token["normalized"] = True  # matched in the normalized text, where `||` has become it
    core = Tokenizer.from_str(json.dumps(state))
    sep_id = core.token_to_id(eos)
    probe = core.encode(f"1{BAR}", add_special_tokens=False).ids
    if sep_id is None or probe[-1:] != [sep_id] or core.encode(BAR, add_special_tokens=False).ids != [sep_id]:
        raise UserError(f"{folder}: its tokenizer cannot be made to read '{BAR}' as its EOS token {eos!r}; the remote "
                        "code needs prompts written as `INPUT||`")
    _write_json(tokenizer_file, state)
    return sep_id


def _eos_text(folder: Path) -> str:
    config_file = folder / "tokenizer_config.json"
    eos = json.loads(config_file.read_text(encoding="utf-8")).get("eos_token") if config_file.is_file() else None
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if not isinstance(eos, str):
        raise UserError(f"{config_file}: no eos_token; icot's layout uses it as SEP")
    return eos


def _generation_defaults(folder: Path) -> None:
    """generation_config.json: no EOS stop (the class ends a row at its second SEP, after the
    answer; an EOS stop would end it at the first), greedy, a budget that fits a CoT."""
    file = folder / "generation_config.json"
    config = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    config.update(eos_token_id=None, do_sample=False, max_new_tokens=DEFAULT_NEW_TOKENS)
    _write_json(file, config)


def _left_padding(config_file: Path) -> None:
    """Batched prompts end together (left padding), as generation needs."""
    if config_file.is_file():
        _write_json(config_file, {**json.loads(config_file.read_text(encoding="utf-8")), "padding_side": "left"})


def _write_json(file: Path, value: dict) -> None:
    file.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")  # the order as written


# ----- icot export ------------------------------------------------------------------------------

def export(model_dir, out) -> Path:
    """A copy of the icot model directory `model_dir` in the new directory `out`, with the remote
    code (write_remote_code) and a model card that shows it; `out` must not exist or be empty."""
    from icot.modelcard import CARD, write_model_card
    from icot.paths import writing_aside

    source, out = Path(model_dir), Path(out)
    meta = _exportable_metadata(source)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty directory; expected a new directory to write the export to")
    tmp = out.with_name(f".{out.name}.export-tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with writing_aside(tmp, f"export {out}", "nothing was written there"):
            shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(".*"))
            write_remote_code(tmp, meta)
            if _icot_card(tmp / CARD):
                write_model_card(tmp, meta)
            else:
                warn(f"{out}/{CARD}: kept as it was (not a card icot wrote); the plain-transformers usage is in "
                     f"{REMOTE_FILE}'s docstring")
    except BaseException:  # a tokenizer that cannot read `||` too: nothing is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def _icot_card(card: Path) -> bool:
    """No README.md, or one icot wrote (its cards have a `## How to use` section); not one a user wrote."""
    return not card.exists() or "\n## How to use\n" in card.read_text(encoding="utf-8", errors="replace")


def _exportable_metadata(source: Path) -> dict:
    """icot.json of a model directory that export can give remote code to; else one line saying what is missing."""
    from icot.models import METADATA, read_metadata

    if not source.is_dir():
        raise UserError(f"{source}: not a directory; expected a model directory icot saved (RUN/best)")
    missing = [name for name in ("config.json", METADATA, "tokenizer.json") if not (source / name).is_file()]
    if not any(source.glob("*.safetensors")) and not any(source.glob("*.bin")):
        missing.append("model weights (*.safetensors)")
    if missing:
        raise UserError(f"{source}: no {', '.join(missing)}; expected a model directory icot saved (RUN/best)")
    meta = read_metadata(source)
    if not exportable(meta):
        raise UserError(f"{source}: cannot export: {KD_REFUSAL}; use icot to run it")
    if meta.get("method") == "codi" and meta.get("projection") is not None and not (source / PROJECTION).is_file():
        raise UserError(f"{source}: no {PROJECTION}; a CODI model's thoughts need its projection")
    return meta
