"""Unit tests of the harness' pure parts: wrk parsing, --servers selection, report rendering.

Run: python3 -m unittest discover -s bench/tests
"""

import sys
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import report, servers, throughput  # noqa: E402

WRK = """Running 2s test @ http://127.0.0.1:35707/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   694.54us  458.12us   1.20s    70.85%
    Req/Sec    17.73k     2.61k   21.29k    61.90%
  Latency Distribution
     50%  640.00us
     75%    0.91ms
     90%    1.24ms
     99%    2.16s
  37076 requests in 2.10s, 2.76MB read
  Socket errors: connect 0, read 37069, write 1, timeout 2
  Non-2xx or 3xx responses: 5
Requests/sec:  17650.41
Transfer/sec:      1.31MB
"""


class ParseWrk(unittest.TestCase):
    def test_fields_and_units(self):
        r = throughput.parse_wrk(WRK)
        self.assertEqual(r["rps"], 17650.41)
        self.assertAlmostEqual(r["p50_ms"], 0.64)
        self.assertAlmostEqual(r["p75_ms"], 0.91)
        self.assertAlmostEqual(r["p99_ms"], 2160.0)
        self.assertAlmostEqual(r["max_ms"], 1200.0)
        self.assertEqual(r["requests"], 37076)
        self.assertEqual(r["socket_errors"], {"connect": 0, "read": 37069, "write": 1, "timeout": 2})
        self.assertEqual(r["non_2xx"], 5)

    def test_missing_rate_is_an_error(self):
        with self.assertRaises(ValueError):
            throughput.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused")


OHA = """{"summary": {"successRate": 1.0, "total": 5.0, "requestsPerSec": 3996.7},
 "latencyPercentiles": {"p50": 0.000402, "p99": 0.0083, "p99.9": 0.0122},
 "statusCodeDistribution": {"200": 19000, "503": 3},
 "errorDistribution": {"aborted due to deadline": 7, "connection reset": 2}}"""


class ParseOha(unittest.TestCase):
    def test_rate_percentiles_and_errors(self):
        r = throughput.parse_oha(OHA, 4000)
        self.assertEqual((r["rate"], r["achieved"], r["requests"]), (4000, 3996.7, 19003))
        self.assertAlmostEqual(r["p50_ms"], 0.402)
        self.assertAlmostEqual(r["p99_ms"], 8.3)
        self.assertAlmostEqual(r["p999_ms"], 12.2)
        # Requests cut off by the end of the run are no error; a reset is, and so is a 503.
        self.assertEqual((r["errors"], r["non_2xx"]), (2, 3))
        self.assertFalse(report.saturated(r))  # it kept up; the failures are shown apart

    def test_kept_up(self):
        r = throughput.parse_oha(OHA.replace("3996.7", "3700"), 4000)
        self.assertTrue(report.saturated(r))


class Select(unittest.TestCase):
    def keys(self, wanted, by_family=False, table=servers.THROUGHPUT_SERVERS):
        return [s.key for s in servers.select(table, wanted, by_family)]

    def test_prefix_and_exact(self):
        self.assertEqual(self.keys(["gunicorn"]), ["gunicorn-sync", "gunicorn-gthread"])
        self.assertEqual(self.keys(["gunicorn-sync"]), ["gunicorn-sync"])
        self.assertEqual(
            self.keys(["forkscope"]),
            ["forkscope", "forkscope-threads", "forkscope-nocounters", "forkscope-memwatch"],
        )
        self.assertEqual(self.keys(["forkscope-memwatch"]), ["forkscope-memwatch"])

    def test_memory_by_family(self):
        got = self.keys(["gunicorn-sync"], True, servers.MEMORY_CONFIGS)
        self.assertEqual(got, ["gunicorn", "gunicorn-preload", "gunicorn-preload-freeze"])
        self.assertEqual(self.keys(["granian"], True, servers.MEMORY_CONFIGS), [])


def _sample(server, rnd, rps, app="hello", workers=1, cpu=(0.0, 1.0)):
    """A sample of a 1 s run (requests = rps); `cpu`: leader's CPU-s, then each worker's."""
    leader, *each = cpu
    return {"server": server, "app": app, "workers": workers, "round": rnd, "rps": rps,
            "requests": rps, "p50_ms": 1.0, "p99_ms": 2.0, "socket_errors": {}, "non_2xx": 0,
            "argv": ["/venv/bin/x", "-b", "127.0.0.1:4242"], "other_cpu": 0.01,
            "cpu": {"seconds": 1.0, "leader_s": leader, "total_s": leader + sum(each), "exited": 0,
                    "workers": [{"pid": 100 + i, "cpu_s": c} for i, c in enumerate(each)]}}  # fmt: skip


