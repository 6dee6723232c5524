#!/usr/bin/env bash
# Build a job's image from a container directory on top of the local base image, offline.
#   scripts/process-image.sh [--save FILE]                  container/ -> ${CICC_PROCESS_IMAGE:-cicc-process:latest}
#   scripts/process-image.sh DIR IMAGE [--save FILE]        e.g. container/summary cicc-summary:latest
# An existing image is reused when it was built from the same Dockerfile and programs of DIR (label
# cicc.source-hash) on the same base image (label cicc.base-id); otherwise it is rebuilt.
# --save FILE also writes `docker save` of the image to FILE (FILE.part, then renamed) and prints the
# image ID as the last line of stdout.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
base=${CICC_BASE_IMAGE:-cicc-base:bookworm}
usage="usage: scripts/process-image.sh [DIR IMAGE] [--save FILE]"
# The EXIT trap (temp files) also runs when the script is stopped.
trap 'exit 143' TERM
trap 'exit 130' INT

save=
positional=()
while (($#)); do
  case $1 in
    --save)
      if (($# < 2)) || [[ -z $2 ]]; then
        echo "--save needs a file name; $usage" >&2
        exit 2
      fi
      save=$2
      shift 2
      ;;
    --save=*)
      save=${1#--save=}
      [[ -n $save ]] || { echo "--save needs a file name; $usage" >&2; exit 2; }
      shift
      ;;
    -h | --help)
      echo "$usage"
      exit 0
      ;;
    -*)
      echo "unknown option $1; $usage" >&2
      exit 2
      ;;
    *)
      positional+=("$1")
      shift
      ;;
  esac
done
case ${#positional[@]} in
  0)
    context=$root/container
    image=${CICC_PROCESS_IMAGE:-cicc-process:latest}
    ;;
  2)
    context=${positional[0]}
    image=${positional[1]}
    # A relative DIR is taken from the current directory, else from the repository root.
    if [[ $context != /* && ! -d $context && -d $root/$context ]]; then
      context=$root/$context
    fi
    ;;
  *)
    echo "give both DIR and IMAGE, or neither; $usage" >&2
    exit 2
    ;;
esac
if [[ ! -f $context/Dockerfile ]]; then
  echo "$context has no Dockerfile: give a container directory such as container/summary" >&2
  exit 2
fi
context=$(cd "$context" && pwd)
if [[ -n $save && ! -d $(dirname "$save") ]]; then
  echo "cannot save to $save: directory $(dirname "$save") does not exist" >&2
  exit 2
fi

if ! base_id=$(docker image inspect --format '{{.Id}}' "$base" 2>/dev/null); then
  echo "Base image $base is absent: build it first with scripts/base-image.sh" >&2
  exit 1
fi

# The Dockerfile, then the directory's Python files in name order, one after the other: the same hash the
# processing_image role puts on the image it builds, so an image either of them built is reused by the other.
source_hash=$(
  cd "$context"
  LC_ALL=C
  shopt -s nullglob
  programs=(./*.py)
  cat Dockerfile "${programs[@]}" | sha256sum | cut -d' ' -f1
)
labels=$(docker image inspect \
  --format '{{index .Config.Labels "cicc.source-hash"}} {{index .Config.Labels "cicc.base-id"}}' \
  "$image" 2>/dev/null || true)
if [[ "$labels" == "$source_hash $base_id" ]]; then
  echo "==> Image $image present (${context#"$root"/})"
else
  echo "==> Building image $image from ${context#"$root"/} on $base"
  log=$(mktemp /var/tmp/cicc-image-build.XXXXXX)
  trap 'rm -f "$log"' EXIT
  # The legacy builder is the one every Docker Engine has (no buildx needed); host network only.
  DOCKER_BUILDKIT=0 docker build --network host --pull=false \
    --build-arg BASE_IMAGE="$base" --build-arg SOURCE_HASH="$source_hash" \
    --label cicc.base-id="$base_id" \
    -t "$image" "$context" >"$log" 2>&1 || {
    echo "docker build of $image failed; the end of its log says:" >&2
    tail -n 20 "$log" >&2
    exit 1
  }
  rm -f "$log"
  trap - EXIT
  echo "==> Image $image built"
fi

if [[ -n $save ]]; then
  part=$save.part
  trap 'rm -f "$part"' EXIT
  docker save -o "$part" "$image" || {
    echo "docker save of $image to $part failed" >&2
    exit 1
  }
  mv -f "$part" "$save"
  trap - EXIT
  echo "==> Image $image saved to $save"
  docker image inspect -f '{{.Id}}' "$image"
fi
