"""Renders docs/BENCHMARKS.md from one raw results file (bench/results/*.json); measures nothing."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from .servers import BASELINE, MEMORY_CONFIGS, THROUGHPUT_SERVERS
from .throughput import APPS, Params, cpu_shares, oha_command, worker_shares, wrk_command

# Above this median share of the CPUs used by other processes, the document says it is noisy.
NOISY_OTHER_CPU = 0.10

PHASES = [("idle", "idle"), ("after_requests", "after 2,000 requests"), ("after_gc", "after a full GC in every worker")]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt_rps(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}"


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _workers(w: int) -> str:
    return f"{w} worker" + ("s" if w != 1 else "")


def _fmt_ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _mib(kib: float | None) -> str:
    return "—" if kib is None else f"{kib / 1024:,.0f}"


def per_cpu_second(sample: dict) -> float | None:
    """Requests of the measured run per CPU-second the server's processes used in it."""
    cpu = sample.get("cpu")
    if not cpu or not cpu["total_s"] or "requests" not in sample:
        return None
    return sample["requests"] / cpu["total_s"]


def uneven(cpu: dict, workers: int) -> bool:
    """A worker used less than half of an equal share of the workers' CPU (idle beside busy
    siblings). Only the `workers` busiest processes are weighed."""
    if workers < 2 or not cpu["workers"]:
        return False
    shares = worker_shares(cpu)[0][:workers]
    return len(shares) < workers or min(shares) < 0.5 * sum(shares) / workers


def summarize(samples: list[dict]) -> dict[tuple[str, int, str], dict]:
    """Per (app, workers, server): medians over rounds of req/s, req/CPU-s, p50 and p99, the
    spread of req/s, and the samples themselves by round."""
    groups: dict[tuple[str, int, str], list[dict]] = {}
    for s in samples:
        groups.setdefault((s["app"], s["workers"], s["server"]), []).append(s)
    out = {}
    for key, group in groups.items():
        ok = sorted((s for s in group if "rps" in s and "error" not in s), key=lambda s: s["round"])
        rps = [s["rps"] for s in ok]
        med = _median(rps)
        out[key] = {
            "rps": med,
            "per_cpu": _median([v for v in map(per_cpu_second, ok) if v is not None]),
            "rounds": ok,
            "p50": _median([s["p50_ms"] for s in ok if "p50_ms" in s]),
            "p99": _median([s["p99_ms"] for s in ok if "p99_ms" in s]),
            "n": len(ok),
            "failed": len(group) - len(ok),
            "spread": (max(rps) - min(rps)) / med if med and len(rps) > 1 else None,
            "errors": sum(
                sum(v for k, v in s.get("socket_errors", {}).items() if k != "read")
                + s.get("non_2xx", 0)
                for s in ok
            ),
            "read_errors": sum(s.get("socket_errors", {}).get("read", 0) for s in ok),
            "fixed": _fixed_summary([s["fixed_rate"] for s in ok if "fixed_rate" in s]),
        }
    return out


def saturated(run: dict) -> bool:
    """The server did not keep up with the fixed rate: its percentiles measure a queue."""
    return run["achieved"] < 0.95 * run["rate"]


def _fixed_summary(runs: list[dict]) -> dict | None:
    """Medians over the rounds of a cell's fixed-rate runs."""
    if not runs:
        return None
    return {
        "rate": runs[0]["rate"],
        "achieved": _median([r["achieved"] for r in runs]),
        "p50": _median([r["p50_ms"] for r in runs if "p50_ms" in r]),
        "p99": _median([r["p99_ms"] for r in runs if "p99_ms" in r]),
        "p999": _median([r["p999_ms"] for r in runs if "p999_ms" in r]),
        "saturated": any(saturated(r) for r in runs),
        "failed_requests": sum(r["errors"] + r["non_2xx"] for r in runs),
        "n": len(runs),
    }


