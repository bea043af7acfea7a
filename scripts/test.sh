#!/usr/bin/env bash
# Installs everything and runs the whole test suite (what CI runs). Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not slow"` for the fast daily subset.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
cd "$repo"
exec "$repo/.venv/bin/python" -m pytest "$@"
