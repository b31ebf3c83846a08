"""The Docker engine as the agent drives it: the container list in samples,
kept current by events, and every Docker request, against a real engine
(dockerd on this machine, containers of the busybox test image, no network).
"""

import datetime
import fcntl
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time

import pytest

import chatops_agent as agent
from test_chatops_agent import (  # the fast suite's helpers
    AGENT,
    Commander,
    STOPS_ON_TERM,
    clean_env,
    docker,
    docker_cli_running,
    docker_state,
    group_members,
    require,
    send,
    wait_until,
)
from conftest import (
    ContainerEvents,
    listed,
)


def ps_row(name):
    """docker ps's fields of `name` (named: {{json .}} would compute sizes)."""
    fields = ",".join(f'"{f}":{{{{json .{f}}}}}'
                      for f in ("State", "Status", "Image", "Ports", "CreatedAt"))
    out = docker("ps", "--all", "--filter", f"name=^{name}$", "--format",
                 "{" + fields + "}").stdout
    return json.loads(out) if out.strip() else None


def soon_as_docker_ps(api, name):
    """Whether the first or the second sample taken after now words `name` as
    docker ps does (the second: a health check may change it in between)."""
    count = len(api.metrics())
    for fresh in (2, 3):  # the first to arrive may have been taken before now
        wait_until(lambda fresh=fresh: len(api.metrics()) >= count + fresh, 5,
                   "a fresh sample")
        if same_as_docker_ps(api, name):
            return True
    return False


def status_words(status):
    """A container's status as docker ps words it, but for its durations
    ("Up 3 seconds (healthy)" -> "Up T (healthy)"), which depend on when it
    is read."""
    return re.sub(r"Less than a second|About an? \w+|\d+ \w+", "T", status)


def same_as_docker_ps(api, name):
    """Whether the latest sample's row of `name` is as docker ps prints it
    now: the same words, but for durations (the two are read moments apart),
    and a creation time within the second."""
    theirs, ours = ps_row(name), listed(api, name)
    if theirs is None or ours is None:
        return theirs is None and ours is None

    created = datetime.datetime.strptime(ours["created"], "%Y-%m-%dT%H:%M:%SZ")
    their_created = datetime.datetime.strptime(theirs["CreatedAt"][:19],
                                               "%Y-%m-%d %H:%M:%S")
    same_row = (ours["state"], status_words(ours["status"]), ours["image"],
                ours["ports"]) == (theirs["State"], status_words(theirs["Status"]),
                                   theirs["Image"], agent.parse_ports(theirs["Ports"]))
    return same_row and abs((created - their_created).total_seconds()) <= 1


class ScriptedDocker:
    """What ContainerCache takes for the docker CLI, scripted: `rows` for
    docker ps, `found` ({id: Inspected}) for inspect, and a `docker events`
    whose lines the test writes with `event()`. Every read is recorded."""

    binary = "docker"

    def __init__(self, rows, found):
        self.rows, self.found = rows, found
        self.reads = []  # ("ps",) or ("inspect", ids), in order
        self.while_listing = None  # runs inside the next docker ps
        read, write = os.pipe()
        self.stdout, self._events = os.fdopen(read, "rb"), os.fdopen(write, "wb", 0)
        self.children = self

    def check(self):
        return "ok", "99.0"

    def list_containers(self):
        self.reads.append(("ps",))
        hook, self.while_listing = self.while_listing, None
        if hook:
            hook()
        return [dict(row) for row in self.rows]

    def inspect(self, ids):
        self.reads.append(("inspect", list(ids)))
        return {i: self.found[i] for i in ids if i in self.found}

    def spawn(self, args, **options):  # docker events
        return self

    def poll(self):
        return 0 if self._events.closed else None

    def finish(self, proc):
        self._events.close()

    def event(self, action, container_id, name="web", **attributes):
        self._events.write(json.dumps({
            "Type": "container", "Action": action, "timeNano": time.time_ns(),
            "Actor": {"ID": container_id * 5, "Attributes": {
                "name": name, "image": "busybox", **attributes}}}).encode() + b"\n")


