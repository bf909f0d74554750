"""Model cards: the README.md icot writes into every model directory it saves in training.

Hugging Face's convention: YAML metadata (library, pipeline, tags, measured results), then what
the model is, how it was trained, what it scored on the test set, where and when, and how to
load and query it. Everything comes from the model's icot.json (`metadata`), so a card can be
rewritten at any time, as it is once the test set has been measured.
"""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

import yaml

from icot.methods.registry import METHODS
from icot.paths import write_file

CARD = "README.md"

KD_STAGES = {
    "student": "stage (a), the mind-reading student: answers from the teacher's hidden states at SEP, so it needs "
               "the teacher and a gold CoT to answer (icot eval runs it; icot predict cannot)",
    "emulator": "stage (b), the thought emulator: predicts the teacher's hidden states from the input alone; "
                "it does not answer questions by itself",
    "coupled": "stage (c), the coupled model: the emulator's predicted states feed the student, which answers "
               "from the input alone",
}


def write_model_card(model_dir, metadata: dict) -> None:
    write_file(Path(model_dir, CARD), model_card(metadata, Path(model_dir)))


def add_evaluation(model_dir, evaluation: dict) -> None:
    """A measured test result into the model's icot.json and its card."""
    from icot.models import METADATA, read_metadata

    metadata = {**read_metadata(model_dir), "evaluation": evaluation}
    write_file(Path(model_dir, METADATA), json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    write_model_card(model_dir, metadata)


def evaluation_record(metrics: dict, data_file, batch_size: int, answer_match: str, device) -> dict:
    """What the card says about a test: the numbers, the data, and when and where they were measured."""
    return {"data": str(data_file), "examples": metrics["examples"], "accuracy": metrics["accuracy"],
            "examples_per_s": metrics["examples_per_s"], "mean_generated_tokens": metrics["mean_generated_tokens"],
            "batch_size": batch_size, "answer_match": answer_match, "date": datetime.date.today().isoformat(),
            "machine": describe_machine(device)}


def describe_machine(device) -> str:
    """`GPU NVIDIA H100 80GB HBM3, Linux x86_64, torch 2.4.0` or `CPU AMD EPYC 7B13 (2 threads), ...`."""
    import torch

    if device.type == "cuda":
        processor = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        threads = torch.get_num_threads()
        processor = f"CPU {_cpu_name()} ({threads} torch thread{'s' if threads > 1 else ''})"
    return f"{processor}, {platform.system()} {platform.machine()}, torch {torch.__version__}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or "unknown"


# ----- the card ----------------------------------------------------------------------------------

def model_card(meta: dict, model_dir: Path) -> str:
    name = model_dir.parent.name if model_dir.name == "best" else model_dir.name  # RUN/best is named by its run
    sections = [f"---\n{front_matter(meta, name).strip()}\n---", f"# {name}\n\n{summary(meta)}", training(meta),
                evaluation(meta), how_to_use(meta, model_dir)]
    if meta.get("config"):
        settings = yaml.safe_dump(meta["config"], sort_keys=False).strip()
        sections.append(f"<details><summary>Training config</summary>\n\n```yaml\n{settings}\n```\n\n</details>")
    return "\n\n".join(sections) + "\n"


def front_matter(meta: dict, name: str) -> str:
    """The card's metadata as Hugging Face Hub YAML, built with huggingface_hub's ModelCardData."""
    from huggingface_hub import EvalResult, ModelCardData

    tags = ["implicit-cot", meta.get("method", "unknown")]
    if meta.get("task") == "mult":
        tags.append("multiplication")
    measured = meta.get("evaluation")
    results = [EvalResult(task_type="text-generation", task_name=_task(meta), dataset_type=measured["data"],
                          dataset_name=Path(measured["data"]).name, metric_type="accuracy",
                          metric_value=measured["accuracy"],
                          metric_name=f"{_accuracy_name(measured)} (exact match of the answer, {measured['answer_match']})")
               ] if measured else None
    base = meta["base_model"] if _is_hub_id(meta.get("base_model")) else None
    return ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=tags, base_model=base,
                         model_name=name, eval_results=results).to_yaml()


def summary(meta: dict) -> str:
    method = meta.get("method", "unknown")
    what = METHODS[method].card if method in METHODS else f"method {method}"
    stage = f" This directory holds ICoT-KD's {KD_STAGES[meta['kd_stage']]}." if meta.get("kd_stage") in KD_STAGES else ""
    if meta.get("final_form") is False:
        stage += (f" **Its training ended before {method}'s final form: this model is of an earlier stage (see "
                  "icot.json), so it does not measure the method.**")
    return (f"A model for {_task(meta)}, trained by implicit-cot {meta.get('icot_version', '')} with {what}.{stage} "
            "Questions and answers are written as in its training data; for multiplication, icot reads "
            "ordinary numbers (`123*456`) and answers with one.")


