"""The run directory: inputs checked, the old run replaced only when icot wrote it, the config saved."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import yaml

from icot import paths
from icot.data.format import is_hub_name, refuse_hub_name
from icot.errors import UserError
from icot.adapters import check_lora
from icot.sharding import layer_classes
from icot.models import empty_model, is_preset


def start_run_dir(run: Path, config, is_main: bool, wait_for_everyone, read_data) -> None:
    """A new run directory holding the resolved config and icot's marker. Every input is checked
    first and the data read (`read_data()`), so that bad data writes nothing; an existing non-empty
    directory is replaced only with `overwrite` and only if icot wrote it (paths.check_fresh_dir);
    an unwritable or full one fails here, before any training."""
    inputs = check_inputs(config)
    hint = f" or --resume {run} to continue it"
    replace = paths.check_fresh_dir(run, "--out", config.overwrite, inputs, hint)
    read_data()
    if replace and is_main:
        check_weights_readable(config)  # a damaged weights file must not cost the run it would replace
        shutil.rmtree(run)
    wait_for_everyone()
    if is_main:
        try:
            run.mkdir(parents=True, exist_ok=True)
            probe = run / ".write-test"
            probe.write_bytes(b"\0" * 1024 * 1024)
            probe.unlink()
        except OSError as e:
            raise UserError(f"{run}: cannot write to the run directory ({e.strerror})") from None
        paths.mark_as_ours(run)
        write_config(run, config)
    wait_for_everyone()


def write_config(run: Path, config) -> None:
    """RUN/config.yaml: the settings the run trains with (rewritten when a resume changes some)."""
    values = {k: v for k, v in dataclasses.asdict(config).items() if k != "overwrite"}
    paths.write_file(run / "config.yaml", yaml.safe_dump(values, sort_keys=False))


def check_data_readable(config) -> None:
    """Every split of local data reads (a one-line error naming the file and line or row)."""
    from icot.data.sources import read_run_data

    if not is_hub_name(config.data):
        files = {split: getattr(config, f"{split}_file") for split in ("train", "valid", "test")}
        read_run_data(config.data, files, config.columns)


def check_weights_readable(config) -> None:
    """The weights of a local model directory are whole (their headers are read, not the weights)."""
    from safetensors import SafetensorError, safe_open

    for weights in sorted(Path(config.model).glob("*.safetensors")) if Path(config.model).is_dir() else []:
        try:
            with safe_open(weights, "pt"):
                pass
        except (OSError, SafetensorError) as e:
            raise UserError(f"model {weights}: damaged weights file ({str(e).strip()[:200]})") from None


def check_inputs(config) -> list[Path]:
    """Data files and local model/tokenizer directories exist (before a run directory is replaced);
    returns every input path."""
    if not is_hub_name(config.data):
        for split, path in config.data_files().items():
            if path is not None and not Path(path).is_file():
                refuse_hub_name(path)
                problem = "not a regular file (a pipe or a device)" if Path(path).exists() else "no such file"
                raise UserError(f"{split}_file {path}: {problem}; expected a data file")
    for name in ("model", "tokenizer"):
        value = getattr(config, name)
        if value is not None and not is_preset(value) and value != "word":
            paths.check_local_dir(value, name)
    if config.lora.r or config.fsdp:
        model = empty_model(config.model, config.max_positions)
        if config.lora.r:
            check_lora(config.lora, config.model, model)
        if config.fsdp:
            layer_classes(model)  # a model without decoder layers to shard is refused here
    return paths.input_paths(config)
