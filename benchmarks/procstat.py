"""CPU time and memory of a process tree, read from /proc (Linux only).

CPU is ``utime + stime`` from ``/proc/<pid>/stat`` (fields 14 and 15, in clock ticks) summed over
the process and all its live descendants; the kernel counts every thread of a process there,
including threads that have exited. RSS is ``VmRSS`` from ``/proc/<pid>/status``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _read_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (field 3 onwards), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="latin-1") as f:
            raw = f.read()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _read_stat(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))  # field 4: ppid
    tree = [pid]
    i = 0
    while i < len(tree):
        tree.extend(children.get(tree[i], []))
        i += 1
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads), 0.0 if it is gone."""
    fields = _read_stat(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15: utime, stime


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="latin-1") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass(frozen=True, slots=True)
class TreeSample:
    """One snapshot of a process tree."""

    cpu_s: dict[int, float]
    rss: dict[int, int]

    @property
    def total_cpu_s(self) -> float:
        return sum(self.cpu_s.values())

    @property
    def total_rss(self) -> int:
        return sum(self.rss.values())


def sample(pid: int) -> TreeSample:
    pids = descendants(pid)
    return TreeSample({p: cpu_seconds(p) for p in pids}, {p: rss_bytes(p) for p in pids})


def cpu_delta(before: TreeSample, after: TreeSample) -> float:
    """CPU seconds spent between two samples, per pid (a pid gone by ``after`` counts as 0)."""
    return sum(max(0.0, after.cpu_s.get(p, before.cpu_s[p]) - before.cpu_s[p]) for p in before.cpu_s) + sum(
        cpu for p, cpu in after.cpu_s.items() if p not in before.cpu_s
    )


@dataclass(frozen=True, slots=True)
class SystemSample:
    """Machine-wide CPU seconds from the first line of /proc/stat."""

    busy_s: float  # user + nice + system + irq + softirq
    steal_s: float  # time the hypervisor gave to someone else


def system_sample() -> SystemSample:
    with open("/proc/stat", encoding="latin-1") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    steal = fields[7] if len(fields) > 7 else 0
    return SystemSample((user + nice + system + irq + softirq) / CLOCK_TICKS, steal / CLOCK_TICKS)


def machine_busy(seconds: float = 1.0) -> float:
    """How many cores' worth of CPU the whole machine used over the next ``seconds``."""
    before = system_sample()
    time.sleep(seconds)
    return (system_sample().busy_s - before.busy_s) / seconds
