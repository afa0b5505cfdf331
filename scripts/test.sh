#!/usr/bin/env bash
# Sets up, then runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
# Two pytest workers (TFROBUST_TEST_WORKERS; 0 runs in this process), each taking whole files, so a file's
# module fixtures are built once.
exec .venv/bin/python -m pytest -q -n "${TFROBUST_TEST_WORKERS:-2}" --dist loadfile "$@"
