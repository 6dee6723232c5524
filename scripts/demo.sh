#!/usr/bin/env bash
# The pipeline on the local cloud: the seed's data set and the XOR job in a bucket on the emulator, three workers
# running the job - claiming its seven tasks and running the processing container on each, then the queue's state
# and a check of every output. Each run uses a fresh prefix, so it can be run again and again.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PWD/.venv/bin:$PATH ANSIBLE_CONFIG=$PWD/ansible.cfg
port=${CICC_EMULATOR_PORT:-5000}
export AWS_ENDPOINT_URL=http://127.0.0.1:$port AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1 PYTHONPATH=$PWD/.collections
bucket=${CICC_BUCKET:-cicc-demo-bucket}
prefix=run-$(date +%Y%m%d-%H%M%S)/
workers=${CICC_DEMO_WORKERS:-3}
settings=(-e "cicc_emulator_port=$port" -e "cicc_bucket=$bucket" -e "cicc_prefix=$prefix")

ansible-playbook playbooks/dataset.yml "${settings[@]}"
ansible-playbook playbooks/job.yml "${settings[@]}"
echo "==> Starting $workers workers on s3://$bucket/$prefix"
pids=()
for i in $(seq 1 "$workers"); do
  python worker/cicc_worker.py --job "s3://$bucket/${prefix}job.json" --endpoint-url "$AWS_ENDPOINT_URL" \
    --instance-id "local-worker-$i" --workdir /var/lib/cicc/demo 2>&1 | sed "s/^/[worker-$i] /" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
ansible-playbook playbooks/status.yml "${settings[@]}"
ansible-playbook playbooks/outputs.yml "${settings[@]}"
