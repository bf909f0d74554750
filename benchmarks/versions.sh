#!/usr/bin/env bash
# The tested version range (docs/RESULTS.md, "Tested versions"): in a fresh venv per case, install
# transformers and accelerate at the lower bounds pyproject.toml claims ("lowest") or at the newest
# releases below the next major ("newest"), icot from this checkout, then run the decoding,
# predict and eval tests.
#
#   benchmarks/versions.sh [lowest] [newest]     (default: both; about 5 minutes each on 2 cores)
#
# VENV_ROOT (default /tmp) holds the venvs, icot-versions-<case>, reused when present.
# JOBS (default 2) is pytest-xdist's worker count. Exit status: nonzero if any case fails.
set -euo pipefail
cd "$(dirname "$0")/.."
lower_bound() { sed -n "s/^ *\"$1>=\([0-9.]*\).*/\1/p" pyproject.toml; }
TESTS=(tests/test_generate.py tests/test_shipped_model.py tests/test_versions.py tests/test_train_eval.py
       tests/test_coconut.py)
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(lowest newest)
status=0
for case in "${cases[@]}"; do
    case "$case" in
        lowest) pins=("transformers==$(lower_bound transformers)" "accelerate==$(lower_bound accelerate)") ;;
        newest) pins=("transformers<6" "accelerate<2") ;;
        *) echo "unknown case '$case' (expected lowest or newest)" >&2; exit 2 ;;
    esac
    venv="${VENV_ROOT:-/tmp}/icot-versions-$case"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    # The CPU wheel of torch first, as in .ci/run.
    "$venv/bin/python" -m pip install -q torch==2.13.0
    "$venv/bin/python" -m pip install -q --upgrade "${pins[@]}"
    "$venv/bin/python" -m pip install -q -e . pytest pytest-xdist
    versions=$("$venv/bin/python" -c 'import accelerate, tokenizers, torch, transformers as t
print(f"transformers {t.__version__}, accelerate {accelerate.__version__}, tokenizers {tokenizers.__version__}, torch {torch.__version__}")')
    echo "== $case: $versions"
    if "$venv/bin/python" -m pytest -q -p no:cacheprovider -n "${JOBS:-2}" "${TESTS[@]}"; then
        echo "== $case: PASS ($versions)"
    else
        echo "== $case: FAIL ($versions)"
        status=1
    fi
done
exit $status
