"""Installs what the benchmark needs and describes the machine and the software it measured.

- the bench venv (`${FORKSCOPE_CACHE:-~/.cache/forkscope}/bench-venv`) with bench/requirements.txt
  (gunicorn, granian, uWSGI which compiles against the Python headers, bjoern which compiles
  against Debian's libev-dev, Flask), reused while the requirements file is unchanged;
- wrk, and nginx (Debian's nginx-light) when nginx is measured, from Debian when not on PATH;
- oha (the fixed-rate load generator) from crates.io with `cargo install`, cached;
- forkscope-server, built with `cargo build --release -p forkscope-server`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("FORKSCOPE_CACHE") or Path.home() / ".cache" / "forkscope")


def ensure_venv(requirements: Path) -> Path:
    """The bench venv, created or refreshed when bench/requirements.txt changed."""
    venv = cache_dir() / "bench-venv"
    stamp = venv / ".requirements.sha256"
    want = hashlib.sha256(requirements.read_bytes()).hexdigest()
    python = os.environ.get("FORKSCOPE_PYTHON", "python3")
    if (venv / "bin" / "python").exists() and stamp.exists() and stamp.read_text().strip() == want:
        return venv
    # bjoern compiles against libev's headers (Debian's libev-dev).
    ensure_debian_packages(["libev-dev"])
    log(f"installing {requirements.name} into {venv} (uWSGI and bjoern compile: a minute or two)")
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
         "--disable-pip-version-check", "-r", str(requirements)],
        check=True,
    )  # fmt: skip
    stamp.write_text(want + "\n")
    return venv


_apt_updated = False


def _installed(package: str) -> bool:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
    )
    return out.returncode == 0 and out.stdout.strip().endswith(" installed")


def ensure_debian_packages(packages: list[str]) -> None:
    """`apt-get install` the Debian packages not installed yet (`apt-get update` once per run)."""
    global _apt_updated
    missing = [p for p in packages if not _installed(p)]
    if not missing:
        return
    log(f"installing {', '.join(missing)} from Debian")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if not _apt_updated:
        subprocess.run(sudo + ["apt-get", "update"], check=True, env=env)
        _apt_updated = True
    subprocess.run(
        sudo + ["apt-get", "install", "-y", "--no-install-recommends", *missing], check=True, env=env
    )


def _ensure_tool(name: str, package: str, places: tuple[str, ...] = ()) -> str:
    """Path of the program `name` (PATH, then `places`); installs Debian's `package` if missing."""
    found = shutil.which(name) or next((p for p in places if os.access(p, os.X_OK)), None)
    if found:
        return found
    ensure_debian_packages([package])
    found = shutil.which(name) or next((p for p in places if os.access(p, os.X_OK)), None)
    if not found:
        raise RuntimeError(f"apt-get installed {package} but {name} is not on PATH")
    return found


def ensure_wrk() -> str:
    """Path of wrk; installs Debian's package when it is missing."""
    return _ensure_tool("wrk", "wrk")


# The fixed-rate load generator: oha from crates.io, built once into the cache.
OHA_VERSION = "1.16.0"


def ensure_oha() -> str:
    """Path of oha OHA_VERSION: `cargo install`ed under the cache when not there yet (about
    5 minutes on 2 cores, once)."""
    root = cache_dir() / "tools" / f"oha-{OHA_VERSION}"
    binary = root / "bin" / "oha"
    if os.access(binary, os.X_OK):
        return str(binary)
    log(f"cargo install oha {OHA_VERSION} (once, into {root})")
    subprocess.run(
        ["cargo", "install", "--quiet", "--locked", "oha", "--version", OHA_VERSION, "--root", str(root)],
        check=True,
        env=dict(os.environ, CARGO_TARGET_DIR=str(cache_dir() / "tools" / "oha-build")),
    )
    return str(binary)


def ensure_nginx() -> str:
    """Path of nginx; installs Debian's `nginx-light` (the smallest build) when it is missing.

    On a host whose init system runs services, Debian's package also starts its own nginx on
    port 80 (`systemctl disable --now nginx` stops it); the benchmark never uses that one.
    """
    return _ensure_tool("nginx", "nginx-light", ("/usr/sbin/nginx",))


def nginx_modules_left_out(nginx: str) -> set[str]:
    """The http modules this nginx was built without (their directives would be unknown)."""
    out = subprocess.run([nginx, "-V"], capture_output=True, text=True)
    return modules_left_out(out.stdout + out.stderr)


def modules_left_out(version_text: str) -> set[str]:
    """`X` of every `--without-http_X_module` in the output of `nginx -V`."""
    return set(re.findall(r"--without-http_(\w+?)_module", version_text))


def build_forkscope(root: Path) -> Path:
    """`cargo build --release -p forkscope-server` and the binary's path."""
    log("cargo build --release -p forkscope-server")
    subprocess.run(["cargo", "build", "--release", "-p", "forkscope-server"], cwd=root, check=True)
    binary = release_binary(root)
    if not binary.exists():
        raise RuntimeError(f"cargo built, but {binary} does not exist")
    return binary


def release_binary(root: Path) -> Path:
    """Where cargo puts the release forkscope-server (`$CARGO_TARGET_DIR` or target/)."""
    target = Path(os.environ.get("CARGO_TARGET_DIR") or root / "target")
    if not target.is_absolute():
        target = root / target
    return target / "release" / "forkscope-server"


def forkscope_has_flag(binary: Path, flag: str) -> bool:
    out = subprocess.run([str(binary), "--help"], capture_output=True, text=True)
    return re.search(rf"(^|\s){re.escape(flag)}\b", out.stdout + out.stderr) is not None


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def versions(
    venv: Path,
    wrk: str,
    forkscope: Path | None,
    root: Path,
    nginx: str | None = None,
    oha: str | None = None,
) -> dict[str, str]:
    """The version of every server, framework and tool measured."""
    py = str(venv / "bin" / "python")
    meta = json.loads(
        subprocess.run(
            [py, "-c",
             "import json, sys, importlib.metadata as m\n"
             "names = ['gunicorn', 'granian', 'uwsgi', 'bjoern', 'flask', 'werkzeug']\n"
             "print(json.dumps({'python': sys.version.split()[0],"
             " **{n: m.version(n) for n in names}}))"],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    out = {k: str(v) for k, v in meta.items()}
    out["uwsgi-binary"] = _first_line([str(venv / "bin" / "uwsgi"), "--version"])
    wrk_line = _first_line([wrk, "-v"])
    m = re.match(r"wrk\s+(\S+)", wrk_line)
    out["wrk"] = m.group(1) if m else wrk_line
    if oha is not None:
        out["oha"] = _first_line([oha, "--version"]).removeprefix("oha ")
    if nginx is not None:
        out["nginx"] = _first_line([nginx, "-v"]).removeprefix("nginx version: nginx/")
    if forkscope is not None:
        out["forkscope-server"] = _first_line([str(forkscope), "--version"]).removeprefix(
            "forkscope-server "
        )
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "server", "protocol", "Cargo.lock"],
            capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        out["forkscope-commit"] = (commit or "unknown") + (" + uncommitted changes" if dirty else "")
        built = datetime.datetime.fromtimestamp(forkscope.stat().st_mtime, datetime.timezone.utc)
        out["forkscope-binary-built"] = built.strftime("%Y-%m-%d %H:%M:%S UTC")
    return out


def machine() -> dict[str, object]:
    """nproc, CPU model, kernel, memory: what the numbers were measured on."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return {
        "nproc": int(nproc) if nproc.isdigit() else os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "os": _os_name(),
        "mem_total_mib": mem_kib // 1024,
    }


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()