class Render(unittest.TestCase):
    def raw(self):
        snap = {"leader": {"pid": 1, "pss_kib": 10240},
                "workers": [{"pid": 2, "pss_kib": 40960}], "total_kib": 51200}  # fmt: skip
        return {
            "meta": {
                "command": "bench/run", "started": "s", "finished": "f", "provisional": None,
                "params": {"duration": 10, "warmup": 3, "rounds": 3, "connections": 32,
                           "wrk_threads": 1, "workers": [1]},
                "machine": {"nproc": 2, "cpu_model": "cpu", "kernel": "k", "os": "os",
                            "mem_total_mib": 1024},
                "versions": {"gunicorn": "1"}, "loadavg_start": [0, 0, 0],
                "loadavg_end": [0, 0, 0], "paths": {"$VENV": "/venv"},
            },
            "throughput": [_sample("gunicorn-sync", r, v) for r, v in ((1, 100), (2, 300), (3, 200))]
            + [_sample("granian", r, v) for r, v in ((1, 1000), (2, 900), (3, 5000))]
            + [_sample("forkscope", r, v) for r, v in ((1, 1200), (2, 1300), (3, 1250))],
            "memory": [{"config": "forkscope-preload", "argv": ["x"], "env": {},
                        "phases": {"idle": snap, "after_requests": snap, "after_gc": snap},
                        "workers_stable": True}],
        }  # fmt: skip

    def test_medians_ratios_and_goals(self):
        text = report.render(self.raw(), "bench/results/x.json")
        self.assertIn("| gunicorn sync | 200 | 1.00× |", text)
        self.assertIn("| granian --interface wsgi | 1,000 | 5.00× |", text)  # median, not mean
        self.assertIn("| hello | 1 | 1.25× |", text)  # forkscope / granian
        self.assertIn("$VENV/bin/x -b 127.0.0.1:PORT", text)
        self.assertIn("50 MiB, meets it", text)
        self.assertNotIn("Noisy machine", text)

    def test_requests_per_cpu_second_and_split(self):
        raw = self.raw()
        raw["meta"]["params"]["workers"] = [1, 2]
        raw["throughput"] = [
            _sample("forkscope", 1, 1000, cpu=(0.0, 0.5)),
            _sample("forkscope", 1, 2000, workers=2, cpu=(0.02, 1.0, 0.0)),
            _sample("forkscope", 2, 3000, workers=2, cpu=(0.02, 0.5, 0.49)),
            _sample("bjoern", 1, 900, cpu=(0.9,)),
            _sample("nginx", 1, 1500, cpu=(0.0, 0.75)),
            _sample("forkscope", 1, 500, app="flask"),
        ]
        text = report.render(raw, "x")
        # forkscope, 1 worker: 1000 requests / 0.5 CPU-s; 2 workers: median of 2000/1.02, 3000/1.01
        self.assertIn("| forkscope-server | 1,000 | — | 2,000 | 1.00 | 2.00 | 2,500 | — | 2,466 |", text)
        self.assertIn("| bjoern (one process) | 900 | — | 1,000 | 1.00 | 2.00 | — |", text)
        # CPU split: percent of one core per worker, busiest first, + leader; uneven rounds bold
        self.assertIn("| forkscope-server | 50 +0 | **100/0 +2** · 50/49 +2 |", text)
        self.assertIn("| bjoern (one process) | 90 | — |", text)
        flask = text[text.index("### Flask hello") : text.index("Run-to-run")]
        self.assertIn("forkscope-server", flask)
        self.assertNotIn("nginx", flask)  # a server is a row only of the apps it ran
        # goals of issue 15
        self.assertIn("| ≥ bjoern req/s | hello | 1 | 1,000 | 900 | 1.11× | meets |", text)
        self.assertIn("| ≥ bjoern req/CPU-s | hello | 1 | 2,000 | 1,000 | 2.00× | meets |", text)
        self.assertIn("| req/CPU-s within 10% of nginx | hello | 1 | 2,000 | 2,000 | 1.00× | meets |", text)

    def test_a_failed_counting_check_leaves_the_sample_out(self):
        raw = self.raw()
        for s in raw["throughput"]:
            s["app_calls"] = s["requests"]
        bad = raw["throughput"][5]  # granian round 3 (5000 req/s)
        bad["error"] = "counting check failed: the app was called 1 times"
        text = report.render(raw, "x")
        self.assertIn("| granian --interface wsgi | 950 ⚠ | 4.75× |", text)  # median of 1000, 900
        self.assertIn("in 9 measured runs,", text)
        self.assertIn("1 failed and are left out above", text)

    def test_flask_two_workers_against_granian_round_by_round(self):
        raw = self.raw()
        raw["meta"]["params"]["workers"] = [2]
        raw["throughput"] = [
            _sample("granian", 1, 1000, "flask", 2, (0, 1, 1)),
            _sample("granian", 2, 2000, "flask", 2, (0, 1, 1)),
            _sample("forkscope", 1, 1300, "flask", 2, (0, 1, 1)),
            _sample("forkscope", 2, 2200, "flask", 2, (0, 1, 1)),  # 1.1× granian's round 2
        ]
        rows = report.goal_rows(report.summarize(raw["throughput"]), [2])
        goal = [r for r in rows if r[0].startswith("≥ 1.2× granian")]
        self.assertEqual(len(goal), 1)
        self.assertAlmostEqual(goal[0][5], 1.1)
        self.assertFalse(goal[0][6])

    def test_p99_at_a_fixed_rate(self):
        def fixed(sample, p99, achieved=4000.0):
            sample["fixed_rate"] = {"rate": 4000, "achieved": achieved, "requests": 20000,
                                    "non_2xx": 0, "errors": 0, "p50_ms": 0.3, "p99_ms": p99,
                                    "p999_ms": 2 * p99}  # fmt: skip
            return sample

        raw = self.raw()
        raw["meta"]["params"].update(workers=[2, 4], rate=4000, rate_duration=5)
        raw["throughput"] = [
            fixed(_sample("forkscope", 1, 60000, "hello", 2), 0.9),
            fixed(_sample("granian", 1, 50000, "hello", 2), 1.5),
            fixed(_sample("uwsgi", 1, 16000, "hello", 2), 1.2),
            fixed(_sample("forkscope", 1, 20000, "flask", 4), 3.0),
            fixed(_sample("granian", 1, 15000, "flask", 4), 2.5),
            fixed(_sample("uwsgi", 1, 3000, "flask", 4), 900.0, achieved=3000.0),
            fixed(_sample("forkscope", 1, 60000, "big", 2), 5.0, achieved=3500.0),
            fixed(_sample("uwsgi", 1, 13000, "big", 2), 40.0, achieved=3600.0),
        ]
        rows = {(r[1], r[2]): r for r in report.goal_rows(report.summarize(raw["throughput"]), [2, 4])
                if "req/s" in r[0] and r[0].startswith("p99")}  # fmt: skip
        self.assertEqual(rows[("hello", 2)][3:5], ("0.90", "1.20"))  # the best of the two rivals
        self.assertTrue(rows[("hello", 2)][6])
        # uWSGI could not keep up (its p99 is a queue); granian's 2.5 ms is the reference.
        self.assertEqual(rows[("flask", 4)][4], "2.50")
        self.assertFalse(rows[("flask", 4)][6])
        # forkscope below the rate misses, whatever the rival did.
        self.assertEqual(rows[("big", 2)][4], "saturated")
        self.assertFalse(rows[("big", 2)][6])
        text = report.render(raw, "x")
        self.assertIn("Latency at a fixed 4,000 requests/s", text)
        self.assertIn("| uWSGI --http-socket | — | | | 0.30 | 900.0 **saturated** | 1800.0 |", text)
        raw["throughput"][2]["fixed_rate"]["errors"] = 7
        text = report.render(raw, "x")
        self.assertIn("| uWSGI --http-socket | 0.30 | 1.20 ⚠ 7 | 2.40 |", text)

    def test_uneven_needs_half_an_equal_share(self):
        cpu = _sample("x", 1, 1, cpu=(0.0, 0.6, 0.3, 0.2, 0.1))["cpu"]
        self.assertFalse(report.uneven(cpu, 1))
        self.assertTrue(report.uneven(cpu, 4))  # 0.1 < half of 1.2/4
        cpu = _sample("x", 1, 1, cpu=(0.0, 0.4, 0.3, 0.3, 0.2))["cpu"]
        self.assertFalse(report.uneven(cpu, 4))

    def test_busy_machine_is_called_noisy(self):
        raw = self.raw()
        for sample in raw["throughput"]:
            sample["other_cpu"] = 0.3
        self.assertIn("**Noisy machine:** other processes used a median 30%", report.render(raw, "x"))


if __name__ == "__main__":
    unittest.main()
