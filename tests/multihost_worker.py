"""One process of a two-process CPU "multi-host" run (used by test_multihost.py).

    python multihost_worker.py PROCESS_ID PORT OUT.npz

Each process has 4 emulated devices; together they form an 8-device (data 4 x fsdp 2) mesh over
gloo collectives. Each feeds its half of the global batch; process 0 writes the loss and the
gathered updated parameters.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)

import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from test_sharding import global_batch_arrays, tiny_config  # noqa: E402

from clipsep_jax import sharding  # noqa: E402
from clipsep_jax.train import (  # noqa: E402
    make_optimizer,
    sharded_train_state,
    sharded_train_step,
)

config = tiny_config("clipsep_nit")
config.mesh.fsdp = 2
mesh = sharding.make_mesh(config)
optimizer = make_optimizer(config)
state, shardings = sharded_train_state(config, jax.random.PRNGKey(0), optimizer, mesh)
step = sharded_train_step(config, optimizer, mesh, shardings)
full = global_batch_arrays(config, seed=0)
half = len(full["mag_mix"]) // 2
local = {k: v[process_id * half : (process_id + 1) * half] for k, v in full.items()}
state, metrics = step(state, sharding.global_batch(local, mesh))
params = multihost_utils.process_allgather(state.params, tiled=True)
if process_id == 0:
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    np.savez(out, loss=float(metrics["loss"]), devices=jax.device_count(), **flat)
