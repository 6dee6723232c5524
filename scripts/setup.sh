#!/usr/bin/env bash
# Prepare this machine for cicc.cloud: system packages, a running Docker Engine, the virtualenv,
# the collection link, the local base image and the example jobs' images (processing, then summary).
# Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
log() { printf '==> %s\n' "$*"; }

apt_packages=(docker.io s3fs debootstrap make rsync shellcheck)
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "Installing system packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

scripts/docker-engine.sh start

if [ ! -x .venv/bin/python ] || ! cmp -s requirements.txt .venv/.requirements.txt; then
  log "Installing the virtualenv from requirements.txt"
  python3 -m venv .venv
  .venv/bin/pip install -q -r requirements.txt
  cp requirements.txt .venv/.requirements.txt
fi

# Ansible finds the collection cicc.cloud through this link to the repository root.
mkdir -p .collections/ansible_collections/cicc
ln -sfn "$root" .collections/ansible_collections/cicc/cloud

scripts/base-image.sh
scripts/process-image.sh
scripts/process-image.sh container/summary "${CICC_SUMMARY_IMAGE:-cicc-summary:latest}"
log "Setup complete"
