#!/usr/bin/env bash
# Install the package with its test extras in .venv and run the test suite.
#   bash test.sh              the default suite (fast; slow end-to-end tests deselected)
#   bash test.sh --all        everything, slow end-to-end tests included (what CI runs)
#   bash test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test,deepspeed]"
export PATH="$PWD/.venv/bin:$PATH"
if [ "${1:-}" = "--all" ]; then shift; MARK=(); else MARK=(-m "not slow"); fi
exec python -m pytest "${MARK[@]}" "$@"
