"""One process of the two-process loopback test (tests/test_multihost.py).

Usage: multihost_worker.py COORDINATOR_PORT NUM_PROCESSES PROCESS_ID OUT_JSON
With NUM_PROCESSES=1 it is the single-process reference on all local devices.
"""

import json
import os
import sys

port, num_processes, process_id, out_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

import jax  # noqa: E402

if num_processes > 1:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id,
        initialization_timeout=120,
    )

sys.path.insert(0, os.path.dirname(__file__))
from slm_jax.parallel import partitioning  # noqa: E402
from slm_jax.weights.frozen import load_frozen_params  # noqa: E402
from slm_jax.data.synthetic import SyntheticData  # noqa: E402
from slm_jax.training.optimizers import make_optimizer  # noqa: E402
from slm_jax.training.step import Trainer
from tiny_models import FEATURE_LENGTHS, VOCAB, model_spec  # noqa: E402

GLOBAL_BATCH = 8
mesh = partitioning.make_mesh(data=4, model=2)  # 8 devices in all, across the processes
spec = model_spec("llama")
optimizer, schedule = make_optimizer(learning_rate=3e-3, warmup_steps=1, total_steps=10)
trainer = Trainer(spec.build(), optimizer, schedule, mesh)
data = SyntheticData(FEATURE_LENGTHS, VOCAB, seed=5)
example = data.batch(GLOBAL_BATCH, 0)
frozen = load_frozen_params(trainer, spec, example)
state = trainer.init_state(0, example)
trainer.compile(example, jax.tree.map(lambda x: x.sharding, frozen))
host_rows = GLOBAL_BATCH // jax.process_count()
batches = data.train_batches(host_rows, seed=0, start_batch=0, shard_index=jax.process_index(),
                             num_shards=jax.process_count())
losses = []
for _ in range(4):
    state, metrics = trainer.train_step(state, frozen, trainer.place_batch(next(batches)))
    losses.append(float(metrics["loss"]))
with open(out_path, "w") as f:
    json.dump({"losses": losses, "process_count": jax.process_count(), "devices": len(jax.devices()),
               "local_devices": len(jax.local_devices())}, f)
if num_processes > 1:
    jax.distributed.shutdown()
