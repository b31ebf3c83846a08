"""The hostile campaign: what a misbehaving API, network or host can do to
the agent, and what must hold whatever it does (see the section comments).
"""

import contextlib
import json
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib

import pytest

import chatops_agent as agent
from test_chatops_agent import (  # the fast suite's helpers
    AGENT,
    AgentProcess,
    Commander,
    FakeAPI,
    KEY,
    Queues,
    RawPeer,
    SERVER_ID,
    agent_under_limit,
    clean_env,
    command_line,
    deflated,
    dripping,
    fake_docker,
    fresh_port,
    group_members,
    need_module,
    parse_request,
    pump,
    rss_kib,
    run_cli,
    send,
    spool_at,
    spooled,
    taken,
    taken_samples,
    upgrade_answer,
    upgrade_then,
    wait_until,
    write_config,
    ws_frame,
)
from conftest import (
    ContainerEvents,
    listed,
)


###############################################################################
# Hostile peers: the campaign #################################################
###############################################################################
#
# What a misbehaving API, network or host can do, and what must hold whatever
# it does: the process never wedges (if it can no longer work it exits
# non-zero), every request gets exactly one reply, memory stays bounded, the
# key never leaks, and every log line stays one line. CI runs these against
# the oldest websocket-client (1.2.3), the newest, and the one the offline
# bundle ships (1.8.0, on Python 3.8).

LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (DEBUG|INFO|WARNING|ERROR|"
                        r"CRITICAL) \S")


def assert_log_is_clean(log):
    """Every line a record of its own (nothing forged or split) and no key."""
    assert KEY not in log
    for line in log.splitlines():
        assert LOG_RECORD.match(line), f"not a log record: {line[:300]!r}"


def one_reply_each(api, request_ids):
    """{request id: [its reply]} (stream chunks aside) of the ids that have one;
    fails if any has more than one."""
    found = replies_to(api, [{i} for i in request_ids])
    return {next(iter(ids)): replies for ids, replies in found.items()}


def replies_to(api, requests):
    """{ids: replies} for each request that has a reply, a request known by the
    set of its ids (request_id and command_id): a reply carries one or both.
    Fails if any request has more than one reply."""
    found = {}
    with api.lock:
        messages = [m for _, m in api.frames if m.get("type") != "command_output"]
    for ids in requests:
        replies = [m for m in messages
                   if {m.get("request_id"), m.get("command_id")} & ids]
        assert len(replies) <= 1, f"more than one reply to {ids}: {replies}"
        if replies:
            found[frozenset(ids)] = replies
    return found


def connect_once(url, **settings):
    """One connection attempt of the agent's Connector, in this process."""
    flags = {"api_url": url, "api_key": KEY, **settings}
    config = agent.load_config({k: str(v) for k, v in flags.items()}, {})
    session = agent.Connector(config, {}, agent.load_websocket()).connect()
    session.kill()
    session.ws.shutdown()
    return session

class TestHostileUpgrade:
    def test_any_answer_to_the_upgrade_is_a_link_error(self):
        """Whatever bytes answer the upgrade, or follow a valid one, one attempt
        ends in LinkError or AuthError (never another exception, which ended the
        connection thread for good), and no redirect is followed."""
        hypothesis = need_module("hypothesis")
        st = hypothesis.strategies
        elsewhere = socket.create_server(("127.0.0.1", 0))
        elsewhere.settimeout(0)
        target = f"ws://127.0.0.1:{elsewhere.getsockname()[1]}{agent.WS_PATH}"
        statuses = st.sampled_from([101, 200, 301, 302, 303, 307, 308, 401, 403,
                                    500, 0, -1, 99999999999])
        headers = st.lists(st.sampled_from([
            b"Location: " + target.encode(), b"Location:", b"Location: \xff\xfe",
            b"Upgrade: websocket", b"Connection: Upgrade", b"Content-Length: 5",
            b"Sec-WebSocket-Accept: bogus", b"no colon here", b"\x00\x01\x02: x",
        ]), max_size=5)
        http = st.builds(
            lambda status, reason, lines, tail: b"HTTP/1.1 %d %s\r\n%s\r\n\r\n%s" % (
                status, reason, b"\r\n".join(lines), tail),
            statuses, st.binary(max_size=20), headers, st.binary(max_size=50))
        after_upgrade = st.lists(st.one_of(
            st.binary(max_size=40),
            st.builds(ws_frame, st.binary(max_size=40), st.integers(0, 15),
                      st.booleans(), st.integers(0, 7)),
            st.just(ws_frame(b"", 0x1, length=2**62)),
            st.just(ws_frame('{"type":"auth_success","server_id":NaN}')),
        ), max_size=4).map(lambda chunks: upgrade_then(*chunks))

        @hypothesis.settings(max_examples=150, deadline=None)
        @hypothesis.given(st.one_of(st.binary(max_size=300), http, after_upgrade))
        def attempt(answer):
            peer = RawPeer([answer])
            try:
                connect_once(peer.url)
            except (agent.LinkError, agent.AuthError):
                pass
            finally:
                peer.close()
            with pytest.raises(BlockingIOError):
                elsewhere.accept()  # no redirect was followed

        try:
            attempt()
        finally:
            elsewhere.close()

    def test_an_answer_that_never_ends_meets_a_deadline(self, monkeypatch):
        """A peer that drips its answer a byte at a time never times out a
        read; the whole attempt still ends within its deadline (shortened
        here from CONNECT_DEADLINE_S)."""
        monkeypatch.setattr(agent, "CONNECT_DEADLINE_S", 2.0)
        answer = b"HTTP/1.1 101 Switching Protocols\r\n" + b"X-Slow: y\r\n" * 99
        peer = RawPeer([dripping(answer, 0.05)])
        started = time.monotonic()
        with pytest.raises(agent.LinkError, match="within"):
            connect_once(peer.url)
        assert time.monotonic() - started < 4
        peer.close()

    def test_a_plaintext_peer_that_is_not_loopback_gets_no_key(self):
        """A ws:// URL is allowed only to loopback; what counts is the address
        actually connected to. A name cannot be made to resolve elsewhere here,
        so the peer address is given to the check directly."""
        with pytest.raises(agent.LinkError, match="10.1.2.3.*not loopback"):
            agent.check_plaintext_peer(("10.1.2.3", 8000), allow_plaintext=False)
        agent.check_plaintext_peer(("127.0.0.1", 8000), allow_plaintext=False)
        agent.check_plaintext_peer(("::1", 8000, 0, 0), allow_plaintext=False)
        agent.check_plaintext_peer(("10.1.2.3", 8000), allow_plaintext=True)


class TestHostileFrames:
    def test_frame_reader_survives_any_bytes(self):
        """Any byte stream gives messages, or a protocol error, or the end of the
        connection: nothing else, and no frame is buffered beyond the limit."""
        hypothesis = need_module("hypothesis")
        st = hypothesis.strategies
        frames = st.lists(st.one_of(
            st.binary(max_size=30),
            st.builds(ws_frame, st.binary(max_size=200), st.integers(0, 15),
                      st.booleans(), st.integers(0, 7), st.none(), st.booleans()),
            st.builds(lambda n: ws_frame(b"", 0x1, length=n),
                      st.integers(0, 2**63 - 1)),
        ), max_size=12)

        @hypothesis.settings(max_examples=400, deadline=None)
        @hypothesis.given(frames)
        def read_all(chunks):
            ours, theirs = socket.socketpair()
            with ours, theirs:
                theirs.sendall(b"".join(chunks))
                theirs.shutdown(socket.SHUT_WR)
                reader = agent.FrameReader(ours)
                with contextlib.suppress(agent.LinkError):
                    for _ in range(100):
                        message = reader.next_message()
                        if message is None:
                            break
                        opcode, payload = message
                        assert len(payload) <= agent.MAX_MESSAGE_BYTES
                assert len(reader.buffer) <= agent.MAX_MESSAGE_BYTES + agent.READ_CHUNK

        read_all()

    def test_fragments_and_pings_between_them_are_reassembled(self, api, run_agent):
        """auth_success in 1-byte fragments with pings between them, then a frame
        that announces 2**62 bytes: the agent authenticates, then drops that
        connection and comes back through the relay."""
        text = json.dumps({"type": "auth_success", "server_id": SERVER_ID}).encode()
        parts = [ws_frame(text[:1], 0x1, fin=False)]
        for i in range(1, len(text)):
            parts.append(ws_frame(b"p", 0x9))
            parts.append(ws_frame(text[i:i + 1], 0x0, fin=i == len(text) - 1))
        parts.append(ws_frame(b"", 0x1, length=2**62))
        peer = RawPeer([upgrade_then(*parts, hold_s=5)], upstream=api.port)
        try:
            proc = run_agent(peer.url, "--reconnect-max-delay-s", "0.5")
            wait_until(api.metrics, 15, "metrics through the relay")
            assert "connected to" in proc.log() and "larger than" in proc.log()
        finally:
            peer.close()

    def test_every_field_of_every_message(self, api, run_agent, tmp_path):
        """Frames of every type the API sends, with NaN, infinities, huge
        numbers, deep nesting, invalid Unicode, control characters and wrong
        types in their fields (auth_success and its server_id included): the
        connection stays up, every request gets exactly one reply, memory stays
        flat, no log line is forged and the key never shows. Commands are held
        to an allow-list and Docker is a fake CLI, so that random input runs
        nothing real."""
        hypothesis = need_module("hypothesis")
        st = hypothesis.strategies
        fake_docker = tmp_path / "docker"
        fake_docker.write_text(
            '#!/bin/sh\ncase "$1" in version) echo 99.0;; ps) ;; events) exec sleep '
            '3600;; *) echo "Error: No such container: x" >&2; exit 1;; esac\n')
        fake_docker.chmod(0o755)
        proc = run_agent(api.url, "--command-allow", '["echo [a-z]{1,8}"]',
                         "--docker-binary", str(fake_docker))
        cmd = Commander(api, proc)
        wait_until(api.metrics, 6, "the agent")
        cmd.run("echo warm")
        rss_before = rss_kib(proc.proc.pid)
        counter = iter(range(10**9))
        frames = st.builds(hostile_frame, st.data(), st.just(counter))

        # No shrinking: each step would wait out a missing reply; the failure
        # names the frames that went unanswered.
        @hypothesis.settings(max_examples=60, deadline=None, phases=[
            hypothesis.Phase.explicit, hypothesis.Phase.reuse,
            hypothesis.Phase.generate])
        @hypothesis.given(st.lists(frames, min_size=10, max_size=30))
        def exchange(batch):
            expected, silent = {}, []
            for text, as_binary, ids, replies in batch:
                api.send_all(text.encode() if as_binary else text)
                if ids and replies:
                    expected[frozenset(ids)] = text
                elif ids:
                    silent.append(ids)

            def unanswered():
                answered = replies_to(api, list(expected))
                return [t[:300] for ids, t in expected.items() if ids not in answered]

            wait_until(lambda: not unanswered(), 15,
                       lambda: f"a reply to each of {unanswered()}")
            assert not replies_to(api, silent)

        exchange()
        assert proc.proc.poll() is None and len(api.connects) == 1
        final = cmd.run("echo final")
        assert final["data"]["output"] == "final\n"
        growth_mib = (rss_kib(proc.proc.pid) - rss_before) / 1024
        assert growth_mib < 20, f"RSS grew by {growth_mib:.1f} MiB"
        assert_log_is_clean(proc.log())
        assert "internal error" not in json.dumps(api.messages())
        assert all(KEY not in json.dumps(m) for m in api.messages()[1:])


