"""CPU time and memory of a process tree, read from /proc (Linux only).

CPU is ``utime + stime`` from ``/proc/<pid>/stat`` (fields 14 and 15, in clock ticks) summed over
the process and all its live descendants; the kernel counts every thread of a process there,
including threads that have exited. Those fields are whole ticks (10 ms), too coarse for runs of a
few dozen requests, so each process's threads' run time in nanoseconds (``/proc/<pid>/task/*/schedstat``,
first field) is read too, and a CPU delta uses it whenever it agrees with the tick delta to within
the ticks' rounding (it does not when a thread exited in between: its time is gone from the
per-thread sum). RSS is ``VmRSS`` from ``/proc/<pid>/status``.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field

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


def exec_seconds(pid: int) -> float | None:
    """Run time of the process's live threads in seconds (ns resolution), None if unreadable."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="latin-1") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


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
    exec_s: dict[int, float | None] = field(default_factory=dict)

    @property
    def total_cpu_s(self) -> float:
        return sum(self.cpu_s.values())

    @property
    def total_rss(self) -> int:
        return sum(self.rss.values())


def sample(pid: int) -> TreeSample:
    pids = descendants(pid)
    return TreeSample(
        {p: cpu_seconds(p) for p in pids}, {p: rss_bytes(p) for p in pids}, {p: exec_seconds(p) for p in pids}
    )


_ROUNDING_S = 2.0 / CLOCK_TICKS  # two readings, each rounded down to whole ticks


def cpu_delta(before: TreeSample, after: TreeSample) -> float:
    """CPU seconds spent between two samples, summed over pids (a pid gone by ``after`` counts as 0,
    one new in ``after`` with all its time): the precise thread run time where it agrees with the ticks."""
    total = 0.0
    for p in before.cpu_s.keys() | after.cpu_s.keys():
        if p not in after.cpu_s:
            continue
        ticks = after.cpu_s[p] - before.cpu_s.get(p, 0.0)
        e0, e1 = before.exec_s.get(p, 0.0 if p not in before.cpu_s else None), after.exec_s.get(p)
        precise = e1 - e0 if e0 is not None and e1 is not None else None
        if precise is not None and abs(precise - ticks) <= _ROUNDING_S + 0.001:
            total += max(precise, 0.0)
        else:
            total += max(ticks, 0.0)
    return total


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


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard limit (thousands of sockets); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target
