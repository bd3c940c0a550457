"""Operating a server: metrics over HTTP, reflection, rich errors, logs, status, health, configuration."""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status

from optserve.client import Client, IndexedSlices
from optserve.server.launch import ServerProcess
from optserve.server.options import ServerOptions
from tests.conftest import RunningServer
from tests.test_bad_input import expect_error


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text format."""
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{{{wanted}}} in:\n{text}")


def test_metrics_endpoint_reports_steps_refusals_staleness_norm_bytes_and_timeouts() -> None:
    server = RunningServer(ServerOptions(host="127.0.0.1", port=0, metrics_port=0), restore=False)
    server.built.open(ServerOptions(host="127.0.0.1", port=0, metrics_port=0))
    try:
        with Client(server.address, timeout=30, transport="grpc") as client:  # bytes counted as "grpc"
            opt = client.create_optimizer("m", {"w": np.zeros(4, np.float32)}, {"learning_rate": 0.1},
                                          max_staleness=1)
            opt.push({"w": np.array([3, 4, 0, 0], np.float32)}, base_version=0)
            opt.push({"w": np.array([1, 0, 0, 0], np.float32)}, base_version=0)
            expect_error(grpc.StatusCode.ABORTED, "max_staleness", opt.push, {"w": np.zeros(4, np.float32)},
                         base_version=0)
            expect_error(grpc.StatusCode.INVALID_ARGUMENT, "shape", opt.push, {"w": np.zeros(5, np.float32)},
                         base_version=2)
            opt.pull()
            sync = client.create_optimizer("s", {"w": np.zeros(2, np.float32)}, mode="sync", num_workers=2,
                                           sync_timeout=0.2)
            sync.push({"w": np.ones(2, np.float32)}, worker_id="a", base_version=0)  # closes by timeout
        text = scrape(server.built.metrics_port)
        assert sample(text, "optserve_steps_total", optimizer="m") == 2
        assert sample(text, "optserve_pushes_total", optimizer="m", outcome="accepted") == 2
        assert sample(text, "optserve_pushes_refused_total", optimizer="m", reason="aborted") == 1
        assert sample(text, "optserve_pushes_refused_total", optimizer="m", reason="invalid_argument") == 1
        assert sample(text, "optserve_push_staleness_versions_count", optimizer="m") == 2
        assert sample(text, "optserve_push_staleness_versions_sum", optimizer="m") == 1  # 0 then 1 behind
        assert sample(text, "optserve_gradient_global_norm", optimizer="m") == 1.0  # the last step's |(1,0,0,0)|
        assert sample(text, "optserve_step_seconds_count", optimizer="m") == 2
        # the stale one arrived too; every byte went by the chunk stream (the test's client asks for it)
        assert sample(text, "optserve_received_bytes_total", optimizer="m", transport="grpc") == 16 + 3 * 16
        assert sample(text, "optserve_sent_bytes_total", optimizer="m", transport="grpc") == 16
        assert sample(text, "optserve_sync_rounds_closed_by_timeout_total", optimizer="s") == 1
        assert sample(text, "optserve_version", optimizer="m") == 2
    finally:
        server.stop()


def test_generic_reflection_client_finds_and_calls_the_service(client: Client, name: str) -> None:
    """Uses only grpc's reflection client and dynamic messages: no optserve stubs."""
    client.create_optimizer(name, {"w": np.zeros(2, np.float32)})
    channel = grpc.insecure_channel(client.address)
    database = ProtoReflectionDescriptorDatabase(channel)
    services = database.get_services()
    assert "optserve.v1.OptimizerService" in services and "grpc.health.v1.Health" in services
    pool = descriptor_pool.DescriptorPool(database)
    service = pool.FindServiceByName("optserve.v1.OptimizerService")
    method = service.methods_by_name["ListOptimizers"]
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary("/optserve.v1.OptimizerService/ListOptimizers",
                               request_serializer=request_class.SerializeToString,
                               response_deserializer=response_class.FromString)
    reply = call(request_class(), timeout=10)
    assert name in [optimizer.name for optimizer in reply.optimizers]
    channel.close()
    client.delete_optimizer(name)


def test_invalid_argument_carries_a_bad_request_detail_naming_the_field(client: Client, name: str) -> None:
    from optserve.v1 import optserve_pb2 as pb
    from optserve.v1 import optserve_pb2_grpc as pb_grpc

    stub = pb_grpc.OptimizerServiceStub(client._channel)
    header = pb.CreateOptimizerHeader(name=name, config_json='{"beta_1": 1.5}', tensors=[
        pb.TensorSpec(name="w", dtype=pb.DATA_TYPE_FLOAT32, shape=[1])])
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateOptimizer(iter([pb.CreateOptimizerRequest(header=header),
                                   pb.CreateOptimizerRequest(chunk=b"\0" * 4)]), timeout=10)
    status = rpc_status.from_call(caught.value)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    (detail,) = status.details
    bad_request = error_details_pb2.BadRequest()
    assert detail.Unpack(bad_request)
    (violation,) = bad_request.field_violations
    assert violation.field == "config.beta_1" and "[0, 1)" in violation.description


