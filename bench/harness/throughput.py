"""Throughput and latency: every server under wrk, interleaved per round, raw samples out.

One sample = one server started fresh for one (round, app, worker count): readiness by polling
(port, then a 200), a warm-up wrk run, the measured `wrk --latency` run, then (for the servers in
FIXED_RATE_SERVERS) a run at a fixed request rate, then the server is stopped by PID. The
servers' order rotates from round to round so none always runs first.

During the measured run the CPU of every process of the server's tree is recorded (leader and
each worker). Every app counts its calls (bench/apps/counting.py): the calls made during the
measured run must match the requests wrk reports, or the sample is an error. (nginx, which
answers without the app, is not counted.)

wrk is a closed loop: each connection sends its next request when the last answer arrives, so a
server's p99 there is taken at the load that server itself sustains, and on a 2-core machine a
fast server shares the cores with wrk (more waiting for a core) where a slow one leaves wrk a
core of its own. The fixed-rate run compares latency at the same offered load for every server:
oha (crates.io) sends `rate` requests per second over the same number of connections, whatever
the answers do, and with `--latency-correction` counts a request's latency from when it was due
to be sent, so a stall is not hidden by the requests it held back (coordinated omission).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import processes, servers
from .environment import log

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "apps"))
import counting  # noqa: E402  (bench/apps/counting.py: the counters' file format)


@dataclass(frozen=True)
class App:
    """One benchmark app: its WSGI target, and the request wrk sends."""

    key: str
    label: str
    target: str
    method: str = "GET"
    path: str = "/"
    wrk_script: str | None = None  # relative to bench/
    probe_body: bytes | None = None
    expect: bytes | None = None  # the body a correct answer to the probe carries
    counts: bool = True  # counts its calls when BENCH_COUNT_DIR is set (bench/apps/counting.py)
    rate_body: bytes | None = None  # the body of the fixed-rate run's requests (wrk's script's)


APPS = [
    App("hello", "hello world (13-byte body)", "hello:app", expect=b"Hello, World!"),
    App("big", "64 KiB response", "big:app", expect=bytes(range(256)) * 256),
    App("echo", "POST echo (1 KiB body)", "echo:app", "POST", "/", "wrk/post.lua",
        b"probe-" * 200, b"probe-" * 200, rate_body=b"forkscope-bench!" * 64),
    App("flask", "Flask hello", "flask_hello:app", expect=b"Hello, World!"),
]


@dataclass(frozen=True)
class Params:
    duration: int
    warmup: int
    rounds: int
    connections: int
    wrk_threads: int
    workers: tuple[int, ...]
    rate: int = 0  # requests/s of the fixed-rate run; 0: none
    rate_duration: int = 5  # seconds of the fixed-rate run


# The servers measured at a fixed rate as well: forkscope and the references of the latency
# goals (granian, uWSGI), bjoern on one worker, nginx as the floor.
FIXED_RATE_SERVERS = ("forkscope", "granian", "uwsgi", "bjoern", "nginx")


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"unparsable wrk duration {text!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


def parse_wrk(text: str) -> dict[str, object]:
    """Requests/s, latency percentiles (ms), request count and errors from wrk's output."""
    out: dict[str, object] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m:
        raise ValueError(f"no Requests/sec in wrk output:\n{text}")
    out["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+\w+), ([\d.]+\w+) read", text)
    if m:
        out["requests"] = int(m.group(1))
        out["elapsed_ms"] = _ms(m.group(2))
        out["read"] = m.group(3)
    for pct, value in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+\w+)\s*$", text, re.M):
        out[f"p{pct}_ms"] = _ms(value)
    m = re.search(r"Latency\s+([\d.]+\w+)\s+([\d.]+\w+)\s+([\d.]+\w+)", text)
    if m:
        out["mean_ms"], out["stdev_ms"], out["max_ms"] = (_ms(g) for g in m.groups())
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = (
        dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()))) if m else {}
    )
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non_2xx"] = int(m.group(1)) if m else 0
    return out


def run_wrk(wrk: str, url: str, seconds: int, params: Params, script: Path | None) -> str:
    argv = [wrk, f"-t{params.wrk_threads}", f"-c{params.connections}", f"-d{seconds}s", "--latency"]
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(url)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return done.stdout


def parse_oha(text: str, rate: int) -> dict[str, object]:
    """The fixed-rate run's figures from `oha --output-format json`: the target and achieved
    rate, latency percentiles (ms), and the requests that failed (those cut off by the end of
    the run excepted)."""
    data = json.loads(text)
    pct = data.get("latencyPercentiles") or {}
    codes = data.get("statusCodeDistribution") or {}
    errors = {k: v for k, v in (data.get("errorDistribution") or {}).items() if k != "aborted due to deadline"}
    out: dict[str, object] = {
        "rate": rate,
        "achieved": float(data["summary"]["requestsPerSec"]),
        "requests": sum(codes.values()),
        "non_2xx": sum(v for k, v in codes.items() if not k.startswith("2")),
        "errors": sum(errors.values()),
    }
    for key, name in (("p50", "p50_ms"), ("p99", "p99_ms"), ("p99.9", "p999_ms")):
        if pct.get(key) is not None:
            out[name] = float(pct[key]) * 1000.0
    if errors:
        out["error_kinds"] = errors
    return out


