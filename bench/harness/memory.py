"""Memory: PSS of a leader and its 4 workers serving bench/apps/bigmem.py (~180 MB at import).

Phases, each a snapshot of /proc/PID/smaps_rollup `Pss:` for the leader and its children:
  idle           every worker has imported the app and answered once
  after_requests 2,000 more requests to `/` (fresh connection each, 4 client threads)
  after_gc       every worker has run a full gc.collect(): waves of concurrent /gc requests on
                 distinct connections until each worker PID has answered one
"""

from __future__ import annotations

import concurrent.futures
import time

from . import processes, servers
from .environment import log

APP = "bigmem:app"
WORKERS = 4
REQUESTS = 2000
CLIENT_THREADS = 4


def snapshot(running: processes.Running) -> dict[str, object]:
    leader = running.pid
    kids = processes.children(leader)
    workers = [{"pid": pid, "pss_kib": processes.pss_kib(pid)} for pid in kids]
    leader_pss = processes.pss_kib(leader)
    total = (leader_pss or 0) + sum(w["pss_kib"] or 0 for w in workers)
    return {
        "leader": {"pid": leader, "pss_kib": leader_pss},
        "workers": workers,
        "total_kib": total,
        "loadavg": processes.loadavg(),
    }


def _pid_of(running: processes.Running, path: str) -> int:
    status, body = processes.http_request(running.host, running.port, path, timeout=120)
    if status != 200:
        raise RuntimeError(f"{path} answered {status}")
    return int(body)


def _until_every_worker_answers(
    running: processes.Running, path: str, deadline: float
) -> tuple[set[int], int]:
    """Concurrent waves of `path` on distinct connections until each child PID has answered."""
    answered: set[int] = set()
    waves = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=2 * WORKERS) as pool:
        while True:
            running.check_alive()
            kids = set(processes.children(running.pid))
            if len(kids) >= WORKERS and kids <= answered:
                return answered, waves
            if time.monotonic() > deadline:
                raise processes.ServerFailed(
                    f"{running.name}: workers {sorted(kids - answered)} never answered {path} "
                    f"(children {sorted(kids)}, answered {sorted(answered)})"
                )
            waves += 1
            futures = [pool.submit(_pid_of, running, path) for _ in range(2 * WORKERS)]
            for f in futures:
                try:
                    answered.add(f.result())
                except (OSError, RuntimeError, ValueError):
                    pass  # a worker still importing may reset early connections; retry next wave


def _requests(running: processes.Running, count: int) -> int:
    """`count` GET / requests from CLIENT_THREADS threads; returns how many were not 200."""

    def client(n: int) -> int:
        bad = 0
        for _ in range(n):
            status, _ = processes.http_request(running.host, running.port, "/", timeout=30)
            bad += status != 200
        return bad

    share = [count // CLIENT_THREADS + (i < count % CLIENT_THREADS) for i in range(CLIENT_THREADS)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=CLIENT_THREADS) as pool:
        return sum(pool.map(client, share))


def measure_one(ctx: servers.Context, config: servers.Server) -> dict[str, object]:
    port = processes.free_port(ctx.host)
    argv = servers.command(config, ctx, APP, WORKERS, port)
    result: dict[str, object] = {"config": config.key, "argv": argv, "env": dict(config.extra_env)}
    log_path = ctx.scratch / "logs" / f"memory-{config.key}-{port}.log"
    running = processes.start(
        config.key, argv, ctx.env(dict(config.extra_env)), ctx.scratch, log_path, ctx.host, port
    )
    try:
        started = time.monotonic()
        running.wait_port(started + 180)
        answered, _ = _until_every_worker_answers(running, "/pid?hold=0.2", started + 240)
        result["ready_s"] = round(time.monotonic() - started, 3)
        phases = {"idle": snapshot(running)}
        bad = _requests(running, REQUESTS)
        result["requests"] = {"count": REQUESTS, "not_200": bad}
        phases["after_requests"] = snapshot(running)
        gc_started = time.monotonic()
        gc_pids, waves = _until_every_worker_answers(running, "/gc", time.monotonic() + 300)
        result["gc"] = {"waves": waves, "pids": sorted(gc_pids), "seconds": round(time.monotonic() - gc_started, 2)}
        phases["after_gc"] = snapshot(running)
        result["phases"] = phases
        pids = [sorted(w["pid"] for w in p["workers"]) for p in phases.values()]
        result["workers_stable"] = all(p == pids[0] for p in pids) and len(pids[0]) == WORKERS
        log(
            f"memory {config.key}: "
            + ", ".join(f"{k} {v['total_kib'] / 1024:.0f} MiB" for k, v in phases.items())
        )
    except (processes.ServerFailed, RuntimeError, OSError, ValueError) as e:
        result["error"] = str(e)
        log(f"  ERROR memory {config.key}: {str(e).splitlines()[0]}")
    finally:
        running.stop()
    return result


def measure(ctx: servers.Context, configs: list[servers.Server]) -> list[dict[str, object]]:
    return [measure_one(ctx, c) for c in configs]