class TestContainerEvents:
    """The list kept from events alone, on a scripted CLI: which event starts
    which read, and what each event does to a row."""

    WEB = "aaaaaaaaaaaa"
    JOB = "bbbbbbbbbbbb"

    @pytest.fixture
    def cache(self):
        row = {"id": self.WEB, "name": "web", "image": "busybox", "status": "Exited "
               "(0) 1 hour ago", "state": "exited", "created": "2026-12-01T00:00:00Z",
               "ports": []}
        state = agent.ContainerState(False, False, False, False, False, 0, None,
                                     time.time() - 7200, time.time() - 3600)
        fixed = [{"private_port": 80, "type": "tcp", "public_port": 8080}]
        web = agent.Inspected(self.WEB, state, [],
                              agent.ContainerConfig("no", fixed, True))
        job = agent.Inspected(
            self.JOB, agent.CREATED._replace(running=True, started=time.time()), [],
            agent.ContainerConfig("no", [], False))
        cli = ScriptedDocker([row], {self.WEB: web, self.JOB: job})  # JOB: once created
        cache = agent.ContainerCache(agent.load_config({}, {}), cli)
        thread = threading.Thread(target=cache.run, daemon=True)
        thread.start()
        wait_until(lambda: row_of(cache, "web"), 5, "the first read")
        yield cache, cli
        cache.stop_watching()
        thread.join(5)

    def test_events_of_a_known_container_start_no_read(self, cache):
        cache, cli = cache
        reads = len(cli.reads)
        cli.event("start", self.WEB[:8] + "0000")  # another container: not it
        wait_until(lambda: cache.snapshot() and len(cli.reads) > reads, 5,
                   "a sample that reads the whole list")
        reads = len(cli.reads)
        steps = [("start", {}, "running", "Up Less than a second (health: starting)"),
                 ("health_status: healthy", {}, "running",
                  "Up Less than a second (healthy)"),
                 ("pause", {}, "paused", "Up Less than a second (Paused)"),
                 ("unpause", {}, "running", "Up Less than a second (unhealthy)"),
                 ("rename", {"name": "web2"}, "running",
                  "Up Less than a second (unhealthy)"),
                 ("die", {"exitCode": "3"}, "exited",
                  "Exited (3) Less than a second ago"),
                 ("stop", {}, "exited", "Exited (3) Less than a second ago")]
        for action, attributes, state, status in steps:
            name = attributes.pop("name", None) or row_of(cache, "web", "web2")["name"]
            cli.event(action, self.WEB, name, **attributes)

            def words(name=name, status=status):  # the words, at any duration:
                now = (row_of(cache, name) or {}).get("status")  # a loaded machine
                return now is not None and status_words(now) == status_words(status)

            wait_until(words, 5, f"{status!r} after {action}")
            assert row_of(cache, name)["state"] == state
        assert cli.reads[reads:] == []
        cli.event("destroy", self.WEB, "web2")
        wait_until(lambda: cache.snapshot()[0] == [], 5, "the row gone")

    def test_a_new_container_is_read_once_when_it_starts(self, cache):
        cache, cli = cache
        reads = len(cli.reads)
        cli.event("create", self.JOB, "job")
        wait_until(lambda: row_of(cache, "job"), 5, "the created row")
        assert row_of(cache, "job")["status"] == "Created"
        names = [row["name"] for row in cache.snapshot()[0]]
        assert names == ["job", "web"]  # the newest first, as docker ps
        cli.event("start", self.JOB, "job")
        wait_until(lambda: row_of(cache, "job")["state"] == "running", 5, "the start")
        assert cli.reads[reads:] == [("inspect", [self.JOB])]  # its ports, its health
        cli.event("die", self.JOB, "job", exitCode="0")
        cli.event("destroy", self.JOB, "job")
        wait_until(lambda: not row_of(cache, "job"), 5, "the row gone")
        assert cli.reads[reads:] == [("inspect", [self.JOB])]

    def test_events_during_a_read_are_applied_after_it(self, cache):
        """A destroy that comes while docker ps runs (and still lists it)."""
        cache, cli = cache

        def destroyed_meanwhile():
            cli.event("destroy", self.WEB)
            wait_until(lambda: cache._replay, 5, "the event, during the read")

        cli.while_listing = destroyed_meanwhile
        cli.event("start", "cccccccccccc", "stranger")  # unknown: a whole read
        wait_until(lambda: cache.snapshot() and cli.while_listing is None, 5,
                   "a sample that reads the whole list")
        wait_until(lambda: cache.snapshot()[0] == [], 5, "web gone after the read")

    def test_an_event_the_agent_cannot_read_costs_one_read(self, cache):
        cache, cli = cache
        reads = len(cli.reads)
        cli._events.write(b"garbage\n" * 100)
        wait_until(lambda: cache.snapshot() and cli.reads[reads:] == [
            ("ps",), ("inspect", [self.WEB])], 5, "one read of the whole list")
        cache.snapshot()
        assert cli.reads[reads:] == [("ps",), ("inspect", [self.WEB])]


    def test_a_flood_of_creates_stays_bounded_and_is_read_over(self, cache):
        """20,000 creates of containers that docker ps never lists (as a
        hostile CLI prints them): the list never holds more than
        MAX_EVENT_ROWS of them beside the one docker ps lists, a sample costs
        at most one read, and each create is applied without a copy of the
        table (it was 50,954 rows and 6.8 MB frames; issue 26, defect 3)."""
        cache, cli = cache
        reads, sizes = len(cli.reads), []
        flooding = threading.Event()

        def sample():  # a sample every 20 ms, as fast as a metrics loop may go
            while not flooding.wait(0.02):
                sizes.append(len(cache.snapshot()[0]))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for n in range(20000):
            cli.event("create", f"{n + 1:012x}", f"flood-{n}")
        wait_until(lambda: unread_bytes(cli.stdout) == 0, 10, "the flood read")
        flooding.set()
        sampler.join(5)
        sizes.append(len(cache.snapshot()[0]))
        assert max(sizes) <= 1 + agent.MAX_EVENT_ROWS, max(sizes)
        assert len(cli.reads[reads:]) <= 2 * len(sizes)  # a ps and an inspect each
        assert ("ps",) in cli.reads[reads:]  # the flood made the list stale

    def test_a_sample_lists_at_most_so_many_containers(self):
        rows = [{"id": f"{n:012x}", "name": f"c{n}", "image": "busybox",
                 "status": "Created", "state": "created",
                 "created": "2026-12-01T00:00:00Z", "ports": []}
                for n in range(agent.MAX_CONTAINERS_LISTED + 500, 0, -1)]
        cli = ScriptedDocker(rows, {})
        cache = agent.ContainerCache(agent.load_config({}, {}), cli)
        listed, status = cache.read_once()
        assert len(listed) == agent.MAX_CONTAINERS_LISTED
        assert listed[0]["name"] == f"c{agent.MAX_CONTAINERS_LISTED + 500}"  # newest
        assert status["omitted"] == 500