def _throughput_section(raw: dict, lines: list[str]) -> None:
    samples = raw.get("throughput") or []
    if not samples:
        return
    p = raw["meta"]["params"]
    params = Params(p["duration"], p["warmup"], p["rounds"], p["connections"], p["wrk_threads"],
                    tuple(p["workers"]), p.get("rate", 0), p.get("rate_duration", 5))  # fmt: skip
    summary = summarize(samples)
    present = {s["server"] for s in samples}
    order = [s for s in THROUGHPUT_SERVERS if s.key in present]
    workers = list(params.workers)
    lines += ["## Throughput and latency", ""]
    lines += [
        f"Median of {params.rounds} round(s) of `wrk -t{params.wrk_threads} -c{params.connections} "
        f"-d{params.duration}s --latency` after a {params.warmup} s warm-up: requests/s, the "
        "requests/s as a ratio to gunicorn sync with the same worker count, **requests per server "
        "CPU-second** (the requests of the measured run over the CPU time, user and system, of "
        "every process of the server in it: the server's efficiency even where the load generator "
        "bounds the requests/s), and p50 and p99 latency in milliseconds. Below each table, the "
        "CPU split of each run.",
        "",
    ]
    spreads = []
    for app in APPS:
        if not any(s["app"] == app.key for s in samples):
            continue
        rows = [s for s in order if any(k[0] == app.key and k[2] == s.key for k in summary)]
        lines += [f"### {app.label}", "", f"`bench/apps/{app.target.split(':')[0]}.py`, `{wrk_command(params, app)}`", ""]
        head = "| server |"
        rule = "| --- |"
        for w in workers:
            head += f" {_workers(w)}: req/s | × sync | req/CPU-s | p50 ms | p99 ms |"
            rule += " ---: | ---: | ---: | ---: | ---: |"
        lines += [head, rule]
        for server in rows:
            row = f"| {server.label} |"
            for w in workers:
                cell = summary.get((app.key, w, server.key))
                base = summary.get((app.key, w, BASELINE))
                if cell is None or cell["rps"] is None:
                    row += " failed |  |  |  |  |" if cell else " — |  |  |  |  |"
                    continue
                ratio = cell["rps"] / base["rps"] if base and base["rps"] else None
                flag = " ⚠" if cell["errors"] or cell["failed"] else ""
                flag += " †" if cell["read_errors"] else ""
                row += (
                    f" {_fmt_rps(cell['rps'])}{flag} | {_fmt_ratio(ratio)} | {_fmt_rps(cell['per_cpu'])} "
                    f"| {_fmt_ms(cell['p50'])} | {_fmt_ms(cell['p99'])} |"
                )
                if cell["spread"] is not None:
                    spreads.append(cell["spread"])
            lines.append(row)
        lines.append("")
        _cpu_split_table(summary, app.key, rows, workers, lines)
        _fixed_rate_table(summary, app, rows, workers, params, lines)
    if spreads:
        lines += [
            f"Run-to-run spread of requests/s ((max − min) / median over the rounds of one cell): "
            f"median {statistics.median(spreads):.0%}, largest {max(spreads):.0%}. "
            "⚠ marks a cell with connect/write/timeout errors, non-2xx answers or a failed run "
            "(a run also fails when the app's calls do not match wrk's requests); "
            "† a cell where wrk counted read errors: the server closed connections after a "
            "response without announcing `Connection: close`, so wrk reconnected (see the raw JSON). "
            "— : no such cell (bjoern is one process; nginx answers the hello response only).",
            "",
        ]
    counted = [s for s in samples if "app_calls" in s]
    if counted:
        failed = sum(1 for s in counted if "error" in s)
        lines += [
            f"Counting check: in {len(counted)} measured runs, the app counted its calls (a counter "
            "per thread in a small mmap'd file, the same code in every server; not nginx, which "
            "runs no app) and the harness required "
            f"requests ≤ calls ≤ requests + {params.connections} (the requests in flight when wrk "
            f"stops): {'all passed' if not failed else f'{failed} failed and are left out above'}.",
            "",
        ]
    lines += ["Commands (shown for the first app and worker count; PORT chosen free at run time):", ""]
    for server in order:
        first = next(x for x in samples if x["server"] == server.key)
        lines.append(f"- {server.label}: `{_shorten(first['argv'], raw)}`")
    lines.append("")
    for server in order:
        first = next(x for x in samples if x["server"] == server.key)
        for path, text in (first.get("config_files") or {}).items():
            lines += [f"`{_shorten([path], raw)}` of {server.label}:", "", "```nginx",
                      _shorten([text], raw).rstrip("\n"), "```", ""]  # fmt: skip
    others = sorted(x["other_cpu"] for x in samples if "other_cpu" in x)
    if others:
        lines += [
            "CPU used by other processes on the machine during the measured wrk runs (share of all "
            f"CPUs): median {statistics.median(others):.0%}, largest {others[-1]:.0%}. "
            "A quiet machine shows a few percent at most.",
            "",
        ]
    _goals(summary, workers, present, lines)
    _goals_issue15(summary, workers, lines)


