"""`optserve bench`: measurements taken side by side in one run, as tables, JSON and a PNG plot.

Every figure is compared with a reference measured in the same run, on the
same machine, because absolute figures drift between runs on a shared
machine. One function per section, each returning a plain dict:

- `measure_bandwidth` (`compute`): the best streaming memory bandwidth (NumPy
  copy, add and triad on the host; the same kernels jitted by JAX on its
  device), the fastest repetition of the fastest kernel. An Adam step must at
  least read param, m, v and the gradient and write param, m and v: 28 bytes
  per parameter, so `28 * params / bandwidth` is the floor of a step.
- `measure_step` (`compute`): the server's jitted, donating step
  (`engine.pipeline.make_step`, default Keras config) and `optax.adam` (jitted,
  donated) on the same tensors, one flat tensor and 100 mixed-size tensors,
  against that floor.
- `measure_transfer` (`transfer`): push and pull through a server process
  against a bare gRPC service of 1 MB `bytes` chunks and raw TCP over
  loopback, both served by child processes of the bench (`peers`). A push is
  timed as a client sees it, so it includes the server's step (reported
  beside it).
- `measure_server_model` (`transfer`): the same bare gRPC service served by
  grpc's thread-pool server and by `grpc.aio`, push and pull of the transfer
  target size, so the server model is picked by measurement.
- `measure_round_trip` (`transfer`): push + pull, float32 and bfloat16
  gradients on the wire, split into compute (the server's own
  `optserve_step_seconds`), (de)serialization (the real client and server
  codec run on the same tensors in the bench process, transport left out) and
  transfer (the rest).
- `measure_workers` (`transfer`): 1, 2, 4 worker processes pushing to one
  optimizer.
- `measure_versus` (`versus`): optserve on each transport ("local" shared
  memory with the zero-copy API and the plain one, "network", "grpc") against
  PyTorch RPC (TensorPipe default, and TCP only) and a Ray actor parameter
  server (`peer_servers`), on the same round trip (push 10M gradients, one
  Adam step, pull the weights) as one tensor and as 100, and 4 workers at
  once, every system in its own processes (`drivers`), against the TCP floor
  and the shared-memory floor measured in the same reps. The peers need the
  `peers` extra; a quick run skips them unless `--peers` asks.
- `measure_chunk_sizes` (`transfer`): the same push cut into chunks of
  different sizes by the client.
- `measure_memory` (`server_stats`): the server's peak RSS against the state
  it holds, and its RSS over a long run of pushes.
- `measure_durability` (`server_stats`): what each durability mode costs a push.

`run` holds the quick and full plans and `run_bench`, which runs the sections
in order; `report` prints the tables and draws the plot; `common` holds the
units, timing and target helpers they share.

Targets are printed as met / not met with their ratio; they are never
asserted (CI runs `--quick` as a smoke test only).
"""

from optserve.server.bench.compute import mixed_sizes
from optserve.server.bench.run import run_bench

__all__ = ["mixed_sizes", "run_bench"]
