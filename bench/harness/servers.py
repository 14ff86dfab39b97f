"""The command line of every server and configuration the benchmark compares.

A server is started with the same worker count, on 127.0.0.1, from an empty working directory
(so no server picks up a stray config file) with the app directory given by its own option.
Two rows are references rather than rivals: bjoern (one process, so 1-worker cells only) and
nginx answering the hello app's response itself, without Python (the hello app only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Environment variables that would change a server's settings behind the harness' back.
_DROPPED_ENV_PREFIXES = ("FORKSCOPE_", "GUNICORN_", "GRANIAN_", "UWSGI_")
_DROPPED_ENV = {"WEB_CONCURRENCY", "PYTHONPATH", "PYTHONHOME", "PORT"}


@dataclass(frozen=True)
class Context:
    """Where things are: the venv with the servers, the apps, forkscope's binary, a scratch dir."""

    venv: Path
    apps: Path
    bench: Path
    forkscope: Path | None
    scratch: Path
    host: str = "127.0.0.1"
    nginx: str | None = None
    nginx_without: frozenset[str] = frozenset()  # http modules the nginx was built without

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The inherited environment, cleaned of server settings, with the bench venv active."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in _DROPPED_ENV
            and (k == "FORKSCOPE_CACHE" or not k.startswith(_DROPPED_ENV_PREFIXES))
        }
        env["VIRTUAL_ENV"] = str(self.venv)
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        if extra:
            env.update(extra)
        return env


@dataclass(frozen=True)
class Server:
    """One server configuration: `argv(ctx, module_app, workers, port)` builds its command."""

    key: str
    label: str
    family: str
    argv: Callable[[Context, str, int, int], list[str]]
    extra_env: tuple[tuple[str, str], ...] = ()
    max_workers: int | None = None  # a single-process server serves 1-worker cells only
    apps: tuple[str, ...] | None = None  # the apps it can serve (None: all)
    runs_app: bool = True  # False: answers by itself (nginx), so the app counts no calls

    def serves(self, app: str, workers: int) -> bool:
        """Whether the server has a cell for this app and worker count."""
        return (self.max_workers is None or workers <= self.max_workers) and (
            self.apps is None or app in self.apps
        )


def _gunicorn(*flags: str):
    def build(ctx: Context, app: str, workers: int, port: int) -> list[str]:
        return [
            ctx.bin("gunicorn"), "-w", str(workers), "-b", f"{ctx.host}:{port}",
            "--chdir", str(ctx.apps), *flags, app,
        ]  # fmt: skip

    return build


def _granian(ctx: Context, app: str, workers: int, port: int) -> list[str]:
    return [
        ctx.bin("granian"), "--interface", "wsgi", "--host", ctx.host, "--port", str(port),
        "--workers", str(workers), "--working-dir", str(ctx.apps), "--log-level", "warning", app,
    ]  # fmt: skip


def _uwsgi(ctx: Context, app: str, workers: int, port: int) -> list[str]:
    return [
        ctx.bin("uwsgi"), "--http-socket", f"{ctx.host}:{port}", "--master",
        "--processes", str(workers), "--disable-logging", "--die-on-term", "--need-app",
        "--home", str(ctx.venv), "--chdir", str(ctx.apps), "--module", app,
    ]  # fmt: skip


def _forkscope(*flags: str, runtime: bool = True):
    """forkscope-server; `runtime=False` points it at a runtime directory it cannot create, which
    turns off what lives there (the per-slot request counters, profiler results)."""

    def build(ctx: Context, app: str, workers: int, port: int) -> list[str]:
        if ctx.forkscope is None:
            raise RuntimeError("forkscope-server was not built")
        rt = ctx.scratch / f"runtime-{port}" if runtime else Path("/proc/forkscope-off")
        return [
            str(ctx.forkscope), "-w", str(workers), "-b", f"{ctx.host}:{port}",
            "--chdir", str(ctx.apps), "--runtime-dir", str(rt), *flags, app,
        ]  # fmt: skip

    return build


def _bjoern(ctx: Context, app: str, workers: int, port: int) -> list[str]:
    if workers != 1:
        raise RuntimeError("bjoern is a single process: 1 worker only")
    return [
        ctx.bin("python"), str(ctx.bench / "bjoern_serve.py"), "--chdir", str(ctx.apps),
        "--host", ctx.host, "--port", str(port), app,
    ]  # fmt: skip


# What nginx answers: the hello app's body; the probe compares it with the app's.
STATIC_BODY = "Hello, World!"


