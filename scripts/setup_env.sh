#!/usr/bin/env bash
# Creates or refreshes .venv with the pinned requirements and makes sure the
# offline Fashion-MNIST files exist. Sourced by scripts/quickstart.sh and scripts/test.sh.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3}"
venv="$repo/.venv"
stamp="$venv/.sokd_tf_requirements"
want="$(cat requirements.txt constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import sys" >/dev/null 2>&1; then
  echo "[setup] creating virtual environment .venv"
  rm -rf "$venv"
  "$python" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing requirements (first time: ~2 min, ~3.4 GB)"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -r requirements.txt -c constraints.txt
  "$venv/bin/python" -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
else
  echo "[setup] .venv is up to date"
fi

fmnist_dir="/usr/share/datasets/fashion-mnist"
if [ ! -f "$fmnist_dir/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing the Debian package dataset-fashion-mnist (real Fashion-MNIST, offline)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "[setup] Fashion-MNIST files are missing from $fmnist_dir." >&2
    echo "[setup] Install them with: sudo apt-get install dataset-fashion-mnist" >&2
    echo "[setup] (or pass --data_dir pointing at the four IDX .gz files)." >&2
  fi
fi
