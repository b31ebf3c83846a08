#!/usr/bin/env python3
"""Benchmark chatops-agent against the floor and its peers, in one run.

    python3 bench/bench_agent.py [--quick]

Prints one table and writes bench/results.json. Everything compared is
measured side by side in the same run; times are medians (and p95/p99) over
many repetitions because the machine is shared. It needs what the tests need
(requirements-test.txt); Docker rows need a running engine (the tests' image
is built if missing); peer rows need the peers' Debian packages, and the
side-by-side part the ChatOps Go agent's binary (GO_AGENT). Nothing here
ever fails on a number.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

import chatops_agent as agent  # noqa: E402
import test_chatops_agent as harness  # noqa: E402  (its fake API and helpers)

KEY = "bench-key-0123456789"
# The ChatOps project's own agent, built (see ../shared/peers/README.md): run
# beside this one in the same windows, when it is there.
GO_AGENT = os.environ.get("CHATOPS_BENCH_GO_AGENT") or os.path.join(
    os.path.dirname(REPO), "shared", "peers", "chatops-agent-go")
DAY_S = 86400
FLEET = 10_000  # agents, for the wire-cost line


###############################################################################
# Helpers #####################################################################
###############################################################################


def median(values):
    return statistics.median(values) if values else None


def percentile(values, p):
    ordered = sorted(values)
    return (
        ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] if values else None
    )


def descendants(pid):
    """Every live process below `pid` (the docker events reader, commands)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in os.listdir(f"/proc/{parent}/task"):
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:  # the task ended meanwhile
                continue
            found += kids
            todo += kids
    return found


def run_ns(pid):
    """CPU time of a live process's threads in ns, from schedstat: exact, where
    utime and stime count 10 ms ticks (3 ticks a minute at 0.05 % of a core)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            continue
    return total


def reaped_ns(pid):
    """CPU time of the children `pid` has waited for (cutime + cstime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) * 1e9 / os.sysconf("SC_CLK_TCK")


def process_tree_ns(pid):
    """CPU ns of a process, its live descendants and its reaped children."""
    return run_ns(pid) + reaped_ns(pid) + sum(run_ns(p) for p in descendants(pid)
                                              if os.path.exists(f"/proc/{p}"))


def smaps_mib(pid, field):
    """A field of /proc/PID/smaps_rollup (Pss_Anon, Rss, Pss), in MiB."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def rss_mib(pid, field="VmRSS"):
    return harness.rss_kib(pid, field) / 1024


def timed_cpu(function, repeat):
    """CPU time of each of `repeat` calls, in ms (this thread only)."""
    samples = []
    for _ in range(repeat):
        start = time.thread_time()
        function()
        samples.append((time.thread_time() - start) * 1000)
    return samples


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


###############################################################################
# 1. Cost of a metrics tick ###################################################
###############################################################################


def raw_floor():
    with open("/proc/stat") as f:
        f.read()
    with open("/proc/meminfo") as f:
        f.read()
    os.statvfs("/")
    with open("/proc/net/dev") as f:
        f.read()


def psutil_floor():
    import psutil

    psutil.cpu_times(percpu=True)
    psutil.virtual_memory()
    psutil.disk_usage("/")
    psutil.net_io_counters(pernic=True)


def tick_costs(ticks, containers):
    """Median and p95 CPU ms of a core tick, a full tick and the two floors."""
    source = agent.pick_source()
    core = agent.MetricsCollector(source, top_processes=0)
    core.prime()
    results = {
        "core": timed_cpu(core.collect, ticks),
        "raw floor": timed_cpu(raw_floor, ticks),
    }
    if importlib.util.find_spec("psutil"):
        results["psutil floor"] = timed_cpu(psutil_floor, ticks)
    full = agent.MetricsCollector(source, top_processes=None, containers=containers)
    full.prime()

    ticks_done = []

    def full_tick():
        # The process table is re-read every 15 s, the tick is every 5 s:
        # every third tick pays for it, as in a running agent.
        ticks_done.append(1)
        if len(ticks_done) % 3 == 0:
            full._procs_at = time.monotonic() - full.process_refresh_s  # due now
        full.collect()

    results["full"] = timed_cpu(full_tick, ticks)
    return {k: {"median_ms": median(v), "p95_ms": percentile(v, 95),
                "mean_ms": statistics.mean(v)} for k, v in results.items()}


SPOOL_CASES = ("healthy API", "API that does not acknowledge", "API away")


def spool_costs(hours, workdir):
    """An hour of samples at 5 s (720) through the sample queue and its
    spool, in three cases: an API that acknowledges each sample before the
    next, one that never acknowledges (a sample is delivered by the pong to
    the ping after it), and an API that is away (every sample is written).
    The bytes the spool writes (write() calls, compactions included, from
    /proc/self/io) and the CPU per sample."""
    sample = agent.MetricsCollector(agent.pick_source()).collect()
    result = {"sample_bytes": len(agent.to_json(sample))}
    for name in SPOOL_CASES:
        directory = os.path.join(workdir, "state-" + name.replace(" ", "-"))
        box = agent.SampleQueue(threading.Event(), 720, spool=agent.Spool(directory))
        box.open()
        if name != "API away":
            box.link_up(None)
        written, cpu = wchar(), time.process_time()
        for _ in range(720 * hours):
            box.add(sample)
            if name == "API away":
                continue
            while box.take() is not None:  # the sample, and a ping after it
                box.sent()
            if name == "healthy API":
                box.acknowledged()
            else:
                box.pong_received()  # to the ping after the sample: delivered
        cpu, written = time.process_time() - cpu, wchar() - written
        box.close()
        result[name] = {"cpu_us_per_sample": cpu / (720 * hours) * 1e6,
                        "bytes_written_per_hour": written / hours}
    return result


def wchar():
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar"))


###############################################################################
# Docker fixtures #############################################################
###############################################################################


class Containers:
    """Ten idle test containers (no network), removed afterwards."""

    def __init__(self, count=10):
        self.count = count
        self.names = []
        self.available = False

    def __enter__(self):
        try:
            self.available = harness.docker_ready()
        except Exception:
            self.available = False
        for i in range(self.count if self.available else 0):
            name = f"chatops-bench-{os.getpid()}-{i}"
            harness.docker("run", "-d", "--network", "none", "--name", name,
                           harness.TEST_IMAGE, "sleep", "3600")
            self.names.append(name)
        return self

    def __exit__(self, *exc):
        if self.names:
            harness.docker("rm", "-f", *self.names, check=False)


def counting_docker(directory):
    calls = os.path.join(directory, "docker-calls")
    shim = os.path.join(directory, "docker")
    with open(shim, "w") as f:
        f.write(f'#!/bin/sh\necho "$1" >> {calls}\nexec docker "$@"\n')
    os.chmod(shim, 0o755)
    open(calls, "w").close()
    return shim, calls


###############################################################################
# 2, 3, 6, 7. The agent connected to a local API ##############################
###############################################################################


AGENT_PYTHON = [sys.executable]  # --agent-python may name another interpreter


def start_agent(api, *args, env=None, url=None):
    cmd = [AGENT_PYTHON[0], os.path.join(REPO, "chatops_agent.py"), "--api-url",
           url or api.url, *args]
    environ = harness.clean_env(CHATOPS_API_KEY=KEY, **(env or {}))
    return subprocess.Popen(cmd, env=environ, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def frame_sizes(api):
    return [len(agent.to_json(m)) for m in api.messages("metrics")]


FLOOR_SCRIPT = """
import ssl, websocket
ssl.create_default_context()
with open("/proc/self/smaps_rollup") as f:
    print(f.read())
