"""lm-evaluation-harness's `icot` model type: a model icot saved, answering as `icot eval` decodes it.

Importing this module registers the model type `icot` with lm-eval (the `lmeval` extra):

    lm_eval.simple_evaluate(model="icot", model_args="pretrained=DIR", tasks=["icot_mult_4x4"],
                            task_manager=TaskManager(include_path=str(TASKS_DIR)))

`icot lm-eval ...` runs lm-eval's command line with this module imported and TASKS_DIR included.

A request's context is a question written as in the data files, `input||` (the `||` is the
layout's SEP, which icot adds itself); the continuation returned is the rest of the data-file line
as the model writes it, `cot #### answer` (` #### answer` for an implicit model). The model is
generation-only: icot's methods define how a model answers (a stepwise model's position gap,
ICoT-KD's emulator, Coconut's and CODI's continuous thoughts), not the probability of an
arbitrary text, so the loglikelihood requests are refused (lm-eval's `hf` model scores the raw
network of a plain model directory).
"""

from __future__ import annotations

import logging
from pathlib import Path

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from icot.data.layout import ANSWER_MARK
from icot.errors import UserError

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
PROMPT_END = "||"
DEFAULT_BATCH_SIZE = 64  # icot eval's
DEFAULT_MAX_GEN_TOKS = 256
LM_EVAL_DEFAULT_DEVICE = "cuda:0"
GREEDY = {"do_sample": (False,), "temperature": (0, 0.0)}  # the settings that mean greedy decoding


class _NoCustomDatasetAdvice(logging.Filter):
    """lm-eval advises, for every task that loads its data with a function (custom_dataset, as
    icot's tasks do), passing that function's arguments through --metadata; icot's take theirs from
    the task YAML, so the advice only misleads. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


logging.getLogger("lm_eval.api.task").addFilter(_NoCustomDatasetAdvice())


@register_model("icot")
class IcotLM(LM):
    """An icot model directory (or any causal LM icot can load) behind lm-eval's LM interface."""

    def __init__(self, pretrained: str | None = None, batch_size: int | str | None = None,
                 max_batch_size: int | None = None, device: str | None = None, **unknown):
        """lm-eval passes max_batch_size, the bound of its own batch-size search, which icot does not run."""
        super().__init__()
        from icot.api import load

        if unknown:
            raise UserError(f"--model_args {', '.join(sorted(unknown))}: not an argument of the icot model type; "
                            "expected pretrained=DIR (and lm-eval's --batch_size, --device)")
        if pretrained is None:
            raise UserError("the icot model type needs the model: --model_args pretrained=DIR")
        self.batch_size = _batch_size(batch_size)
        self.predictor = load(pretrained, device=_device(device)).predictor

    @property
    def device(self):
        return self.predictor.device

    def generate_until(self, requests) -> list[str]:
        """Greedy continuations, in batches of similar prompt length, each cut at its first `until`
        string; generation stops at the model's end of answer or after `max_gen_toks` tokens."""
        import numpy as np

        from icot.data.batching import batch_indices_by_length

        questions = [question_of(request.args[0]) for request in requests]
        settings = [generation_settings(request.args[1]) for request in requests]
        prompts = self.prompts(questions)
        continuations: list[str | None] = [None] * len(requests)
        lengths = np.array([len(prompt) for prompt in prompts])
        for indices in batch_indices_by_length(lengths, self.batch_size):
            # one budget per batch: the largest asked, each row cut back to its own below
            budget = self.budget(max(settings[i][1] for i in indices), int(lengths[indices].max()))
            generated = self.predictor.generate([prompts[i] for i in indices], budget)
            for i, tokens in zip(indices, generated):
                until, max_gen_toks = settings[i]
                continuations[i] = cut_at(self.continuation(tokens[:max_gen_toks]), until)
        return continuations

    def prompts(self, questions: list[str]) -> list[list[int]]:
        """Token ids of `[BOS] question SEP`, as icot eval encodes a data file's questions; a question
        the model's vocabulary cannot read at all is an error (evaluate.check_known_tokens)."""
        from icot.data.format import Example
        from icot.data.layout import encode
        from icot.evaluate import check_known_tokens

        encoded = encode(self.predictor.tokenizer, self.predictor.layout, [Example(q, "", "") for q in questions])
        check_known_tokens(self.predictor.tokenizer, encoded, "lm-eval requests", numbered_lines=False)
        return [encoded.prompt(i) for i in range(len(encoded))]

    def budget(self, max_gen_toks: int, prompt_width: int) -> int:
        """New tokens to allow: `max_gen_toks`, or fewer where the model's positions end sooner."""
        from icot.models import max_positions

        limit = max_positions(self.predictor.model)
        if limit is None:
            return max_gen_toks
        room = limit - prompt_width - self.predictor.gap().size
        if room < 1:
            raise UserError(f"an lm-eval request of {prompt_width} tokens leaves no room to answer in the model's "
                            f"{limit} positions; expected shorter questions")
        return int(min(max_gen_toks, room))

    def continuation(self, tokens: list[int]) -> str:
        """The rest of the data-file line, `cot #### answer` (an empty CoT leaves ` #### answer`), from
        the method's own reading of what the model wrote; no answer (a CoT cut short): the CoT alone."""
        cot, answer = self.predictor.decode(tokens)
        return f"{cot} {ANSWER_MARK} {answer}" if answer else cot

    def loglikelihood(self, requests):
        raise UserError(generation_only("loglikelihood"))

    def loglikelihood_rolling(self, requests):
        raise UserError(generation_only("loglikelihood_rolling"))