def run_oha(oha: str, url: str, params: Params, app: App, body: Path | None) -> str:
    argv = [oha, "--no-tui", "--output-format", "json", "-z", f"{params.rate_duration}s",
            "-c", str(params.connections), "-q", str(params.rate), "--latency-correction",
            "-m", app.method]  # fmt: skip
    if body is not None:
        argv += ["-D", str(body), "-T", "application/octet-stream"]
    argv.append(url)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=params.rate_duration + 60)
    if done.returncode != 0:
        raise RuntimeError(f"oha failed ({done.returncode}): {done.stderr or done.stdout}")
    return done.stdout


def oha_command(params: Params, app: App) -> str:
    """The fixed-rate command as the document shows it."""
    body = " -D BODY -T application/octet-stream" if app.rate_body is not None else ""
    return (
        f"oha -z {params.rate_duration}s -c {params.connections} -q {params.rate} "
        f"--latency-correction -m {app.method}{body} http://127.0.0.1:PORT{app.path}"
    )


def wrk_command(params: Params, app: App) -> str:
    """The measured wrk command as the document shows it."""
    script = f" -s bench/{app.wrk_script}" if app.wrk_script else ""
    return (
        f"wrk -t{params.wrk_threads} -c{params.connections} -d{params.duration}s --latency"
        f"{script} http://127.0.0.1:PORT{app.path}"
    )


def _check_answer(running: processes.Running, app: App) -> None:
    """A fast wrong answer must not pass for throughput: the probe's body is compared."""
    status, body = processes.http_request(
        running.host, running.port, app.path, app.method, app.probe_body
    )
    if status != 200 or (app.expect is not None and body != app.expect):
        raise RuntimeError(
            f"{running.name} answered {app.key} wrongly: status {status}, "
            f"{len(body)} bytes {body[:60]!r}"
        )


def check_calls(calls: int, requests: int, connections: int) -> str | None:
    """Why `calls` of the app cannot be the `requests` wrk reports, or None when they can.

    Every response wrk counts must have come from one call of the app; the app may have been
    called for a few more: the requests still in flight when wrk stopped, at most one per
    connection.
    """
    if calls < requests:
        return f"the app was called {calls} times for the {requests} requests wrk reports"
    if calls > requests + connections:
        return (
            f"the app was called {calls} times for the {requests} requests wrk reports "
            f"(at most {connections} more can have been in flight)"
        )
    return None


def _settled_calls(directory: Path, quiet_s: float = 0.2, deadline_s: float = 3.0) -> int:
    """The app's call count once it has not moved for `quiet_s` (the requests still in flight
    when wrk stopped have finished), or at the deadline."""
    end = time.monotonic() + deadline_s
    last, since = counting.total(directory), time.monotonic()
    while True:
        time.sleep(0.05)
        now = counting.total(directory)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s or time.monotonic() > end:
            return now