def training(meta: dict) -> str:
    rows = [("method", f"`{meta.get('method')}`" + (f", ICoT-KD stage `{meta['kd_stage']}`" if meta.get("kd_stage") else "")),
            ("base model", _base_model(meta.get("base_model"))),
            ("parameters", _millions(meta["parameters"]) if meta.get("parameters") else None),
            ("training data", _training_data(meta)),
            ("saved at", f"step {meta['step']} (epoch {meta.get('epoch')})" if "step" in meta else None),
            *_settings(meta)]
    lines = ["## Training", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows if value is not None]
    return "\n".join(lines)


def _rewinds(count: int, config: dict) -> str:
    after, below, most = config.get("rewind_after"), config.get("rewind_below"), config.get("rewind_max")
    if config.get("rewind_to") == "start":
        return (f"{count} restarts before this model (after {after} validations in a row below {below} with the whole "
                f"CoT removed, back to the initial model with new data; at most {most})")
    return (f"{count} before this model (after {after} validations in a row below {below}, back to the "
            f"{config.get('rewind_to', 'last')} one at or above it; at most {most})")


def _late_pace(config: dict) -> str:
    if config.get("pace_late_from") is None:
        return ""
    until = config.get("pace_late_until")
    span = "on" if until is None else f"to {until - 1}"
    return f" ({config['pace_late_max_steps']} from token {config['pace_late_from']} {span})"


def _settings(meta: dict) -> list[tuple[str, str | None]]:
    """The settings that make this model what it is: CoT removal and positions, ICoT-KD's stages."""
    config = meta.get("config", {})
    rows = []
    if "cot_removed" in meta:
        rows.append(("CoT tokens removed", f"{meta['cot_removed']}" + (f" (from the {meta['removal_side']})"
                                                                       if meta.get("removal_side") else "")))
    if config.get("removal_pace") == "adaptive":
        rows.append(("removal pace", f"adaptive: the next token once {config['pace_accuracy']:.0%} of the recent "
                                     f"training sequences are right, at least {config['pace_min_steps']} and at most "
                                     f"{config['pace_max_steps']} steps each" + _late_pace(config)))
    elif config.get("removal_pace") == "fixed":
        rows.append(("removal pace", f"fixed: {config['remove_per_epoch']} tokens per epoch"))
    if "rewinds" in meta:
        rows.append(("rewinds", _rewinds(meta["rewinds"], config)))
    if "keep_position" in meta:
        rows.append(("keep_position", _positions(meta)))
    if meta.get("method") == "codi":
        shape = meta.get("projection")
        rows.append(("continuous thoughts", f"{meta.get('thoughts')}, each the last hidden state "
                                            + (f"through a projection MLP of width {shape['dim']}" if shape else "as it is")))
    for key, label in (("teacher", "teacher"), ("student", "student"), ("emulator", "emulator"), ("delta", "delta"),
                       ("subset", "layer subset"), ("mixture_size", "mixture size"),
                       ("freeze_emulator", "emulator frozen in stage (c)")):
        if key in meta:
            rows.append((label, f"`{meta[key]}`"))
    if config:
        rows.append(("optimisation", f"lr {config.get('lr')}, batch {config.get('batch_size')} x {config.get('grad_accum')} "
                                     f"accumulation, precision {config.get('precision')}, seed {config.get('seed')}"))
    return rows


def _positions(meta: dict) -> str:
    if not meta["keep_position"]:
        return "false: the answer moves up to where the removed CoT began"
    placement = {"authors": "the authors' placement: the token before the removed span moves up to its last slot",
                 "in_place": "in place: every kept token keeps its position"}
    placement = placement.get(meta.get("gap_placement"), meta.get("gap_placement"))
    return (f"true: the answer keeps the positions it had with the whole CoT; at inference a gap of "
            f"{meta.get('position_gap', 0)} positions after token {meta.get('position_gap_from', 0)} ({placement})")


def evaluation(meta: dict) -> str:
    measured = meta.get("evaluation")
    if not measured:
        return "## Evaluation\n\nTest accuracy and speed: not measured."
    name = _accuracy_name(measured)
    return (f"## Evaluation\n\n{name[0].upper()}{name[1:]} **{measured['accuracy']:.4f}** on {measured['examples']} "
            f"examples of `{measured['data']}` (exact match of the answer, {measured['answer_match']}); "
            f"{measured['examples_per_s']:.1f} examples/s at batch size {measured['batch_size']} (greedy decoding, "
            f"{measured['mean_generated_tokens']:.1f} generated tokens per answer). Measured {measured['date']} "
            f"on {measured['machine']}.")


