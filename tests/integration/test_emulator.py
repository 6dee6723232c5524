"""The local cloud's emulator started and stopped by plugins/module_utils/emulator.py: by its functions (what
scripts/emulator.sh runs), and by the cicc.cloud.local_emulator module every step playbook runs. Real moto
servers on free ports, with state directories of their own; each test stops what it started."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ansible_collections.cicc.cloud.plugins.module_utils import emulator
from ansible_collections.cicc.cloud.tests.helpers import ad_hoc


@pytest.fixture
def place(tmp_path):
    """A free port and a state directory; whatever runs there at the end is stopped."""
    port, state_dir = emulator.free_port(), str(tmp_path / "state")
    yield port, state_dir
    emulator.stop(port, state_dir)


def test_started_once_found_again_and_stopped(place):
    port, state_dir = place
    started = emulator.start(port, state_dir)
    assert started["started"] and started["answers"] and started["url"] == f"http://127.0.0.1:{port}"
    assert Path(started["log"]).is_file()
    # The server outlives its starter's call and is found again by its pid file; a second start starts nothing.
    again = emulator.start(port, state_dir)
    assert (again["started"], again["pid"]) == (False, started["pid"])
    assert emulator.stop(port, state_dir) == started["pid"]
    assert not emulator.status(port, state_dir)["answers"]
    assert not Path(f"/proc/{started['pid']}").exists() or b"moto_server" not in _cmdline(started["pid"])
    assert emulator.stop(port, state_dir) is None


def test_a_port_held_by_another_program_is_named(place):
    port, state_dir = place
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        with pytest.raises(emulator.EmulatorError, match=f"port {port} on 127.0.0.1 is in use by a program"):
            emulator.start(port, state_dir)
    assert not Path(state_dir, f"emulator-{port}.pid").exists()


def test_the_module_starts_it_once_predicts_in_check_mode_and_stops_it(place):
    port, state_dir = place
    args = {"port": port, "state_dir": state_dir}
    planned = ad_hoc("cicc.cloud.local_emulator", args, check=True)
    assert planned["changed"] and not emulator.status(port, state_dir)["answers"]
    started = ad_hoc("cicc.cloud.local_emulator", args)
    assert started["changed"] and started["pid"] and emulator.status(port, state_dir)["answers"]
    assert ad_hoc("cicc.cloud.local_emulator", args)["changed"] is False
    assert ad_hoc("cicc.cloud.local_emulator", {**args, "state": "stopped"}, check=True)["changed"] is True
    assert emulator.status(port, state_dir)["answers"]
    stopped = ad_hoc("cicc.cloud.local_emulator", {**args, "state": "stopped"})
    assert stopped["changed"] and stopped["pid"] is None and not emulator.status(port, state_dir)["answers"]
    assert ad_hoc("cicc.cloud.local_emulator", {**args, "state": "stopped"})["changed"] is False


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
