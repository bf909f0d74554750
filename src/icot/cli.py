"""The `icot` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import textwrap
from pathlib import Path

from icot.answers import MODES as ANSWER_MODES
from icot import paths
from icot.errors import UserError, new_command, one_line
from icot.methods.registry import METHODS
from icot.probe import settings as probe_settings


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line (UserError) instead of usage + exit."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def _check_output_files(files, overwrite: bool, inputs=(), flag: str = "--out") -> None:
    """Every file a command writes can be written, before any work (paths.check_output_file)."""
    for file in files:
        paths.check_output_file(Path(file), flag, overwrite, inputs)


# ----- icot data -----------------------------------------------------------------------------

def cmd_data_mult(args) -> None:
    from icot.api import generate_mult

    files = generate_mult(args.digits, args.out, train=args.train, valid=args.valid, test=args.test, seed=args.seed,
                          exclude=args.exclude or [], overwrite=args.overwrite)
    for name, file in files.items():
        print(f"{file}: {getattr(args, name)} examples")


def cmd_data_gsm8k(args) -> None:
    from icot.data.format import is_jsonl, read_examples, write_examples
    from icot.data.gsm8k import HUB_PREFIX, convert_records, read_records, summary

    out = Path(args.out)
    inputs = ([] if args.input.startswith(HUB_PREFIX) else [args.input]) + (args.exclude or [])
    _check_output_files([out], args.overwrite, inputs)
    keep = args.incomplete == "keep"
    exclude = frozenset(example.question for path in args.exclude or [] for example in read_examples(path))
    records, total = read_records(args.input)
    conversion = convert_records(records, total, keep_incomplete=keep, keep_commas=args.keep_commas,
                                 line_format=not is_jsonl(out), exclude=exclude)
    report = summary(conversion, args.input, out, keep)
    if not conversion.examples:
        reasons = "; ".join(line.strip() for line in report[1:])
        raise UserError(f"{args.input}: no example to write from its {conversion.records} records ({reasons})")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_examples(out, conversion.examples)
    print("\n".join(report))


def cmd_data_stats(args) -> None:
    import numpy as np

    from icot.data.format import refuse_hub_name
    from icot.data.sources import Columns, read_splits

    tokenize = _stats_tokenizer(args.tokenizer)
    splits = []
    for path in args.files:  # all read before anything is printed
        refuse_hub_name(path)
        splits += read_splits(path, Columns()).values()
    print("| file | lines | input mean | input max | cot mean | cot max | answer mean | answer max |")
    print("|" + "---|" * 8)
    for split in splits:
        examples = split.examples
        lengths = {field: np.array([len(tokenize(getattr(e, field))) for e in examples])
                   for field in ("question", "cot", "answer")}
        cells = [f"{lengths[f].mean():.1f} | {lengths[f].max()}" for f in ("question", "cot", "answer")]
        print(f"| {split.label} | {len(examples)} | " + " | ".join(cells) + " |")
    print(f"(lengths in tokens of {args.tokenizer or 'the word-level tokenizer (space-separated words)'})")


def _stats_tokenizer(name):
    if name is None:
        return str.split
    from icot.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(name)
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def cmd_tokenizer_train(args) -> None:
    from icot.data.tokenizers import FILES, save_tokenizer, train_bpe

    paths.check_output_dir(Path(args.out), "--out")
    _check_output_files([Path(args.out) / name for name in FILES], args.overwrite, inputs=args.data)
    tokenizer = train_bpe(args.data, args.vocab_size)
    save_tokenizer(tokenizer, args.out)
    print(f"{args.out}: byte-level BPE with {len(tokenizer)} tokens; load it with AutoTokenizer.from_pretrained('{args.out}')")


# ----- icot train ----------------------------------------------------------------------------

def build_train_config(config_file, method, overrides_argv, resume=None):
    """Defaults < YAML file < command-line overrides; or, with `resume`, the run's saved config
    with the overrides a resume allows (api.train_config)."""
    from icot.api import train_config

    return train_config(config_file, _train_overrides(method, overrides_argv), resume)


def _train_overrides(method, overrides_argv) -> dict:
    from icot.config import parse_overrides

    values = parse_overrides(overrides_argv)
    return {**values, "method": method} if method is not None else values


def cmd_train(args, rest) -> None:
    from icot.api import trainer_for
    from icot.trainer import TrainingInterrupted

    if args.help:
        print(train_help(args.help_parser, args.method))
        args.help_parser.exit()
    if args.plan or args.require_fit:
        memory_plan = _train_plan(args, rest)  # before any work: nothing is written
        if args.plan:
            print(memory_plan.table())
            return
    trainer = trainer_for(args.config, _train_overrides(args.method, rest), args.resume)
    try:
        summary = trainer.fit()
    except TrainingInterrupted as stop:
        print(f"icot: {stop.describe(trainer.config.out)}", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    if trainer.is_main:
        print(json.dumps({k: v for k, v in summary.items() if k != "event"}, indent=2))
        print(f"best model: {Path(trainer.config.out) / 'best'}")


def _train_plan(args, rest):
    """The memory plan of this `icot train` (icot.plan); with --require-fit, a plan that does not fit
    is refused in one line."""
    from icot.plan import parse_memory, plan

    _, settings = build_train_config(args.config, args.method, rest, args.resume)
    memory = parse_memory(args.plan_gpu_memory) if args.plan_gpu_memory is not None else None
    if memory is None and args.require_fit:
        import torch

        if not torch.cuda.is_available():
            raise UserError("--require-fit: no GPU here to measure; give --plan-gpu-memory (e.g. 80GB)")
        memory = torch.cuda.get_device_properties(0).total_memory
    config_file = Path(args.resume) / "config.yaml" if args.resume else args.config
    result = plan(settings, config_file, strategy=args.plan_strategy, processes=args.plan_processes, gpu_memory=memory,
                  seq_len=args.plan_seq_len, plan_model=args.plan_model, vocab_size=args.plan_vocab_size)
    if args.require_fit and not result.fits:
        raise UserError(f"--require-fit: the plan does not fit: {result.total_bytes / 1e9:.2f} GB per process "
                        f"(parameters {result.parameter_bytes / 1e9:.2f}, gradients {result.gradient_bytes / 1e9:.2f}, "
                        f"optimizer {result.optimizer_bytes / 1e9:.2f}, the larger of activations "
                        f"{result.activation_bytes / 1e9:.2f} and AdamW step {result.step_bytes / 1e9:.2f}"
                        + (f", gathered {result.gathered_bytes / 1e9:.2f}" if result.gathered_bytes else "")
                        + f") > {memory / 1e9:.1f} GB; nothing was written (see icot train --plan)")
    return result


def train_help(parser, method) -> str:
    """argparse's help of `icot train`, then the config fields: the method's (all of them, shared
    ones included), or without a method the shared ones and the methods' names."""
    from icot.config import help_text
    from icot.methods import trainer_class
    from icot.trainer import TrainConfig

    how = ("(set one in the --config YAML file as `name: value`, or here as `--name value`, `--flag` / `--no-flag` "
           "for true/false, `--section.name value` in a section; docs/config.md lists them all)")
    if method is None:
        fields, title = help_text(TrainConfig), "config fields every method shares"
        methods = f"\n\nmethods: {', '.join(METHODS)}; icot train --method METHOD --help lists a method's fields"
    else:
        fields, title, methods = help_text(trainer_class(method).config_class), f"config fields of --method {method}", ""
    intro = textwrap.fill(f"{title} {how}:", width=100)
    return f"{parser.format_help()}\n{intro}\n{fields}{methods}"


