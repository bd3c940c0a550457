"""The `optserve` command: `serve` runs a server, `demo` trains against one with worker processes, `bench` measures."""

import argparse
import logging
import sys

from optserve.server.options import ServerOptions


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `optserve` console script."""
    parser = argparse.ArgumentParser(prog="optserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    defaults = ServerOptions()
    serve = commands.add_parser("serve", help="run a server until SIGTERM or SIGINT")
    serve.add_argument("--host", default=defaults.host, help="address to bind (default %(default)s)")
    serve.add_argument("--port", type=int, default=defaults.port, help="port to bind; 0 picks a free one (default %(default)s)")
    serve.add_argument("--max-workers", type=int, default=defaults.max_workers, help="RPC threads (default %(default)s)")
    serve.add_argument("--max-request-bytes", type=int, default=defaults.max_request_bytes,
                       help="tensor bytes one create or push may carry (default %(default)s)")
    serve.add_argument("--max-tensor-bytes", type=int, default=defaults.max_tensor_bytes,
                       help="bytes of any one parameter tensor (default %(default)s)")
    serve.add_argument("--max-optimizers", type=int, default=defaults.max_optimizers,
                       help="optimizers one server holds (default %(default)s)")
    serve.add_argument("--max-concurrent-rpcs", type=int, default=defaults.max_concurrent_rpcs,
                       help="calls in progress at once; more get RESOURCE_EXHAUSTED (default %(default)s)")
    serve.add_argument("--grace", type=float, default=defaults.grace,
                       help="seconds calls in flight get to finish on shutdown (default %(default)s)")
    serve.add_argument("--data-dir", default=defaults.data_dir,
                       help="keep every optimizer's state here and restore it on start (default: memory only)")
    serve.add_argument("--durability", choices=["wal", "none"], default=defaults.durability,
                       help="with --data-dir: 'wal' logs each change durably before acknowledging it; "
                            "'none' keeps checkpoints only (default %(default)s)")
    serve.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                       help="steps between checkpoints (default %(default)s)")
    serve.add_argument("--checkpoint-interval", type=float, default=defaults.checkpoint_interval,
                       help="seconds between checkpoints of an optimizer that changed (default %(default)s)")
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default %(default)s)")
    serve.add_argument("--tls-cert", default=defaults.tls_cert, help="PEM certificate chain; with --tls-key, serve TLS")
    serve.add_argument("--tls-key", default=defaults.tls_key, help="PEM private key of --tls-cert")
    serve.add_argument("--tls-client-ca", default=defaults.tls_client_ca,
                       help="PEM CA bundle: require client certificates signed by it (mTLS; needs --tls-cert)")
    serve.add_argument("--token-file", default=defaults.token_file,
                       help="bearer tokens, one per line (# comments); every call but health and reflection "
                            "must send 'authorization: Bearer <token>'")
    serve.add_argument("--insecure", action="store_true", default=defaults.insecure,
                       help="allow plaintext on a non-loopback --host (without TLS only loopback is bound)")

    demo = commands.add_parser("demo", help="start a server and train a digits classifier with worker processes")
    demo.add_argument("--workers", type=int, default=4, help="worker processes (default %(default)s)")
    demo.add_argument("--steps", type=int, default=200, help="Adam steps per mode (default %(default)s)")
    demo.add_argument("--mode", choices=["both", "sync", "async"], default="both",
                      help="which modes to run, one after the other (default %(default)s)")
    demo.add_argument("--max-staleness", type=int, default=4, help="async staleness bound (default %(default)s)")
    demo.add_argument("--plot", default="optserve-demo.png", help="where to write the PNG plot (default %(default)s)")
    demo.add_argument("--address", help="use this running server instead of starting one")

    bench = commands.add_parser("bench", help="measure side by side in one run and print a table")
    bench.add_argument("--quick", action="store_true", help="small sizes, well under a minute (a CI smoke test)")
    bench.add_argument("--json", help="also write the results to this JSON file")

    args = parser.parse_args(argv)
    if args.command == "bench":
        from optserve.server.bench import run_bench

        return run_bench(quick=args.quick, json_path=args.json)
    if args.command == "serve":
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            from optserve.server.app import serve as run_server
        except ImportError as err:
            print(f"optserve serve needs the server extra: pip install 'optserve[server]' ({err})", file=sys.stderr)
            return 2
        return run_server(ServerOptions(
            host=args.host, port=args.port, max_workers=args.max_workers, max_request_bytes=args.max_request_bytes,
            max_tensor_bytes=args.max_tensor_bytes, max_optimizers=args.max_optimizers,
            max_concurrent_rpcs=args.max_concurrent_rpcs, grace=args.grace, data_dir=args.data_dir,
            durability=args.durability, checkpoint_every=args.checkpoint_every,
            checkpoint_interval=args.checkpoint_interval, tls_cert=args.tls_cert, tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca, token_file=args.token_file, insecure=args.insecure))
    from optserve.server.demo import run_demo

    modes = ("sync", "async") if args.mode == "both" else (args.mode,)
    return run_demo(workers=args.workers, steps=args.steps, modes=modes, max_staleness=args.max_staleness,
                    plot=args.plot, address=args.address)


if __name__ == "__main__":
    sys.exit(main())
