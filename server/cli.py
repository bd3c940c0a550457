"""The `optserve` command: `serve` runs a server, `demo` trains against one with worker
processes, `bench` measures, `status` shows a server's optimizers, `health` probes one."""

import argparse
import dataclasses
import os
import sys
import tomllib
from typing import Any

from optserve.server.options import ServerOptions

# Every ServerOptions field is a `serve` flag: --field-name, env OPTSERVE_FIELD_NAME, TOML key field_name.
SERVE_FLAGS: dict[str, tuple[Any, str]] = {  # field -> (type, or a tuple of choices, or bool; help)
    "host": (str, "address to bind; without TLS only loopback unless --insecure"),
    "port": (int, "port to bind; 0 picks a free one"),
    "bulk_port": (int, "TCP port of the bulk channels that carry tensor bytes beside gRPC (same host, same TLS "
                       "and client CA); 0 picks a free one, -1 turns them off (tensor bytes then go in the gRPC "
                       "streams)"),
    "max_workers": (int, "threads serving RPCs, at least --max-streams + 40 (None: exactly that); each stream "
                         "holds one"),
    "max_request_bytes": (int, "tensor bytes one create or push may carry"),
    "max_tensor_bytes": (int, "bytes of any one parameter tensor"),
    "max_inflight_bytes": (int, "receive-buffer bytes all creates and pushes in flight (and open sync rounds) "
                                "may hold at once; unset: half the memory the process may use (the least of RAM, "
                                "the cgroup limit and RLIMIT_AS)"),
    "max_optimizers": (int, "optimizers one server holds"),
    "max_tensors": (int, "tensors one optimizer may have (its first step compiles in time and memory that "
                         "grow with the count)"),
    "max_concurrent_rpcs": (int, "calls in progress at once; more get RESOURCE_EXHAUSTED"),
    "max_streams": (int, "create, push and pull streams in progress at once; more get RESOURCE_EXHAUSTED"),
    "max_streams_per_connection": (int, "of --max-streams, those from one connection"),
    "max_waiting_calls": (int, "of --max-streams, pulls waiting for min_version and sync pushes waiting for "
                               "their round"),
    "stream_idle_timeout": (float, "seconds a stream may wait for its peer to send (or read) the next message; "
                                   "then it is cancelled"),
    "grace": (float, "seconds calls in flight get to finish on SIGTERM/SIGINT"),
    "data_dir": (str, "keep every optimizer's state here and restore it on start (default: memory only)"),
    "durability": (("wal", "none"), "with --data-dir: 'wal' logs each change durably before acknowledging it; "
                                    "'none' keeps checkpoints only"),
    "checkpoint_every": (int, "steps between checkpoints"),
    "checkpoint_interval": (float, "seconds between checkpoints of an optimizer that changed"),
    "accept_log_loss": (bool, "with --data-dir: start even if a log is damaged or missing, with the changes "
                              "before the damage (the rest kept aside as wal-*.log.lost-*); off: refuse to start"),
    "metrics_port": (int, "serve Prometheus metrics on this port (0 picks one; default: off); HTTPS with the "
                          "TLS flags, bearer token with --token-file"),
    "metrics_host": (str, "address /metrics binds; off loopback it needs TLS or --insecure"),
    "shm_dir": (str, "directory (a tmpfs) for same-host shared-memory segments, files of mode 0600 with random "
                     "names; '' turns the same-host path off"),
    "shm_idle_timeout": (float, "seconds a same-host segment may go unused before it is freed (a dead "
                                "client's segments are reclaimed after this)"),
    "shm_max_segments": (int, "same-host segments open at once"),
    "shm_max_segments_per_optimizer": (int, "of --shm-max-segments, those of one optimizer"),
    "shm_max_bytes": (int, "bytes all same-host segments may hold (each twice its optimizer's tensors); unset: "
                           "half of --max-inflight-bytes"),
    "log_format": (("text", "json"), "log lines for people or for log pipelines"),
    "log_level": (("DEBUG", "INFO", "WARNING", "ERROR"), "least severe log lines shown"),
    "tls_cert": (str, "PEM certificate chain; with --tls-key, serve TLS"),
    "tls_key": (str, "PEM private key of --tls-cert"),
    "tls_client_ca": (str, "PEM CA bundle: require client certificates signed by it (mTLS; needs --tls-cert)"),
    "token_file": (str, "bearer tokens, one per line (# comments); every call but health and reflection must "
                        "send 'authorization: Bearer <token>'"),
    "insecure": (bool, "allow plaintext on a non-loopback --host"),
    "devices": (str, "local devices (accelerators, or CPU devices) each optimizer's state is sharded over: a "
                     "count, or 'all'; large tensors are split across them, small ones placed whole"),
}
SERVE_EPILOG = """Every flag can also be set by an environment variable OPTSERVE_<FLAG> (e.g. OPTSERVE_PORT=50051,
OPTSERVE_INSECURE=true) or by a key in the TOML file of --config (e.g. port = 50051 or [serve] port = 50051).
The command line wins over the environment, which wins over the file."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `optserve` console script."""
    parser = argparse.ArgumentParser(prog="optserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run a server until SIGTERM or SIGINT", epilog=SERVE_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_serve_flags(serve, argv)

    demo = commands.add_parser("demo", help="start a server and train a digits classifier with worker processes")
    demo.add_argument("--workers", type=int, default=4, help="worker processes (default %(default)s)")
    demo.add_argument("--steps", type=int, default=200, help="Adam steps per mode (default %(default)s)")
    demo.add_argument("--mode", choices=["both", "sync", "async"], default="both",
                      help="which modes to run, one after the other (default %(default)s)")
    demo.add_argument("--max-staleness", type=int, default=4, help="async staleness bound (default %(default)s)")
    demo.add_argument("--plot", default="optserve-demo.png", help="where to write the PNG plot (default %(default)s)")
    demo.add_argument("--address", help="use this running server instead of starting one: HOST:PORT, a "
                                         "dns:/// name, or the shards of one sharded server, HOST:PORT,HOST:PORT,...")
    demo.add_argument("--tag", default="", help="suffix of the optimizer names, so several demos can share a server")

    bench = commands.add_parser("bench", help="measure side by side in one run and print a table")
    bench.add_argument("--quick", action="store_true", help="small sizes, well under a minute (a CI smoke test)")
    bench.add_argument("--json", help="also write the results to this JSON file")
    bench.add_argument("--plot", default="optserve-bench.png", help="where to write the PNG plot (default %(default)s)")
    bench.add_argument("--peers", action=argparse.BooleanOptionalAction, default=None,
                       help="run PyTorch RPC and Ray beside optserve (default: in a full run, not with --quick; "
                            "needs optserve[peers])")
    bench.add_argument("--scale-out-rate", type=float, metavar="MBIT",
                       help="rate of every link in the scale-out section, Mbit/s each way (default: 200; the "
                            "section needs root and iproute2's ip and tc, else it is skipped)")

    for name, text in [("status", "print a table of a server's optimizers"),
                       ("health", "exit 0 if a server's service is SERVING (for probes), 1 otherwise")]:
        command = commands.add_parser(name, help=text)
        command.add_argument("address", help="HOST:PORT of the server")
        command.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default %(default)s)")
        command.add_argument("--tls-ca", help="PEM CA bundle to check a TLS server with")
        if name == "status":
            command.add_argument("--token-file", help="file whose first token is sent as the bearer token")
        else:
            command.add_argument("--service", default="optserve.v1.OptimizerService",
                                 help="health service name; '' is the whole server (default %(default)s)")

    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "demo":
        from optserve.server.demo import run_demo

        modes = ("sync", "async") if args.mode == "both" else (args.mode,)
        return run_demo(workers=args.workers, steps=args.steps, modes=modes, max_staleness=args.max_staleness,
                        plot=args.plot, address=_demo_address(args.address), tag=args.tag)
    if args.command == "bench":
        from optserve.server.bench import run_bench

        return run_bench(quick=args.quick, json_path=args.json, plot_path=args.plot, peers=args.peers,
                         scale_out_rate_mbit=args.scale_out_rate)
    if args.command == "status":
        return _status(args)
    return _health(args)


