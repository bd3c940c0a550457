"""The `optserve` command: `serve` runs a server, `demo` trains against one with worker processes."""

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
    serve.add_argument("--grace", type=float, default=defaults.grace,
                       help="seconds calls in flight get to finish on shutdown (default %(default)s)")
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default %(default)s)")

    demo = commands.add_parser("demo", help="start a server and train a digits classifier with worker processes")
    demo.add_argument("--workers", type=int, default=4, help="worker processes (default %(default)s)")
    demo.add_argument("--steps", type=int, default=200, help="Adam steps per mode (default %(default)s)")
    demo.add_argument("--mode", choices=["both", "sync", "async"], default="both",
                      help="which modes to run, one after the other (default %(default)s)")
    demo.add_argument("--max-staleness", type=int, default=4, help="async staleness bound (default %(default)s)")
    demo.add_argument("--plot", default="optserve-demo.png", help="where to write the PNG plot (default %(default)s)")
    demo.add_argument("--address", help="use this running server instead of starting one")

    args = parser.parse_args(argv)
    if args.command == "serve":
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            from optserve.server.app import serve as run_server
        except ImportError as err:
            print(f"optserve serve needs the server extra: pip install 'optserve[server]' ({err})", file=sys.stderr)
            return 2
        run_server(ServerOptions(args.host, args.port, args.max_workers, args.max_request_bytes, args.grace))
        return 0
    from optserve.server.demo import run_demo

    modes = ("sync", "async") if args.mode == "both" else (args.mode,)
    return run_demo(workers=args.workers, steps=args.steps, modes=modes, max_staleness=args.max_staleness,
                    plot=args.plot, address=args.address)


if __name__ == "__main__":
    sys.exit(main())
