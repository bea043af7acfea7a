#!/usr/bin/env bash
# Installs everything and runs the quickstart: teacher -> SOKD -> evaluate -> export -> report.
# Extra arguments are pipeline flags, e.g. `bash scripts/quickstart.sh --workdir=/tmp/run1`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
cd "$repo"
exec "$repo/.venv/bin/python" -m pipelines.run --preset=quickstart --workdir=workdir/quickstart "$@"