def unread_bytes(pipe):
    """Bytes written to `pipe` that its reader has not read yet."""
    return struct.unpack("i", fcntl.ioctl(pipe.fileno(), termios.FIONREAD,
                                          b"\0\0\0\0"))[0]


def row_of(cache, *names):
    rows = cache.snapshot(wait_s=1)[0]
    return next((row for row in rows if row["name"] in names), None)


class TestDocker:
    def test_list_in_metrics_follows_hand_made_changes(self, api, run_agent, container,
                                                       counting_docker):
        shim, calls = counting_docker
        proc = run_agent(api.url, "--docker-binary", shim)
        name = container("sleep 600")
        wait_until(lambda: listed(api, name), 10, "the container in metrics")
        row = next(c for c in api.metrics()[-1]["containers"] if c["name"] == name)
        assert row["state"] == "running" and row["status"].startswith("Up")
        assert len(row["id"]) == 12 and row["image"].startswith("chatops-test-busybox")
        assert row["created"].endswith("Z") and row["ports"] == []
        assert api.metrics()[-1]["docker"]["status"] == "ok"
        docker("stop", "--time", "0", name)
        after_stop = len(api.metrics())
        wait_until(lambda: len(api.metrics()) > after_stop, 5, "the next sample")
        stopped = next(
            c for c in api.metrics()[after_stop]["containers"] if c["name"] == name
        )
        assert stopped["state"] == "exited"
        ps_before = calls.read_text().split().count("ps")
        ticks = len(api.metrics())
        with ContainerEvents() as others:  # another test's, or anyone's
            wait_until(lambda: len(api.metrics()) >= ticks + 6, 10, "six quiet ticks")
        ps_calls = calls.read_text().split().count("ps") - ps_before
        assert ps_calls <= others.count + 1  # no ps per tick, only per event
        assert calls.read_text().split().count("events") == 1
        assert "docker" in proc.log()

    def test_status_text_is_current_in_every_sample(self, api, run_agent, container,
                                                    counting_docker):
        """Between two re-reads of the list (events only), every sample still
        says how long each container has been up, as docker ps would then."""
        shim, calls = counting_docker
        run_agent(api.url, "--docker-binary", shim)
        name = container("sleep 600")
        wait_until(lambda: listed(api, name), 10, "the container in metrics")
        reads = calls.read_text().split().count("ps")

        def seconds_up():
            match = re.fullmatch(r"Up (\d+) seconds", listed(api, name)["status"])
            return match and int(match.group(1)) >= 3

        with ContainerEvents() as others:
            wait_until(seconds_up, 15, "a sample 3 s after the start saying so")
        rereads = calls.read_text().split().count("ps") - reads
        assert rereads <= others.count + 1  # none of its own: the text is derived

    def test_each_event_words_the_row_as_docker_ps(self, api, run_agent, container,
                                                   tmp_path):
        """After each kind of event the samples word the container as docker
        ps then does, and no docker process is started for a container the
        agent knows: one inspect when the new container starts (its ports
        and health check), nothing else. (Other containers' events, any
        test's, cost no list either.)"""
        calls, shim = tmp_path / "calls", tmp_path / "docker"
        shim.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec docker "$@"\n')
        shim.chmod(0o755)
        run_agent(api.url, "--docker-binary", str(shim))
        wait_until(api.metrics, 10, "the agent")
        name = container("sleep 600", start=False, options=(
            "--health-cmd", "true", "--health-interval", "3s"))
        container_id = docker("container", "inspect", "--format", "{{.Id}}",
                              name).stdout[:12]
        before = len(calls.read_text().splitlines())
        renamed = f"{name}-renamed"
        steps = [("create", None), ("start", ("start", name)),
                 ("health_status", None), ("pause", ("pause", name)),
                 ("unpause", ("unpause", name)), ("rename", ("rename", name, renamed)),
                 ("kill", ("kill", "--signal", "KILL", renamed)),
                 ("start again", ("start", renamed)),
                 ("stop", ("stop", "--time", "0", renamed)),
                 ("destroy", ("rm", renamed))]
        for step, command in steps:
            if command:
                docker(*command)
            if step == "health_status":
                wait_until(lambda: "healthy" in ps_row(name)["Status"], 15, "healthy")
            current = renamed if step not in ("create", "start", "health_status",
                                             "pause", "unpause") else name
            assert soon_as_docker_ps(api, current), (
                f"after {step}: {listed(api, current)}, docker ps {ps_row(current)}")
        calls = calls.read_text().splitlines()[before:]
        assert [c for c in calls if c.startswith("ps")] == []
        assert len([c for c in calls if container_id in c]) == 1, calls

    def test_actions_through_the_api(self, api, run_agent, container):
        name = container("sleep 600")
        cmd = Commander(api, run_agent(api.url))
        wait_until(api.metrics, 6, "the agent")

        def ask(kind, **fields):
            cmd.count += 1
            request_id = f"d-{cmd.count}"
            api.send_all(json.dumps({"type": kind, "request_id": request_id,
                                     "container_id": name, **fields}))
            started = time.monotonic()
            reply = cmd.reply(request_id, 15)
            assert time.monotonic() - started < 10, "the API waits only 10 s"
            return reply

        reply = ask("stop_container", timeout=1)
        assert reply == {
            "type": "container_stopped",
            "request_id": reply["request_id"],
            "data": {"container_id": name, "status": "stopped"},
        }
        assert docker_state(name) == "exited"
        assert ask("start_container")["data"]["status"] == "started"
        assert docker_state(name) == "running"
        assert ask("restart_container", timeout=1)["type"] == "container_restarted"
        assert docker_state(name) == "running"
        assert ask("pause_container")["type"] == "container_paused"
        assert docker_state(name) == "paused"
        assert ask("unpause_container")["type"] == "container_unpaused"
        assert docker_state(name) == "running"
        info = ask("inspect_container")["data"]["info"]
        assert info["name"] == name and info["state"] == "running"
        assert info["restart_count"] == 0 and info["started_at"].startswith("20")
        # The engine can say 0B for a while (seen here while a systemd container
        # shared the cgroup tree): ask again until it has a number.
        def sampled():
            stats = ask("get_container_stats")["data"]["stats"]
            return stats if stats["memory_used_bytes"] else None

        stats = wait_until(sampled, 20, "docker stats with the container's memory")
        assert stats["memory_used_bytes"] > 0 and stats["memory_limit_bytes"] > 0
        assert stats["pids"] >= 1 and stats["cpu_percent"] >= 0
        listed = ask("list_containers")["data"]["containers"]
        assert any(c["name"] == name for c in listed)
        for kind in ("stop_container", "start_container"):
            missing = ask(kind, container_id="chatops-test-no-such-thing")
            assert missing["type"] == "error"
            assert missing["message"] == "No such container: chatops-test-no-such-thing"

    def test_logs_both_streams_in_order_with_tail(self, api, run_agent, container):
        # The daemon stamps each line as it reads the stream's pipe: lines written
        # microseconds apart on two pipes can come out either way, so space them.
        script = ("for i in 1 2 3 4 5 6; do echo out$i; sleep 0.05; echo err$i >&2; "
                  "sleep 0.05; done; sleep 600")
        name = container(script)
        wait_until(lambda: "err6" in docker("logs", name).stderr, 10, "the logs")
        cmd = Commander(api, run_agent(api.url))
        wait_until(api.metrics, 6, "the agent")
        api.send_all(json.dumps({"type": "get_container_logs", "request_id": "l1",
                                 "container_id": name}))
        logs = cmd.reply("l1")["data"]["logs"]
        assert logs == [f"{s}{i}" for i in range(1, 7) for s in ("out", "err")]
        api.send_all(json.dumps({"type": "get_container_logs", "request_id": "l2",
                                 "container_id": name, "tail": 3,
                                 "timestamps": True}))
        tail = cmd.reply("l2")["data"]["logs"]
        assert [e["line"] for e in tail] == ["err5", "out6", "err6"]
        assert [e["stream"] for e in tail] == ["stderr", "stdout", "stderr"]
        assert all(e["time"].endswith("Z") for e in tail)

    def test_logs_keep_the_newest_lines_of_a_large_tail(self, api, run_agent,
                                                       container):
        """10 000 lines of 1 KB: more than the reply holds, so the newest must be
        the ones kept, consecutive, up to the last line."""
        name = container("p=x; for k in 1 2 3 4 5 6 7 8 9 10; do p=$p$p; done; "
                         'seq 1 10000 | while read i; do echo "$i $p"; done; '
                         "sleep 600")
        wait_until(lambda: docker("logs", "--tail", "1", name).stdout.startswith(
            "10000 "), 30, "10 000 lines of logs")
        cmd = Commander(api, run_agent(api.url))
        wait_until(api.metrics, 6, "the agent")
        send(api, "get_container_logs", "big", container_id=name, tail=10000)
        data = cmd.reply("big", 30)["data"]
        numbers = [int(line.split()[0]) for line in data["logs"]]
        assert numbers[-1] == 10000, numbers[-3:]
        assert numbers == list(range(numbers[0], 10001))
        assert data["truncated"] and len(numbers) > 900

    def test_docs_form(self, api, run_agent, container):
        name = container("sleep 600")
        cmd = Commander(api, run_agent(api.url))
        wait_until(api.metrics, 6, "the agent")
        actions = [("stop", {"timeout": 0}), ("start", {}), ("inspect", {}),
                   ("list", {}), ("logs", {})]
        for n, (action, extra) in enumerate(actions):
            send(api, "docker_command", f"c{n}", "command_id", action=action,
                 container_id=name, **extra)
            reply = cmd.reply(f"c{n}", id_field="command_id")
            assert reply["type"] == "docker_response", reply
            assert reply["success"], reply
        assert cmd.reply("c2", id_field="command_id")["info"]["name"] == name
        containers = cmd.reply("c3", id_field="command_id")["containers"]
        assert any(c["name"] == name for c in containers)
        api.send_all(json.dumps({"type": "docker_command", "command_id": "bad",
                                 "action": "stop", "container_id": "-rf"}))
        bad = cmd.reply("bad", id_field="command_id")
        assert bad["type"] == "docker_response" and not bad["success"]

    def test_invalid_references_start_no_process(self, api, run_agent, counting_docker):
        shim, calls = counting_docker
        cmd = Commander(api, run_agent(api.url, "--docker-binary", shim))
        wait_until(api.metrics, 6, "the agent")
        wait_until(lambda: "events" in calls.read_text(), 10, "the events watcher")
        before = calls.read_text()
        for n, ref in enumerate(["-rf", "--help", "a b", "$(id)", "x" * 300]):
            api.send_all(json.dumps({"type": "start_container", "request_id": f"i{n}",
                                     "container_id": ref}))
            reply = cmd.reply(f"i{n}")
            assert reply["type"] == "error" and "invalid container reference" in \
                reply["message"]
        assert calls.read_text() == before

    def test_missing_cli(self, api, run_agent):
        cmd = Commander(
            api, run_agent(api.url, "--docker-binary", "/nonexistent/docker")
        )
        wait_until(lambda: api.metrics() and api.metrics()[-1]["docker"]["status"]
                   == "not installed", 10, "the status")
        assert api.metrics()[-1]["containers"] == []
        api.send_all(json.dumps({"type": "start_container", "request_id": "m1",
                                 "container_id": "web"}))
        reply = cmd.reply("m1")
        assert (
            reply["type"] == "error" and "apt-get install docker.io" in reply["message"]
        )

    def test_daemon_down_then_back(self, api, run_agent, docker_engine, tmp_path,
                                   container):
        """DOCKER_HOST names a socket with no daemon behind it; then the real
        socket appears there, as when the daemon comes back."""
        socket_path = tmp_path / "docker.sock"
        name = container("sleep 600")
        proc = run_agent(api.url, "--docker-check-s", "0.5",
                         DOCKER_HOST=f"unix://{socket_path}")
        wait_until(lambda: api.metrics() and api.metrics()[-1]["docker"]["status"]
                   == "daemon not running", 10, "the daemon-down status")
        assert api.metrics()[-1]["containers"] == []
        cmd = Commander(api, proc)
        api.send_all(json.dumps({"type": "start_container", "request_id": "s1",
                                 "container_id": name}))
        assert "daemon is not running" in cmd.reply("s1")["message"]
        os.symlink("/var/run/docker.sock", socket_path)
        wait_until(lambda: listed(api, name), 10, "the containers once it is back")
        assert api.metrics()[-1]["docker"]["status"] == "ok"

    def test_permission_denied_on_the_socket(self, api, docker_engine):
        """The agent as user nobody, who may not use the root-owned socket. Its
        Python is this one, or the system's where nobody cannot run this one
        (an interpreter built under /root)."""
        setpriv = shutil.which("setpriv")
        require(setpriv and os.geteuid() == 0, "setpriv and root are needed")
        as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
        python = next((p for p in (sys.executable, "/usr/bin/python3") if p and
                       subprocess.run([*as_nobody, p, "-c", ""]).returncode == 0),
                      None)
        require(python, "a Python that user nobody may run")
        shared = tempfile.mkdtemp()  # pytest's tmp_path is closed to other users
        os.chmod(shared, 0o755)
        copy = os.path.join(shared, "chatops_agent.py")
        shutil.copy(AGENT, copy)
        result = subprocess.run(
            [*as_nobody, python, copy, "--once"],
            capture_output=True, text=True, timeout=60,
            env=clean_env(HOME="/nonexistent"))
        shutil.rmtree(shared)
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)["data"]["docker"]
        assert status["status"] == "permission denied", status
        assert (
            "docker' group" in status["detail"]
            and "root-equivalent" in status["detail"]
        )

    def test_docker_disabled(self, api, run_agent):
        cmd = Commander(api, run_agent(api.url, "--docker-enabled", "false"))
        wait_until(api.metrics, 6, "the agent")
        assert api.metrics()[-1]["docker"] == {"status": "disabled"}
        api.send_all(json.dumps({"type": "start_container", "request_id": "x1",
                                 "container_id": "web"}))
        assert "disabled" in cmd.reply("x1")["message"]


