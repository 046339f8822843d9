"""The benchmark: one command, a markdown table, a JSON file.

    python benchmarks/run.py [--quick] [--json PATH] [--parts inprocess,http,...,outbound,wsgi]

1. in-process: µs per raw ASGI call, the bare host app against the same app with the middleware;
2. over HTTP: the example app under uvicorn, driven by wrk (or loadgen.py) on loopback;
3. scaling: keys in the store, applicable scopes, memory, the flusher's cost;
4. Redis: what shared counters add, and the round trips per request.

The issue's targets are printed beside the measurements; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
import http_load
import inprocess
import outbound
import redis_part
import scaling
import wsgi

PARTS = ("inprocess", "http", "scaling", "redis", "outbound", "wsgi")


def _environment() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in ("fastapi", "starlette", "uvicorn", "orjson", "uvloop", "httptools", "redis"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    wrk = shutil.which("wrk")
    wrk_version = None
    if wrk is not None:
        done = subprocess.run([wrk, "-v"], capture_output=True, text=True)
        lines = (done.stdout or done.stderr).splitlines()
        wrk_version = lines[0] if lines else "wrk"
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "gc": harness.gc_state(),
        "versions": versions,
        "load_generator": wrk_version or "benchmarks/loadgen.py (wrk not installed)",
    }


async def _run(quick: bool, parts: set[str], steady: float = 0.0) -> dict[str, Any]:
    report: dict[str, Any] = {"quick": quick, "environment": _environment()}
    timings: dict[str, float] = {}
    if "inprocess" in parts:
        started = time.perf_counter()
        n, rounds, streams = (4_000, 4, 600) if quick else (20_000, 10, 3_000)
        report["calibration"] = await inprocess.calibration(n, rounds)
        report["inprocess"] = await inprocess.run(n, rounds, streams)
        timings["inprocess"] = time.perf_counter() - started
    if "http" in parts:
        started = time.perf_counter()
        report["http"] = await http_load.run(3 if quick else 6, 1 if quick else 2)
        timings["http"] = time.perf_counter() - started
    if "scaling" in parts:
        started = time.perf_counter()
        report["scaling"] = await scaling.run(*((3_000, 3) if quick else (10_000, 6)), steady)
        timings["scaling"] = time.perf_counter() - started
    if "redis" in parts:
        started = time.perf_counter()
        report["redis"] = await redis_part.run(*((2_000, 2) if quick else (6_000, 6)))
        timings["redis"] = time.perf_counter() - started
    if "outbound" in parts:
        started = time.perf_counter()
        report["outbound"] = await outbound.run(*((3_000, 3) if quick else (12_000, 6)))
        timings["outbound"] = time.perf_counter() - started
    if "wsgi" in parts:  # the engine runs in its background loop: called from a plain thread
        started = time.perf_counter()
        report["wsgi"] = await asyncio.to_thread(wsgi.run, *((4_000, 4) if quick else (20_000, 10)))
        timings["wsgi"] = time.perf_counter() - started
    report["seconds"] = timings
    return report


def _f(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    out = [
        f"Python {env['python']}, {env['cpus']} CPUs, {env['platform']}; "
        f"FastAPI {env['versions']['fastapi']}, Starlette {env['versions']['starlette']}, "
        f"uvicorn {env['versions']['uvicorn']}, orjson {env['versions']['orjson']}; "
        f"{env['gc']}; plain Python"
        f"{'; --quick' if report['quick'] else ''}.",
        "",
    ]
    if "calibration" in report:
        out += [
            "**Calibration** (raw ASGI call, fixed completion; the issue's reference machine in "
            "the last column)",
            "",
            "| variant | µs p50 | added µs | reference |",
            "|---|---:|---:|---|",
        ]
        out += [
            f"| {r['variant']} | {_f(r['median_us'])} | {_f(r['added_us'])} | {r['reference']} |"
            for r in report["calibration"]
        ]
        out.append("")
    if "inprocess" in report:
        out += [
            "**1. In-process** (raw ASGI call; µs per request)",
            "",
            "| scenario | host | bare p50 | bare p99 | with middleware p50 | p99 | added p50 "
            "| added p99 | ratio | target |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in report["inprocess"]:
            out.append(
                f"| {r['scenario']} | {r['host']} | {_f(r['bare']['median_us'])} "
                f"| {_f(r['bare']['p99_us'])} | {_f(r['middleware']['median_us'])} "
                f"| {_f(r['middleware']['p99_us'])} | {_f(r['added_p50_us'])} "
                f"| {_f(r['added_p99_us'])} | {_f(r['ratio_p50'], 2)}x | {r['target']} |"
            )
        out.append("")
    if "http" in report:
        out += [
            "**2. Over HTTP** (example app, one uvicorn worker, POST /v1/chat/completions, "
            "hot path; mean of runs)",
            "",
            "| server | concurrency | bare req/s | p50 ms | p99 ms | with middleware req/s "
            "| p50 ms | p99 ms | throughput ratio | target |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in report["http"]:
            b, m = r["bare"], r["middleware"]
            out.append(
                f"| {r['server']} | {r['concurrency']} | {_f(b['rps'], 0)} | {_f(b['p50_ms'], 2)} "
                f"| {_f(b['p99_ms'], 2)} | {_f(m['rps'], 0)} | {_f(m['p50_ms'], 2)} "
                f"| {_f(m['p99_ms'], 2)} | {_f(r['throughput_ratio'] * 100, 0)}% | {r['target']} |"
            )
        out += [
            "",
            "Server CPU per request (µs, from `/proc`; the event-loop thread handles every "
            "request, other threads write to the store):",
            "",
            "| server | bare, loop thread | with middleware, loop thread | added | other threads |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in report["http"]:
            b, m = r["bare"], r["middleware"]
            out.append(
                f"| {r['server']} | {_f(b['loop_cpu_us'])} | {_f(m['loop_cpu_us'])} "
                f"| {_f(m['loop_cpu_us'] - b['loop_cpu_us'])} | {_f(m['other_cpu_us'])} |"
            )
        tools = {r["bare"]["tool"] for r in report["http"]}
        out += ["", f"Load generator: {', '.join(sorted(tools))}; errors and non-2xx: "
                f"{sum(r[v]['non_2xx'] + r[v]['socket_errors'] for r in report['http'] for v in ('bare', 'middleware'))}.", ""]  # fmt: skip # noqa: E501
    if "scaling" in report:
        sc = report["scaling"]
        out += [
            "**3. Scaling** (trivial host; µs per request with the middleware)",
            "",
            "| case | cached keys | p50 | p99 | added p50 | vs 10 keys | target |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in sc["keys"]:
            out.append(
                f"| {r['keys_in_store']:,} keys in the store | {r['cached_keys']:,} "
                f"| {_f(r['middleware_p50_us'])} | {_f(r['middleware_p99_us'])} "
                f"| {_f(r['added_p50_us'])} | {_f(r['vs_10_keys'], 2)}x "
                "| 100,000 keys within 10% of 10 |"
            )
        for r in sc["scopes"]:
            out.append(
                f"| {r['scopes']} applicable scope{'s' if r['scopes'] > 1 else ''} | - "
                f"| {_f(r['middleware_p50_us'])} | {_f(r['middleware_p99_us'])} "
                f"| {_f(r['added_p50_us'])} | - | - |"
            )
        mem = sc["memory"]
        fc, fr = sc["flush_dirty_counters"], sc["flush_usage_records"]
        out += [
            "",
            "| measure | value | target |",
            "|---|---:|---|",
            f"| RSS added by the middleware (10,000 cached keys, 100,000 in the store) "
            f"| {_f(mem['added_mb'])} MB (bare {_f(mem['bare_rss_mb'])} MB, with "
            f"{_f(mem['middleware_rss_mb'])} MB) | < 25 MB |",
            f"| RSS per 10,000 cached keys | {_f(mem['per_10k_cached_keys_mb'])} MB | - |",
            *(
                [
                    f"| RSS with the middleware {_f(mem['steady_seconds'], 0)} s later, serving "
                    f"| {_f(mem['middleware_rss_steady_mb'])} MB | < 25 MB |"
                ]
                if "middleware_rss_steady_mb" in mem
                else []
            ),
            f"| flush of {fc['counters']:,} dirty counters | {_f(fc['ms'], 0)} ms | off the "
            "request path |",
            f"| flush of {fr['records']:,} usage records | {_f(fr['ms'], 0)} ms "
            f"({_f(fr['us_per_record'])} µs each) | off the request path |",
            "",
        ]
    if "redis" in report:
        rd = report["redis"]
        out.append("**4. Redis** (trivial host, µs per request)")
        out.append("")
        if "skipped" in rd:
            out += [f"Skipped: {rd['skipped']}.", ""]
        else:
            out += [
                "| measure | value | target |",
                "|---|---:|---|",
                f"| hot path, memory counters p50 | {_f(rd['memory_p50_us'])} µs | - |",
                f"| hot path, Redis counters p50 (p99) | {_f(rd['redis_p50_us'])} "
                f"({_f(rd['redis_p99_us'])}) µs | - |",
                f"| added by Redis p50 | {_f(rd['added_by_redis_p50_us'])} µs | - |",
                f"| admission alone: Redis (memory) | {_f(rd['admit_us'])} "
                f"({_f(rd['memory_admit_us'])}) µs | - |",
                f"| settlement alone: Redis (memory) | {_f(rd['settle_us'])} "
                f"({_f(rd['memory_settle_us'])}) µs | - |",
                f"| round trips per request | {_f(rd['round_trips_per_request'], 2)} "
                f"| {rd['target']} |",
                "",
            ]
    if "outbound" in report:
        ob = report["outbound"]
        out += [
            "**5. Outbound** (`BudgetTransport` around `httpx2.MockTransport`, CPU µs per call)",
            "",
            "| measure | value | target |",
            "|---|---:|---|",
            f"| bare httpx2 client | {_f(ob['bare_cpu_us'])} µs | - |",
            f"| with BudgetTransport | {_f(ob['metered_cpu_us'])} µs ({_f(ob['ratio'], 2)}x) | - |",
            f"| a bare client's real call, same run: HTTPS (as providers answer) / plain HTTP "
            f"| {_f(ob['https_call_cpu_us'])} / {_f(ob['plain_call_cpu_us'])} µs | - |",
            f"| added per call | {_f(ob['added_us'])} µs = "
            f"{_f(ob['added_vs_https_call_pct'])} % of an HTTPS call "
            f"({_f(ob['added_vs_plain_call_pct'])} % of a plain one) | < 5 % |",
            "",
        ]
    if "wsgi" in report:
        ws = report["wsgi"]
        out += [
            "**6. WSGI** (Flask, raw WSGI call in process; µs per request)",
            "",
            "| scenario | bare p50 | with BudgetWSGIMiddleware p50 | added p50 | added p99 | ratio "
            "| target |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in ws["in_process"]:
            out.append(
                f"| {r['scenario']} | {_f(r['bare']['median_us'])} "
                f"| {_f(r['middleware']['median_us'])} | {_f(r['added_p50_us'])} "
                f"| {_f(r['added_p99_us'])} | {_f(r['ratio_p50'], 2)}x | {r['target']} |"
            )
        th = ws["threaded"]
        out += [
            "",
            f"{th['threads']} threads at once: bare {_f(th['bare_rps'], 0)} req/s, with the "
            f"middleware {_f(th['middleware_rps'], 0)} req/s ({_f(th['ratio'] * 100, 0)}%).",
            "",
        ]
    seconds = report.get("seconds", {})
    out.append("Seconds per part: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations, shorter runs")
    parser.add_argument(
        "--json",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "latest.json",
        help="where to write the results (default: benchmarks/results/latest.json)",
    )
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}"
    )
    parser.add_argument(
        "--steady",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="scaling: measure the RSS again after SECONDS more of serving (75: past the "
        "alerts' first sweep, a minute after start)",
    )
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    started = time.perf_counter()
    report = asyncio.run(_run(args.quick, parts, args.steady))
    report["total_seconds"] = time.perf_counter() - started
    table = markdown(report)
    report["markdown"] = table
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nTotal {report['total_seconds']:.0f} s; results written to {args.json}")


if __name__ == "__main__":
    main()
