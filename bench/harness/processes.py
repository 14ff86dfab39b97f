"""Starting and stopping server processes, readiness by polling, /proc reads (children, PSS).

Every process the harness starts is stopped by its own PID (and its recorded children by theirs),
never by name: other people run the same binaries on this machine.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


class ServerFailed(RuntimeError):
    """A server exited or never became ready; the message carries the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out for `host` (closed again before the server binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks): tells a PID from a reused one."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = raw[raw.rfind(")") + 2 :].split()
    return int(rest[19])


def children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc/PID/task/*/children or, failing that, a /proc scan."""
    kids: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        tasks = list(task_dir.iterdir())
        for task in tasks:
            text = (task / "children").read_text()
            kids.extend(int(x) for x in text.split())
        return sorted(set(kids))
    except OSError:
        pass
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(raw[raw.rfind(")") + 2 :].split()[1])
        if ppid == pid:
            kids.append(int(entry.name))
    return sorted(kids)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren, ...)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        for kid in children(todo.pop()):
            out.append(kid)
            todo.append(kid)
    return out


def pss_kib(pid: int) -> int | None:
    """The process' proportional set size in KiB (`Pss:` of /proc/PID/smaps_rollup)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_ticks(pid: int) -> int:
    """utime + stime of one process in clock ticks (0 when it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    rest = raw[raw.rfind(")") + 2 :].split()
    return int(rest[11]) + int(rest[12])


def tree_cpu(leader: int) -> dict[int, tuple[int | None, int]]:
    """CPU so far of `leader` and every process below it: pid -> (start time, utime + stime)."""
    return {pid: (proc_start_time(pid), cpu_ticks(pid)) for pid in [leader, *descendants(leader)]}


def cpu_split(
    before: dict[int, tuple[int | None, int]],
    after: dict[int, tuple[int | None, int]],
    leader: int,
    seconds: float,
) -> dict[str, object]:
    """CPU-seconds each process of a server's tree used between two `tree_cpu` snapshots.

    A process started in between (a new start time under a PID) counts from zero. One that
    exited in between is counted in `exited`: what it used after the first snapshot is lost
    (it is at most the window).
    """
    hz = os.sysconf("SC_CLK_TCK")

    def used(pid: int) -> float:
        start, ticks = after[pid]
        prev_start, prev = before.get(pid, (start, 0))
        return (ticks - (prev if prev_start == start else 0)) / hz

    others = sorted(pid for pid in after if pid != leader)
    leader_s = used(leader) if leader in after else 0.0
    workers = [{"pid": pid, "cpu_s": round(used(pid), 3)} for pid in others]
    return {
        "seconds": round(seconds, 3),
        "leader_s": round(leader_s, 3),
        "workers": workers,
        "total_s": round(leader_s + sum(w["cpu_s"] for w in workers), 3),
        "exited": sum(1 for pid, (start, _) in before.items() if after.get(pid, (None,))[0] != start),
    }


def machine_busy_ticks() -> int:
    """Busy clock ticks of all CPUs since boot: user, nice, system and steal of /proc/stat.

    irq and softirq are left out: the loopback traffic of the benchmark itself is processed
    there and is charged to no process, so counting it would blame the machine for our own work.
    """
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
    return f[0] + f[1] + f[2] + f[7]


class OtherCpu:
    """How much CPU the rest of the machine used while a measurement ran, as a share of all CPUs.

    Busy ticks of the machine minus those of the measured processes (the server's tree, and the
    harness' own children such as wrk, which are counted when reaped): a noisy machine shows here.
    """

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.t0 = time.monotonic()
        self.busy0 = machine_busy_ticks()
        self.own0 = sum(cpu_ticks(p) for p in pids) + _children_ticks()

    def share(self) -> float:
        hz = os.sysconf("SC_CLK_TCK")
        elapsed = time.monotonic() - self.t0
        busy = machine_busy_ticks() - self.busy0
        own = sum(cpu_ticks(p) for p in self.pids) + _children_ticks() - self.own0
        capacity = elapsed * hz * (os.cpu_count() or 1)
        return max(0.0, (busy - own) / capacity) if capacity > 0 else 0.0


def _children_ticks() -> int:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return round((ru.ru_utime + ru.ru_stime) * os.sysconf("SC_CLK_TCK"))


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (how busy the machine was around a measurement)."""
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def http_request(
    host: str,
    port: int,
    path: str = "/",
    method: str = "GET",
    body: bytes | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    """One request on a fresh connection (`Connection: close`); returns status and body."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        headers = {"Connection": "close"}
        if body is not None:
            headers["Content-Type"] = "application/octet-stream"
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@dataclass
class Running:
    """A server the harness started: its leader process, its log, and every PID seen below it."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    host: str
    port: int
    seen: dict[int, int | None] = field(default_factory=dict)  # pid -> start time

    @property
    def pid(self) -> int:
        return self.proc.pid

    def remember_children(self) -> None:
        """Record the current descendants, so stop() can reach them even if the leader is gone."""
        for pid in descendants(self.pid):
            if pid not in self.seen:
                self.seen[pid] = proc_start_time(pid)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise ServerFailed(f"{self.name} exited with {code}:\n{self.log_tail()}")

    def wait_port(self, deadline: float) -> None:
        """Poll until the port accepts a TCP connection (or the server dies, or time runs out)."""
        while True:
            self.check_alive()
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ServerFailed(f"{self.name}: port {self.port} not open in time:\n{self.log_tail()}")
            time.sleep(0.05)

    def wait_ok(self, path: str, method: str, body: bytes | None, deadline: float) -> None:
        """Poll until one request gets a 200 (the app is imported by at least one worker)."""
        self.wait_port(deadline)
        last = ""
        while True:
            self.check_alive()
            try:
                status, _ = http_request(self.host, self.port, path, method, body, timeout=5)
                if status == 200:
                    self.remember_children()
                    return
                last = f"status {status}"
            except OSError as e:
                last = repr(e)
            if time.monotonic() > deadline:
                raise ServerFailed(f"{self.name}: no 200 in time ({last}):\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 20.0) -> None:
        """TERM the leader and wait; KILL on timeout; then KILL any recorded child still alive."""
        self.remember_children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        end = time.monotonic() + 10
        for pid, started in self.seen.items():
            while proc_start_time(pid) == started and started is not None:
                if time.monotonic() > end:
                    os.kill(pid, signal.SIGKILL)
                    break
                time.sleep(0.05)


def start(
    name: str,
    argv: list[str],
    env: dict[str, str],
    cwd: Path,
    log_path: Path,
    host: str,
    port: int,
) -> Running:
    """Start one server with its output in `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")
    try:
        proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    finally:
        log.close()
    return Running(name=name, proc=proc, log_path=log_path, host=host, port=port)
