#!/usr/bin/env bash
# Serves a run's exported students with the official TF Serving image.
#
#   bash export/serve.sh workdir/quickstart/export/serving
#
# gRPC on :8500, REST on :8501. Versions written later are picked up within 60 s
# (exports are renamed into place atomically, so a half-written version is never seen).
# Warm-up requests in each version's assets.extra/ are replayed before it serves.
set -euo pipefail
serving_dir="$(cd "${1:?usage: serve.sh EXPORT_SERVING_DIR [IMAGE]}" && pwd)"
# Pin the image (e.g. tensorflow/serving:2.21.0, the TF release that exported) for
# reproducible deployments; the default is the newest release.
image="${2:-tensorflow/serving:latest}"
kit_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec docker run --rm -p 8500:8500 -p 8501:8501 \
  -v "$serving_dir:/models:ro" \
  -v "$kit_dir/models.config:/config/models.config:ro" \
  "$image" \
  --model_config_file=/config/models.config \
  --model_config_file_poll_wait_seconds=60 \
  --file_system_poll_wait_seconds=60
