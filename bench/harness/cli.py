"""`bench/run` and `bench/report`: argument parsing and the order of the steps."""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import sys
import tempfile
from pathlib import Path

from . import environment, memory, processes, report, servers, throughput
from .environment import log

BENCH = Path(__file__).resolve().parent.parent
ROOT = BENCH.parent


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/run",
        description="Benchmark forkscope-server beside gunicorn, granian, uWSGI and bjoern, with "
        "nginx's static answer as a reference; writes raw JSON under bench/results/ and renders "
        "docs/BENCHMARKS.md from it. The full run takes about an hour: --dry-run prints the plan "
        "and its estimated time.",
    )
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 s runs, 1 s warm-up, 1 round; the document goes to "
                        "bench/results/ instead of docs/ unless --out is given")
    p.add_argument("--servers", type=_csv, default=None,
                   help="comma-separated keys, key prefixes or families: " +
                        ", ".join(s.key for s in servers.THROUGHPUT_SERVERS) + "; memory rows are "
                        "selected by family (gunicorn, forkscope, uwsgi)")
    p.add_argument("--apps", type=_csv, default=[a.key for a in throughput.APPS],
                   help="comma-separated: " + ", ".join(a.key for a in throughput.APPS))
    p.add_argument("--workers", type=lambda t: tuple(int(x) for x in _csv(t)), default=(1, 2, 4),
                   help="worker counts for the throughput table (default 1,2,4)")
    p.add_argument("--duration", type=int, default=None, help="seconds per measured wrk run (default 10)")
    p.add_argument("--warmup", type=int, default=None, help="seconds of wrk warm-up (default 3)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of interleaved runs (default 3)")
    p.add_argument("--connections", type=int, default=32, help="wrk -c and oha -c (default 32)")
    p.add_argument("--rate", type=int, default=4000,
                   help="requests/s of the fixed-rate latency run after each measured run of "
                        f"{', '.join(throughput.FIXED_RATE_SERVERS)} (oha; default 4000, 0: none)")
    p.add_argument("--rate-duration", type=int, default=None,
                   help="seconds of each fixed-rate run (default 5)")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk -t (default 1)")
    p.add_argument("--only", choices=["throughput", "memory"], default=None,
                   help="measure only one of the two tables")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be measured and how long it would take, and stop")
    p.add_argument("--no-build", action="store_true",
                   help="use the existing release forkscope-server ($CARGO_TARGET_DIR or target/) "
                        "instead of building")
    p.add_argument("--provisional", metavar="TEXT", default=None,
                   help="label the document provisional with this explanation")
    p.add_argument("--out", type=Path, default=None, help="document path (default docs/BENCHMARKS.md)")
    p.add_argument("--results-dir", type=Path, default=BENCH / "results")
    return p


# Seconds one memory configuration takes (start-up, 2,000 requests, a GC in every worker).
MEMORY_SECONDS = 8