def _split_text(cpu: dict, workers: int) -> str:
    return f"**{cpu_shares(cpu)}**" if uneven(cpu, workers) else cpu_shares(cpu)


def _cpu_split_table(summary: dict, app: str, rows: list, workers: list[int], lines: list[str]) -> None:
    if not any("cpu" in s for k, c in summary.items() if k[0] == app for s in c["rounds"]):
        return
    lines += [
        "CPU split: each worker's share of one core during the measured run, busiest first, then "
        "after + the leader's; one figure per round (rounds in order, separated by ·); a server "
        "of one process shows one figure. **Bold**: a worker used less than half of an equal "
        "share of the workers' CPU.",
        "",
        "| server |" + "".join(f" {_workers(w)} |" for w in workers),
        "| --- |" + " --- |" * len(workers),
    ]
    for server in rows:
        row = f"| {server.label} |"
        for w in workers:
            cell = summary.get((app, w, server.key))
            splits = [_split_text(s["cpu"], w) for s in (cell or {}).get("rounds", []) if "cpu" in s]
            row += f" {' · '.join(splits) or '—'} |"
        lines.append(row)
    lines.append("")


def _fixed_rate_table(summary: dict, app, rows: list, workers: list[int], params: Params, lines: list[str]) -> None:
    measured = [s for s in rows if any((summary.get((app.key, w, s.key)) or {}).get("fixed") for w in workers)]
    if not measured:
        return
    lines += [
        f"Latency at a fixed {params.rate:,} requests/s (the same offered load for every server; "
        f"median of the rounds): `{oha_command(params, app)}`, right after the measured wrk run on "
        "the same server. p50, p99 and p99.9 in milliseconds, counted from when each request was "
        "due to be sent. **Saturated**: the server did not keep up with the rate (below 95% of it), "
        "so its figures measure a queue. ⚠ N: N requests of the cell's runs failed (a connection "
        "closed under a request, an error status); oha's reasons are in the raw JSON.",
        "",
        "| server |" + "".join(f" {_workers(w)}: p50 | p99 | p99.9 |" for w in workers),
        "| --- |" + " ---: | ---: | ---: |" * len(workers),
    ]
    for server in measured:
        row = f"| {server.label} |"
        for w in workers:
            fixed = (summary.get((app.key, w, server.key)) or {}).get("fixed")
            if not fixed:
                row += " — | | |"
                continue
            mark = " **saturated**" if fixed["saturated"] else ""
            mark += f" ⚠ {fixed['failed_requests']}" if fixed["failed_requests"] else ""
            row += f" {_fmt_ms(fixed['p50'])} | {_fmt_ms(fixed['p99'])}{mark} | {_fmt_ms(fixed['p999'])} |"
        lines.append(row)
    lines.append("")


def _goals(summary: dict, workers: list[int], present: set[str], lines: list[str]) -> None:
    fork = [k for k in ("forkscope", "forkscope-threads") if k in present]
    if not fork or "granian" not in present:
        return
    lines += [
        "### Against the goals of issue 2",
        "",
        "Goal: at least 1.2× granian's requests/s at every worker count, with p99 no worse than uWSGI's.",
        "",
    ]
    head = "| app | workers |" + "".join(f" {k} / granian | {k} p99 ms |" for k in fork) + " uWSGI p99 ms |"
    lines += [head, "| --- | ---: |" + " ---: | ---: |" * len(fork) + " ---: |"]
    for app in APPS:
        for w in workers:
            gran = summary.get((app.key, w, "granian"))
            if not gran or not gran["rps"]:
                continue
            uw = summary.get((app.key, w, "uwsgi"))
            row = f"| {app.key} | {w} |"
            for k in fork:
                c = summary.get((app.key, w, k))
                if not c or not c["rps"]:
                    row += " — | — |"
                    continue
                row += f" {_fmt_ratio(c['rps'] / gran['rps'])} | {_fmt_ms(c['p99'])} |"
            row += f" {_fmt_ms(uw['p99']) if uw else '—'} |"
            lines.append(row)
    lines.append("")