def test_json_logs_are_one_object_per_line_and_quiet_on_accepted_pushes(tmp_path: Path) -> None:
    with ServerProcess(["--log-format", "json"], log=open(os.devnull, "w")) as server:
        with Client(server.address, timeout=60) as client:
            opt = client.create_optimizer("m", {"w": np.zeros(2, np.float32)})
            for _ in range(20):
                opt.push({"w": np.ones(2, np.float32)})
            expect_error(grpc.StatusCode.INVALID_ARGUMENT, "shape", opt.push, {"w": np.ones(3, np.float32)})
    lines = [json.loads(line) for line in server.lines if line.strip()]
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    messages = [line["message"] for line in lines]
    assert any(m.startswith("listening on") for m in messages) and any("created optimizer" in m for m in messages)
    assert sum("refused" in m for m in messages) == 1
    assert len(lines) < 15  # lifecycle events only: 20 accepted pushes wrote nothing


def test_status_command_prints_a_table_of_optimizers(server, name: str) -> None:
    client = Client(server.address, timeout=60, transport="grpc")  # the transport the table must show
    opt = client.create_optimizer(name, {"w": np.zeros((10, 10), np.float32), "emb": np.zeros((5, 2), np.float32)},
                                  mode="sync", num_workers=1)
    opt.push({"w": np.ones((10, 10)), "emb": IndexedSlices([1], np.ones((1, 2), np.float32))}, worker_id="a",
             base_version=0)
    run = subprocess.run([sys.executable, "-m", "optserve.server.cli", "status", client.address],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    optimizers, clients = run.stdout.split("\n\n")
    header, *rows = optimizers.splitlines()
    assert header.split() == ["NAME", "OPTIMIZER", "MODE", "VERSION", "ITERATIONS", "TENSORS", "BYTES", "DEVICE",
                              "PUSHES/S", "LAST", "PUSH"]
    (row,) = [r for r in rows if r.startswith(name + " ")]
    assert row.split()[1:6] == ["Adam", "sync/1", "1", "1", "2"] and "440 B" in row and "cpu:0" in row and "s ago" in row
    header, *rows = clients.splitlines()
    assert header.split() == ["OPTIMIZER", "CLIENT", "TRANSPORT", "RECEIVED", "SENT", "LAST", "SEEN"]
    mine = [r.split() for r in rows if r.startswith(name + " ")]
    # the create's 440 bytes and the push's 400 + 8 + 8 (dense w, one int64 index, one sparse row)
    assert [(r[1].startswith("ipv4:127.0.0.1:"), r[2], r[3:5]) for r in mine] == [(True, "grpc", ["856", "B"])]
    client.delete_optimizer(name)
    client.close()


def test_health_command_exits_zero_only_when_serving(server) -> None:
    ok = subprocess.run([sys.executable, "-m", "optserve.server.cli", "health", server.address],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "SERVING" in ok.stdout
    restoring = RunningServer(ServerOptions(host="127.0.0.1", port=0), restore=False)
    try:
        down = subprocess.run([sys.executable, "-m", "optserve.server.cli", "health", restoring.address],
                              capture_output=True, text=True, timeout=60)
        assert down.returncode == 1 and "NOT_SERVING" in down.stdout
    finally:
        restoring.stop()


def test_flags_come_from_the_environment_and_a_toml_file_and_the_command_line_wins(tmp_path: Path) -> None:
    from optserve.server import cli

    config = tmp_path / "optserve.toml"
    config.write_text('[serve]\nmax-optimizers = 7\ngrace = 3.5\nlog_format = "json"\n')
    parser_args = ["serve", "--config", str(config), "--grace", "1.0"]
    env = {"OPTSERVE_MAX_WORKERS": "12", "OPTSERVE_INSECURE": "true", "OPTSERVE_LOG_FORMAT": "text"}
    captured = {}

    def fake_serve(args):
        captured.update(vars(args))
        return 0

    original, saved_env = cli._serve, dict(os.environ)
    cli._serve = fake_serve
    os.environ.update(env)
    try:
        assert cli.main(parser_args) == 0
    finally:
        cli._serve = original
        os.environ.clear()
        os.environ.update(saved_env)
    assert captured["max_optimizers"] == 7  # file
    assert captured["max_workers"] == 12 and captured["insecure"] is True  # environment
    assert captured["log_format"] == "text"  # environment over file
    assert captured["grace"] == 1.0  # command line over file


def test_serve_help_documents_every_option() -> None:
    run = subprocess.run([sys.executable, "-m", "optserve.server.cli", "serve", "--help"],
                         capture_output=True, text=True, timeout=60)
    from optserve.server.cli import SERVE_FLAGS

    for field in SERVE_FLAGS:
        assert "--" + field.replace("_", "-") in run.stdout and f"OPTSERVE_{field.upper()}" in run.stdout
    assert "--config" in run.stdout
