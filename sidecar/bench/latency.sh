#!/usr/bin/env bash
# Measures forkscope-sidecar with many workers: latency of GET /metrics and GET /v1/processes
# (each a full /proc scan plus smaps_rollup of every leader and worker) and the sidecar's own
# PSS and CPU time. Usage: sidecar/bench/latency.sh [WORKERS] [REQUESTS] [CLIENTS]
# (defaults 64, 200 and 8: the requests are made one after another, then again by CLIENTS
# concurrent clients). Needs the release binaries (cargo build --release -p forkscope-server
# -p forkscope-sidecar; FORKSCOPE_BENCH_PROFILE=debug for the debug ones, or
# FORKSCOPE_BENCH_SIDECAR / FORKSCOPE_BENCH_SERVER naming binaries) and curl.
# Everything listens on 127.0.0.1 and is stopped on exit.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
workers=${1:-64}
requests=${2:-200}
clients=${3:-8}
target=${CARGO_TARGET_DIR:-$root/target}
profile=${FORKSCOPE_BENCH_PROFILE:-release}
server_bin=${FORKSCOPE_BENCH_SERVER:-$target/$profile/forkscope-server}
sidecar_bin=${FORKSCOPE_BENCH_SIDECAR:-$target/$profile/forkscope-sidecar}
venv=$("$root/scripts/python-env")
tmp=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

VIRTUAL_ENV=$venv "$server_bin" -b 127.0.0.1:0 -w "$workers" \
    --chdir "$root/tests/apps" --runtime-dir "$tmp/run" --error-logfile "$tmp/server.log" \
    app:app >/dev/null 2>&1 &
leader=$!
pids+=("$leader")
echo "waiting for $workers workers of leader $leader..." >&2
for _ in $(seq 1 600); do
    n=$( (ps -o pid= --ppid "$leader" || true) | wc -l)
    [ "$n" -ge "$workers" ] && break
    sleep 0.5
done
echo "$workers workers up" >&2

echo "bench-$$" > "$tmp/token"
"$sidecar_bin" --listen 127.0.0.1:0 --runtime-dir "$tmp/run" \
    --token-file "$tmp/token" 2> "$tmp/sidecar.log" &
sidecar=$!
pids+=("$sidecar")
for _ in $(seq 1 100); do
    addr=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$tmp/sidecar.log" | head -1)
    [ -n "$addr" ] && break
    sleep 0.1
done

# Prints the latency percentiles of the times (seconds, one a line) read from stdin.
report() { # name
    sort -n | awk -v name="$1" '{ t[NR] = $1 * 1000 } END {
        printf "%-22s n=%d  p50=%.2f ms  p95=%.2f ms  p99=%.2f ms  max=%.2f ms\n", name, NR,
            t[int(NR * 0.5)], t[int(NR * 0.95)], t[int(NR * 0.99)], t[NR] }'
}
measure() { # name, curl args...
    local name=$1; shift
    for _ in $(seq 1 "$requests"); do
        curl -s -o /dev/null -w '%{time_total}\n' "$@"
    done | report "$name"
}
measure_concurrent() { # name, curl args...: CLIENTS loops of REQUESTS/CLIENTS requests
    local name=$1; shift
    for _ in $(seq 1 "$clients"); do
        for _ in $(seq 1 $((requests / clients))); do
            curl -s -o /dev/null -w '%{time_total}\n' "$@"
        done &
    done | report "$name x$clients"
}
cpu_ticks() { # user + system clock ticks of the sidecar so far
    awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$sidecar/stat"
}
series=$(curl -s "http://$addr/metrics" | grep -c '^forkscope_process_pss_bytes')
leaders=$(curl -s -H "Authorization: Bearer bench-$$" "http://$addr/v1/processes" \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print(len(d["leaders"]), sum(len(l["workers"]) for l in d["leaders"]))')
echo "machine: $(nproc) cores; sidecar sees leaders/workers: $leaders; PSS series: $series"
before=$(cpu_ticks)
measure "/metrics" "http://$addr/metrics"
measure_concurrent "/metrics" "http://$addr/metrics"
after=$(cpu_ticks)
echo "sidecar CPU for the $((requests * 2)) /metrics requests: $(( (after - before) * 1000 / $(getconf CLK_TCK) )) ms"
measure "/v1/processes" -H "Authorization: Bearer bench-$$" "http://$addr/v1/processes"
for _ in $(seq 1 50); do
    curl -s "http://$addr/metrics" | awk '/^forkscope_sidecar_scrape_duration_seconds/ {print $2}'
done | sort -g | awk '{ t[NR] = $1 * 1000 } END {
    printf "%-16s n=%d  p50=%.2f ms  (time spent reading /proc inside one scrape)\n", "/proc read", NR, t[int(NR * 0.5)] }'
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
pss=$(awk '/^Pss:/ {print $2}' "/proc/$sidecar/smaps_rollup")
rss=$(awk '/^Rss:/ {print $2}' "/proc/$sidecar/smaps_rollup")
echo "sidecar PSS: ${pss} kB  RSS: ${rss} kB ($profile build)"
