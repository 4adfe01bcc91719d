"""Render benchmark results (the dict run.py writes as latest.json) as markdown, and judge the targets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"
OTHER_CPU_WARN = 0.15
CORE1_WARN = 0.8  # client + mock CPU (they share a core) above which they may limit a gateway run
FLAT_MB = 5.0  # soak: RSS growth over the last half within this counts as flat
PEERS = ("litellm", "portkey")
ORDER = ("direct", "direct-anthropic", "floor", "minimal", "full", "cache-hit", "translation", *PEERS)
MODES = ("non-stream", "stream", "paced")


def _f(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.0f}"


def _order(row: dict[str, Any]) -> tuple[Any, ...]:
    name = row["scenario"]
    return (MODES.index(row["mode"]), row.get("chunks") or 0, row["concurrency"],
            ORDER.index(name) if name in ORDER else len(ORDER), name)


# --------------------------------------------------------------------------- console lines


def describe(row: dict[str, Any]) -> str:
    lat = row["latency_ms"]
    shape = row["mode"] + (f" {row['chunks']}x{row['delay_ms']:g}ms" if row["mode"] == "paced" else "")
    text = (
        f"{row['scenario']:>16} {shape:<14} c={row['concurrency']:<3} {row['rps']:>9,.0f} rps  "
        f"p50 {lat['p50']:.3f} ms  p99 {lat['p99']:.3f} ms  client CPU {row['client_cpu_util']:.0%}  "
        f"mock CPU {row['mock_cpu_util']:.0%}"
    )
    if row.get("server_cpu_us_per_req") is not None:
        text += f"  server {row['server_cpu_us_per_req']:.0f} us/req ({row['server_cpu_util']:.0%})"
    if "cache_hits" in row:
        text += f"  cache hits {row['cache_hits']:.0f}"
    if row["other_cpu_util"] > OTHER_CPU_WARN:
        text += f"  (other CPU {row['other_cpu_util']:.0%}!)"
    if row["errors"]:
        text += f"  ERRORS {row['errors']}: {row['error_sample'][:200]}"
    return text


def describe_hold(h: dict[str, Any]) -> str:
    ttft = h.get("ttft_ms") or {}
    return (
        f"hold: {h['completed']}/{h['streams']} streams correct, {h['errors']} errors, peak open {h['peak_open']}, "
        f"TTFT p50 {_f(ttft.get('p50'), 1)} ms p99 {_f(ttft.get('p99'), 1)} ms, gateway CPU "
        f"{h['server_cpu_util']:.0%}, RSS {h['rss_mb_before']:.0f} → peak {h['rss_mb_peak']:.0f} MB, "
        f"client CPU {h['client_cpu_util']:.0%}, mock CPU {h['mock_cpu_util']:.0%}"
    )


def describe_slice(s: dict[str, Any]) -> str:
    return (
        f"soak: {s['requests_done']:>9,} requests  {s['rps']:,.0f} rps  p99 {s['p99_ms']:.1f} ms  "
        f"{_f(s['server_cpu_us_per_req'], 0)} us/req  RSS during ≤ {s['rss_mb_during_max']:.1f} MB, "
        f"after {s['rss_mb_after']:.1f} MB" + (f"  ERRORS {s['errors']}" if s["errors"] else "")
    )


# --------------------------------------------------------------------------- derived figures


def add_deltas(rows: list[dict[str, Any]]) -> None:
    """Added latency and TTFT: a row's percentile minus its baseline's (same shape and concurrency)."""
    def key(r: dict[str, Any], name: str) -> tuple[Any, ...]:
        return name, r["mode"], r.get("chunks"), r.get("delay_ms"), r["concurrency"]

    base = {key(r, r["scenario"]): r for r in rows if r["scenario"].startswith("direct")}
    for r in rows:
        b = base.get(key(r, r["baseline"])) if r.get("baseline") else None
        if b is None:
            continue
        r["added_p50_ms"] = r["latency_ms"]["p50"] - b["latency_ms"]["p50"]
        r["added_p99_ms"] = r["latency_ms"]["p99"] - b["latency_ms"]["p99"]
        if r.get("ttft_ms") and b.get("ttft_ms"):
            r["added_ttft_p50_ms"] = r["ttft_ms"]["p50"] - b["ttft_ms"]["p50"]
            r["added_ttft_p99_ms"] = r["ttft_ms"]["p99"] - b["ttft_ms"]["p99"]


def soak_growth(slices: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    """RSS growth over the second half of the soak: the reading after the first slice past half the
    requests, against the last one."""
    if not slices:
        return {}
    half = slices[-1]["requests_done"] / 2
    mid = next(s for s in slices if s["requests_done"] >= half)
    return {
        "rss_mb_mid": mid["rss_mb_after"],
        "mid_requests": mid["requests_done"],
        "rss_growth_last_half_mb": slices[-1]["rss_mb_after"] - mid["rss_mb_after"],
        "rss_growth_total_mb": slices[-1]["rss_mb_after"] - info.get("rss_mb_idle", slices[0]["rss_mb_after"]),
        "rss_mb_max_proc": max(s["rss_mb_max_proc"] for s in slices),
        "rss_mb_max": max(s["rss_mb_during_max"] for s in slices),
    }


def scaling_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """RPS of two workers over one; and the same from CPU per request (what two whole cores would give
    if nothing else needed them)."""
    out: dict[str, Any] = {"runs": runs}
    if len(runs) == 2 and runs[0]["rps"] and runs[1]["rps"]:
        out["rps_ratio"] = runs[1]["rps"] / runs[0]["rps"]
        one, two = runs[0].get("server_cpu_us_per_req"), runs[1].get("server_cpu_us_per_req")
        if one and two:
            out["cpu_normalised_ratio"] = 2 * one / two
    return out


# --------------------------------------------------------------------------- targets


def _by_conc(results: dict[str, Any], scenario: str, mode: str, key: str, chunks: int | None = None,
             only: int | None = None) -> dict[str, float | None]:
    return {
        f"c={r['concurrency']}": r.get(key)
        for r in sorted(results["rows"], key=lambda r: r["concurrency"])
        if r["scenario"] == scenario and r["mode"] == mode and (chunks is None or r.get("chunks") == chunks)
        and (only is None or r["concurrency"] == only)
    }


def _target(name: str, limit: float, unit: str, values: dict[str, float | None], digits: int = 0,
            at_least: bool = False, note: str = "") -> dict[str, Any]:
    measured = []
    for label, value in values.items():
        ok = None if value is None else (value >= limit if at_least else value <= limit)
        measured.append({"at": label, "value": value, "text": f"{_f(value, digits)} {unit}".strip(), "pass": ok})
    verdicts = [m["pass"] for m in measured if m["pass"] is not None]
    return {"name": name, "limit": f"{'>=' if at_least else '<='} {limit:g} {unit}".strip(), "measured": measured,
            "pass": all(verdicts) if verdicts else None, "note": note}


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of the performance issue, from this run's figures; n/a where a scenario did not run."""
    ns, st = "non-stream", "stream"
    delay = next((r["delay_ms"] for r in results["rows"] if r["mode"] == "paced"), None)
    checks = [
        _target("gateway CPU per non-stream request (full)", 250, "us",
                _by_conc(results, "full", ns, "server_cpu_us_per_req")),
        _target("gateway CPU per 20-chunk stream (full, unpaced)", 500, "us",
                _by_conc(results, "full", st, "server_cpu_us_per_req", 20)),
        _target(f"gateway CPU per 20-chunk stream (full, paced {_f(delay, 0)} ms)", 500, "us",
                _by_conc(results, "full", "paced", "server_cpu_us_per_req", 20)),
        _target("added latency p50, non-stream (full), c=1", 0.5, "ms",
                _by_conc(results, "full", ns, "added_p50_ms", only=1), 3),
        _target("added latency p99, non-stream (full), c=1", 1.5, "ms",
                _by_conc(results, "full", ns, "added_p99_ms", only=1), 3),
        _target("added latency p99, non-stream (full), c=64", 10, "ms",
                _by_conc(results, "full", ns, "added_p99_ms", only=64), 3),
        _target("gateway CPU per cache hit (non-stream)", 120, "us",
                _by_conc(results, "cache-hit", ns, "server_cpu_us_per_req")),
    ]
    gws = results.get("gateways", {})
    hold, soak = gws.get("hold"), gws.get("soak")
    held = {"name": "concurrent streams held with no error", "limit": "1,000 streams, 0 errors",
            "measured": [], "pass": None, "note": ""}
    if hold and "completed" in hold:
        ok = hold["errors"] == 0 and hold["completed"] == hold["streams"] and hold["streams"] >= 1000
        held["measured"] = [{"at": f"{hold['streams']:,} streams", "value": hold["completed"], "pass": ok,
                             "text": f"{hold['completed']:,} correct, {hold['errors']} errors, "
                                     f"peak open {hold['peak_open']:,}"}]
        held["pass"] = ok
    checks.append(held)
    rss: dict[str, float | None] = {}
    notes = []
    if hold and "rss_mb_peak_proc" in hold:
        rss["hold peak"] = hold["rss_mb_peak_proc"]
        notes.append(f"hold peak all processes {hold['rss_mb_peak']:.0f} MB")
    if soak and "rss_mb_max_proc" in soak:
        rss["soak max"] = soak["rss_mb_max_proc"]
        notes.append(f"soak max all processes {soak['rss_mb_max']:.0f} MB")
    checks.append(_target("gateway RSS per worker (largest process)", 200, "MB", rss, 1,
                          note="; ".join(notes)))
    growth = {}
    if soak and "rss_growth_last_half_mb" in soak:
        growth[f"{soak['requests_done']:,} requests"] = soak["rss_growth_last_half_mb"]
    checks.append(_target("RSS growth over the last half of the soak", FLAT_MB, "MB", growth, 1,
                          note="" if not soak or soak.get("requests_done", 0) >= 1_000_000
                          else "fewer than 1M requests: not the target's soak"))
    scaling = results.get("scaling") or {}
    checks.append(_target("two workers vs one: RPS, c=64 (full)", 1.7, "x",
                          {"2 cores": scaling.get("rps_ratio")} if scaling else {}, 2, at_least=True,
                          note="the mock and wrk share the two cores with the gateway"))
    checks.append(_target("two workers vs one: CPU-normalised (2 x CPU/req of 1 worker / CPU/req of 2)", 1.7, "x",
                          {"2 cores": scaling.get("cpu_normalised_ratio")} if scaling else {}, 2, at_least=True))
    return checks


