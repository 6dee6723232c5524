#!/usr/bin/env bash
# start | stop | status of the local Docker Engine (dockerd in the background when no init manages it).
set -euo pipefail
log_file=/var/log/cicc-dockerd.log
running() { docker info >/dev/null 2>&1; }

case "${1:-status}" in
  start)
    running && exit 0
    command -v dockerd >/dev/null || { echo "dockerd is not installed: run scripts/setup.sh" >&2; exit 1; }
    echo "==> Starting the Docker Engine (log: $log_file)"
    nohup dockerd >"$log_file" 2>&1 &
    for _ in $(seq 1 60); do
      running && exit 0
      sleep 1
    done
    echo "The Docker Engine did not start within 60 s; the end of $log_file says:" >&2
    tail -n 20 "$log_file" >&2
    exit 1
    ;;
  stop)
    pid=$(pidof dockerd || true)
    [ -n "$pid" ] && kill "$pid" && echo "==> Docker Engine stopped"
    exit 0
    ;;
  status)
    if running; then echo "docker: running ($(docker version -f '{{.Server.Version}}'))"; else echo "docker: stopped"; exit 3; fi
    ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