def nginx_conf(workers: int, host: str, port: int, prefix: Path, without: frozenset[str]) -> str:
    """An nginx.conf answering every request with the hello app's response (status, body and
    Content-Type; nginx adds Content-Length), on `host` only, with every path under `prefix`.

    Keep-alive connections are never closed by nginx (as by the WSGI servers measured), and no
    request is logged. Run as root, nginx's workers switch to the unprivileged `nobody`.
    """
    temps = [f"client_body_temp_path {prefix}/client_body;"] + [
        f"{module}_temp_path {prefix}/{module};"
        for module in ("proxy", "fastcgi", "uwsgi", "scgi")
        if module not in without
    ]
    lines = [
        "daemon off;",
        "master_process on;",
        f"worker_processes {workers};",
        f"pid {prefix}/nginx.pid;",
        "error_log stderr warn;",
        "events { worker_connections 1024; }",
        "http {",
        "    access_log off;",
        "    keepalive_requests 1000000000;",
        "    keepalive_timeout 75s;",
        *(f"    {t}" for t in temps),
        "    server {",
        f"        listen {host}:{port};",
        "        default_type text/plain;",
        f'        location / {{ return 200 "{STATIC_BODY}"; }}',
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _nginx(ctx: Context, app: str, workers: int, port: int) -> list[str]:
    if ctx.nginx is None:
        raise RuntimeError("nginx was not found")
    prefix = ctx.scratch / f"nginx-{port}"
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(workers, ctx.host, port, prefix, ctx.nginx_without))
    return [ctx.nginx, "-p", str(prefix), "-c", str(conf), "-e", "stderr"]


# Throughput: the baseline (ratios are to it) comes first.
BASELINE = "gunicorn-sync"
THROUGHPUT_SERVERS = [
    Server("gunicorn-sync", "gunicorn sync", "gunicorn", _gunicorn()),
    Server("gunicorn-gthread", "gunicorn gthread --threads 4", "gunicorn",
           _gunicorn("-k", "gthread", "--threads", "4")),
    Server("granian", "granian --interface wsgi", "granian", _granian),
    Server("uwsgi", "uWSGI --http-socket", "uwsgi", _uwsgi),
    Server("forkscope", "forkscope-server", "forkscope", _forkscope()),
    Server("forkscope-threads", "forkscope-server --threads 4", "forkscope",
           _forkscope("--threads", "4")),
    # What the request counters and the memory watch cost (issue 13): hello only.
    Server("forkscope-nocounters", "forkscope-server, no runtime dir (no request counters)",
           "forkscope", _forkscope(runtime=False), apps=("hello",)),
    Server("forkscope-memwatch", "forkscope-server, memory watch on (never crossed)",
           "forkscope", _forkscope("--max-worker-memory", "4Gi", "--memory-watch-threshold", "2Gi"),
           apps=("hello",)),
    Server("bjoern", "bjoern (one process)", "bjoern", _bjoern, max_workers=1),
    Server("nginx", "nginx `return 200` (no Python)", "nginx", _nginx, apps=("hello",),
           runs_app=False),
]  # fmt: skip

# Memory: leader + 4 workers serving bench/apps/bigmem.py.
MEMORY_CONFIGS = [
    Server("gunicorn", "gunicorn", "gunicorn", _gunicorn()),
    Server("gunicorn-preload", "gunicorn --preload", "gunicorn", _gunicorn("--preload")),
    Server("gunicorn-preload-freeze", "gunicorn --preload + gc.freeze() in a pre_fork hook",
           "gunicorn", _gunicorn("--preload", "-c", "@BENCH@/gunicorn_gc_freeze.py")),
    Server("forkscope", "forkscope-server", "forkscope", _forkscope()),
    Server("forkscope-preload", "forkscope-server --preload (gc.freeze by default)", "forkscope",
           _forkscope("--preload")),
    Server("forkscope-preload-nofreeze", "forkscope-server --preload --no-gc-freeze", "forkscope",
           _forkscope("--preload", "--no-gc-freeze")),
    Server("uwsgi-preload", "uWSGI (imports in the master)", "uwsgi", _uwsgi),
    Server("uwsgi-preload-freeze", "uWSGI + gc.freeze() at the end of the app's import", "uwsgi",
           _uwsgi, (("BENCH_GC_FREEZE_AT_IMPORT", "1"),)),
]  # fmt: skip


def command(server: Server, ctx: Context, app: str, workers: int, port: int) -> list[str]:
    """The final argv (placeholders such as @BENCH@ resolved)."""
    return [a.replace("@BENCH@", str(ctx.bench)) for a in server.argv(ctx, app, workers, port)]


def select(servers: list[Server], wanted: list[str] | None, by_family: bool = False) -> list[Server]:
    """Filter by `--servers`: a token names a key, a key prefix before '-', or a family.

    With `by_family` (the memory table, whose rows are not the throughput servers) a token
    such as `gunicorn-sync` selects every configuration of its family (`gunicorn`).
    """
    if not wanted:
        return list(servers)
    out = []
    for s in servers:
        for tok in wanted:
            family = tok.split("-")[0] if by_family else tok
            if s.key == tok or s.key.startswith(tok + "-") or family == s.family:
                out.append(s)
                break
    return out
