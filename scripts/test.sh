#!/usr/bin/env bash
# Installs everything and runs the whole test suite (what CI runs). Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not slow"` for the fast daily subset.
#
# The tests run in parallel processes (pytest-xdist), one per core up to 4: each process
# holds its own TensorFlow (~1-2 GB), and most tests spend much of their time in
# single-threaded model building and tracing. `SOKD_TF_TEST_WORKERS=1` (or `-n 0` among
# the arguments) runs them in one process.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
cd "$repo"
cores="$(nproc 2>/dev/null || echo 1)"
workers="${SOKD_TF_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}"
exec "$repo/.venv/bin/python" -m pytest -n "$workers" "$@"
