"""How a worker's threads share their core: Linux's default policy, or SCHED_BATCH with
`server.scheduling: batch` (for workers on cores of their own).

A worker is one process with several threads on one core: the event loop (Python), granian's
I/O runtime (Rust) and the log sink's writer. Each request hands work between them a few times:
granian passes the request to the loop, the loop passes the answer back, the writer wakes for a
batch of rows. Under Linux's default policy every such wake-up preempts the thread that is
running, so at concurrency 64 each request cost about five context switches, and each switch
cost the loop its caches. Under SCHED_BATCH a thread that wakes does not preempt: it runs when
the running one waits (or its time slice ends), and takes everything that piled up meanwhile in
one go. Measured on the `full` pipeline at c=64, the worker alone on its core
(benchmarks/README.md): 4.9 -> 0.4 context switches and 10-20 % less CPU per request, with lower
p99 latency.

Why it is not the default: a batch thread does not preempt *other* processes either. On a core
shared with a busy process, every wake-up of the worker (the request arriving, Redis answering,
the provider answering) waits for that process's time slice to end: with a busy loop on the
worker's core, p50 at c=1 went from 0.8 to 11.9 ms. Only where each worker has a core to itself
(pinned, nothing else scheduled there: Kubernetes' static CPU manager, a dedicated host) is
`batch` the better choice.

The policy is set in the worker's main thread before granian starts its threads there, so they
inherit it; the sink and store threads the loop starts later inherit it too. Real-time and idle
policies set from outside (chrt) are left alone.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("llmrelay")

POLICIES = {"batch": "SCHED_BATCH", "normal": "SCHED_OTHER"}


def apply(scheduling: str) -> None:
    """Put the calling thread (and the threads it starts from now on) under `scheduling`."""
    setter = getattr(os, "sched_setscheduler", None)
    if setter is None:  # not Linux: nothing to choose
        return
    policy = getattr(os, POLICIES[scheduling])
    current = os.sched_getscheduler(0)
    if current == policy or current not in (os.SCHED_OTHER, os.SCHED_BATCH):
        return
    try:
        setter(0, policy, os.sched_param(0))
    except OSError as exc:  # a sandbox that forbids it: the default policy still works
        log.warning("server.scheduling %s not applied: %s", scheduling, exc.strerror or exc)
