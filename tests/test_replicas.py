"""Three gateway replicas behave as one gateway (issue 9, item 5).

Three `llmrelay serve` processes, 2 workers each, on their own ports, run one config (the same
file; only two environment variables differ: the spool folder and the log DSN). Cache, limit
counters and cooldowns are on the real Redis (this xdist worker's REDIS_URL database); logs go to
a PostgreSQL sink on the real server (a fresh database for this test, dropped afterwards), with a
spool folder per replica. Replica C reaches PostgreSQL through a TCP relay in this file, so the
test can take its database away.

What is run, in order, and what each step shows:

1. Limits are exact across replicas. 90 concurrent requests (a third of them streams) with a key
   whose lifetime limit is 30, spread over A, B and C: exactly 30 answers are 200 and 60 are 429,
   summed over the replicas; exactly 30 reached the provider; every replica's usage API reads 30.
2. Cooldowns are shared. Requests for the fallback pair (a deployment answering 503, then a
   healthy one) go to A until A cools the failing deployment. Then every worker of every replica
   has it cooling (read from each worker's own prometheus multiprocess file: a per-worker fact,
   so no sleeping), and from then on no request on any replica tries it: the mock's count for
   that upstream model stays put, every pair answer says `x-llmrelay-attempts: 1` and the
   healthy provider, and their log rows have no attempt list and `fallback` false (while A's
   first ones logged the 503 attempt).
3. The cache is shared. One answer is cached through A; every request for it on A, B and C
   during the load (whole answers and streams) is `x-llmrelay-cache: hit`, and the provider saw
   that prompt once.
4. Load on all three replicas (2 client threads each, the official OpenAI SDK: chat, streams,
   cached, fallback pair), then replica C loses its database (the relay is black-holed: new
   connections refused, open ones cut), spools, and is killed with SIGKILL, its whole process
   group (granian's workers too; the processes lead their own session for that) while it is in
   the middle of a long stream, and while A is in the middle of another. It is started again on
   the same spool folder with a working DSN; its workers load the stored cooldown, it replays the
   dead process's spool, and the load goes on through it. A's long stream ends complete.
5. Every request is logged exactly once in PostgreSQL: each answered request's
   `x-respan-log-id` is a row, no row is there twice (by unique_id, nor by the request's own
   `custom_identifier`), and there is no other row (but one for a request of C whose client lost
   the answer at the kill).

"Acknowledged", for the killed replica: a log record is acknowledged once the replica has
durably taken it, that is, once it is in PostgreSQL or in a spool file on disk (a complete,
newline-terminated line; written, not fsynced: durable across the process's death, which is what
is tested, not across a power loss). Records still in the replica's memory queue (at most
`logs.flush_interval` old) are not acknowledged, and a SIGKILL may lose them. The test reads the
spool files on disk after the kill (their unique_ids: acknowledged but not in PostgreSQL), and
asserts that after the restart every acknowledged record is in PostgreSQL exactly once; answered
requests of C missing from PostgreSQL are allowed only if C had not acknowledged them. Requests
sent to A and B all succeed, those sent during the kill and the restart included; C's own
clients may fail only for requests in flight at the kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import orjson
import pytest
import redis
from prometheus_client.mmap_dict import MmapedDict

from plugins.limits.counters import KEY_PREFIX as LIMIT_PREFIX
from proxy.keys import hash_key
from proxy.state.cooldowns import KEY_PREFIX as COOLDOWN_PREFIX
from tests.conftest import ADMIN_KEY, ADMIN_KEYS, KEY, PG_SERVER, REDIS_URL, GatewayProcess, base_config
from tests.mock_upstream import WORDS, MockUpstream
from tests.relay import Relay

ANSWER = "".join(WORDS)
LIMITED_KEY = "sk-test-replicas-limited"
WORKERS = 2  # per replica
LIMIT, BURST = 30, 90
THREADS = 2  # load threads per replica
PACE = 0.03  # seconds each load thread rests between requests
KINDS = ("chat", "stream", "cached", "cached_stream", "pair", "pair_stream")
FAILING_MODEL = "mock-status-503"
SHORT_CHUNKS = 40  # a stream of 2 s (one chunk each 50 ms)


def pg(dsn: str, statement: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetch(statement, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def sent(mock: MockUpstream, marker: str) -> int:
    """Requests the mock received whose body holds `marker`."""
    return sum(marker in orjson.dumps(r["body"]).decode() for r in list(mock.requests))


class Replica(GatewayProcess):
    """A gateway process that leads its own session, so that one killpg also reaches granian's
    workers; TMPDIR is its workdir, so its prometheus multiprocess folder (one file per worker)
    is found there."""

    def __init__(self, name: str, config: dict[str, Any], workdir: Path, env: dict[str, str]) -> None:
        super().__init__(config, workdir, {**env, "TMPDIR": str(workdir)}, workers=WORKERS)
        self.name = name

    def start(self) -> Replica:
        with self.output.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", "serve", "--config", str(self.config_path),
                 "--port", str(self.port), "--workers", str(self.workers)],
                cwd=self.workdir, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica {self.name} exited with {self.proc.returncode}:\n{self.output.read_text()}")
            try:
                if httpx.get(f"{self.url}/api/health-check/", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"replica {self.name} did not come up:\n{self.output.read_text()}")

    def group(self) -> set[int]:
        """The running processes of this replica's process group (zombies do not count)."""
        assert self.proc is not None
        pids = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue
            if int(pgrp) == self.proc.pid and state != "Z":
                pids.add(int(stat.parent.name))
        return pids

    def group_alive(self) -> bool:
        return bool(self.group())

    def kill(self) -> None:
        """SIGKILL to the whole process group: the granian main process and its workers."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        wait_for(lambda: not self.group_alive(), 10, f"replica {self.name}'s workers to die")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        code = super().stop(sig)
        if self.proc is not None and self.group_alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # anything the graceful stop left behind
        return code

    def workers_cooling(self, deployment_key: str) -> int:
        """How many of this replica's worker processes have the deployment in cooldown, each read
        from its own gauge file (the /metrics endpoint only shows the max over the workers)."""
        assert self.proc is not None
        provider, _, deployment = deployment_key.partition("/")
        workers = self.group() - {self.proc.pid}
        found = 0
        for path in self.workdir.glob("llmrelay-metrics-*/gauge_max_*.db"):
            if int(path.stem.rsplit("_", 1)[1]) not in workers:  # the file of a live worker only
                continue
            try:
                found += self._cooling_in(MmapedDict.read_all_values_from_file(str(path)), provider, deployment)
            except (OSError, RuntimeError, ValueError):
                continue  # being written: read again on the next poll
        return found

    @staticmethod
    def _cooling_in(values: Iterable[tuple[str, float, float, int]], provider: str, deployment: str) -> bool:
        for raw, value, *_ in values:
            name, _, labels, _ = json.loads(raw)
            if name == "llmrelay_deployment_cooling" and labels == {"provider": provider, "deployment": deployment}:
                return value == 1.0
        return False


@dataclass
class Outcome:
    """One request as its client saw it."""

    replica: str
    kind: str
    rid: str  # sent as custom_identifier, so its log row can be named
    phase: str  # what the test was doing when the request was sent
    started: float
    ended: float = 0.0
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    text: str | None = None
    error: str | None = None

    @property
    def answered(self) -> bool:
        return self.error is None and self.status is not None

    @property
    def log_id(self) -> str | None:
        return self.headers.get("x-respan-log-id")

    def problem(self, good: str) -> str | None:
        """Why this answer is not what its kind should get (None: it is)."""
        if not self.answered:
            return f"no answer: {self.error}"
        if self.status != 200 or self.text != ANSWER:
            return f"status {self.status}, text {self.text!r}"
        if self.kind.startswith("cached") and self.headers.get("x-llmrelay-cache") != "hit":
            return f"not a cache hit: {self.headers}"
        if self.kind.startswith("pair") and (self.headers.get("x-llmrelay-attempts") != "1"
                                             or self.headers.get("x-llmrelay-provider") != good):
            return f"the cooling deployment was tried: {self.headers}"
        return None


KEPT_HEADERS = ("x-respan-log-id", "x-llmrelay-cache", "x-llmrelay-attempts", "x-llmrelay-provider")


class Load:
    """THREADS client threads per replica, each cycling through KINDS with the official SDK."""

    def __init__(self, urls: dict[str, str], tag: str) -> None:
        self.urls = dict(urls)  # the test moves C to its restarted process
        self.tag = tag
        self.phase = "run"
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(name, n), daemon=True)
                        for name in urls for n in range(THREADS)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)

    def count(self, replicas: str, phases: Iterable[str] | None = None) -> int:
        """Requests of these replicas answered as their kind should be, in these phases."""
        wanted = set(phases) if phases is not None else None
        with self.lock:
            return sum(1 for o in self.outcomes if o.replica in replicas and o.answered and o.status == 200
                       and (wanted is None or o.phase in wanted))

    def _run(self, name: str, index: int) -> None:
        client: openai.OpenAI | None = None
        url = ""
        i = 0
        try:
            while not self.stopping.is_set():
                phase, started = self.phase, time.monotonic()
                if name == "C" and phase == "down":  # C's clients wait for the restart
                    time.sleep(0.01)
                    continue
                if client is None or url != self.urls[name]:
                    if client is not None:
                        client.close()
                    url = self.urls[name]
                    client = openai.OpenAI(base_url=f"{url}/api", api_key=KEY, max_retries=0, timeout=15)
                kind = KINDS[(i + index * 3) % len(KINDS)]
                outcome = send(client, name, kind, f"{name}{index}-{i}", phase, self.tag, started)
                i += 1
                with self.lock:
                    self.outcomes.append(outcome)
                time.sleep(PACE)
        finally:
            if client is not None:
                client.close()


def cache_prompt(tag: str) -> str:
    return f"cache-me {tag}"


def send(client: openai.OpenAI, replica: str, kind: str, rid: str, phase: str, tag: str,
         started: float | None = None, retries: bool = False) -> Outcome:
    """One chat request of this kind through the SDK, and what came back."""
    outcome = Outcome(replica, kind, rid, phase, started if started is not None else time.monotonic())
    extra: dict[str, Any] = {"custom_identifier": rid, "customer_identifier": tag}
    model, content = "gpt-test", f"{tag} {rid}"
    if kind.startswith("cached"):
        content = cache_prompt(tag)
        extra.update(cache_enabled=True, cache_ttl=120)
    elif kind.startswith("pair"):
        model = "flaky"
        extra.update(fallback_models=["steady"])
        if not retries:
            extra["retry_params"] = {"retry_enabled": False}
    stream = kind.endswith("stream")
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": content}], stream=stream, extra_body=extra)
        outcome.status = raw.status_code
        outcome.headers = {k: raw.headers[k] for k in KEPT_HEADERS if k in raw.headers}
        if stream:
            outcome.text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        else:
            outcome.text = raw.parse().choices[0].message.content
    except openai.APIStatusError as e:
        outcome.status = e.status_code
        outcome.headers = {k: e.response.headers[k] for k in KEPT_HEADERS if k in e.response.headers}
        outcome.text = e.response.text[:300]
    except Exception as e:  # connection refused or reset, a broken stream: no answer
        outcome.error = repr(e)
    outcome.ended = time.monotonic()
    return outcome


async def limit_burst(urls: dict[str, str], tag: str) -> list[Outcome]:
    """BURST concurrent requests with the limited key, round robin over the replicas, a third of
    them streams."""
    names = sorted(urls)
    auth = {"Authorization": f"Bearer {LIMITED_KEY}"}
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def one(i: int) -> Outcome:
            name = names[i % len(names)]
            stream = (i // len(names)) % 3 == 0
            outcome = Outcome(name, "limit_stream" if stream else "limit", f"L-{i}", "limits", time.monotonic())
            body = {"model": "gpt-test", "messages": [{"role": "user", "content": f"limit-{tag}-{i}"}],
                    "stream": stream, "custom_identifier": outcome.rid, "customer_identifier": tag}
            async with client.stream("POST", f"{urls[name]}/api/chat/completions", json=body, headers=auth) as r:
                outcome.text = (await r.aread()).decode()
            outcome.status = r.status_code
            outcome.headers = {k: r.headers[k] for k in KEPT_HEADERS if k in r.headers}
            outcome.ended = time.monotonic()
            return outcome

        return list(await asyncio.gather(*(one(i) for i in range(BURST))))


def slow_stream(url: str, replica: str, rid: str, model: str, tag: str, first_chunk: threading.Event) -> Outcome:
    """A long stream through `url` (set `first_chunk` once it flows), for a request in flight at the kill."""
    outcome = Outcome(replica, "slow_stream", rid, "cut", time.monotonic())
    body = {"model": model, "messages": [{"role": "user", "content": f"{tag} {rid}"}], "stream": True,
            "custom_identifier": outcome.rid, "customer_identifier": tag}
    try:
        with httpx.stream("POST", f"{url}/api/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            outcome.status = r.status_code
            outcome.headers = {k: r.headers[k] for k in KEPT_HEADERS if k in r.headers}
            chunks = []
            for chunk in r.iter_bytes():
                chunks.append(chunk)
                first_chunk.set()
            outcome.text = b"".join(chunks).decode()
    except Exception as e:
        outcome.error = repr(e)
    finally:
        first_chunk.set()
        outcome.ended = time.monotonic()
    return outcome


def spooled(folder: Path) -> tuple[set[str], int]:
    """unique_ids of the complete (newline-terminated) records in a folder's postgres spool
    files, and how many lines were torn or unreadable."""
    ids: set[str] = set()
    bad = 0
    for path in folder.glob("postgres.*.spool"):
        data = path.read_bytes()
        complete, rest = data[: data.rfind(b"\n") + 1], data[data.rfind(b"\n") + 1:]
        bad += bool(rest.strip())
        for line in complete.splitlines():
            if line.strip():
                try:
                    ids.add(orjson.loads(line)["unique_id"])
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    bad += 1
    return ids, bad


def replica_config(mock: MockUpstream, workdir: Path, policy: str, bad: str, good: str) -> dict[str, Any]:
    """The one config every replica runs; `${...}` are the per-replica spool folder and log DSN."""
    shared = {"backend": "redis", "url": REDIS_URL}
    config = base_config(
        mock, workdir,
        extra_providers=[{"id": bad, "base_url": mock.base_url, "api_key": f"key-{bad}"},
                         {"id": good, "base_url": mock.base_url, "api_key": f"key-{good}"}],
        extra_models=[{"name": "flaky", "provider": bad, "model": FAILING_MODEL},
                      {"name": "steady", "provider": good, "model": "mock-ok"},
                      {"name": "slow", "provider": "mock", "model": "mock-slow-400"},  # 20 s of chunks
                      {"name": "slow-short", "provider": "mock", "model": f"mock-slow-{SHORT_CHUNKS}"}],
        pipeline=["auth",
                  {"name": "limits", "options": {"policies": [{
                      "name": policy, "scope": "api_key", "scope_id": "limited", "metric": "requests",
                      "window": "lifetime", "block_threshold": LIMIT}]}},
                  "cache", "routing", "credentials", "fallback"],
        state={"cache": shared, "counters": shared, "cooldowns": shared},
        cooldowns={"failures": 2, "window": 60, "duration": 120},
        admin_keys=ADMIN_KEYS,
        server={"max_body_bytes": 64 * 1024, "shutdown_timeout": 2},  # a failed test's teardown cuts streams
        logs={"spool_dir": "${LLMRELAY_TEST_SPOOL}", "flush_interval": 0.05,
              "sinks": [{"type": "postgres", "dsn": "${LLMRELAY_TEST_LOG_DSN}"}]},
    )
    config["keys"] = [*config["keys"], {"name": "limited", "key_hash": hash_key(LIMITED_KEY),
                                        "environment": "production"}]
    return config


def admin_get(replica: Replica, path: str) -> httpx.Response:
    return httpx.get(f"{replica.url}{path}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    """A fresh database on the shared PostgreSQL for this test's log table."""
    name = f"llmrelay_replicas_{uuid.uuid4().hex[:12]}"
    pg(f"{PG_SERVER}/test", f'CREATE DATABASE "{name}"')
    yield f"{PG_SERVER}/{name}"
    pg(f"{PG_SERVER}/test", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_three_replicas_behave_as_one_gateway(mock: MockUpstream, pg_dsn: str, tmp_path: Path) -> None:
    sfx = uuid.uuid4().hex[:8]
    tag, policy, bad, good = f"replicas-{sfx}", f"replicas-{sfx}", f"bad-{sfx}", f"good-{sfx}"
    cooling_key = f"{bad}/{bad}"
    relay = Relay(("127.0.0.1", 5432)).start()
    config = replica_config(mock, tmp_path, policy, bad, good)
    spool = {name: tmp_path / name / "spool" for name in "ABC"}
    through_relay = pg_dsn.replace("127.0.0.1:5432/", f"127.0.0.1:{relay.port}/")

    def replica(name: str, folder: str, dsn: str) -> Replica:
        return Replica(name, config, tmp_path / folder,
                       {"LLMRELAY_TEST_SPOOL": str(spool[name]), "LLMRELAY_TEST_LOG_DSN": dsn})

    replicas = {"A": replica("A", "A", pg_dsn), "B": replica("B", "B", pg_dsn), "C": replica("C", "C", through_relay)}
    running: list[Replica] = list(replicas.values())
    redis_client = redis.Redis.from_url(REDIS_URL)
    load: Load | None = None
    cache_id: str | None = None
    outcomes: list[Outcome] = []
    try:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(Replica.start, replicas.values()))
        urls = {name: r.url for name, r in replicas.items()}

        def rows() -> dict[str, asyncpg.Record]:
            return {r["unique_id"]: r for r in pg(pg_dsn, "SELECT unique_id, custom_identifier, model, provider_id, "
                                                          "attempts, fallback, cache_hit FROM request_logs")}

        # -- 1. limits: exact across the three replicas ----------------------------------------
        burst = asyncio.run(limit_burst(urls, tag))
        outcomes += burst
        statuses = Counter(o.status for o in burst)
        admitted = {name: sum(o.status == 200 for o in burst if o.replica == name) for name in "ABC"}
        assert statuses == {200: LIMIT, 429: BURST - LIMIT}, (statuses, admitted)
        assert sent(mock, f"limit-{tag}-") == LIMIT  # a refused request never reaches the provider
        for o in burst:
            if o.status == 200 and o.kind == "limit_stream":
                assert o.text is not None and o.text.rstrip().endswith("data: [DONE]"), o.text
            if o.status == 429:
                assert o.text is not None and f"limit '{policy}'" in o.text, o.text
        for r in replicas.values():  # one counter, read the same from every replica
            usage = admin_get(r, f"/api/limits/{policy}/usage/")
            assert usage.status_code == 200 and usage.json()["value"] == LIMIT, (r.name, usage.text)

        # -- 2. cooldowns: A cools the failing deployment; every worker of every replica has it --
        a_client = openai.OpenAI(base_url=f"{urls['A']}/api", api_key=KEY, max_retries=0, timeout=15)
        triggers: list[Outcome] = []
        while not redis_client.exists(COOLDOWN_PREFIX + cooling_key):
            assert len(triggers) < 2 * WORKERS + 2, ("A never cooled the failing deployment", triggers)
            triggers.append(send(a_client, "A", "pair_trigger", f"T-{len(triggers)}", "trigger", tag))
        a_client.close()
        outcomes += triggers
        for o in triggers:  # answered by the healthy deployment after the failing one (or skipping it)
            assert o.status == 200 and o.text == ANSWER and o.headers["x-llmrelay-provider"] == good, o
        assert triggers[0].headers["x-llmrelay-attempts"] == "2", triggers[0]
        for r in replicas.values():
            wait_for(lambda r=r: r.workers_cooling(cooling_key) >= WORKERS, 10,
                     f"both workers of replica {r.name} to have {cooling_key} cooling")
        failing_calls, bad_key_calls = mock.count(FAILING_MODEL), len(mock.sent_with_key(f"key-{bad}"))
        assert failing_calls == bad_key_calls >= 2  # A's failures, before the cooldown

        # -- 3. cache: one answer cached through A ---------------------------------------------
        with openai.OpenAI(base_url=f"{urls['A']}/api", api_key=KEY, max_retries=0, timeout=15) as a_client:
            seed = send(a_client, "A", "cached", "S-0", "seed", tag)
        outcomes.append(seed)
        assert seed.status == 200 and seed.headers["x-llmrelay-cache"] == "miss", seed

        def cache_entries() -> list[dict[str, Any]]:
            reply = httpx.post(f"{urls['B']}/api/caches/", json={"customer_identifier": tag, "page_size": 10},
                               headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
            assert reply.status_code == 200, reply.text
            return reply.json()["results"]

        wait_for(lambda: len(cache_entries()) == 1, 10, "the cached answer to be stored (seen from B)")
        cache_id = cache_entries()[0]["id"]

        # -- 4. load on all three; C loses its database, spools, is killed and comes back ------
        load = Load(urls, tag)
        load.start()
        for name in "ABC":
            wait_for(lambda name=name: load.count(name) >= 2 * len(KINDS), 20, f"load through replica {name}")
        relay.stop()
        load.phase = "cut"
        wait_for(lambda: len(spooled(spool["C"])[0]) >= 10 and load.count("C", ["cut"]) >= 10, 20,
                 "replica C to answer and spool records while its database is away")
        # at the kill, C and A are each in the middle of a long stream
        flowing = {"C": threading.Event(), "A": threading.Event()}
        streams = ThreadPoolExecutor(2)
        on_c = streams.submit(slow_stream, urls["C"], "C", "K-C", "slow", tag, flowing["C"])
        on_a = streams.submit(slow_stream, urls["A"], "A", "K-A", "slow-short", tag, flowing["A"])
        assert flowing["C"].wait(10) and flowing["A"].wait(10)
        load.phase = "down"
        kill_at = time.monotonic()
        replicas["C"].kill()
        cut_stream = on_c.result(30)
        outcomes.append(cut_stream)
        assert cut_stream.status == 200 and cut_stream.error is not None, cut_stream  # broken by the kill
        assert cut_stream.ended >= kill_at
        spool_ids, torn = spooled(spool["C"])
        in_pg_at_kill = set(rows())
        wait_for(lambda: load.count("AB", ["down"]) >= 2 * len(KINDS), 20, "load through A and B while C is down")

        restarted = replica("C", "C2", pg_dsn)  # the same spool folder, a working DSN
        running.append(restarted)
        restarted.start()
        wait_for(lambda: restarted.workers_cooling(cooling_key) >= WORKERS, 10,
                 "the restarted C's workers to load the stored cooldown")
        wait_for(lambda: spool_ids <= set(rows()), 20, "the restarted C to replay the dead process's spool")
        wait_for(lambda: not any(p.stat().st_size for p in spool["C"].glob("postgres.*.spool")), 10,
                 "the replayed spool files to be removed")
        load.urls["C"] = restarted.url
        load.phase = "back"
        a_stream = on_a.result(30)  # A's stream went on through C's kill and restart, to its end
        streams.shutdown()
        outcomes.append(a_stream)
        assert a_stream.status == 200 and a_stream.error is None and a_stream.text is not None, a_stream
        assert all(f'" w{i}"' in a_stream.text for i in range(SHORT_CHUNKS)), a_stream.text
        assert a_stream.text.rstrip().endswith("data: [DONE]"), a_stream.text[-300:]
        wait_for(lambda: load.count("C", ["back"]) >= 2 * len(KINDS) and load.count("AB", ["back"]) >= 10, 20,
                 "load through all three again")
        load.stop()
        outcomes += load.outcomes

        # -- what the clients saw ----------------------------------------------------------------
        for o in load.outcomes:
            if o.replica in "AB" or o.phase == "back":
                assert o.problem(good) is None, (o.problem(good), o)
            elif o.problem(good) is not None:  # C's clients: only what was in flight at the kill
                assert not o.answered and o.phase in ("run", "cut") and o.ended >= kill_at, (o.problem(good), o)
        kinds_seen = {(o.replica, o.kind) for o in load.outcomes if o.answered}
        assert {(name, kind) for name in "ABC" for kind in KINDS} <= kinds_seen
        assert sent(mock, cache_prompt(tag)) == 1  # only the seed went upstream: B's and C's were hits
        assert mock.count(FAILING_MODEL) == failing_calls  # nobody tried the cooling deployment again
        assert len(mock.sent_with_key(f"key-{bad}")) == bad_key_calls

        # -- 5. every request logged exactly once; C lost nothing it had acknowledged ----------------
        answered_ids = {o.log_id: o for o in outcomes if o.answered and o.log_id}
        assert len(answered_ids) == sum(1 for o in outcomes if o.answered), "an answer without its own log id"
        c_before_kill = {o.log_id for o in load.outcomes if o.replica == "C" and o.phase != "back" and o.answered}
        acknowledged = spool_ids | in_pg_at_kill
        unacknowledged = c_before_kill - acknowledged  # were in C's memory queue at the kill
        expected = set(answered_ids) - unacknowledged
        wait_for(lambda: expected <= set(rows()), 20, "every acknowledged and every later record in PostgreSQL")
        stored = rows()
        assert spool_ids and spool_ids - in_pg_at_kill, "the killed replica's spool should have held records"
        assert spool_ids <= set(stored)  # acknowledged in the spool, in PostgreSQL after the replay
        count, distinct = pg(pg_dsn, "SELECT COUNT(*), COUNT(DISTINCT unique_id) FROM request_logs")[0]
        assert count == distinct == len(stored)
        by_request = Counter(r["custom_identifier"] for r in stored.values())
        twice = [rid for rid, n in by_request.items() if n > 1]
        assert not twice, f"requests logged more than once: {twice[:5]}"
        sent_rids = {o.rid: o for o in outcomes}
        extra = {uid: r["custom_identifier"] for uid, r in stored.items() if uid not in answered_ids}
        # a row without an answer: only a C request cut by the kill after C had logged it
        assert all(rid in sent_rids and not sent_rids[rid].answered and sent_rids[rid].replica == "C"
                   for rid in extra.values()), extra
        missing = set(answered_ids) - set(stored)
        assert missing <= unacknowledged, [answered_ids[m] for m in missing][:5]

        # the log agrees with the headers: A's first pair request tried the failing deployment,
        # no pair request after the cooldown did, cache hits are logged as such
        first = stored[triggers[0].log_id]
        attempts = json.loads(first["attempts"])
        assert first["fallback"] is True and [a["provider"] for a in attempts] == [bad, good], attempts
        assert attempts[0]["status"] == 503
        for o in load.outcomes:
            row = stored.get(o.log_id or "")
            if row is None:
                continue
            if o.kind.startswith("pair"):
                assert row["provider_id"] == good and not row["attempts"] and row["fallback"] is False, dict(row)
            if o.kind.startswith("cached"):
                assert row["cache_hit"] is True and row["model"] == "respan/cache", dict(row)
        report = {name: load.count(name) for name in "ABC"}
        cut_short = sum(1 for o in load.outcomes if not o.answered) + 1  # and C's long stream
        print(f"\nanswered per replica during the load: {report} (A and B while C was down: "
              f"{load.count('AB', ['down'])}); burst admitted per replica: {admitted}; C: {cut_short} requests "
              f"cut by the kill, {len(spool_ids)} records in its spool ({torn} torn lines), "
              f"{len(unacknowledged)} answered but unacknowledged; {len(stored)} rows in PostgreSQL "
              f"({len(extra)} for requests cut by the kill)")
    finally:
        if load is not None:
            load.stop()
        relay.stop()
        for r in running:
            r.stop()
        leftovers = [*redis_client.scan_iter(match=f"{LIMIT_PREFIX}*{policy}*"), COOLDOWN_PREFIX + cooling_key]
        if cache_id is not None:
            leftovers.append(f"llmrelay:cache:{cache_id}")
        redis_client.delete(*leftovers)
        redis_client.close()