# Values that broke or could break a handler, as JSON text.
HOSTILE_VALUES = [
    "NaN", "Infinity", "-Infinity", "1e999", "-1e999", "-0.0", "1e-999",
    "1" * 4301,  # json.loads refuses integers this long
    "[" * 3000 + "]" * 3000,  # deeper than the JSON decoder goes
    "[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]", '"\\ud800"', '"a\\udfffb"',
    '"\\u0000"', '"\\u001b[31mred"', '"x\\n2026-01-01T00:00:00Z CRITICAL forged"',
    '"x\\r\\u2028y\\u0085z"', "null", "true", "false", "{}", "[]", "0", "-1",
    str(2**64), str(-(2**63)), '"' + "x" * 70000 + '"', '"-rf"', '"$(id)"',
    '"../../etc"', '""', '" "', '"echo ok"', '"web"', '"stop"', '"logs"', '"list"',
    '"inspect"', '"/tmp"', "1", "3", "0.5",
]
# The messages that get no reply: all that are handled at once but a ping.
NOT_REQUESTS = {kind for kind, route in agent.REQUESTS.items()
                if route.run is not None and route.lane is None
                and route.parse is None and kind != "ping"}
# Values that get a request past its first checks, so that later ones are hit.
PLAUSIBLE = {
    "command": ['"echo ok"', '"echo abc"'], "timeout": ["1", "0.5"],
    "cwd": ['"/tmp"'], "stream": ["true", "false"], "requested_by": ['"alice"'],
    "target_id": ['"id-1"'], "container_id": ['"web"'], "container": ['"web"'],
    "tail": ["3"], "since": ['"10m"'], "timestamps": ["true"],
    "action": ['"stop"', '"logs"', '"list"', '"inspect"', '"start"', '"stats"'],
    "server_id": ['"s-1"'], "message": ['"hello"'], "status": ['"ok"'],
}


def hostile_frame(data, counter):
    """(text, as_binary, usable ids, whether a reply is due) of one frame:
    mostly a known type with most of its fields, each plausible or hostile."""
    st = __import__("hypothesis").strategies
    value = st.one_of(st.sampled_from(HOSTILE_VALUES), st.integers().map(str),
                      st.floats().map(json.dumps),
                      st.text(max_size=30).map(json.dumps))
    known = [json.dumps(k) for k in agent.REQUESTS]
    kind = data.draw(st.sampled_from(known * 2 + [None] * 3)) or data.draw(value)
    fields = {"type": kind}
    route = agent.REQUESTS.get(json.loads(kind)) if kind[:1] == '"' else None
    for name in route.fields if route else ():
        plausible = st.sampled_from(PLAUSIBLE.get(name, ['"x"']))
        choice = data.draw(st.sampled_from(["plausible", "plausible", "hostile", None]))
        if choice:
            fields[name] = data.draw(plausible if choice == "plausible" else value)
    ids = set()
    form = "command_id" if kind in ('"command"', '"docker_command"') else "request_id"
    other = "request_id" if form == "command_id" else "command_id"
    id_fields = data.draw(st.sampled_from(
        [[form]] * 5 + [[other], [form, other], []]))
    for name in id_fields:
        if data.draw(st.sampled_from([True, True, True, False]), "usable " + name):
            unique = f"id-{next(counter)}" + data.draw(st.sampled_from(
                ["", "\n2026-01-01T00:00:00Z CRITICAL forged", "\ud800", "\u2028"]))
            fields[name], ids = json.dumps(unique), ids | {unique}
        else:
            fields[name] = data.draw(st.sampled_from(
                ["NaN", "1.5", "[]", "{}", "null", "true", '"' + "y" * 300 + '"']))
    text = "{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}"
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):  # the agent cannot read the ids either
        return text, data.draw(st.booleans()), set(), False
    replies = not (isinstance(message.get("type"), str)
                   and message["type"] in NOT_REQUESTS)
    return text, data.draw(st.booleans(), "binary"), ids, replies


STALL_COMMAND = "head -c 1048576 /dev/zero | tr '\\0' '\\1'"  # 6 MiB as JSON
# Their frames must stay that large: compressed, they would be a few KB.
STALL_FLAGS = ("--compression", "false")


def unsent_bytes(port):
    """Bytes the kernel holds unsent on connections to 127.0.0.1:`port` (Linux)."""
    total = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == port and fields[3] == "01":
                total += int(fields[4].split(":")[0], 16)
    return total


def stall(relay, cmd):
    """Make the relay to the API stop reading, and the agent's writer stick in
    the middle of 12 MiB of replies: their ids."""
    relay.reading.clear()
    big = [cmd.send(STALL_COMMAND), cmd.send(STALL_COMMAND)]
    for request_id in big:
        cmd.proc.wait_log(f"command {request_id} ended")
    levels = []

    def stuck():  # a full send queue that no longer moves
        levels.append(unsent_bytes(relay.port))
        return len(levels) > 5 and levels[-1] > 2**20 and len(set(levels[-5:])) == 1

    wait_until(stuck, 10, "the agent's writer to be stuck")
    return big


@pytest.fixture
def stalled(api, run_agent):
    """An agent whose API has stopped reading: its writer is stuck in the middle
    of 12 MiB of replies, while the API can still send it frames. The agent
    reaches the API through a relay, which is what stops reading."""
    relay = RawPeer(upstream=api.port, rcvbuf=65536)

    def start(*args):
        proc = run_agent(relay.url, "--command-grace-s", "1",
                         "--reconnect-max-delay-s", "0.5", *STALL_FLAGS, *args)
        wait_until(api.metrics, 6, "the agent to connect")
        cmd = Commander(api, proc)
        return cmd, relay, stall(relay, cmd)

    yield start
    relay.reading.set()
    relay.close()


class TestStalledPeer:
    def test_a_websocket_ping_does_not_freeze_the_receive_loop(self, stalled,
                                                               tmp_path):
        cmd, relay, big = stalled("--heartbeat-interval-s", "10")
        marker = tmp_path / "started"
        cmd.api.ws_ping()
        touch = cmd.send(f"touch {marker}")
        wait_until(marker.exists, 3, "the command sent after the ping to start")
        assert "sending failed" not in cmd.proc.log()  # the stalled connection still
        relay.reading.set()
        assert cmd.reply(touch, 30)["data"]["exit_code"] == 0
        one_reply_each(cmd.api, {touch, *big})

    def test_a_reply_whose_send_fails_waits_for_the_reconnect(self, stalled):
        cmd, relay, big = stalled("--heartbeat-interval-s", "2")
        cmd.proc.wait_log("sending failed", 15)  # a send timed out mid-reply
        relay.reading.set()
        for request_id in big:
            assert cmd.reply(request_id, 30)["data"]["output_bytes"] == 1048576
        replies = one_reply_each(cmd.api, set(big))
        numbers = [n for n, m in cmd.api.frames for r in replies.values() if m is r[0]]
        assert max(numbers) >= 1  # at least one came on the new connection

    @pytest.mark.parametrize("kind", ["ping-messages", "websocket-pings"])
    def test_a_flood_of_pings_keeps_memory_bounded(self, stalled, tmp_path, kind):
        """Pings the agent cannot answer while the API does not read: their
        answers are coalesced, not queued (it was 269 MiB after 968 000 ping
        messages). A WebSocket ping is answered by the writer, the latest once."""
        cmd, _, _ = stalled("--heartbeat-interval-s", "60")
        before = rss_kib(cmd.proc.proc.pid)
        conn = cmd.api.connections[0]
        if kind == "ping-messages":
            ping = json.dumps({"type": "ping"})
            for _ in range(200000):
                conn.send(ping)
        else:
            for n in range(50000):
                conn.ping(n.to_bytes(4, "big"))
        marker = tmp_path / "after-the-flood"
        cmd.send(f"touch {marker}")
        wait_until(marker.exists, 30, f"the agent to read the flood of {kind}")
        growth_mib = (rss_kib(cmd.proc.proc.pid) - before) / 1024
        assert growth_mib < 16, f"RSS grew by {growth_mib:.1f} MiB"


