"""Judge one module's mutants by hand as benchmarks/mutants_by_hand.sh does, one pytest run per mutant,
but each run forked from a process that has imported the module (torch, transformers, icot) once: a
mutant costs the tests' time and a few tenths of a second, not 4 to 6 s of imports (docs/MUTATION.md):

    PYTHONPATH=mutants/src OMP_NUM_THREADS=1 python benchmarks/mutants_forked.py \\
        src/icot/methods/stepwise/schedule.py LOG tests/test_mutants_methods.py [-k EXPR]

Appends "NAME killed|survived|timeout|error rc=N" lines to LOG and skips the names LOG already judges;
MUTANT_NAMES=REGEX judges only the names it matches (re.search: the functions these tests are for);
the original code must pass the tests first. The trampolines mutmut writes read MUTANT_UNDER_TEST at
each call, so the forked child runs the mutant named there. What the first run leaves in the modules
(seeded generators, caches) carries over to every child: tests that seed their own draws judge the same.
A function that a class body calls (a dataclass field's factory) runs when the module is imported, before
any fork: with MUTANT_RELOAD=1 each child imports the module again, so its mutants act.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from tqdm import tqdm
from tqdm.auto import tqdm as tqdm_auto

VERDICTS = {0: "survived", 1: "killed"}


def run_forked(name: str, args: list[str], timeout: float, reload=None) -> str:
    pid = os.fork()
    if pid == 0:
        os.environ["MUTANT_UNDER_TEST"] = name
        if reload is not None:
            importlib.reload(reload)  # its class bodies run again, with the mutant
        # tqdm's lock is shared by every process forked from here: one killed at its timeout while holding
        # it would hang the rest. Each run takes a lock of its own for tqdm's base class and tqdm.auto's (the
        # class icot draws its bars with); another subclass that made its own lock keeps it
        for bar_class in (tqdm, tqdm_auto):
            bar_class.set_lock(threading.RLock())
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1), os.dup2(devnull, 2)
        os._exit(int(pytest.main(["-x", "-q", "-n", "0", "-p", "no:cacheprovider", *args])))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            return VERDICTS.get(rc, f"error rc={rc}")
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "timeout"


def quiet(args: list[str]) -> int:
    saved = os.dup(1), os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1), os.dup2(devnull, 2)
    try:
        return int(pytest.main(["-q", "-n", "0", "-p", "no:cacheprovider", *args]))
    finally:
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)


def main() -> None:
    source_file, log, *args = sys.argv[1:]
    if not any(Path(p).resolve() == Path("mutants/src").resolve() for p in sys.path if p):
        sys.exit("put mutants/src on PYTHONPATH")
    module = importlib.import_module(source_file.removeprefix("src/").removesuffix(".py").replace("/", "."))
    reload = module if os.environ.get("MUTANT_RELOAD") == "1" else None
    tqdm.monitor_interval = 0  # no tqdm monitor thread: a forked child would hang on a lock that thread held
    # the tests run once here on the original code: the plugins, conftest, test modules and whatever
    # the tests import on their way are then imported once, before any fork
    if quiet(args) != 0:
        sys.exit("the original code does not pass these tests")
    gc.freeze()  # pytest's gc.collect at its end then skips the preloaded objects: 1 s less a run
    names = json.loads(Path(f"mutants/{source_file}.meta").read_text())["exit_code_by_key"]
    names = [name for name in names if re.search(os.environ.get("MUTANT_NAMES", ""), name)]
    timeout = float(os.environ.get("MUTANT_TIMEOUT", 120))
    if (original := run_forked("", args, timeout, reload)) != "survived":
        sys.exit(f"the original code does not pass these tests in a forked run ({original})")
    log_path = Path(log)
    judged = {line.split()[0] for line in log_path.read_text().splitlines()} if log_path.exists() else set()
    with log_path.open("a") as out:
        for name in names:
            if name not in judged:
                print(name, run_forked(name, args, timeout, reload), file=out, flush=True)


if __name__ == "__main__":
    main()
