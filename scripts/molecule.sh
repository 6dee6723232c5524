#!/usr/bin/env bash
# Run the molecule scenario of each role (molecule/<role>/) against the local cloud:
#
#   scripts/molecule.sh                 every scenario
#   scripts/molecule.sh docker worker   only these
#
# The AWS emulator is started first (the s3_mount and worker scenarios use it); instances are
# systemd containers of the local base image on the host's Docker Engine. Each scenario's full
# output goes to a log file; one line per scenario says passed/FAILED and how long it took.
# Exits non-zero when any scenario fails.
#
#   CICC_MOLECULE_LOG_DIR   where the logs go (default ~/.cache/cicc/molecule)
#   CICC_MOLECULE_VERBOSE=1 also stream molecule's output to the terminal
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
log_dir=${CICC_MOLECULE_LOG_DIR:-${CICC_STATE_DIR:-$HOME/.cache/cicc}/molecule}
base_image=cicc-base:bookworm

say() { printf '%s\n' "$*" >&2; }
die() { say "molecule.sh: $*"; exit 2; }

export PATH="$root/.venv/bin:$PATH"
export ANSIBLE_CONFIG="$root/ansible.cfg"
# Molecule 26 looks for a collection's scenarios under extensions/molecule/ and only warns about
# molecule/ at the root; naming the glob keeps ours where the roles' tests are expected.
export MOLECULE_GLOB='molecule/*/molecule.yml'

[ -x .venv/bin/molecule ] || die "molecule is not in .venv: run scripts/setup.sh first"
[ -e .collections/ansible_collections/cicc/cloud/galaxy.yml ] ||
  die "the collection link .collections/ansible_collections/cicc/cloud is missing: run scripts/setup.sh"
docker info >/dev/null 2>&1 || die "the Docker Engine does not answer: run scripts/docker-engine.sh start"
docker image inspect "$base_image" >/dev/null 2>&1 || die "the base image $base_image is absent: run scripts/base-image.sh"

all=()
for file in molecule/*/molecule.yml; do
  [ -e "$file" ] && all+=("$(basename "$(dirname "$file")")")
done
[ ${#all[@]} -gt 0 ] || die "no scenario under molecule/"
if [ $# -gt 0 ]; then
  scenarios=("$@")
  for name in "${scenarios[@]}"; do
    [ -f "molecule/$name/molecule.yml" ] || die "no scenario '$name' (there are: ${all[*]})"
  done
else
  scenarios=("${all[@]}")
fi

# The s3_mount and worker scenarios use the emulator; its messages matter only when it fails.
if ! emulator_said=$(scripts/emulator.sh start 2>&1 >/dev/null); then
  say "$emulator_said"
  die "the AWS emulator did not start"
fi
mkdir -p "$log_dir"

failed=()
total_start=$SECONDS
for name in "${scenarios[@]}"; do
  log=$log_dir/$name.log
  start=$SECONDS
  if [ "${CICC_MOLECULE_VERBOSE:-0}" = 1 ]; then
    molecule test -s "$name" 2>&1 | tee "$log" && rc=0 || rc=$?
  else
    molecule test -s "$name" >"$log" 2>&1 && rc=0 || rc=$?
  fi
  elapsed=$((SECONDS - start))
  if [ "$rc" -eq 0 ]; then
    printf '%-18s passed  %4d s  (log: %s)\n' "$name" "$elapsed" "$log"
  else
    printf '%-18s FAILED  %4d s  (log: %s)\n' "$name" "$elapsed" "$log"
    # The failing task is what a person needs first; the whole log is in the file.
    grep -E -A 12 'fatal:|FAILED!|ERROR|CRITICAL' "$log" | grep -v 'molecule/default/molecule.yml. glob failed' | sed 's/\x1b\[[0-9;]*m//g' | head -n 40 >&2 || true
    failed+=("$name")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  printf 'molecule: %d of %d scenarios FAILED (%s) in %d s\n' "${#failed[@]}" "${#scenarios[@]}" "${failed[*]}" \
    $((SECONDS - total_start))
  exit 1
fi
printf 'molecule: all %d scenarios passed in %d s\n' "${#scenarios[@]}" $((SECONDS - total_start))