def goal_rows(summary: dict, workers: list[int]) -> list[tuple[str, str, int, str, str, float, bool]]:
    """The goals of issue 15, one row per cell measured: (goal, app, workers, forkscope's
    figure, the reference's, forkscope / reference, met)."""
    rows = []

    def cell(app: str, w: int, key: str) -> dict | None:
        c = summary.get((app, w, key))
        return c if c and c["rps"] else None

    for app in APPS:
        fork, bj = cell(app.key, 1, "forkscope"), cell(app.key, 1, "bjoern")
        if fork and bj:
            rows.append(("≥ bjoern req/s", app.key, 1, _fmt_rps(fork["rps"]), _fmt_rps(bj["rps"]),
                         fork["rps"] / bj["rps"], fork["rps"] >= bj["rps"]))  # fmt: skip
            if fork["per_cpu"] and bj["per_cpu"]:
                ratio = fork["per_cpu"] / bj["per_cpu"]
                rows.append(("≥ bjoern req/CPU-s", app.key, 1, _fmt_rps(fork["per_cpu"]),
                             _fmt_rps(bj["per_cpu"]), ratio, ratio >= 1))  # fmt: skip
    fork, gran = cell("flask", 2, "forkscope"), cell("flask", 2, "granian")
    if fork and gran:
        by_round = {s["round"]: s["rps"] for s in gran["rounds"]}
        ratios = [s["rps"] / by_round[s["round"]] for s in fork["rounds"] if s["round"] in by_round]
        busy = not any(uneven(s["cpu"], 2) for s in fork["rounds"] if "cpu" in s)
        if ratios:
            low = min(ratios)
            rows.append(("≥ 1.2× granian req/s in every round (lowest shown), both workers busy",
                         "flask", 2, _fmt_rps(fork["rps"]) + ("" if busy else " (uneven)"),
                         _fmt_rps(gran["rps"]), low, low >= 1.2 and busy))  # fmt: skip
    for app in APPS:
        for w in (w for w in workers if w in (2, 4)):
            fork = cell(app.key, w, "forkscope")
            rivals = [c["p99"] for c in (cell(app.key, w, "granian"), cell(app.key, w, "uwsgi")) if c and c["p99"]]
            if fork and fork["p99"] and rivals:
                best = min(rivals)
                rows.append(("p99 ≤ best of granian and uWSGI, wrk's closed loop", app.key, w,
                             _fmt_ms(fork["p99"]), _fmt_ms(best), fork["p99"] / best,
                             fork["p99"] <= best))  # fmt: skip
            fixed = (fork or {}).get("fixed")
            rivals = [c["fixed"] for c in (cell(app.key, w, "granian"), cell(app.key, w, "uwsgi"))
                      if c and c.get("fixed") and c["fixed"]["p99"]]  # fmt: skip
            if fixed and fixed["p99"] and rivals:
                # A saturated rival's p99 is a queue: it counts as beaten.
                best = min((r["p99"] for r in rivals if not r["saturated"]), default=None)
                met = not fixed["saturated"] and (best is None or fixed["p99"] <= best)
                rows.append((f"p99 ≤ best of granian and uWSGI, at {fixed['rate']:,} req/s", app.key, w,
                             _fmt_ms(fixed["p99"]), _fmt_ms(best) if best else "saturated",
                             fixed["p99"] / best if best else None, met))  # fmt: skip
    for w in workers:
        fork, ngx = cell("hello", w, "forkscope"), cell("hello", w, "nginx")
        if fork and ngx and fork["per_cpu"] and ngx["per_cpu"]:
            ratio = fork["per_cpu"] / ngx["per_cpu"]
            rows.append(("req/CPU-s within 10% of nginx", "hello", w, _fmt_rps(fork["per_cpu"]),
                         _fmt_rps(ngx["per_cpu"]), ratio, ratio >= 0.9))  # fmt: skip
    return rows


