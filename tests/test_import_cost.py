"""Answering with a saved model imports only what answering needs: `icot predict` loads no training
code (the loop, a method's trainer, LoRA, plotting) and no library that transformers does not load
by itself for the same model; a command that needs no model imports no model library, not even to
quiet it. Which modules, not how long: the time is benchmarks/predict_speed.py's."""

import os
import subprocess
import sys

from conftest import ROOT, modules_after, modules_after_predict, training_modules

sys.path.insert(0, str(ROOT))  # the benchmarks package, for the same model loaded with transformers alone
from benchmarks.predict_speed import TRANSFORMERS_ALONE  # noqa: E402

SHIPPED = ROOT / "models" / "mult4x4-tiny-stepwise"


def libraries(modules: set[str]) -> set[str]:
    """The packages outside the standard library that `modules` come from."""
    return {name.split(".")[0] for name in modules} - set(sys.stdlib_module_names)


def test_predict_imports_no_training_code():
    loaded = modules_after_predict(SHIPPED, "1234*5678")
    assert "icot.methods.stepwise" in training_modules()  # the shipped model's own method's trainer among them
    assert not loaded & training_modules()


def test_predict_imports_no_library_that_transformers_alone_does_not():
    """accelerate among them: transformers imports it itself when it is installed, with any model."""
    alone = libraries(modules_after(TRANSFORMERS_ALONE, SHIPPED))
    assert {"torch", "transformers"} <= alone
    assert libraries(modules_after_predict(SHIPPED, "1234*5678")) - alone == {"icot"}


def test_a_command_without_a_model_imports_no_model_library(tmp_path):
    loaded = modules_after("import sys\nfrom icot.cli import main\nassert main(sys.argv[1:]) == 0",
                           "data", "mult", "--digits", "2x2", "--out", tmp_path, "--train", "20", "--valid", "0",
                           "--test", "5")
    assert (tmp_path / "train.txt").is_file()
    assert not {"torch", "transformers", "huggingface_hub", "accelerate"} & libraries(loaded)


def test_libraries_imported_before_the_command_are_quieted_too():
    """The Python API, then the command in the same process: transformers read its settings before the
    command could set them, so the command sets them through transformers (no loading bar, no advisory)."""
    code = ("import sys, transformers\nfrom transformers.utils import logging\nfrom icot.cli import main\n"
            "assert logging.is_progress_bar_enabled()\n"
            "assert main(['predict', '--model', sys.argv[1], '1234*5678']) == 0\n"
            "assert not logging.is_progress_bar_enabled() and logging.get_verbosity() == logging.ERROR")
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    done = subprocess.run([sys.executable, "-c", code, str(SHIPPED)], capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONWARNINGS": "default"})
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == "1234*5678 = 7006652  (correct)\n"
