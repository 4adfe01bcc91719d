"""`llmrelay serve | check | hash-key | keys | prompts`."""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from proxy import cli_keys, cli_prompts, reload
from proxy.keys import hash_key
from proxy.settings import ConfigError, Settings, load_settings


def _load(path: str | None) -> Settings:
    settings = load_settings(path)
    # Build (without serving) everything a worker builds, so stage and provider errors surface here.
    from proxy.gateway import Gateway

    Gateway(settings)
    return settings


def serve(args: argparse.Namespace) -> int:
    from granian import Granian
    from granian.constants import Interfaces, Loops, RuntimeModes

    config = str(Path(args.config).resolve()) if args.config else None
    if config:
        text = reload.read_text(config)
        settings = reload.parse_text(text, config)
        loaded = reload.LoadedConfig(settings, reload.fingerprint(text), time.time())
    else:
        settings = load_settings(None)
        loaded = reload.LoadedConfig(settings, reload.defaults_fingerprint(), time.time())
    host = args.host or settings.server.host
    port = args.port if args.port is not None else settings.server.port
    workers = args.workers or settings.server.workers
    # The workers (forked from this process) load the config from the environment: the path, and
    # the text validated here (a reload replaces it; see proxy/reload.py).
    if config:
        os.environ[reload.CONFIG_ENV] = config
        os.environ[reload.CONFIG_TEXT_ENV] = text
    else:
        os.environ.pop(reload.CONFIG_ENV, None)
        os.environ.pop(reload.CONFIG_TEXT_ENV, None)
    overridden = {name for name in reload.RESTART_ONLY if getattr(args, name, None) is not None}
    started = reload.restart_only(settings, overridden)
    os.environ[reload.RESTART_ENV] = orjson.dumps(started).decode()
    os.environ[reload.MAIN_PID_ENV] = str(os.getpid())  # granian's main process is this one
    metrics_dir = None
    if workers > 1:  # prometheus-client multiprocess mode: workers share values through files
        # Before anything imports prometheus_client (the Gateway below does): it picks its value
        # class at import time, and granian forks the workers from this process.
        metrics_dir = tempfile.mkdtemp(prefix="llmrelay-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        # Build (without serving) everything a worker builds, so stage and provider errors surface here.
        from proxy.gateway import Gateway

        Gateway(settings)
        scheme = "https" if settings.server.tls_cert else "http"
        print(f"llmrelay: serving {settings.source} on {scheme}://{host}:{port} with {workers} worker(s)", file=sys.stderr)
        server = Granian(
            "proxy.app:create_app",
            factory=True,
            address=host,
            port=port,
            interface=Interfaces.ASGI,
            workers=workers,
            loop=Loops.uvloop,
            log_access=False,
            backlog=2048,
            # one Rust thread per worker, scheduling without cross-thread work stealing: about
            # 5-10 % less CPU per request at concurrency 64 (benchmarks/README.md)
            runtime_mode=RuntimeModes.st,
            # streams end at shutdown_timeout (the worker enforces it); then the log queue drains
            workers_kill_timeout=int(settings.server.shutdown_timeout) + reload.KILL_MARGIN,
            # SIGHUP: each worker is replaced by a new one, started this long before the old one drains
            respawn_interval=reload.RESPAWN_INTERVAL,
            **edge_options(settings),
        )
        server.on_reload(reload.Reloader(config, loaded, started))
        server.serve()
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def edge_options(settings: Settings) -> dict[str, Any]:
    """granian's TLS and HTTP-version options from `server`."""
    from granian.constants import HTTPModes

    server = settings.server
    options: dict[str, Any] = {"http": HTTPModes.http1 if server.http == "1" else HTTPModes.auto}
    if server.tls_cert and server.tls_key:
        options.update(ssl_cert=Path(server.tls_cert), ssl_key=Path(server.tls_key))
    return options


def check(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    stages = ", ".join(e.name for e in settings.stage_entries()) or "none"
    print(
        f"{settings.source}: ok ({len(settings.providers)} providers, {len(settings.models)} models, "
        f"{len(settings.keys)} keys; pipeline: {stages})"
    )
    return 0


def hash_key_command(args: argparse.Namespace) -> int:
    key = args.key if args.key is not None else getpass.getpass("key: ")
    print(hash_key(key))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmrelay", description="A self-hosted, high-throughput LLM gateway.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("serve", help="run the gateway (embedded defaults without --config)")
    p.add_argument("--config", "-c", help="YAML config file")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int)
    p.set_defaults(func=serve)
    p = commands.add_parser("check", help="validate a config without serving")
    p.add_argument("config")
    p.set_defaults(func=check)
    p = commands.add_parser("hash-key", help="print the key_hash to put in a config for a gateway key")
    p.add_argument("key", nargs="?")
    p.set_defaults(func=hash_key_command)
    cli_keys.add_commands(commands)
    cli_prompts.add_commands(commands)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"llmrelay: config error: {exc}", file=sys.stderr)
        return 2
    except cli_keys.AdminError as exc:
        print(f"llmrelay: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