def cmd_push(args) -> None:
    from icot.api import push

    print(f"{args.model}: uploaded to {push(args.model, args.repo_id, private=args.private)}")


def cmd_export(args) -> None:
    from icot.export import export

    print(f"{export(args.model, args.out)}: answers through transformers' AutoModelForCausalLM "
          "(trust_remote_code=True); its README.md shows how")


# ----- icot eval / predict -------------------------------------------------------------------

def cmd_eval(args) -> None:
    from icot.api import check_eval_settings, load

    check_eval_settings(args.batch_size, args.max_examples, args.max_new_tokens)  # before the model loads
    if args.show < 0:
        raise UserError(f"--show {args.show}: must not be negative")
    if args.json:  # before the evaluation, which may take long
        _check_output_files([args.json], args.overwrite, inputs=[args.data, args.model], flag="--json")
    model = load(args.model, device=args.device)
    columns = {name: getattr(args, f"columns_{name}") for name in ("question", "cot", "answer", "answer_format", "split")
               if getattr(args, f"columns_{name}") is not None}
    result = model.evaluate(args.data, max_examples=args.max_examples, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, answer_match=args.answer_match, split=args.split,
                            columns=columns)
    metrics = {k: v for k, v in result.items() if k != "predictions"}
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    for p in result["predictions"][: args.show]:
        mark = "ok " if p["correct"] else "BAD"
        cot = f"  cot: {p['cot']}\n" if p["cot"] else ""
        print(f"\n[{mark}] {p['question']}\n{cot}  predicted: {p['answer']}\n  reference: {p['reference']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        paths.write_file(Path(args.json), json.dumps(result, indent=2) + "\n")


def cmd_predict(args) -> None:
    from icot.api import load

    model = load(args.model, device=args.device)
    for text in args.inputs:
        prediction = model.generate(text)
        print(prediction.papers_line() if args.papers_format else prediction.line())


# ----- icot lm-eval -------------------------------------------------------------------------

def cmd_lm_eval(args, rest) -> None:
    """lm-eval's `run` command with the `icot` model type registered and icot's tasks included:
    lm-eval 0.4 finds a model type only in its own package, so its own command cannot load ours."""
    try:
        from icot.lm_eval import TASKS_DIR, check_task_files
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] != "lm_eval":
            raise
        raise UserError("icot lm-eval needs lm-evaluation-harness: pip install 'implicit-cot[lmeval]'") from None

    wanted = argparse.ArgumentParser(add_help=False)
    wanted.add_argument("--tasks", "-t", nargs="+", default=[])
    wanted.add_argument("--include_path")
    known, _ = wanted.parse_known_args(rest)
    if known.include_path is not None:
        raise UserError(f"icot lm-eval --include_path {known.include_path}: icot lm-eval includes its own tasks "
                        f"({TASKS_DIR}); give your task YAML files in --tasks by path instead")
    check_task_files([task for names in known.tasks for task in names.split(",") if task])
    from lm_eval.__main__ import cli_evaluate

    argv = sys.argv
    sys.argv = ["icot lm-eval", "run", *rest, "--include_path", str(TASKS_DIR)]
    try:
        cli_evaluate()
    except (ValueError, KeyError) as e:  # lm-eval's own refusals: an unknown task or model type, a bad argument
        message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        raise UserError(f"lm-eval: {message}") from None
    finally:
        sys.argv = argv


