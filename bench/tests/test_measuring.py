"""Unit tests of what the harness measures with: the app's call counters, the CPU split of a
server's processes, the counting check, which cells each server has, nginx's configuration.

Run: python3 -m unittest discover -s bench/tests
"""

import os
import re
import subprocess
import sys
import tempfile
import textwrap
import unittest
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCH))

from harness import cli, environment, processes, servers, throughput  # noqa: E402

import counting  # noqa: E402  (bench/apps/counting.py, on sys.path through harness.throughput)


class Counting(unittest.TestCase):
    def test_threads_and_forked_children_count_apart_and_add_up(self):
        # In a fresh interpreter: the counter is set up at import from BENCH_COUNT_DIR.
        script = textwrap.dedent("""
            import os, threading
            from counting import calls

            def call(n):
                for _ in range(n):
                    calls.slot[0] += 1

            call(5)  # the parent has a counter before it forks: the child must not share it
            threads = [threading.Thread(target=call, args=(1000,)) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            pid = os.fork()
            if pid == 0:
                call(7)
                os._exit(0)
            os.waitpid(pid, 0)
            call(3)
        """)
        with tempfile.TemporaryDirectory() as d:
            env = dict(os.environ, BENCH_COUNT_DIR=d, PYTHONPATH=str(BENCH / "apps"))
            subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)
            self.assertEqual(counting.total(d), 5 + 4000 + 7 + 3)
            self.assertEqual(len(os.listdir(d)), 6)  # main thread, 4 threads, the child

    def test_unset_counts_nothing(self):
        env = {k: v for k, v in os.environ.items() if k != counting.ENV}
        env["PYTHONPATH"] = str(BENCH / "apps")
        out = subprocess.run(
            [sys.executable, "-c", "import counting; print(counting.calls)"],
            env=env, capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        self.assertEqual(out.stdout.strip(), "None")

    def test_total_skips_a_file_not_sized_yet(self):
        with tempfile.TemporaryDirectory() as d:
            Path(d, "1-a").write_bytes((41).to_bytes(8, sys.byteorder))
            Path(d, "2-b").write_bytes(b"")  # made, not truncated to size yet
            self.assertEqual(counting.total(d), 41)


class CheckCalls(unittest.TestCase):
    def test_bounds(self):
        self.assertIsNone(throughput.check_calls(1000, 1000, 32))
        self.assertIsNone(throughput.check_calls(1032, 1000, 32))  # all in flight at the end
        self.assertIn("called 999 times", throughput.check_calls(999, 1000, 32))
        self.assertIn("at most 32 more", throughput.check_calls(1033, 1000, 32))


class CpuSplit(unittest.TestCase):
    def test_new_reused_and_exited_processes(self):
        hz = os.sysconf("SC_CLK_TCK")
        before = {10: (1, 5 * hz), 11: (2, 100), 12: (3, 7 * hz), 13: (4, 50)}
        after = {
            10: (1, 6 * hz),  # leader: 1 s
            11: (2, 100 + 2 * hz),  # worker: 2 s
            12: (9, 3 * hz),  # PID reused by a new worker: all of its 3 s
            14: (8, hz // 2),  # a worker started during the run: 0.5 s
        }  # 13 exited
        split = processes.cpu_split(before, after, 10, 4.0)
        self.assertEqual(split["leader_s"], 1.0)
        self.assertEqual([w["pid"] for w in split["workers"]], [11, 12, 14])
        self.assertEqual([w["cpu_s"] for w in split["workers"]], [2.0, 3.0, 0.5])
        self.assertEqual(split["total_s"], 6.5)
        self.assertEqual(split["exited"], 2)  # 13, and the first process under PID 12
        self.assertEqual(split["seconds"], 4.0)

    def test_tree_of_this_process(self):
        tree = processes.tree_cpu(os.getpid())
        self.assertIn(os.getpid(), tree)
        self.assertEqual(tree[os.getpid()][0], processes.proc_start_time(os.getpid()))


def cpu(leader, *workers, seconds=2.0):
    return {"seconds": seconds, "leader_s": leader, "total_s": leader + sum(workers),
            "workers": [{"pid": i, "cpu_s": w} for i, w in enumerate(workers)], "exited": 0}  # fmt: skip


class Shares(unittest.TestCase):
    def test_workers_busiest_first_then_leader(self):
        self.assertEqual(throughput.cpu_shares(cpu(0.04, 1.0, 1.9)), "95/50 +2")

    def test_one_process_is_its_own_worker(self):
        shares, leader = throughput.worker_shares(cpu(1.8))
        self.assertEqual((shares, leader), ([0.9], 0.0))
        self.assertEqual(throughput.cpu_shares(cpu(1.8)), "90")


class Cells(unittest.TestCase):
    def params(self, rounds=2, workers=(1, 2, 4)):
        return throughput.Params(10, 3, rounds, 32, 1, workers)

    def test_bjoern_has_one_worker_cells_and_nginx_hello_only(self):
        chosen = servers.select(servers.THROUGHPUT_SERVERS, ["forkscope-threads", "bjoern", "nginx"])
        cells = {(a.key, w, s.key) for _, a, w, s in throughput.plan(chosen, throughput.APPS, self.params(1))}
        self.assertIn(("flask", 1, "bjoern"), cells)
        self.assertNotIn(("flask", 2, "bjoern"), cells)
        self.assertEqual({(a, w) for a, w, s in cells if s == "nginx"}, {("hello", 1), ("hello", 2), ("hello", 4)})
        # forkscope-threads: 4 apps x 3 worker counts; bjoern 4; nginx 3
        self.assertEqual(len(cells), 12 + 4 + 3)

    def test_order_rotates_by_round(self):
        chosen = servers.select(servers.THROUGHPUT_SERVERS, ["granian", "uwsgi", "bjoern"])
        hello = [a for a in throughput.APPS if a.key == "hello"]
        plan = throughput.plan(chosen, hello, self.params(2, (1,)))
        self.assertEqual([(r, s.key) for r, _, _, s in plan],
                         [(1, "granian"), (1, "uwsgi"), (1, "bjoern"),
                          (2, "uwsgi"), (2, "bjoern"), (2, "granian")])  # fmt: skip

    def test_full_run_estimate(self):
        params = self.params(3)
        n = len(throughput.plan(servers.THROUGHPUT_SERVERS, throughput.APPS, params))
        # Six servers on every app and worker count, the two forkscope variants and nginx on
        # hello's three worker counts, bjoern on each app's 1-worker cell.
        self.assertEqual(n, 3 * (6 * 4 * 3 + 3 * 3 + 4))
        line = cli.describe_plan(n, len(servers.MEMORY_CONFIGS), params)
        minutes = int(re.search(r"about (\d+) min", line).group(1))
        self.assertTrue(45 <= minutes <= 70, line)

    def test_default_worker_counts(self):
        self.assertEqual(cli.run_parser().parse_args([]).workers, (1, 2, 4))

    def test_servers_that_run_no_app_are_not_counted(self):
        by_key = {s.key: s for s in servers.THROUGHPUT_SERVERS}
        self.assertFalse(by_key["nginx"].runs_app)
        self.assertTrue(all(s.runs_app for k, s in by_key.items() if k != "nginx"))
        self.assertTrue(all(a.counts for a in throughput.APPS))
        for app in throughput.APPS:  # each app module increments the counter in its call
            text = (BENCH / "apps" / f"{app.target.split(':')[0]}.py").read_text()
            self.assertIn("calls.slot[0] += 1", text, app.key)


class Nginx(unittest.TestCase):
    def test_config_stays_in_scratch_and_on_the_host(self):
        prefix = Path("/tmp/scratch/nginx-8080")
        conf = servers.nginx_conf(4, "127.0.0.1", 8080, prefix, frozenset({"uwsgi", "scgi"}))
        for line in ("daemon off;", "worker_processes 4;", "access_log off;",
                     "listen 127.0.0.1:8080;", 'return 200 "Hello, World!";',
                     "default_type text/plain;"):  # fmt: skip
            self.assertIn(line, conf)
        paths = re.findall(r"\s(/\S+);", conf)
        self.assertGreaterEqual(len(paths), 4)
        self.assertTrue(all(p.startswith(f"{prefix}/") for p in paths), paths)
        self.assertIn("proxy_temp_path", conf)
        self.assertNotIn("uwsgi_temp_path", conf)  # a directive of a module left out is unknown
        self.assertEqual(servers.STATIC_BODY.encode(), throughput.APPS[0].expect)

    def test_modules_left_out(self):
        text = "configure arguments: --with-debug --without-http_uwsgi_module --without-http_scgi_module"
        self.assertEqual(environment.modules_left_out(text), {"uwsgi", "scgi"})


if __name__ == "__main__":
    unittest.main()
