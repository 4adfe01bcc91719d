"""`llmrelay serve | check | hash-key | keys | prompts`."""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
import sys
import tempfile
from pathlib import Path

from proxy import cli_keys, cli_prompts
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
    settings = load_settings(config)
    host = args.host or settings.server.host
    port = args.port if args.port is not None else settings.server.port
    workers = args.workers or settings.server.workers
    if config:
        os.environ["LLMRELAY_CONFIG"] = config
    else:
        os.environ.pop("LLMRELAY_CONFIG", None)
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
        print(f"llmrelay: serving {settings.source} on http://{host}:{port} with {workers} worker(s)", file=sys.stderr)
        Granian(
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
            workers_kill_timeout=int(settings.server.shutdown_timeout) + 15,
        ).serve()
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


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
