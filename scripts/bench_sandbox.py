"""
Latency of one sandboxed `print(1)` through nanochat.execution.execute_code: bubblewrap beside the
fallback (setpriv + unshare -n + rlimits + Python guards), taken alternately, and a bare
`python -I -S -c pass` start as the floor both stand on. Medians of `runs` calls each.

    python -m scripts.bench_sandbox
    python -m scripts.bench_sandbox --runs=50 --code="import json; print(json.dumps([1]))"
"""
import os
import sys

if not __package__:  # run as a file: python scripts/bench_sandbox.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

runs = 20
code = "print(1)"

from nanochat.configurator import configure
config = configure(globals())

import statistics
import subprocess
import time

from nanochat import execution


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def sandboxed(bubblewrap):
    def call():
        r = execution.execute_code(code, bubblewrap=bubblewrap)
        assert r.success, r.error
    return call


def bare_python():
    subprocess.run([os.path.realpath(sys.executable), "-I", "-S", "-c", "pass"], check=True)


print(f"isolation: {execution.isolation()}; {os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.2f}")
peers = {"bare python -I -S": bare_python, "fallback": sandboxed(False)}
if execution.isolation() == "bubblewrap":
    peers["bubblewrap"] = sandboxed(True)
for fn in peers.values():  # warm up: the one-time probes, page cache
    fn()
times = {name: [] for name in peers}
for _ in range(runs):  # alternate, so a burst of load on the machine hits every peer alike
    for name, fn in peers.items():
        times[name].append(timed(fn))
median = {name: statistics.median(t) for name, t in times.items()}
print(f"{'':20s} {'median ms':>10s} {'p90 ms':>8s} {'vs fallback':>12s}")
for name, t in times.items():
    p90 = statistics.quantiles(t, n=10)[-1]
    print(f"{name:20s} {median[name]:10.1f} {p90:8.1f} {median[name] / median['fallback']:11.2f}x")
