#!/usr/bin/env bash
# Prepare this machine for cicc.cloud: system packages, a running Docker Engine, the virtualenvs,
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

# A virtualenv from a requirements file, (re)installed only when that file changed since.
install_venv() {
  local venv=$1 requirements=$2
  if [ ! -x "$venv/bin/python" ] || ! cmp -s "$requirements" "$venv/.requirements.txt"; then
    log "Installing $venv from $requirements"
    python3 -m venv "$venv"
    # Its output is shown only if it fails: a machine's pip configuration can warn on every package.
    if ! "$venv/bin/pip" install -q -r "$requirements" >"$venv/.install.log" 2>&1; then
      cat "$venv/.install.log" >&2
      exit 1
    fi
    cp "$requirements" "$venv/.requirements.txt"
  fi
}
install_venv .venv requirements.txt
# LocalStack's S3, the protocol tests' second S3 implementation: its pins clash with .venv's.
install_venv .venv-localstack requirements-localstack.txt
# The documentation tools (antsibull-changelog for CHANGELOG.rst, antsibull-docs and Sphinx for the HTML docs),
# kept out of .venv.
install_venv .venv-docs requirements-docs.txt

# Ansible finds the collection cicc.cloud through this link to the repository root.
mkdir -p .collections/ansible_collections/cicc
ln -sfn "$root" .collections/ansible_collections/cicc/cloud

scripts/base-image.sh
scripts/process-image.sh
scripts/process-image.sh container/summary "${CICC_SUMMARY_IMAGE:-cicc-summary:latest}"
log "Setup complete"
