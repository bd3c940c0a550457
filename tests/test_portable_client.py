"""A client built from proto/ alone (stubs generated here, no optserve package) creates, pushes and pulls.

The streaming protocol is the portable path for clients in any language; the
same-host and bulk transports are optimizations beside it, never instead of it.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
import grpc
import numpy as np
import optserve_pb2 as pb
import optserve_pb2_grpc as pb_grpc
assert not any(name.startswith("optserve.") or name == "optserve" for name in sys.modules), "imported optserve"
stub = pb_grpc.OptimizerServiceStub(grpc.insecure_channel(sys.argv[1]))
w0 = np.arange(6, dtype=np.float32).reshape(2, 3)
spec = pb.TensorSpec(name="w", dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 3])
create = [pb.CreateOptimizerRequest(header=pb.CreateOptimizerHeader(name="portable", tensors=[spec])),
          pb.CreateOptimizerRequest(chunk=w0.tobytes()[:10]), pb.CreateOptimizerRequest(chunk=w0.tobytes()[10:])]
info = stub.CreateOptimizer(iter(create), timeout=60)
assert info.version == 0 and [t.name for t in info.tensors] == ["w"]
grad = np.array([[1, -1, 2], [-2, 0.5, 3]], np.float32)
push = [pb.PushGradientsRequest(header=pb.PushHeader(optimizer="portable", gradients=[
            pb.GradientSpec(name="w", dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 3])])),
        pb.PushGradientsRequest(chunk=grad.tobytes())]
assert stub.PushGradients(iter(push), timeout=60).version == 1
header, *chunks = stub.PullWeights(pb.PullWeightsRequest(optimizer="portable"), timeout=60)
assert header.WhichOneof("part") == "header" and header.header.version == 1
w1 = np.frombuffer(b"".join(c.chunk for c in chunks), np.float32).reshape(2, 3)
# Keras Adam's first step moves each weight by about the learning rate (1e-3) against its gradient's sign
assert np.allclose(w1, w0 - 1e-3 * np.sign(grad), atol=1e-6), w1
stub.DeleteOptimizer(pb.DeleteOptimizerRequest(name="portable"), timeout=60)
print("portable ok")
"""


def test_a_client_generated_from_the_proto_alone_creates_pushes_and_pulls(server, tmp_path: Path) -> None:
    proto_dir = ROOT / "proto" / "optserve" / "v1"
    generate = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={tmp_path}",
                               f"--grpc_python_out={tmp_path}", str(proto_dir / "optserve.proto")],
                              capture_output=True, text=True, timeout=120)
    assert generate.returncode == 0, generate.stderr
    run = subprocess.run([sys.executable, "-c", SCRIPT, server.address], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "portable ok" in run.stdout