def describe_plan(
    samples: int, memory_configs: int, params: throughput.Params, fixed_rate_samples: int = 0
) -> str:
    """One line: how many runs, and roughly how long they take."""
    seconds = throughput.estimate_seconds(samples, params, fixed_rate_samples)
    seconds += memory_configs * MEMORY_SECONDS
    fixed = ""
    if params.rate > 0 and fixed_rate_samples:
        fixed = f", {fixed_rate_samples} of them followed by {params.rate_duration} s at {params.rate} req/s,"
    return (
        f"{samples} throughput runs ({params.warmup} s warm-up + {params.duration} s each){fixed} and "
        f"{memory_configs} memory configurations: about {seconds / 60:.0f} min, build not counted"
    )


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def main_run(argv: list[str]) -> int:
    args = run_parser().parse_args(argv)
    duration = args.duration or (2 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    rounds = args.rounds or (1 if args.quick else 3)
    rate_duration = args.rate_duration or (2 if args.quick else 5)
    params = throughput.Params(duration, warmup, rounds, args.connections, args.wrk_threads, args.workers,
                               args.rate, rate_duration)  # fmt: skip

    apps = [a for a in throughput.APPS if a.key in args.apps]
    unknown = set(args.apps) - {a.key for a in throughput.APPS}
    if unknown:
        log(f"unknown apps: {', '.join(sorted(unknown))}")
        return 2
    for tok in args.servers or []:
        if not servers.select(servers.THROUGHPUT_SERVERS + servers.MEMORY_CONFIGS, [tok], by_family=True):
            log(f"--servers: {tok!r} names no server")
            return 2
    tp_servers = servers.select(servers.THROUGHPUT_SERVERS, args.servers)
    mem_configs = servers.select(servers.MEMORY_CONFIGS, args.servers, by_family=True)
    if args.only == "memory":
        tp_servers = []
    if args.only == "throughput":
        mem_configs = []
    if not tp_servers and not mem_configs:
        log("nothing selected")
        return 2
    planned = throughput.plan(tp_servers, apps, params)
    fixed_rate = [p for p in planned if p[3].key in throughput.FIXED_RATE_SERVERS] if args.rate > 0 else []
    log(f"plan: {describe_plan(len(planned), len(mem_configs), params, len(fixed_rate))}")
    if args.dry_run:
        for rnd, app, workers, server in planned:
            if rnd == 1:
                print(f"{app.key} w={workers} {server.key}")
        return 0

    venv = environment.ensure_venv(BENCH / "requirements.txt")
    wrk = environment.ensure_wrk()
    oha = environment.ensure_oha() if fixed_rate else None
    nginx, nginx_without = None, frozenset()
    if any(server.key == "nginx" for _, _, _, server in planned):
        nginx = environment.ensure_nginx()
        nginx_without = frozenset(environment.nginx_modules_left_out(nginx))
    wants_forkscope = any(s.family == "forkscope" for s in tp_servers + mem_configs)
    forkscope = None
    if wants_forkscope:
        if args.no_build:
            forkscope = environment.release_binary(ROOT)
        else:
            forkscope = environment.build_forkscope(ROOT)

    notes: list[str] = []
    if forkscope is not None and args.no_build:
        notes.append("forkscope-server was not rebuilt for this run (--no-build): the binary may "
                     "not match the commit named above; its build time is given instead.")
    skipped = []
    if forkscope is not None and not environment.forkscope_has_flag(forkscope, "--no-gc-freeze"):
        mem_configs = [c for c in mem_configs if c.key != "forkscope-preload-nofreeze"]
        skipped.append({"config": "forkscope-preload-nofreeze",
                        "reason": "this forkscope-server has no --no-gc-freeze flag"})

    started = _now()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    suffix = "-quick" if args.quick else ""
    args.results_dir.mkdir(parents=True, exist_ok=True)
    results_path = args.results_dir / f"{stamp}{suffix}.json"
    out = args.out or (args.results_dir / f"{stamp}{suffix}.md" if args.quick else ROOT / "docs" / "BENCHMARKS.md")
    provisional = args.provisional
    if args.quick and not provisional:
        provisional = "a --quick smoke run (short runs, one round): not for quoting."

    command = "bench/run" + ("" if not argv else " " + shlex.join(argv))
    meta = {
        "command": command,
        "started": started,
        "quick": args.quick,
        "provisional": provisional,
        "params": {"duration": duration, "warmup": warmup, "rounds": rounds,
                   "connections": args.connections, "wrk_threads": args.wrk_threads,
                   "workers": list(args.workers), "rate": args.rate,
                   "rate_duration": rate_duration},
        "machine": environment.machine(),
        "versions": environment.versions(venv, wrk, forkscope, ROOT, nginx, oha),
        "loadavg_start": processes.loadavg(),
    }  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="forkscope-bench-") as tmp:
        scratch = Path(tmp)
        ctx = servers.Context(venv=venv, apps=BENCH / "apps", bench=BENCH, forkscope=forkscope,
                              scratch=scratch, nginx=nginx, nginx_without=nginx_without)  # fmt: skip
        meta["paths"] = {"bench/apps": str(ctx.apps), "bench": str(BENCH), "$VENV": str(venv),
                         "target/release/forkscope-server": str(forkscope or ""), "$TMP": str(scratch),
                         "nginx": nginx or ""}  # fmt: skip
        raw: dict = {"meta": meta}
        if tp_servers and apps:
            log(f"throughput: {', '.join(s.key for s in tp_servers)} × {', '.join(a.key for a in apps)} "
                f"× workers {list(args.workers)} × {rounds} round(s) of {duration} s")  # fmt: skip
            raw["throughput"] = throughput.measure(ctx, wrk, tp_servers, apps, params, oha)
        if mem_configs or skipped:
            log(f"memory: {', '.join(c.key for c in mem_configs)}")
            raw["memory"] = memory.measure(ctx, mem_configs)
            raw["memory_skipped"] = skipped
    meta["finished"] = _now()
    meta["loadavg_end"] = processes.loadavg()
    meta["notes"] = notes
    results_path.write_text(json.dumps(raw, indent=1) + "\n")
    report.write(results_path, out, ROOT)
    log(f"raw results: {results_path}")
    log(f"document:    {out}")
    failed = [s for s in raw.get("throughput", []) if "error" in s] + [r for r in raw.get("memory", []) if "error" in r]
    if failed:
        log(f"{len(failed)} measurement(s) failed; see the raw results")
        return 1
    return 0


def main_report(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench/report",
                                description="Render docs/BENCHMARKS.md from saved raw results.")
    p.add_argument("results", type=Path, nargs="?", default=None,
                   help="a bench/results/*.json file (default: the newest full run, named by its "
                        "start time alone; a quick or partial run carries a suffix)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = p.parse_args(argv)
    path = args.results
    if path is None:
        full_runs = (p for p in (BENCH / "results").glob("*.json") if re.fullmatch(r"\d{8}T\d{6}Z", p.stem))
        found = sorted(full_runs)
        if not found:
            print("bench/report: no results in bench/results/", file=sys.stderr)
            return 2
        path = found[-1]
    report.write(path, args.out, ROOT)
    print(args.out)
    return 0