class TestRequests:
    """Lanes, deadlines and cancel of Docker requests, against the engine, as a
    user of the ChatOps web UI meets them: the API waits 10 s for a reply."""

    def ask(self, cmd, kind, request_id, **fields):
        """Send a Docker request in the API's form; its reply and how long it took."""
        sent = time.monotonic()
        send(cmd.api, kind, request_id, **fields)
        reply = cmd.reply(request_id, 20)
        return reply, time.monotonic() - sent

    def test_docker_never_waits_behind_commands_and_stale_requests_never_run(
            self, api, run_agent, container, tmp_path):
        name = container(STOPS_ON_TERM)
        cmd = Commander(api, run_agent(api.url, "--request-deadline-s", "1",
                                       "--command-grace-s", "1"))
        wait_until(api.metrics, 6, "the agent")
        marker = f"20.{os.getpid()}"
        sleepers = [cmd.send(f"sleep {marker}") for _ in range(4)]
        wait_until(lambda: len(group_members(marker)) >= 4, 5, "four commands to run")
        ran = tmp_path / "ran"
        fifth, queued_at = cmd.send(f"touch {ran}"), time.monotonic()
        for kind in ("get_container_logs", "inspect_container", "stop_container"):
            reply, took_s = self.ask(cmd, kind, kind, container_id=name)
            assert reply["type"] != "error", reply
            assert took_s < 2, f"{kind} answered after {took_s:.1f} s"
        assert docker_state(name) == "exited"
        # The fifth waits past its deadline; a worker freed then answers it.
        wait_until(lambda: time.monotonic() - queued_at > 1.5, 5, "the deadline")
        assert len(group_members(marker)) >= 4
        for request_id in sleepers:
            cmd.cancel(request_id)
        expired = cmd.reply(fifth, 10)
        assert expired["type"] == "error" and "expired unstarted" in expired["message"]
        assert "request_deadline_s = 1 s" in expired["message"]
        assert cmd.run("echo after")["data"]["output"] == "after\n"  # a worker is free
        assert not ran.exists()
        log = cmd.proc.log()
        assert f"command {fifth}: 'touch {ran}' expired unstarted after" in log
        assert f"command {fifth}: 'touch {ran}' started" not in log

    def test_stop_without_timeout_answers_within_the_apis_wait(self, api, run_agent,
                                                              container):
        name = container("sleep 600")  # ignores SIGTERM: Docker must kill it
        cmd = Commander(api, run_agent(api.url))
        wait_until(api.metrics, 6, "the agent")
        for kind in ("restart_container", "stop_container"):
            reply, took_s = self.ask(cmd, kind, kind, container_id=name)
            assert reply["type"] in ("container_restarted", "container_stopped"), reply
            assert took_s < 10, f"{kind} answered after {took_s:.1f} s"
        assert docker_state(name) == "exited"

    def test_cancel_of_a_docker_request_says_what_it_did(self, api, run_agent,
                                                         container):
        slow, other = container("sleep 600"), container("sleep 600")
        cmd = Commander(api, run_agent(api.url, "--docker-workers", "1"))
        wait_until(api.metrics, 6, "the agent")
        send(api, "stop_container", "slow", container_id=slow, timeout=3)
        wait_until(lambda: docker_cli_running("stop", slow), 5, "docker stop to run")
        send(api, "stop_container", "queued", container_id=other, timeout=0)
        queued = cmd.cancel("queued")["data"]
        assert queued["cancelled"] and queued["state"] == "queued"
        refused = cmd.reply("queued")
        assert refused["type"] == "error" and "before it started" in refused["message"]
        running = cmd.cancel("slow")["data"]
        assert not running["cancelled"] and running["state"] == "running"
        assert "cannot be cancelled once started" in running["message"]
        assert cmd.reply("slow", 20)["type"] == "container_stopped"
        assert docker_state(slow) == "exited"
        reply, _ = self.ask(cmd, "inspect_container", "after", container_id=other)
        assert reply["data"]["info"]["state"] == "running"  # the lane passed it by
        assert docker_state(other) == "running"

    def test_cancel_in_the_docs_form(self, api, run_agent, container):
        name = container("sleep 600")
        cmd = Commander(api, run_agent(api.url, "--docker-workers", "1"))
        wait_until(api.metrics, 6, "the agent")
        send(api, "docker_command", "slow", "command_id", action="stop",
             container_id=name, timeout=3)
        wait_until(lambda: docker_cli_running("stop", name), 5, "docker stop to run")
        send(api, "docker_command", "queued", "command_id", action="start",
             container_id=name)
        api.send_all(json.dumps({"type": "cancel_command", "command_id": "c1",
                                 "target_id": "queued"}))
        answer = cmd.reply("c1", id_field="command_id")
        assert answer["type"] == "cancel_response"
        assert answer["cancelled"] and answer["state"] == "queued"
        refused = cmd.reply("queued", id_field="command_id")
        assert refused["type"] == "docker_response" and not refused["success"]
        assert cmd.reply("slow", 20, id_field="command_id")["success"]
        send(api, "docker_command", "after", "command_id", action="inspect",
             container_id=name)
        assert cmd.reply("after", id_field="command_id")["success"]
        assert docker_state(name) == "exited"  # the start never ran
