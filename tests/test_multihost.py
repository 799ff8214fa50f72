"""Multi-host for real: two processes on loopback, 4 CPU devices each, train like one process
with 8 devices."""

import json
import os
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(WORKER), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    single = tmp_path / "single.json"
    subprocess.run([sys.executable, WORKER, "0", "1", "0", str(single)], env=_env(8), check=True, timeout=300)
    port = _free_port()
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    procs = [
        subprocess.Popen([sys.executable, WORKER, str(port), "2", str(i), str(outs[i])], env=_env(4))
        for i in range(2)
    ]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [0, 0]
    reference = json.loads(single.read_text())
    assert reference["devices"] == 8 and reference["process_count"] == 1
    for out in outs:
        got = json.loads(out.read_text())
        assert got["process_count"] == 2 and got["devices"] == 8 and got["local_devices"] == 4
        assert got["losses"] == pytest.approx(reference["losses"], rel=1e-5)