# ----- icot demo / report --------------------------------------------------------------------

def cmd_demo(args) -> None:
    from icot.demo import run_demo
    from icot.trainer import TrainingInterrupted

    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: must be at least 1")
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed {args.seed}: expected a whole number from 0 to 2**32 - 1")
    try:
        run_demo(args.out, overwrite=args.overwrite, quick=args.quick, jobs=args.jobs, seed=args.seed)
    except TrainingInterrupted as stop:
        print(f"icot: demo stopped by signal {stop.signum}; its results are incomplete: run it again with "
              f"--overwrite", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None


def cmd_report(args) -> None:
    from icot.report import comparison_table, plot_run, plot_runs, run_labels, summarize_run

    table = comparison_table([summarize_run(run, label) for run, label in zip(args.runs, run_labels(args.runs))])
    if args.out is None:
        for run in args.runs:
            paths.check_output_dir(Path(run) / "plots", "report")
            path = plot_run(run)
            print(f"{run}: {path if path else 'no training records to plot'}")
    else:
        out = Path(args.out)
        figure, table_file = out / "training.png", out / "runs.md"
        paths.check_output_dir(out, "--out")
        _check_output_files([figure, table_file], args.overwrite, inputs=args.runs)
        out.mkdir(parents=True, exist_ok=True)
        paths.write_file(table_file, table)
        drawn = plot_runs(args.runs, figure)
        print(f"{table_file}\n{drawn if drawn else 'no training records to plot'}")
    print(table, end="")


def cmd_compare(args) -> None:
    from icot.compare import compare
    from icot.trainer import TrainingInterrupted

    try:
        compare(args.spec, seeds=args.seeds, budget=args.budget, out=args.out, methods=args.methods)
    except TrainingInterrupted as stop:
        print(f"icot: comparison stopped by signal {stop.signum} at step {stop.step} of a run, its checkpoint saved; "
              f"run the same icot compare again to go on", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None


# ----- icot probe ----------------------------------------------------------------------------

def cmd_probe(args) -> None:
    from icot.api import resolve_device
    from icot.probe.run import probe_models

    out = Path(args.out)
    numbers, figure, tables = out / "probe.json", out / "probe.png", out / "probe.md"
    paths.check_output_dir(out, "--out")
    _check_output_files([numbers, figure, tables], args.overwrite, inputs=[args.data, *args.model])
    settings = probe_settings.ProbeSettings(
        targets=args.targets, sites=tuple(args.at), max_examples=args.max_examples, held_out=args.held_out, seed=args.seed,
        l2=args.l2, cot_tokens=args.cot_tokens, input_window=args.input_window, batch_size=args.batch_size)
    results = probe_models(args.model, args.data, settings, device=resolve_device(args.device))
    out.mkdir(parents=True, exist_ok=True)
    paths.write_file(numbers, json.dumps(results.to_json(), indent=2) + "\n")
    paths.write_file(tables, results.markdown())
    results.plot(figure)
    print(results.markdown(), end="")
    print(f"\n{numbers}\n{tables}\n{figure}")


def _column_options(parser) -> None:
    """--columns.question NAME, ...: the column mapping, spelled as `icot train` spells it."""
    from icot.config import describe
    from icot.data.sources import Columns

    for row in describe(Columns):
        parser.add_argument(f"--columns.{row['name'].replace('_', '-')}", dest=f"columns_{row['name']}",
                            metavar="NAME" if not row["choices"] else None, choices=row["choices"],
                            help=f"{row['help']} (default {row['default']})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="icot", description="Implicit chain-of-thought: train, evaluate and inspect models.",
                     parents=[_traceback_flag()])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    data = sub.add_parser("data", help="generate and inspect data").add_subparsers(dest="data_command", required=True,
                                                                                   parser_class=_Parser)
    mult = data.add_parser("mult", help="generate multiplication data in the papers' format")
    mult.add_argument("--digits", required=True, help="AxB, e.g. 4x4")
    mult.add_argument("--train", type=int, default=808000)
    mult.add_argument("--valid", type=int, default=1000)
    mult.add_argument("--test", type=int, default=1000)
    mult.add_argument("--seed", type=int, default=0)
    mult.add_argument("--out", required=True)
    mult.add_argument("--exclude", nargs="+", metavar="FILE", help="keep these files' operand pairs out of every split")
    mult.add_argument("--overwrite", action="store_true")
    mult.set_defaults(func=cmd_data_mult)
    gsm = data.add_parser("gsm8k", help="convert official GSM8K JSONL (or hf:NAME) to the papers' format")
    gsm.add_argument("--input", required=True, metavar="FILE.jsonl|hf:NAME[:CONFIG[:SPLIT]]",
                     help="records with 'question' and 'answer' (a solution ending in '#### N'), "
                          "e.g. test.jsonl or hf:openai/gsm8k:main:test (needs the 'datasets' library)")
    gsm.add_argument("--out", required=True, help="FILE.txt (line format) or FILE.jsonl")
    gsm.add_argument("--incomplete", choices=["keep", "drop"], default="keep",
                     help="records without <<...>> annotations or with a non-numeric answer: keep them "
                          "(empty CoT, answer as written; the default, as the papers' files do) or drop them")
    gsm.add_argument("--exclude", nargs="+", metavar="FILE",
                     help="drop records whose question is in these data files, e.g. the papers' validation "
                          "split data/reference/gsm8k/valid.txt when converting the official train set")
    gsm.add_argument("--keep-commas", action="store_true",
                     help="keep thousands separators in answers (2,125) as the papers' files do")
    gsm.add_argument("--overwrite", action="store_true")
    gsm.set_defaults(func=cmd_data_gsm8k)
    stats = data.add_parser("stats", help="examples and token lengths of data files")
    stats.add_argument("files", nargs="+", help="data files (any format icot train reads), directories of split files "
                                                "or saved datasets; the default column names")
    stats.add_argument("--tokenizer", help="tokenizer directory or hub id (default: space-separated words)")
    stats.set_defaults(func=cmd_data_stats)

    tok = sub.add_parser("tokenizer", help="tokenizers").add_subparsers(dest="tok_command", required=True, parser_class=_Parser)
    bpe = tok.add_parser("train", help="train a byte-level BPE on data files")
    bpe.add_argument("--data", nargs="+", required=True)
    bpe.add_argument("--vocab-size", type=int, default=4096)
    bpe.add_argument("--out", required=True)
    bpe.add_argument("--overwrite", action="store_true")
    bpe.set_defaults(func=cmd_tokenizer_train)

    train = sub.add_parser("train", help="train a model; any config field can be overridden: --lr 1e-4", add_help=False)
    train.add_argument("-h", "--help", action="store_true",
                       help="show this help and the config fields (of --method, if given), then exit")
    train.add_argument("--config", help="YAML experiment file (configs/)")
    train.add_argument("--method", help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()))
    train.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its last checkpoint")
    plan = train.add_argument_group(
        "memory plan", "print per process the bytes of parameters, gradients, AdamW state and activations, built on "
                       "the meta device (no weights read, no download; docs/plan.md), then exit writing nothing")
    plan.add_argument("--plan", action="store_true", help="print the plan and exit, instead of training")
    plan.add_argument("--plan-processes", type=int, default=1, metavar="N", help="processes (GPUs) (default 1)")
    plan.add_argument("--plan-strategy", choices=["ddp", "fsdp"],
                      help="ddp: every process holds it all; fsdp: parameters, gradients and optimizer state "
                           "sharded over the processes (default: fsdp if the config says fsdp: true, else ddp)")
    plan.add_argument("--plan-gpu-memory", metavar="SIZE", help="GPU memory per process, e.g. 80GB or 40GiB: the "
                                                                "plan says whether it fits")
    plan.add_argument("--plan-seq-len", type=int, metavar="TOKENS",
                      help="tokens per row for the activations (default: max_len_train, else the training data's "
                           "longest row when the data and tokenizer are here, else the model's positions up to 1024)")
    plan.add_argument("--plan-model", metavar="MODEL",
                      help="plan this architecture (a preset, a directory or a hub id) instead of the config's model, "
                           "e.g. for a run directory not trained yet")
    plan.add_argument("--plan-vocab-size", type=int, metavar="N", help="the vocabulary size to plan with (default: "
                                                                       "the model's, or a preset's word-level one)")
    plan.add_argument("--require-fit", action="store_true",
                      help="plan first and refuse in one line, before any work, if it does not fit --plan-gpu-memory "
                           "(default: this machine's GPU); with training, train when it fits")
    train.set_defaults(func=cmd_train, takes_rest=True, help_parser=train)

    ev = sub.add_parser("eval", help="accuracy and speed of a model on a data file")
    ev.add_argument("--model", required=True)
    ev.add_argument("--data", required=True, help="a data file (.txt, .jsonl, .json, .csv, .parquet), a directory of "
                                                 "split files or a saved dataset, or hf:NAME[:CONFIG] (docs/data.md)")
    ev.add_argument("--split", help="the split of data with splits (default: test); valid and validation are one")
    _column_options(ev)
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--max-examples", type=int)
    ev.add_argument("--max-new-tokens", type=int)
    ev.add_argument("--json", help="write metrics and predictions here")
    ev.add_argument("--show", type=int, default=0, metavar="K", help="print K examples")
    ev.add_argument("--answer-match", choices=ANSWER_MODES,
                    help="normalized: 1,000 = 1000.0 = $1000; exact: text after whitespace normalisation "
                         "(default: as the model was trained, else normalized)")
    ev.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: a GPU if there is one)")
    ev.add_argument("--overwrite", action="store_true")
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="answer questions, e.g. icot predict --model DIR '3719*3349'")
    pr.add_argument("--model", required=True)
    pr.add_argument("inputs", nargs="+", help="questions: a multiplication as '3719*3349' (or as in the data), "
                                              "else text written like the training data")
    pr.add_argument("--papers-format", action="store_true",
                    help="print what the model wrote as a data-file line, 'question||cot #### answer', "
                         "digits least significant first as in the papers (default: '3719*3349 = 12454931  (correct)')")
    pr.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: a GPU if there is one)")
    pr.set_defaults(func=cmd_predict)

    lm = sub.add_parser("lm-eval", add_help=False,
                        help="lm-evaluation-harness with the icot model type and icot's tasks, e.g. icot lm-eval "
                             "--model icot --model_args pretrained=DIR --tasks icot_mult_4x4 (every argument is "
                             "lm-eval run's: icot lm-eval --help; docs/lm_eval.md)")
    lm.set_defaults(func=cmd_lm_eval, takes_rest=True)

    push = sub.add_parser("push", help="upload a saved model directory to the Hugging Face Hub")
    push.add_argument("model", metavar="DIR", help="a saved model directory (RUN/best)")
    push.add_argument("repo_id", metavar="REPO_ID", help="the Hub model repository, e.g. user/mult4x4-stepwise")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.set_defaults(func=cmd_push)

    export = sub.add_parser("export", help="copy a model directory icot saved before this version, with the code that "
                                           "lets plain transformers answer with it")
    export.add_argument("model", metavar="DIR", help="a saved model directory (RUN/best)")
    export.add_argument("out", metavar="OUT", help="the new directory (must not exist, or be empty)")
    export.set_defaults(func=cmd_export)

    demo = sub.add_parser("demo", help="end-to-end demo on a small multiplication task (CPU)")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--overwrite", action="store_true")
    demo.add_argument("--quick", action="store_true", help="a much smaller run, for a smoke test")
    demo.add_argument("--jobs", type=int, default=None,
                      help="train the runs, and ICoT-KD's stages, side by side in up to this many processes, each "
                           "once the models it starts from are ready, the longest chain first (default on a CPU: one "
                           "one-thread process per core; 1 on a GPU)")
    demo.add_argument("--seed", type=int, default=1234,
                      help="every run's seed (initialisation, data order); the data is the same whatever the seed")
    demo.set_defaults(func=cmd_demo)

    report = sub.add_parser("report", help="compare run directories: a table and training curves")
    report.add_argument("runs", nargs="+")
    report.add_argument("--out", help="write training.png (all runs overlaid) and runs.md here "
                                      "(default: redraw each run's RUN/plots/training.png)")
    report.add_argument("--overwrite", action="store_true")
    report.set_defaults(func=cmd_report)

    compare = sub.add_parser("compare", help="train methods over several seeds at an equal budget, measure them on one "
                                             "test file: a table and a figure (docs/compare.md); a rerun resumes")
    compare.add_argument("spec", help="the comparison's YAML spec (e.g. configs/compare/mult3x3.yaml)")
    compare.add_argument("--seeds", type=int, nargs="+", metavar="SEED", help="these seeds instead of the spec's")
    compare.add_argument("--budget", metavar="KIND=AMOUNT",
                         help="instead of the spec's: examples=N (training examples per run) or wall=DURATION "
                              "(training time per run: 90s, 20m, 1.5h)")
    compare.add_argument("--out", help="the output directory instead of the spec's")
    compare.add_argument("--methods", nargs="+", metavar="NAME",
                         help="only these of the spec's entries (by name); with another --out, a second command "
                              "trains other entries side by side")
    compare.set_defaults(func=cmd_compare)

    defaults = probe_settings.ProbeSettings()
    about = {f.name: f.metadata["help"] for f in dataclasses.fields(probe_settings.ProbeSettings)}
    probe = sub.add_parser("probe", help="linear probes on hidden states: which layer holds which intermediate quantity")
    probe.add_argument("--model", action="append", required=True, metavar="DIR",
                       help="a saved model or run directory; repeat to compare models on the same data")
    probe.add_argument("--data", required=True, help="data file (ideally not the models' training data)")
    probe.add_argument("--out", required=True, help="directory for probe.json, probe.md, probe.png")
    probe.add_argument("--targets", default=defaults.targets, choices=probe_settings.TARGETS, help=about["targets"])
    probe.add_argument("--at", nargs="+", default=list(defaults.sites), metavar="SITE", help=about["sites"])
    probe.add_argument("--max-examples", type=int, default=defaults.max_examples, help=about["max_examples"])
    probe.add_argument("--held-out", type=float, default=defaults.held_out, help=about["held_out"])
    probe.add_argument("--seed", type=int, default=defaults.seed, help=about["seed"])
    probe.add_argument("--l2", type=float, default=defaults.l2, help=about["l2"])
    probe.add_argument("--cot-tokens", type=int, default=defaults.cot_tokens, help=about["cot_tokens"])
    probe.add_argument("--input-window", type=int, default=defaults.input_window, help=about["input_window"])
    probe.add_argument("--batch-size", type=int, default=defaults.batch_size, help=about["batch_size"])
    probe.add_argument("--device")
    probe.add_argument("--overwrite", action="store_true")
    probe.set_defaults(func=cmd_probe)
    return parser


