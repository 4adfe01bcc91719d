"""Config reload without dropping requests.

`llmrelay serve` runs granian, whose main process restarts the workers one at a time on SIGHUP: a
new worker is started, RESPAWN_INTERVAL seconds later the old one gets SIGTERM and drains (its
in-flight requests and streams finish, its log queue is flushed). Before that, granian calls the
hooks registered with `on_reload`, in the main process, and the workers are forked from it: so the
`Reloader` hook reads the config file and validates it as `llmrelay check` does (the settings,
then every stage and provider built without serving). When it is valid, its text goes into
LLMRELAY_CONFIG_TEXT, which the new workers load (`worker_config`), so a file edited again between
the check and a worker's start cannot slip in unchecked. When it is not, one line says why, and
the workers come back up on the config already served.

`POST /api/admin/reload` (admin key) checks the file in the worker first: 422 naming the error, or
SIGHUP to the main process and 202.

Settings that granian's main process reads at start (RESTART_ONLY) are not applied by a reload:
the log line and the admin answer say they need a restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from proxy.settings import ConfigError, Settings, embedded_defaults, load_settings, parse_text, read_text

if TYPE_CHECKING:
    from starlette.routing import Route

    from proxy.gateway import Gateway

CONFIG_ENV = "LLMRELAY_CONFIG"  # the config file's path (absent: the embedded defaults)
CONFIG_TEXT_ENV = "LLMRELAY_CONFIG_TEXT"  # the text the main process validated: what workers load
MAIN_PID_ENV = "LLMRELAY_MAIN_PID"  # granian's main process, where SIGHUP goes
RESTART_ENV = "LLMRELAY_RESTART_ONLY"  # JSON: the restart-only settings the server started with
# server settings granian's main process reads once, at start (a reload cannot change them); a
# name the Server settings do not have (yet) is skipped
RESTART_ONLY = ("host", "port", "workers", "tls_cert", "tls_key", "http")
# seconds between starting a new worker and stopping the old one it replaces: a worker is up in
# 0.2-0.5 s (fork, build, log sinks and admin store opened); the log queue's start-up replay may
# wait up to 2 s for a slow sink
RESPAWN_INTERVAL = 3.0
KILL_MARGIN = 15  # granian kills a worker shutdown_timeout + this many seconds after SIGTERM (log flush)


@dataclass(frozen=True)
class LoadedConfig:
    """A config as a process loaded it."""

    settings: Settings
    sha256: str  # first 12 hex digits of the SHA-256 of the file's text (`sha256sum` agrees)
    loaded_at: float  # unix time

    @property
    def loaded_at_text(self) -> str:
        return datetime.fromtimestamp(self.loaded_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def defaults_fingerprint() -> str:
    return fingerprint(orjson.dumps(embedded_defaults(), option=orjson.OPT_SORT_KEYS).decode())


def validate(text: str, source: str) -> Settings:
    """What `llmrelay check` does, on a file's text: ConfigError when it cannot be served."""
    settings = parse_text(text, source)
    from proxy.gateway import Gateway  # builds every stage and provider adapter, serves nothing

    Gateway(settings)
    return settings


def worker_config() -> LoadedConfig:
    """The config a granian worker serves: the text the main process validated, else the file
    (LLMRELAY_CONFIG), else the embedded defaults."""
    path = os.environ.get(CONFIG_ENV) or None
    text = os.environ.get(CONFIG_TEXT_ENV)
    if text is None and path is not None:
        text = read_text(path)
    if text is None:
        return LoadedConfig(load_settings(None), defaults_fingerprint(), time.time())
    return LoadedConfig(parse_text(text, path or "<config text>"), fingerprint(text), time.time())


def restart_only(settings: Settings, overridden: Collection[str] = ()) -> dict[str, Any]:
    """What a reload cannot change, as the server starts: the RESTART_ONLY settings the command line
    does not override, and server.shutdown_timeout (granian's kill deadline is set from it)."""
    server = {name: getattr(settings.server, name) for name in RESTART_ONLY
              if name not in overridden and hasattr(settings.server, name)}
    return {"server": server, "shutdown_timeout": settings.server.shutdown_timeout}


