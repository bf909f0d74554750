"""Shared fixtures: paths to the shipped reference data and one tiny trained model per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests see the traceback of any exception the CLI's last guard would turn into one line: bugs fail loudly.
os.environ.setdefault("ICOT_TRACEBACK", "1")
# Under pytest-xdist each worker takes its share of the cores (at least one thread): models this small
# gain little from a second thread, so two one-thread workers on two cores beat one two-thread process.
# Set before torch starts (icot.demo does not import it), so the subprocesses that tests launch inherit it too.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    from icot.demo import usable_cores

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "data" / "reference"


def run_cli(*args: str) -> int:
    from icot.cli import main

    return main([str(a) for a in args])


def mult_examples(a: int, b: int, n: int, seed: int) -> list:
    """n generated examples of AxB multiplication in the papers' format."""
    from icot.data.mult import MultTask, mult_example, sample_splits

    return [mult_example(x, y) for x, y in sample_splits(MultTask(a, b), {"train": n}, seed=seed)["train"]]


@pytest.fixture(scope="session")
def reference() -> Path:
    return REFERENCE


@pytest.fixture(scope="session")
def mult3_data(tmp_path_factory) -> Path:
    """32 training examples of 3x3 multiplication; valid and test are the same 32 (overfitting)."""
    from icot.data.format import write_examples

    out = tmp_path_factory.mktemp("mult3")
    examples = mult_examples(3, 3, 32, seed=0)
    for split in ("train", "valid", "test"):
        write_examples(out / f"{split}.txt", examples)
    return out


@pytest.fixture(scope="session")
def explicit_run(mult3_data, tmp_path_factory) -> Path:
    """A micro explicit-CoT model trained until it has memorised its 32 examples."""
    run = tmp_path_factory.mktemp("runs") / "explicit"
    code = run_cli("train", "--method", "explicit", "--data", mult3_data, "--model", "micro", "--out", run,
                   "--lr", "3e-3", "--batch-size", "32", "--epochs", "200", "--eval-every", "100", "--log-every", "50",
                   "--save-every", "200")
    assert code == 0
    return run
