"""Two processes ("hosts") with 4 CPU devices each against one device: the same step."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util
from test_sharding import global_relative_difference, run_steps, tiny_config

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_device(tmp_path):
    port = str(free_port())
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = tmp_path / "out.npz"
    workers = [subprocess.Popen([sys.executable, str(HERE / "multihost_worker.py"), str(i), port,
                                 str(out)], env=env, cwd=HERE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), logs[0][-3000:] + logs[1][-3000:]
    result = np.load(out)
    assert int(result["devices"]) == 8

    config = tiny_config("clipsep_nit")
    one_state, one_losses, _ = run_steps(config, jax.devices()[:1], steps=1)
    np.testing.assert_allclose(float(result["loss"]), one_losses[0], rtol=1e-5)
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(one_state.params).items()}
    assert set(flat) <= set(result.files)
    gathered = {k: result[k] for k in flat}
    assert global_relative_difference(gathered, flat) <= 1e-5