class SilentDeath:
    """A relay on 127.0.0.1 to a FakeAPI whose links can die silently, as
    when a NAT entry is dropped or a firewall black-holes: after `cut()`,
    nothing passes either way on the links it carries, and nothing closes.
    What the agent writes into a cut link goes nowhere; the relay keeps the
    messages (`swallowed`). Links made after a cut pass. It reads the
    agent's frames one by one, so they must come uncompressed
    (--compression false)."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.swallowed = []  # messages the agent wrote into cut links
        self.cut_links = []  # an Event per link: set, the link is dead
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self):
        for dead in self.cut_links:
            dead.set()

    def close(self):
        self.listener.close()

    def _accept(self):
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        dead = threading.Event()
        self.cut_links.append(dead)
        with conn, socket.create_connection(("127.0.0.1", self.upstream)) as up, \
                contextlib.suppress(OSError):
            self._pass_head(conn, up)
            self._pass_head(up, conn)
            threading.Thread(target=pump, args=(up, conn, None, dead),
                             daemon=True).start()
            while True:
                frame = read_client_frame(conn, raw=True)
                if frame is None:
                    return
                opcode, payload, raw = frame
                if not dead.is_set():
                    up.sendall(raw)
                elif opcode == 0x1:
                    self.swallowed.append(json.loads(payload))

    @staticmethod
    def _pass_head(source, sink):
        """An HTTP head (the upgrade or its answer), byte by byte: nothing of
        what follows it is taken."""
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            byte = source.recv(1)
            if not byte:
                raise OSError("closed")
            head += byte
        sink.sendall(head)


class TestSilentLink:
    """A link that stops carrying bytes both ways without closing, with an
    API that never acknowledges metrics: what the agent wrote into it is no
    more delivered than what it wrote into a link that closed (issue 26,
    defect 1)."""

    FLAGS = ("--compression", "false", "--metrics-interval-s", "0.25",
             "--reconnect-max-delay-s", "0.5")

    @pytest.fixture
    def no_acks(self):
        api = FakeAPI(ack=False, deflate=None).start()
        relay = SilentDeath(api.port)
        yield api, relay
        relay.close()
        api.stop()

    @staticmethod
    def stamps(api):
        return {m["timestamp"] for m in api.metrics()}

    def swallow(self, api, relay, proc, count):
        """Once the agent knows the API never acknowledges: cut the link,
        and wait until `count` samples went into it."""
        proc.wait_log("the API does not acknowledge metrics", 10)
        relay.cut()
        wait_until(lambda: len(metrics_in(relay.swallowed)) >= count, 10,
                   lambda: f"{count} samples into the dead link; {proc.log()}")
        return metrics_in(relay.swallowed)

    def test_what_went_into_the_dead_link_is_sent_again(self, no_acks, run_agent):
        api, relay = no_acks
        proc = run_agent(relay.url, *self.FLAGS, "--heartbeat-interval-s", "1")
        lost_in_link = self.swallow(api, relay, proc, 4)
        proc.wait_log("nothing heard from the API", 10)
        wait_until(lambda: set(lost_in_link) <= self.stamps(api), 10,
                   lambda: f"{sorted(set(lost_in_link) - self.stamps(api))} "
                           f"delivered after the reconnect; {proc.log()}")

    def test_sigkill_in_the_dead_link_loses_at_most_two(self, no_acks, run_agent,
                                                       tmp_path):
        """The last interval or two, as with an API that acknowledges: each
        sample that no pong showed read is written to the spool when the
        next one comes."""
        api, relay = no_acks
        state = ("--state-dir", str(tmp_path / "state"))
        # Two 2 s heartbeats: the agent is still in the dead link at the kill.
        args = (*self.FLAGS, *state, "--heartbeat-interval-s", "2")
        proc = run_agent(relay.url, *args)
        self.swallow(api, relay, proc, 6)
        proc.proc.kill()
        proc.proc.wait()
        lost_in_link = metrics_in(relay.swallowed)
        assert "nothing heard" not in proc.log()
        before = len(api.metrics())
        again = run_agent(relay.url, *args)
        wait_until(lambda: len(api.metrics()) >= before + len(lost_in_link) + 4, 15,
                   again.log)
        lost = sorted(set(lost_in_link) - self.stamps(api))
        assert len(lost) <= 2, (lost, lost_in_link)


def metrics_in(messages):
    """The timestamps of the metrics among `messages`."""
    return [m["data"]["timestamp"] for m in messages if m.get("type") == "metrics"]


RUNNING = f"765.{os.getpid()}"  # what the command-running state runs: sleep RUNNING


def hold(conn, request):
    """An answer for RawPeer that says nothing and keeps the connection."""
    with contextlib.suppress(OSError):
        conn.settimeout(30)
        while conn.recv(65536):
            pass


@pytest.fixture(params=["unreachable", "upgrade-pending", "auth-pending",
                        "connected", "command-running", "stalled"])
def agent_in_state(request, api, run_agent):
    """An agent process in one of the states a signal may find it in."""
    state = request.param
    args = ["--command-grace-s", "1", "--heartbeat-interval-s", "30"]
    if state == "unreachable":
        proc = run_agent(f"http://127.0.0.1:{fresh_port()}", *args)
        proc.wait_log("cannot reach the API")
        return proc
    if state in ("upgrade-pending", "auth-pending"):
        answer = hold if state == "upgrade-pending" else upgrade_then(hold_s=30)
        peer = RawPeer([answer] * 5)
        request.addfinalizer(peer.close)
        proc = run_agent(peer.url, *args)
        wait_until(lambda: peer.requests, 5, "the upgrade request")
        return proc
    relay = RawPeer(upstream=api.port, rcvbuf=65536)
    request.addfinalizer(relay.close)
    request.addfinalizer(relay.reading.set)
    proc = run_agent(relay.url, *args, *STALL_FLAGS)
    wait_until(api.metrics, 6, "the agent to connect")
    if state == "command-running":
        Commander(api, proc).send(f"sleep {RUNNING} & sleep {RUNNING}")
        wait_until(lambda: group_members(RUNNING), 5, "the command to run")
    if state == "stalled":
        stall(relay, Commander(api, proc))
    return proc


class TestSignals:
    def test_the_shutdown_points_come_in_order_within_its_budget(self):
        """Agent.shutdown's points, as its docstring orders them: commands
        killed, then their replies queued, sent before the connection's
        close wait begins, the connection closed, the metrics loop waited
        for, all within SHUTDOWN_S."""
        points = [0, agent.SHUTDOWN_KILL_AT_S, agent.SHUTDOWN_REPLIES_AT_S,
                  agent.SHUTDOWN_CLOSED_AT_S - agent.SHUTDOWN_CLOSE_WAIT_S,
                  agent.SHUTDOWN_CLOSED_AT_S, agent.SHUTDOWN_METRICS_AT_S,
                  agent.SHUTDOWN_S]
        assert all(a < b for a, b in zip(points, points[1:])), points

    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                             ids=["TERM", "INT", "HUP"])
    def test_a_signal_in_any_state_stops_cleanly(self, agent_in_state, signum):
        proc = agent_in_state
        stopped = time.monotonic()
        proc.proc.send_signal(signum)
        assert proc.exit_status() == 0
        assert time.monotonic() - stopped < 5
        assert f"received {signal.Signals(signum).name}" in proc.log()
        wait_until(lambda: not group_members(RUNNING), 5, "no command left")
        assert_log_is_clean(proc.log())

    def test_signals_in_a_burst_stop_it_once_and_cleanly(self, run_agent):
        """Ctrl-C pressed again and again, from start-up to exit: the signals
        land wherever the main thread is (starting threads, entering its wait,
        logging, shutting down). A handler that logged or set an Event there
        could deadlock or garble the log (once in ~70 single signals sent just
        as the agent started waiting), and one landing after the shutdown
        killed the process by the signal instead of letting it exit 0."""
        for _ in range(3):
            proc = run_agent(f"http://127.0.0.1:{fresh_port()}")
            proc.wait_log("metrics from")  # logged once the handlers are in place
            burst_until = time.monotonic() + 10
            while proc.proc.poll() is None and time.monotonic() < burst_until:
                with contextlib.suppress(ProcessLookupError):
                    proc.proc.send_signal(signal.SIGINT)
                time.sleep(0.002)  # a burst, not a wait: the loop ends on exit
            assert proc.exit_status() == 0
            assert proc.log().count("received SIGINT") == 1
            assert_log_is_clean(proc.log())

    def test_a_thread_that_dies_takes_the_agent_down(self, api, tmp_path):
        """A bug that ends a thread must not leave a process that lives on
        without it: the agent exits non-zero so that its supervisor restarts it.
        The bug is planted by this test: the metrics thread raises once the
        agent is connected."""
        script = (f"import sys, time; sys.path.insert(0, {os.path.dirname(AGENT)!r})\n"
                  "import chatops_agent as a\n"
                  "def bug(self):\n"
                  "    while self.link.session is None: time.sleep(0.01)\n"
                  "    raise RuntimeError('a planted bug')\n"
                  "a.Agent._metrics_loop = bug\n"
                  "sys.exit(a.main())\n")
        log = tmp_path / "agent.log"
        with open(log, "w") as stderr:
            proc = subprocess.run([sys.executable, "-c", script, "--api-url", api.url],
                                  env=clean_env(CHATOPS_API_KEY=KEY), stderr=stderr,
                                  stdin=subprocess.DEVNULL, timeout=30)
        assert proc.returncode == agent.EXIT_THREAD_DIED
        text = log.read_text()
        assert "the metrics thread died" in text and "a planted bug" in text
        wait_until(lambda: api.closes, 5, "the close frame")
        assert api.closes[-1][0] == 1011

    def test_a_stop_that_overruns_its_budget_has_its_own_status(self, api, tmp_path):
        """A step of the shutdown that hangs (here the spool's sync, planted
        by this test) does not hold the process: it ends at SHUTDOWN_S with
        EXIT_SHUTDOWN_OVERRAN, not the status of a dead thread, and the log
        names the step."""
        script = (f"import sys, time; sys.path.insert(0, {os.path.dirname(AGENT)!r})\n"
                  "import chatops_agent as a\n"
                  "a.SampleQueue.close = lambda self: time.sleep(60)\n"
                  "sys.exit(a.main())\n")
        proc = AgentProcess(tmp_path, "--api-url", api.url, "--metrics-interval-s",
                            "0.2", command=[sys.executable, "-c", script],
                            env=clean_env(CHATOPS_API_KEY=KEY))
        wait_until(api.metrics, 15, proc.log)
        stopped = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(30) == agent.EXIT_SHUTDOWN_OVERRAN, proc.log()
        took = time.monotonic() - stopped
        assert agent.SHUTDOWN_S <= took < agent.SHUTDOWN_S + 5, took
        assert "shutdown took more than 5 s (step 'spool' hung)" in proc.log()
        assert api.closes and api.closes[-1][0] == 1000  # the connection closed first
        proc.terminate()


###############################################################################
# Hostile peers, round 2: the restart, the spool, the lanes, Docker, RFC 6455 #
###############################################################################
#
# The second campaign (issue 18) went at the code the first one added. Each
# test here is one of its defects, and failed on the agent before the fix.

# Modules a `python3 -c` would look up in the working directory first.
PLANTED_MODULES = ("importlib", "types", "websocket", "json", "selectors")


def plant_modules(directory, marker):
    """Modules in `directory` that, if ever imported, append their name to `marker`."""
    directory.mkdir(exist_ok=True)
    for name in PLANTED_MODULES:
        (directory / f"{name}.py").write_text(
            f"open({str(marker)!r}, 'a').write({name!r} + ' ')\n")


class TestPlatform:
    # As on a system without them (Windows): the module and the function gone.
    WITHOUT_PWD_AND_GETEUID = (
        "import os, runpy, sys; sys.modules['pwd'] = None; del os.geteuid; "
        "sys.argv[0] = {agent!r}; runpy.run_path({agent!r}, run_name='__main__')"
    )

    @pytest.mark.parametrize("mode", [
        ["--api-key", KEY, "--api-url", "http://127.0.0.1:9"], ["--once"], ["--check"],
    ])
    def test_an_unsupported_system_is_told_in_one_sentence(self, mode):
        code = self.WITHOUT_PWD_AND_GETEUID.format(agent=AGENT)
        proc = subprocess.run([sys.executable, "-c", code, *mode], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert proc.returncode == 2 and proc.stdout == "", proc
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith("chatops-agent: error: this system (")
        assert "cannot run the agent: this Python lacks pwd, os.geteuid." in proc.stderr
        assert "README.md, Platforms" in proc.stderr


class TestHostileStart:
    """The restart at start (issue 18, defects 1 and 3) and a Python without
    ctypes (defect 11)."""

    @pytest.mark.parametrize("how", ["script", "symlink", "copy"])
    def test_nothing_planted_in_the_working_directory_runs_under_any_name(
            self, api, tmp_path, how):
        """Started from a directory where anyone may leave modules, as a
        script, through a symlink named chatops-agent, or as a copy without
        .py: the agent re-runs as an import, and none of them is imported."""
        program = tmp_path / "bin" / "chatops-agent"
        program.parent.mkdir()
        if how == "symlink":
            program.symlink_to(AGENT)
        elif how == "copy":
            shutil.copy(AGENT, program)
        else:
            program = pathlib.Path(AGENT)
        marker = tmp_path / "planted-modules-ran"
        plant_modules(tmp_path / "cwd", marker)
        proc = AgentProcess(tmp_path, "--api-url", api.url,
                            command=[sys.executable, str(program)],
                            cwd=tmp_path / "cwd", env=clean_env(CHATOPS_API_KEY=KEY))
        wait_until(api.metrics, 10, proc.log)
        argv = command_line(proc.proc.pid)
        assert "-c" in argv and argv[-3:] == [str(program), "--api-url", api.url]
        assert not marker.exists(), marker.read_text()
        assert proc.terminate() == 0

    def test_a_script_it_cannot_read_again_runs_on_as_one(self, api, tmp_path):
        """Piped into `python3 /dev/stdin`, the file cannot be read a second
        time: the agent runs on as the script it is (it died of the re-run)."""
        proc = AgentProcess(tmp_path, "--api-url", api.url,
                            command=[sys.executable, "/dev/stdin"],
                            env=clean_env(CHATOPS_API_KEY=KEY), stdin=subprocess.PIPE)
        proc.proc.stdin.write(pathlib.Path(AGENT).read_text())
        proc.proc.stdin.close()
        wait_until(api.metrics, 10, proc.log)
        assert "-c" not in command_line(proc.proc.pid)
        assert proc.terminate() == 0

    def test_a_python_without_ctypes_still_runs(self, api, run_agent, tmp_path):
        """A Python built without libffi has no ctypes: the agent runs and
        serves commands without the extras ctypes gives (it died at start)."""
        fake = tmp_path / "no-ctypes"
        fake.mkdir()
        (fake / "ctypes.py").write_text("raise ImportError('no module _ctypes')\n")
        proc = run_agent(api.url, PYTHONPATH=str(fake))
        wait_until(api.metrics, 10, proc.log)
        assert Commander(api, proc).run("echo hi")["data"]["output"] == "hi\n"
        assert proc.terminate() == 0


def spool_file(directory, data):
    """A spool file of the agent's user, private, holding `data`."""
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / "spool"
    path.write_bytes(data)
    path.chmod(0o600)
    return path