def measure_one(
    ctx: servers.Context,
    wrk: str,
    server: servers.Server,
    app: App,
    workers: int,
    params: Params,
    oha: str | None = None,
) -> dict[str, object]:
    port = processes.free_port(ctx.host)
    argv = servers.command(server, ctx, app.target, workers, port)
    sample: dict[str, object] = {
        "server": server.key,
        "app": app.key,
        "workers": workers,
        "argv": argv,
        "loadavg_before": processes.loadavg(),
    }
    # Configuration files the harness wrote for the server (nginx's), kept with the sample.
    written = {a: Path(a).read_text() for a in argv if a.startswith(f"{ctx.scratch}/") and Path(a).is_file()}
    if written:
        sample["config_files"] = written
    log_path = ctx.scratch / "logs" / f"{server.key}-{app.key}-w{workers}-{port}.log"
    env = dict(server.extra_env)
    count_dir = None
    if app.counts and server.runs_app:
        # A folder of its own: ports are reused from run to run.
        count_dir = Path(tempfile.mkdtemp(prefix=f"calls-{port}-", dir=ctx.scratch))
        env[counting.ENV] = str(count_dir)
    running = processes.start(server.key, argv, ctx.env(env), ctx.scratch, log_path, ctx.host, port)
    try:
        started = time.monotonic()
        running.wait_ok(app.path, app.method, app.probe_body, started + 120)
        sample["ready_s"] = round(time.monotonic() - started, 3)
        _check_answer(running, app)
        url = f"http://{ctx.host}:{port}{app.path}"
        script = ctx.bench / app.wrk_script if app.wrk_script else None
        if params.warmup > 0:
            run_wrk(wrk, url, params.warmup, params, script)
        running.check_alive()
        running.remember_children()
        calls_before = _settled_calls(count_dir) if count_dir else 0
        other = processes.OtherCpu([running.pid, *running.seen])
        cpu_before = processes.tree_cpu(running.pid)
        wrk_started = time.monotonic()
        text = run_wrk(wrk, url, params.duration, params, script)
        wrk_seconds = time.monotonic() - wrk_started
        cpu_after = processes.tree_cpu(running.pid)
        sample["other_cpu"] = round(other.share(), 4)
        running.check_alive()
        sample["cpu"] = processes.cpu_split(cpu_before, cpu_after, running.pid, wrk_seconds)
        sample.update(parse_wrk(text))
        sample["wrk_output"] = text
        if count_dir:
            sample["app_calls"] = _settled_calls(count_dir) - calls_before
            problem = check_calls(sample["app_calls"], sample.get("requests", -1), params.connections)
            if problem:
                raise RuntimeError(f"counting check failed: {problem}")
        if oha is not None and params.rate > 0 and server.key in FIXED_RATE_SERVERS:
            body = None
            if app.rate_body is not None:
                body = ctx.scratch / f"body-{app.key}"
                body.write_bytes(app.rate_body)
            sample["fixed_rate"] = parse_oha(run_oha(oha, url, params, app, body), params.rate)
            running.check_alive()
    except (processes.ServerFailed, RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
        sample["error"] = str(e)
        log(f"  ERROR {server.key} {app.key} w={workers}: {str(e).splitlines()[0]}")
    finally:
        running.stop()
    return sample


def measure(
    ctx: servers.Context,
    wrk: str,
    chosen: list[servers.Server],
    apps: list[App],
    params: Params,
    oha: str | None = None,
) -> list[dict[str, object]]:
    """All samples: for each round, app and worker count, every server once (rotated order)."""
    samples = []
    total = len(plan(chosen, apps, params))
    for n, (rnd, app, workers, server) in enumerate(plan(chosen, apps, params), 1):
        sample = measure_one(ctx, wrk, server, app, workers, params, oha)
        sample["round"] = rnd
        samples.append(sample)
        if "rps" in sample and "error" not in sample:
            cpu = sample["cpu"]
            per_cpu = sample.get("requests", 0) / cpu["total_s"] if cpu["total_s"] else 0
            log(
                f"[{n}/{total}] round {rnd} {app.key} w={workers} {server.key}: "
                f"{sample['rps']:.0f} req/s, {per_cpu:.0f} req/CPU-s, "
                f"p50 {sample.get('p50_ms', 0):.2f} ms, p99 {sample.get('p99_ms', 0):.2f} ms, "
                f"CPU {cpu_shares(cpu)}"
            )
            fixed = sample.get("fixed_rate")
            if fixed:
                log(
                    f"    at {fixed['rate']} req/s: achieved {fixed['achieved']:.0f}, "
                    f"p50 {fixed.get('p50_ms', 0):.2f} ms, p99 {fixed.get('p99_ms', 0):.2f} ms, "
                    f"p99.9 {fixed.get('p999_ms', 0):.2f} ms"
                )
    return samples


def plan(
    chosen: list[servers.Server], apps: list[App], params: Params
) -> list[tuple[int, App, int, servers.Server]]:
    """Every (round, app, workers, server) measured, in order: per round, app and worker count,
    every server that has that cell, in an order rotated by one from round to round."""
    out = []
    for rnd in range(params.rounds):
        shift = rnd % len(chosen) if chosen else 0
        for app in apps:
            for workers in params.workers:
                for server in chosen[shift:] + chosen[:shift]:
                    if server.serves(app.key, workers):
                        out.append((rnd + 1, app, workers, server))
    return out


# Seconds a sample takes beyond its wrk runs: start-up to the first 200, the probe, reading the
# counters (0.2 s of quiet each time), stopping (measured: 1 to 1.5 s).
SAMPLE_OVERHEAD_S = 1.5


def estimate_seconds(samples: int, params: Params, fixed_rate_samples: int = 0) -> float:
    """How long the throughput samples take: warm-up, measured run and overhead each, and the
    fixed-rate runs of those that have one (with a second to start and stop oha)."""
    fixed = fixed_rate_samples * (params.rate_duration + 1) if params.rate > 0 else 0
    return samples * (params.warmup + params.duration + SAMPLE_OVERHEAD_S) + fixed


def worker_shares(cpu: dict) -> tuple[list[float], float]:
    """The processes' shares of one core during the measured run: those serving, busiest
    first, and the leader's. A server of one process (bjoern) is its own single worker."""
    seconds = cpu["seconds"] or 1.0
    if not cpu["workers"]:
        return [cpu["leader_s"] / seconds], 0.0
    shares = sorted((w["cpu_s"] / seconds for w in cpu["workers"]), reverse=True)
    return shares, cpu["leader_s"] / seconds


def cpu_shares(cpu: dict) -> str:
    """`97/95 +2` : percent of one core per worker, busiest first, then the leader's."""
    shares, leader = worker_shares(cpu)
    text = "/".join(f"{100 * s:.0f}" for s in shares)
    return text if not cpu["workers"] else f"{text} +{100 * leader:.0f}"
