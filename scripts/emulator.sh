#!/usr/bin/env bash
# start | stop | status of the local AWS emulator: moto_server from .venv on 127.0.0.1, started and stopped by
# plugins/module_utils/emulator.py (the same code the playbooks' cicc.cloud.local_emulator runs).
#
#   CICC_EMULATOR_PORT  port to listen on (default 5000)
#   CICC_STATE_DIR      where the pid file and the log live (default ~/.cache/cicc)
#
# Each port has its own pid file and log, so emulators on different ports never touch each other.
# `start` prints the environment that points AWS clients at the emulator on stdout (everything
# else goes to stderr), so `eval "$(scripts/emulator.sh start)"` sets it in the calling shell.
# Exit status: 0 done (status: answering), 1 it could not be done, 3 (status) not answering.
set -euo pipefail
cd "$(dirname "$0")/.."
python=$PWD/.venv/bin/python
[ -x "$python" ] || { echo "$PWD/.venv is missing: run 'make setup' (scripts/setup.sh) first" >&2; exit 1; }
action=${1:-status}
case $action in start | stop | status) ;; *) echo "usage: $0 start|stop|status" >&2; exit 2 ;; esac

exec "$python" - "$action" "${CICC_EMULATOR_PORT:-5000}" "${CICC_STATE_DIR:-$HOME/.cache/cicc}" <<'PY'
import sys

sys.path.insert(0, "plugins/module_utils")
import emulator  # noqa: E402

action, port, state_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    if action == "start":
        now = emulator.start(port, state_dir)
        said = "started" if now["started"] else "already running"
        print(f"emulator: {said} on {now['url']} (log: {now['log']}); point AWS clients at it with:", file=sys.stderr)
        print(
            f"export AWS_ENDPOINT_URL={now['url']} AWS_URL={now['url']} AWS_ACCESS_KEY_ID=testing "
            "AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1"
        )
    elif action == "stop":
        pid = emulator.stop(port, state_dir)
        print(f"emulator: stopped (pid {pid})" if pid else f"emulator: not running on port {port}", file=sys.stderr)
    else:
        now = emulator.status(port, state_dir)
        if not now["answers"]:
            print(f"emulator: stopped (port {port})")
            sys.exit(3)
        print(f"emulator: running on {now['url']}" + (f" (pid {now['pid']})" if now["pid"] else ""))
except emulator.EmulatorError as error:
    sys.exit(f"emulator: {error}")
PY
