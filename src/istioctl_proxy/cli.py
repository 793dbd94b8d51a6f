"""Command line: `serve`, `simulate`, `demo`, `ps`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence

from . import logs
from .config import Config, add_serve_flags, from_args
from .errors import ConfigError


def _serve(ns: argparse.Namespace) -> int:
    from .app import serve

    cfg = from_args(ns)
    logs.setup(cfg.log_level, cfg.log_format)
    asyncio.run(serve(cfg))
    return 0


def _check(ns: argparse.Namespace) -> int:
    from .check import run_check

    # The report is the output: only errors of the libraries underneath may interleave with it.
    logs.setup("error", "text")
    return asyncio.run(run_check(ns))


def _rotate(ns: argparse.Namespace) -> int:
    from .rotate import run_rotate

    logs.setup("info", "json")
    return asyncio.run(run_rotate(ns))


def _istio_version(value: str) -> str:
    from .sim.simulator import Behaviour

    try:
        Behaviour.of(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _simulate(ns: argparse.Namespace) -> int:
    from .sim.simulate import run_simulator

    logs.setup(ns.log_level, "text")
    asyncio.run(run_simulator(ns))
    return 0


def _demo(ns: argparse.Namespace) -> int:
    from .sim.simulate import run_demo

    logs.setup(ns.log_level, "text")
    return asyncio.run(run_demo(ns))


def _ps(ns: argparse.Namespace) -> int:
    from . import client

    ca = open(ns.ca, "rb").read() if ns.ca else None
    target = client.Target(ns.xds_address, plaintext=ns.plaintext, token=ns.token, ca_pem=ca,
                           authority=ns.authority, namespace=ns.istio_namespace)
    resp, trailers = asyncio.run(client.request(target, client.SYNCZ, timeout=ns.timeout))
    print(client.as_json(resp) if ns.output == "json" else client.table(resp, ns.namespace), end="")
    for key, value in trailers:
        if key.startswith("x-istioctl-proxy"):
            print(f"warning: {value}", file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    """The `istioctl-proxy` argument parser with every subcommand."""
    p = argparse.ArgumentParser(prog="istioctl-proxy", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the aggregating ADS proxy")
    add_serve_flags(serve)
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check", help="doctor: config, discovery, TCP, TLS, auth, syncz per replica, and fixes")
    add_serve_flags(check)
    check.add_argument("--token-file", default="", help="forward mode: a caller's bearer token (file) to check "
                       "istiod's authentication with")
    check.add_argument("--timeout", type=float, default=5.0, help="seconds each discovery, TCP and TLS step may take")
    check.set_defaults(func=_check)

    rotate = sub.add_parser("rotate-token", help="renew the mesh-cluster TokenReview token (run by a CronJob)")
    from .rotate import add_flags as add_rotate_flags

    add_rotate_flags(rotate)
    rotate.set_defaults(func=_rotate)

    sim = sub.add_parser("simulate", help="run simulated istiod replicas (one port each)")
    sim.add_argument("--replicas", type=int, default=3)
    sim.add_argument("--proxies", type=int, default=30, help="simulated proxies over all replicas")
    sim.add_argument("--namespaces", type=int, default=4)
    sim.add_argument("--listen-host", default="127.0.0.1")
    sim.add_argument("--base-port", type=int, default=15010, help="replica i listens on base-port + i")
    sim.add_argument("--token", action="append", default=[], metavar="TOKEN=NS/SA",
                     help="a bearer token the replicas accept, and the identity it stands for")
    sim.add_argument("--latency", type=float, default=0.0, help="seconds each replica waits before answering")
    sim.add_argument("--istio-version", default="1.30.3", type=_istio_version,
                     help="the istiod release to behave as (1.24: ControlPlane on every response; "
                          "1.26/1.27.0: debug types unauthenticated and unscoped)")
    sim.add_argument("--log-level", default="info")
    sim.set_defaults(func=_simulate)

    demo = sub.add_parser("demo", help="simulated replicas + the proxy, then print the aggregated proxy status")
    demo.add_argument("--replicas", type=int, default=3)
    demo.add_argument("--proxies", type=int, default=12)
    demo.add_argument("--port", type=int, default=0, help="proxy port (0: any free port)")
    demo.add_argument("--serve", action="store_true", help="keep running so a real istioctl can be pointed at it")
    demo.add_argument("--log-level", default="warning")
    demo.set_defaults(func=_demo)

    ps = sub.add_parser("ps", help="print proxy sync status from any ADS address (like istioctl x ps)")
    ps.add_argument("--xds-address", required=True)
    ps.add_argument("--plaintext", action="store_true")
    ps.add_argument("--token", default="")
    ps.add_argument("--ca", default="", help="CA to verify the server (TLS)")
    ps.add_argument("--authority", default="")
    ps.add_argument("--istio-namespace", default=Config.istio_namespace)
    ps.add_argument("-n", "--namespace", default="", help="show only this namespace's proxies")
    ps.add_argument("-o", "--output", choices=("table", "json"), default="table")
    ps.add_argument("--timeout", type=float, default=30.0)
    ps.set_defaults(func=_ps)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for a ConfigError, printed as one line)."""
    ns = parser().parse_args(argv)
    try:
        return int(ns.func(ns))
    except ConfigError as err:
        print(f"istioctl-proxy: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a user-facing tool: one line, not a traceback
        import grpc

        if isinstance(err, grpc.aio.AioRpcError):
            print(f"istioctl-proxy: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())


__all__ = ["main", "parser"]
