"""Render benchmark results (the dict that run.py writes as latest.json) as markdown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"
OTHER_CPU_WARN = 0.15

# Targets for one gateway worker: (name, mode, concurrency or None for all, key, limit, unit).
TARGETS: list[tuple[str, str, int | None, str, float, str]] = [
    ("added latency p50, non-stream, concurrency 1", "non-stream", 1, "added_p50_ms", 0.7, "ms"),
    ("gateway CPU per non-stream request", "non-stream", None, "server_cpu_us_per_req", 350.0, "us"),
    ("gateway CPU per 20-chunk stream", "stream", None, "server_cpu_us_per_req", 700.0, "us"),
]


def _f(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def check_targets(scenarios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per target: the value at each matching concurrency, and the worst of them."""
    checks = []
    for name, mode, concurrency, key, limit, unit in TARGETS:
        values = {
            s["concurrency"]: s[key]
            for s in scenarios
            if s["target"] == "gateway"
            and s["mode"] == mode
            and (concurrency is None or s["concurrency"] == concurrency)
            and s.get(key) is not None
        }
        worst = max(values.values()) if values else None
        checks.append(
            {
                "name": name,
                "limit": limit,
                "unit": unit,
                "value": worst,
                "by_concurrency": values,
                "failing_at": [c for c, v in values.items() if v > limit],
                "pass": None if worst is None else worst <= limit,
            }
        )
    return checks


def table(scenarios: list[dict[str, Any]]) -> str:
    head = (
        "| scenario | conc | RPS | p50 ms | p99 ms | added p50 ms | added p99 ms | TTFT p50 ms | TTFT p99 ms "
        "| server CPU us/req | server CPU % | server RSS MB before → after | client CPU % | mock CPU % "
        "| other CPU % | errors |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in scenarios:
        lat, ttft = s["latency_ms"], s.get("ttft_ms") or {}
        measured = "server_cpu_util" in s
        rss = f"{s['server_rss_mb_before']:.1f} → {s['server_rss_mb_after']:.1f}" if measured else "–"
        cells = [
            f"{s['target']} {s['mode']}",
            str(s["concurrency"]),
            _f(s["rps"], 0),
            _f(lat["p50"], 3),
            _f(lat["p99"], 3),
            _f(s.get("added_p50_ms"), 3),
            _f(s.get("added_p99_ms"), 3),
            _f(ttft.get("p50"), 3),
            _f(ttft.get("p99"), 3),
            _f(s.get("server_cpu_us_per_req"), 0),
            _f(s["server_cpu_util"] * 100, 0) if measured else "–",
            rss,
            _f(s["client_cpu_util"] * 100, 0),
            _f(s["mock_cpu_util"] * 100, 0),
            _f(s.get("other_cpu_util", 0.0) * 100, 0),
            str(s["errors"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_md(checks: list[dict[str, Any]]) -> str:
    lines = ["| target | limit | measured at concurrency | verdict |", "|---|---|---|---|"]
    for c in checks:
        values = c.get("by_concurrency") or {}
        digits = 3 if c["unit"] == "ms" else 0
        measured = (
            ", ".join(f"c={k}: {_f(v, digits)}" for k, v in sorted(values.items(), key=lambda kv: int(kv[0])))
            or "–"
        )
        if c["pass"] is None:
            verdict = "n/a"
        elif c["pass"]:
            verdict = "PASS"
        else:
            verdict = "FAIL at " + ", ".join(f"c={k}" for k in sorted(c["failing_at"], key=int))
        unit = f" {c['unit']}" if values else ""
        lines.append(f"| {c['name']} | <= {c['limit']:g} {c['unit']} | {measured}{unit} | {verdict} |")
    return "\n".join(lines)


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    parts = [
        f"Run {meta['started']} · `{meta['command']}` · {meta['machine']} · "
        f"gateway: {meta['gateway']} · commit {meta['commit']}",
        "",
        f"Each scenario: {meta['warmup_s']:g} s warm-up, then {meta['duration_s']:g} s measured, closed loop. "
        f"Pinning: gateway core {meta['gateway_core']}, mock and load client core {meta['mock_core']}. "
        f"Non-stream client: {meta['nonstream_client']}; stream client: stream_client.py. "
        f"Streams: {meta['chunks']} content chunks, "
        + (f"{meta['delay_ms']:g} ms apart." if meta["delay_ms"] else "written by the mock in one go."),
        "",
    ]
    if results.get("gateway_error"):
        parts += [f"**Gateway not measured:** {results['gateway_error']}", ""]
    parts += [table(results["scenarios"]), ""]
    busiest = max((s.get("other_cpu_util", 0.0) for s in results["scenarios"]), default=0.0)
    if busiest > OTHER_CPU_WARN:
        parts += [
            f"**Warning:** programs outside the benchmark kept up to {busiest:.0%} of a core busy during a "
            "scenario (column 'other CPU %'); those figures are less trustworthy.",
            "",
        ]
    if results.get("targets"):
        parts += ["Targets (one worker):", "", targets_md(results["targets"]), ""]
    rss = results.get("gateway_rss_mb")
    if rss:
        parts += [
            f"Gateway RSS (all processes): {rss['startup']:.1f} MB after start-up, {rss['end']:.1f} MB at the end.",
            "",
        ]
    log = results.get("gateway_log")
    if log:
        parts += [
            f"Gateway request log (sqlite sink, counted after shutdown): {log['sqlite_rows']} rows for "
            f"{log['requests_sent']:,} requests completed (measured + warm-up + smoke checks; wrk does not count "
            "requests cut off at its deadline, so a few more rows than requests is normal).",
            "",
        ]
    return "\n".join(parts)


def write_markdown(path: Path, results: dict[str, Any]) -> None:
    path.write_text("# llmrelay benchmark: latest run\n\n" + render(results))


def update_readme(readme: Path, results: dict[str, Any]) -> bool:
    """Replace the block between the results markers in the README; False if there are none."""
    if not readme.exists():
        return False
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return False
    block = README_START + "\n" + render(results) + README_END
    readme.write_text(text[:start] + block + text[end + len(README_END) :])
    return True