def _accuracy_name(measured: dict) -> str:
    """A test file that repeats the training file measured training accuracy: the card says so."""
    return "training accuracy (the test file repeats the training file)" if measured.get("training_data") else "test accuracy"


def how_to_use(meta: dict, model_dir: Path) -> str:
    stage = meta.get("kd_stage")
    if stage in ("student", "emulator"):
        flag = f"--{stage}-dir {model_dir}"
        return (f"## How to use\n\nIt feeds the next ICoT-KD stage: `icot train --method kd --stage couple {flag} ...` "
                "(see implicit-cot's docs/methods/kd.md).")
    question = _example_question(meta)
    test_file = meta.get("evaluation", {}).get("data", "TEST_FILE")
    usage = (f"## How to use\n\n```bash\nicot predict --model {model_dir} \"{question}\"\n"
             f"icot eval --model {model_dir} --data {test_file}\n```\n\n```python\nimport icot\n\n"
             f"model = icot.load(\"{model_dir}\")\nprint(model.predict(\"{question}\"))\n```\n\n")
    method = METHODS.get(meta.get("method"))
    if meta.get("method") == "kd":
        return usage + ("The weights are a plain Hugging Face causal LM:\n\n```python\nfrom transformers import "
                        f"AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained(\"{model_dir}\")\n```"
                        f"\n\n{method.usage}")
    return usage + plain_usage(meta, model_dir) + (f" {method.usage}" if method else "")


def plain_usage(meta: dict, model_dir) -> str:
    """Answering with plain transformers, through the remote code beside the weights (icot.export)."""
    prompt = _data_format_question(meta)
    return ("Without icot, with transformers alone (the prompt is the question as a data line writes it, followed by "
            "`||`; the answer is what follows `####`):\n\n```python\nfrom transformers import AutoModelForCausalLM, "
            f"AutoTokenizer\n\ntokenizer = AutoTokenizer.from_pretrained(\"{model_dir}\")\n"
            f"model = AutoModelForCausalLM.from_pretrained(\"{model_dir}\", trust_remote_code=True)\n"
            f"inputs = tokenizer([\"{prompt}||\"], return_tensors=\"pt\")\n"
            "text = tokenizer.decode(model.generate(**inputs)[0], skip_special_tokens=True)\n"
            "print(text.split(\"####\")[-1].strip())\n```\n\n"
            "`icot_model.py` beside the weights (torch and transformers only) is the class that config.json's "
            "`auto_map` names: the architecture's own, plus what icot does when it answers, from config.json's `icot` "
            "settings.")


# ----- small helpers ----------------------------------------------------------------------------

def _task(meta: dict) -> str:
    from icot.data.mult import task_label

    return task_label(meta) or "question answering"


def _training_data(meta: dict) -> str | None:
    if not meta.get("train_file"):
        return None
    count = f"{meta['train_examples']} examples" if meta.get("train_examples") else "examples"
    return f"`{meta['train_file']}`: {count} of {_task(meta)}"


def _base_model(name: str | None) -> str | None:
    from icot.models import PRESETS

    if name is None:
        return None
    if name in PRESETS:
        arch, shape = PRESETS[name]
        layers = shape.get("n_layer") or shape.get("num_hidden_layers")
        heads = shape.get("n_head") or shape.get("num_attention_heads")
        width = shape.get("n_embd") or shape.get("hidden_size")
        return f"`{name}` preset: a {arch} shape ({layers} layers, {heads} heads, width {width}), random initialisation"
    return f"`{name}` ({'Hugging Face hub' if _is_hub_id(name) else 'local directory'})"


def _is_hub_id(name: str | None) -> bool:
    from icot.models import PRESETS
    from icot.paths import is_local_path

    return bool(name) and name not in PRESETS and not is_local_path(name) and not Path(name).exists()


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1e5 else f"{count:,}"


def _data_format_question(meta: dict) -> str:
    """_example_question as a data line writes it: `3 2 1 * 6 5 4` (digits least significant first)."""
    question = _example_question(meta)
    if "*" not in question:
        return "QUESTION"
    from icot.data.mult import mult_example

    a, b = (int(n) for n in question.split("*"))
    return mult_example(a, b).question


def _example_question(meta: dict) -> str:
    """A question of the model's own shape: `123*987` for a 3x3 multiplication model."""
    digits = meta.get("digits", "")
    if meta.get("task") == "mult" and "x" in digits and digits.replace("x", "").isdigit():
        a, b = (int(n) for n in digits.split("x"))
        return f"{('1234567890' * 4)[:a]}*{('9876543210' * 4)[:b]}"
    return "your question, written like the training data"
