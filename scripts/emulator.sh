#!/usr/bin/env bash
# start | stop | status of the local AWS emulator: moto_server from .venv on 127.0.0.1.
#
#   CICC_EMULATOR_PORT  port to listen on (default 5000)
#   CICC_STATE_DIR      where the pid file and the log live (default ~/.cache/cicc)
#
# Each port has its own pid file and log, so emulators on different ports never touch each other.
# `start` prints the environment that points AWS clients at the emulator on stdout (everything
# else goes to stderr), so `eval "$(scripts/emulator.sh start)"` sets it in the calling shell.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

port=${CICC_EMULATOR_PORT:-5000}
state_dir=${CICC_STATE_DIR:-$HOME/.cache/cicc}
pid_file=$state_dir/emulator-$port.pid
log_file=$state_dir/emulator-$port.log
url=http://127.0.0.1:$port
python=$root/.venv/bin/python
moto_server=$root/.venv/bin/moto_server
start_timeout=30

say() { printf '%s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

if ! [[ $port =~ ^[0-9]+$ ]] || [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then
  die "CICC_EMULATOR_PORT must be a port number (1-65535), not '$port'"
fi

# The pid from our pid file, when that process is alive and still a moto_server (pids get reused).
our_pid() {
  local pid
  [ -r "$pid_file" ] || return 1
  pid=$(<"$pid_file")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q moto_server || return 1
  printf '%s\n' "$pid"
}

# True when the emulator's management API answers (no proxy: this is loopback traffic).
answers() {
  "$python" - "$url/moto-api/" <<'PY' >/dev/null 2>&1
import sys
import urllib.request

urllib.request.build_opener(urllib.request.ProxyHandler({})).open(sys.argv[1], timeout=2).close()
PY
}

# True when 127.0.0.1:PORT can be bound the way moto_server binds it.
port_free() {
  "$python" - "$port" <<'PY' >/dev/null 2>&1
import socket
import sys

with socket.socket() as sock:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", int(sys.argv[1])))
PY
}

# "NAME (pid N)" of what listens on the port, when `ss` can tell; empty otherwise.
port_holder() {
  command -v ss >/dev/null || return 0
  ss -Hltnp "sport = :$port" 2>/dev/null |
    sed -nE 's/.*users:[(][(]"([^"]*)",pid=([0-9]+).*/\1 (pid \2)/p' | head -n 1 || true
}

# $1: "running" or "already running"; $2: the pid.
print_env() {
  say "emulator: $1 on $url (pid $2); point AWS clients at it with:"
  printf 'export AWS_ENDPOINT_URL=%s AWS_URL=%s AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1\n' \
    "$url" "$url"
}

start() {
  local pid holder deadline
  mkdir -p "$state_dir"
  [ -x "$moto_server" ] || die "moto_server is not installed in $root/.venv: run 'make setup' (scripts/setup.sh) first"

  if pid=$(our_pid); then
    if answers; then
      print_env "already running" "$pid"
      tr '\0' '\n' <"/proc/$pid/environ" | grep -qx MOTO_IAM_LOAD_MANAGED_POLICIES=true ||
        say "emulator: warning: it was started without AWS's managed policies, which playbooks/iam.yml attaches;" \
          "restart it (its state is lost): $0 stop && $0 start"
      return 0
    fi
    say "==> The emulator (pid $pid) is up but does not answer yet; waiting for it"
  else
    rm -f "$pid_file"
    if ! port_free; then
      holder=$(port_holder)
      say "emulator: port $port on 127.0.0.1 is already in use by another program${holder:+: $holder}."
      say "Stop that program, or run the emulator on another port, e.g.:"
      die "  CICC_EMULATOR_PORT=$((port == 65535 ? 5001 : port + 1)) $0 start"
    fi
    say "==> Starting the AWS emulator on $url (log: $log_file)"
    # AWS's managed policies exist on the emulator as on AWS (iam.yml attaches AmazonSSMManagedInstanceCore).
    MOTO_IAM_LOAD_MANAGED_POLICIES=true nohup "$moto_server" -H 127.0.0.1 -p "$port" </dev/null >"$log_file" 2>&1 &
    pid=$!
    printf '%s\n' "$pid" >"$pid_file"
  fi

  deadline=$((SECONDS + start_timeout))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if answers; then
      print_env running "$pid"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$pid_file"
      say "emulator: moto_server (pid $pid) exited during start; the end of $log_file says:"
      tail -n 20 "$log_file" >&2
      exit 1
    fi
    sleep 0.25
  done
  say "emulator: no answer from $url/moto-api/ within $start_timeout s; the end of $log_file says:"
  tail -n 20 "$log_file" >&2
  kill "$pid" 2>/dev/null || true
  rm -f "$pid_file"
  exit 1
}

stop() {
  local pid
  if ! pid=$(our_pid); then
    rm -f "$pid_file"
    say "emulator: not running on port $port"
    return 0
  fi
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.25
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "emulator: pid $pid ignored SIGTERM for 10 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pid_file"
  say "emulator: stopped (pid $pid)"
}

status() {
  local pid
  if ! pid=$(our_pid); then
    echo "emulator: stopped"
    exit 3
  fi
  if ! answers; then
    echo "emulator: pid $pid is alive but $url/moto-api/ does not answer (log: $log_file)"
    exit 1
  fi
  echo "emulator: running on $url (pid $pid)"
}

case "${1:-status}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *)
    say "usage: $0 start|stop|status"
    exit 2
    ;;
esac
