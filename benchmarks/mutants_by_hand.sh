#!/usr/bin/env bash
# Judge one module's mutants by hand against named test files, one pytest process per mutant (docs/MUTATION.md):
#   bash benchmarks/mutants_by_hand.sh src/icot/data/layout.py LOG tests/test_mutants_data.py [-k EXPR]
# needs mutants/src as mutmut writes it (any `mutmut run` makes it); appends "NAME killed|survived|timeout|error"
# lines to LOG, and skips the mutants LOG already judges. A survivor passes these tests only: `mutmut show NAME`.
set -euo pipefail
cd "$(dirname "$0")/.."
source_file=$1 log=$2
shift 2
names=$(python -c 'import json, sys; print("\n".join(json.load(open(sys.argv[1]))["exit_code_by_key"]))' \
    "mutants/$source_file.meta")
touch "$log"
for name in $names; do
    grep -q "^$name " "$log" && continue
    set +e
    MUTANT_UNDER_TEST=$name PYTHONPATH="$PWD/mutants/src" OMP_NUM_THREADS=1 \
        timeout "${MUTANT_TIMEOUT:-120}" python -m pytest -x -q -n 0 -p no:cacheprovider "$@" > /dev/null 2>&1
    rc=$?
    set -e
    case $rc in
        0) verdict=survived ;;
        1) verdict=killed ;;
        124) verdict=timeout ;;
        *) verdict="error rc=$rc" ;;
    esac
    echo "$name $verdict" >> "$log"
done