"""


def frame_parts(data):
    """Bytes of a frame's process list, container list and the rest."""
    def size(value):
        return len(agent.to_json(value))
    lists = {k: size(data[k]) for k in ("processes", "containers")}
    return dict(lists, rest=size({"type": "metrics", "data": data}) - sum(lists.values()))


def floor_memory(runs=3):
    """Pss_Anon and RSS of the floor: the agent's interpreter importing ssl and
    websocket-client and loading the default CA store, and nothing else (MiB,
    median of `runs`)."""
    anon, rss = [], []
    for _ in range(runs):
        out = subprocess.run([AGENT_PYTHON[0], "-c", FLOOR_SCRIPT], capture_output=True,
                             text=True, check=True).stdout
        fields = {line.split(":")[0]: int(line.split()[1]) / 1024
                  for line in out.splitlines() if line.endswith(" kB")}
        anon.append(fields["Pss_Anon"])
        rss.append(fields["Rss"])
    return {"pss_anon_mib": median(anon), "rss_mib": median(rss)}


def memory_of(pid):
    """The agent's memory and its standing children's, at this moment (MiB)."""
    kids = [p for p in descendants(pid) if os.path.exists(f"/proc/{p}")]
    return {
        "pss_anon_mib": smaps_mib(pid, "Pss_Anon"),
        "rss_mib": smaps_mib(pid, "Rss"),
        "peak_rss_mib": rss_mib(pid, "VmHWM"),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
        "children": [open(f"/proc/{p}/comm").read().strip() for p in kids],
        "children_pss_anon_mib": sum(smaps_mib(p, "Pss_Anon") for p in kids),
        "children_rss_mib": sum(smaps_mib(p, "Rss") for p in kids),
    }


def idle_cpu_percent(pid, windows, window_s):
    """CPU % of one core of the agent's process tree over each window."""
    percents = []
    for _ in range(windows):
        cpu0, t0 = process_tree_ns(pid), time.monotonic()
        time.sleep(window_s)  # the window being measured, not a wait for an event
        cpu1, t1 = process_tree_ns(pid), time.monotonic()
        percents.append(100 * (cpu1 - cpu0) / 1e9 / (t1 - t0))
    return percents


def idle_run(windows, window_s, containers, workdir):
    """The agent at the default 5 s interval, every process listed, the
    containers, against an API configured as the ChatOps API's uvicorn (so
    compression's state and CPU are counted): CPU % of one core (median of
    the windows), memory at steady state, bytes per frame, docker CLI calls."""
    api = harness.FakeAPI(key=KEY, deflate="uvicorn").start()
    shim, calls = counting_docker(workdir)
    args = (
        ["--docker-binary", shim]
        if containers.available
        else ["--docker-enabled", "false"]
    )
    started = time.monotonic()
    proc = start_agent(api, *args)
    try:
        harness.wait_until(api.metrics, 10, "the first metrics frame")
        first_frame_s = time.monotonic() - started
        harness.wait_until(lambda: len(api.metrics()) >= 2, 15, "a second frame")
        t0 = time.monotonic()
        with open(calls) as f:
            calls0 = len(f.read().split())
        percents = idle_cpu_percent(proc.pid, windows, window_s)
        with open(calls) as f:
            calls1 = len(f.read().split())
        t1 = time.monotonic()
        sizes = frame_sizes(api)
        last = api.metrics()[-1]
        result = {
            "first_frame_s": first_frame_s,
            "cpu_percent": median(percents),
            "cpu_percent_windows": percents,
            "memory": memory_of(proc.pid),
            "frame_bytes": median(sizes),
            "frames": len(sizes),
            "frame_parts": frame_parts(last),
            "containers_in_frame": len(last["containers"]),
            "processes_in_frame": len(last["processes"]),
            "docker_calls_per_min": (calls1 - calls0) * 60 / (t1 - t0)
            if containers.available else None,
        }
    finally:
        stop(proc)
        api.stop()
    return result