def _goals_issue15(summary: dict, workers: list[int], lines: list[str]) -> None:
    rows = goal_rows(summary, workers)
    if not rows:
        return
    lines += [
        "### Against the goals of issue 15",
        "",
        "forkscope-server (without `--threads`) against the reference of each goal, in the same run. "
        "Why the misses miss is measured in sections at the end of this page (where "
        "a hello request's CPU goes beside nginx; p99 under wrk's closed loop).",
        "",
        "| goal | app | workers | forkscope | reference | ratio | |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for goal, app, w, fork, ref, ratio, met in rows:
        lines.append(f"| {goal} | {app} | {w} | {fork} | {ref} | {_fmt_ratio(ratio)} | {'meets' if met else 'misses'} |")
    lines.append("")


def _memory_section(raw: dict, lines: list[str]) -> None:
    results = raw.get("memory") or []
    skipped = raw.get("memory_skipped") or []
    if not results and not skipped:
        return
    labels = {c.key: c.label for c in MEMORY_CONFIGS}
    lines += [
        "## Memory (PSS)",
        "",
        "`bench/apps/bigmem.py` builds ~180 MB of Python objects (dicts, lists, tuples, strings) at "
        "import; a leader and 4 workers serve it. PSS is the sum of `Pss:` in "
        "`/proc/PID/smaps_rollup` of the leader and its children, in MiB. Phases: idle (every "
        "worker has imported the app), after 2,000 requests to `/`, and after every worker has "
        "run a full `gc.collect()` (`/gc` requests on distinct connections until each worker PID "
        "has answered one).",
        "",
        "| configuration | idle | after 2,000 requests | after a full GC in every worker | leader after GC | each worker after GC |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        label = labels.get(r["config"], r["config"])
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error'].splitlines()[0][:80]} | | | | |")
            continue
        ph = r["phases"]
        gc = ph["after_gc"]
        ws = [w["pss_kib"] or 0 for w in gc["workers"]]
        each = f"{_mib(min(ws))}–{_mib(max(ws))}" if ws and _mib(min(ws)) != _mib(max(ws)) else (_mib(ws[0]) if ws else "—")
        warn = "" if r.get("workers_stable", True) else " ⚠ workers changed"
        lines.append(
            f"| {label}{warn} | {_mib(ph['idle']['total_kib'])} | {_mib(ph['after_requests']['total_kib'])} "
            f"| {_mib(gc['total_kib'])} | {_mib(gc['leader']['pss_kib'])} | {each} |"
        )
    for s in skipped:
        lines.append(f"| {labels.get(s['config'], s['config'])} | skipped: {s['reason']} | | | | |")
    lines += ["", "Per process (MiB), leader first, then workers by PID:", "",
              "| configuration | " + " | ".join(t for _, t in PHASES) + " |",
              "| --- |" + " --- |" * len(PHASES)]  # fmt: skip
    for r in results:
        if "error" in r:
            continue
        cells = []
        for key, _ in PHASES:
            snap = r["phases"][key]
            ws = sorted(snap["workers"], key=lambda w: w["pid"])
            cells.append(f"{_mib(snap['leader']['pss_kib'])} + " + " / ".join(_mib(w["pss_kib"]) for w in ws))
        lines.append(f"| {labels.get(r['config'], r['config'])} | " + " | ".join(cells) + " |")
    lines.append("")
    fp = next((r for r in results if r["config"] == "forkscope-preload" and "error" not in r), None)
    if fp:
        after = fp["phases"]["after_gc"]["total_kib"] / 1024
        verdict = "meets" if after <= 185 else "misses"
        lines += [f"Goal of issue 2: forkscope-server --preload at or below 185 MiB after the full GC: "
                  f"{after:,.0f} MiB, {verdict} it.", ""]  # fmt: skip
    lines += ["Commands (PORT chosen free at run time):", ""]
    for r in results:
        env = " ".join(f"{k}={v}" for k, v in (r.get("env") or {}).items())
        lines.append(f"- {labels.get(r['config'], r['config'])}: `{(env + ' ') if env else ''}{_shorten(r['argv'], raw)}`")
    lines.append("")


def _shorten(argv: list[str], raw: dict) -> str:
    """argv with machine-specific paths and the port replaced by short names."""
    paths = raw["meta"].get("paths", {})
    text = re.sub(r"(127\.0\.0\.1:|--port )\d+", r"\1PORT", " ".join(argv))
    text = re.sub(r"(runtime|nginx|calls)-\d+", r"\1", text)
    for name, path in sorted(paths.items(), key=lambda kv: -len(kv[1])):
        if path:
            text = text.replace(path, name)
    return text


def _load(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def render(raw: dict, results_path: str) -> str:
    meta = raw["meta"]
    m = meta["machine"]
    lines = ["# Benchmarks", ""]
    if meta.get("provisional"):
        lines += [f"> **Provisional:** {meta['provisional']}", ""]
    others = [x["other_cpu"] for x in raw.get("throughput") or [] if "other_cpu" in x]
    if others and statistics.median(others) > NOISY_OTHER_CPU:
        lines += [
            f"> **Noisy machine:** other processes used a median {statistics.median(others):.0%} "
            "of the CPUs during the measured runs; rerun on a quiet machine before quoting.",
            "",
        ]
    lines += [
        "Generated by `bench/run` (the harness is in `bench/`); regenerate this page from the saved "
        f"raw results with `bench/report {results_path}`.",
        "",
        "Command:",
        "",
        "```sh",
        meta["command"],
        "```",
        "",
        f"Measured {meta['started']} – {meta['finished']} (UTC).",
        "",
        "## Machine and versions",
        "",
        f"- {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_total_mib']:,} MiB RAM, Linux {m['kernel']}, {m['os']}",
        f"- load average (1, 5, 15 min) at start {_load(meta['loadavg_start'])}, at end {_load(meta['loadavg_end'])}",
        "- `$VENV` is the bench venv (`${FORKSCOPE_CACHE:-~/.cache/forkscope}/bench-venv`), `$TMP` a scratch directory",
    ]
    v = meta["versions"]
    order = ["forkscope-server", "forkscope-commit", "forkscope-binary-built", "gunicorn", "granian", "uwsgi", "bjoern",
             "nginx", "flask", "werkzeug", "python", "wrk", "oha"]
    lines.append("- " + ", ".join(f"{k} {v[k]}" for k in order if k in v))
    lines.append("")
    _throughput_section(raw, lines)
    _memory_section(raw, lines)
    lines += [
        "## Method",
        "",
        "- Every server binds 127.0.0.1 with the same worker count and is started fresh for each "
        "measurement, from an empty working directory; readiness is polled (port open, then a 200 "
        "answer), never a fixed sleep; a short wrk warm-up precedes the measured run; the server is "
        "stopped by PID afterwards.",
        "- Servers are interleaved: each round runs every server once per app and worker count, in "
        "an order that rotates from round to round, so slow drifts of the machine hit all servers "
        "alike. Tables quote the median over the rounds (requests/s, p50 and p99 separately).",
        "- wrk runs on the same machine as the server and competes with it for the same "
        f"{m['nproc']} cores, so absolute numbers are lower than on a dedicated client; the ratios "
        "are what carries over.",
        "- gunicorn's sync worker closes the connection after each response and uWSGI's "
        "`--http-socket` does not keep connections alive, so wrk reconnects for every request to "
        "them; the other servers keep connections alive.",
        "- Latency percentiles in the main tables are wrk's (`--latency`), which measures from the "
        "moment each request is sent on an open connection. wrk is a closed loop: a connection "
        "sends its next request when the answer arrives, so each server's p99 is taken at the load "
        "it sustains itself. On 2 cores a server that keeps wrk busy shares the cores three ways "
        "(wrk and two workers) and its requests wait for a core; a slower one leaves wrk a core of "
        "its own. nginx, which runs no app at all, shows a closed-loop p99 as high as "
        "forkscope-server's or higher there. The fixed-rate tables compare latency at one offered "
        "load for every server instead (oha, `--latency-correction`: each request's latency "
        "counts from when it was due, so a stall also counts for the requests it delayed).",
        "- CPU: the user and system time of the leader and of every process below it, read from "
        "`/proc/PID/stat` just before and just after the measured wrk run. Requests per CPU-second "
        "and the CPU split come from it. The kernel's work on loopback traffic in interrupts is "
        "charged to no process, so it is in no server's figure.",
        "- Every app counts its calls (`bench/apps/counting.py`, the same code whatever the "
        "server) and a run whose calls do not match wrk's requests is a failed run.",
        "- bjoern is one process (1-worker cells only), started by `bench/bjoern_serve.py`. nginx "
        "answers the hello app's response from its configuration without any Python: the ceiling "
        "for requests per CPU-second.",
        "",
    ]
    notes = meta.get("notes") or []
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def write(results_path: Path, out: Path, root: Path) -> None:
    raw = json.loads(results_path.read_text())
    try:
        shown = str(results_path.resolve().relative_to(root))
    except ValueError:
        shown = str(results_path)
    text = render(raw, shown)
    # Measurements made by other scripts (profiler cost, sidecar latency) are kept by hand in
    # bench/other-measurements.md, each with the command that produced it.
    extra = root / "bench" / "other-measurements.md"
    if extra.exists():
        text += "\n" + extra.read_text()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