def targets_md(checks: list[dict[str, Any]]) -> str:
    lines = ["| target | limit | measured | verdict |", "|---|---|---|---|"]
    for c in checks:
        measured = ", ".join(f"{m['at']}: {m['text']}" if len(c["measured"]) > 1 or m["at"].startswith("c=")
                             else m["text"] for m in c["measured"]) or "–"
        judged = [m for m in c["measured"] if m["pass"] is not None]
        if not judged:
            verdict = "n/a (not run)"
        elif len(judged) == 1:
            verdict = "PASS" if judged[0]["pass"] else "FAIL"
        else:
            verdict = " · ".join(f"{m['at']} {'PASS' if m['pass'] else 'FAIL'}" for m in judged)
        note = f" ({c['note']})" if c.get("note") else ""
        lines.append(f"| {c['name']} | {c['limit']} | {measured}{note} | {verdict} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- tables


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def main_table(rows: list[dict[str, Any]]) -> str:
    head = ["scenario", "mode", "conc", "RPS", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "TTFT p50 ms",
            "TTFT p99 ms", "server CPU us/req", "server CPU %", "server RSS MB before → after", "client CPU %",
            "mock CPU %", "other CPU %", "errors"]
    out = []
    for s in sorted(rows, key=_order):
        lat, ttft = s["latency_ms"], s.get("ttft_ms") or {}
        measured = "server_cpu_util" in s
        out.append([
            s["scenario"], s["mode"], str(s["concurrency"]), _f(s["rps"], 0), _f(lat["p50"], 3), _f(lat["p99"], 3),
            _f(s.get("added_p50_ms"), 3), _f(s.get("added_p99_ms"), 3), _f(ttft.get("p50"), 3),
            _f(ttft.get("p99"), 3), _f(s.get("server_cpu_us_per_req"), 0),
            _pct(s["server_cpu_util"]) if measured else "–",
            f"{s['server_rss_mb_before']:.1f} → {s['server_rss_mb_after']:.1f}" if measured else "–",
            _pct(s["client_cpu_util"]), _pct(s["mock_cpu_util"]), _pct(s.get("other_cpu_util")), str(s["errors"]),
        ])
    return _table(head, out)


def paced_table(rows: list[dict[str, Any]]) -> str:
    head = ["scenario", "chunks", "conc", "streams/s", "TTFT p50 ms", "TTFT p99 ms", "added TTFT p50 ms",
            "added TTFT p99 ms", "chunk gap p50 ms", "chunk gap p99 ms", "chunk gap max ms",
            "gap p99 with the end ms", "stream p50 ms",
            "CPU us/stream", "CPU us/chunk", "server CPU %", "client CPU %", "mock CPU %", "other CPU %", "errors"]
    out = []
    for s in sorted(rows, key=_order):
        ttft, gap, every = s.get("ttft_ms") or {}, s.get("inner_gap_ms") or {}, s.get("chunk_gap_ms") or {}
        out.append([
            s["scenario"], str(s["chunks"]), str(s["concurrency"]), _f(s["rps"], 1), _f(ttft.get("p50"), 3),
            _f(ttft.get("p99"), 3), _f(s.get("added_ttft_p50_ms"), 3), _f(s.get("added_ttft_p99_ms"), 3),
            _f(gap.get("p50"), 2), _f(gap.get("p99"), 2), _f(gap.get("max"), 2), _f(every.get("p99"), 2),
            _f(s["latency_ms"]["p50"], 1),
            _f(s.get("server_cpu_us_per_req"), 0), _f(s.get("server_cpu_us_per_chunk"), 1),
            _pct(s.get("server_cpu_util")), _pct(s["client_cpu_util"]), _pct(s["mock_cpu_util"]),
            _pct(s.get("other_cpu_util")), str(s["errors"]),
        ])
    return _table(head, out)


def gateways_table(gws: dict[str, Any]) -> str:
    head = ["gateway run", "pipeline", "RSS MB start → end", "requests sent", "log rows", "cache hits / misses",
            "Redis cache entries after", "smoke checks"]
    out = []
    for name, g in gws.items():
        look = g.get("cache_lookups") or {}
        start = g.get("rss_mb_startup", g.get("rss_mb_idle", g.get("rss_mb_before")))
        end = g.get("rss_mb_end", g.get("rss_mb_after"))
        out.append([
            name, g.get("pipeline", "–"), f"{_f(start, 1)} → {_f(end, 1)}", f"{g.get('requests_sent', 0):,}",
            f"{g['log_rows']:,}" if isinstance(g.get("log_rows"), int) else str(g.get("log_rows")),
            f"{look.get('hit', 0):,.0f} / {look.get('miss', 0):,.0f}" if look else "–",
            str(g.get("redis_cache_keys", "–")), "; ".join(g.get("smoke", [])) or "–",
        ])
    return _table(head, out)


def hold_md(h: dict[str, Any]) -> str:
    ttft, lat = h.get("ttft_ms") or {}, h.get("latency_ms") or {}
    gap = h.get("inner_gap_ms") or h.get("chunk_gap_ms") or {}
    lines = [
        f"{h['streams']:,} streams of {h['chunks']} chunks {h['delay_ms']:g} ms apart (about "
        f"{h['chunks'] * h['delay_ms'] / 1000:g} s each), all started at once through the full pipeline:",
        "",
        _table(["correct", "errors", "peak open", "start spread s", "TTFT p50 / p99 ms", "stream p50 / p99 ms",
                "chunk gap p50 / p99 / max ms (without the end)", "gateway CPU %", "CPU us/stream",
                "gateway RSS MB before → peak → after (largest process at peak)", "client CPU %", "mock CPU %",
                "other CPU %"],
               [[f"{h['completed']:,}", str(h["errors"]), f"{h['peak_open']:,}", _f(h.get("ramp_s"), 2),
                 f"{_f(ttft.get('p50'), 1)} / {_f(ttft.get('p99'), 1)}",
                 f"{_f(lat.get('p50'), 0)} / {_f(lat.get('p99'), 0)}",
                 f"{_f(gap.get('p50'), 1)} / {_f(gap.get('p99'), 1)} / {_f(gap.get('max'), 1)}",
                 _pct(h["server_cpu_util"]), _f(h.get("server_cpu_us_per_stream"), 0),
                 f"{h['rss_mb_before']:.0f} → {h['rss_mb_peak']:.0f} → {h['rss_mb_after']:.0f} "
                 f"({h['rss_mb_peak_proc']:.0f})",
                 _pct(h["client_cpu_util"]), _pct(h["mock_cpu_util"]), _pct(h.get("other_cpu_util"))]]),
    ]
    if h.get("error_samples"):
        lines += ["", f"Errors (samples): {h['error_samples']}"]
    return "\n".join(lines)


def soak_md(s: dict[str, Any]) -> str:
    rows = [["idle (after start-up)", "–", "–", "–", "–", "–", _f(s.get("rss_mb_idle"), 1)]]
    for i, x in enumerate(s.get("slices", []), 1):
        rows.append([f"slice {i}", f"{x['requests_done']:,}", _f(x["rps"], 0), _f(x["p99_ms"], 1),
                     _f(x["server_cpu_us_per_req"], 0), _f(x["rss_mb_during_max"], 1), _f(x["rss_mb_after"], 1)])
    rows.append(["end (2 s after)", "–", "–", "–", "–", "–", _f(s.get("rss_mb_end"), 1)])
    return "\n".join([
        f"{s.get('requests_done', 0):,} non-stream requests (target {s['target_requests']:,}) at concurrency "
        f"{s['concurrency']} through the full pipeline (wrk, every body unique), in slices:",
        "",
        _table(["reading", "requests done", "RPS", "p99 ms", "CPU us/req", "RSS MB during (max)", "RSS MB after"],
               rows),
        "",
        f"RSS growth over the last half (after {s.get('mid_requests', 0):,} requests → end): "
        f"{_f(s.get('rss_growth_last_half_mb'), 1)} MB; since idle: {_f(s.get('rss_growth_total_mb'), 1)} MB. "
        f"Log rows at the end: {s.get('log_rows')} for {s.get('requests_sent', 0):,} requests sent. "
        f"Redis cache entries after: {s.get('redis_cache_keys', '–')} (TTL bounds them).",
    ])


def scaling_md(sc: dict[str, Any]) -> str:
    rows = [[str(r["workers"]), "0" if r["workers"] == 1 else "0,1 (mock and wrk too)", _f(r["rps"], 0),
             _f(r["latency_ms"]["p99"], 1), _f(r.get("server_cpu_us_per_req"), 0),
             _f(r.get("server_cpu_util"), 2), _pct(r["client_cpu_util"]), _pct(r["mock_cpu_util"]),
             _pct(r.get("other_cpu_util")), str(r["errors"])] for r in sc.get("runs", [])]
    return "\n".join([
        _table(["workers", "cores", "RPS", "p99 ms", "CPU us/req", "gateway CPU (cores)", "client CPU %",
                "mock CPU %", "other CPU %", "errors"], rows),
        "",
        f"Two workers / one: RPS {_f(sc.get('rps_ratio'), 2)}x; CPU-normalised (what two whole cores would "
        f"give at the measured CPU per request) {_f(sc.get('cpu_normalised_ratio'), 2)}x.",
    ])


def render(results: dict[str, Any]) -> str:
    meta, rows = results["meta"], results["rows"]
    timings = results.get("timings_s", {})
    took = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items() if k != "total")
    parts = [
        f"Run {meta['started']} · `{meta['command']}` · {meta['machine']} · commit {meta['commit']} · "
        f"took {timings.get('total', 0) / 60:.1f} min ({took})",
        "",
        f"Closed-loop runs: {meta['warmup_s']:g} s warm-up, then {meta['duration_s']:g} s measured. Pinning: gateway "
        f"core {meta['gateway_core']} (one worker), mock and load client core {meta['mock_core']}. Non-stream client: "
        f"{meta['nonstream_client']}; streams: stream_client.py, {meta['chunks']} chunks written at once (unpaced). "
        f"full = {meta['pipelines']['full']['about']}.",
        "",
    ]
    main = [r for r in rows if r["mode"] != "paced" and r["scenario"] not in PEERS]
    if main:
        parts += [main_table(main), ""]
    paced = [r for r in rows if r["mode"] == "paced"]
    if paced:
        parts += [f"Paced streams ({meta['delay_ms']:g} ms between chunks), direct and through the full pipeline:",
                  "", paced_table(paced), ""]
    gws = results.get("gateways", {})
    if gws.get("hold") and "completed" in gws["hold"]:
        parts += ["Concurrent open streams:", "", hold_md(gws["hold"]), ""]
    if gws.get("soak") and gws["soak"].get("slices"):
        parts += ["Soak:", "", soak_md(gws["soak"]), ""]
    if results.get("scaling", {}).get("runs"):
        parts += ["Scaling (full, non-stream, c=64):", "", scaling_md(results["scaling"]), ""]
    peer_rows = [r for r in rows if r["scenario"] in PEERS]
    if peer_rows:
        shapes = {(r["mode"], r["concurrency"]) for r in peer_rows}
        same = [r for r in rows if r["scenario"] in ("direct", "full") and (r["mode"], r["concurrency"]) in shapes]
        installed = results.get("peers", {}).get("installed", {})
        caveats = results.get("peers", {}).get("caveats", {})
        parts += ["Peers, same mock, same machine (llmrelay full pipeline for comparison; "
                  + "; ".join(f"{n} {v}: {caveats.get(n, '')}" for n, v in installed.items()) + "):", "",
                  main_table(same + peer_rows), ""]
    core1 = [f"{r['scenario']} {r['mode']} c={r['concurrency']}" for r in rows
             if "server_cpu_util" in r and r["client_cpu_util"] + r["mock_cpu_util"] > CORE1_WARN]
    if core1:
        parts += [f"**Warning:** the load client and the mock together used more than {CORE1_WARN:.0%} of their core "
                  f"in {', '.join(core1)}: there the gateway may not be the only bottleneck.", ""]
    busiest = max((r.get("other_cpu_util", 0.0) for r in rows), default=0.0)
    if busiest > OTHER_CPU_WARN:
        parts += [f"**Warning:** programs outside the benchmark kept up to {busiest:.0%} of a core busy during a "
                  "run (column 'other CPU %'); those figures are less trustworthy.", ""]
    if results.get("targets"):
        parts += ["Targets (one worker unless noted):", "", targets_md(results["targets"]), ""]
    if gws:
        parts += ["Gateway processes (each scenario its own; log rows counted in the sqlite sink after shutdown, "
                  "a few more rows than requests is normal: wrk does not count requests cut off at its deadline):",
                  "", gateways_table(gws), ""]
    if results.get("issues"):
        parts += ["**Issues found in this run:**", ""] + [f"- {i}" for i in results["issues"]] + [""]
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