def _add_serve_flags(serve: argparse.ArgumentParser, argv: list[str] | None) -> None:
    """One flag per ServerOptions field, its default from the TOML file, then the environment."""
    serve.add_argument("--config", help="TOML file with flag values (keys as the flags, underscores or dashes)")
    config_path = _config_path(argv)
    file_values = _read_config_file(config_path) if config_path else {}
    defaults = ServerOptions()
    for field, (kind, text) in SERVE_FLAGS.items():
        env = f"OPTSERVE_{field.upper()}"
        default = getattr(defaults, field)
        default = file_values.get(field, default)
        if env in os.environ:
            default = _parse_env(env, os.environ[env], kind)
        flag = "--" + field.replace("_", "-")
        help_text = f"{text} (default {default}; env {env})"
        if kind is bool:
            serve.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif isinstance(kind, tuple):
            serve.add_argument(flag, choices=kind, default=default, help=help_text)
        else:
            serve.add_argument(flag, type=kind, default=default, help=help_text)


def _config_path(argv: list[str] | None) -> str | None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=os.environ.get("OPTSERVE_CONFIG"))
    known, _ = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    return known.config


def _read_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise SystemExit(f"optserve: --config {path}: {err}") from None
    values = {key.replace("-", "_"): value for key, value in {**data, **data.get("serve", {})}.items()
              if key != "serve"}
    unknown = sorted(set(values) - set(SERVE_FLAGS))
    if unknown:
        raise SystemExit(f"optserve: --config {path}: unknown keys {unknown}; known: {sorted(SERVE_FLAGS)}")
    return values