def task_examples(data_file) -> list:
    """The examples of an icot task's `dataset_kwargs: {data_file: FILE}`, read as icot reads a data
    file (a malformed line is an error naming its file and line); a relative path is read from the
    current directory, as every path icot is given."""
    from icot.data.format import read_examples

    if not data_file:
        raise UserError("an icot lm-eval task names no data file; expected dataset_kwargs: {data_file: FILE} in its YAML")
    path = Path(data_file)
    if not path.is_absolute() and not path.exists():
        raise UserError(f"{path}: no such file (an lm-eval task's data_file; a relative one is read from the current "
                        f"directory, {Path.cwd()})")
    return read_examples(path)


def check_task_files(tasks: list[str]) -> None:
    """Before any model loads: the data file of every icot task asked for by name or tag is read, so
    that one naming a missing or malformed file stops the run in one line. (A task given as a YAML
    file reads its data file when lm-eval builds it, after the model loads: the same line.)"""
    from lm_eval.tasks import TaskManager

    for entry in TaskManager(include_path=str(TASKS_DIR), include_defaults=False).task_index.values():
        kwargs = (entry.cfg or {}).get("dataset_kwargs") or {}
        if (entry.name in tasks or entry.tags & set(tasks)) and "data_file" in kwargs:
            try:
                task_examples(kwargs["data_file"])
            except UserError as e:
                raise UserError(f"lm-eval task {entry.name}: {e}") from None


def answer_of(continuation: str) -> str:
    """The answer in a continuation `cot #### answer`: the text after the last `####` ('' if there is
    none; a data line's answer holds none, a model's CoT may)."""
    _, mark, answer = continuation.rpartition(ANSWER_MARK)
    return answer.strip() if mark else ""


def answer_correct(continuation: str, reference: str) -> bool:
    """Whether a continuation's answer is the reference, compared as icot eval compares answers by
    default (normalized)."""
    from icot.answers import AnswerMatcher

    return AnswerMatcher().same(answer_of(continuation), reference)


def generation_only(kind: str) -> str:
    return (f"the icot model type is generation-only: icot decodes a model as its method answers, which defines no "
            f"{kind} of other text; use tasks with output_type generate_until (icot's: icot_mult_4x4, icot_gsm8k, ...), "
            "or lm-eval's hf model type for the raw network of a plain model directory")


def _batch_size(value) -> int:
    """lm-eval's --batch_size: a number, or auto / auto:N (icot's default: its decoding drops finished rows)."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except ValueError:
        raise UserError(f"--batch_size {value}: expected a whole number or auto") from None
    if size < 1:
        raise UserError(f"--batch_size {value}: must be at least 1")
    return size


def _device(name: str | None) -> str | None:
    """lm-eval's command line passes cuda:0 when no --device is given; as its hf model type does,
    that means a GPU if there is one (None: icot's choice, the same)."""
    import torch

    return None if name == LM_EVAL_DEFAULT_DEVICE and not torch.cuda.is_available() else name


def question_of(context: str) -> str:
    """The question of a request, `input||` as in the data files (or the input alone): one question,
    since icot's models were trained on one question a row, without few-shot examples."""
    question = context.strip().removesuffix(PROMPT_END).strip()
    if PROMPT_END in question:
        raise UserError(f"an lm-eval request holds '{PROMPT_END}' before its end ({question[:60]!r}...): few-shot "
                        "examples? icot's models answer one question; use --num_fewshot 0")
    if not question:
        raise UserError("an lm-eval request has an empty question; expected 'input||' as in the data files")
    return question


def generation_settings(kwargs: dict | None) -> tuple[list[str], int]:
    """(until, max_gen_toks) of a request's generation_kwargs; icot decodes greedily, so a request
    for sampling is refused rather than answered otherwise than asked."""
    kwargs = dict(kwargs or {})
    until = kwargs.pop("until", [])
    until = [until] if isinstance(until, str) else list(until)
    max_gen_toks = kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS)
    for key, allowed in GREEDY.items():
        if key in kwargs and kwargs.pop(key) not in allowed:
            raise UserError(f"generation_kwargs {key}: icot decodes greedily; expected {key} {allowed[0]} or none")
    if kwargs:
        raise UserError(f"generation_kwargs {', '.join(sorted(kwargs))}: not supported by the icot model type "
                        "(greedy decoding); expected until, max_gen_toks")
    if not isinstance(max_gen_toks, int) or isinstance(max_gen_toks, bool) or max_gen_toks < 1:
        raise UserError(f"generation_kwargs max_gen_toks {max_gen_toks!r}: expected a whole number of at least 1")
    return until, max_gen_toks


def cut_at(text: str, until: list[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