class TestHostileSpool:
    """The spool (issue 18, defects 2, 4, 9 and 10)."""

    def test_new_samples_never_take_the_number_of_a_delivered_one(self, tmp_path):
        """Delivered samples leave "done" records until the file is compacted.
        A restart with nothing pending numbered new samples from 1 again, and
        the restart after it took them for delivered: 13 of 13 samples of an
        outage were lost."""
        first = spool_at(tmp_path)
        for n in range(3):
            first.samples.add({"n": n})
        taken_samples(first, 3)
        for _ in range(3):
            first.samples.acknowledged()
        first.samples.close()  # the "done" records are written
        outage = spool_at(tmp_path)  # nothing pending: a new run
        for n in range(3, 6):
            outage.samples.add({"n": n})
        outage.samples.close()
        after = spool_at(tmp_path)
        assert [d["n"] for d in taken_samples(after, 3)] == [3, 4, 5]
        after.samples.close()

    def test_the_spool_is_refused_under_a_directory_others_may_change(self, tmp_path):
        """A root agent whose state directory lies in a directory another user
        owns (sudo -E keeping HOME), or one others may write, refuses the
        spool, as ssh refuses such a key."""
        for owner, mode in ((65534, 0o755), (0, 0o777)):
            home = tmp_path / f"home-{owner}-{mode:o}"
            home.mkdir()
            os.chown(home, owner, -1)
            home.chmod(mode)
            box = spool_at(home / "state")
            problem = box.samples.spool.problem
            assert "others may change" in problem, problem
            assert not (home / "state" / "spool").exists()
            check = run_cli("--check", "--state-dir", str(home / "state"))
            assert "note spool: refused" in check.stdout

    def test_a_directory_swapped_after_start_cannot_redirect_the_rewrite(
            self, tmp_path):
        """After start the state directory is swapped for another whose
        spool.new is a link to someone else's file: the compaction that
        follows writes where the agent opened its directory, never through the
        link (it truncated and rewrote that file)."""
        base, victim = tmp_path / "base", tmp_path / "victim"
        victim.write_bytes(b"precious")
        box = spool_at(base / "state")
        os.rename(base / "state", base / "moved")
        (base / "state").mkdir(mode=0o700)
        (base / "state" / "spool.new").symlink_to(victim)
        (base / "moved" / "spool.new").symlink_to(victim)  # and in the real one
        for n in range(600):  # acknowledged: compacted a few times
            box.samples.add({"n": n})
            taken_samples(box, 1)
            box.samples.acknowledged()
        box.samples.add({"n": "last"})
        assert victim.read_bytes() == b"precious"
        assert [d["n"] for d in spooled(base / "moved")] == ["last"]
        box.samples.close()

    def test_no_second_agent_takes_the_spool_while_it_is_rewritten(
            self, tmp_path, monkeypatch):
        """The lock lasts the agent's life: a second agent that tries in the
        moment between the rewrite's replace and its re-lock is refused (it
        got the spool, and the first one's compaction failed with an error)."""
        first = spool_at(tmp_path)
        tries = []
        replace = os.replace

        def replace_then_try(*args, **kwargs):
            replace(*args, **kwargs)
            second = Queues(10, spool=agent.Spool(str(tmp_path)))
            try:
                second.samples.open()
            except agent.SpoolHeld as e:
                tries.append(str(e))
                return
            tries.append(second.samples.spool.problem
                         or "the second agent got the spool")
            second.samples.close()

        monkeypatch.setattr(os, "replace", replace_then_try)
        for n in range(300):
            first.samples.add({"n": n})
            taken_samples(first, 1)
            first.samples.acknowledged()
        monkeypatch.setattr(os, "replace", replace)
        assert tries and all("another agent uses" in t for t in tries), tries
        first.samples.add({"n": "after"})
        assert first.samples.spool.problem is None
        assert [d["n"] for d in spooled(tmp_path)] == ["after"]
        first.samples.close()

    def test_a_huge_spool_under_a_memory_limit_is_set_aside(self, api, tmp_path):
        """A 1 GiB spool (sparse) under a 768 MiB address-space limit: it was
        read whole, and the start died of the MemoryError. No spool the agent
        writes is that large: it is set aside, unread, and the agent runs."""
        path = spool_file(tmp_path / "state", agent_spool_header())
        with open(path, "r+b") as f:
            f.truncate(2**30)
        proc = agent_under_limit(tmp_path, "-v 786432", "--api-url", api.url,
                                 "--metrics-interval-s", "0.2",
                                 "--state-dir", str(tmp_path / "state"))
        wait_until(api.metrics, 20, proc.log)
        assert "more than any this agent writes; set aside" in proc.log()
        assert proc.terminate() == 0, proc.log()

    def test_a_crafted_damaged_spool_costs_bounded_work(self, tmp_path, monkeypatch):
        """24 MiB of records that each claim 16 MiB and fail their checksum:
        trying each took minutes of checksums before the agent connected.
        Work after damage is bounded; the rest of the file is given up."""
        unit = b"S" + bytes(8) + (16 * 2**20 - 1).to_bytes(4, "big") + bytes(4)
        spool_file(tmp_path, agent_spool_header() + unit * (24 * 2**20 // len(unit)))
        checked = [0]
        crc32 = agent.binascii.crc32

        def counted(data, value=0):
            checked[0] += len(data)
            assert checked[0] < 2**28, "checksums over 256 MiB and counting"
            return crc32(data, value)

        monkeypatch.setattr(agent.binascii, "crc32", counted)
        box = spool_at(tmp_path)
        monkeypatch.setattr(agent.binascii, "crc32", crc32)
        assert taken(box) is None  # nothing sound in it
        assert spooled(tmp_path) == []  # rewritten clean
        box.samples.close()


def agent_spool_header():
    return b"chatops-agent spool 1\n"


class TestHostileAuth:
    """A peer that drips its answer (issue 18, defect 5)."""

    def test_a_frame_dripped_a_byte_at_a_time_meets_the_auth_deadline(
            self, monkeypatch):
        """After the upgrade, a peer drips one frame a byte at a time: each
        read returns in time, so only a deadline over the whole wait ends it
        (the agent waited in authentication for as long as the drip lasted).
        AUTH_TIMEOUT_S is shortened here from 10 s."""
        monkeypatch.setattr(agent, "AUTH_TIMEOUT_S", 1.0)
        frame = ws_frame(json.dumps({"type": "hello", "pad": "x" * 20}))
        peer = RawPeer([dripping(frame, 0.2, upgrade=True)])
        started = time.monotonic()
        with pytest.raises(agent.LinkError, match="did not answer 'auth' within"):
            connect_once(peer.url)
        assert time.monotonic() - started < 5  # the drip lasts 10 s
        peer.close()


class TestHostileBurst:
    """Replies in a burst (issue 18, defect 7)."""

    def test_a_burst_of_ten_thousand_requests_gets_every_reply(self, api, run_agent):
        """An API that reads everything sends 10,000 requests at once: each
        gets its one reply (2,500 to 6,000 were dropped). While replies pile
        up, the agent stops reading and TCP slows the API down."""
        proc = run_agent(api.url)
        wait_until(api.metrics, 6, "the agent")
        conn = api.connections[0]
        ids = [f"burst-{n}" for n in range(10000)]
        for request_id in ids:
            conn.send(json.dumps({"type": "execute_command", "request_id": request_id,
                                  "command": "true"}))

        def answered():
            with api.lock:
                return sum(m.get("request_id", "").startswith("burst-")
                           for _, m in api.frames if m.get("type") != "execute_command")

        wait_until(lambda: answered() >= len(ids), 60,
                   lambda: f"all replies; {answered()} came")
        assert len(one_reply_each(api, set(ids))) == len(ids)
        assert "dropped" not in proc.log()


class TestHostileCancel:
    """A cancel that races a command's end (issue 18, defect 8)."""

    def test_a_cancel_as_a_command_ends_agrees_with_its_reply(self):
        """A cancel that comes after the command ended, while its worker has
        not yet answered, says it cancelled nothing ("finished"), as the
        command's own reply says it ran to the end (it said cancelled: true,
        state running: 7 times in 300)."""
        config = agent.load_config({"command_grace_s": "1"}, {})
        runner = agent.CommandRunner(config, lambda *a, **k: None, agent.Children())
        runner.env = agent.command_environment(config)
        replies, cancels = [], []

        def execute_then_cancel(job):
            reply = runner.execute(job)
            cancels.append(requests.cancel(job.id, "request 'c'"))
            return reply

        requests = agent.Requests(config, lambda m, **k: replies.append(m), [
            agent.Lane("command", 1, 1, runner)])
        requests.start()
        request = {"type": "execute_command", "request_id": "r", "command": "echo ran"}
        job = parse_request(request, config)
        job.route = job.route._replace(run=lambda owner, job: execute_then_cancel(job))
        requests.submit(job)
        wait_until(lambda: replies, 10, "the reply")
        assert replies[0]["data"]["cancelled"] is False
        assert cancels[0][:2] == (False, "finished")

    def test_cancels_at_any_moment_agree_with_the_replies(self):
        """Cancels sent at random moments of short commands: whenever the
        cancel says it cancelled, the command's reply says so, and never
        otherwise."""
        config = agent.load_config({"command_grace_s": "1"}, {})
        runner = agent.CommandRunner(config, lambda *a, **k: None, agent.Children())
        runner.env = agent.command_environment(config)
        replies = {}
        requests = agent.Requests(
            config, lambda m, **k: replies.setdefault(m["request_id"], m),
            [agent.Lane("command", 1, 1, runner)])
        requests.start()
        rng = random.Random(18)
        for n in range(100):
            request = {"type": "execute_command", "request_id": f"r{n}",
                       "command": "echo x"}
            requests.submit(parse_request(request, config))
            time.sleep(rng.uniform(0, 0.004))  # the moment, not a wait
            cancelled, state, _ = requests.cancel(f"r{n}", "the test")
            wait_until(lambda n=n: f"r{n}" in replies, 10, f"reply {n}")
            reply = replies[f"r{n}"]["data"]
            assert reply["cancelled"] is cancelled, (n, state, reply)


GOOD_ROW = ('{"id":"0123456789ab0000","names":"good","image":"busybox",'
            '"status":"Up 1 second","state":"running",'
            '"created":"2026-11-25 14:28:30 +0000 UTC","ports":"0.0.0.0:8080->80/tcp"}')


class TestHostileDocker:
    """The docker CLI and the engine (issue 18, defects 6, 12 and 13)."""

    def test_health_checks_start_no_process_at_rest(self, api, run_agent, container,
                                                    counting_docker):
        """Three containers with a health check every second (each check is
        three exec events): the agent starts no process for them (it re-read
        the list at each event: 600 docker CLI calls a minute)."""
        shim, calls = counting_docker
        health = ("--health-cmd", "true", "--health-interval", "1s")
        names = [container("sleep 600", options=health) for _ in range(3)]
        run_agent(api.url, "--docker-binary", shim)

        def all_healthy():
            return all((listed(api, n) or {}).get("status", "").endswith("(healthy)")
                       for n in names)

        wait_until(all_healthy, 20, "the containers healthy in the metrics")
        before = len(calls.read_text().split())
        with ContainerEvents() as events, \
                ContainerEvents("event=exec_die", f"container={names[0]}") as checks:
            wait_until(lambda: checks.count >= 5, 20, "five health checks")
        spawned = len(calls.read_text().split()) - before
        others = [a for a in events.actions if not a.startswith("exec_")]  # anyone's
        assert spawned <= 2 * (len(others) + 1), (spawned, others)

    def test_a_fast_event_stream_rereads_once_per_interval(self, api, run_agent,
                                                            tmp_path):
        """A CLI whose events stream never pauses: the list is re-read at
        most once per metrics interval (47 times a second)."""
        reads = tmp_path / "reads"
        shim = fake_docker(tmp_path, f"""
version) echo 99.0;;
events) while :; do echo '{{"Type":"container","Action":"start"}}'; sleep 0.01; done;;
ps) echo ps >> {reads}; echo '{GOOD_ROW}';;
container) ;;
""")
        run_agent(api.url, "--docker-binary", shim)  # metrics every 0.5 s
        wait_until(lambda: listed(api, "good"), 10, "the list")
        start_reads, start_ticks = reads.read_text().count("ps"), len(api.metrics())
        started = time.monotonic()
        wait_until(lambda: len(api.metrics()) >= start_ticks + 8, 10, "eight ticks")
        intervals = (time.monotonic() - started) / 0.5
        rereads = reads.read_text().count("ps") - start_reads
        assert rereads <= intervals + 2, (rereads, intervals)

    def test_a_bad_row_costs_only_itself(self, api, run_agent, tmp_path):
        """A port range that spans 4 billion ports, fields of the wrong type,
        garbage, and a StartedAt that is a number: the good row is listed and
        Docker is "ok" (one such row emptied the list, status "error")."""
        rows = [GOOD_ROW,
                GOOD_ROW.replace("good", "ranges").replace("0123", "fedc").replace(
                    "0.0.0.0:8080->80/tcp", "0.0.0.0:1-4294967295->1-4294967295/tcp"),
                '{"id":["x"],"names":1}', "garbage", "[" * 5000, "null"]
        states = ['{"id":"0123456789ab0000","state":{"Running":true,"StartedAt":1234,'
                  '"Health":"x","ExitCode":"nine"},"ports":{"80/tcp":"x"},'
                  '"network":5,"exposed":[],"bindings":"x","publish_all":"yes",'
                  '"restart":7,"healthcheck":{"Test":"CMD"}}',
                  '{"id":"fedc456789ab0000","state":{"Running":true},'
                  '"restart":{"Name":["x"]},"ports":{"1-4294967295/tcp":null}}',
                  '{"id":"ffffffffffff","state":[]}', "[[[", '{"id":5}']
        shim = fake_docker(tmp_path, f"""
version) echo 99.0;;
events) exec sleep 3600;;
ps) printf '%s\\n' {" ".join(shlex_quote(r) for r in rows)};;
container) printf '%s\\n' {" ".join(shlex_quote(s) for s in states)};;
""")
        proc = run_agent(api.url, "--docker-binary", shim)
        wait_until(lambda: listed(api, "ranges"), 10, proc.log)
        assert api.metrics()[-1]["docker"]["status"] == "ok"
        assert listed(api, "good")["ports"] == [
            {"private_port": 80, "public_port": 8080, "type": "tcp"}]
        assert listed(api, "ranges")["ports"] == []
        assert listed(api, "good")["status"].startswith("Up")  # from its state
        names = [c["name"] for c in api.metrics()[-1]["containers"]]
        assert names == ["good", "ranges"]

    def test_cli_calls_in_flight_end_with_the_agent(self, api, run_agent, tmp_path):
        """A re-read of the list and a request's `docker logs` hang when the
        agent stops: they end with it (they outlived it, orphaned)."""
        listing, logs = f"761.{os.getpid()}", f"762.{os.getpid()}"
        shim = fake_docker(tmp_path, f"""
version) echo 99.0;;
events) exec sleep 3600;;
ps) exec sleep {listing};;
logs) exec sleep {logs};;
*) echo "Error: No such container: x" >&2; exit 1;;
""")
        proc = run_agent(api.url, "--docker-binary", shim)
        wait_until(lambda: group_members(listing), 10, "the hanging docker ps")
        wait_until(api.metrics, 10, "the agent, connected")  # else the request is lost
        send(api, "get_container_logs", "logs-1", container_id="web")
        wait_until(lambda: group_members(logs), 10, "the hanging docker logs")
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.exit_status() == 0
        wait_until(lambda: not group_members(listing) and not group_members(logs), 5,
                   "no docker CLI left running")
        reply = one_reply_each(api, {"logs-1"})["logs-1"][0]
        assert reply["type"] == "error" and "killed" in reply["message"]

    def test_cli_processes_die_with_a_killed_agent(self, api, run_agent, tmp_path):
        """SIGKILL leaves the agent no time to end anything: `docker events`
        (which never ends on its own) and a hung call die with it all the same."""
        events, listing = f"763.{os.getpid()}", f"764.{os.getpid()}"
        shim = fake_docker(tmp_path, f"""
version) echo 99.0;;
events) exec sleep {events};;
ps) exec sleep {listing};;
*) echo "Error: No such container: x" >&2; exit 1;;
""")
        proc = run_agent(api.url, "--docker-binary", shim)
        wait_until(lambda: group_members(listing) and group_members(events), 10,
                   "the docker events process and the hanging docker ps")
        proc.proc.kill()
        proc.proc.wait(10)
        wait_until(lambda: not group_members(listing) and not group_members(events),
                   5, "no docker CLI left running")


def shlex_quote(text):
    return "'" + text.replace("'", "'\\''") + "'"


def read_client_frame(conn, raw=False):
    """(opcode, payload) of the next frame the agent sends (masked, RFC 6455
    section 5.3), or None at the end of the connection; with `raw`, its bytes
    as they came too."""
    def exactly(n):
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    try:
        head = exactly(2)
        length = head[1] & 0x7F
        if length >= 126:
            extended = exactly(2 if length == 126 else 8)
            head, length = head + extended, int.from_bytes(extended, "big")
        mask = exactly(4)
        payload = exactly(length)
    except (EOFError, OSError):
        return None
    frame = head[0] & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return (*frame, head + mask + payload) if raw else frame


def after_auth(*chunks, closes, extensions=None, before=None):
    """An answer for RawPeer: the upgrade (agreeing to `extensions`),
    auth_success, `before(conn)` if given, then `chunks`; the code of the close
    frame the agent sends is appended to `closes` (None if it sends none
    within 3 s)."""
    def answer(conn, request):
        conn.sendall(upgrade_answer(request, extensions))
        read_client_frame(conn)  # auth
        conn.sendall(ws_frame(json.dumps({"type": "auth_success"})))
        if before is not None:
            before(conn)
        for chunk in chunks:
            conn.sendall(chunk)
        conn.settimeout(3)
        code = None
        while True:
            frame = read_client_frame(conn)
            if frame is None or frame[0] == 0x8:
                code = frame and int.from_bytes(frame[1][:2], "big")
                break
        closes.append(code)

    return answer


class TestHostileClose:
    """What RFC 6455 says of bad text and bad close frames (issue 18, defect 14)."""

    def test_each_breach_is_answered_with_its_close_code(self, api, run_agent):
        """A text message that is not UTF-8: 1007 (it was answered with an
        error and the connection kept). A close frame with code 1005 (which
        no endpoint may send) and a reason that is not UTF-8: 1002 (it was
        answered 1000). A reason that is not UTF-8: 1007. Reserved bits: 1002.
        A close with a registered code: 1000. The agent connects again."""
        closes = []
        cases = [
            (ws_frame(b'{"type":"\xff"}'), 1007),
            (ws_frame((1005).to_bytes(2, "big") + b"\xff\xfe", 0x8), 1002),
            (ws_frame((1000).to_bytes(2, "big") + b"\xc3", 0x8), 1007),
            (ws_frame(b"{}", 0x1, rsv=4), 1002),
            (ws_frame((1012).to_bytes(2, "big") + b"restart", 0x8), 1000),
        ]
        peer = RawPeer([after_auth(chunk, closes=closes) for chunk, _ in cases],
                       upstream=api.port)
        try:
            run_agent(peer.url, "--reconnect-max-delay-s", "0.5")
            wait_until(api.metrics, 30, lambda: f"the agent back; closes {closes}")
            assert closes == [code for _, code in cases]
        finally:
            peer.close()

    def test_a_binary_message_that_is_not_utf8_is_only_refused(self, api, run_agent):
        """Binary messages are the agent's to judge, not RFC 6455's: one that
        is not UTF-8 gets an error reply; the connection stays up."""
        run_agent(api.url)
        wait_until(api.metrics, 6, "the agent")
        api.send_all(b'{"type":"ping","request_id":"b-1","x":"\xff"}')
        api.send_all(json.dumps({"type": "ping", "request_id": "b-2"}))
        wait_until(lambda: one_reply_each(api, {"b-2"}), 5, "the pong")
        errors = api.messages("error")
        assert any("not UTF-8" in m["message"] for m in errors)
        assert len(api.connects) == 1


class TestConnectionCompressed:
    """permessage-deflate (RFC 7692), offered and used when the API agrees
    (issue 20): against the API's own settings, a capped window, a server
    that declines, and with the offer turned off."""

    @pytest.mark.parametrize("deflate, window", [("uvicorn", 15), ("capped", 12)])
    def test_the_api_agrees_and_both_ways_are_compressed(self, run_agent, deflate,
                                                        window):
        api = FakeAPI(deflate=deflate).start()
        try:
            proc = run_agent(api.url)
            wait_until(lambda: len(api.metrics()) >= 3, 10, proc.log)
            agreed = api.extensions[0]
            assert len(agreed) == 1 and agreed[0].remote_max_window_bits == window
            assert f"permessage-deflate, a window of {window} bits" in proc.log()
            cmd = Commander(api, proc)  # the API's requests come compressed too
            assert cmd.run("echo squeezed")["data"]["output"] == "squeezed\n"
            big = cmd.run("head -c 300000 /dev/zero | tr '\\0' x")["data"]
            assert big["output_bytes"] == 300000 and len(big["output"]) == 300000
        finally:
            api.stop()

    def test_a_server_that_declines_gets_plain_frames(self, run_agent):
        api = FakeAPI(deflate=None).start()
        try:
            proc = run_agent(api.url)
            wait_until(lambda: len(api.metrics()) >= 2, 10, proc.log)
            assert api.extensions[0] == [] and "frames: uncompressed" in proc.log()
        finally:
            api.stop()

    def test_the_offer_can_be_turned_off(self, run_agent):
        api = FakeAPI(deflate="uvicorn").start()
        try:
            proc = run_agent(api.url, "--compression", "false")
            wait_until(lambda: len(api.metrics()) >= 2, 10, proc.log)
            assert api.extensions[0] == [] and "frames: uncompressed" in proc.log()
            assert api.offers == [None]
        finally:
            api.stop()

    @pytest.mark.parametrize("answer, agreed", [
        ("permessage-deflate", {}),
        ("Permessage-Deflate; server_no_context_takeover; client_max_window_bits=9",
         {"server_no_context_takeover": None, "client_max_window_bits": "9"}),
        ('permessage-deflate; server_max_window_bits="10"; client_no_context_takeover',
         {"server_max_window_bits": "10", "client_no_context_takeover": None}),
    ])
    def test_answers_the_offer_allows(self, answer, agreed):
        assert agent.deflate_params(answer) == agreed

    @pytest.mark.parametrize("answer", [
        "x-webkit-deflate-frame", "permessage-deflate, permessage-deflate",
        "permessage-deflate; x_custom=1", "permessage-deflate; client_max_window_bits",
        "permessage-deflate; client_max_window_bits=16",
        "permessage-deflate; server_max_window_bits=7",
        "permessage-deflate; server_no_context_takeover=1",
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        # digits to str.isdigit(), not to int() (issue 26, defect 5)
        "permessage-deflate; client_max_window_bits=\u00b2",
        "permessage-deflate; server_max_window_bits=\u0661\u0665",
    ])
    def test_answers_the_offer_does_not_allow(self, answer):
        with pytest.raises(agent.ProtocolError, match="did not offer"):
            agent.deflate_params(answer)

    def test_compressed_messages_fragmented_and_split_anywhere(self):
        """Property test of the frame reader: compressed messages (context
        kept, as the API keeps it), cut into fragments anywhere and read a
        byte at a time, come out whole; plain control frames between
        fragments pass through. Any message may end its deflate stream with
        a final block (RFC 7692 section 7.2.3.3), with or without the empty
        block the RFC's example puts after it: later ones, which may refer
        back across it, still come out whole (issue 26, defect 2)."""
        hypothesis = need_module("hypothesis")
        st = hypothesis.strategies

        @hypothesis.settings(max_examples=80, deadline=None)
        @hypothesis.given(st.lists(st.tuples(
            st.text(max_size=3000), st.lists(st.integers(0, 4000), max_size=4),
            st.booleans(), st.sampled_from(["sync", "final", "final+00"])),
            min_size=1, max_size=5), st.sampled_from([1, 7, 65536]))
        def check(messages, chunk):
            sender = ContextSender()
            stream = b""
            for text, cuts, with_ping, ending in messages:
                body = sender.body(json.dumps({"type": "x", "t": text}).encode(),
                                   ending)
                stream += fragments(body, sorted(set(c % (len(body) + 1)
                                                     for c in cuts)), with_ping)
            reader = agent.FrameReader(Trickle(stream, chunk), agent.Deflate({}))
            got = []
            while len(got) < len(messages):
                opcode, payload = reader.next_message()
                if opcode == agent.OP_TEXT:
                    got.append(json.loads(payload)["t"])
            assert got == [text for text, _, _, _ in messages]

        check()

    def test_a_stream_ended_by_a_final_block_leaves_later_messages_whole(
            self, api, run_agent):
        """An API that keeps its compression context and ends a message with
        a final block (RFC 7692 section 7.2.3.3): each later request, which
        refers back across that end, is still read and answered, where it
        was answered "not JSON" and lost (issue 26, defect 2)."""
        sender = ContextSender()
        requests = [{"type": "ping", "request_id": f"bf-{n}", "pad": "chatops " * 40}
                    for n in range(4)]
        endings = ["final", "sync", "final+00", "sync"]
        frames = b"".join(
            ws_frame(sender.body(json.dumps(r).encode(), e), rsv=4)
            for r, e in zip(requests, endings))
        replies = []

        def answer(conn, request):
            conn.sendall(upgrade_answer(request, "permessage-deflate"))
            read_client_frame(conn)  # auth
            conn.sendall(ws_frame(json.dumps({"type": "auth_success"})) + frames)
            conn.settimeout(10)
            inflater = zlib.decompressobj(-15)  # the agent keeps its context
            while len(replies) < len(requests):
                frame = read_client_frame(conn)
                if frame is None:
                    return
                if frame[0] == 0x1:
                    text = inflater.decompress(frame[1] + agent.DEFLATE_TAIL)
                    if b"request_id" in text:
                        replies.append(json.loads(text)["request_id"])

        peer = RawPeer([answer], upstream=api.port)
        try:
            proc = run_agent(peer.url)
            wait_until(lambda: len(replies) == len(requests), 10,
                       lambda: f"the replies (got {replies}); {proc.log()}")
            assert replies == [r["request_id"] for r in requests]
            assert "not JSON" not in proc.log()
        finally:
            peer.close()


    def test_a_message_of_many_deflate_streams_is_refused(self):
        """Each stream that ends costs a window's copy to seed the next: more
        than MAX_DEFLATE_STREAMS ended in one message is refused with 1002,
        however few bytes they take."""
        empty_final = zlib.compressobj(6, zlib.DEFLATED, -15).flush()  # 2 bytes
        for ended, refused in ((agent.MAX_DEFLATE_STREAMS, False),
                               (agent.MAX_DEFLATE_STREAMS + 1, True)):
            body = empty_final * ended + deflated(b'{"type":"x"}')
            reader = agent.FrameReader(Trickle(ws_frame(body, rsv=4), 65536),
                                       agent.Deflate({}))
            if refused:
                with pytest.raises(agent.ProtocolError, match="deflate streams"):
                    reader.next_message()
            else:
                assert reader.next_message() == (agent.OP_TEXT, '{"type":"x"}')


class ContextSender:
    """A peer that compresses with its context kept from message to message,
    and may end a message's deflate stream with a final block (then its next
    stream starts from the window it had), with or without the empty stored
    block RFC 7692's example sends after it (section 7.2.3.3)."""

    def __init__(self):
        self.compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
        self.history = b""

    def body(self, data, ending="sync"):
        """`data` as a message's payload, its stream ended as `ending` says:
        sync (the usual flush, its tail removed), final, or final+00."""
        self.history = (self.history + data)[-32768:]
        out = self.compressor.compress(data)
        if ending == "sync":
            out += self.compressor.flush(zlib.Z_SYNC_FLUSH)
            assert out.endswith(agent.DEFLATE_TAIL)
            return out[:-4]
        out += self.compressor.flush(zlib.Z_FINISH)
        self.compressor = zlib.compressobj(6, zlib.DEFLATED, -15,
                                           zdict=self.history)
        return out + (b"\x00" if ending == "final+00" else b"")


class Trickle:
    """A socket that hands out `data` `chunk` bytes at a time, then EOF."""

    def __init__(self, data, chunk):
        self.data, self.chunk = memoryview(data), chunk

    def settimeout(self, timeout):
        pass

    def recv(self, size):
        piece = bytes(self.data[: min(size, self.chunk)])
        self.data = self.data[len(piece):]
        return piece


def fragments(body, cuts, with_ping=False):
    """A compressed message as frames cut at `cuts`: RSV1 on the first only,
    a ping (never compressed) after the first if asked."""
    bounds = [0, *[c for c in cuts if 0 < c < len(body)], len(body)]
    parts = [body[a:b] for a, b in zip(bounds, bounds[1:])] or [b""]
    frames = b""
    for n, part in enumerate(parts):
        frames += ws_frame(part, 0x1 if n == 0 else 0x0, fin=n == len(parts) - 1,
                           rsv=4 if n == 0 else 0)
        if n == 0 and with_ping:
            frames += ws_frame(b"", 0x9)
    return frames


class TestHostileCompression:
    """What a peer can do to the agent once compression is agreed, or
    pretending it is (issue 20)."""

    AGREED = "permessage-deflate"

    def test_each_breach_of_rfc_7692_is_a_protocol_error(self, api, run_agent):
        """RSV1 on a control frame, RSV1 when nothing was agreed, RSV1 on a
        continuation frame, corrupt deflate data, and an answer to the
        upgrade that agrees to what was not offered: each ends the connection
        with 1002, and the agent connects again."""
        closes = []
        head = deflated(b'{"type":"ping","request_id":"p"}')
        cases = [
            (after_auth(ws_frame(b"", 0x9, rsv=4), closes=closes,
                        extensions=self.AGREED), 1002),
            (after_auth(ws_frame(head, rsv=4), closes=closes), 1002),
            (after_auth(ws_frame(head[:5], fin=False, rsv=4)
                        + ws_frame(head[5:], 0x0, rsv=4), closes=closes,
                        extensions=self.AGREED), 1002),
            (after_auth(ws_frame(b"\xff\xfe\xfd\xfc not deflate", rsv=4),
                        closes=closes, extensions=self.AGREED), 1002),
            (agreeing("permessage-deflate; x_custom=1", closes), 1002),
            (agreeing("permessage-deflate; client_max_window_bits=16", closes), 1002),
            # a digit to str.isdigit(), no number to int() (issue 26, defect 5)
            (agreeing("permessage-deflate; client_max_window_bits=\u00b2", closes),
             1002),
            # two lines are two extensions, as on one line (issue 26, defect 5)
            (agreeing("permessage-deflate", closes,
                      again="permessage-deflate; client_max_window_bits=10"), 1002),
        ]
        peer = RawPeer([answer for answer, _ in cases], upstream=api.port)
        try:
            proc = run_agent(peer.url, "--reconnect-max-delay-s", "0.5")
            wait_until(api.metrics, 30, lambda: f"the agent back; closes {closes}")
            assert closes == [code for _, code in cases], proc.log()
            assert proc.log().count("the API agreed to an extension the agent did "
                                    "not offer") == 4
            assert '(more than one: "permessage-deflate, permessage-deflate; ' \
                'client_max_window_bits=10")' in proc.log()
            assert "unexpectedly" not in proc.log()
        finally:
            peer.close()

    @pytest.mark.parametrize("split", [False, True], ids=["one frame", "fragments"])
    def test_a_deflate_bomb_ends_the_connection_and_costs_no_memory(
            self, api, run_agent, gigabyte_bomb, split):
        """1 MiB that inflates to 1 GiB, in one frame or in fragments of 64
        KiB: the message cap (4 MiB) applies to what it inflates to, so the
        connection ends with 1009, and the agent's peak memory grows by less
        than 8 MiB: the message is refused while it is inflated, without its
        compressed and inflated copies held at once (issue 26, defect 8)."""
        bomb = gigabyte_bomb
        frames = fragments(bomb, range(65536, len(bomb), 65536)) if split else \
            ws_frame(bomb, rsv=4)
        closes, measured = [], {}
        started = threading.Event()

        def reset_peak(conn):  # the peak from the second sample on: start-up
            started.wait(10)  # and the first sample's memory trim are over
            read_client_frame(conn)
            read_client_frame(conn)
            pid = started.pid
            pathlib.Path(f"/proc/{pid}/clear_refs").write_text("5")
            measured["rss"] = proc_status_kib(pid, "VmRSS")

        peer = RawPeer([after_auth(frames, closes=closes, extensions=self.AGREED,
                                   before=reset_peak)],
                       upstream=api.port)
        try:
            proc = run_agent(peer.url, "--reconnect-max-delay-s", "0.5")
            started.pid = proc.proc.pid
            started.set()
            wait_until(api.metrics, 30, lambda: f"the agent back; closes {closes}")
            grown_kib = proc_status_kib(proc.proc.pid, "VmHWM") - measured["rss"]
            assert closes == [1009], proc.log()
            assert grown_kib < 8 * 1024, grown_kib
            assert "inflates to more than 4194304 bytes" in proc.log()
        finally:
            peer.close()


@pytest.fixture(scope="session")
def gigabyte_bomb():
    """A permessage-deflate payload of about 1 MiB that inflates to 1 GiB of
    zeros, made without holding the GiB."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    zeros = bytes(2**20)
    body = b"".join(compressor.compress(zeros) for _ in range(1024))
    body += compressor.flush(zlib.Z_SYNC_FLUSH)
    assert body.endswith(agent.DEFLATE_TAIL) and len(body) < 2**21
    return body[:-4]


def agreeing(extensions, closes, again=None):
    """An answer for RawPeer: an upgrade that agrees to `extensions` (and to
    `again` on a second Sec-WebSocket-Extensions line, if given); the code
    of the agent's first frame, if it is a close, goes to `closes`."""
    def answer(conn, request):
        head = upgrade_answer(request, extensions)
        if again is not None:
            head = head[:-2] + b"Sec-WebSocket-Extensions: %s\r\n\r\n" % again.encode()
        conn.sendall(head)
        conn.settimeout(3)
        frame = read_client_frame(conn)
        closes.append(frame and frame[0] == 0x8
                      and int.from_bytes(frame[1][:2], "big"))

    return answer


def proc_status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class TestHostileOperator:
    """What the operator's side can hand the agent: files that are no
    files, magnitudes that pass a check and then kill a thread (issue 18,
    defect 15)."""

    def test_a_config_that_is_no_regular_file_is_refused_at_once(self, tmp_path):
        fifo = tmp_path / "config.fifo"
        os.mkfifo(fifo)
        big = tmp_path / "big.json"
        big.write_text('{"log_level": "info"' + " " * 2**21 + "}")
        for path, why in ((fifo, "it is a FIFO"), ("/dev/zero", "character device"),
                          (big, "larger than 1024 KiB"), (tmp_path, "a directory")):
            out = run_cli("--print-config", "--config", str(path), timeout=10)
            assert out.returncode == 2 and why in out.stderr, out.stderr

    def test_a_ca_file_that_is_a_fifo_blocks_nothing(self, tmp_path):
        fifo = tmp_path / "ca.fifo"
        os.mkfifo(fifo)
        out = run_cli("--print-config", "--api-url", "https://127.0.0.1:9",
                      "--ca-file", str(fifo), timeout=10)
        assert out.returncode == 2 and "it is a FIFO" in out.stderr

    @pytest.mark.parametrize("flag, value", [
        ("--metrics-interval-s", "1e300"), ("--metrics-interval-s", "1e-300"),
        ("--heartbeat-interval-s", "1e300"), ("--reconnect-max-delay-s", "1e300"),
        ("--request-deadline-s", "1e300"), ("--docker-check-s", "1e300"),
        ("--docker-refresh-s", "1e300"), ("--docker-timeout-s", "1e300"),
        ("--command-workers", "100000"), ("--buffer-size", "1000000000"),
        ("--command-output-max-bytes", "1000000000000"),
        ("--docker-stop-timeout-s", "100000000"), ("--command-timeout-s", "1e300"),
    ])
    def test_a_magnitude_no_thread_survives_is_refused_at_start(self, flag, value):
        """Each of these passed the checks, and then a wait overflowed and
        killed its thread, or the threads could not all start, or memory ran
        out: now refused, with the range."""
        out = run_cli("--print-config", flag, value)
        assert out.returncode == 2 and "must be from" in out.stderr, out.stderr

    def test_a_nul_in_a_setting_is_refused_at_start(self, tmp_path):
        """A NUL (only a JSON file can hold one) passed the checks and failed
        where it was used: the spool's makedirs at start, the docker CLI's
        start in its thread."""
        for key in ("state_dir", "docker_binary", "command_cwd"):
            config = write_config(tmp_path, {key: "/tmp/a\u0000b"})
            out = run_cli("--print-config", "--config", config)
            assert out.returncode == 2 and "holds a NUL character" in out.stderr

    def test_a_key_file_with_a_line_break_works(self, api, tmp_path):
        """A key copied with its newline: trimmed (--check crashed on it). A
        control character inside the key is refused, and the key not shown."""
        config = write_config(tmp_path, {"api_url": api.url, "api_key": KEY + "\n"})
        out = run_cli("--check", "--config", config)
        assert "ok   API key accepted" in out.stdout, out.stdout + out.stderr
        config = write_config(tmp_path, {"api_url": api.url, "api_key": "ab\x1bcd"})
        out = run_cli("--check", "--config", config)
        assert out.returncode == 2 and "holds a control character" in out.stderr
        assert "ab\x1bcd" not in out.stderr

    def test_an_allow_expression_that_never_ends_freezes_nothing(self, commander):
        """'(a+)+$' on 40 a's and a '!' takes longer than the universe: Python's
        re holds the interpreter all the while, and the whole agent froze. It
        is matched in a child with a deadline: the command is refused."""
        cmd = commander("--command-allow", '["(a+)+$", "echo [a-z]+"]')
        slow = cmd.send("a" * 40 + "!")
        assert cmd.run("echo fine")["data"]["output"] == "fine\n"
        reply = cmd.reply(slow)
        assert reply["type"] == "error" and "nested repeats" in reply["message"]
