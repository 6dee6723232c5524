#!/usr/bin/env bash
# The repository's way to run a playbook on the local cloud: the Docker Engine checked, then ansible-playbook with
# this repository's virtualenv and ansible.cfg (the playbooks start the emulator unless one answers on the port).
#
#   scripts/pipeline.sh [PLAYBOOK.yml] [ansible-playbook arguments...]
#
#   scripts/pipeline.sh                                   playbooks/site.yml: the whole pipeline
#   scripts/pipeline.sh -e cicc_fleet_size=5              any setting with -e, as for ansible-playbook
#   scripts/pipeline.sh playbooks/teardown.yml            another step (or status.yml, mount.yml ...)
#   CICC_EMULATOR_PORT=5001 scripts/pipeline.sh           the emulator on another port (default 5000)
#
# Nothing here is needed by the playbooks themselves: with the collection installed they run the same way from
# any directory (ansible-playbook cicc.cloud.site), the settings alone saying where.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export PATH=$root/.venv/bin:$PATH ANSIBLE_CONFIG=$root/ansible.cfg

die() { printf 'pipeline.sh: %s\n' "$*" >&2; exit 2; }

port=${CICC_EMULATOR_PORT:-5000}

playbook=playbooks/site.yml
if [ $# -gt 0 ] && [[ $1 == *.yml || $1 == *.yaml ]]; then
  playbook=$1
  shift
fi
[ -f "$playbook" ] || die "no playbook $playbook"
command -v ansible-playbook >/dev/null || die "ansible-playbook is not in $root/.venv: run 'make setup' first"

docker info >/dev/null 2>&1 || die "the Docker Engine does not answer: run 'make setup' (or scripts/docker-engine.sh start)"
exec ansible-playbook "$playbook" -e "cicc_emulator_port=$port" "$@"