class CountingRelay:
    """A TCP relay on 127.0.0.1 to an API's port that counts the bytes the
    agent sends: the frames as they are on the wire, headers included."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.sent = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                up = socket.create_connection(("127.0.0.1", self.upstream))
                threading.Thread(target=self._pump, args=(conn, up, True),
                                 daemon=True).start()
                threading.Thread(target=self._pump, args=(up, conn, False),
                                 daemon=True).start()

    def _pump(self, source, sink, counted):
        with contextlib.suppress(OSError):
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if counted:
                    self.sent += len(data)
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self):
        self.listener.close()


WIRE_CASES = (  # name, the API's permessage-deflate, the agent's flags
    ("compressed, API as uvicorn", "uvicorn", ()),
    ("compressed, websockets' capped default", "capped", ()),
    ("uncompressed", "uvicorn", ("--compression", "false")),
)


def wire_bytes(window_s, interval_s):
    """Bytes the agent sends per metrics frame at steady state, every process
    listed, compressed and not, side by side: three agents at once, each
    through a counting relay to its own API, over the same `window_s`. And
    the CPU the agent's compressor spends per frame, on those frames."""
    runs = []
    try:
        for name, deflate, flags in WIRE_CASES:
            api = harness.FakeAPI(key=KEY, deflate=deflate).start()
            relay = CountingRelay(api.port)
            runs.append((name, api, relay, None))
            proc = start_agent(api, "--metrics-interval-s", str(interval_s),
                               "--docker-enabled", "false", *flags, url=relay.url)
            runs[-1] = (name, api, relay, proc)
        for _, api, _, _ in runs:  # steady state: past the first frames
            harness.wait_until(lambda api=api: len(api.metrics()) >= 3,
                               10 + 4 * interval_s, "three frames")
        before = [(relay.sent, len(api.metrics())) for _, api, relay, _ in runs]
        time.sleep(window_s)  # the window being measured, not a wait for an event
        result = {}
        for (name, api, relay, _), (sent, frames) in zip(runs, before):
            count = len(api.metrics()) - frames
            last = api.metrics()[-1]
            result[name] = {"frame_bytes": (relay.sent - sent) / max(1, count),
                            "frames": count,
                            "processes": len(last["processes"])}
        result["deflate_us_per_frame"] = deflate_cpu_us(runs[0][1])
        return result
    finally:
        for _, api, relay, proc in runs:
            if proc is not None:
                stop(proc)
            api.stop()
            relay.close()


def deflate_cpu_us(api):
    """Median CPU us the agent's compressor (context kept, window as the
    uvicorn-like API agreed) spends on each of the frames `api` received."""
    frames = [agent.to_json(m) for m in api.messages("metrics")]
    deflate = agent.Deflate({})
    costs = []
    for frame in frames:
        start = time.process_time_ns()
        deflate.compress(frame)
        costs.append((time.process_time_ns() - start) / 1000)
    return median(costs[1:] or costs)


def once_wall_s(runs):
    times = []
    for _ in range(runs):
        start = time.monotonic()
        subprocess.run([sys.executable, os.path.join(REPO, "chatops_agent.py"), "--once",
                        "--docker-enabled", "false"], capture_output=True, check=True,
                       env=harness.clean_env())
        times.append(time.monotonic() - start)
    return median(times)


###############################################################################
# 4, 5. Commands ##############################################################
###############################################################################


def command_round_trips(count, throughput_count):
    api = harness.FakeAPI(key=KEY, deflate="uvicorn").start()
    proc = start_agent(api, "--docker-enabled", "false")
    try:
        harness.wait_until(api.metrics, 10, "the agent")
        commander = harness.Commander(api, proc)
        trips, bare = [], []
        for _ in range(count):  # interleaved, so that both see the same machine
            start = time.monotonic()
            commander.run("true")
            trips.append((time.monotonic() - start) * 1000)
            start = time.monotonic()
            subprocess.run(["sh", "-c", "true"], check=True)
            bare.append((time.monotonic() - start) * 1000)
        start = time.monotonic()
        ids = [commander.send("true") for _ in range(min(throughput_count, 60))]
        for request_id in ids:
            commander.reply(request_id, 60)
        throughput = len(ids) / (time.monotonic() - start)
        before = harness.rss_kib(proc.pid) / 1024
        start = time.monotonic()
        reply = commander.run("yes 0123456789abcdef | head -c 200000000", timeout_s=120)
        large = {
            "seconds": time.monotonic() - start,
            "reply_bytes": len(agent.to_json(reply)),
            "peak_rss_growth_mib": harness.rss_kib(proc.pid, "VmHWM") / 1024 - before,
        }
    finally:
        stop(proc)
        api.stop()
    return {
        "p50_ms": median(trips), "p99_ms": percentile(trips, 99),
        "bare_sh_p50_ms": median(bare), "bare_sh_p99_ms": percentile(bare, 99),
        "over_bare_p50_ms": median(trips) - median(bare),
        "over_bare_p99_ms": percentile(trips, 99) - percentile(bare, 99),
        "per_second": throughput, "large_output": large,
    }


