#!/usr/bin/env bash
# Mutation testing of icot's core modules with mutmut (config: pyproject.toml [tool.mutmut]; notes and
# timings: docs/MUTATION.md). Not run in CI.
#   pip install -e ".[dev,mutation]"
#   bash benchmarks/mutation.sh 'icot.answers.*' 'icot.paths.*'   # only these modules' mutants
#   bash benchmarks/mutation.sh                                     # every core module (many hours on 2 cores)
#   mutmut results                    # survivors and the rest not killed; mutmut show NAME: its diff
# Results accumulate in mutants/ (git-ignored); delete it to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p mutants/src
# the subprocesses some tests start (python -m icot.cli ...) must import the mutants too, not the editable install
export PYTHONPATH="$PWD/mutants/src${PYTHONPATH:+:$PYTHONPATH}"
# one torch thread per mutant process: --max-children of them share the cores (and forking stays safe)
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
exec mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "$@"