def needs_restart(settings: Settings, started: dict[str, Any]) -> list[str]:
    """What a new config changes that only a restart applies, e.g. 'server.port (8080 -> 9090)'."""
    notes = [f"server.{name} ({was} -> {getattr(settings.server, name)})"
             for name, was in started.get("server", {}).items() if getattr(settings.server, name, was) != was]
    was = started.get("shutdown_timeout")
    if was is not None and settings.server.shutdown_timeout > was:
        notes.append(f"server.shutdown_timeout ({was:g} -> {settings.server.shutdown_timeout:g}: a draining worker "
                     f"is still killed {int(was) + KILL_MARGIN} s after SIGTERM)")
    return notes


def started_with() -> dict[str, Any]:
    """restart_only() of the config the server started with (the CLI puts it in RESTART_ENV)."""
    raw = os.environ.get(RESTART_ENV)
    return orjson.loads(raw) if raw else {}


class Reloader:
    """granian's on_reload hook, in the main process. Never raises: an exception would end
    granian's main loop, and with it the server."""

    def __init__(self, path: str | None, loaded: LoadedConfig, started: dict[str, Any]) -> None:
        self.path = path
        self.current = loaded
        self.started = started  # restart_only() at start

    def __call__(self) -> None:
        try:
            self.reload()
        except Exception as exc:  # a bug here must not stop the server
            self.refuse(f"{type(exc).__name__}: {exc}")

    def reload(self) -> None:
        if self.path is None:
            say("llmrelay: config reload: serving the embedded defaults (no --config); restarting the workers on them")
            return
        try:
            text = read_text(self.path)
            settings = validate(text, self.path)
        except ConfigError as exc:
            self.refuse(str(exc))
            return
        except Exception as exc:  # a stage or provider that failed to build in an unforeseen way
            self.refuse(f"{type(exc).__name__}: {exc}")
            return
        os.environ[CONFIG_TEXT_ENV] = text
        self.current = LoadedConfig(settings, fingerprint(text), time.time())
        notes = needs_restart(settings, self.started)
        line = (f"llmrelay: config reload accepted: {self.path} (sha256 {self.current.sha256}); "
                "restarting the workers one at a time")
        if notes:
            line += f"; needs a restart, not applied: {', '.join(notes)}"
        say(line)

    def refuse(self, why: str) -> None:
        say(f"llmrelay: config reload refused: {why}; still serving the config loaded at "
            f"{self.current.loaded_at_text} (sha256 {self.current.sha256})")


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def routes(gateway: Gateway) -> list[Route]:
    """POST /api/admin/reload (admin key): check the config file here, then SIGHUP granian."""
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from proxy.admin import error_response, json_response

    @gateway.admin
    async def reload(request: Request) -> Response:
        main = os.environ.get(MAIN_PID_ENV)
        if not main or not main.isdigit() or int(main) != os.getppid():
            return error_response("This gateway was not started by `llmrelay serve`: restart it to change its config",
                                  409)
        path = os.environ.get(CONFIG_ENV)
        if not path:
            return error_response("This gateway serves the embedded defaults (no --config): there is no file to reload",
                                  409)
        try:
            text = await asyncio.to_thread(read_text, path)
            settings = await asyncio.to_thread(validate, text, path)  # builds stages: off the event loop
        except ConfigError as exc:
            return error_response(str(exc), 422)
        except Exception as exc:
            return error_response(f"{path}: {type(exc).__name__}: {exc}", 422)
        os.kill(int(main), signal.SIGHUP)
        return json_response({"status": "reloading", "config": path, "sha256": fingerprint(text),
                              "needs_restart": needs_restart(settings, started_with())}, 202)

    return [Route("/api/admin/reload", reload, methods=["POST"]), Route("/api/admin/reload/", reload, methods=["POST"])]
