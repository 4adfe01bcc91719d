"""server.scheduling: a served worker's threads (granian's included) run under Linux's normal
policy by default and under SCHED_BATCH with `batch`; policies set from outside are kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from proxy import scheduling
from proxy.settings import ConfigError, parse_settings
from tests.conftest import KEY, GatewayProcess, base_config
from tests.mock_upstream import MockUpstream


def thread_policies(pid: int) -> dict[int, int]:
    """Each thread of process `pid` and its scheduling policy (field 41 of /proc/<pid>/task/<tid>/stat)."""
    policies = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        policies[int(tid)] = int(stat[stat.rindex(")") + 2:].split()[38])
    return policies


def worker_pid(gateway: GatewayProcess) -> int:
    assert gateway.proc is not None
    children = Path(f"/proc/{gateway.proc.pid}/task/{gateway.proc.pid}/children").read_text().split()
    assert len(children) == 1, children  # one granian worker
    return int(children[0])


@pytest.mark.parametrize(("scheduling", "policy"), [(None, os.SCHED_OTHER), ("batch", os.SCHED_BATCH)])
def test_every_thread_of_a_served_worker_runs_under_the_configured_policy(
        mock_upstream: MockUpstream, tmp_path: Path, scheduling: str | None, policy: int) -> None:
    config = base_config(mock_upstream, tmp_path)
    if scheduling is not None:
        config["server"]["scheduling"] = scheduling
    gateway = GatewayProcess(config, tmp_path).start()
    try:
        answer = httpx.post(f"{gateway.url}/api/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                            json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
        assert answer.status_code == 200, answer.text
        assert gateway.records(), "the log writer's thread wrote its row"  # the sink's thread exists now
        policies = thread_policies(worker_pid(gateway))
        # the loop's thread, granian's runtime threads (started after the app was built) and the
        # log sink's writer (started by the loop on the first batch)
        assert len(policies) >= 4, policies
        assert set(policies.values()) == {policy}, policies
        assert gateway.proc is not None  # granian's main process, which forks the workers, is left as it was
        assert set(thread_policies(gateway.proc.pid).values()) == {os.SCHED_OTHER}
    finally:
        gateway.stop()


def run_apply(before: str, scheduling: str) -> int:
    """The policy of a fresh interpreter's thread after `before`, then scheduling.apply(scheduling)."""
    code = f"import os; from proxy import scheduling; {before}; scheduling.apply({scheduling!r}); " \
           "print(os.sched_getscheduler(0))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    return int(result.stdout)


def test_apply_switches_between_batch_and_normal_and_leaves_other_policies_alone() -> None:
    assert run_apply("pass", "batch") == os.SCHED_BATCH
    batch = "os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))"
    assert run_apply(batch, "normal") == os.SCHED_OTHER
    idle = "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))"  # e.g. `chrt --idle 0 llmrelay serve`
    assert run_apply(idle, "batch") == os.SCHED_IDLE


def test_apply_without_scheduling_policies_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the OS has no scheduling policies (macOS), either setting is accepted and nothing happens."""
    before = os.sched_getscheduler(0)
    monkeypatch.delattr(os, "sched_setscheduler")
    scheduling.apply("batch")
    assert os.sched_getscheduler(0) == before


def test_unknown_scheduling_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"cfg.yaml: \$.server.scheduling: Invalid enum value 'fast'"):
        parse_settings({"server": {"scheduling": "fast"}}, "cfg.yaml")