def docker_round_trips(containers, count):
    """Docker requests through the WebSocket, ms: inspect, list, a stop (timeout
    0) plus start of one container, and inspect while every command worker is
    taken by a long command (the lanes: it must not wait for them)."""
    if not containers.available:
        return None
    api = harness.FakeAPI(key=KEY).start()
    proc = start_agent(api, "--command-grace-s", "0")
    commander = harness.Commander(api, proc)
    name = containers.names[0]

    def ask(kind, **fields):
        commander.count += 1
        request_id = f"d-{commander.count}"
        start = time.monotonic()
        harness.send(api, kind, request_id, container_id=name, **fields)
        commander.reply(request_id, 60)
        return (time.monotonic() - start) * 1000

    try:
        harness.wait_until(api.metrics, 10, "the agent")
        inspect = [ask("inspect_container") for _ in range(count)]
        listing = [ask("list_containers") for _ in range(count)]
        cycle = [ask("stop_container", timeout=0) + ask("start_container")
                 for _ in range(max(3, count // 5))]
        marker = f"12.{os.getpid()}"
        sleepers = [commander.send(f"sleep {marker}") for _ in range(4)]
        harness.wait_until(lambda: len(harness.group_members(marker)) >= 4, 10,
                           "four commands to run")
        behind = [ask("inspect_container") for _ in range(max(3, count // 5))]
        for request_id in sleepers:
            commander.cancel(request_id)
    finally:
        stop(proc)
        api.stop()
    return {
        "inspect_p50_ms": median(inspect), "list_p50_ms": median(listing),
        "stop_start_p50_ms": median(cycle),
        "inspect_behind_commands_p50_ms": median(behind),
        "inspect_behind_commands_max_ms": max(behind),
    }


class Churn:
    """Container events at a steady rate, made by hand as an operator or a CI
    runner would: each cycle runs a short `docker run --rm` job (create,
    attach, start, die, destroy), pauses and unpauses one container, and
    restarts another (kill, die, stop, start, restart): 12 events, one cycle
    every `cycle_s`. Counted by the engine's own `docker events`, all
    container events (not only those the agent asks for)."""

    def __init__(self, containers, cycle_s):
        self.paused, self.restarted = containers.names[1], containers.names[2]
        self.cycle_s = cycle_s
        self.on = threading.Event()  # set: make events
        self.idle = threading.Event()  # set: no step under way
        self.done = threading.Event()
        self.events = []

    def __enter__(self):
        self.watch = subprocess.Popen(
            ["docker", "events", "--filter", "type=container", "--format",
             "{{.Action}}"], stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._count, daemon=True).start()
        self.maker = threading.Thread(target=self._make, daemon=True)
        self.maker.start()
        return self

    def _count(self):
        for line in self.watch.stdout:
            self.events.append((time.monotonic(), line.strip()))

    def _make(self):
        steps = [("run", "--rm", "--network", "none", harness.TEST_IMAGE, "sh", "-c",
                  "true"),
                 ("pause", self.paused), ("unpause", self.paused),
                 ("restart", "--time", "0", self.restarted)]
        while not self.done.is_set():
            for step in steps:
                if not self.on.is_set():
                    self.idle.set()
                    self.on.wait()
                    self.idle.clear()
                started = time.monotonic()
                harness.docker(*step, check=False)
                # paced: the cycle's events spread over it, as a steady rate
                self.done.wait(max(0, self.cycle_s / len(steps)
                                   - (time.monotonic() - started)))

    def rate_per_min(self, t0, t1):
        return sum(t0 <= t for t, _ in self.events if t <= t1) * 60 / (t1 - t0)

    def __exit__(self, *exc):
        self.done.set()
        self.on.set()
        self.maker.join(60)
        self.watch.terminate()
        self.watch.wait(10)


def churn_cpu(containers, windows, window_s, workdir):
    """The agent's CPU, children included, in windows with container events
    about 60 a minute, and in quiet windows between them, in one agent
    process: % of one core (medians), events a minute, docker CLI calls a
    minute."""
    if not containers.available:
        return None
    api = harness.FakeAPI(key=KEY, deflate="uvicorn").start()
    shim, calls = counting_docker(workdir)
    proc = start_agent(api, "--docker-binary", shim)
    figures = {"quiet": [], "churn": [], "events_per_min": [], "calls_per_min": []}
    try:
        harness.wait_until(lambda: len(api.metrics()) >= 2, 15, "two frames")
        with Churn(containers, cycle_s=12.0) as churn:
            for _ in range(windows):
                figures["quiet"] += idle_cpu_percent(proc.pid, 1, window_s)
                churn.on.set()
                with open(calls) as f:
                    calls0 = len(f.read().split())
                t0 = time.monotonic()
                figures["churn"] += idle_cpu_percent(proc.pid, 1, window_s)
                t1 = time.monotonic()
                with open(calls) as f:
                    calls1 = len(f.read().split())
                churn.on.clear()
                churn.idle.wait(60)  # the quiet window starts after the last step
                figures["events_per_min"].append(churn.rate_per_min(t0, t1))
                figures["calls_per_min"].append((calls1 - calls0) * 60 / (t1 - t0))
    finally:
        stop(proc)
        api.stop()
    return {"quiet_cpu_percent": median(figures["quiet"]),
            "churn_cpu_percent": median(figures["churn"]),
            "events_per_min": median(figures["events_per_min"]),
            "docker_calls_per_min": median(figures["calls_per_min"]),
            "windows": figures}


###############################################################################
# Peers #######################################################################
###############################################################################


def measure_peer(argv, window_s, scrape_url=None):
    """CPU % and RSS of a peer collector, scraped every 5 s when it is an exporter."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        time.sleep(2)  # its start-up, kept out of the idle window
        if proc.poll() is not None:
            return {"error": f"exited with {proc.returncode}"}
        cpu0, t0 = process_tree_ns(proc.pid) / 1e9, time.monotonic()
        deadline = t0 + window_s
        while time.monotonic() < deadline:
            if scrape_url:
                import urllib.request

                urllib.request.urlopen(scrape_url, timeout=5).read()
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        cpu1, t1 = process_tree_ns(proc.pid) / 1e9, time.monotonic()
        return {"cpu_percent": 100 * (cpu1 - cpu0) / (t1 - t0), "rss_mib": rss_mib(proc.pid),
                "peak_rss_mib": rss_mib(proc.pid, "VmHWM")}
    finally:
        stop(proc)


def tree_memory_mib(pid):
    """Pss_Anon of a process and of its standing children, its RSS and PSS."""
    kids = [p for p in descendants(pid) if os.path.exists(f"/proc/{p}")]
    own = smaps_mib(pid, "Pss_Anon")
    return {"pss_anon_mib": own,
            "pss_anon_with_children_mib": own + sum(smaps_mib(p, "Pss_Anon") for p in kids),
            "rss_mib": smaps_mib(pid, "Rss"), "pss_mib": smaps_mib(pid, "Pss")}


def side_by_side(windows, window_s, batches, containers):
    """This agent and the ChatOps Go agent, started together, each against a
    test API of its own (as the ChatOps API's uvicorn), measured over the same
    windows: CPU % of one core with children, memory, the first metrics frame
    after start, bytes per listed process, and `true` round trips with a bare
    `sh -c true` between. The Go agent can panic when a reply and a metrics
    send coincide, so the round trips of both are taken in batches just after
    a metrics frame. None without the Go agent."""
    if not os.access(GO_AGENT, os.X_OK):
        return None
    docker = [] if containers.available else ["--docker-enabled", "false"]
    apis = {name: harness.FakeAPI(key=KEY, deflate="uvicorn").start()
            for name in ("this", "go")}
    started = time.monotonic()
    procs = {"this": start_agent(apis["this"], *docker),
             "go": subprocess.Popen(
                 [GO_AGENT, "-api-key", KEY, "-api-url", apis["go"].url],
                 env=harness.clean_env(), stdin=subprocess.DEVNULL,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)}
    try:
        first = {}
        while len(first) < 2:
            harness.wait_until(lambda: any(apis[n].metrics() for n in apis if n not in first),
                               15, "a first metrics frame from each agent")
            for name in apis:
                if name not in first and apis[name].metrics():
                    first[name] = time.monotonic() - started
        for name in apis:
            harness.wait_until(lambda n=name: len(apis[n].metrics()) >= 2, 15, "a second")
        cpu = {name: [] for name in apis}
        for _ in range(windows):  # the same windows for both
            t0, ns0 = time.monotonic(), {n: process_tree_ns(p.pid) for n, p in procs.items()}
            time.sleep(window_s)  # the window being measured, not a wait for an event
            t1, ns1 = time.monotonic(), {n: process_tree_ns(p.pid) for n, p in procs.items()}
            for name in apis:
                cpu[name].append(100 * (ns1[name] - ns0[name]) / 1e9 / (t1 - t0))
        memory = {name: tree_memory_mib(proc.pid) for name, proc in procs.items()}
        trips = round_trips_between_samples(apis, procs, batches)
        results = {}
        for name, api in apis.items():
            last = api.metrics()[-1]
            sizes = [len(agent.to_json(m)) for m in api.messages("metrics")]
            results[name] = {
                "first_frame_s": first[name], "cpu_percent": median(cpu[name]),
                "cpu_percent_windows": cpu[name], "memory": memory[name],
                "bytes_per_process": median(sizes) / max(1, len(last["processes"])),
                "processes_in_frame": len(last["processes"]), **trips[name],
                "alive": procs[name].poll() is None}
    finally:
        for proc in procs.values():
            stop(proc)
        for api in apis.values():
            api.stop()
    go, this = results["go"], results["this"]
    results["go_over_this"] = {
        "cpu": go["cpu_percent"] / this["cpu_percent"],
        "pss_anon": go["memory"]["pss_anon_mib"] / this["memory"]["pss_anon_mib"],
        "pss_anon_with_children": go["memory"]["pss_anon_with_children_mib"]
        / this["memory"]["pss_anon_with_children_mib"],
        "rss": go["memory"]["rss_mib"] / this["memory"]["rss_mib"],
        "p50": go["p50_ms"] / this["p50_ms"], "p99": go["p99_ms"] / this["p99_ms"],
        "first_frame": go["first_frame_s"] / this["first_frame_s"],
        "bytes_per_process": go["bytes_per_process"] / this["bytes_per_process"]}
    results["windows"], results["window_s"] = windows, window_s
    results["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return results


def round_trips_between_samples(apis, procs, batches, per_batch=20):
    """`true` round trips (ms) of each agent and of a bare `sh -c true`, taken
    in turn in batches, each batch just after the Go agent's next sample."""
    commanders = {n: harness.Commander(apis[n], procs[n]) for n in apis}
    trips = {n: [] for n in apis}
    bare = []
    for _ in range(batches):
        seen = len(apis["go"].metrics())
        harness.wait_until(lambda s=seen: len(apis["go"].metrics()) > s, 15,
                           "the Go agent's next sample")
        for _ in range(per_batch):
            for name, commander in commanders.items():
                start = time.monotonic()
                commander.run("true")
                trips[name].append((time.monotonic() - start) * 1000)
            start = time.monotonic()
            subprocess.run(["sh", "-c", "true"], check=True)
            bare.append((time.monotonic() - start) * 1000)
    return {n: {"p50_ms": median(t), "p99_ms": percentile(t, 99),
                "bare_sh_p50_ms": median(bare), "bare_sh_p99_ms": percentile(bare, 99),
                "trips": len(t)} for n, t in trips.items()}


def peers(window_s, workdir):
    results = {}
    exporter = shutil.which("prometheus-node-exporter")
    if exporter:
        port = free_port()
        results["prometheus-node-exporter (scraped every 5 s)"] = measure_peer(
            [exporter, f"--web.listen-address=127.0.0.1:{port}"], window_s,
            scrape_url=f"http://127.0.0.1:{port}/metrics")
    else:
        results["prometheus-node-exporter (scraped every 5 s)"] = None
    collectd = shutil.which("collectd")
    if collectd:
        conf = os.path.join(workdir, "collectd.conf")
        with open(conf, "w") as f:
            f.write(f'Interval 5\nBaseDir "{workdir}"\nPIDFile "{workdir}/collectd.pid"\n'
                    'LoadPlugin cpu\nLoadPlugin memory\nLoadPlugin df\nLoadPlugin interface\n'
                    f'LoadPlugin load\nLoadPlugin csv\n<Plugin csv>\n  DataDir "{workdir}/csv"\n'
                    "</Plugin>\n")
        results["collectd (cpu, memory, df, interface, load at 5 s)"] = measure_peer(
            [collectd, "-f", "-C", conf], window_s)
    else:
        results["collectd (cpu, memory, df, interface, load at 5 s)"] = None
    glances = shutil.which("glances")
    if glances:
        results["glances (at 5 s)"] = measure_peer(
            [glances, "-t", "5", "--stdout", "cpu.total,mem.percent,load,fs,network"],
            window_s)
    else:
        results["glances (at 5 s)"] = None
    return results


###############################################################################
# Report ######################################################################
###############################################################################

TARGETS = {
    "core tick CPU": "<= 2 x the psutil floor",
    "full tick CPU, amortised": "<= 3 ms",
    "idle CPU at 5 s": "<= 0.05 % of one core",
    "agent's own memory": "<= 3 MiB over floor",
    "agent + standing children": "<= 20 MiB",
    "first metrics frame after start": "<= 1 s",
    "command round trip over bare sh -c": "<= 1 ms p50, 3 p99",
    "200 MB output, peak RSS growth": "<= 10 MB",
    "metrics frame": "<= 100 B per process",
    "metrics frame on the wire": "<= 15 B per process",
    "docker CLI spawns at rest": "0 per minute",
    "docker request round trip": "inspect < 2 s behind commands",
    "CPU with 60 container events/min": "<= 0.1 % of one core",
    "spool": "0 B an hour, healthy API",
}


def verdict(ok):
    return "n/a" if ok is None else ("met" if ok else "MISSED")


def rows(r):
    ticks, idle, cmds = r["ticks"], r["idle"], r["commands"]
    floor = ticks.get("psutil floor", {}).get("median_ms")
    ratio = ticks["core"]["median_ms"] / floor if floor else None
    docker_calls = idle["docker_calls_per_min"]
    parts = idle["frame_parts"]
    mib = 1024 * 1024
    return [
        ("core tick CPU", f"{ticks['core']['median_ms']:.3f} ms (p95 {ticks['core']['p95_ms']:.3f});"
         f" raw floor {ticks['raw floor']['median_ms']:.3f}, psutil floor "
         + (f"{floor:.3f} ms; ratio {ratio:.2f}" if floor else "n/a"), ratio is not None and ratio <= 2),
        ("full tick CPU, amortised", f"{ticks['full']['mean_ms']:.3f} ms mean over ticks "
         f"(median {ticks['full']['median_ms']:.3f}, p95 {ticks['full']['p95_ms']:.3f} when "
         f"the process table is read; every process, {r['containers']} containers)",
         ticks["full"]["mean_ms"] <= 3),
        idle_cpu_row(idle, r["window_s"]),
        *memory_rows(idle["memory"], r["floor"]),
        ("first metrics frame after start", f"{idle['first_frame_s']:.2f} s; --once "
         f"{r['once_s']:.2f} s", idle["first_frame_s"] <= 1),
        ("command round trip over bare sh -c", f"`true`: p50 {cmds['p50_ms']:.2f} ms, p99 "
         f"{cmds['p99_ms']:.2f} ms; bare sh -c true p50 {cmds['bare_sh_p50_ms']:.2f}, p99 "
         f"{cmds['bare_sh_p99_ms']:.2f} ms; over bare: p50 {cmds['over_bare_p50_ms']:.2f} ms, "
         f"p99 {cmds['over_bare_p99_ms']:.2f} ms; {cmds['per_second']:.0f} commands/s",
         cmds["over_bare_p50_ms"] <= 1 and cmds["over_bare_p99_ms"] <= 3),
        ("200 MB output, peak RSS growth", f"{cmds['large_output']['peak_rss_growth_mib']:.1f} MiB;"
         f" reply {cmds['large_output']['reply_bytes'] / mib:.2f} MiB in "
         f"{cmds['large_output']['seconds']:.2f} s",
         cmds["large_output"]["peak_rss_growth_mib"] * mib <= 10e6),
        ("metrics frame", f"{idle['frame_bytes']:.0f} B median ({idle['processes_in_frame']} "
         f"processes, {idle['containers_in_frame']} containers; "
         f"{idle['frame_bytes'] / max(1, idle['processes_in_frame']):.0f} B a process); "
         f"last frame: processes {parts['processes']} B "
         f"({parts['processes'] / max(1, idle['processes_in_frame']):.0f} B each), "
         f"containers {parts['containers']} B, the rest {parts['rest']} B; "
         f"{idle['frame_bytes'] * DAY_S / 5 / 1e6:.1f} MB per agent per day; "
         f"{FLEET} agents: {idle['frame_bytes'] * FLEET / 5 * 8 / 1e6:.1f} Mbit/s into the API",
         idle["frame_bytes"] <= 100 * max(1, idle["processes_in_frame"])),
        wire_row(r["wire"]),
        ("docker CLI spawns at rest", "n/a (no Docker engine)" if docker_calls is None else
         f"{docker_calls:.2f} per minute", None if docker_calls is None else docker_calls == 0),
        docker_row(r.get("docker")),
        churn_row(r.get("churn"), r["window_s"]),
        spool_row(r["spool"]),
    ]


def wire_row(w):
    """Compressed (as the ChatOps API agrees) against the goal, with the
    capped server's and the uncompressed figures beside it, from one run."""
    def figures(name):
        c = w[name]
        per_process = c["frame_bytes"] / max(1, c["processes"])
        day = c["frame_bytes"] * DAY_S / 5 / 1e6
        return (f"{name}: {c['frame_bytes']:.0f} B a frame, {per_process:.1f} B a "
                f"process, {day:.1f} MB a day", per_process)
    texts = [figures(name) for name, _, _ in WIRE_CASES]
    return ("metrics frame on the wire", "; ".join(t for t, _ in texts)
            + f" ({w[WIRE_CASES[0][0]]['processes']} processes, no containers; a "
            f"day at 5 s); compressing costs {w['deflate_us_per_frame']:.0f} us a "
            "frame", texts[0][1] <= 15)


def idle_cpu_row(idle, window_s):
    windows = idle["cpu_percent_windows"]
    return ("idle CPU at 5 s", f"{idle['cpu_percent']:.3f} % of one core, median of "
            f"{len(windows)} windows of {window_s} s (from {min(windows):.3f} to "
            f"{max(windows):.3f}); threads' run time from schedstat, children included",
            idle["cpu_percent"] <= 0.05)


def memory_rows(m, floor):
    own = m["pss_anon_mib"] - floor["pss_anon_mib"]
    total = m["pss_anon_mib"] + m["children_pss_anon_mib"]
    children = ", ".join(m["children"]) or "none"
    return [
        ("agent's own memory", f"{own:.1f} MiB: Pss_Anon {m['pss_anon_mib']:.1f} MiB, "
         f"floor {floor['pss_anon_mib']:.1f} (python + ssl + websocket-client + CA "
         f"store); RSS {m['rss_mib']:.1f} MiB (floor {floor['rss_mib']:.1f}, peak "
         f"{m['peak_rss_mib']:.1f}); {m['threads']} threads", own <= 3),
        ("agent + standing children", f"{total:.1f} MiB Pss_Anon, of which children "
         f"{m['children_pss_anon_mib']:.1f} ({children}; their RSS "
         f"{m['children_rss_mib']:.1f} MiB)", total <= 20),
    ]


def docker_row(d):
    figure = "docker request round trip"
    if d is None:
        return figure, "n/a (no Docker engine)", None
    return (figure, f"inspect p50 {d['inspect_p50_ms']:.0f} ms, list {d['list_p50_ms']:.0f} "
            f"ms, stop+start {d['stop_start_p50_ms']:.0f} ms; inspect while 4 commands "
            f"run: p50 {d['inspect_behind_commands_p50_ms']:.0f} ms, max "
            f"{d['inspect_behind_commands_max_ms']:.0f} ms",
            d["inspect_behind_commands_max_ms"] < 2000)


def churn_row(c, window_s):
    figure = "CPU with 60 container events/min"
    if c is None:
        return figure, "n/a (no Docker engine)", None
    windows = len(c["windows"]["churn"])
    calls = c["docker_calls_per_min"]
    return (figure, f"{c['churn_cpu_percent']:.3f} % of one core, children included "
            f"({c['events_per_min']:.0f} events a minute, {calls:.1f} docker CLI "
            f"calls a minute); quiet in the same run "
            f"{c['quiet_cpu_percent']:.3f} %; medians of {windows} windows of "
            f"{window_s} s each", c["churn_cpu_percent"] <= 0.1)


def spool_row(d):
    cases = "; ".join(
        f"{name}: {d[name]['bytes_written_per_hour'] / 1e6:.2f} MB an hour, "
        f"{d[name]['cpu_us_per_sample']:.0f} us a sample" for name in SPOOL_CASES)
    return ("spool", f"{cases} (at 5 s, {d['sample_bytes']} B samples)",
            d["healthy API"]["bytes_written_per_hour"] == 0)


def print_table(results):
    print(f"agent run by {results['agent_python']}; {results['machine']}")
    print(f"{'figure':36} {'target':24} {'verdict':8} measured")
    for figure, measured, ok in rows(results):
        print(f"{figure:36} {TARGETS[figure]:24} {verdict(ok):8} {measured}")
    print()
    agent_idle = results["idle"]
    print(f"{'peer':52} {'CPU % of a core':>16} {'RSS MiB':>8} {'peak MiB':>9}")
    print(f"{'chatops-agent (this run)':52} {agent_idle['cpu_percent']:16.3f} "
          f"{agent_idle['memory']['rss_mib']:8.1f} {agent_idle['memory']['peak_rss_mib']:9.1f}")
    for name, figures in results["peers"].items():
        if figures is None:
            print(f"{name:52} not installed")
        elif "error" in figures:
            print(f"{name:52} {figures['error']}")
        else:
            print(f"{name:52} {figures['cpu_percent']:16.3f} {figures['rss_mib']:8.1f} "
                  f"{figures['peak_rss_mib']:9.1f}")
    print_side_by_side(results.get("side_by_side"))


def print_side_by_side(r):
    if r is None:
        print(f"\nthe ChatOps Go agent: not found at {GO_AGENT}")
        return
    go, this, ratio = r["go"], r["this"], r["go_over_this"]
    print(f"\nbeside the ChatOps Go agent, same run ({r['date']}), "
          f"{r['windows']} windows of {r['window_s']} s:")
    print(f"{'figure':44} {'this agent':>12} {'Go agent':>12} {'Go / this':>10}")
    lines = [
        ("CPU, % of one core, with children", "cpu_percent", None, "cpu", "{:.3f}"),
        ("Pss_Anon of the agent, MiB", "memory", "pss_anon_mib", "pss_anon", "{:.1f}"),
        ("Pss_Anon with standing children, MiB", "memory", "pss_anon_with_children_mib",
         "pss_anon_with_children", "{:.1f}"),
        ("RSS of the agent, MiB", "memory", "rss_mib", "rss", "{:.1f}"),
        ("`true` round trip p50, ms", "p50_ms", None, "p50", "{:.2f}"),
        ("`true` round trip p99, ms", "p99_ms", None, "p99", "{:.2f}"),
        ("first metrics frame after start, s", "first_frame_s", None, "first_frame",
         "{:.2f}"),
        ("bytes per listed process in a frame", "bytes_per_process", None,
         "bytes_per_process", "{:.0f}"),
    ]
    for label, key, sub, ratio_key, form in lines:
        a, b = this[key], go[key]
        if sub:
            a, b = a[sub], b[sub]
        print(f"{label:44} {form.format(a):>12} {form.format(b):>12} "
              f"{ratio[ratio_key]:10.2f}")
    print(f"{'bare sh -c true in the same batches, p50 / p99, ms':44} "
          f"{this['bare_sh_p50_ms']:.2f} / {this['bare_sh_p99_ms']:.2f}")
    if not go["alive"]:
        print("the Go agent had exited by the end of the run")


def machine():
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f
                      if line.startswith("model name")), platform.machine())
    websocket = agent.load_websocket()
    return {"cores": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "psutil": psutil_version(),
            "websocket-client": websocket.__version__,
            "kernel": platform.release()}


def psutil_version():
    try:
        import psutil
    except ImportError:
        return "not installed"
    return psutil.__version__


def agent_python_version(python):
    out = subprocess.run(
        [
            python,
            "-c",
            "import platform, sys; print(sys.executable, platform.python_version())",
        ],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short windows (CI)")
    parser.add_argument("--agent-python", default=sys.executable,
                        help="the interpreter that runs the agent under test (it needs "
                             "websocket-client; e.g. the installer's venv)")
    parser.add_argument("--only", type=lambda text: text.split(","),
                        help="comma-separated parts to run, e.g. floor,idle (prints "
                             "their figures as JSON; results.json is left alone)")
    args = parser.parse_args()
    # Stopped by SIGTERM, as by Ctrl-C: an exit, so that each part's finally
    # stops the agents, APIs and containers it started (they outlived it).
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    AGENT_PYTHON[0] = args.agent_python
    # Idle windows are whole multiples of the 15 s process-table refresh, so
    # that each holds as many refreshes: the median of several is then stable.
    # --quick (CI) only proves the bench still runs: its windows are shorter.
    window = 10 if args.quick else 30
    results = {"machine": machine(), "quick": args.quick, "window_s": window,
               "agent_python": agent_python_version(args.agent_python)}
    with tempfile.TemporaryDirectory() as workdir, Containers() as containers:
        cache = None
        if containers.available:
            cli = agent.DockerCLI(agent.load_config({}, {}), agent.Children())
            cache = agent.ContainerCache(agent.load_config({}, {}), cli)
            cache.read_once()
        results["containers"] = len(containers.names)
        parts = {
            "floor": lambda: floor_memory(),
            "idle": lambda: idle_run(2 if args.quick else 6, window, containers, workdir),
            "commands": lambda: command_round_trips(50 if args.quick else 300,
                                                    30 if args.quick else 60),
            "spool": lambda: spool_costs(1 if args.quick else 4, workdir),
            "ticks": lambda: tick_costs(200 if args.quick else 1000,
                                        cache.snapshot if cache else None),
            "once_s": lambda: once_wall_s(3 if args.quick else 10),
            "wire": lambda: wire_bytes(15 if args.quick else 300,
                                       1 if args.quick else 5),
            "docker": lambda: docker_round_trips(containers, 10 if args.quick else 30),
            "churn": lambda: churn_cpu(containers, 1 if args.quick else 4, window,
                                       workdir),
            "peers": lambda: peers(20 if args.quick else 60, workdir),
            "side_by_side": lambda: side_by_side(2 if args.quick else 6, window,
                                                 2 if args.quick else 15, containers),
        }
        for name in args.only or parts:
            results[name] = parts[name]()
    if args.only:  # a part alone, while working on it: its figures, no table
        json.dump(results, sys.stdout, indent=2)
        return 0
    results["rows"] = [{"figure": f, "target": TARGETS[f], "verdict": verdict(ok),
                        "measured": m} for f, m, ok in rows(results)]
    with open(os.path.join(HERE, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
