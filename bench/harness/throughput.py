"""Throughput and latency: every server under wrk, interleaved per round, raw samples out.

One sample = one server started fresh for one (round, app, worker count): readiness by polling
(port, then a 200), a warm-up wrk run, the measured `wrk --latency` run, then the server is
stopped by PID. The servers' order rotates from round to round so none always runs first.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from . import processes, servers
from .environment import log


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


APPS = [
    App("hello", "hello world (13-byte body)", "hello:app", expect=b"Hello, World!"),
    App("big", "64 KiB response", "big:app", expect=bytes(range(256)) * 256),
    App("echo", "POST echo (1 KiB body)", "echo:app", "POST", "/", "wrk/post.lua",
        b"probe-" * 200, b"probe-" * 200),
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


def measure_one(
    ctx: servers.Context, wrk: str, server: servers.Server, app: App, workers: int, params: Params
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
    log_path = ctx.scratch / "logs" / f"{server.key}-{app.key}-w{workers}-{port}.log"
    running = processes.start(
        server.key, argv, ctx.env(dict(server.extra_env)), ctx.scratch, log_path, ctx.host, port
    )
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
        other = processes.OtherCpu([running.pid, *running.seen])
        text = run_wrk(wrk, url, params.duration, params, script)
        sample["other_cpu"] = round(other.share(), 4)
        running.check_alive()
        sample.update(parse_wrk(text))
        sample["wrk_output"] = text
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
) -> list[dict[str, object]]:
    """All samples: for each round, app and worker count, every server once (rotated order)."""
    samples = []
    total = params.rounds * len(apps) * len(params.workers) * len(chosen)
    n = 0
    for rnd in range(params.rounds):
        for app in apps:
            for workers in params.workers:
                shift = rnd % len(chosen)
                for server in chosen[shift:] + chosen[:shift]:
                    n += 1
                    sample = measure_one(ctx, wrk, server, app, workers, params)
                    sample["round"] = rnd + 1
                    samples.append(sample)
                    if "rps" in sample:
                        log(
                            f"[{n}/{total}] round {rnd + 1} {app.key} w={workers} {server.key}: "
                            f"{sample['rps']:.0f} req/s p50 {sample.get('p50_ms', 0):.2f} ms "
                            f"p99 {sample.get('p99_ms', 0):.2f} ms"
                        )
    return samples
