#!/usr/bin/env bash
# Build the processing image (container/) on top of the local base image, offline.
# An existing image is reused when it was built from the same container/Dockerfile + container/process.py
# (label cicc.source-hash) on the same base image (label cicc.base-id); otherwise it is rebuilt.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
image=${CICC_PROCESS_IMAGE:-cicc-process:latest}
base=${CICC_BASE_IMAGE:-cicc-base:bookworm}

if ! base_id=$(docker image inspect --format '{{.Id}}' "$base" 2>/dev/null); then
  echo "Base image $base is absent: build it first with scripts/base-image.sh" >&2
  exit 1
fi
source_hash=$(cat "$root/container/Dockerfile" "$root/container/process.py" | sha256sum | cut -d' ' -f1)
labels=$(docker image inspect \
  --format '{{index .Config.Labels "cicc.source-hash"}} {{index .Config.Labels "cicc.base-id"}}' \
  "$image" 2>/dev/null || true)
if [[ "$labels" == "$source_hash $base_id" ]]; then
  echo "==> Processing image $image present"
  exit 0
fi

echo "==> Building processing image $image from $base"
log=$(mktemp /var/tmp/cicc-process-build.XXXXXX)
trap 'rm -f "$log"' EXIT
# The legacy builder is the one every Docker Engine has (no buildx needed); host network only.
DOCKER_BUILDKIT=0 docker build --network host --pull=false \
  --build-arg BASE_IMAGE="$base" --build-arg SOURCE_HASH="$source_hash" \
  --label cicc.base-id="$base_id" \
  -t "$image" "$root/container" >"$log" 2>&1 || {
  echo "docker build of $image failed; the end of its log says:" >&2
  tail -n 20 "$log" >&2
  exit 1
}
echo "==> Processing image $image built"
