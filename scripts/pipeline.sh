#!/usr/bin/env bash
# The whole pipeline through Ansible: playbooks/site.yml (bucket + data set, IAM, network, base instance,
# configure, AMI, fleet until the queue is drained, outputs checked, summary).
#
#   scripts/pipeline.sh [PLAYBOOK.yml] [ansible-playbook arguments...]
#
#   scripts/pipeline.sh                                   the local cloud, settings of inventory/group_vars/all
#   scripts/pipeline.sh -e cicc_fleet_size=5              any setting with -e, as for ansible-playbook
#   scripts/pipeline.sh playbooks/teardown.yml            another step (or status.yml, mount.yml ...)
#   CICC_TARGET=aws CICC_REGION=eu-west-1 scripts/pipeline.sh -e cicc_bucket=my-bucket
#
# The dynamic inventory (inventory/aws_ec2.yml) is read before any play, from the environment, not from the
# settings: this script exports what it needs and passes the same values as settings, so that both agree.
# Set them here, not with -e (the playbooks stop with a message when they differ):
#   CICC_TARGET         local (default) or aws
#   CICC_PROJECT        the project tag (default cicc)
#   CICC_REGION         the region (default us-east-1)
#   CICC_EMULATOR_PORT  local: the emulator's port on 127.0.0.1 (default 5000); started (scripts/emulator.sh)
#                       unless an emulator answers there already
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export PATH=$root/.venv/bin:$PATH ANSIBLE_CONFIG=$root/ansible.cfg

die() { printf 'pipeline.sh: %s\n' "$*" >&2; exit 2; }

# True when the URL answers (no proxy: loopback traffic).
answers() {
  "$root/.venv/bin/python" - "$1" <<'PY' >/dev/null 2>&1
import sys
import urllib.request

urllib.request.build_opener(urllib.request.ProxyHandler({})).open(sys.argv[1], timeout=2).close()
PY
}

export CICC_TARGET=${CICC_TARGET:-local}
export CICC_PROJECT=${CICC_PROJECT:-cicc}
export CICC_REGION=${CICC_REGION:-${AWS_REGION:-${AWS_DEFAULT_REGION:-us-east-1}}}
export CICC_EMULATOR_PORT=${CICC_EMULATOR_PORT:-5000}

playbook=playbooks/site.yml
if [ $# -gt 0 ] && [[ $1 == *.yml || $1 == *.yaml ]]; then
  playbook=$1
  shift
fi
[ -f "$playbook" ] || die "no playbook $playbook"
command -v ansible-playbook >/dev/null || die "ansible-playbook is not in $root/.venv: run 'make setup' first"

settings=(-e "cicc_target=$CICC_TARGET" -e "cicc_project=$CICC_PROJECT" -e "cicc_region=$CICC_REGION")
case $CICC_TARGET in
  local)
    docker info >/dev/null 2>&1 || die "the Docker Engine does not answer: run 'make setup' (or scripts/docker-engine.sh start)"
    url=http://127.0.0.1:$CICC_EMULATOR_PORT
    # An emulator that answers on the port is used whoever started it (a test session's, for instance).
    answers "$url/moto-api/" || scripts/emulator.sh start >/dev/null
    # The emulator's address and dummy keys for the inventory; the playbooks take the port.
    export AWS_ENDPOINT_URL=$url AWS_URL=$url AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
    settings+=(-e "cicc_emulator_port=$CICC_EMULATOR_PORT")
    ;;
  aws)
    # Real AWS: boto3's usual chain (profile, SSO, environment); an emulator's address must not leak in.
    unset AWS_ENDPOINT_URL AWS_URL
    ;;
  *) die "CICC_TARGET must be local or aws, not '$CICC_TARGET'" ;;
esac
export AWS_REGION=$CICC_REGION AWS_DEFAULT_REGION=$CICC_REGION

exec ansible-playbook "$playbook" "${settings[@]}" "$@"