def _parse_env(name: str, value: str, kind: Any) -> Any:
    if kind is bool:
        if value.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise SystemExit(f"optserve: {name}={value!r}: expected true or false")
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(kind, tuple):
        if value not in kind:
            raise SystemExit(f"optserve: {name}={value!r}: expected one of {kind}")
        return value
    try:
        return kind(value)
    except ValueError:
        raise SystemExit(f"optserve: {name}={value!r}: expected {kind.__name__}") from None


def _demo_address(text: str | None) -> str | list[str] | None:
    """--address as Client takes it: several comma-separated shards become a list, in their order."""
    return text.split(",") if text and "," in text else text


def _serve(args: argparse.Namespace) -> int:
    options = ServerOptions(**{field.name: getattr(args, field.name) for field in dataclasses.fields(ServerOptions)})
    try:
        from optserve.server.admission import LimitsConfigError
        from optserve.server.app import serve
        from optserve.server.engine.devices import DevicesConfigError
        from optserve.server.logs import configure
        from optserve.server.security import SecurityConfigError
    except ImportError as err:
        print(f"optserve serve needs the server extra: pip install 'optserve[server]' ({err})", file=sys.stderr)
        return 2
    configure(options.log_level, options.log_format)
    try:
        return serve(options)
    except (SecurityConfigError, LimitsConfigError, DevicesConfigError) as err:
        print(f"optserve serve: {err}", file=sys.stderr)
        return 2


def _client_security(args: argparse.Namespace) -> dict[str, Any]:
    token = None
    if getattr(args, "token_file", None):
        from optserve.server.security import load_tokens

        token = load_tokens(args.token_file)[0].decode()
    return {"tls": args.tls_ca, "token": token}


def _status(args: argparse.Namespace) -> int:
    from optserve.client import Client, OptserveError
    from optserve.server.status import format_table

    try:
        with Client(args.address, timeout=args.timeout, **_client_security(args)) as client:
            print(format_table(client.list_optimizers()))
    except OptserveError as err:
        print(f"optserve status {args.address}: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    return 0


def _health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from optserve.client.security import as_tls, make_channel

    with make_channel(args.address, [], as_tls(args.tls_ca), None) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as err:
            print(f"{args.address}: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address} {args.service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