def _quiet_libraries() -> None:
    """Keep our progress bars and messages readable: no per-load bars or advisory warnings.

    Set through the variables transformers and huggingface_hub read when first imported, so that no
    command imports them to quiet them (a command that answers with a saved model imports only what
    loading it needs); where they are imported already (the Python API or a test before the command),
    through their own functions. accelerate's logger is quieted by name, before it exists.

    Python warnings (warnings.warn) are not filtered here: in normal use no library raises one under
    the tested versions (docs/RESULTS.md, "Tested versions"; tests/test_versions.py checks that
    predict's stderr stays empty with every warning shown). Fix the cause of a new one, e.g. a
    deprecated argument, rather than hiding it; only a known, harmless one belongs here, named."""
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # the hub's bars too
    elif "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def _traceback_flag() -> argparse.ArgumentParser:
    """--traceback, read before the command line proper so that it may stand anywhere in it."""
    flag = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    flag.add_argument("--traceback", action="store_true",
                      help="on an unexpected error, show the whole traceback (for bug reports; or set ICOT_TRACEBACK=1)")
    return flag


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so that it stops as on Ctrl-C: what it was writing
    aside is removed on the way out (Python's default ends the process on the spot)."""


def _raise_terminated(signum, frame):
    raise _Terminated


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    flags, argv = _traceback_flag().parse_known_args(argv)
    show_traceback = flags.traceback or os.environ.get("ICOT_TRACEBACK", "") not in ("", "0")
    new_command()
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: signals stay as they are
        previous = None
    try:
        return _run(argv, show_traceback)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str], show_traceback: bool) -> int:
    try:
        _quiet_libraries()
        parser = build_parser()
        args, rest = parser.parse_known_args(argv)
        if rest and not getattr(args, "takes_rest", False):
            raise UserError(f"icot {args.command}: unrecognized arguments: {' '.join(rest)}")
        if getattr(args, "takes_rest", False):
            args.func(args, rest)
        else:
            args.func(args)
    except UserError as e:
        print(f"icot: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        terminated = isinstance(e, _Terminated)
        print(f"icot: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + signal.SIGTERM if terminated else 130
    except Exception as e:  # the last guard: a short message instead of a traceback, unless asked for
        if show_traceback:
            raise
        print(f"icot: error: {one_line(_unexpected(e))}", file=sys.stderr)
        return 2 if isinstance(e, OSError) else 1
    return 0


def _unexpected(e: Exception) -> str:
    """One line for an exception no check caught: the system's words for an OSError (a disk, a
    permission), else a probable bug with how to report it."""
    hint = "rerun with --traceback (or ICOT_TRACEBACK=1) for details"
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror} ({hint})"
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return f"unexpected {type(e).__name__}: {first} (probably a bug in icot: {hint} and report it)"


if __name__ == "__main__":
    sys.exit(main())
