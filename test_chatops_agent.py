"""Tests of chatops_agent.py against real things: a WebSocket server on 127.0.0.1,
real agent processes, real files and this machine's /proc.

Run: python3 -m pytest -q test_chatops_agent.py
"""

import ast
import base64
import bisect
import collections
import contextlib
import datetime
import fcntl
import functools
import hashlib
import http.server
import inspect
import itertools
import json
import os
import pathlib
import pty
import pwd
import random
import re
import select
import shutil
import signal
import socket
import stat
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import urllib.parse
import venv
import symtable
import zipfile
import zlib

import pytest

import chatops_agent as agent

try:
    import psutil
except ImportError:
    psutil = None

from websockets.exceptions import ConnectionClosed
from websockets.http11 import Response
from websockets.datastructures import Headers
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.sync.server import serve

# websockets 13 (the last for Python 3.8) has no keepalive pings to turn off.
SERVE_PINGS = "ping_interval" in inspect.signature(serve).parameters

AGENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chatops_agent.py")
KEY = "test-key-7f3a9c1e5b2d"
SERVER_ID = "0b7c1a52-5d1e-4c55-9a43-6f0b6b1c9e21"


###############################################################################
# Helpers #####################################################################
###############################################################################


def wait_until(predicate, timeout_s=10.0, what="condition"):
    """Poll `predicate` until it is true; fail with `what` (text, or a function
    that says it at that moment) after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    what = what() if callable(what) else what
    raise AssertionError(f"timed out after {timeout_s:.1f} s waiting for {what}")


def require(condition, reason):
    """Skip with a reason locally; in CI what the test needs must be there,
    unless CHATOPS_TEST_EXPECT_MISSING ("a; b") names the reason's start."""
    if condition:
        return
    expected = os.environ.get("CHATOPS_TEST_EXPECT_MISSING", "").split(";")
    if os.environ.get("CI") and not any(
        e.strip() and reason.startswith(e.strip()) for e in expected
    ):
        pytest.fail("CI must provide this: " + reason)
    pytest.skip(reason)


def need_module(name):
    """Import a test-only module, skipping (failing in CI) where it is missing."""
    try:
        return __import__(name)
    except ImportError:
        require(
            False, f"{name} is not installed (pip install -r requirements-test.txt)"
        )


def clean_env(**extra):
    """The environment for an agent process: no proxies, no CHATOPS_ leftovers,
    and no spool unless a test asks for one (agents must not share one)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CHATOPS_") and "proxy" not in k.lower()
    }
    env["CHATOPS_STATE_DIR"] = "none"
    env.update(extra)
    return env


def command_line(pid):
    """The argv of process `pid`, as /proc shows it."""
    with open(f"/proc/{pid}/cmdline") as f:
        return f.read().split("\0")[:-1]


def parse_ts(text):
    return time.mktime(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")) + float(
        text[19:-1] or 0
    )


###############################################################################
# A fake ChatOps API ##########################################################
###############################################################################


class FakeAPI:
    """The ChatOps API's WebSocket side, as docs/protocol.md describes it, on
    127.0.0.1.

    Records every frame as (connection number, message). Can reject keys with
    close 1008, stop acknowledging, go silent, stop reading, drop connections,
    and stop and start again on the same port. Answers GET /health and
    /api/v1/api-keys/me. Misbehaves on demand: redirects, a raw auth answer,
    WebSocket pings, a key echoed in a 401.

    `deflate`: "capped", websockets' own default (the client's window capped
    at 12 bits); "uvicorn", as the ChatOps API's uvicorn configures it (no
    cap, context kept both ways); None, no compression.
    """

    def __init__(self, key=KEY, ack=True, ssl_context=None, port=0, deflate="capped"):
        self.key = key
        self.deflate = deflate
        self.offers = []  # the extensions each upgrade offered (None: none)
        self.extensions = []  # the extensions agreed on each connection, in order
        self.ack = ack
        self.silent = False  # reads frames but answers none
        self.hearing = threading.Event()  # cleared: stops reading frames at all
        self.hearing.set()
        self.reject_with_error_frame = False  # the docs' variant of a rejection
        self.upgrade_status = None  # e.g. 403: refuse the WebSocket upgrade
        self.redirect = None  # (status, location): redirect the WebSocket upgrade
        self.http_redirect = None  # a base URL every HTTP GET is redirected to
        self.auth_reply = None  # raw text sent instead of the usual auth_success
        self.echo_key_in_401 = False  # a careless API that repeats a bad key
        self.ssl_context = ssl_context
        self.port = port
        self.frames = []
        self.http_requests = []  # (path, headers) of every plain HTTP request
        self.connections = []  # live server connections
        self.connects = []  # monotonic time of each accepted TCP+WS connection
        self.closes = []  # (code, reason) the agent closed with
        self.rejections = 0
        self.lock = threading.Lock()
        self.new_frame = threading.Condition(self.lock)  # notified on every frame
        self.server = None

    # -- lifecycle -------------------------------------------------------------
    def start(self):
        options = {"ping_interval": None} if SERVE_PINGS else {}
        if self.deflate != "capped":
            options["compression"] = None
        if self.deflate == "uvicorn":
            options["extensions"] = [ServerPerMessageDeflateFactory()]
        self.server = serve(
            self._handle,
            sock=self._listen(),
            ssl=self.ssl_context,
            process_request=self._http,
            max_size=16 * 1024 * 1024,  # as uvicorn, which serves the ChatOps API
            **options,
        )
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def _listen(self):
        """The listening socket, on the same port again after a stop."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen()
        self.port = sock.getsockname()[1]
        return sock

    def stop(self):
        self.server.shutdown()
        self.drop()

    def close_all(self, code, reason=""):
        """Close every connection with a close frame, as a server that restarts."""
        with self.lock:
            conns = list(self.connections)
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close(code, reason)

    def drop(self):
        """Break every connection without a close handshake, like a crashed server."""
        with self.lock:
            conns, self.connections = list(self.connections), []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.socket.shutdown(socket.SHUT_RDWR)

    @property
    def url(self):
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    # -- what it saw -----------------------------------------------------------
    def messages(self, kind=None):
        with self.lock:
            return [m for _, m in self.frames if kind is None or m.get("type") == kind]

    def metrics(self):
        return [m["data"] for m in self.messages("metrics")]

    # -- the server ------------------------------------------------------------
    def _http(self, connection, request):
        if request.path == agent.WS_PATH:
            with self.lock:
                self.offers.append(request.headers.get("Sec-WebSocket-Extensions"))
            if self.redirect:
                status, location = self.redirect
                return self._json(status, {}, [("Location", location)])
            if self.upgrade_status:
                return self._json(self.upgrade_status, {"detail": "Forbidden"})
            return None
        with self.lock:
            self.http_requests.append((request.path, list(request.headers.raw_items())))
        if self.http_redirect:
            location = self.http_redirect + request.path
            return self._json(302, {}, [("Location", location)])
        if request.path == "/health":
            return self._json(200, {"status": "healthy"})
        if request.path == "/api/v1/api-keys/me":
            given = request.headers.get("X-API-Key")
            if given != self.key:
                echo = f" {given}" if self.echo_key_in_401 else ""
                return self._json(401, {"detail": "Invalid API key" + echo})
            return self._json(
                200,
                {
                    "server_id": SERVER_ID,
                    "key_id": "k1",
                    "name": "test",
                    "is_active": True,
                },
            )
        return None

    @staticmethod
    def _json(status, body, extra_headers=()):
        data = json.dumps(body).encode()
        headers = [("Content-Type", "application/json"),
                   ("Content-Length", str(len(data))), *extra_headers]
        reason = {200: "OK", 401: "Unauthorized"}.get(status, "Other")
        return Response(status, reason, Headers(headers), data)

    def _handle(self, conn):
        with self.lock:
            number = len(self.connects)
            self.connects.append(time.monotonic())
            self.connections.append(conn)
            self.extensions.append(list(conn.protocol.extensions))
        try:
            if not self._authenticate(conn, number):
                return
            while self.hearing.wait():
                self._on_frame(conn, number, conn.recv())
        except ConnectionClosed:
            pass
        finally:
            received = conn.protocol.close_rcvd  # the agent's close frame, if any
            if received is not None:
                with self.lock:
                    self.closes.append((received.code, received.reason))

    def _authenticate(self, conn, number):
        first = json.loads(conn.recv())
        with self.lock:
            self.frames.append((number, first))
        if first.get("type") != "auth" or first.get("api_key") != self.key:
            with self.lock:
                self.rejections += 1
            if self.reject_with_error_frame:
                error = {"type": "error", "message": "Invalid or inactive API key"}
                conn.send(json.dumps(error))
            conn.close(1008, "Invalid or inactive API key")
            return False
        if self.auth_reply is not None:
            conn.send(self.auth_reply)
            return True
        conn.send(
            json.dumps(
                {
                    "type": "auth_success",
                    "server_id": SERVER_ID,
                    "message": "Connected successfully",
                }
            )
        )
        return True

    def wait_for(self, predicate, timeout_s, what):
        """Wait until predicate() (called under the lock) is true; each frame wakes."""
        with self.new_frame:
            if not self.new_frame.wait_for(predicate, timeout_s):
                raise AssertionError(f"no {what} within {timeout_s} s")
            return predicate()

    def _on_frame(self, conn, number, raw):
        message = json.loads(raw)
        with self.lock:
            self.frames.append((number, message))
            self.new_frame.notify_all()
        if self.silent:
            return
        if message.get("type") == "metrics" and self.ack:
            conn.send(json.dumps({"type": "metrics_received", "status": "ok"}))
        elif message.get("type") == "ping":
            conn.send(json.dumps({"type": "pong"}))

    def send_all(self, text):
        with self.lock:
            conns = list(self.connections)
        for conn in conns:
            conn.send(text)

    def ws_ping(self, payload=b"hi"):
        """A WebSocket-level ping frame (uvicorn and websockets send them)."""
        with self.lock:
            conns = list(self.connections)
        for conn in conns:
            with contextlib.suppress(ConnectionClosed, RuntimeError):
                conn.ping(payload)


WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3


class RawPeer:
    """A TCP port on 127.0.0.1 that answers each connection with bytes of a
    test's choosing: a banner, a broken redirect, garbage, or a valid upgrade
    followed by raw frames. Each connection takes the next answer; when they
    are used up, connections are relayed to `upstream` (a FakeAPI's port), so
    a test can see the agent recover.

    A relay can stop reading what the agent sends (`reading` cleared) while
    what the API sends still goes through: with a small receive buffer
    (`rcvbuf`), the agent's writer is then soon stuck, whatever the API's own
    WebSocket library buffers."""

    def __init__(self, answers=(), upstream=None, rcvbuf=None):
        self.answers = collections.deque(answers)
        self.upstream = upstream
        self.requests = []  # the upgrade request of each connection, as bytes
        self.reading = threading.Event()
        self.reading.set()
        self.listener = socket.socket()
        if rcvbuf:  # set before listen(), so that accepted sockets inherit it
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self.listener.close()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            conn.settimeout(10)
            request = b""
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in request:
                    data = conn.recv(4096)
                    if not data:
                        return
                    request += data
            self.requests.append(request)
            answer = self.answers.popleft() if self.answers else None
            with contextlib.suppress(OSError):
                if callable(answer):
                    answer(conn, request)
                elif answer is not None:
                    conn.sendall(answer)
                elif self.upstream:
                    self._relay(conn, request)

    def _relay(self, conn, request):
        conn.settimeout(None)
        with socket.create_connection(("127.0.0.1", self.upstream)) as up:
            up.sendall(request)
            threading.Thread(target=pump, args=(up, conn), daemon=True).start()
            pump(conn, up, self.reading)


def pump(source, sink, gate=None, dead=None):
    """Copy bytes until either side closes; while `gate` is clear, read
    nothing; once `dead` is set, read and drop."""
    with contextlib.suppress(OSError):
        while gate is None or gate.wait():
            data = source.recv(65536)
            if not data:
                break
            if dead is None or not dead.is_set():
                sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def upgrade_answer(request, extensions=None):
    """The 101 answer a WebSocket server gives to `request`, agreeing to
    `extensions` (a Sec-WebSocket-Extensions value) if given."""
    key = re.search(rb"(?i)sec-websocket-key: *(\S+)", request).group(1)
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID.encode()).digest())
    agreed = b"Sec-WebSocket-Extensions: %s\r\n" % extensions.encode() \
        if extensions else b""
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n%s\r\n"
            % (accept, agreed))


def deflated(data, compressor=None):
    """`data` as a permessage-deflate message's payload (RFC 7692 7.2.1)."""
    compressor = compressor or zlib.compressobj(6, zlib.DEFLATED, -15)
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(agent.DEFLATE_TAIL)
    return out[:-4]


def ws_frame(payload, opcode=0x1, fin=True, rsv=0, length=None, mask=False):
    """A server-to-client frame, valid or not: `length` may lie, bits may be wrong."""
    if isinstance(payload, str):
        payload = payload.encode()
    size = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    flag = 0x80 if mask else 0
    if size < 126:
        head += bytes([flag | size])
    elif size < 65536:
        head += bytes([flag | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([flag | 127]) + size.to_bytes(8, "big")
    return head + (b"\0\0\0\0" if mask else b"") + payload


def dripping(data, every_s, upgrade=False):
    """An answer for RawPeer that sends `data` a byte at a time, `every_s`
    apart (after a valid upgrade, if asked): each read of the agent returns
    in time, so only a deadline over the whole wait ends it."""

    def answer(conn, request):
        if upgrade:
            conn.sendall(upgrade_answer(request))
        for byte in data:
            conn.sendall(bytes([byte]))
            time.sleep(every_s)  # the peer's pace, not a wait

    return answer


def upgrade_then(*chunks, hold_s=0):
    """An answer for RawPeer: a valid upgrade, then `chunks` of raw bytes."""

    def answer(conn, request):
        conn.sendall(upgrade_answer(request))
        for chunk in chunks:
            conn.sendall(chunk)
        deadline = time.monotonic() + hold_s
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline and conn.recv(65536):
                pass

    return answer


class PortWithoutAPI:
    """The API's port while the API is down: it takes each connection and
    closes it at once, noting when, so that attempts can be counted."""

    def __init__(self, port):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen()
        self.attempts = []
        threading.Thread(target=self._refuse, daemon=True).start()

    def _refuse(self):
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                self.attempts.append(time.monotonic())
                conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self.listener.close()


class AgentProcess:
    """chatops_agent.py in a subprocess, its log in a file we can read while it
    runs. `command` starts it otherwise than `python3 chatops_agent.py`."""

    def __init__(self, tmp_path, *args, env=None, command=None, cwd=None,
                 stdin=subprocess.DEVNULL):
        self.log_path = tmp_path / f"agent-{time.monotonic_ns()}.log"
        self.log_file = open(self.log_path, "w")  # noqa: SIM115 -- closed in terminate()
        self.proc = subprocess.Popen(
            [*(command or [sys.executable, AGENT]), *args],
            env=env or clean_env(),
            cwd=cwd,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            text=True,
        )

    def log(self):
        return self.log_path.read_text()

    def wait_log(self, text, timeout_s=10.0):
        wait_until(
            lambda: text in self.log(),
            timeout_s,
            lambda: f"{text!r} in the agent's log:\n{self.log()[-2000:]}",
        )

    def exit_status(self, timeout_s=5.0):
        """How it exited; fails, showing the log's end, if it still runs then."""
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the agent still runs after {timeout_s:g} s; its log ends:\n"
                        f"{self.log()[-3000:]}")

    def terminate(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return self.proc.returncode


###############################################################################
# Fixtures ####################################################################
###############################################################################


@pytest.fixture(scope="session", autouse=True)
def stop_signals_at_their_defaults():
    """Agents start with SIGINT and SIGHUP as the tests were started with,
    and keep one that was ignored (as under nohup). A background job of a
    script has SIGINT ignored: so that the signal tests mean the same
    wherever they run, the test process handles both itself, and its
    children start with the defaults."""
    for signum, handler in ((signal.SIGINT, signal.default_int_handler),
                            (signal.SIGHUP, signal.SIG_DFL)):
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, handler)


@pytest.fixture
def api():
    server = FakeAPI().start()
    yield server
    server.stop()


@pytest.fixture
def run_agent(tmp_path):
    """Starts agent processes against a URL with the test key in the environment."""
    started = []

    def start(url, *args, key=KEY, **env):
        flags = [
            "--api-url",
            url,
            "--metrics-interval-s",
            "0.5",
            "--top-processes",
            "3",
            *args,
        ]
        extra = {"CHATOPS_API_KEY": key} if key else {}
        proc = AgentProcess(tmp_path, *flags, env=clean_env(**extra, **env))
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.terminate()


@pytest.fixture
def tls_api(tmp_path):
    """A FakeAPI behind TLS, its certificate for 127.0.0.1 and localhost from
    a test CA; and the CA's PEM file."""
    trustme = need_module("trustme")
    ca = trustme.CA()
    context = __import__("ssl").create_default_context(
        __import__("ssl").Purpose.CLIENT_AUTH
    )
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = FakeAPI(ssl_context=context).start()
    yield server, str(ca_file)
    server.stop()


def run_cli(*args, env=None, timeout=30):
    return subprocess.run(
        [sys.executable, AGENT, *args],
        env=env or clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


###############################################################################
# Helpers of the module #######################################################
###############################################################################


class TestHelpers:
    def test_backoff_full_jitter_grows_to_cap_and_resets(self):
        backoff = agent.Backoff(1.0, 60.0)
        delays = [backoff.next_delay() for _ in range(12)]
        ceilings = [min(60.0, 2**i) for i in range(12)]
        assert all(0 <= d <= c for d, c in zip(delays, ceilings))
        assert max(agent.Backoff(1.0, 60.0).next_delay() for _ in range(50)) <= 1.0
        backoff.reset()
        assert backoff.next_delay() <= 1.0

    def test_utc_timestamps_are_rfc3339_z(self):
        stamp = agent.utc_now()
        assert len(stamp) == 24 and stamp.endswith("Z") and stamp[10] == "T"
        assert abs(parse_ts(stamp) - time.mktime(time.gmtime())) < 5

    def test_newest_wheel_first(self):
        names = ["websocket_client-1.9.0-py3-none-any.whl",
                 "websocket_client-1.10.1-py3-none-any.whl"]
        assert max(names, key=agent.wheel_version) == names[1]

    def test_log_records_stay_one_line_and_never_show_the_key(self):
        formatter = agent.LogFormatter(KEY)
        text = "x\n2026-01-01T00:00:00Z CRITICAL forged\r\x1b[2J\u2028\ud800 " + KEY
        record = agent.logging.LogRecord("x", 30, "f", 1, "got %s", (text,), None)
        line = formatter.format(record)
        assert "\n" not in line and KEY not in line and "\x1b" not in line
        assert line.endswith("WARNING got x\\n2026-01-01T00:00:00Z CRITICAL forged"
                             "\\r\\x1b[2J\\u2028\\ud800 <redacted>")
        try:
            raise ValueError("bad\nCRITICAL forged " + KEY)
        except ValueError:
            record = agent.logging.LogRecord("x", 40, "f", 1, "failed", (),
                                             sys.exc_info())
        lines = formatter.format(record).splitlines()
        assert lines[0].endswith("ERROR failed") and KEY not in "".join(lines)
        assert all(line.startswith("    ") for line in lines[1:])


###############################################################################
# Configuration ###############################################################
###############################################################################


def write_config(tmp_path, data, mode=0o600, raw=None):
    path = tmp_path / "config.json"
    path.write_text(raw if raw is not None else json.dumps(data))
    path.chmod(mode)
    return str(path)


def agent_sections():
    """The agent's source, its syntax tree, and its sections: the line each
    starts on (the title line of its banner), and their titles."""
    with open(AGENT) as f:
        source = f.read()
    lines = source.splitlines()
    starts, titles = [], []
    for number, line in enumerate(lines[1:], start=2):
        if line.startswith("# ") and line.endswith("###") and \
                lines[number - 2].startswith("####"):
            starts.append(number)
            titles.append(line[2:].rstrip("#").strip())
    return source, ast.parse(source), starts, titles


def top_level_names(node):
    """The names a statement at the top level of the module defines."""
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        yield node.name
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            yield from (n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    elif isinstance(node, (ast.If, ast.Try, ast.ExceptHandler)):
        for child in ast.iter_child_nodes(node):
            yield from top_level_names(child)


def globals_used(table):
    """The module-level names a function or class (symtable) refers to,
    its nested scopes included; a local of the same name is not one."""
    for symbol in table.get_symbols():
        if symbol.is_referenced() and symbol.is_global():
            yield symbol.get_name()
    for child in table.get_children():
        yield from globals_used(child)


class TestLayout:
    """The file's rules, read from its syntax tree: each section uses only
    what comes before it, and capabilities are decided in Platform."""

    # (user, name) pairs allowed to refer to a later section, each with its
    # reason. None is needed today; add one only with a comment why.
    LATER_ALLOWED = {}

    def test_no_section_refers_to_a_later_one(self):
        source, tree, starts, titles = agent_sections()

        def section(lineno):
            return bisect.bisect_right(starts, lineno) - 1
        defined = {}
        for node in tree.body:
            for name in top_level_names(node):
                defined.setdefault(name, section(node.lineno))
        uses = []  # (user, the section it is in, a name it uses)
        for table in symtable.symtable(source, AGENT, "exec").get_children():
            uses += [(table.get_name(), section(table.get_lineno()), name)
                     for name in globals_used(table)]
        for node in tree.body:  # statements at the top level, defs aside
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                uses += [(f"line {node.lineno}", section(node.lineno), n.id)
                         for n in ast.walk(node) if isinstance(n, ast.Name)]
        later = sorted({
            f"{user} ({titles[here]}) uses {name} ({titles[defined[name]]})"
            for user, here, name in uses
            if defined.get(name, -1) > here and (user, name) not in self.LATER_ALLOWED})
        assert len(titles) >= 15 and titles[0] == "Platform", titles
        assert later == [], "\n".join(later)

    def test_the_file_keeps_its_own_map(self):
        """The module docstring lists the sections in file order, as the
        banners name them, and docs/architecture.md's table the same."""
        _, _, _, titles = agent_sections()
        doc = agent.__doc__
        where = [doc.find("\n    " + title) for title in titles]
        assert -1 not in where, [t for t, at in zip(titles, where) if at == -1]
        assert where == sorted(where), "the docstring lists the sections out of order"
        with open(ARCHITECTURE_DOC, encoding="utf-8") as f:
            table = f.read().split("| section | what it holds |", 1)[1]
        rows = re.findall(r"^\| ([^|]+?) \|", table.split("\n\n", 1)[0], re.M)
        assert rows == titles
        for thread in ("main", "metrics", "receive", "writer", "command-N",
                       "docker-N", "docker-events"):
            assert thread in doc.split("Threads:", 1)[1]

    def test_capabilities_are_decided_once_in_platform(self):
        """hasattr() or getattr() on a standard module, outside Platform, is
        a capability decided in the wrong place: make it a HAVE_ constant."""
        source, tree, starts, titles = agent_sections()
        platform_section = (starts[0], starts[1])
        modules = {"os", "sys", "socket", "signal", "select", "ssl", "fcntl", "time"}

        def asks_a_module(node):  # hasattr(os, ...), getattr(sys, ...)
            return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("hasattr", "getattr") and node.args
                    and isinstance(node.args[0], ast.Name)
                    and node.args[0].id in modules)
        asked = [f"line {n.lineno}: {ast.get_source_segment(source, n)}"
                 for n in ast.walk(tree) if asks_a_module(n)
                 and not platform_section[0] <= n.lineno < platform_section[1]]
        assert asked == [], "\n".join(asked)
        assert titles[1] == "Defaults"

    def test_protocol_names_are_data(self):
        """Each Docker row of REQUESTS names its action as the docs' table
        does, and no Python name becomes text: renaming a method changes
        nothing on the wire. (The name of an exception's type, in a message
        for a person, is no protocol name.)"""
        with open(PROTOCOL_DOC, encoding="utf-8") as f:
            rows = re.findall(r"^\| `(\w+)` \(`(\w+)`\) \| `(\w+)` \|", f.read(), re.M)
        assert len(rows) == 9, rows
        for request, reply, action in rows:
            route = agent.REQUESTS[request]
            assert (route.reply, route.action) == (reply, action), request
            assert agent.DOCKER_ACTIONS[action] is route
        assert sorted(agent.DOCKER_ACTIONS) == sorted(a for _, _, a in rows)
        source, tree, _, _ = agent_sections()
        def a_type(node):  # type(e), or a thread's args.exc_type
            return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "type") or (
                isinstance(node, ast.Attribute) and node.attr == "exc_type")
        named = [f"line {n.lineno}: {ast.get_source_segment(source, n)}"
                 for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                 and n.attr == "__name__" and not a_type(n.value)]
        assert named == [], "\n".join(named)


class TestConfiguration:
    def test_defaults(self):
        config = agent.load_config({}, {})
        assert config.api_url == "http://localhost:8000"
        assert config.metrics_interval_s == 5.0
        assert config.heartbeat_interval_s == 30.0
        assert config.buffer_size == 720
        assert config.api_key is None
        assert all(source == "default" for source in config.sources.values())

    def test_precedence_flag_over_env_over_file_over_default(self, tmp_path):
        path = write_config(
            tmp_path,
            {"metrics_interval_s": 3, "heartbeat_interval_s": 7, "buffer_size": 10},
        )
        env = {
            "CHATOPS_CONFIG": path,
            "CHATOPS_METRICS_INTERVAL_S": "2",
            "CHATOPS_HEARTBEAT_INTERVAL_S": "9",
        }
        config = agent.load_config({"metrics_interval_s": "1"}, env)
        assert (
            config.metrics_interval_s == 1.0
            and config.sources["metrics_interval_s"] == "flag"
        )
        assert config.heartbeat_interval_s == 9.0
        assert (
            config.sources["heartbeat_interval_s"] == "env CHATOPS_HEARTBEAT_INTERVAL_S"
        )
        assert (
            config.buffer_size == 10 and config.sources["buffer_size"] == "file " + path
        )
        assert (
            config.top_processes == 0 and config.sources["top_processes"] == "default"
        )

    def test_go_agent_single_dash_flags(self, tmp_path):
        path = write_config(tmp_path, {"log_level": "debug"})
        args = agent.build_parser().parse_args(
            ["-api-key", "abc", "-api-url", "https://api.example.com", "-config", path]
        )
        config = agent.load_config(agent.flags_given(args), {})
        assert (config.api_key, config.api_url, config.log_level) == (
            "abc",
            "https://api.example.com",
            "debug",
        )

    def test_switches_take_an_optional_value(self):
        parse = agent.build_parser().parse_args
        on = agent.load_config(agent.flags_given(parse(["--allow-plaintext"])), {})
        off = agent.load_config(
            agent.flags_given(parse(["--commands-enabled", "false"])), {}
        )
        assert on.allow_plaintext is True and off.commands_enabled is False

    def test_bool_from_env_and_file(self, tmp_path):
        path = write_config(tmp_path, {"tls_skip_verify": True})
        config = agent.load_config(
            {}, {"CHATOPS_CONFIG": path, "CHATOPS_ALLOW_PLAINTEXT": "yes"}
        )
        assert config.tls_skip_verify is True and config.allow_plaintext is True

    @pytest.mark.parametrize(
        "content, message",
        [
            (
                {"metrics_interval": 5},
                "unknown key 'metrics_interval' (did you mean 'metrics_interval_s'?)",
            ),
            ({"buffer_size": "720"}, "buffer_size must be a whole number"),
            ({"tls_skip_verify": 1}, "tls_skip_verify must be true or false"),
            ({"metrics_interval_s": -5}, "metrics_interval_s must be from 0.1 to 3600"),
            ({"heartbeat_interval_s": 0},
             "heartbeat_interval_s must be from 1 to 3600"),
            ({"log_level": "loud"}, "log_level must be one of"),
            ({"api_url": "ftp://x"}, "is not a URL the agent can use"),
            ([1, 2], "must hold a JSON object"),
        ],
    )
    def test_bad_file_values(self, tmp_path, content, message):
        path = write_config(tmp_path, content)
        with pytest.raises(
            agent.ConfigError,
            match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?"),
        ):
            agent.load_config({"config": path}, {})

    def test_invalid_json_names_line_and_column(self, tmp_path):
        path = write_config(
            tmp_path, None, raw='{\n  "api_url": "http://x",\n  oops\n}'
        )
        with pytest.raises(
            agent.ConfigError, match="not valid JSON: .* at line 3 column 3"
        ):
            agent.load_config({"config": path}, {})

    def test_unreadable_file(self, tmp_path):
        with pytest.raises(
            agent.ConfigError, match="cannot read config file .*missing.json"
        ):
            agent.load_config({"config": str(tmp_path / "missing.json")}, {})

    def test_bad_env_value(self):
        with pytest.raises(
            agent.ConfigError,
            match="environment variable CHATOPS_BUFFER_SIZE: buffer_size",
        ):
            agent.load_config({}, {"CHATOPS_BUFFER_SIZE": "lots"})

    def test_key_file_readable_by_others_refused_like_ssh(self, tmp_path):
        path = write_config(tmp_path, {"api_key": "k"}, mode=0o644)
        with pytest.raises(agent.ConfigError, match="chmod 600 " + path):
            agent.load_config({"config": path}, {})
        os.chmod(path, 0o600)
        assert agent.load_config({"config": path}, {}).api_key == "k"

    @pytest.mark.parametrize("key", [
        12345678901, ["secret-in-a-list"], {"k": "secret-in-an-object"}, 1.5e300])
    def test_a_key_of_the_wrong_type_is_never_shown(self, tmp_path, key):
        path = write_config(tmp_path, {"api_key": key})
        result = run_cli("--config", path, "--print-config")
        assert result.returncode == 2
        assert "api_key must be a string" in result.stderr
        for shown in ("12345678901", "secret-in", "1.5e+300"):
            assert shown not in result.stderr + result.stdout

    def test_world_readable_file_without_key_is_fine(self, tmp_path):
        path = write_config(tmp_path, {"buffer_size": 5}, mode=0o644)
        assert agent.load_config({"config": path}, {}).buffer_size == 5

    def test_plaintext_to_remote_host_refused(self):
        with pytest.raises(agent.ConfigError, match="--allow-plaintext"):
            agent.load_config({"api_url": "http://192.0.2.10:8000"}, {})
        with pytest.raises(agent.ConfigError, match="in clear"):
            agent.load_config({"api_url": "ws://api.example.com/ws"}, {})
        allowed = agent.load_config(
            {"api_url": "http://192.0.2.10", "allow_plaintext": True}, {}
        )
        assert allowed.allow_plaintext
        for url in (
            "http://localhost:8000",
            "http://127.0.0.2",
            "ws://[::1]:9/x",
            "https://api.example.com",
        ):
            agent.load_config({"api_url": url}, {})

    def test_bad_config_exits_2_with_one_message(self, tmp_path):
        path = write_config(tmp_path, {"nope": 1})
        result = run_cli("--config", path, "--once")
        assert result.returncode == 2
        assert result.stdout == ""
        assert result.stderr.count("\n") == 1 and "unknown key 'nope'" in result.stderr

    def test_plaintext_refused_at_start_before_any_connection(self):
        result = run_cli(
            "--api-url", "http://192.0.2.10:8000", env=clean_env(CHATOPS_API_KEY=KEY)
        )
        assert result.returncode == 2
        assert "refusing plaintext URL http://192.0.2.10:8000" in result.stderr

    def test_print_config_redacts_key_and_names_sources(self, tmp_path):
        path = write_config(tmp_path, {"api_key": KEY, "buffer_size": 9})
        result = run_cli(
            "--print-config",
            "--config",
            path,
            "--log-level",
            "debug",
            env=clean_env(CHATOPS_API_URL="https://api.example.com"),
        )
        assert result.returncode == 0, result.stderr
        assert KEY not in result.stdout + result.stderr
        shown = json.loads(result.stdout)
        assert shown["settings"]["api_key"] == {
            "value": "<redacted>",
            "source": "file " + path,
        }
        assert shown["settings"]["api_url"]["source"] == "env CHATOPS_API_URL"
        assert shown["settings"]["log_level"] == {"value": "debug", "source": "flag"}
        assert shown["settings"]["buffer_size"]["value"] == 9

    def test_version_and_help(self):
        version = run_cli("--version")
        assert version.returncode == 0
        assert version.stdout == f"chatops-agent {agent.__version__}\n"
        usage = run_cli("--help")
        assert usage.returncode == 0
        for flag in ("--api-key", "--api-url", "--config", "--once", "--check"):
            assert flag in usage.stdout

    def test_key_on_command_line_warns(self):
        result = run_cli("--print-config", "--api-key", KEY)
        assert "process list" in result.stderr and "CHATOPS_API_KEY" in result.stderr
        assert KEY not in result.stderr + result.stdout

    def test_missing_key_is_a_clear_error(self, api):
        result = run_cli("--api-url", api.url)
        assert result.returncode == 2 and "no API key" in result.stderr


CONFIGURATION_DOC = os.path.join(os.path.dirname(AGENT), "docs", "configuration.md")
PROTOCOL_DOC = os.path.join(os.path.dirname(AGENT), "docs", "protocol.md")
ARCHITECTURE_DOC = os.path.join(os.path.dirname(AGENT), "docs", "architecture.md")
GENERATED = ("<!-- generated from SETTINGS by test_chatops_agent.py: begin -->",
             "<!-- generated from SETTINGS: end -->")


def settings_table():
    """docs/configuration.md's table of settings, made from SETTINGS."""
    def default(s):
        if s.default is None:
            return "—"
        shown = s.default if isinstance(s.default, str) else json.dumps(s.default)
        return f"`{shown}`"

    rows = ["| flag | variable | JSON key | default | range | meaning |",
            "|---|---|---|---|---|---|",
            f"| `--config` | `{agent.CONFIG_ENV}` | — | — | "
            "| path of the JSON config file |"]
    for s in agent.SETTINGS:
        bounds = f"{s.low} to {s.high}" if s.low is not None else ""
        rows.append(f"| `{s.flag}` | `{s.env}` | `{s.name}` | {default(s)} | {bounds} "
                    f"| {s.meaning} |")
    return "\n".join(rows)


def write_settings_table():
    """Rewrite the generated part of docs/configuration.md from SETTINGS."""
    with open(CONFIGURATION_DOC, encoding="utf-8") as f:
        text = f.read()
    head, rest = text.split(GENERATED[0] + "\n", 1)
    _, tail = rest.split(GENERATED[1], 1)
    with open(CONFIGURATION_DOC, "w", encoding="utf-8") as f:
        f.write(f"{head}{GENERATED[0]}\n{settings_table()}\n{GENERATED[1]}{tail}")


class TestConfigurationDoc:
    def test_the_table_of_settings_is_made_from_settings(self):
        with open(CONFIGURATION_DOC, encoding="utf-8") as f:
            text = f.read()
        between = text.split(GENERATED[0] + "\n", 1)[1].split(GENERATED[1], 1)[0]
        assert between == settings_table() + "\n", (
            "docs/configuration.md has drifted from SETTINGS; rewrite its table with "
            "python3 -c 'import test_chatops_agent as t; t.write_settings_table()'")


class TestURLs:
    @pytest.mark.parametrize(
        "given, expected",
        [
            ("http://localhost:8000", "ws://localhost:8000/api/v1/agents/ws"),
            ("http://localhost:8000/", "ws://localhost:8000/api/v1/agents/ws"),
            (
                "https://chatops.example.com",
                "wss://chatops.example.com/api/v1/agents/ws",
            ),
            (
                "https://example.com/chatops/",
                "wss://example.com/chatops/api/v1/agents/ws",
            ),
            ("ws://10.0.0.1:9000/custom/path", "ws://10.0.0.1:9000/custom/path"),
            ("wss://example.com", "wss://example.com/api/v1/agents/ws"),
            (
                "wss://example.com/api/v1/agents/ws",
                "wss://example.com/api/v1/agents/ws",
            ),
        ],
    )
    def test_ws_url(self, given, expected):
        assert agent.ws_url(given) == expected

    @pytest.mark.parametrize(
        "given, expected",
        [
            ("http://localhost:8000/", "http://localhost:8000"),
            ("wss://example.com/api/v1/agents/ws", "https://example.com"),
            ("ws://example.com/other", "http://example.com"),
        ],
    )
    def test_http_base(self, given, expected):
        assert agent.http_base(given) == expected

    @pytest.mark.parametrize(
        "bad", ["localhost:8000", "ftp://x", "http://", "http://h:99999"]
    )
    def test_bad_urls(self, bad):
        with pytest.raises(agent.ConfigError):
            agent.ws_url(bad)

    @pytest.mark.parametrize("text", [
        "http://127.0.0.1\\@evil.example", "http://127.0.0.1 .evil.example",
        "http://user:secret@127.0.0.1", "http://127.0.0.1\x00.evil.example",
        "https://chatops.example.com\t/x", "http://127.0.0.1\u3002evil.example",
    ])
    def test_urls_parsers_could_read_apart_are_refused(self, text):
        """Inner whitespace, control characters, backslashes, non-ASCII and
        credentials: parsers may read these differently, so they are refused."""
        with pytest.raises(agent.ConfigError, match="api_url"):
            agent.load_config({"api_url": text}, {})

    def test_surrounding_whitespace_is_trimmed_once_for_all(self):
        config = agent.load_config({"api_url": " \thttps://chatops.example.com\n"}, {})
        assert config.api_url == "https://chatops.example.com"
        with pytest.raises(agent.ConfigError, match="refusing plaintext"):
            agent.load_config({"api_url": " http://evil.example"}, {})

    def test_the_check_and_the_connection_read_every_url_alike(self):
        """Whatever the text, an api_url accepted without allow_plaintext leads
        websocket-client (which parses the URL again) and --check's HTTP to the
        host the check saw, and that host is loopback when the URL is plaintext."""
        hypothesis = need_module("hypothesis")
        st = hypothesis.strategies
        agent.load_websocket()
        from websocket._url import parse_url

        pieces = st.sampled_from([
            "http", "https", "ws", "wss", "HTTP", "://", ":", "/", "//", "@", "\\",
            "#", "?", " ", "\t", "\n", "\x00", "%40", "%2f", "[", "]", "127.0.0.1",
            "localhost", "LOCALHOST", "evil.example", "::1", "10.0.0.1", "8000",
            "0x7f.1", "127.1", ".", "localhost.", "a.localhost", "user:pw", "\u3002",
            "\uff0e", "\u2100", "xn--",
        ])

        @hypothesis.settings(max_examples=3000, deadline=None)
        @hypothesis.given(st.lists(pieces, max_size=12).map("".join))
        def agree(text):
            try:
                config = agent.load_config({"api_url": text}, {})
            except agent.ConfigError:
                return
            url = agent.ws_url(config.api_url)
            host, _, _, secure = parse_url(url)
            checked = urllib.parse.urlsplit(url).hostname
            assert host.lower() == checked, (text, url)
            assert urllib.parse.urlsplit(agent.http_base(config.api_url)).hostname \
                == checked
            if not secure:
                assert agent.is_loopback(host), (text, url)

        agree()


###############################################################################
# Metrics #####################################################################
###############################################################################




def sources():
    """The metrics sources this machine can run: /proc, the agent's on Linux,
    and psutil when installed (the agent's elsewhere; its readings are the same)."""
    found = [agent.ProcSource()]
    if psutil is not None:
        found.append(agent.PsutilSource(psutil))
    return found


def sample(source, **kwargs):
    """One sample over at least 0.3 s of CPU time (clock ticks are 10 ms)."""
    collector = agent.MetricsCollector(source, **kwargs)
    collector.prime()
    start = collector.source.cpu_times()[0][1]
    wait_until(
        lambda: collector.source.cpu_times()[0][1] > start + 0.3, 5, "a CPU window"
    )
    return collector.collect()


def samples_together(*sources):
    """One sample of each source over the same CPU window: primed and
    collected back to back, with no process table read to stand between
    them (under load, two windows one after the other differ widely)."""
    collectors = [agent.MetricsCollector(source, top_processes=0) for source in sources]
    for collector in collectors:
        collector.prime()
    start = collectors[0].source.cpu_times()[0][1]
    wait_until(
        lambda: collectors[0].source.cpu_times()[0][1] > start + 0.5, 5, "a CPU window"
    )
    return [collector.collect() for collector in collectors]


class TestMetrics:
    @pytest.mark.parametrize("source", sources(), ids=lambda s: s.name)
    def test_values_match_the_machine(self, source):
        data = sample(source)
        with open("/proc/meminfo") as f:
            mem_total_kib = int(f.readline().split()[1])
        assert data["memory"]["total_gb"] == round(mem_total_kib * 1024 / 1024**3, 2)
        assert data["cpu"]["cores"] == os.cpu_count() == len(data["cpu"]["per_core"])
        assert 0 <= data["cpu"]["usage_percent"] <= 100
        st = os.statvfs("/")
        assert data["disk"]["total_gb"] == round(st.f_blocks * st.f_frsize / 1024**3, 2)
        with open("/proc/net/dev") as f:  # those that ever carried a byte or packet
            rows = [line.split(":") for line in f.readlines()[2:]]
        used = {name.strip() for name, counts in rows if any(
            int(counts.split()[i]) for i in (0, 1, 8, 9))}
        assert {i["name"] for i in data["network"]["interfaces"]} == used
        assert data["network"]["bytes_recv"] == sum(
            i["bytes_recv"] for i in data["network"]["interfaces"]
        )
        assert "errors" not in data and data["containers"] == []

    @pytest.mark.parametrize("source", sources(), ids=lambda s: s.name)
    def test_first_sample_cpu_is_measured_not_zero(self, source):
        burn = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            data = sample(source, top_processes=5)
            assert data["cpu"]["usage_percent"] > 0
            assert max(data["cpu"]["per_core"]) > 10
            mine = [p for p in data["processes"] if p["pid"] == burn.pid]
            assert mine and mine[0]["cpu"] > 10
        finally:
            burn.kill()
            burn.wait()

    @pytest.mark.parametrize("source", sources(), ids=lambda s: s.name)
    def test_top_processes_by_cpu(self, source):
        burn = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            collector = agent.MetricsCollector(
                source, top_processes=5, process_refresh_s=0.2
            )
            collector.prime()
            wait_until(
                lambda: any(
                    p["pid"] == burn.pid and p["cpu"] > 20
                    for p in collector.collect()["processes"]
                ),
                10,
                "the busy process on top",
            )
            processes = collector.collect()["processes"]
            assert len(processes) == 5
            assert [p["cpu"] for p in processes] == sorted(
                (p["cpu"] for p in processes), reverse=True
            )
            mine = next(p for p in processes if p["pid"] == burn.pid)
            assert mine["user"] == "root" if os.geteuid() == 0 else mine["user"]
            assert mine["status"] in ("running", "sleeping") and mine["memory"] > 1
        finally:
            burn.kill()
            burn.wait()

    @pytest.mark.parametrize("source", sources(), ids=lambda s: s.name)
    def test_status_words_as_psutil_gives_them(self, source):
        """The web UI paints a process green only for "running": each source
        gives psutil's word, the same one psutil itself gives."""
        require(psutil is not None, "psutil is not installed")
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        idle = subprocess.Popen(["sleep", "300"])
        try:
            for process, word in ((busy, "running"), (idle, "sleeping")):
                wait_until(lambda p=process, w=word: psutil.Process(p.pid).status()
                           == w, 5, f"psutil to see a {word} process")
            statuses = {row[0]: row[5] for row in source.processes()}
            assert statuses[busy.pid] == "running"
            assert statuses[idle.pid] == "sleeping"
            assert set(statuses.values()) <= set(agent.PROC_STATUS.values())
        finally:
            for process in (busy, idle):
                process.kill()
                process.wait()

    def test_every_process_listed_by_default(self, api, run_agent):
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        idle = subprocess.Popen(["sleep", "300"])
        try:
            proc = run_agent(api.url, "--top-processes", "0",
                             "--process-refresh-s", "0.5")
            proc.wait_log("metrics from /proc every")

            def listed_with_status():
                samples = api.metrics()
                latest = samples[-1]["processes"] if samples else []
                rows = {p["pid"]: p for p in latest}
                return (busy.pid in rows and idle.pid in rows
                        and rows[busy.pid]["status"] == "running"
                        and rows[busy.pid]["cpu"] > 20 and rows)

            rows = wait_until(listed_with_status, 10, "both, the busy one running")
            assert rows[idle.pid]["status"] == "sleeping"
            on_host = [e for e in os.listdir("/proc") if e.isdigit()]
            assert len(rows) >= 0.9 * len(on_host)  # a few may start or end between
            cpus = [p["cpu"] for p in api.metrics()[-1]["processes"]]
            assert cpus == sorted(cpus, reverse=True)
        finally:
            for process in (busy, idle):
                process.kill()
                process.wait()

    def test_the_process_cap_is_honoured(self, api, run_agent):
        run_agent(api.url, "--top-processes", "3")
        wait_until(lambda: len(api.metrics()) >= 2, 6, "two samples")
        assert all(len(m["processes"]) == 3 for m in api.metrics())

    def test_process_table_reused_between_refreshes(self):
        collector = agent.MetricsCollector(agent.ProcSource(), process_refresh_s=3600)
        collector.prime()
        first = collector.collect()["processes"]
        assert collector.collect()["processes"] is first

    def test_psutil_is_never_imported_on_linux(self):
        """Its readings are /proc's: importing it would only cost 0.8 MiB."""
        script = ("import sys, chatops_agent as a; a.pick_source(); a.check_source(); "
                  "print(sorted(m for m in sys.modules if 'psutil' in m))")
        out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                             text=True, cwd=os.path.dirname(AGENT), check=True)
        assert out.stdout.strip() == "[]"
        assert agent.check_source() == (True, "metrics source: /proc")

    def test_proc_source_agrees_with_psutil(self):
        require(psutil is not None, "psutil is not installed")
        proc, ps = samples_together(agent.ProcSource(), agent.PsutilSource(psutil))
        for key in ("total_gb", "swap_total_gb"):
            assert proc["memory"][key] == ps["memory"][key]
        assert abs(proc["memory"]["used_gb"] - ps["memory"]["used_gb"]) < 0.1
        assert proc["cpu"]["cores"] == ps["cpu"]["cores"]
        assert abs(proc["cpu"]["usage_percent"] - ps["cpu"]["usage_percent"]) < 25
        assert (
            proc["disk"]["filesystems"][0]["mount"]
            == ps["disk"]["filesystems"][0]["mount"]
        )
        assert abs(proc["disk"]["used_gb"] - ps["disk"]["used_gb"]) < 0.1
        assert [i["name"] for i in proc["network"]["interfaces"]] == [
            i["name"] for i in ps["network"]["interfaces"]
        ]
        assert abs(proc["network"]["bytes_recv"] - ps["network"]["bytes_recv"]) < 1e6
        assert abs(proc["uptime_s"] - ps["uptime_s"]) <= 2
        # Names: kernel workers rename themselves (kworker/0:0-events becomes
        # kworker/0:0-mm_percpu_wq) between two reads, so most must agree, and
        # a process of ours exactly.
        child = subprocess.Popen(["sleep", "30"])
        try:
            names = {p.pid: p.info["name"] for p in psutil.process_iter(["name"])}
            rows = {row[0]: row[2] for row in agent.ProcSource().processes()}
        finally:
            child.kill()
            child.wait()
        both = set(names) & set(rows)
        same = [pid for pid in both if rows[pid][:15] == names[pid][:15]]
        assert len(same) >= 0.9 * len(both) and rows[child.pid] == "sleep"

    def test_filesystem_filter(self):
        mounts = [
            ("/dev/vda", "/", "ext4"),
            ("/dev/vda", "/var/lib/docker", "ext4"),
            ("/dev/loop0", "/snap/core/1", "squashfs"),
            ("overlay", "/x", "overlay"),
            ("tmpfs", "/run", "tmpfs"),
            ("srv:/export", "/mnt/nfs", "nfs4"),
            ("/dev/sdb1", "/data", "xfs"),
            ("proc", "/proc", "proc"),
        ]
        assert agent.real_filesystems(mounts, False) == [
            ("/dev/vda", "/", "ext4"),
            ("/dev/sdb1", "/data", "xfs"),
        ]
        assert ("srv:/export", "/mnt/nfs", "nfs4") in agent.real_filesystems(
            mounts, True
        )

    def test_mount_escapes(self, tmp_path):
        table = tmp_path / "mounts"
        table.write_text("/dev/sda1 /media/my\\040disk ext4 rw 0 0\n")
        assert agent.proc_mounts(str(table)) == [
            ("/dev/sda1", "/media/my disk", "ext4")
        ]

    def test_network_rates_clamp_counter_resets(self):
        class Counters(agent.ProcSource):
            readings = [{"eth0": (1000, 5000, 10, 50)}, {"eth0": (3000, 100, 30, 1)}]

            def net(self):
                return self.readings.pop(0)

        collector = agent.MetricsCollector(Counters(), top_processes=0)
        collector._net, collector._net_at = (
            collector.source.net(),
            time.monotonic() - 2.0,
        )
        eth0 = collector._net_section()["interfaces"][0]
        assert 900 <= eth0["bytes_sent_per_s"] <= 1000
        assert eth0["bytes_recv_per_s"] == 0 and eth0["packets_recv_per_s"] == 0

    def test_a_failing_section_is_reported_not_fatal(self):
        class NoNet(agent.ProcSource):
            def net(self):
                raise OSError("no /proc/net/dev")

        collector = agent.MetricsCollector(NoNet(), top_processes=0)
        collector._cpu = collector.source.cpu_times()
        data = collector.collect()
        assert "no /proc/net/dev" in data["errors"]["network"]
        assert data["memory"]["total_gb"] > 0

    def test_once_as_text_for_a_person(self):
        burn = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            result = run_cli("--once", "--text", "--docker-enabled", "false",
                             env=clean_env(CHATOPS_API_KEY=KEY))
        finally:
            burn.kill()
            burn.wait()
        assert result.returncode == 0, result.stderr
        text = result.stdout
        for words in ("CPU ", " % of ", "Memory ", " GiB used", "Disk ", "Network ",
                      "Uptime ", "Processes: the 10 busiest of ", "MEM MB",
                      "Containers: Docker disabled", "Connection settings in effect",
                      "key        set (from env CHATOPS_API_KEY; never shown)"):
            assert words in text, words
        row = next(line for line in text.splitlines() if f" {burn.pid} " in line)
        assert "running" in row and KEY not in text
        assert run_cli("--text").returncode == 2

    def test_once_prints_a_real_sample_without_api(self):
        burn = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            result = run_cli("--once")
        finally:
            burn.kill()
            burn.wait()
        assert result.returncode == 0, result.stderr
        message = json.loads(result.stdout)
        assert message["type"] == "metrics"
        data = message["data"]
        for section, keys in (
            ("cpu", ("usage_percent", "cores", "frequency_mhz")),
            ("memory", ("total_gb", "used_gb", "available_gb", "usage_percent")),
            ("disk", ("total_gb", "used_gb", "available_gb", "usage_percent")),
            ("network", ("bytes_sent", "bytes_recv", "packets_sent", "packets_recv")),
        ):
            assert set(keys) <= set(data[section])
        assert data["timestamp"].endswith("Z") and data["processes"]
        assert (
            50 / os.cpu_count() <= data["cpu"]["usage_percent"] <= 100
        )  # one core busy


###############################################################################
# Protocol ####################################################################
###############################################################################


class KeptReplies:
    """An outbox that keeps what a Dispatcher sends."""

    def __init__(self):
        self.sent = []

    def put(self, message, keep_until=None):
        self.sent.append(message)


def parse_request(message, config=None):
    """The job (or cancel) of a request, through its row of REQUESTS."""
    route = agent.REQUESTS[message["type"]]
    return route.parse(message, route, config or agent.load_config({}, {}))


class Recording(dict):
    """A message that notes every field a parser reads."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


class TestDispatcher:
    def make(self, monkeypatch=None):
        outbox = KeptReplies()
        dispatcher = agent.Dispatcher(agent.load_config({}, {}), outbox, None, None)
        handled = []
        if monkeypatch is not None:
            monkeypatch.setitem(agent.REQUESTS, "boom", agent.Route(
                None, None, None, lambda d, m: 1 / 0, ()))
        return dispatcher, outbox.sent, handled

    @pytest.mark.parametrize(
        "frame, why",
        [
            (b"\xff\xfe", "not UTF-8"),
            ("not json", "not JSON"),
            ("[1]", "not an object"),
            ('{"no":"type"}', "no string field 'type'"),
            ("[" * 100000, "not JSON"),
            ('{"type": 1' + "0" * 5000 + "}", "not JSON"),
        ],
    )
    def test_malformed_frames_answered_with_error(self, frame, why):
        dispatcher, replies, _ = self.make()
        dispatcher.dispatch(frame, None)
        assert replies[0]["type"] == "error" and why in replies[0]["message"]
        agent.to_json(replies[0])

    def test_unknown_type_answered_with_its_id(self):
        dispatcher, replies, _ = self.make()
        dispatcher.dispatch('{"type":"frobnicate","request_id":"r1"}', None)
        assert replies == [
            {
                "type": "error",
                "request_id": "r1",
                "message": "unknown message type 'frobnicate'",
            }
        ]

    def test_handler_failure_is_an_error_reply(self, monkeypatch):
        dispatcher, replies, _ = self.make(monkeypatch)
        dispatcher.dispatch('{"type":"boom","command_id":"c9"}', None)
        assert (
            replies[0]["command_id"] == "c9"
            and "internal error" in replies[0]["message"]
        )

    def test_the_table_routes_by_type(self):
        dispatcher, replies, _ = self.make()
        dispatcher.dispatch('{"type":"ping","request_id":"p"}', None)
        assert replies == [{"type": "pong", "request_id": "p"}]

    def test_each_parser_reads_only_the_fields_its_row_names(self):
        """The table's `fields` are what the tests' hostile frames fill in:
        a parser reading another would go untested."""
        config = agent.load_config({"command_allow_cwd": "true"}, {})
        values = {"command": "ls", "timeout": 5, "cwd": "/tmp", "stream": True,
                  "requested_by": "a", "target_id": "t", "container_id": "web",
                  "container": "web", "tail": 3, "since": "10m",
                  "timestamps": True, "action": "logs"}
        for kind, route in agent.REQUESTS.items():
            if route.parse is None:
                continue
            message = Recording(values, type=kind, request_id="r", command_id="c")
            with contextlib.suppress(agent.RequestError):
                route.parse(message, route, config)
            read = message.read
            assert read - {"type", *agent.ID_FIELDS} <= set(route.fields), kind

    def test_any_text_is_survived(self):
        hypothesis = need_module("hypothesis")
        strategies = hypothesis.strategies
        dispatcher, replies, _ = self.make()

        @hypothesis.settings(max_examples=300, deadline=None)
        @hypothesis.given(
            strategies.one_of(
                strategies.text(),
                strategies.binary(),
                strategies.recursive(
                    strategies.none() | strategies.floats() | strategies.text(),
                    lambda c: (
                        strategies.lists(c)
                        | strategies.dictionaries(
                            strategies.sampled_from(["type", "request_id", "x"]), c
                        )
                    ),
                ).map(json.dumps),
            )
        )
        def survive(frame):
            replies.clear()
            dispatcher.dispatch(frame, None)
            for reply in replies:
                agent.to_json(reply).decode("utf-8")

        survive()


###############################################################################
# Connection ##################################################################
###############################################################################


class TestConnection:
    def test_handshake_and_first_metrics_frame(self, api, run_agent):
        started = time.monotonic()
        # Without Docker: the containers on this engine are other tests' business.
        proc = run_agent(api.url, "--metrics-interval-s", "5",
                         "--docker-enabled", "false")
        wait_until(api.metrics, 6, "the first metrics frame")
        assert time.monotonic() - started < 6
        auth = api.messages()[0]
        assert auth["type"] == "auth" and auth["api_key"] == KEY
        assert auth["agent"]["name"] == "chatops-agent"
        assert auth["agent"]["version"] == agent.__version__
        assert {"hostname", "os", "python", "metrics_source", "capabilities"} <= set(
            auth["agent"]
        )
        data = api.metrics()[0]
        assert data["server_id"] == SERVER_ID
        assert data["cpu"]["cores"] == os.cpu_count() and data["containers"] == []
        assert "request_id" not in api.messages("metrics")[0]
        assert f"connected to ws://127.0.0.1:{api.port}/api/v1/agents/ws" in proc.log()

    def test_rejected_key_shows_reason_and_retries_slowly(self, api, run_agent):
        proc = run_agent(api.url, key="wrong-key-123456")
        proc.wait_log(
            "authentication rejected by the API: Invalid or inactive API key "
            "(close 1008)"
        )
        retry = float(proc.log().split("retrying in ")[1].split()[0])
        assert retry >= agent.AUTH_RETRY_FIRST_S / 2
        assert api.rejections == 1 and proc.proc.poll() is None
        assert "wrong-key-123456" not in proc.log()

    def test_reconnects_after_server_restart(self, api, run_agent):
        proc = run_agent(api.url, "--reconnect-max-delay-s", "1")
        wait_until(api.metrics, 6, "metrics")
        api.stop()
        proc.wait_log("cannot reach the API")
        api.start()
        wait_until(
            lambda: (
                len(api.connects) >= 2
                and any(
                    n == len(api.connects) - 1 and m["type"] == "metrics"
                    for n, m in api.frames
                )
            ),
            10,
            "metrics on a second connection",
        )

    def test_reconnect_delays_keep_both_bounds(self):
        """The schedule itself, at the default cap of 16 s: an API back at any
        moment of a long outage is found within 16 s, half the time within
        10 s, and no minute holds more than 6 attempts."""
        delays = agent.reconnect_backoff(16.0)
        attempts = list(itertools.accumulate(delays.next_delay() for _ in range(5000)))
        assert all(b - a >= 60 for a, b in zip(attempts, attempts[6:]))
        backs = [random.uniform(attempts[1], attempts[-2]) for _ in range(20000)]
        found = [attempts[bisect.bisect(attempts, t)] - t for t in backs]
        assert max(found) <= 16 and statistics.median(found) <= 10
        delays.reset()  # a connection that worked: the next blip is retried soon
        assert delays.next_delay() <= 4 and delays.next_delay() >= 12.8

    def test_reconnect_bounds_over_repeated_outages(self, api, run_agent):
        """A real API that goes away and comes back on the same port, 20 times.
        The cap is 0.5 s here, standing for the default 16 s: the bounds scale
        with it (found within 20/16 cap, median 10/16 cap, at most 6 attempts
        in 60/16 cap), plus time for the connection itself on a loaded machine."""
        cap = 0.5
        proc = run_agent(api.url, "--reconnect-max-delay-s", str(cap))
        wait_until(api.metrics, 6, "metrics")
        found, rng = [], random.Random(11)
        for outage_s in [rng.uniform(0.1, 1.5) for _ in range(19)] + [8 * cap]:
            connected = len(api.connects)
            api.stop()
            with PortWithoutAPI(api.port) as port:
                time.sleep(outage_s)  # the outage itself, not a wait for an event
            api.start()
            back = time.monotonic()
            wait_until(lambda n=connected: len(api.connects) > n, 10, "a reconnect")
            found.append(api.connects[connected] - back)
        assert max(found) <= 20 / 16 * cap + 0.3, found
        assert statistics.median(found) <= 10 / 16 * cap + 0.15, found
        tries = port.attempts  # of the last, long outage
        assert len(tries) >= 7
        assert all(b - a >= 60 / 16 * cap for a, b in zip(tries, tries[6:])), tries
        assert proc.proc.poll() is None

    def test_ten_second_outage_loses_no_sample(self, api, run_agent):
        proc = run_agent(
            api.url, "--metrics-interval-s", "1", "--reconnect-max-delay-s", "2"
        )
        wait_until(lambda: len(api.metrics()) >= 2, 6, "metrics")
        api.stop()
        outage_ends = time.monotonic() + 10
        proc.wait_log("cannot reach the API")
        wait_until(
            lambda: time.monotonic() >= outage_ends, 12, "the outage to last 10 s"
        )
        api.start()
        # The outage's samples (10 or more) and the next: on the new connection.
        wait_until(
            lambda: len([m for n, m in api.frames
                         if n > 0 and m["type"] == "metrics"]) >= 12,
            15,
            "the backlog",
        )
        stamps = sorted({parse_ts(m["timestamp"]) for m in api.metrics()})
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        assert stamps[-1] - stamps[0] >= 12
        assert max(gaps) < 1.6, gaps  # one sample a second, none missing
        resent = len(api.metrics()) - len(stamps)
        assert (
            resent <= agent.METRICS_WINDOW
        )  # duplicates only from unacknowledged resends
        assert "samples wait to be sent" in proc.log()

    def test_never_acking_api_gets_no_duplicates(self, run_agent):
        api = FakeAPI(ack=False).start()
        try:
            proc = run_agent(api.url, "--reconnect-max-delay-s", "1")
            proc.wait_log("does not acknowledge metrics")
            wait_until(lambda: len(api.metrics()) >= 3, 6, "metrics")
            api.drop()
            wait_until(lambda: len(api.connects) >= 2, 10, "a reconnect")
            wait_until(
                lambda: any(n == 1 and m["type"] == "metrics" for n, m in api.frames),
                10,
                "metrics on the new connection",
            )
            stamps = [m["timestamp"] for m in api.metrics()]
            assert len(stamps) == len(set(stamps))
        finally:
            api.stop()

    def test_silent_server_detected_within_two_heartbeats(self, api, run_agent):
        proc = run_agent(
            api.url, "--heartbeat-interval-s", "1", "--reconnect-max-delay-s", "1"
        )
        wait_until(lambda: api.messages("ping"), 6, "a ping")
        api.silent = True
        silent_since = time.monotonic()
        proc.wait_log("nothing heard from the API", 5)
        assert time.monotonic() - silent_since < 2 * 1.0 + 1.0
        api.silent = False
        wait_until(lambda: len(api.connects) >= 2, 5, "a reconnect")

    def test_malformed_and_unknown_frames_keep_the_connection(self, api, run_agent):
        proc = run_agent(api.url)
        wait_until(api.metrics, 6, "metrics")
        api.send_all("this is not json")
        api.send_all(json.dumps({"type": "warp_drive", "request_id": "r-42"}))
        errors = wait_until(
            lambda: len(api.messages("error")) >= 2 and api.messages("error"),
            5,
            "two error replies",
        )
        assert errors[0] == {
            "type": "error",
            "message": "Invalid message format: frame is not JSON (Expecting value: "
            "line 1 column 1 (char 0))",
        }
        assert errors[1] == {
            "type": "error",
            "request_id": "r-42",
            "message": "unknown message type 'warp_drive'",
        }
        count = len(api.metrics())
        wait_until(lambda: len(api.metrics()) > count + 1, 5, "metrics to go on")
        assert len(api.connects) == 1 and proc.proc.poll() is None

    def test_answers_protocol_ping(self, api, run_agent):
        run_agent(api.url)
        wait_until(api.metrics, 6, "metrics")
        api.send_all(json.dumps({"type": "ping"}))
        wait_until(lambda: api.messages("pong"), 5, "a pong")

    def test_starts_and_collects_while_api_unreachable(self, run_agent):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = run_agent(f"http://127.0.0.1:{port}", "--reconnect-max-delay-s", "1")
        proc.wait_log("cannot reach the API")
        wait_until(lambda: proc.log().count("cannot reach") >= 3, 10, "three tries")
        api = FakeAPI(port=port).start()
        try:
            wait_until(lambda: len(api.metrics()) >= 8, 10, "the buffered samples")
            first = parse_ts(api.metrics()[0]["timestamp"])
            assert first < parse_ts(agent.utc_now()) - 2  # taken while unreachable
            stamps = sorted({parse_ts(m["timestamp"]) for m in api.metrics()})
            assert max(b - a for a, b in zip(stamps, stamps[1:])) < 0.9
        finally:
            api.stop()

    def test_error_frame_rejection_is_an_auth_failure(self, api, run_agent):
        api.reject_with_error_frame = True
        proc = run_agent(api.url, key="wrong-key-123456")
        proc.wait_log(
            "authentication rejected by the API: Invalid or inactive API key; "
        )

    def test_http_403_on_upgrade_is_an_auth_failure(self, api, run_agent):
        api.upgrade_status = 403
        proc = run_agent(api.url)
        proc.wait_log("authentication rejected by the API: HTTP 403")
        assert "retrying in" in proc.log()

    def test_acks_that_stop_coming_mean_resend_on_a_new_connection(
        self, api, run_agent
    ):
        proc = run_agent(
            api.url,
            "--metrics-interval-s", "0.2",
            "--heartbeat-interval-s", "1",
            "--reconnect-max-delay-s", "1",
        )
        wait_until(lambda: len(api.metrics()) >= 3, 6, "metrics")
        api.ack = False  # still answers pings
        proc.wait_log("the API has shown no metrics read for", 5)
        wait_until(lambda: len(api.connects) >= 2, 5, "a reconnect")
        proc.wait_log("does not acknowledge metrics", 5)
        stalled_at = parse_ts(agent.utc_now())
        wait_until(
            lambda: any(
                parse_ts(m["timestamp"]) > stalled_at + 1 for m in api.metrics()
            ),
            10,
            "samples flowing again",
        )
        stamps = sorted({parse_ts(m["timestamp"]) for m in api.metrics()})
        assert max(b - a for a, b in zip(stamps, stamps[1:])) < 0.5

    def test_peer_that_stops_reading_does_not_freeze_the_agent(self, api, run_agent):
        proc = run_agent(
            api.url,
            "--metrics-interval-s",
            "0.2",
            "--heartbeat-interval-s",
            "1",
            "--reconnect-max-delay-s",
            "1",
        )
        wait_until(lambda: len(api.metrics()) >= 3, 6, "metrics")
        api.hearing.clear()
        proc.wait_log("nothing heard from the API", 5)
        api.hearing.set()
        wait_until(lambda: len(api.connects) >= 2, 5, "a reconnect")
        deaf_from = parse_ts(agent.utc_now())
        wait_until(
            lambda: any(parse_ts(m["timestamp"]) > deaf_from for m in api.metrics()),
            10,
            "fresh samples after the reconnect",
        )
        stamps = sorted({parse_ts(m["timestamp"]) for m in api.metrics()})
        assert max(b - a for a, b in zip(stamps, stamps[1:])) < 0.5

    def test_a_close_is_logged_with_its_meaning(self, api, run_agent):
        proc = run_agent(api.url, "--reconnect-max-delay-s", "1")
        wait_until(api.metrics, 6, "metrics")
        api.close_all(1012)
        proc.wait_log("the API closed the connection (close 1012, server restarting)\n")
        wait_until(lambda: len(api.connects) >= 2, 5, "a reconnect")
        assert agent.describe_close(1000, "bye") == "close 1000, normal closure: bye"
        assert agent.describe_close(4001, "") == "close 4001"
        assert agent.describe_close(None, "") == "a close frame without a code"

    def test_sigterm_closes_1000_and_exits_0_within_5s(self, api, run_agent):
        proc = run_agent(api.url)
        wait_until(api.metrics, 6, "metrics")
        stopped_at = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.exit_status() == 0
        assert time.monotonic() - stopped_at < 5
        wait_until(lambda: api.closes, 5, "the close frame")
        assert api.closes[-1][0] == 1000

    def test_sigterm_while_api_unreachable(self, run_agent):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = run_agent(f"http://127.0.0.1:{port}")
        proc.wait_log("cannot reach the API")
        proc.proc.send_signal(signal.SIGINT)
        assert proc.exit_status() == 0

    def test_key_never_in_logs(self, api, run_agent, tmp_path):
        proc = run_agent(api.url, "--log-level", "debug", "--heartbeat-interval-s", "1")
        wait_until(
            lambda: api.messages("pong") or len(api.metrics()) >= 2, 6, "traffic"
        )
        api.drop()
        wait_until(lambda: len(api.connects) >= 2, 10, "a reconnect")
        proc.terminate()
        bad = run_agent(api.url, "--log-level", "debug", key=KEY + "-revoked")
        bad.wait_log("authentication rejected")
        bad.terminate()
        for text in (proc.log(), bad.log()):
            assert KEY not in text
        assert "DEBUG -> auth" not in proc.log() and "DEBUG -> metrics" in proc.log()

    @pytest.mark.parametrize("answer", [
        b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n",
        b"HTTP/1.1 302 Found\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 101 \xff\xfe\xfa\r\n\r\n",
        b"HTTP/1.1 10",
        b"HTTP/1.1\r\n\r\n",
        bytes(range(256)),
    ], ids=["ssh-banner", "302-no-location", "not-utf8", "truncated", "no-status",
            "garbage"])
    def test_a_garbled_upgrade_answer_never_ends_the_connection_loop(
        self, api, run_agent, answer
    ):
        """websocket-client 1.2.3 and 1.8.0 raise ValueError, KeyError or
        UnicodeDecodeError on these: the agent must try again, and get through
        once the port answers properly."""
        peer = RawPeer([answer, answer], upstream=api.port)
        try:
            proc = run_agent(peer.url, "--reconnect-max-delay-s", "0.5")
            wait_until(api.metrics, 15, "metrics once the port answers properly")
            assert len(peer.requests) >= 3 and proc.proc.poll() is None
            assert proc.log().count("retrying in") >= 2
        finally:
            peer.close()

    @pytest.mark.parametrize("server_id", [
        "NaN", "Infinity", "-Infinity", "1e999", "[]", "{}", "null", "true", "1.5",
        '"%s"' % ("x" * 300)])
    def test_an_unusable_server_id_never_silences_the_agent(
        self, api, run_agent, server_id
    ):
        api.auth_reply = f'{{"type":"auth_success","server_id":{server_id}}}'
        cmd = Commander(api, run_agent(api.url))
        wait_until(lambda: len(api.metrics()) >= 2, 6, "metrics")
        assert all("server_id" not in m for m in api.metrics())
        assert cmd.run("echo alive")["data"]["output"] == "alive\n"
        assert "unusable server_id" in cmd.proc.log()

    def test_a_later_auth_success_with_nan_changes_nothing(self, api, run_agent):
        run_agent(api.url)
        wait_until(api.metrics, 6, "metrics")
        api.send_all('{"type":"auth_success","server_id":NaN}')
        count = len(api.metrics())
        wait_until(lambda: len(api.metrics()) > count + 2, 5, "metrics to go on")
        assert api.metrics()[-1]["server_id"] == SERVER_ID

    def test_sighup_stops_cleanly_like_sigterm(self, api, commander):
        """A terminal that closes sends SIGHUP: close 1000, commands ended,
        what waits sent, exit 0 (under systemd, Restart= starts it again)."""
        cmd = commander()
        marker = f"876.{os.getpid()}"
        cmd.send(f"sleep {marker}")
        pgid = wait_until(lambda: group_running(marker), 5, "the command to run")
        stopped = time.monotonic()
        cmd.proc.proc.send_signal(signal.SIGHUP)
        assert cmd.proc.exit_status() == 0
        assert time.monotonic() - stopped < 5
        wait_until(lambda: api.closes, 5, "the close frame")
        assert api.closes[-1][0] == 1000
        assert cmd.reply("req-1")["data"]["cancelled"]
        assert pgid not in process_groups()
        assert "received SIGHUP; shutting down" in cmd.proc.log()

    def test_sighup_stays_ignored_under_nohup(self, api, tmp_path):
        """Started with SIGHUP ignored (nohup), the agent keeps it ignored."""
        log = tmp_path / "agent.log"
        with open(log, "w") as stderr:
            proc = subprocess.Popen(
                ["nohup", sys.executable, AGENT, "--api-url", api.url,
                 "--metrics-interval-s", "0.2"],
                env=clean_env(CHATOPS_API_KEY=KEY), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=stderr)
            try:
                wait_until(api.metrics, 6, "metrics")
                proc.send_signal(signal.SIGHUP)
                count = len(api.metrics())
                wait_until(lambda: len(api.metrics()) > count + 3, 5, "more metrics")
                assert proc.poll() is None
            finally:
                proc.terminate()
                assert proc.wait(5) == 0
        assert "received SIGHUP" not in log.read_text()

    def test_check_never_prints_the_key_an_api_echoes(self, api):
        api.echo_key_in_401 = True
        wrong = KEY + "-wrong"
        result = run_cli("--check", "--api-url", api.url,
                         env=clean_env(CHATOPS_API_KEY=wrong))
        assert result.returncode == 1
        assert "FAIL API key rejected: HTTP 401 Invalid API key" in result.stdout
        assert wrong not in result.stdout + result.stderr

    def test_check_tells_no_docker_from_no_containers(self, tmp_path):
        # The web UI shows both as the same empty list.
        def docker_line(shim):
            result = run_cli("--check", "--api-url", "http://127.0.0.1:9",
                             "--docker-binary", shim, env=clean_env())
            return result.stdout.splitlines()[-2]

        assert docker_line(str(tmp_path / "none")) == (
            f"note docker: not installed (the docker CLI ({tmp_path}/none) was not "
            "found: install Docker (e.g. apt-get install docker.io) or set "
            "docker_binary): the web UI's container list stays empty")
        empty = fake_docker(tmp_path, "version) echo 99.0;;\nps) exit 0;;")
        assert docker_line(empty) == "note docker: daemon 99.0 reachable, 0 containers"

    def test_check_reports_each_diagnostic(self, api):
        result = run_cli(
            "--check", "--api-url", api.url, env=clean_env(CHATOPS_API_KEY=KEY)
        )
        assert result.returncode == 0, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        assert [line.split()[0] for line in lines] == ["ok"] * 6 + ["note"] * 2
        assert lines[-2].startswith("note docker: ")
        assert lines[-1] == "note spool: off (state_dir none): a restart loses " \
            "undelivered samples"
        assert "API key accepted: server_id " + SERVER_ID in result.stdout
        bad = run_cli(
            "--check", "--api-url", api.url, env=clean_env(CHATOPS_API_KEY="nope")
        )
        assert (
            bad.returncode == 1
            and "FAIL API key rejected: HTTP 401 Invalid API key" in bad.stdout
        )

    def test_check_ends_in_time_whatever_the_api_does(self):
        """A server that answers /health a byte a second never lets a read
        time out: each line has its own deadline, and the run says which
        check it could not finish (issue 26, defect 7)."""
        slow = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 600
        peer = RawPeer([dripping(slow, 1.0)])
        try:
            started = time.monotonic()
            result = run_cli("--check", "--api-url", peer.url,
                             env=clean_env(CHATOPS_API_KEY=KEY), timeout=60)
            took = time.monotonic() - started
        finally:
            peer.close()
        assert result.returncode == 1
        assert (f"FAIL API not reachable at {peer.url}/health: no answer within "
                f"{agent.CHECK_LINE_S:g} s") in result.stdout
        assert "FAIL API key not checked: GET /health failed first" in result.stdout
        assert took < agent.CHECK_LINE_S + 30, took  # the docker note has its own

    def test_check_fails_when_api_down(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        result = run_cli("--check", "--api-url", f"http://127.0.0.1:{port}")
        assert result.returncode == 1 and "FAIL API not reachable" in result.stdout


class TestTLS:
    def test_accepted_with_ca_file(self, tls_api, run_agent):
        api, ca_file = tls_api
        proc = run_agent(api.url, "--ca-file", ca_file)
        wait_until(api.metrics, 6, "metrics over wss")
        assert "connected to wss://127.0.0.1" in proc.log()

    def test_refused_without_ca_file(self, tls_api, run_agent):
        api, _ = tls_api
        proc = run_agent(api.url)
        proc.wait_log("TLS certificate is not trusted")
        assert "--ca-file" in proc.log() and not api.messages()

    def test_check_uses_the_ca_file(self, tls_api):
        api, ca_file = tls_api
        env = clean_env(CHATOPS_API_KEY=KEY)
        trusted = run_cli(
            "--check", "--api-url", api.url, "--ca-file", ca_file, env=env
        )
        assert trusted.returncode == 0, trusted.stdout
        assert f"TLS verified with {ca_file}" in trusted.stdout
        untrusted = run_cli("--check", "--api-url", api.url, env=env)
        assert untrusted.returncode == 1
        assert "FAIL API not reachable" in untrusted.stdout
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stdout
        assert "for a private CA pass --ca-file" in untrusted.stdout

    @pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
    def test_a_redirect_is_never_followed(self, tls_api, run_agent, status):
        """An https API whose upgrade redirects to ws://: the key must not follow."""
        api, ca_file = tls_api
        elsewhere = FakeAPI().start()
        try:
            api.redirect = (status, f"ws://127.0.0.1:{elsewhere.port}{agent.WS_PATH}")
            proc = run_agent(api.url, "--ca-file", ca_file)
            proc.wait_log(f"with a redirect (HTTP {status} to 'ws://127.0.0.1:")
            assert "follows no redirect" in proc.log()
            assert not elsewhere.connects and not elsewhere.messages()
        finally:
            elsewhere.stop()

    def test_check_follows_no_redirect(self, tls_api):
        """--check's HTTP requests must not carry X-API-Key to an http:// redirect."""
        api, ca_file = tls_api
        elsewhere = FakeAPI().start()
        try:
            api.http_redirect = elsewhere.url
            result = run_cli("--check", "--api-url", api.url, "--ca-file", ca_file,
                             env=clean_env(CHATOPS_API_KEY=KEY))
            assert result.returncode == 1
            assert "redirect to http://127.0.0.1:" in result.stdout
            assert "not followed" in result.stdout
            assert not elsewhere.http_requests
        finally:
            elsewhere.stop()

    def test_skip_verify_connects_and_warns(self, tls_api, run_agent):
        api, _ = tls_api
        proc = run_agent(api.url, "--tls-skip-verify")
        wait_until(api.metrics, 6, "metrics")
        assert "TLS certificate verification is OFF" in proc.log()


class Tinyproxy:
    """Debian's tinyproxy on 127.0.0.1, started for a test: CONNECT allowed
    to `connect_ports` only (to any port if none), Basic auth if `auth`
    (user, password) is given. Its log tells which CONNECTs it was asked."""

    def __init__(self, tmp_path, connect_ports=(), auth=None):
        require(shutil.which("tinyproxy"),
                "tinyproxy is not installed (apt-get install tinyproxy)")
        self.port = fresh_port()
        lines = [f"Port {self.port}", "Listen 127.0.0.1", "Timeout 60",
                 "LogLevel Connect", "MaxClients 50", "Allow 127.0.0.1",
                 *[f"ConnectPort {p}" for p in connect_ports]]
        if auth:
            lines.append("BasicAuth {} {}".format(*auth))
        config = tmp_path / f"tinyproxy-{self.port}.conf"
        config.write_text("\n".join(lines) + "\n")
        self.log_path = tmp_path / f"tinyproxy-{self.port}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(config)],
                                         stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._listening, 10, lambda: self.log_path.read_text())
        self.url = f"http://127.0.0.1:{self.port}"

    def _listening(self):
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def connects(self):
        """The targets of the CONNECTs it was asked, in order."""
        return re.findall(r"Request \(file descriptor \d+\): CONNECT (\S+)",
                          self.log_path.read_text())

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def tinyproxy(tmp_path):
    started = []

    def start(**options):
        started.append(Tinyproxy(tmp_path, **options))
        return started[-1]

    yield start
    for proxy in started:
        proxy.close()


class TestProxies:
    """The agent reaches the API through an HTTP proxy's CONNECT tunnel, the
    one the proxy setting or https_proxy / http_proxy names, unless no_proxy
    names the host: its own decision, the same with every websocket-client
    (issue 29, goal 1; and issue 26, defect 5: the agent opens the socket)."""

    @pytest.mark.parametrize("how", ["https_proxy", "HTTPS_PROXY", "--proxy"])
    def test_through_the_proxy_named(self, tls_api, tinyproxy, run_agent, how):
        api, ca_file = tls_api
        proxy = tinyproxy()
        flags = ("--proxy", proxy.url) if how == "--proxy" else ()
        env = {} if flags else {how: proxy.url}
        proc = run_agent(api.url, "--ca-file", ca_file, *flags, **env)
        wait_until(lambda: len(api.metrics()) >= 2, 15, proc.log)
        assert proxy.connects() == [f"127.0.0.1:{api.port}"]
        assert f"through the proxy {proxy.url}" in proc.log()

    def test_no_proxy_keeps_a_host_direct(self, tls_api, tinyproxy, run_agent):
        api, ca_file = tls_api
        proxy = tinyproxy()
        proc = run_agent(api.url, "--ca-file", ca_file, https_proxy=proxy.url,
                         no_proxy="example.org, 127.0.0.0/8")
        wait_until(lambda: len(api.metrics()) >= 2, 15, proc.log)
        assert proxy.connects() == [] and "through the proxy" not in proc.log()
        none = run_agent(api.url, "--ca-file", ca_file, "--proxy", "none",
                         https_proxy=proxy.url)
        wait_until(lambda: len(api.connects) >= 2, 15, none.log)
        assert proxy.connects() == []

    def test_a_refusal_says_what_the_proxy_said_and_what_to_ask(
            self, tls_api, tinyproxy, run_agent):
        api, ca_file = tls_api
        proxy = tinyproxy(connect_ports=[443])
        proc = run_agent(api.url, "--ca-file", ca_file, https_proxy=proxy.url)
        proc.wait_log(f"the proxy {proxy.url} refused CONNECT to 127.0.0.1:"
                      f"{api.port} (403 Access violation): ask for port "
                      f"{api.port} to be allowed, or serve the API on 443", 15)
        assert api.connects == []

    def test_credentials_go_to_the_proxy_and_nowhere_else(
            self, tls_api, tinyproxy, run_agent):
        api, ca_file = tls_api
        proxy = tinyproxy(auth=("chatops", "s3cret-pw"))
        with_credentials = proxy.url.replace("//", "//chatops:s3cret-pw@")
        good = run_agent(api.url, "--ca-file", ca_file,
                         https_proxy=with_credentials, CHATOPS_LOG_LEVEL="debug")
        wait_until(lambda: len(api.metrics()) >= 2, 15, good.log)
        none = run_agent(api.url, "--ca-file", ca_file, https_proxy=proxy.url)
        none.wait_log("it wants a user and password; give them in the environment "
                      f"variable https_proxy, http://USER:PASSWORD@127.0.0.1:"
                      f"{proxy.port}", 15)
        wrong = run_agent(api.url, "--ca-file", ca_file, "--proxy",
                          proxy.url.replace("//", "//chatops:wrong@"))
        wrong.wait_log("check the user and password in the proxy setting", 15)
        shown = run_cli("--print-config", "--proxy", with_credentials)
        assert "chatops:<redacted>@127.0.0.1" in shown.stdout
        for text in (good.log(), none.log(), wrong.log(), shown.stdout):
            assert "s3cret-pw" not in text and "wrong" not in text

    def test_the_key_never_crosses_a_proxy_in_clear(self, api, tinyproxy, run_agent):
        proxy = tinyproxy()
        refused = run_agent(api.url, http_proxy=proxy.url)
        refused.wait_log("refusing to send the API key in clear through the proxy "
                         f"{proxy.url} (the environment variable http_proxy)", 10)
        assert proxy.connects() == [] and api.connects == []
        allowed = run_agent(api.url, "--allow-plaintext", http_proxy=proxy.url)
        wait_until(lambda: len(api.metrics()) >= 2, 15, allowed.log)
        assert proxy.connects() == [f"127.0.0.1:{api.port}"]

    def test_check_takes_the_same_proxy(self, tls_api, api, tinyproxy):
        tls, ca_file = tls_api
        proxy = tinyproxy()
        env = clean_env(CHATOPS_API_KEY=KEY, https_proxy=proxy.url,
                        http_proxy=proxy.url)
        result = run_cli("--check", "--api-url", tls.url, "--ca-file", ca_file,
                         env=env)
        assert result.returncode == 0, result.stdout
        assert proxy.connects() == [f"127.0.0.1:{tls.port}"] * 2  # health, key
        plain = run_cli("--check", "--api-url", api.url, env=env)
        assert "FAIL API key not checked: it would cross the proxy " \
            f"{proxy.url} in clear" in plain.stdout
        assert all("api-keys" not in path for path, _ in api.http_requests)

    def test_a_value_that_is_no_proxy_is_refused_at_start(self, api):
        for env, said in (
                ({"CHATOPS_PROXY": "socks5://127.0.0.1:1080"}, "environment "
                 "variable CHATOPS_PROXY: proxy (socks5://127.0.0.1:1080)"),
                ({"CHATOPS_API_KEY": KEY, "http_proxy": "http://u:pw@:8080"},
                 "the environment variable http_proxy (http://u:<redacted>@:8080)")):
            result = run_cli("--api-url", api.url, env=clean_env(**env))
            assert result.returncode == 2, result.stderr
            assert f"{said} is not a proxy the agent can use" in result.stderr
            assert ":pw@" not in result.stderr

    @pytest.mark.parametrize("host, no_proxy, bypassed", [
        ("a.corp.example", "corp.example", True),
        ("a.corp.example", ".corp.example", True),
        ("corp.example", ".corp.example", True),
        ("evilcorp.example", "corp.example", False),
        ("evilcorp.example", ".corp.example", False),
        ("CORP.example", "corp.EXAMPLE.", True),
        ("api.example", "x.example, api.example:8443", True),
        ("www.ample.com", "ample.com", True),  # curl's own examples
        ("ample.com", "ample.com", True),
        ("www.example.com", "ample.com", False),
        ("ample.com.org", "ample.com", False),
        ("10.1.2.3", "10.0.0.0/8", True),
        ("11.1.2.3", "10.0.0.0/8", False),
        ("192.168.7.9", "192.168.7.9", True),
        ("::1", "::1", True),
        ("::1", "[::1]:8080", True),
        ("2001:db8::5", "2001:db8::/32", True),
        ("10.1.2.3", "::/0", False),
        ("anything", "*", True),
        ("anything", "", False),
        ("localhost", "", False),  # loopback is a host like any other
        ("127.0.0.1", "localhost", False),
    ])
    def test_no_proxy_is_read_as_curl_reads_it(self, host, no_proxy, bypassed):
        assert agent.bypasses_proxy(host, no_proxy) is bypassed

    def test_which_proxy(self):
        config = agent.load_config({}, {})
        env = {"https_proxy": "http://a:1", "HTTPS_PROXY": "http://b:2",
               "http_proxy": "http://c:3", "NO_PROXY": "skip.example"}
        assert agent.proxy_for("api.example", True, config, env).name == "http://a:1"
        assert agent.proxy_for("api.example", False, config, env).name == "http://c:3"
        assert agent.proxy_for("skip.example", True, config, env) is None
        assert agent.proxy_for("api.example", True, config, {}) is None
        set_here = agent.load_config({"proxy": "http://d"}, {})
        found = agent.proxy_for("api.example", True, set_here, env)
        assert (found.name, found.origin) == ("http://d:1080", "the proxy setting")
        off = agent.load_config({"proxy": "none"}, {})
        assert agent.proxy_for("api.example", True, off, env) is None


class TestDependencies:
    def test_websocket_client_from_a_wheel_beside_the_agent(self, tmp_path):
        """A venv without websocket-client; the agent finds a wheel beside itself."""
        import websocket

        env_dir = tmp_path / "venv"
        venv.create(env_dir, with_pip=False)
        python = str(env_dir / "bin" / "python")
        copy = tmp_path / "chatops_agent.py"
        shutil.copy(AGENT, copy)

        def check():
            return subprocess.run(
                [python, str(copy), "--check", "--api-url", "http://127.0.0.1:9"],
                capture_output=True,
                text=True,
                env=clean_env(),
                timeout=60,
            ).stdout

        assert "FAIL the Python package websocket-client is not installed" in check()
        package = os.path.dirname(websocket.__file__)
        wheel = tmp_path / (
            f"websocket_client-{websocket.__version__}-py3-none-any.whl"
        )
        with zipfile.ZipFile(wheel, "w") as z:
            for name in os.listdir(package):
                if name.endswith(".py"):
                    z.write(os.path.join(package, name), "websocket/" + name)
        assert f"ok   websocket-client {websocket.__version__}" in check()


class TestFootprint:
    """What keeps the agent small (issue 14). The sizes themselves are
    measured by bench/bench_agent.py, never by a test."""

    def test_the_running_agent_reruns_as_an_import(self, api, tmp_path):
        """Same pid, same interpreter flags and arguments, and the agent's
        folder first on sys.path, as for a script."""
        args = ["--api-url", api.url, "--metrics-interval-s", "0.5"]
        proc = AgentProcess(tmp_path, *args,
                            command=[sys.executable, "-X", "utf8", AGENT],
                            env=clean_env(CHATOPS_API_KEY=KEY))
        wait_until(api.metrics, 10, proc.log)
        argv = command_line(proc.proc.pid)
        c = argv.index("-c")
        assert argv[0] == sys.executable and "utf8" in argv[1:c]
        folder = os.path.dirname(AGENT)
        assert argv[c + 1:] == [agent.RUN_AS_IMPORT, folder, AGENT, *args]
        assert proc.terminate() == 0

    def test_short_runs_stay_scripts(self):
        out = run_cli("--once", "--docker-enabled", "false")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["type"] == "metrics"

    def test_free_memory_goes_back_after_start_then_once_a_minute(self):
        free = agent.FreeMemory()
        require(free._trim is not None, "no glibc malloc_trim here")
        free.now_and_then()  # the real call: returns what start-up left
        calls = []
        free._trim = calls.append
        free.now_and_then()
        assert calls == [] and free._due >= time.monotonic() + 59
        free._due = time.monotonic()  # a minute later
        free.now_and_then()
        assert calls == [0]

    def test_whole_numbers_in_the_json_lists_lose_their_point(self):
        assert agent.tenths(0.04) == 0 and type(agent.tenths(0.04)) is int
        assert agent.tenths(12.34) == 12.3 and agent.tenths(7) == 7
        assert agent.tenths(float("nan")) != agent.tenths(float("nan"))  # NaN stays
        data = sample(agent.ProcSource(), top_processes=None)  # every process
        text = agent.to_json(data).decode()
        assert '"cpu":0.0' not in text and '"cpu":0,' in text
        assert all(type(p["cpu"]) in (int, float) for p in data["processes"])
        # what the server stores in columns keeps its float form
        assert type(data["memory"]["swap_total_gb"]) is float


###############################################################################
# Commands ####################################################################
###############################################################################


def process_groups():
    """{pgid: [(pid, state, cmdline)]} of every process on the machine."""
    groups = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        groups.setdefault(int(fields[2]), []).append((int(entry), fields[0], cmdline))
    return groups


def group_running(marker):
    """The process group id of the process whose command line holds `marker`."""
    for pgid, members in process_groups().items():
        if any(marker in cmdline for _, _, cmdline in members):
            return pgid
    return None


def rss_kib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


class Commander:
    """Sends requests through the fake API and waits for their replies."""

    def __init__(self, api, proc):
        self.api = api
        self.proc = proc
        self.count = 0

    def send(self, command=None, form="api", **fields):
        self.count += 1
        id_field = "request_id" if form == "api" else "command_id"
        kind = "execute_command" if form == "api" else "command"
        request_id = fields.pop(id_field, f"req-{self.count}")
        message = {"type": kind, id_field: request_id, **fields}
        if command is not None:
            message["command"] = command
        self.api.send_all(json.dumps(message))
        return request_id

    def reply(self, request_id, timeout_s=15, id_field="request_id"):
        """The first message with this id that is not a stream chunk."""

        def found():  # called with the API's lock held: read frames directly
            for _, m in self.api.frames:
                if m.get(id_field) == request_id and m["type"] != "command_output":
                    return m
            return None

        return self.api.wait_for(found, timeout_s, f"the reply to {request_id}")

    def run(self, command, form="api", timeout_s=15, **fields):
        request_id = self.send(command, form, **fields)
        id_field = "request_id" if form == "api" else "command_id"
        return self.reply(request_id, timeout_s, id_field)

    def cancel(self, target_id):
        self.count += 1
        request_id = f"cancel-{self.count}"
        self.api.send_all(json.dumps({"type": "cancel_command",
                                      "request_id": request_id,
                                      "target_id": target_id}))
        return self.reply(request_id)


@pytest.fixture
def commander(api, run_agent):
    """An agent connected to the fake API, ready for commands; extra flags per test."""

    def start(*args, **env):
        proc = run_agent(api.url, "--command-grace-s", "1", *args, **env)
        wait_until(api.metrics, 6, "the agent to connect")
        return Commander(api, proc)

    return start


class TestOutputCapture:
    def test_keeps_everything_under_the_cap(self):
        capture = agent.OutputCapture(100)
        capture.add(b"a" * 30)
        capture.add(b"b" * 30)
        assert capture.text() == ("a" * 30 + "b" * 30, False)

    def test_keeps_head_and_tail_with_a_marker(self):
        capture = agent.OutputCapture(100)
        for i in range(1000):
            capture.add(f"{i:04d}\n".encode())
        output, truncated = capture.text()
        assert truncated and capture.total == 5000
        head, marker, tail = output.partition(
            "\n[... 4900 bytes of output omitted ...]\n"
        )
        assert marker and head == "".join(f"{i:04d}\n" for i in range(10))
        assert tail == "".join(f"{i:04d}\n" for i in range(990, 1000))

    def test_binary_is_replaced_not_fatal(self):
        capture = agent.OutputCapture(100)
        capture.add(b"ok \xff\xfe\n")
        assert capture.text()[0] == "ok \ufffd\ufffd\n"

    def test_cuts_fall_on_line_boundaries_and_count_exactly(self):
        """Any output, in any chunks: each kept part is the output's own start
        or end; a cut moves at most LINE_CUT_SEARCH bytes to end a line when a
        newline lies that close, and the marker counts what is left out."""
        hypothesis = need_module("hypothesis")
        st = hypothesis.strategies
        search = agent.LINE_CUT_SEARCH
        marker = re.compile(r"\n\[\.\.\. (\d+) bytes of output omitted \.\.\.\]\n")

        @hypothesis.settings(max_examples=400, deadline=None)
        @hypothesis.given(st.lists(st.text("ab\n", max_size=6000), max_size=30),
                          st.integers(1024, 20000))
        def cut(chunks, cap):
            capture = agent.OutputCapture(cap)
            for chunk in chunks:
                capture.add(chunk.encode())
            data = "".join(chunks)
            output, truncated = capture.text()
            if not truncated:
                assert output == data
                return
            head, omitted, tail = marker.split(output)
            assert data.startswith(head) and data.endswith(tail)
            assert int(omitted) == len(data) - len(head) - len(tail) > 0
            half = cap // 2
            assert half - search <= len(head) <= half
            assert head.endswith("\n") or "\n" not in data[half - search : half]
            nominal, start = len(data) - (cap - half), len(data) - len(tail)
            assert nominal <= start <= nominal + search
            assert data[start - 1] == "\n" or \
                "\n" not in data[nominal - 1 : nominal - 1 + search]

        cut()

    def test_a_nul_is_sent_as_a_stand_in(self):
        frame = json.loads(agent.to_json({"output": "a\0b", "n": float("nan")}))
        assert frame == {"output": "a\u2400b", "n": None}
        assert agent.to_json({"text": "\\u0000"}) == b'{"text":"\\\\u0000"}'


class TestCommandRequests:
    """Request validation, in-process: nothing here starts a process."""

    def config(self, **values):
        return agent.load_config({k: str(v) for k, v in values.items()}, {})

    @pytest.mark.parametrize("fields, message", [
        ({}, "'command' is missing or empty"),
        ({"command": "   "}, "'command' is missing or empty"),
        ({"command": 42}, "'command' must be a string"),
        ({"command": ["ls"]}, "'command' must be a string"),
        ({"command": "ls\0x"}, "holds NUL"),
        ({"command": "ls", "timeout": -1}, "'timeout' must be between 0 and"),
        ({"command": "ls", "timeout": 0}, "'timeout' must be between 0 and"),
        ({"command": "ls", "timeout": 1e12}, "'timeout' must be between 0 and"),
        ({"command": "ls", "timeout": float("nan")}, "'timeout' must be between"),
        ({"command": "ls", "timeout": "10"}, "'timeout' must be a number of seconds"),
        ({"command": "ls", "timeout": True}, "'timeout' must be a number of seconds"),
        ({"command": "ls", "stream": "yes"}, "'stream' must be true or false"),
        ({"command": "ls", "cwd": "tmp"}, "not an absolute path to a directory"),
        ({"command": "ls", "cwd": "/no/such/dir"}, "not an absolute path"),
        ({"command": "ls", "cwd": 7}, "'cwd' must be a string"),
    ])
    def test_bad_requests(self, fields, message):
        request = {"type": "execute_command", "request_id": "r1", **fields}
        with pytest.raises(agent.RequestError, match=message.replace("(", r"\(")):
            parse_request(dict(request, type="execute_command"), self.config())

    @pytest.mark.parametrize("request_id", [None, "", True, ["x"], "x" * 201])
    def test_unusable_ids(self, request_id):
        request = {"type": "command", "command_id": request_id, "command": "ls"}
        with pytest.raises(agent.RequestError, match="no usable 'command_id'"):
            parse_request(request, self.config())

    def test_timeout_may_lower_never_raise(self):
        config = self.config(command_timeout_s=60)
        lower = {"request_id": "r", "command": "ls", "timeout": 5}
        higher = {"request_id": "r", "command": "ls", "timeout": 600}

        def timeout_s(request):
            request = dict(request, type="execute_command")
            return parse_request(request, config).timeout_s

        assert timeout_s(lower) == 5
        assert timeout_s(higher) == 60
        plain = {"request_id": "r", "command": "ls"}
        assert timeout_s(plain) == 60

    def test_cwd_refused_when_not_allowed(self):
        config = agent.load_config({"command_allow_cwd": False}, {})
        request = {"request_id": "r", "command": "ls", "cwd": "/tmp"}
        with pytest.raises(agent.RequestError, match="does not let requests choose"):
            parse_request(dict(request, type="execute_command"), config)

    def test_command_settings_from_text(self):
        config = agent.load_config({}, {
            "CHATOPS_COMMAND_ALLOW": '["uptime", "df( -h)?"]',
            "CHATOPS_COMMAND_ENV": '{"HTTP_PROXY": "http://proxy:3128"}',
        })
        assert config.command_allow == ["uptime", "df( -h)?"]
        assert config.command_env == {"HTTP_PROXY": "http://proxy:3128"}
        one = agent.load_config({"command_allow": "uptime"}, {})
        assert one.command_allow == ["uptime"]

    def test_busy_only_when_workers_and_queue_are_all_taken(self):
        """Admission counts jobs: with 1 worker and a queue of 1, two requests are
        taken even before the worker has picked up the first (no worker runs
        here), and only the third is refused."""
        config = agent.load_config(
            {"command_workers": "1", "command_queue_size": "1"}, {}
        )
        lane = agent.Lane("command", 1, 1, None)
        requests = agent.Requests(config, lambda *a, **k: None, [lane])

        def job(request_id):
            request = {"type": "execute_command", "command": "true",
                       "request_id": request_id}
            return parse_request(request, config)

        requests.submit(job("a"))
        requests.submit(job("b"))
        busy = "agent busy: 1 command requests running and 1 waiting"
        with pytest.raises(agent.RequestError, match=busy):
            requests.submit(job("c"))

    @pytest.mark.parametrize("values, message", [
        ({"command_allow": "(unclosed"}, "not a valid regular expression"),
        ({"command_env": '{"BAD NAME": "x"}'}, "command_env must be a JSON object"),
        ({"command_env": "[1]"}, "command_env must be a JSON object"),
        ({"command_workers": "0"}, "command_workers must be from 1 to 64"),
        ({"command_output_max_bytes": "10"}, "must be from 1024 to 2097152"),
        ({"command_cwd": "/no/such/dir"}, "is not a directory"),
    ])
    def test_bad_command_settings(self, values, message):
        with pytest.raises(agent.ConfigError, match=message):
            agent.load_config(values, {})


class TestCommands:
    # Python 3.8 has no os.pidfd_open: only the polling exists there.
    @pytest.mark.parametrize(
        "watch", ["pidfd", "polling"] if agent.HAVE_PIDFD else ["polling"])
    def test_a_command_ends_when_its_shell_exits(self, monkeypatch, watch):
        """Seen through a pidfd where there is one, by polling elsewhere: either
        way a shell that closes its output first is waited for."""
        if watch == "polling":
            monkeypatch.setattr(agent, "HAVE_PIDFD", False)
        config = agent.load_config({}, {"CHATOPS_STATE_DIR": "none"})
        runner = agent.CommandRunner(config, lambda message: None, agent.Children())
        runner.env = agent.command_environment(config)  # not start(): no subreaper
        quick = parse_request(
            {"type": "execute_command", "request_id": "q", "command": "echo hi"},
            config)
        assert runner.execute(quick)["data"]["output"] == "hi\n"
        late = parse_request(
            {"type": "execute_command", "request_id": "l",
             "command": "exec >&-; sleep 0.3; exit 3"}, config)
        result = runner.execute(late)["data"]
        assert result["exit_code"] == 3 and result["duration_ms"] >= 300

    def test_uptime_through_the_api_while_metrics_flow(self, commander):
        cmd = commander()
        before = len(cmd.api.metrics())
        started = time.monotonic()
        reply = cmd.run("uptime")
        assert time.monotonic() - started < 10
        assert reply["type"] == "command_result" and reply["data"]["exit_code"] == 0
        assert "load average" in reply["data"]["output"]
        wait_until(lambda: len(cmd.api.metrics()) > before + 1, 5, "metrics to go on")

    @pytest.mark.parametrize("form", ["api", "docs"])
    def test_exit_codes_and_output_order(self, commander, form):
        cmd = commander()

        def result(command):
            reply = cmd.run(command, form)
            return reply["data"] if form == "api" else reply

        assert result("true")["exit_code"] == 0
        assert result("false")["exit_code"] == 1
        mixed = result("echo one; echo two >&2; echo three; exit 3")
        assert mixed["exit_code"] == 3 and mixed["output"] == "one\ntwo\nthree\n"
        assert {"duration_ms", "truncated", "output_bytes"} <= set(mixed)
        killed = result("kill -TERM $$")
        assert killed["exit_code"] == 128 + 15
        assert "[killed by signal 15 (SIGTERM)]" in killed["output"]

    def test_docs_form_reply_shape(self, commander):
        reply = commander().run("echo hi", form="docs", command_id="c-7")
        assert reply["type"] == "command_response" and reply["command_id"] == "c-7"
        assert reply["output"] == "hi\n" and reply["exit_code"] == 0
        assert "request_id" not in reply

    def test_binary_output(self, commander):
        data = commander().run("head -c 4000 /dev/urandom")["data"]
        assert data["exit_code"] == 0 and data["output_bytes"] == 4000

    def test_environment_is_built_not_inherited(self, commander):
        cmd = commander(AGENT_ONLY_MARKER="leak-me")
        output = cmd.run("env")["data"]["output"]
        names = {line.split("=", 1)[0] for line in output.splitlines()}
        assert "CHATOPS_API_KEY" not in names and "AGENT_ONLY_MARKER" not in names
        assert KEY not in output and "leak-me" not in output
        assert {"PATH", "LANG", "LC_ALL", "HOME", "USER", "TERM"} <= names
        assert "TERM=dumb" in output

    def test_configured_extras_and_cwd(self, commander, tmp_path):
        cmd = commander("--command-env", '{"GREETING": "hello"}')
        assert cmd.run("echo $GREETING")["data"]["output"] == "hello\n"
        assert cmd.run("pwd")["data"]["output"] == "/\n"
        assert cmd.run("pwd", cwd=str(tmp_path))["data"]["output"] == f"{tmp_path}\n"

    def test_timeout_leaves_no_process_and_no_zombie(self, commander):
        cmd = commander()
        marker = "987654.321"
        request_id = cmd.send(f"sleep {marker} & sleep {marker}", timeout=1)
        pgid = wait_until(lambda: group_running(marker), 5, "the command to run")
        reply = cmd.reply(request_id)
        assert reply["data"]["exit_code"] == 124 and reply["data"]["timed_out"]
        assert "timed out after 1 s" in reply["data"]["output"]
        wait_until(lambda: pgid not in process_groups(), 5,
                   f"group {pgid} to be gone, zombies included")

    def test_timeout_ends_what_left_the_group(self, commander):
        """setsid puts a process in a session and group of its own: on timeout
        it must end too, whether its parent is still the shell (1234.5) or it
        was orphaned to the agent (1234.6)."""
        cmd = commander()
        a, b = f"1234.{os.getpid()}1", f"1234.{os.getpid()}2"
        reply = cmd.run(f"setsid sleep {a} & (setsid sleep {b} &); sleep 100",
                        timeout=1)
        assert reply["data"]["timed_out"]
        wait_until(lambda: not group_members(a) and not group_members(b), 5,
                   "the processes that left the group to end")

    def test_shutdown_ends_what_finished_commands_left_running(self, commander):
        cmd = commander()
        marker = f"4321.{os.getpid()}"
        script = (f"nohup sleep {marker}1 >/dev/null 2>&1 & "
                  f"setsid nohup sleep {marker}2 >/dev/null 2>&1 & echo started")
        assert cmd.run(script)["data"]["output"] == "started\n"
        wait_until(lambda: len(group_members(marker)) == 2, 5, "the two jobs")
        cmd.proc.proc.send_signal(signal.SIGTERM)
        assert cmd.proc.exit_status() == 0
        wait_until(lambda: not group_members(marker), 5, "the jobs to end")

    def test_background_job_does_not_hold_the_reply(self, commander):
        cmd = commander()
        started = time.monotonic()
        reply = cmd.run("sleep 30 & echo started")
        assert reply["data"]["output"] == "started\n"
        assert time.monotonic() - started < 3

    def test_agent_adopts_and_reaps_what_commands_leave_behind(self, commander):
        """As a child subreaper the agent, not PID 1, inherits a command's
        background job, and reaps it when it ends: no zombie even where PID 1
        would not reap (a container whose PID 1 is the agent)."""
        cmd = commander()
        # It runs until the test ends it, however long the reply takes on a
        # loaded machine; this pytest's only (its pid in the command line).
        marker = f"sleep 600.{os.getpid()}"
        reply = cmd.run(f"{marker} & echo started")
        assert reply["data"]["output"] == "started\n"
        orphan = group_members(marker)
        assert orphan, "the background job should still run"
        pid = orphan[0][0]  # a zombie has no command line: follow its pid
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            assert parent == cmd.proc.proc.pid
        finally:
            os.kill(pid, signal.SIGTERM)  # it ends: the agent must reap it
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10,
                   "the orphan to end and be reaped by the agent")

    def test_200_mb_of_output_is_bounded(self, commander):
        cmd = commander()
        cmd.run("true")  # the workers and their buffers exist before measuring
        before = rss_kib(cmd.proc.proc.pid)
        reply = cmd.run("yes 0123456789abcdef | head -c 200000000", timeout_s=120)
        data = reply["data"]
        assert data["exit_code"] == 0 and data["truncated"]
        assert data["output_bytes"] == 200_000_000
        # Lines of 17 bytes; each kept half (512 KiB) is cut to whole lines.
        line, half, total = len("0123456789abcdef\n"), 524288, 200_000_000
        head = half // line * line
        tail = total - -(-(total - half) // line) * line
        marker = f"\n[... {total - head - tail} bytes of output omitted ...]\n"
        output = data["output"]
        assert output[head : head + len(marker)] == marker
        assert output[:head] == "0123456789abcdef\n" * (head // line)
        assert output[head + len(marker) :].startswith("0123456789abcdef\n")
        assert len(output) == head + len(marker) + tail
        growth_mib = (rss_kib(cmd.proc.proc.pid, "VmHWM") - before) / 1024
        assert growth_mib < 10, f"peak RSS grew by {growth_mib:.1f} MiB"

    def test_a_cut_keeps_whole_lines(self, commander):
        cmd = commander("--command-output-max-bytes", "10000")
        data = cmd.run("seq 1 100000")["data"]
        cut = r"\n(\[\.\.\. \d+ bytes of output omitted \.\.\.\])\n"
        head, marker, tail = re.split(cut, data["output"])
        first, last = head.split("\n"), tail.split("\n")
        assert first[-1] == "" and last[-1] == ""  # both parts end with a newline
        assert first[:-1] == [str(n) for n in range(1, len(first))]
        assert last[:-1] == [str(n) for n in range(100001 - len(last) + 1, 100001)]
        omitted = int(marker.split()[1])
        assert len(head) + omitted + len(tail) == data["output_bytes"]

    def test_a_nul_arrives_as_a_stand_in_and_is_counted(self, commander):
        data = commander().run("printf 'a\\000b\\n'")["data"]
        assert data["output"] == "a\u2400b\n" and data["output_bytes"] == 4

    def test_long_commands_do_not_block_the_receive_loop(self, commander):
        cmd, marker = commander(), f"60.{os.getpid()}"  # this pytest's only
        sleepers = [cmd.send(f"sleep {marker}") for _ in range(4)]
        wait_until(lambda: group_running(marker), 5, "the sleepers to run")
        sent = time.monotonic()
        cmd.api.send_all(json.dumps({"type": "ping"}))
        wait_until(lambda: cmd.api.messages("pong"), 2, "a pong")
        assert time.monotonic() - sent < 0.5
        waiting = cmd.send("echo queued")  # a fifth: waits for a worker
        for request_id in sleepers:
            assert cmd.cancel(request_id)["data"]["cancelled"]
        assert cmd.reply(waiting)["data"]["output"] == "queued\n"

    def test_full_queue_answers_busy_at_once(self, commander):
        cmd = commander("--command-workers", "1", "--command-queue-size", "1")
        marker = f"60.{os.getpid()}"
        running, queued = cmd.send(f"sleep {marker}"), cmd.send(f"sleep {marker}")
        wait_until(lambda: group_running(marker), 5, "the first command to run")
        refused = cmd.run("echo never", timeout_s=2)
        assert refused["type"] == "error" and "agent busy" in refused["message"]
        assert cmd.cancel(queued)["data"]["state"] == "queued"
        assert cmd.cancel(running)["data"]["state"] == "running"
        assert cmd.reply(queued)["data"]["cancelled"]

    def test_cancel(self, commander):
        cmd, marker = commander(), f"60.{os.getpid()}"
        target = cmd.send(f"echo before; sleep {marker}")
        wait_until(lambda: group_running(marker), 5, "the command to run")
        answer = cmd.cancel(target)
        assert answer["type"] == "cancel_result"
        assert answer["data"]["cancelled"] and answer["data"]["target_id"] == target
        reply = cmd.reply(target)
        assert reply["data"]["cancelled"] and reply["data"]["exit_code"] == 130
        assert reply["data"]["output"].startswith("before\n")
        assert "cancelled by request 'cancel-" in reply["data"]["output"]
        again = cmd.cancel(target)
        assert again["type"] == "cancel_result" and not again["data"]["cancelled"]
        unknown = cmd.cancel("no-such-id")
        assert unknown["data"] == {
            "target_id": "no-such-id",
            "cancelled": False,
            "state": "not running",
            "message": "command 'no-such-id' is not running",
        }

    def test_stream_only_when_asked(self, commander):
        cmd = commander()
        script = "for i in 1 2 3 4 5; do echo line $i; sleep 0.3; done"
        streamed = cmd.send(script, stream=True)
        final = cmd.reply(streamed)
        chunks = [
            m
            for m in cmd.api.messages()
            if m["type"] == "command_output" and m["request_id"] == streamed
        ]
        assert len(chunks) >= 3
        assert [c["data"]["seq"] for c in chunks] == list(range(1, len(chunks) + 1))
        assert "".join(c["data"]["output"] for c in chunks) == final["data"]["output"]
        messages = [m for m in cmd.api.messages() if m.get("request_id") == streamed]
        assert messages[-1] is final  # chunks first, then the one final reply
        plain = cmd.send("echo quiet")
        cmd.reply(plain)
        assert not [m for m in cmd.api.messages() if m["type"] == "command_output"
                    and m["request_id"] == plain]

    def test_disabled_commands_never_start(self, commander, tmp_path):
        marker = tmp_path / "ran"
        cmd = commander("--command-cwd", str(tmp_path),
                        CHATOPS_COMMANDS_ENABLED="false")
        reply = cmd.run(f"touch {marker}")
        assert reply == {
            "type": "error",
            "request_id": reply["request_id"],
            "message": "command execution is disabled on this agent",
        }
        docs = cmd.run(f"touch {marker}", form="docs", command_id="c1")
        assert docs["type"] == "error" and docs["command_id"] == "c1"
        assert not marker.exists()

    def test_allow_list_must_match_the_whole_command(self, commander, tmp_path):
        marker = tmp_path / "ran"
        cmd = commander("--command-allow", '["uptime", "echo [a-z]+"]')
        assert cmd.run("uptime")["data"]["exit_code"] == 0
        assert cmd.run("echo hello")["data"]["output"] == "hello\n"
        for refused in (f"echo hello; touch {marker}", f"touch {marker}",
                        f"uptime && touch {marker}"):
            reply = cmd.run(refused)
            assert reply["type"] == "error" and "command_allow" in reply["message"]
        assert not marker.exists()

    def test_bad_requests_answered_with_their_id(self, commander, tmp_path):
        marker = tmp_path / "ran"
        cmd = commander()
        for fields in ({"command": 5}, {"command": ""},
                       {"command": f"touch {marker}", "timeout": -3},
                       {"command": f"touch {marker}", "stream": "please"},
                       {"command": f"touch {marker}", "cwd": "relative"}):
            request_id = cmd.send(**fields)
            reply = cmd.reply(request_id)
            assert reply["type"] == "error" and reply["request_id"] == request_id
        first = cmd.send(f"sleep 60.{os.getpid()}", request_id="dup")
        wait_until(lambda: group_running(f"60.{os.getpid()}"), 5, "the first to run")
        second = cmd.run(f"touch {marker}", request_id="dup")
        assert second["type"] == "error" and "already running" in second["message"]
        cmd.cancel(first)
        assert not marker.exists()

    def test_audit_log_without_the_key(self, commander):
        cmd = commander()
        cmd.run("echo audited", requested_by="alice")
        log = cmd.proc.log()
        assert "command req-1 by alice: 'echo audited' started" in log
        assert "command req-1 ended: exit 0 in" in log and "8 bytes of output" in log
        assert KEY not in log

    def test_reply_waits_for_the_reconnect(self, commander):
        cmd = commander("--reconnect-max-delay-s", "1")
        marker = f"1.{os.getpid()}"
        request_id = cmd.send(f"sleep {marker}; echo done")
        wait_until(lambda: group_running(marker), 5, "the command to run")
        cmd.api.drop()
        reply = cmd.reply(request_id)
        assert reply["data"]["output"] == "done\n"
        number = next(n for n, m in cmd.api.frames if m is reply)
        assert number >= 1  # sent on a later connection

    def test_sigterm_kills_running_commands_and_exits_in_time(self, commander):
        cmd, marker = commander(), f"777.{os.getpid()}"  # this pytest's only
        for _ in range(3):
            cmd.send(f"sleep {marker} & sleep {marker}")
        pgids = wait_until(
            lambda: {pg for pg, members in process_groups().items()
                     if any(marker in c for _, _, c in members)}
            if len(group_members(marker)) >= 6 else None,
            5, "three commands to run")
        stopped = time.monotonic()
        cmd.proc.proc.send_signal(signal.SIGTERM)
        assert cmd.proc.exit_status() == 0
        assert time.monotonic() - stopped < 5
        wait_until(
            lambda: not pgids & set(process_groups()), 5, "the groups to be gone"
        )


def group_members(marker):
    return [p for members in process_groups().values() for p in members
            if marker in p[2]]


###############################################################################
# Docker ######################################################################
###############################################################################

TEST_IMAGE = "chatops-test-busybox:latest"


def docker_ready():
    """True when a docker CLI talks to a daemon, with the test image built."""
    if not shutil.which("docker"):
        return False
    try:
        subprocess.run(
            ["docker", "version"], capture_output=True, timeout=20, check=True
        )
    except (subprocess.SubprocessError, OSError):
        return False
    images = subprocess.run(["docker", "images", "-q", TEST_IMAGE],
                            capture_output=True, text=True, timeout=20)
    return bool(images.stdout.strip()) or build_test_image()


def build_test_image():
    """A busybox rootfs imported as an image: no registry is needed."""
    busybox = shutil.which("busybox")
    if not busybox:
        return False
    root = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"rootfs-{os.getpid()}")
    os.makedirs(os.path.join(root, "bin"), exist_ok=True)
    shutil.copy(busybox, os.path.join(root, "bin", "busybox"))
    for name in ("sh", "echo", "sleep", "cat", "yes", "head", "seq"):
        link = os.path.join(root, "bin", name)
        if not os.path.lexists(link):
            os.symlink("busybox", link)
    tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["docker", "import", "-", TEST_IMAGE], stdin=tar.stdout,
                   capture_output=True, timeout=60, check=True)
    tar.wait()
    shutil.rmtree(root)
    return True


@pytest.fixture(scope="session")
def docker_engine():
    require(os.environ.get("CHATOPS_TEST_DOCKER_ENGINE") != "0",
            "the Docker engine tests are left to another pass "
            "(CHATOPS_TEST_DOCKER_ENGINE=0)")
    ready = docker_ready()
    required = os.environ.get("CHATOPS_TEST_REQUIRE_DOCKER")
    require(ready or not required, "no Docker engine, and CI requires one")
    require(ready, "no Docker engine with the test image")


def docker(*args, check=True):
    return subprocess.run(["docker", *args], capture_output=True, text=True,
                          timeout=60, check=check)


def docker_state(name):
    return docker(
        "container", "inspect", "--format", "{{.State.Status}}", name
    ).stdout.strip()


@pytest.fixture
def container(docker_engine):
    """Makes uniquely named test containers (no network) and removes them after."""
    names = []

    def make(script="sleep 600", start=True, options=()):
        name = f"chatops-test-{os.getpid()}-{time.monotonic_ns() % 10**9}"
        verb = ["run", "-d"] if start else ["create"]
        docker(*verb, "--network", "none", "--name", name, *options, TEST_IMAGE,
               "sh", "-c", script)
        names.append(name)
        return name

    yield make
    if names:
        docker("rm", "-f", *names, check=False)


@pytest.fixture
def counting_docker(tmp_path):
    """A docker CLI that logs each call, so tests can count what the agent runs."""
    calls = tmp_path / "docker-calls"
    shim = tmp_path / "docker"
    shim.write_text(f'#!/bin/sh\necho "$1" >> {calls}\nexec docker "$@"\n')
    shim.chmod(0o755)
    calls.touch()
    return str(shim), calls


class TestDockerParsing:
    def test_ports(self):
        text = "0.0.0.0:8080->80/tcp, :::8080->80/tcp, 443/tcp, 127.0.0.1:53->53/udp"
        assert agent.parse_ports(text) == [
            {"private_port": 80, "type": "tcp", "public_port": 8080},
            {"private_port": 443, "type": "tcp"},
            {"private_port": 53, "type": "udp", "public_port": 53},
        ]
        assert agent.parse_ports("0.0.0.0:9000-9001->9000-9001/tcp") == [
            {"private_port": 9000, "type": "tcp", "public_port": 9000},
            {"private_port": 9001, "type": "tcp", "public_port": 9001},
        ]
        assert agent.parse_ports("") == []

    def test_ports_a_start_will_publish(self):
        def ports(network="default", exposed=None, bindings=None, publish_all=False):
            return agent.ports_when_running({
                "network": network, "exposed": exposed, "bindings": bindings,
                "publish_all": publish_all})
        fixed = {"80/tcp": [{"HostIp": "", "HostPort": "8080"}]}
        assert ports(exposed={"80/tcp": {}, "81/udp": {}}, bindings=fixed) == [
            {"private_port": 80, "type": "tcp", "public_port": 8080},
            {"private_port": 81, "type": "udp"}]
        assert ports(network="none", exposed={"80/tcp": {}}, bindings=fixed) == []
        assert ports(network="container:web", bindings=fixed) == []
        assert ports() == [] and ports(network="my-net") == []
        # The engine picks the host port at start: only a read can tell it.
        assert ports(bindings={"80/tcp": [{"HostPort": ""}]}) is None
        assert ports(bindings={"80/tcp": [{"HostPort": "8000-8010"}]}) is None
        assert ports(exposed={"80/tcp": {}}, publish_all=True) is None
        assert ports(network=None) is None and ports(bindings=[1]) is None

    def test_ports_a_container_publishes(self):
        live = {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "32768"},
                           {"HostIp": "::", "HostPort": "32768"}], "81/tcp": None}
        assert agent.live_ports(live) == [
            {"private_port": 80, "type": "tcp", "public_port": 32768},
            {"private_port": 81, "type": "tcp"}]
        assert agent.live_ports({"1-4294967295/tcp": None, "x": [7]}) == []
        assert agent.live_ports(None) == [] and agent.live_ports([]) == []

    @pytest.mark.parametrize("restart, code, may", [
        ("no", 1, False), ("", 1, False), ("always", 0, True),
        ("unless-stopped", 0, True), ("on-failure", 0, False), ("on-failure", 1, True),
        ("unknown", 0, True), (None, 0, True),
    ])
    def test_a_death_may_be_followed_by_a_restart(self, restart, code, may):
        config = None if restart is None else agent.ContainerConfig(restart, [], False)
        assert agent.may_restart(config, code) is may

    def test_events_read(self):
        line = json.dumps({
            "Type": "container", "Action": "die", "timeNano": 1796441517715451927,
            "Actor": {"ID": "485b5c3cdec6" + "0" * 52, "Attributes": {
                "exitCode": "137", "image": "busybox", "name": "web"}}})
        assert agent.container_event(line) == agent.ContainerEvent(
            "die", "485b5c3cdec6", "web", "busybox", 137, 1796441517.7154520)
        health = json.loads(line)
        health["Action"] = "health_status: healthy"
        assert agent.container_event(json.dumps(health)).detail == "healthy"

    def test_the_list_follows_events_and_doubts_what_they_leave_unknown(self):
        """ContainerList alone, as the events process feeds it: no Docker."""
        def event(action, exit_code="0", name="web"):
            return agent.container_event(json.dumps({
                "Type": "container", "Action": action, "timeNano": 1796441517715451927,
                "Actor": {"ID": "485b5c3cdec6" + "0" * 52, "Attributes": {
                    "exitCode": exit_code, "image": "busybox", "name": name}}}))
        containers = agent.ContainerList()
        containers.install([], {})
        containers.stale = False
        containers.apply(event("create"))
        assert [(r["name"], r["status"]) for r in containers.current()] == [
            ("web", "Created")]
        containers.apply(event("start"))  # created since the last read: ports unknown
        assert containers.doubts == {"485b5c3cdec6"}
        assert containers.current()[0]["state"] == "running"
        containers.apply(event("rename", name="db"))
        containers.apply(event("die", exit_code="3"))
        row = containers.current()[0]
        assert (row["name"], row["state"], row["ports"]) == ("db", "exited", [])
        assert row["status"].startswith("Exited (3)")
        assert not containers.stale
        containers.apply(event("destroy"))
        assert containers.current() == [] and not containers.doubts
        containers.apply(event("start"))  # of a container the list does not hold
        assert containers.stale

    @pytest.mark.parametrize("change", [
        {"timeNano": float("nan")}, {"timeNano": 1e30}, {"timeNano": 2**70},
        {"timeNano": -5}, {"timeNano": "1"}, {"Action": 5}, {"Actor": None},
        {"Actor": {"ID": "abc", "Attributes": {"name": "web", "image": "b"}}},
        {"Actor": {"ID": "a" * 64, "Attributes": {"name": 5, "image": "b"}}},
        {"Actor": {"ID": "a" * 64, "Attributes": {"name": "web", "image": "b",
                                                   "exitCode": "NaN"}}},
        {"Actor": {"ID": "a" * 64, "Attributes": {"name": "web", "image": "b",
                                                   "exitCode": "9" * 40}}},
        {"Action": "health_status: " + "x" * 1000},
    ])
    def test_events_the_agent_cannot_read(self, change):
        event = {"Type": "container", "Action": "die", "timeNano": 1796441517715451927,
                 "Actor": {"ID": "a" * 64, "Attributes": {
                     "exitCode": "1", "image": "busybox", "name": "web"}}, **change}
        assert agent.container_event(json.dumps(event)) is None
        assert agent.container_event(b"\xff garbage") is None

    def test_sizes_and_times(self):
        assert agent.parse_pair("788KiB / 23.54GiB") == [806912, int(23.54 * 1024**3)]
        assert agent.parse_bytes("1.5GB") == 1_500_000_000
        assert agent.parse_bytes("0B") == 0
        assert agent.rfc3339("2026-11-25 14:28:30 +0100 CET") == "2026-11-25T13:28:30Z"

    def test_log_merge_orders_trimmed_nanoseconds(self):
        out = "2026-11-25T14:28:31.7141512Z b\n2026-11-25T14:28:31.9Z d\n"
        err = "2026-11-25T14:28:31.71415125Z c\n2026-11-25T14:28:30Z a\n"
        merged = agent.merge_log_streams(out, err)
        assert [e["line"] for e in merged] == ["a", "b", "c", "d"]
        assert [e["stream"] for e in merged] == ["stderr", "stdout", "stderr", "stdout"]

    @pytest.mark.parametrize("stderr, status, words", [
        ("Error: No such container: web", None, "No such container: web"),
        ("Error response from daemon: No such container: web", None,
         "No such container: web"),
        ("Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the "
         "docker daemon running?", "daemon not running", "not running"),
        ("permission denied while trying to connect to the Docker daemon socket at "
         "unix:///var/run/docker.sock", "permission denied", "root-equivalent"),
        ("unknown flag: --bogus", None, "unknown flag: --bogus"),
        ("Error response from daemon: No such container: x\n"
         "Error: failed to start containers: x", None, "No such container: x"),
    ])
    def test_cli_errors(self, stderr, status, words):
        error = agent.classify_docker_error(stderr)
        assert error.status == status and words in str(error)
        assert status or str(error) == words  # one clean sentence, the CLI's own

    @pytest.mark.parametrize("seconds, words", [
        (0.5, "Less than a second"), (1, "1 second"), (37.9, "37 seconds"),
        (60, "About a minute"), (119, "About a minute"), (120, "2 minutes"),
        (3599, "59 minutes"), (5399, "About an hour"), (5400, "2 hours"),
        (47 * 3600, "47 hours"), (48 * 3600, "2 days"), (14 * 86400, "2 weeks"),
        (60 * 86400, "2 months"), (730 * 86400, "2 years"),
    ])
    def test_durations_as_docker_words_them(self, seconds, words):
        assert agent.human_duration(seconds) == words

    @pytest.mark.parametrize("state, text", [
        ({"Running": True, "StartedAt": "2026-11-27T09:00:00.5Z"}, "Up 37 seconds"),
        ({"Running": True, "Paused": True, "StartedAt": "2026-11-27T08:59:00Z"},
         "Up About a minute (Paused)"),
        ({"Running": True, "StartedAt": "2026-11-27T09:00:30+00:00",
          "Health": {"Status": "starting"}}, "Up 7 seconds (health: starting)"),
        ({"Running": True, "StartedAt": "2026-11-27T08:00:00Z",
          "Health": {"Status": "healthy"}}, "Up About an hour (healthy)"),
        ({"Running": True, "Restarting": True, "ExitCode": 1,
          "FinishedAt": "2026-11-27T09:00:35.123456789Z"},
         "Restarting (1) 2 seconds ago"),
        ({"Status": "exited", "ExitCode": 137, "StartedAt": "2026-11-27T08:00:00Z",
          "FinishedAt": "2026-11-27T09:00:00Z"}, "Exited (137) 37 seconds ago"),
        ({"StartedAt": "0001-01-01T00:00:00Z", "FinishedAt": "0001-01-01T00:00:00Z"},
         "Created"),
        ({"Dead": True, "StartedAt": "2026-11-27T08:00:00Z"}, "Dead"),
        ({"Status": "removing"}, "Removal In Progress"),
    ])
    def test_status_text_from_the_state(self, state, text):
        now = datetime.datetime(2026, 11, 27, 9, 0, 37, 600000,
                                tzinfo=datetime.timezone.utc).timestamp()
        assert agent.status_text(agent.container_state(state), now) == text

    @pytest.mark.parametrize("ref", ["-rf", "--help", "a b", "$(id)", "x" * 300,
                                     "", None, 5, "web;reboot", "../x"])
    def test_invalid_references_refused(self, ref):
        request = {"type": "stop_container", "request_id": "r", "container_id": ref}
        with pytest.raises(agent.RequestError, match="invalid container reference"):
            parse_request(request)

    @pytest.mark.parametrize("fields, message", [
        ({"type": "stop_container", "timeout": -1}, "'timeout' must be 0 to"),
        ({"type": "stop_container", "timeout": "5"}, "'timeout' must be whole"),
        ({"type": "get_container_logs", "tail": -5}, "must not be negative"),
        ({"type": "get_container_logs", "since": "$(id)"}, "'since' must be like"),
    ])
    def test_bad_parameters(self, fields, message):
        request = {"request_id": "r", "container_id": "web", **fields}
        with pytest.raises(agent.RequestError, match=message):
            parse_request(request)

    def test_tail_is_bounded(self):
        request = {"type": "get_container_logs", "request_id": "r",
                   "container_id": "web", "tail": 10**9}
        assert parse_request(request).params["tail"] == 10000


class ContainerEvents:
    """Counts the container events the engine reports while open, whoever
    caused them: a re-read of the list that one of them caused is not a
    re-read per tick. `filters` narrow them ("event=start", "container=N").
    (`docker events` may miss one as it starts.)"""

    def __init__(self, *filters):
        self.filters = [f"--filter={f}" for f in ("type=container", *filters)]
        self.actions = []

    def __enter__(self):
        self.proc = subprocess.Popen(
            ["docker", "events", "--format", "{{.Action}}", *self.filters],
            stdout=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            self.actions.append(line.strip())

    @property
    def count(self):
        return len(self.actions)

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(10)
        self.reader.join(10)


def listed(api, name):
    """The container `name` in the latest metrics sample, if it is there."""
    latest = api.metrics()[-1]["containers"] if api.metrics() else []
    return next((c for c in latest if c["name"] == name), None)


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


def send(api, kind, request_id, id_field="request_id", **fields):
    api.send_all(json.dumps({"type": kind, id_field: request_id, **fields}))


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


def docker_cli_running(verb, name):
    """True while the agent's `docker VERB ... -- NAME` runs."""
    return any(f"docker {verb} " in cmdline and cmdline.rstrip().endswith(f"-- {name}")
               for members in process_groups().values() for _, _, cmdline in members)


# A container that stops at once on SIGTERM (a PID 1 without a handler ignores it).
STOPS_ON_TERM = "trap 'exit 0' TERM; while :; do sleep 0.1; done"


class TestRequests:
    """Lanes, deadlines and cancel, as a user of the ChatOps web UI meets them:
    the API waits 10 s for a reply and drops a later one."""

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

    def test_a_late_reply_is_still_sent_and_logged_as_late(self, commander):
        cmd = commander("--request-deadline-s", "0.5")
        reply = cmd.run("sleep 1; echo done")
        assert reply["data"]["output"] == "done\n"
        assert "later than the API waits (0.5 s)" in cmd.proc.log()

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


###############################################################################
# Outbox ######################################################################
###############################################################################


class Queues:
    """An Outbox and a SampleQueue on one doorbell, as the agent has them,
    and the writer's order of taking from them (Writer._send_one)."""

    def __init__(self, capacity, spool=None, reply_keep_s=300.0):
        doorbell = threading.Event()
        self.outbox = agent.Outbox(doorbell, reply_keep_s)
        self.samples = agent.SampleQueue(doorbell, capacity, spool)

    def take(self):
        """(the queue, its item) of the next message the writer sends, or None."""
        for source in (self.outbox, self.samples):
            item = source.take()
            if item is not None:
                return source, item
        return None

    def connection_lost(self):
        self.outbox.connection_lost()
        self.samples.connection_lost()


def taken(box):
    """The next message the writer would send, decoded (and reported sent)."""
    taking = box.take()
    if taking is None:
        return None
    source, (_, payload) = taking
    source.sent()
    return json.loads(payload)


def taken_samples(box, count):
    """The data of the next `count` samples the writer is handed, pings aside
    (samples are followed by a ping until the API acknowledges: see SampleQueue)."""
    found = []
    while len(found) < count:
        message = taken(box)
        assert message is not None, f"only {len(found)} samples: {found}"
        if message["type"] == "metrics":
            found.append(message["data"])
    return found


class TestOutboxAndSamples:
    def test_samples_oldest_first_and_acknowledged_in_order(self):
        box = Queues(10)
        for i in range(3):
            box.samples.add({"n": i})
        assert [d["n"] for d in taken_samples(box, 3)] == [0, 1, 2]
        assert box.samples.counts() == (0, 3)
        box.samples.acknowledged()
        box.connection_lost()
        assert box.samples.counts() == (2, 0)
        assert [d["n"] for d in taken_samples(box, 2)] == [1, 2]

    def test_samples_carry_the_server_id_of_their_connection(self):
        box = Queues(10)
        box.samples.add({"n": 0})
        box.samples.add({"n": 1})
        box.samples.use_server_id("s-1")
        assert taken_samples(box, 1) == [{"server_id": "s-1", "n": 0}]
        box.samples.use_server_id(None)  # an API that gave none (or an unusable one)
        assert taken_samples(box, 1) == [{"n": 1}]

    def test_replies_go_before_samples(self):
        box = Queues(10)
        box.samples.add({"n": 0})
        box.outbox.put({"type": "pong"})
        assert taken(box) == {"type": "pong"}

    def test_overflow_drops_oldest_and_logs_count(self, caplog):
        box = Queues(5)
        with caplog.at_level("WARNING", logger="chatops-agent"):
            for i in range(8):
                box.samples.add({"n": i})
        assert box.samples.dropped_total == 3
        assert [d["n"] for d in taken_samples(box, 5)] == [3, 4, 5, 6, 7]
        assert "dropped the 1 oldest" in caplog.text

    def test_what_a_failed_send_took_goes_back_in_front(self):
        """The writer took it, the send failed, the connection is lost: a reply
        or a sample is sent again on the next connection, first."""
        box = Queues(10)
        box.outbox.put({"type": "command_result", "request_id": "r1", "data": {}})
        box.outbox.put({"type": "command_result", "request_id": "r2", "data": {}})
        box.samples.add({"n": 0})
        assert box.take()[1][0] == "command_result"  # no sent(): the send failed
        box.connection_lost()
        assert [taken(box)["request_id"] for _ in range(2)] == ["r1", "r2"]
        box.samples.proof.mode = agent.ReadProof.NO_ACKS
        box.take()
        box.connection_lost()
        assert taken_samples(box, 1) == [{"n": 0}]

    def test_a_reply_waits_for_a_reconnect_a_pong_does_not(self):
        box = Queues(10, reply_keep_s=300)
        box.outbox.put({"type": "pong"})
        box.outbox.put({"type": "error", "request_id": "r1", "message": "bad"})
        box.outbox.put({"type": "command_output", "request_id": "r2", "data": {}})
        box.outbox.put({"type": "command_result", "request_id": "r3", "data": {}},
                keep_until=time.monotonic() - 1)  # the API gave up on it long ago
        box.connection_lost()
        assert taken(box)["type"] == "error"
        assert taken(box) is None

    def test_bare_pongs_are_coalesced(self):
        box = Queues(10)
        for _ in range(1000):
            box.outbox.put({"type": "pong"})
        box.outbox.put({"type": "pong", "request_id": "p1"})  # a reply: kept apart
        assert taken(box) == {"type": "pong"}
        assert taken(box) == {"type": "pong", "request_id": "p1"}
        assert taken(box) is None
        box.outbox.put({"type": "pong"})
        assert taken(box) == {"type": "pong"}

    def test_waiting_messages_are_bounded_oldest_non_replies_first(self, caplog):
        box = Queues(10)
        limit = agent.MAX_WAITING_MESSAGES
        with caplog.at_level("WARNING", logger="chatops-agent"):
            box.outbox.put({"type": "command_result", "request_id": "keep", "data": {}})
            for n in range(2 * limit):
                chunk = {"type": "command_output", "request_id": "s", "data": {"n": n}}
                box.outbox.put(chunk)
        waiting = [taken(box) for _ in range(limit + 1)]
        assert waiting[-1] is None and waiting[0]["request_id"] == "keep"
        assert waiting[1]["data"]["n"] == limit + 1  # the oldest chunks went first
        assert box.outbox.drops.total == limit + 1
        assert "the API is not reading" in caplog.text
        big = "x" * (agent.MAX_WAITING_BYTES // 4)
        for n in range(6):
            box.outbox.put(
                {"type": "command_result", "request_id": f"b{n}", "output": big})
        kept = [m["request_id"] for m in iter(lambda: taken(box), None)]
        assert kept == ["b3", "b4", "b5"]  # the oldest replies go when nothing else

    def test_each_connection_learns_the_ack_mode_afresh(self):
        box = Queues(10)
        box.samples.add({"n": 0})
        taken(box)
        box.samples.acknowledged()
        assert box.samples.proof.mode == agent.ReadProof.ACKS
        box.connection_lost()
        assert box.samples.proof.mode == agent.ReadProof.UNKNOWN

    def test_api_that_never_acks_delivers_by_the_pong_to_a_later_ping(self):
        """Without acknowledgements a sample is delivered when the pong to a
        ping sent after it comes (the API handles messages in order), never
        when merely sent: a link that dies silently swallows what is written
        into it (issue 26, defect 1)."""
        box = Queues(10)
        box.samples.add({"n": 0})
        assert taken(box)["type"] == "metrics"
        assert taken(box) == {"type": "ping"}  # its pong shows sample 0 read
        box.samples.add({"n": 1})
        assert taken(box)["type"] == "metrics"
        assert taken(box) == {"type": "ping"}
        box.samples.pong_received()
        assert box.samples.proof.mode == agent.ReadProof.NO_ACKS
        assert box.samples.counts() == (0, 1)  # sample 1 went after that ping
        box.samples.add({"n": 2})
        assert taken_samples(box, 1) == [{"n": 2}]
        box.connection_lost()  # the second ping's pong never came
        assert box.samples.counts() == (2, 0)
        assert [d["n"] for d in taken_samples(box, 2)] == [1, 2]
        assert taken(box) == {"type": "ping"}
        box.samples.pong_received()  # a new connection learns afresh
        assert box.samples.counts() == (0, 0)

    def test_pongs_are_matched_to_pings_in_order(self):
        """A pong proves only what was sent before its own ping: the
        heartbeat's, sent before a sample, proves nothing of it; a pong no
        ping asked for proves nothing at all."""
        box = Queues(10)
        box.samples.pong_received()  # unasked
        box.samples.ping()  # the heartbeat's, before any sample
        box.samples.add({"n": 0})
        assert [taken(box)["type"] for _ in range(2)] == ["metrics", "ping"]
        box.samples.pong_received()  # the heartbeat's
        assert box.samples.counts() == (0, 1)
        assert box.samples.proof.mode == agent.ReadProof.UNKNOWN
        box.samples.add({"n": 1})
        box.samples.add({"n": 2})
        assert [taken(box)["type"] for _ in range(3)] == ["metrics", "metrics", "ping"]
        box.samples.pong_received()  # to the ping after sample 0
        assert box.samples.proof.mode == agent.ReadProof.NO_ACKS
        assert box.samples.counts() == (0, 2)  # 0 shown read; 1 and 2 not yet
        box.samples.pong_received()
        assert box.samples.counts() == (0, 0)
        box.samples.pong_received()  # unasked
        assert box.samples.counts() == (0, 0)

    def test_a_backlog_goes_a_window_at_a_time_with_a_ping_after_each(self):
        box = Queues(1000)
        for n in range(agent.METRICS_WINDOW + 5):
            box.samples.add({"n": n})
        kinds = [m["type"] for m in iter(lambda: taken(box), None)]
        assert kinds == ["metrics"] * agent.METRICS_WINDOW + ["ping"]
        box.samples.pong_received()  # no acknowledgement came: the window moves
        kinds = [m["type"] for m in iter(lambda: taken(box), None)]
        assert kinds == ["metrics"] * 5 + ["ping"]

    def test_ack_before_pong_means_acks(self):
        box = Queues(10)
        box.samples.add({"n": 0})
        taken(box)
        assert taken(box) == {"type": "ping"}
        box.samples.acknowledged()
        box.samples.pong_received()
        assert box.samples.proof.mode == agent.ReadProof.ACKS
        assert taken(box) is None  # no second probe

    def test_a_heartbeat_ping_counts_for_the_probe(self):
        """A pong answers the pings in order: the heartbeat's before the probe's
        says nothing about samples sent after it."""
        box = Queues(10)
        # The heartbeat's, before any sample.
        assert box.samples.ping() == agent.PING_MESSAGE
        box.samples.add({"n": 0})
        taken(box)
        assert taken(box) == {"type": "ping"}
        box.samples.pong_received()  # the heartbeat's pong
        assert box.samples.proof.mode == agent.ReadProof.UNKNOWN
        box.samples.pong_received()  # the probe's
        assert box.samples.proof.mode == agent.ReadProof.NO_ACKS

    def test_waiting_for_acks_is_timed(self):
        box = Queues(10)
        assert box.samples.unread_for() == 0.0
        box.samples.add({"n": 0})
        taken(box)
        wait_until(lambda: box.samples.unread_for() > 0.05, 2, "time to pass")
        box.samples.acknowledged()
        assert box.samples.unread_for() == 0.0

    def test_window_limits_unacknowledged(self):
        box = Queues(1000)
        for i in range(agent.METRICS_WINDOW + 5):
            box.samples.add({"n": i})
        sent = [taken(box) for _ in range(agent.METRICS_WINDOW + 5)]
        assert sum(m is not None and m["type"] == "metrics" for m in sent) == \
            agent.METRICS_WINDOW
        box.samples.acknowledged()
        assert taken_samples(box, 1)[0]["n"] == agent.METRICS_WINDOW


def spool_at(directory):
    """Queues with a spool in `directory`, opened as at the agent's start."""
    box = Queues(100, spool=agent.Spool(str(directory)))
    box.samples.open()
    return box


def killed(box):
    """As if the agent were killed: the spool's descriptors closed by the
    kernel, nothing synced or written at the end."""
    os.close(box.samples.spool._fd)
    os.close(box.samples.spool._dir)


def spool_records(path):
    """The records of the spool file at `path`, read as the agent reads them."""
    with open(path, "rb") as f:
        f.seek(len(agent.SPOOL_HEADER))
        size = os.fstat(f.fileno()).st_size - len(agent.SPOOL_HEADER)
        return list(agent.SpoolReader(f.fileno(), size))


def spooled(directory):
    """The data of the samples a spool file holds as not yet delivered."""
    path = os.path.join(str(directory), "spool")
    if not os.path.exists(path):
        return []
    pending, _, _ = agent.newest_pending(spool_records(path), 10**9)
    return [json.loads(data) for _, data in pending]


class TestQuietSpool:
    """The spool is written only for samples that may need it (issue 20):
    none while the API acknowledges each sample before the next."""

    def test_a_healthy_api_costs_no_disk_writes(self, tmp_path):
        box = spool_at(tmp_path)
        box.samples.link_up("s-1")
        for n in range(50):
            box.samples.add({"n": n})
            taken_samples(box, 1)
            box.samples.acknowledged()
        assert (tmp_path / "spool").stat().st_size == len(agent.SPOOL_HEADER)
        box.samples.close()
        assert (tmp_path / "spool").stat().st_size == len(agent.SPOOL_HEADER)

    def test_an_api_that_never_acknowledges_costs_none_either(self, tmp_path):
        box = spool_at(tmp_path)
        box.samples.link_up(None)
        for n in range(20):
            box.samples.add({"n": n})
            assert taken(box)["type"] == "metrics"
            assert taken(box) == {"type": "ping"}  # its pong shows the sample read
            box.samples.pong_received()
        assert box.samples.proof.mode == agent.ReadProof.NO_ACKS
        assert (tmp_path / "spool").stat().st_size == len(agent.SPOOL_HEADER)

    def test_without_acks_a_sample_no_pong_showed_read_is_written(self, tmp_path):
        """A link that dies silently: the pong to the ping after a sample
        never comes, so the sample is written when the next one comes, as
        an unacknowledged one is (issue 26, defect 1)."""
        box = spool_at(tmp_path)
        box.samples.link_up(None)
        box.samples.add({"n": 0})
        assert [taken(box)["type"] for _ in range(2)] == ["metrics", "ping"]
        box.samples.pong_received()  # NO_ACKS: sample 0 delivered
        box.samples.add({"n": 1})
        taken_samples(box, 1)  # into the dead link
        box.samples.add({"n": 2})
        assert [d["n"] for d in spooled(tmp_path)] == [1]

    def test_a_sample_undelivered_when_the_next_comes_is_written_with_it(
            self, tmp_path):
        box = spool_at(tmp_path)
        box.samples.link_up(None)
        box.samples.add({"n": 0})
        taken_samples(box, 1)  # sent, not acknowledged
        assert spooled(tmp_path) == []
        box.samples.add({"n": 1})
        assert [d["n"] for d in spooled(tmp_path)] == [0]
        box.samples.acknowledged()  # 0 delivered; 1 never sent
        box.samples.add({"n": 2})
        assert [d["n"] for d in spooled(tmp_path)] == [1]

    def test_samples_taken_while_the_link_is_down_are_written_at_once(
            self, tmp_path):
        box = spool_at(tmp_path)
        box.samples.link_up(None)
        box.samples.add({"n": 0})
        box.connection_lost()
        box.samples.add({"n": 1})
        assert [d["n"] for d in spooled(tmp_path)] == [0, 1]

    def test_a_clean_stop_writes_what_is_undelivered(self, tmp_path):
        box = spool_at(tmp_path)
        box.samples.link_up(None)
        box.samples.add({"n": 0})
        box.samples.close()
        assert [d["n"] for d in taken_samples(spool_at(tmp_path), 1)] == [0]

    def test_ticks_that_bunch_up_under_load_write_nothing(self, tmp_path):
        # A tick that ran late is followed by one on time: the API has had no
        # time to answer in between, and that is no reason to write.
        box = spool_at(tmp_path)
        box.samples.grace_s = 2.5  # half the default interval, as the agent has it
        now = [100.0]
        box.samples.clock = lambda: now[0]
        box.samples.link_up(None)
        box.samples.add({"n": 0})  # late: 4.9 s into a 5 s tick
        taken_samples(box, 1)
        now[0] += 0.1
        box.samples.add({"n": 1})  # on time, 0.1 s later
        assert spooled(tmp_path) == []
        now[0] += 5.0
        box.samples.add({"n": 2})  # 0 is still unacknowledged, long past the grace
        assert [d["n"] for d in spooled(tmp_path)] == [0, 1]

    def test_a_running_agent_writes_nothing_while_the_api_acknowledges(
            self, api, run_agent, tmp_path):
        state = tmp_path / "state"
        args = ("--metrics-interval-s", "2", "--state-dir", str(state))
        proc = run_agent(api.url, *args)
        # A sample taken before the connection was up is written: it is the
        # ones after, each acknowledged within a second, that must not be.
        wait_until(lambda: len(api.metrics()) >= 2, 15, proc.log)
        settled = (state / "spool").stat().st_size
        wait_until(lambda: len(api.metrics()) >= 6, 20, proc.log)
        assert (state / "spool").stat().st_size == settled
        assert proc.terminate() == 0
        delivered = len(api.metrics())
        run_agent(api.url, *args)
        wait_until(lambda: len(api.metrics()) >= delivered + 3, 15, "the restart")
        stamps = [m["timestamp"] for m in api.metrics()]
        assert len(set(stamps)) == len(stamps)  # nothing sent twice, nothing lost


class TestSpool:
    def test_what_was_not_delivered_survives_a_crash(self, tmp_path):
        box = spool_at(tmp_path)
        for n in range(5):
            box.samples.add({"n": n})
        taken_samples(box, 2)
        box.samples.acknowledged()  # sample 0 is delivered; the spool learns next
        box.samples.add({"n": 5})
        killed(box)  # what it wrote is in the page cache
        again = spool_at(tmp_path)
        assert [d["n"] for d in taken_samples(again, 5)] == [1, 2, 3, 4, 5]
        again.samples.add({"n": 6})
        assert [d["n"] for d in taken_samples(again, 1)] == [6]  # numbered on
        again.samples.close()
        assert [d["n"] for d in spooled(tmp_path)] == [1, 2, 3, 4, 5, 6]

    def test_private_and_checked(self, tmp_path):
        state = tmp_path / "state"
        spool_at(state).samples.add({"n": 0})
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(state / "spool").st_mode) == 0o600
        os.chmod(state / "spool", 0o644)
        refused = agent.Spool(str(state))
        assert refused.open(100) == ([], 0, 0) and "chmod 600" in refused.problem

    def test_a_spool_of_another_user_says_whom_to_run_as(self, tmp_path):
        require(os.geteuid() == 0, "giving a file to another user needs root")
        state = tmp_path / "state"
        spool_at(state).samples.close()
        os.chown(state / "spool", 65534, -1)
        refused = agent.Spool(str(state))
        assert refused.open(100) == ([], 0, 0)
        owner = pwd.getpwuid(65534).pw_name  # nobody
        me = pwd.getpwuid(os.geteuid()).pw_name
        assert f"belongs to {owner}, and this agent runs as {me}: run the agent " \
            f"(and --check) as {owner}, e.g. runuser -u {owner}" in refused.problem
        assert "chown" not in refused.problem  # which would take it from the service

    def test_one_agent_per_spool(self, tmp_path):
        first = spool_at(tmp_path)
        second = agent.Spool(str(tmp_path))
        assert second.open(100) == ([], 0, 0) and "another agent uses" in second.problem
        first.samples.close()

    def test_a_torn_last_record_at_any_byte_is_skipped(self, tmp_path, caplog):
        box = spool_at(tmp_path / "whole")
        for n in range(3):
            box.samples.add({"n": n, "pad": "x" * 40})
        box.samples.close()
        data = (tmp_path / "whole" / "spool").read_bytes()
        last = len(data) - len(agent.encode_record(
            b"S", 3, agent.to_json({"n": 2, "pad": "x" * 40})))
        for cut in range(last + 1, len(data)):
            state = tmp_path / f"cut-{cut}"
            state.mkdir(mode=0o700)
            (state / "spool").write_bytes(data[:cut])
            (state / "spool").chmod(0o600)
            caplog.clear()
            with caplog.at_level("WARNING", logger="chatops-agent"):
                box = spool_at(state)
            assert [d["n"] for d in taken_samples(box, 2)] == [0, 1]
            assert taken(box) is None or taken(box) is None  # a probe ping at most
            assert caplog.text.count("damaged") == 1, caplog.text
            box.samples.close()
            assert len(spooled(state)) == 2  # rewritten clean: no warning again

    def test_random_bytes_in_the_middle_cost_only_what_they_hit(self, tmp_path, caplog):
        box = spool_at(tmp_path)
        for n in range(20):
            box.samples.add({"n": n})
        box.samples.close()
        path = tmp_path / "spool"
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 30] = os.urandom(30)
        path.write_bytes(bytes(data))
        with caplog.at_level("WARNING", logger="chatops-agent"):
            box = spool_at(tmp_path)
        numbers = [d["n"] for d in spooled(tmp_path)]  # as rewritten after the check
        assert 17 <= len(numbers) < 20 and numbers == sorted(numbers)
        assert numbers[0] == 0 and numbers[-1] == 19
        assert [d["n"] for d in taken_samples(box, len(numbers))] == numbers
        assert caplog.text.count("damaged") == 1

    def test_a_spool_of_an_unknown_format_is_set_aside(self, tmp_path, caplog):
        (tmp_path / "spool").write_bytes(b"chatops-agent spool 9\nfuture records")
        (tmp_path / "spool").chmod(0o600)
        with caplog.at_level("WARNING", logger="chatops-agent"):
            box = spool_at(tmp_path)
        aside = [p.name for p in tmp_path.iterdir() if p.name.startswith("spool.")]
        assert len(aside) == 1 and "unknown format" in caplog.text
        assert (tmp_path / aside[0]).read_bytes().endswith(b"future records")
        box.samples.add({"n": 0})
        assert [d["n"] for d in spooled(tmp_path)] == [0]

    def test_a_smaller_buffer_after_a_restart_keeps_the_newest(self, tmp_path,
                                                               caplog):
        box = spool_at(tmp_path)
        for n in range(10):
            box.samples.add({"n": n})
        box.samples.close()
        small = Queues(4, spool=agent.Spool(str(tmp_path)))
        with caplog.at_level("WARNING", logger="chatops-agent"):
            small.samples.open()
        assert [d["n"] for d in taken_samples(small, 4)] == [6, 7, 8, 9]
        assert "dropped the 6 oldest" in caplog.text

    def test_a_header_cut_short_is_a_new_spool(self, tmp_path):
        (tmp_path / "spool").write_bytes(agent.SPOOL_HEADER[:7])
        (tmp_path / "spool").chmod(0o600)
        spool_at(tmp_path).samples.add({"n": 0})
        assert [p.name for p in tmp_path.iterdir()] == ["spool"]
        assert [d["n"] for d in spooled(tmp_path)] == [0]

    def test_delivered_records_are_compacted_away(self, tmp_path):
        box = spool_at(tmp_path)
        for n in range(2000):
            box.samples.add({"n": n})
            if n % 100 != 99:  # an API that acknowledges all but every 100th
                taken_samples(box, 1)
                box.samples.acknowledged()
        size = (tmp_path / "spool").stat().st_size
        assert size < 200 * 60, size  # a few hundred records, not 4000
        assert len(spooled(tmp_path)) <= 25

    def test_memory_only_when_asked(self, tmp_path):
        config = agent.load_config({"state_dir": "none"}, {})
        assert agent.state_directory(config) is None
        config = agent.load_config({}, {})
        assert agent.state_directory(config, {"STATE_DIRECTORY": "/var/lib/x"}) == \
            "/var/lib/x"
        assert agent.state_directory(config, {"XDG_STATE_HOME": "/s"}) == \
            "/s/chatops-agent"


def agent_under_limit(tmp_path, limit, *args):
    """An agent started by a shell that set `ulimit LIMIT` first."""
    command = ["sh", "-c", f'ulimit {limit} && exec "$@"', "sh", sys.executable, AGENT]
    return AgentProcess(tmp_path, *args, command=command,
                        env=clean_env(CHATOPS_API_KEY=KEY))


class TestSpoolThroughRestarts:
    @pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM],
                             ids=["KILL", "TERM"])
    def test_every_sample_of_an_outage_survives_two_restarts(self, api, run_agent,
                                                             tmp_path, sig):
        state = tmp_path / "state"
        args = ("--metrics-interval-s", "0.2", "--state-dir", str(state))
        api.stop()
        for run in range(2):
            proc = run_agent(api.url, *args)
            wait_until(lambda n=run: len(spooled(state)) >= 10 * (n + 1), 15,
                       "samples in the spool")
            proc.proc.send_signal(sig)
            proc.proc.wait(10)
        outage = [d["timestamp"] for d in spooled(state)]
        api.start()
        proc = run_agent(api.url, *args)
        wait_until(lambda: len(api.metrics()) > len(outage), 15, "the outage delivered")
        stamps = [m["timestamp"] for m in api.metrics()]
        assert stamps[: len(outage)] == outage  # first, oldest first, as taken
        assert len(stamps) == len(set(stamps))  # none twice
        assert "samples from before the restart, delivered first" in proc.log()
        wait_until(lambda: len(spooled(state)) <= 3, 10, "the spool to empty")

    def test_a_full_disk_means_memory_only_not_a_crash(self, api, tmp_path):
        """A file size limit (as a full disk) on the agent: the spool stops with
        one warning; metrics go on from memory. The API acknowledges nothing,
        so that each sample is written (a healthy API costs no writes)."""
        api.silent = True
        proc = agent_under_limit(tmp_path, "-f 64", "--api-url", api.url,
                                 "--metrics-interval-s", "0.1",
                                 "--state-dir", str(tmp_path / "state"))
        proc.wait_log("kept in memory only", 20)
        sent = len(api.metrics())
        wait_until(lambda: len(api.metrics()) > sent + 5, 10, "metrics going on")
        assert proc.log().count("kept in memory only") == 1
        assert "File too large" in proc.log() and proc.proc.poll() is None
        proc.terminate()

    def test_a_state_dir_that_cannot_be_made_is_memory_only(self, api, run_agent,
                                                             tmp_path):
        (tmp_path / "a-file").write_text("")
        state = str(tmp_path / "a-file" / "state")  # even root cannot make it
        proc = run_agent(api.url, "--state-dir", state)
        wait_until(api.metrics, 6, "metrics")
        assert proc.log().count("kept in memory only") == 1
        check = run_cli("--check", "--api-url", api.url, "--state-dir", state,
                        env=clean_env(CHATOPS_API_KEY=KEY))
        assert f"note spool: {state} cannot be made or written" in check.stdout


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


def fresh_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect_once(url, **settings):
    """One connection attempt of the agent's Connector, in this process."""
    flags = {"api_url": url, "api_key": KEY, **settings}
    config = agent.load_config({k: str(v) for k, v in flags.items()}, {})
    session = agent.Connector(config, {}, agent.load_websocket()).connect()
    session.kill()
    session.ws.shutdown()
    return session



def unstarted_link(api, box, **settings):
    """A Link that is never started, for its parts: its Connector and a Writer."""
    flags = {"api_url": api.url, "api_key": KEY, **settings}
    config = agent.load_config({k: str(v) for k, v in flags.items()}, {})
    return agent.Link(config, box.outbox, box.samples,
                      agent.Dispatcher(config, box.outbox, box.samples, None),
                      {}, threading.Event())


class TestWriter:
    """The Writer alone on one session: no receive loop, no Link thread."""

    def test_replies_first_then_samples_and_at_the_stop_a_close(self, api):
        box = Queues(10)
        link = unstarted_link(api, box)
        session = link.connector.connect()
        try:
            box.samples.add({"cpu_percent": 1.5})
            box.outbox.put({"type": "command_result", "request_id": "r1", "data": {}})
            writer = agent.Writer(session, link)
            writer.start()
            wait_until(lambda: api.metrics(), what="the sample sent")
            sent = [m["type"] for m in api.messages() if m["type"] != "ping"]
            assert sent == ["auth", "command_result", "metrics"]
            assert api.metrics()[0]["cpu_percent"] == 1.5
            link.stop_event.set()
            link.doorbell.set()
            writer.join(5)
            assert not writer.thread.is_alive()
        finally:  # as the receive loop ends a session; the API then sees the close
            session.kill()
            session.ws.shutdown()
        wait_until(lambda: api.closes, what="the writer's close frame")
        assert api.closes[0][0] == 1000

    def test_a_connection_nothing_is_heard_on_is_given_up(self, api, caplog):
        """With no receive loop, nothing the API sends is heard: after two
        heartbeats the writer kills the session, and says why."""
        box = Queues(10)
        link = unstarted_link(api, box, heartbeat_interval_s=1)
        session = link.connector.connect()
        writer = agent.Writer(session, link)
        try:
            with caplog.at_level("WARNING", logger="chatops-agent"):
                writer.start()
                assert session.dead.wait(10), "the writer never gave the session up"
                writer.join(5)
        finally:
            session.kill()
            session.ws.shutdown()
        assert "nothing heard from the API for 2" in caplog.text
        assert time.monotonic() - session.opened_at >= 2

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
            second.samples.open()
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


def fake_docker(tmp_path, body):
    """A docker CLI that is a shell script: `body` is its case of "$1"."""
    path = tmp_path / "fake-docker"
    path.write_text(f'#!/bin/sh\ncase "$1" in\n{body}\nesac\n')
    path.chmod(0o755)
    return str(path)


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
            (agreeing_twice("permessage-deflate", "permessage-deflate; "
                            "client_max_window_bits=10", closes), 1002),
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


def agreeing_twice(first, second, closes):
    """As agreeing(), but with the answer on two Sec-WebSocket-Extensions lines."""
    def answer(conn, request):
        head = upgrade_answer(request, first)
        conn.sendall(head[:-2] + b"Sec-WebSocket-Extensions: %s\r\n\r\n"
                     % second.encode())
        conn.settimeout(3)
        frame = read_client_frame(conn)
        closes.append(frame and frame[0] == 0x8
                      and int.from_bytes(frame[1][:2], "big"))

    return answer


def agreeing(extensions, closes):
    """An answer for RawPeer: an upgrade that agrees to `extensions`; the code
    of the agent's first frame, if it is a close, goes to `closes`."""
    def answer(conn, request):
        conn.sendall(upgrade_answer(request, extensions))
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


###############################################################################
# Installer ###################################################################
###############################################################################

INSTALLER = os.path.join(os.path.dirname(AGENT), "install.sh")
AGENT_BYTES = pathlib.Path(AGENT).read_bytes()
# The websocket-client install.sh pins (a bundle carries it, --pypi installs it).
BUNDLED_WEBSOCKET_CLIENT = re.search(
    r"^WEBSOCKET_CLIENT_VERSION=(\S+)$", pathlib.Path(INSTALLER).read_text(),
    re.M).group(1)
SERVICE_USER = "chatops-agent"
PROMISED_UNIT_LINES = (
    "User=chatops-agent", "Restart=always", "RestartSec=5", "KillMode=mixed",
    "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=read-only",
    "PrivateTmp=yes", "PrivateDevices=yes", "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes", "RestrictSUIDSGID=yes", "LockPersonality=yes",
    "StateDirectory=chatops-agent", "StateDirectoryMode=0700",
    "CapabilityBoundingSet=", "AmbientCapabilities=", "RestrictNamespaces=yes",
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    "SystemCallArchitectures=native", "ProtectClock=yes", "ProtectHostname=yes",
    "RestrictRealtime=yes", "RemoveIPC=yes", "UMask=0077",
    "SyslogIdentifier=chatops-agent",
    "ExecStart=/opt/chatops-agent/venv/bin/python /opt/chatops-agent/chatops_agent.py "
    "--config /etc/chatops-agent/config.json",
)


def need_bundle():
    """The offline bundle .ci/run makes with install.sh --prepare-offline."""
    bundle = os.environ.get("CHATOPS_TEST_BUNDLE", "")
    require(os.path.isfile(os.path.join(bundle, "SHA256SUMS")),
            "no offline bundle (CHATOPS_TEST_BUNDLE; .ci/run makes one)")
    return bundle


class FileServer:
    """Serves a directory over HTTP on 127.0.0.1 (HTTPS with a test CA's
    `context`), in a thread; `with` gives its base URL."""

    def __init__(self, directory, context=None, handler=None):
        handler = handler or functools.partial(QuietFiles, directory=str(directory))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.scheme = "https" if context else "http"
        if context:
            self.server.socket = context.wrap_socket(self.server.socket,
                                                     server_side=True)

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.url

    @property
    def url(self):
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class Redirector(FileServer):
    """A FileServer that answers every GET with a 302 to the same path under
    `target`."""

    def __init__(self, target, context=None):
        class Redirect(QuietFiles):
            def do_GET(self):  # noqa: N802 -- http.server's name
                self.send_response(302)
                self.send_header("Location", target + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()

        super().__init__(None, context, handler=Redirect)


class PackageIndex(FileServer):
    """A stand-in for PyPI on 127.0.0.1 (a PEP 503 simple index serving
    `wheels`) that records every path asked of it in `asked`: a test points
    pip at it to see whether, and for what, PyPI would have been asked."""

    def __init__(self, directory, *wheels):
        self.asked, self.directory = [], pathlib.Path(directory)
        (self.directory / "simple" / "websocket-client").mkdir(parents=True)
        for wheel in wheels:
            self.serve(wheel.name, wheel.read_bytes())
        index = self

        class Recording(QuietFiles):
            def do_GET(self):  # noqa: N802 -- http.server's name
                index.asked.append(self.path)
                super().do_GET()

        super().__init__(None, handler=functools.partial(
            Recording, directory=str(self.directory)))

    def __enter__(self):
        super().__enter__()
        return self

    def serve(self, name, data):
        project = self.directory / "simple" / "websocket-client"
        (project / name).write_bytes(data)
        links = "".join(f'<a href="{n}">{n}</a>' for n in sorted(os.listdir(project))
                        if n.endswith(".whl"))
        (project / "index.html").write_text(f"<html><body>{links}</body></html>")


def pypi_out_of_reach(index=None, **extra):
    """The environment of a host that cannot reach PyPI: pip's only index is
    `index` (a PackageIndex that records what is asked of it), or a closed
    port, and no configuration file or find-links of this machine's."""
    env = clean_env(PIP_CONFIG_FILE=os.devnull, **extra)
    for name in ("PIP_NO_INDEX", "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL"):
        env.pop(name, None)
    env["PIP_INDEX_URL"] = (index.url if index else "http://127.0.0.1:9") + "/simple/"
    return env


def path_without(tmp_path, *programs):
    """A PATH that finds what this one does, but for `programs`."""
    bin_dir = tmp_path / ("bin-without-" + "-".join(programs))
    bin_dir.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        with contextlib.suppress(OSError):
            for name in os.listdir(directory):
                link = bin_dir / name
                if name not in programs and not link.exists():
                    link.symlink_to(os.path.join(directory, name))
    return str(bin_dir)


def installer(*args, env=None, stdin=None, script=INSTALLER):
    return subprocess.run(["sh", script, *args], capture_output=True, text=True,
                          timeout=300, input=stdin, env=env or clean_env())


CHECK_LINE = ("runuser -u chatops-agent -- /opt/chatops-agent/venv/bin/python "
              "/opt/chatops-agent/chatops_agent.py --check "
              "--config /etc/chatops-agent/config.json")


def tree(root, contents=False):
    """Every path under `root` with its mode and owner (and its bytes; the
    account files' always), but for the backups and lock that useradd and
    userdel leave (/etc/passwd-, /etc/.pwd.lock), as on any system."""
    def entry(path):
        st = path.lstat()
        data = path.read_bytes() if path.is_file() and (
            contents or path.parent == root / "etc") else None
        return str(path.relative_to(root)), st.st_mode, st.st_uid, st.st_gid, data

    leftovers = re.compile(r"etc/(\.pwd\.lock|\w+-)")
    return sorted(entry(p) for p in root.rglob("*")
                  if not leftovers.fullmatch(str(p.relative_to(root))))


def mode_owner(path):
    st = os.stat(path)
    return oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid


@pytest.fixture
def system_root(tmp_path):
    """An empty tree with the account files useradd --root needs."""
    require(os.geteuid() == 0, "installing a system service needs root")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow", "login.defs"):
        if os.path.exists(f"/etc/{name}"):
            shutil.copy(f"/etc/{name}", root / "etc" / name)
    return root


def service_ids(root):
    with open(root / "etc" / "passwd") as f:
        for line in f:
            fields = line.rstrip("\n").split(":")
            if fields[0] == SERVICE_USER:
                return int(fields[2]), int(fields[3]), fields[5], fields[6]
    return None


class TestInstaller:
    def test_shellcheck_clean(self):
        shellcheck = shutil.which("shellcheck")
        require(shellcheck, "shellcheck is not installed (apt-get install shellcheck)")
        result = subprocess.run([shellcheck, "-s", "sh", INSTALLER],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout
        with open(INSTALLER) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        assert lines[0] == "#!/bin/sh" and lines[-1] == 'main "$@"'

    def test_install_upgrade_uninstall_purge(self, system_root, tmp_path):
        bundle, root = need_bundle(), system_root
        key_file = tmp_path / "key"
        key_file.write_text(KEY + "\n")
        first = installer("--offline", bundle, "--root", str(root),
                          "--api-url", "https://chatops.example.com",
                          "--api-key-file", str(key_file))
        assert first.returncode == 0, first.stderr
        uid, gid, home, shell = service_ids(root)
        assert (home, shell) == ("/nonexistent", "/usr/sbin/nologin")
        program = root / "opt/chatops-agent/chatops_agent.py"
        config = root / "etc/chatops-agent/config.json"
        unit = root / "etc/systemd/system/chatops-agent.service"
        assert mode_owner(program) == ("0o755", 0, 0)
        assert program.read_bytes() == AGENT_BYTES
        assert mode_owner(config) == ("0o600", uid, gid)
        assert mode_owner(config.parent) == ("0o750", uid, gid)
        assert mode_owner(unit) == ("0o644", 0, 0)
        state = root / "var/lib/chatops-agent"
        assert mode_owner(state) == ("0o700", uid, gid)
        assert json.loads(config.read_text()) == {
            "api_url": "https://chatops.example.com", "api_key": KEY,
            "state_dir": "/var/lib/chatops-agent"}
        text = unit.read_text()
        assert all(line in text.splitlines() for line in PROMISED_UNIT_LINES)
        assert KEY not in text and KEY not in first.stderr
        assert CHECK_LINE in first.stderr  # how to see what the service sees
        venv_python = root / "opt/chatops-agent/venv/bin/python"
        check = subprocess.run([str(venv_python), "-c", "import websocket, psutil"],
                               capture_output=True, text=True)
        assert "No module named 'psutil'" in check.stderr  # Linux: /proc is enough
        check = subprocess.run([str(venv_python), "-c", "import websocket"],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stderr

        again = installer("--offline", bundle, "--root", str(root))
        assert again.returncode == 0, again.stderr
        assert json.loads(config.read_text())["api_key"] == KEY  # kept
        assert not (root / "opt/chatops-agent/chatops_agent.py.bak").exists()

        groups = root / "etc" / "group"
        if "\ndocker:" not in "\n" + groups.read_text():  # --docker-access needs it
            groups.write_text(groups.read_text() + "docker:x:4242:\n")
        newer = tmp_path / "newer"
        newer.mkdir()
        shutil.copy(INSTALLER, newer / "install.sh")
        (newer / "chatops_agent.py").write_bytes(AGENT_BYTES + b"# newer\n")
        wheels = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": os.path.join(bundle, "wheels")}
        upgrade = installer("--root", str(root), "--api-url", "https://new.example.com",
                            "--docker-access", env=clean_env(**wheels),
                            script=str(newer / "install.sh"))
        assert upgrade.returncode == 0, upgrade.stderr
        assert program.read_text().endswith("# newer\n")
        backup = root / "opt/chatops-agent/chatops_agent.py.bak"
        assert backup.read_bytes() == AGENT_BYTES
        assert json.loads(config.read_text()) == {
            "api_url": "https://new.example.com", "api_key": KEY,
            "state_dir": "/var/lib/chatops-agent"}
        dropin = root / "etc/systemd/system/chatops-agent.service.d/docker.conf"
        assert "SupplementaryGroups=docker" in dropin.read_text()
        assert "root-equivalent" in upgrade.stderr

        removed = installer("--root", str(root), "--uninstall")
        assert removed.returncode == 0, removed.stderr
        assert not (root / "opt/chatops-agent").exists() and not unit.exists()
        assert config.exists() and service_ids(root) and state.exists()
        purged = installer("--root", str(root), "--purge")
        assert purged.returncode == 0, purged.stderr
        assert not config.parent.exists() and service_ids(root) is None
        assert not state.exists()

    def test_dry_run_changes_nothing_and_lists_every_change(self, system_root):
        bundle, root = need_bundle(), system_root
        before = tree(root)
        result = installer("--offline", bundle, "--root", str(root), "--dry-run",
                           "--api-key", "k")
        assert result.returncode == 0, result.stderr
        assert tree(root) == before
        owner = "chatops-agent:chatops-agent"  # the user it would make
        for change in (
                f"useradd --root {root} --system",
                "install -m 0755 ", f"{root}/opt/chatops-agent/chatops_agent.py",
                f"python3 -m venv {root}/opt/chatops-agent/venv",
                f"chown {owner} {root}/var/lib/chatops-agent",
                f"chown {owner} {root}/etc/chatops-agent\n",
                f"write {root}/etc/chatops-agent/config.json (mode 600, owner "
                f"{owner}): api_key, state_dir\n",
                f"{root}/etc/systemd/system/chatops-agent.service"):
            assert change in result.stderr

    def test_a_config_file_is_the_whole_configuration_in_one_step(
            self, system_root, tmp_path):
        """--config-file (how the Ansible role hands over the key and every
        setting, never on a command line): it replaces the settings, keeps
        the key and state_dir if it has none, is checked by the agent before
        anything changes, and --dry-run names the settings it would change."""
        bundle, root = need_bundle(), system_root
        config = root / "etc/chatops-agent/config.json"
        settings = tmp_path / "settings.json"

        def install(values, *extra):
            settings.write_text(json.dumps(values))
            return installer("--offline", bundle, "--root", str(root),
                             "--config-file", str(settings), *extra)

        url = "https://chatops.example.com"
        first = install({"api_url": url, "api_key": KEY, "metrics_interval_s": 10,
                         "command_timeout_s": 60})
        assert first.returncode == 0, first.stderr
        assert json.loads(config.read_text()) == {
            "api_url": url, "api_key": KEY, "metrics_interval_s": 10,
            "command_timeout_s": 60, "state_dir": "/var/lib/chatops-agent"}
        assert KEY not in first.stderr
        installed = tree(root, contents=True)
        preview = install({"api_url": url, "metrics_interval_s": 5}, "--dry-run")
        assert preview.returncode == 0, preview.stderr
        assert f"dry-run: write {config} (mode 600, owner " in preview.stderr
        assert preview.stderr.split(f"{config} (mode 600, owner ")[1].split(
            "\n")[0].endswith("): command_timeout_s, metrics_interval_s")
        assert preview.stderr.endswith("info: changed\n")
        assert tree(root, contents=True) == installed
        same = install({"api_url": url, "metrics_interval_s": 10,
                        "command_timeout_s": 60}, "--dry-run")
        assert same.stderr.endswith("info: nothing changed\n"), same.stderr
        refused = install({"api_url": url, "metrics_interval_s": "often"})
        assert refused.returncode == 8, refused.stderr
        assert "the agent refuses this configuration" in refused.stderr
        assert "metrics_interval_s" in refused.stderr
        assert tree(root, contents=True) == installed
        os.unlink(settings)
        os.mkfifo(settings)
        fifo = installer("--offline", bundle, "--root", str(root), "--config-file",
                         str(settings))
        assert fifo.returncode == 8, fifo.stderr
        assert f"error: --config-file {settings} is not a regular file; nothing " \
            "was changed" in fifo.stderr

    def test_a_bundle_without_pip_or_pypi_is_one_clear_error_and_no_bundle(
            self, tmp_path):
        no_pip = tmp_path / "no-pip"
        venv.create(no_pip, with_pip=False)  # a python3 without pip, as Debian's
        target = tmp_path / "bundle"
        result = installer("--prepare-offline", str(target),
                           env=clean_env(PATH=f"{no_pip}/bin:{os.environ['PATH']}"))
        assert result.returncode == 4, result.stderr
        assert "error: python3 has no pip" in result.stderr
        assert "apt-get install python3-pip" in result.stderr
        empty = tmp_path / "no-wheels"
        empty.mkdir()
        result = installer("--prepare-offline", str(target),
                           env=clean_env(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(empty)))
        assert result.returncode == 5, result.stderr
        assert "error: pip could not download the websocket-client wheel" in (
            result.stderr)
        # Nothing half-made: no bundle, no work directory beside it.
        assert sorted(os.listdir(tmp_path)) == ["no-pip", "no-wheels"]

    def test_a_step_that_fails_unforeseen_has_its_status_and_is_undone(
            self, system_root, tmp_path):
        bundle, root = need_bundle(), system_root
        tools = tmp_path / "bin"
        tools.mkdir()
        (tools / "python3").write_text(  # python3 -m venv fails; the rest works
            f'#!/bin/sh\ncase "$*" in "-m venv {root}/"*) echo "venv: no space left '
            f'on device" >&2; exit 1;; esac\nexec {shutil.which("python3")} "$@"\n')
        (tools / "python3").chmod(0o755)
        before = tree(root)
        result = installer("--offline", bundle, "--root", str(root), "--api-key", "k",
                           env=clean_env(PATH=f"{tools}:{os.environ['PATH']}"))
        assert result.returncode == 9, result.stderr
        assert "venv: no space left on device\nerror: a step failed (status 1; its " \
            "own message is above)\n" in result.stderr
        assert "nothing of chatops-agent is left installed" in result.stderr
        assert tree(root) == before

    def test_without_the_agent_beside_it_it_asks_where_it_is_published(
            self, system_root):
        """install.sh alone (piped from curl) and no --base-url: there is no
        default host to try, and nothing changes."""
        before = tree(system_root)
        with open(INSTALLER) as script:
            result = subprocess.run(
                ["sh", "-s", "--", "--root", str(system_root), "--api-key", "k"],
                stdin=script, capture_output=True, text=True, timeout=60,
                env=clean_env())
        assert result.returncode == 2, result.stderr
        assert "error: chatops_agent.py is not beside install.sh: give --base-url, " \
            "the address where it is published" in result.stderr
        assert tree(system_root) == before

    def test_a_url_the_agent_refuses_changes_nothing(self, system_root):
        bundle, root = need_bundle(), system_root
        before = tree(root)
        result = installer("--offline", bundle, "--root", str(root),
                           "--api-url", "http://192.0.2.2:8000", "--api-key", "k")
        assert result.returncode == 8, result.stderr
        assert ("error: the agent refuses this configuration, so nothing was changed: "
                "refusing plaintext URL http://192.0.2.2:8000") in result.stderr
        assert "install.sh --allow-plaintext" in result.stderr
        assert tree(root) == before

    def test_plaintext_is_an_option_a_rerun_takes_back(self, system_root):
        bundle, root = need_bundle(), system_root
        config = root / "etc/chatops-agent/config.json"
        common = ("--offline", bundle, "--root", str(root))
        remote = "http://192.0.2.2:8000"
        allowed = installer(*common, "--api-url", remote, "--api-key", "k",
                            "--allow-plaintext")
        assert allowed.returncode == 0, allowed.stderr
        assert json.loads(config.read_text())["allow_plaintext"] is True
        kept = installer(*common)  # an upgrade: the same URL, the choice kept
        assert kept.returncode == 0, kept.stderr
        assert json.loads(config.read_text())["allow_plaintext"] is True
        local = installer(*common, "--api-url", "http://127.0.0.1:8000")
        assert local.returncode == 0, local.stderr
        assert "allow_plaintext" not in json.loads(config.read_text())
        before = config.read_bytes()
        again = installer(*common, "--api-url", remote)  # must be asked for again
        assert again.returncode == 8 and "--allow-plaintext" in again.stderr
        assert config.read_bytes() == before

    def test_a_failed_install_leaves_nothing_and_a_failed_upgrade_the_old_one(
            self, system_root, tmp_path):
        """pip cannot install websocket-client (the bundle has no wheel): the
        run fails after it made the user, the program and the venv."""
        bundle, root = need_bundle(), system_root
        broken = tmp_path / "broken"
        shutil.copytree(bundle, broken)
        for wheel in (broken / "wheels").iterdir():
            wheel.unlink()
        with open(broken / "chatops_agent.py", "a") as f:
            f.write("# newer\n")
        sign_bundle(broken)
        before = tree(root)
        failed = installer("--offline", str(broken), "--root", str(root),
                           "--api-key", "k")
        assert failed.returncode == 5, failed.stderr
        assert "warn: nothing of chatops-agent is left installed" in failed.stderr
        assert tree(root) == before and service_ids(root) is None
        good = installer("--offline", bundle, "--root", str(root), "--api-key", "k")
        assert good.returncode == 0, good.stderr
        shutil.rmtree(root / "opt/chatops-agent/venv")  # so that the upgrade needs pip
        installed = tree(root, contents=True)
        upgrade = installer("--offline", str(broken), "--root", str(root),
                            "--api-key", "k2")
        assert upgrade.returncode == 5, upgrade.stderr
        assert "warn: the previous install is back as it was" in upgrade.stderr
        assert tree(root, contents=True) == installed

    def test_a_truncated_download_runs_nothing(self, system_root):
        script = pathlib.Path(INSTALLER).read_bytes()
        env = clean_env(CHATOPS_ROOT=str(system_root), CHATOPS_API_KEY="k")
        before = sorted(p.name for p in system_root.rglob("*"))
        for cut in range(200, len(script), 700):
            subprocess.run(["sh"], input=script[:cut], capture_output=True, env=env,
                           timeout=60)
            assert sorted(p.name for p in system_root.rglob("*")) == before, cut

    def test_damaged_bundle_refused_before_anything(self, system_root, tmp_path):
        bundle = tmp_path / "bundle"
        shutil.copytree(need_bundle(), bundle)
        with open(bundle / "chatops_agent.py", "a") as f:
            f.write("# altered\n")
        result = installer("--offline", str(bundle), "--root", str(system_root))
        assert result.returncode == 6 and "damaged" in result.stderr
        assert not (system_root / "opt").exists()

    def test_no_key_is_one_clear_error(self, tmp_path):
        """As a user without root (a per-user install), with no key at all."""
        setpriv = shutil.which("setpriv")
        require(setpriv and os.geteuid() == 0, "setpriv and root are needed")
        home = tempfile.mkdtemp()
        os.chmod(home, 0o777)
        script = os.path.join(home, "install.sh")
        shutil.copy(INSTALLER, script)
        def install(*args):
            return subprocess.run(
                [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "sh",
                 script, *args], capture_output=True, text=True, timeout=60,
                env=clean_env(HOME=home))

        result = install()
        assert result.returncode == 8 and "no API key" in result.stderr
        assert "not root: installing for nobody only" in result.stderr
        assert "sudo sh" in result.stderr
        shutil.copy(AGENT, home)  # a checkout; and without a key, --no-start
        empty = install("--no-start", "--dry-run")  # a config of no settings at all
        shutil.rmtree(home)
        assert empty.returncode == 0, empty.stderr
        assert empty.stderr.endswith("info: changed\n")

    def test_version_from_a_bundle_only_if_it_is_that_release(self, system_root):
        bundle, root = need_bundle(), system_root
        common = ["--offline", bundle, "--root", str(root),
                  "--api-url", "https://chatops.example.com"]
        env = clean_env(CHATOPS_API_KEY=KEY)
        other = installer(*common, "--version", "9.9.9", env=env)
        assert other.returncode == 5, other.stderr
        assert (f"holds chatops-agent {agent.__version__}, not 9.9.9; make a "
                "bundle of it: sh install.sh --version 9.9.9 --prepare-offline"
                ) in other.stderr
        assert not (root / "opt").exists()  # refused before any change
        same = installer(*common, "--version", agent.__version__, env=env)
        assert same.returncode == 0, same.stderr
        assert f"info: chatops-agent {agent.__version__}\n" in same.stderr
        assert installer("--version", "../1").returncode == 2

    def test_version_downloaded_from_its_own_path(self, tmp_path):
        """Each release X published at BASE_URL/X/, checked against its
        SHA256SUMS and against what it says it is."""
        served = tmp_path / "served"
        served.mkdir()
        bundle_of("9.9.9", need_bundle(), served / "9.9.9")
        shutil.copytree(need_bundle(), served / "9.9.7")  # mislabelled
        with FileServer(served) as base_url:
            def install(version):
                return installer("--dry-run", "--base-url", base_url, "--version",
                                 version, "--api-url", "https://chatops.example.com",
                                 env=pypi_out_of_reach(CHATOPS_API_KEY=KEY))
            got = install("9.9.9")
            assert got.returncode == 0, got.stderr
            assert f"downloading chatops-agent from {base_url}/9.9.9\n" in got.stderr
            assert "checksums verified" in got.stderr
            assert "info: chatops-agent 9.9.9\n" in got.stderr
            missing = install("9.9.8")
            assert missing.returncode == 5
            assert "is 9.9.8 a release (see CHANGELOG.md)?" in missing.stderr
            mislabelled = install("9.9.7")
            assert mislabelled.returncode == 5
            assert f"holds chatops-agent {agent.__version__}, not 9.9.7" in (
                mislabelled.stderr)

    def test_a_published_directory_is_the_only_source_and_all_of_it_is_checked(
            self, system_root, tmp_path):
        """--base-url: the agent and its websocket-client wheel both come
        from the published directory, both checked against its SHA256SUMS
        before anything changes; pip never asks an index (issue 27)."""
        root, served = system_root, tmp_path / "served"
        shutil.copytree(need_bundle(), served)
        alone = tmp_path / "alone" / "install.sh"  # as piped from curl: nothing beside
        alone.parent.mkdir()
        shutil.copy(INSTALLER, alone)
        with PackageIndex(tmp_path / "index") as index, FileServer(served) as url:
            def install(*extra):
                return installer("--root", str(root), "--base-url", url, "--api-url",
                                 "https://chatops.example.com", *extra,
                                 env=pypi_out_of_reach(index, CHATOPS_API_KEY=KEY),
                                 script=str(alone))
            got = install()
            assert got.returncode == 0, got.stderr
            assert "info: checksums verified (SHA256SUMS)\n" in got.stderr
            assert index.asked == []  # PyPI (here, its stand-in) never asked
            site = next((root / "opt/chatops-agent/venv/lib").glob("python3*"))
            assert (site / "site-packages" / "websocket_client-"
                    f"{BUNDLED_WEBSOCKET_CLIENT}.dist-info").is_dir()
            wheel = next((served / "wheels").iterdir())
            wheel.write_bytes(wheel.read_bytes() + b"altered")
            before = tree(root, contents=True)
            altered = install()
            assert altered.returncode == 5, altered.stderr
            assert "does not match its SHA256SUMS: the download is damaged or " \
                "altered; nothing was changed" in altered.stderr
            assert tree(root, contents=True) == before
            wheel.unlink()
            sign_bundle(served)  # an older publication: the agent only
            unpublished = install()
            assert unpublished.returncode == 5, unpublished.stderr
            assert f"{url} publishes no websocket-client wheel" in unpublished.stderr
            assert "give --pypi to take websocket-client " \
                f"{BUNDLED_WEBSOCKET_CLIENT} from PyPI" in unpublished.stderr
            assert index.asked == [] and tree(root, contents=True) == before

    def test_pypi_only_when_asked_and_only_the_pinned_wheel(self, system_root,
                                                             tmp_path):
        """--pypi takes the pinned websocket-client from the index, checked
        against the pinned hash: an index that serves another file under its
        name installs nothing."""
        root = system_root
        common = ("--offline", need_bundle(), "--root", str(root), "--pypi")
        wheel = next(pathlib.Path(need_bundle(), "wheels").iterdir())
        with PackageIndex(tmp_path / "index", wheel) as index:
            env = pypi_out_of_reach(index, CHATOPS_API_KEY=KEY)
            got = installer(*common, env=env)
            assert got.returncode == 0, got.stderr
            assert f"websocket-client {BUNDLED_WEBSOCKET_CLIENT} from PyPI " \
                "(hash-checked)" in got.stderr
            assert any(path.endswith(wheel.name) for path in index.asked), index.asked
            shutil.rmtree(root / "opt/chatops-agent/venv")
            before = tree(root, contents=True)
            index.serve(wheel.name, wheel.read_bytes() + b"altered")
            refused = installer(*common, env=env)
            assert refused.returncode == 5, refused.stderr
            assert "THESE PACKAGES DO NOT MATCH THE HASHES" in refused.stderr
            assert tree(root, contents=True) == before

    def test_the_key_file_is_only_a_small_regular_file_of_one_line(self, tmp_path):
        """As the agent reads its own files: a FIFO is refused at once (it
        blocked the installer for ever), a device or a directory too, and a
        link to a larger file is not read whole (issue 26, defect 6)."""
        secret = tmp_path / "secret"
        secret.write_text("root:$y$j9T$not-a-key:19000:0:99999:7:::\n" * 400)
        cases = {
            "fifo": "is not a regular file", "/dev/zero": "is not a regular file",
            "dir": "is not a regular file", "link": "is larger than 4 KiB",
            "two-lines": "holds more than one line", "empty": "is empty",
            "missing": "cannot be read",
        }
        os.mkfifo(tmp_path / "fifo")
        (tmp_path / "dir").mkdir()
        (tmp_path / "link").symlink_to(secret)
        (tmp_path / "two-lines").write_text(KEY + "\n" + KEY + "\n")
        (tmp_path / "empty").write_text("\n")
        for name, said in cases.items():
            path = name if name.startswith("/") else str(tmp_path / name)
            result = installer("--dry-run", "--api-key-file", path, "--api-url",
                               "https://chatops.example.com")
            assert result.returncode == 2, (name, result.stderr)
            assert f"the key file {path} {said}" in result.stderr, result.stderr
            assert "nothing was changed" in result.stderr
            assert "not-a-key" not in result.stderr + result.stdout
        good = tmp_path / "key"
        good.write_text(f"  {KEY}\r\n")
        accepted = installer("--dry-run", "--api-key-file", str(good), "--api-url",
                             "https://chatops.example.com")
        assert accepted.returncode == 0, accepted.stderr
        assert KEY not in accepted.stderr + accepted.stdout

    @pytest.mark.parametrize("tool", ["curl", "wget"])
    def test_once_at_https_a_download_never_goes_on_in_clear(self, tmp_path, tool):
        """A 302 from the https base URL to http:// is refused, with curl
        (--proto-redir) and with GNU wget (it follows redirects to https
        only, one at a time), though the agent and its checksum wait there;
        one to another https address is followed (issue 26, defect 4)."""
        require(shutil.which(tool), f"{tool} is not installed (apt-get install {tool})")
        trustme = need_module("trustme")
        ca = trustme.CA()
        context = __import__("ssl").create_default_context(
            __import__("ssl").Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(context)
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        (tmp_path / "wgetrc").write_text(f"ca_certificate = {ca_file}\n")
        served = tmp_path / "served"
        shutil.copytree(need_bundle(), served)
        env = clean_env(CHATOPS_API_KEY=KEY, CURL_CA_BUNDLE=str(ca_file),
                        WGETRC=str(tmp_path / "wgetrc"))
        if tool == "wget":
            env["PATH"] = path_without(tmp_path, "curl")

        def install(base_url):
            script = tmp_path / "alone" / "install.sh"  # no agent beside it
            script.parent.mkdir(exist_ok=True)
            shutil.copy(INSTALLER, script)
            return installer("--dry-run", "--base-url", base_url, "--api-url",
                             "https://chatops.example.com", env=env, script=str(script))

        with FileServer(served) as plain, Redirector(plain, context) as https:
            refused = install(https)
        assert refused.returncode == 5, refused.stderr
        assert f"{https}/SHA256SUMS redirected to " in refused.stderr
        assert "never goes on in clear" in refused.stderr
        assert "checksums verified" not in refused.stderr
        with FileServer(served, context) as secure, \
                Redirector(secure, context) as https:
            followed = install(https)
        assert followed.returncode == 0, followed.stderr
        assert "checksums verified" in followed.stderr

    def test_help(self):
        result = installer("--help")
        assert result.returncode == 0 and "--prepare-offline" in result.stdout
        bad = installer("--bogus")
        assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr


@pytest.fixture
def image(docker_engine):
    """A fresh Debian 12 (debootstrap minbase with python3, python3-venv and
    systemd), imported as an image by .ci/run."""
    return debian_image("12")


class TestFreshDebian:
    """install.sh on a fresh Debian 12, in containers without systemd."""

    CHECKS = (
        "stat -c '%a %U:%G %n' /opt/chatops-agent/chatops_agent.py /etc/chatops-agent "
        "/etc/chatops-agent/config.json /etc/systemd/system/chatops-agent.service; "
        "getent passwd chatops-agent; "
        "runuser -u chatops-agent -- /opt/chatops-agent/venv/bin/python "
        "/opt/chatops-agent/chatops_agent.py --config /etc/chatops-agent/config.json "
        "--once --docker-enabled false > /tmp/once.json && echo ONCE-OK; "
        # A short run as the service user (no API here): its spool is made.
        "timeout -s TERM 3 runuser -u chatops-agent -- /opt/chatops-agent/venv/bin/"
        "python /opt/chatops-agent/chatops_agent.py --config "
        "/etc/chatops-agent/config.json --docker-enabled false 2>/tmp/run.log; "
        "stat -c '%a %U:%G %n' /var/lib/chatops-agent /var/lib/chatops-agent/spool"
    )

    def check_installed(self, output):
        assert "755 root:root /opt/chatops-agent/chatops_agent.py" in output
        assert "750 chatops-agent:chatops-agent /etc/chatops-agent\n" in output
        assert (
            "600 chatops-agent:chatops-agent /etc/chatops-agent/config.json" in output
        )
        assert "644 root:root /etc/systemd/system/chatops-agent.service" in output
        assert ":/nonexistent:/usr/sbin/nologin" in output and "ONCE-OK" in output
        assert "700 chatops-agent:chatops-agent /var/lib/chatops-agent\n" in output
        assert "600 chatops-agent:chatops-agent /var/lib/chatops-agent/spool" in output

    def test_offline_bundle_without_network(self, image):
        bundle = need_bundle()
        result = docker("run", "--rm", "--network", "none",
                        "-v", f"{bundle}:/bundle:ro",
                        "-e", f"CHATOPS_API_KEY={KEY}", image, "sh", "-c",
                        "sh /bundle/install.sh --offline /bundle --api-url "
                        "https://chatops.example.com && " + self.CHECKS,
                        check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        self.check_installed(result.stdout)
        assert "bundle verified" in result.stderr
        assert "systemd is not running" in result.stderr  # and it says how to run it
        assert KEY not in result.stdout + result.stderr


def in_box(name, *command, env=None):
    """A command in container `name`, as root."""
    flags = [arg for k, v in (env or {}).items() for arg in ("-e", f"{k}={v}")]
    return docker("exec", *flags, name, *command, check=False)


@contextlib.contextmanager
def booted(image):
    """`image` booted with systemd as PID 1 (no --privileged: the cgroup tree
    bind-mounted, SYS_ADMIN, a tmpfs /run), on the host's network so that
    the agent inside reaches a test API on 127.0.0.1; yields its name."""
    name = f"chatops-systemd-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    docker("run", "-d", "--name", name, "--cap-add", "SYS_ADMIN",
           "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw", "--tmpfs", "/run",
           "--tmpfs", "/run/lock", "--network", "host", image, "/lib/systemd/systemd")
    try:
        wait_until(lambda: in_box(name, "systemctl", "is-system-running").stdout.strip()
                   in ("running", "degraded"), 60, "systemd to boot")
        yield name
    finally:
        docker("rm", "-f", name, check=False)


@pytest.fixture
def systemd_box(image):
    """The Debian 12 image booted with systemd."""
    with booted(image) as name:
        yield name


# The Debian releases install.sh is tested on, each with its Python; the
# README and the role's meta/main.yml name these and no others. .ci/run
# makes an image of each: CHATOPS_TEST_DEBIAN_IMAGE (12), and
# CHATOPS_TEST_DEBIAN11_IMAGE and CHATOPS_TEST_DEBIAN13_IMAGE.
DEBIAN_RELEASES = {"11": "bullseye, Python 3.9", "12": "bookworm, Python 3.11",
                   "13": "trixie, Python 3.13"}


def debian_image(release):
    """The image .ci/run makes of a tested Debian release (skipped, or failed
    in CI, when there is none)."""
    variable = "CHATOPS_TEST_DEBIAN_IMAGE" if release == "12" else \
        f"CHATOPS_TEST_DEBIAN{release}_IMAGE"
    image = os.environ.get(variable, "")
    found = image and docker("image", "inspect", image, check=False).returncode == 0
    require(found, f"no fresh Debian image ({variable}; .ci/run makes it)")
    return image


@pytest.fixture(params=sorted(DEBIAN_RELEASES))
def any_debian_box(request, docker_engine):
    """Each tested Debian release, booted with systemd."""
    release = request.param
    with booted(debian_image(release)) as name:
        python = in_box(name, "python3", "--version").stdout
        assert python.startswith("Python " + DEBIAN_RELEASES[release].split(
            "Python ")[1]), python
        yield name


class TestSystemd:
    """The installed service under a real systemd: hardening, stop, restart."""

    def install(self, box, api):
        return in_box(box, "sh", "/bundle/install.sh", "--offline", "/bundle",
                      "--api-url", api.url, env={"CHATOPS_API_KEY": KEY})

    def main_pid(self, box):
        return in_box(box, "systemctl", "show", "-p", "MainPID", "--value",
                      "chatops-agent").stdout.strip()

    def test_the_service_installs_runs_stops_restarts_and_goes(self, any_debian_box,
                                                               api, tmp_path):
        box = any_debian_box
        docker("cp", need_bundle(), f"{box}:/bundle")
        installed = self.install(box, api)
        assert installed.returncode == 0, installed.stderr
        assert installed.stderr.endswith("info: changed\n")
        active = in_box(box, "systemctl", "is-active", "chatops-agent").stdout
        assert active == "active\n"
        wait_until(api.metrics, 30, "the service to connect")
        assert installed.stderr.endswith(f"info:   {CHECK_LINE}\ninfo: changed\n")
        checked = in_box(box, "sh", "-c", CHECK_LINE)  # as the installer says
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "spool: /var/lib/chatops-agent/spool" in checked.stdout
        journal = in_box(box, "journalctl", "-u", "chatops-agent", "--no-pager").stdout
        assert re.search(r" chatops-agent\[\d+\]: .* connected to ", journal), journal
        shown = in_box(box, "ps", "-ww", "-o", "args=", "-p", self.main_pid(box)).stdout
        assert shown.startswith("/opt/chatops-agent/venv/bin/python -c import sys;")
        assert shown.endswith(" /opt/chatops-agent /opt/chatops-agent/chatops_agent.py "
                              "--config /etc/chatops-agent/config.json\n")  # as README
        self.check_hardening(box, Commander(api, None))
        self.check_stop_and_restart(box)
        pid = self.main_pid(box)
        again = self.install(box, api)  # nothing new: nothing changes, no restart
        assert again.returncode == 0, again.stderr
        assert self.main_pid(box) == pid and "restart" not in again.stderr
        assert again.stderr.endswith("info: nothing changed\n")
        self.check_an_upgrade(box, api, tmp_path)
        purged = in_box(box, "sh", "/bundle/install.sh", "--uninstall", "--purge")
        assert purged.returncode == 0, purged.stderr
        left = in_box(box, "sh", "-c", "ls -d /opt/chatops-agent /etc/chatops-agent "
                      "/var/lib/chatops-agent "
                      "/etc/systemd/system/chatops-agent.service* 2>/dev/null; "
                      "getent passwd chatops-agent; "
                      "systemctl list-units --all --no-legend 'chatops-agent*'")
        assert left.stdout.strip() == ""
        self.check_a_failed_start(box, api)

    def check_an_upgrade(self, box, api, tmp_path):
        """A newer release over the running one: replaced, restarted once,
        and reporting as the new release."""
        newer = bundle_of("9.0.1", need_bundle(), tmp_path / "newer")
        docker("cp", newer, f"{box}:/newer")
        pid = self.main_pid(box)
        upgraded = in_box(box, "sh", "/newer/install.sh", "--offline", "/newer")
        assert upgraded.returncode == 0, upgraded.stderr
        assert "info: chatops-agent 9.0.1\n" in upgraded.stderr
        assert upgraded.stderr.endswith("info: changed\n")
        assert self.main_pid(box) != pid
        wait_until(lambda: api.metrics()[-1]["agent_version"] == "9.0.1", 30,
                   "the upgraded agent to report")

    def check_a_failed_start(self, box, api):
        """A service that cannot start (an operator's drop-in breaks it): the
        journal shown is this run's, and the first install is undone."""
        in_box(box, "sh", "-c", "mkdir -p /etc/systemd/system/chatops-agent.service.d"
               " && printf '[Service]\\nExecStartPre=/bin/false\\n' > "
               "/etc/systemd/system/chatops-agent.service.d/broken.conf")
        failed = self.install(box, api)
        assert failed.returncode == 7, failed.stderr
        excerpt, _, after = failed.stderr.partition(
            "error: the service did not start; its log is above")
        assert "ExecStartPre" in excerpt or "status=1/FAILURE" in excerpt, excerpt
        assert " connected to " not in excerpt  # the lines of the earlier install
        assert "warn: nothing of chatops-agent is left installed" in after
        left = in_box(box, "sh", "-c", "ls -d /opt/chatops-agent /etc/chatops-agent "
                      "/var/lib/chatops-agent "
                      "/etc/systemd/system/chatops-agent.service "
                      "2>/dev/null; getent passwd chatops-agent; "
                      "systemctl is-enabled chatops-agent 2>&1")
        assert left.stdout.strip() in (  # as systemd 247 and 252 say it, and 257
            "", "Failed to get unit file state for chatops-agent.service: No such "
            "file or directory", "not-found"), left.stdout

    def check_hardening(self, box, cmd):
        """What the unit allows commands, and what it forbids them."""
        def run(command):
            data = cmd.run(command, timeout_s=30)["data"]
            return data["exit_code"], data["output"]

        assert run("id -un") == (0, "chatops-agent\n")
        assert "Read-only file system" in run("touch /etc/chatops-probe")[1]
        assert run("touch /tmp/chatops-probe && echo written") == (0, "written\n")
        assert "Permission denied" in run("cat /proc/1/environ")[1]
        code, count = run("ps -e --no-headers | wc -l")
        assert code == 0 and int(count) >= 5  # every process, not only its own
        assert run("df -P / | tail -n 1")[0] == 0
        assert "chatops-agent" in run("journalctl -u chatops-agent -n 5 --no-pager")[1]
        tls = "import ssl; print(len(ssl.create_default_context().get_ca_certs()) >= 0)"
        assert run(f"python3 -c '{tls}'") == (0, "True\n")
        security = in_box(box, "systemd-analyze", "security", "chatops-agent").stdout
        score = re.search(r"Overall exposure level for chatops-agent.service: ([\d.]+)",
                          security)
        assert score and float(score.group(1)) <= 4.5, security[-400:]

    def check_stop_and_restart(self, box):
        stopping = time.monotonic()
        assert in_box(box, "systemctl", "stop", "chatops-agent").returncode == 0
        assert time.monotonic() - stopping < 5
        status = in_box(box, "systemctl", "show", "-p", "ExecMainStatus",
                        "-p", "Result", "chatops-agent").stdout
        assert "ExecMainStatus=0" in status and "Result=success" in status
        in_box(box, "systemctl", "start", "chatops-agent")
        pid = wait_until(lambda: self.main_pid(box) not in ("", "0")
                         and self.main_pid(box), 10, "the service to start")
        killed = time.monotonic()
        in_box(box, "kill", "-KILL", pid)
        wait_until(lambda: self.main_pid(box) not in ("", "0", pid), 15,
                   "a restart after SIGKILL")
        assert time.monotonic() - killed < 5 + 3  # RestartSec=5, and a little



###############################################################################
# The README, run as written ##################################################
###############################################################################

README = os.path.join(os.path.dirname(AGENT), "README.md")
# Each command block of the README, word for word. A block that is changed,
# added or removed fails test_every_block_is_known until it is entered here,
# and so until a test runs it.
KEY_FILE = "(umask 077 && cat > /root/chatops.key)"
TRY_IT = ("apt-get update && apt-get install -y python3-venv && python3 -m venv .venv "
          "&& . .venv/bin/activate && pip install -r requirements.txt && python3 "
          "chatops_agent.py --once")
CHECK_BY_HAND = ("CHATOPS_API_KEY=$(cat /root/chatops.key) python3 chatops_agent.py "
                 "--check --api-url https://chatops.example.com")
RUN_BY_HAND = ("CHATOPS_API_KEY=$(cat /root/chatops.key) python3 chatops_agent.py "
               "--api-url https://chatops.example.com")
INSTALL = ("sh install.sh --api-url https://chatops.example.com --api-key-file "
           "/root/chatops.key")
PUBLISH = "sh install.sh --prepare-offline /var/www/html/chatops-agent"
CURL_INSTALL = ("curl -fsSL https://files.example.org/chatops-agent/install.sh | sh -s "
                "-- --base-url https://files.example.org/chatops-agent --api-url "
                "https://chatops.example.com --api-key-file /root/chatops.key")
MAKE_BUNDLE = "sh install.sh --prepare-offline chatops-bundle"
BUNDLE_INSTALL = ("sh chatops-bundle/install.sh --offline chatops-bundle --api-url "
                  "https://chatops.example.com --api-key-file /root/chatops.key")
PIPX = "pipx install . && chatops-agent --version && chatops-agent --once"
STATUS = ("systemctl status chatops-agent --no-pager && journalctl -u chatops-agent "
          "-n 20 --no-pager")
PURGE = "sh install.sh --purge"
CURL_PURGE = ("curl -fsSL https://files.example.org/chatops-agent/install.sh | sh -s "
              "-- --purge")
TESTS = "python3 -m pytest -q --timeout 180 test_chatops_agent.py"
# Where each runs: the box (the fresh Debian image, booted), this machine (a
# connected one, with pip), or the CI script that runs it as it stands.
README_BLOCKS = {
    KEY_FILE: "box", TRY_IT: "box", CHECK_BY_HAND: "box", RUN_BY_HAND: "box",
    INSTALL: "box", PUBLISH: "host", CURL_INSTALL: "box", MAKE_BUNDLE: "host",
    BUNDLE_INSTALL: "box", PIPX: ".ci/package", CHECK_LINE: "box", STATUS: "box",
    PURGE: "box", CURL_PURGE: "box", TESTS: ".ci/run",
}


def readme_blocks():
    with open(README) as f:
        return re.findall(r"^```sh\n(.*?)\n```$", f.read(), re.S | re.M)


class TestReadme:
    """Every command block of the README, as written, as the user it names:
    on the fresh Debian 12 image booted with systemd, as root. Only the
    values the README says are the user's own are replaced: the ChatOps
    server's address (the test API), where the agent is published (a file
    server on 127.0.0.1) and the key (the test's). apt and pip get their
    packages from local copies, as from a mirror: nothing leaves the machine."""

    def test_every_block_is_known(self):
        blocks = readme_blocks()
        unknown = [b for b in blocks if b not in README_BLOCKS]
        gone = [b for b in README_BLOCKS if b not in blocks]
        assert not unknown and not gone, (
            f"README command blocks changed: new or edited {unknown}, gone {gone}; "
            "enter each in README_BLOCKS, and run it in TestReadme")
        assert len(blocks) == len(set(blocks))

    def test_the_blocks_ci_runs_are_in_its_scripts(self):
        here = os.path.dirname(AGENT)
        for block, where in README_BLOCKS.items():
            if where.startswith(".ci/"):
                with open(os.path.join(here, where)) as f:
                    assert block in f.read(), (where, block)

    def test_the_readme_runs_as_written(self, systemd_box, api, tmp_path):
        box = systemd_box
        self.api = api.url
        self.setup_box(box, tmp_path)
        assert self.sh(box, KEY_FILE, stdin=KEY + "\n").returncode == 0
        assert self.sh(box, "stat -c %a /root/chatops.key").stdout == "600\n"
        # The quick start, in one shell, as the README says.
        tried = self.sh(box, f"{TRY_IT}\n{CHECK_BY_HAND}", cwd="/root/chatops-agent")
        assert tried.returncode == 0, tried.stdout + tried.stderr
        assert '"type": "metrics"' in tried.stdout and "key accepted" in tried.stdout
        self.until_connected(api, box, f". .venv/bin/activate && {RUN_BY_HAND}",
                             cwd="/root/chatops-agent")
        self.sh(box, "pkill -INT -f '[c]hatops_agent.py --api-url'")  # Ctrl-C
        wait_until(lambda: self.sh(box, "pgrep -f '[c]hatops_agent.py --api-url'")
                   .returncode == 1, 10, "the agent run by hand to stop")
        self.installed(api, box, INSTALL, cwd="/root/chatops-agent")
        # The installed service, checked and read as the README says.
        checked = self.sh(box, CHECK_LINE)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        status = self.sh(box, STATUS)
        assert status.returncode == 0, status.stdout + status.stderr
        assert " chatops-agent[" in status.stdout, status.stdout
        self.purged(box, PURGE, cwd="/root/chatops-agent")
        self.through_a_web_server(api, box, tmp_path)
        self.from_a_bundle(api, box, tmp_path)

    def through_a_web_server(self, api, box, tmp_path):
        """A published directory, installed on a host that cannot reach
        PyPI (pip's index is a stand-in that records what it is asked)."""
        site = tmp_path / "site"
        self.on_host(PUBLISH.replace("/var/www/html/chatops-agent", str(site)))
        with FileServer(site) as url, PackageIndex(tmp_path / "pypi") as pypi:
            self.files = url
            self.pip = {"PIP_INDEX_URL": pypi.url + "/simple/"}
            got = self.installed(api, box, CURL_INSTALL)
            assert "checksums verified (SHA256SUMS)" in got.stderr
            self.purged(box, CURL_PURGE)
            assert pypi.asked == []
            self.pip = self.PIP

    def from_a_bundle(self, api, box, tmp_path):
        connected = tmp_path / "connected"  # a checkout on a connected machine
        connected.mkdir()
        for name in ("install.sh", "chatops_agent.py"):
            shutil.copy(os.path.join(os.path.dirname(AGENT), name), connected)
        self.on_host(MAKE_BUNDLE, cwd=connected)
        docker("cp", str(connected / "chatops-bundle"), f"{box}:/root/chatops-bundle")
        with PackageIndex(tmp_path / "no-pypi") as pypi:
            self.pip = {"PIP_INDEX_URL": pypi.url + "/simple/"}
            self.installed(api, box, BUNDLE_INSTALL)
            self.purged(box, PURGE, cwd="/root/chatops-bundle")
            assert pypi.asked == []
            self.pip = self.PIP

    # -- how the blocks run ------------------------------------------------------
    def setup_box(self, box, tmp_path):
        """A checkout in /root/chatops-agent; apt's sources an empty local
        repository, pip's the bundle's wheels (PIP_FIND_LINKS, below)."""
        checkout = tmp_path / "checkout"
        checkout.mkdir()
        for name in ("chatops_agent.py", "install.sh", "requirements.txt", "README.md"):
            shutil.copy(os.path.join(os.path.dirname(AGENT), name), checkout)
        docker("cp", str(checkout), f"{box}:/root/chatops-agent")
        docker("cp", os.path.join(need_bundle(), "wheels"), f"{box}:/wheels")
        mirror = self.sh(box, "rm -f /etc/apt/sources.list.d/* && mkdir -p /srv/apt && "
                         ": > /srv/apt/Packages && echo 'deb [trusted=yes] "
                         "file:/srv/apt ./' > /etc/apt/sources.list")
        assert mirror.returncode == 0, mirror.stderr

    PIP = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/wheels"}  # a mirror of PyPI
    pip = PIP  # what pip has in the box now

    api = files = None  # the test API's URL, the file server's

    def own(self, script):
        """The block with the user's own values: the ChatOps server's address
        and where the agent is published."""
        script = script.replace("https://chatops.example.com", self.api)
        if self.files:
            script = script.replace("https://files.example.org/chatops-agent",
                                    self.files)
        return script

    def sh(self, box, script, cwd="/root", stdin=None):
        """`script` run by sh in the box, as root, in `cwd`."""
        script = self.own(script)
        flags = [a for k, v in self.pip.items() for a in ("-e", f"{k}={v}")]
        return subprocess.run(["docker", "exec", "-i", "-w", cwd, *flags, box,
                               "sh", "-c", script], input=stdin, capture_output=True,
                              text=True, timeout=300)

    def on_host(self, script, cwd=None):
        """A block for a connected machine, here: pip from the bundle's wheels."""
        wheels = os.path.join(need_bundle(), "wheels")
        result = subprocess.run(["sh", "-c", script], capture_output=True, text=True,
                                cwd=cwd or os.path.dirname(AGENT), timeout=300,
                                env=clean_env(PIP_NO_INDEX="1", PIP_FIND_LINKS=wheels))
        assert result.returncode == 0, result.stderr
        return result

    def until_connected(self, api, box, script, cwd="/root"):
        before = len(api.metrics())
        docker("exec", "-d", "-w", cwd, box, "sh", "-c", self.own(script))
        wait_until(lambda: len(api.metrics()) > before, 30, f"metrics from: {script}")

    def installed(self, api, box, script, cwd="/root"):
        """An install block: it ends well, the service runs and reports."""
        before = len(api.metrics())
        result = self.sh(box, script, cwd=cwd)
        assert result.returncode == 0, result.stderr
        assert f"info:   {CHECK_LINE}\n" in result.stderr
        assert self.sh(box, "systemctl is-active chatops-agent").stdout == "active\n"
        wait_until(lambda: len(api.metrics()) > before, 30, f"the service of: {script}")
        return result

    def purged(self, box, script, cwd="/root"):
        result = self.sh(box, script, cwd=cwd)
        assert result.returncode == 0, result.stderr
        left = self.sh(box, "ls -d /opt/chatops-agent /etc/chatops-agent "
                       "/var/lib/chatops-agent 2>/dev/null; "
                       "getent passwd chatops-agent")
        assert left.stdout == ""
        assert self.sh(box, "cat /root/chatops.key").stdout == KEY + "\n"  # untouched


###############################################################################
# A fleet, through the Ansible role ###########################################
###############################################################################


ANSIBLE_DIR = os.path.join(os.path.dirname(AGENT), "deploy", "ansible")


def need_ansible():
    """The bin directory of a venv with ansible and ansible-lint (.ci/run
    makes one, from PyPI)."""
    bin_dir = os.environ.get("CHATOPS_TEST_ANSIBLE", "")
    require(os.access(os.path.join(bin_dir, "ansible-playbook"), os.X_OK),
            "no Ansible (CHATOPS_TEST_ANSIBLE, a venv's bin with ansible and "
            "ansible-lint; .ci/run makes one)")
    return bin_dir


def bundle_of(version, bundle, directory):
    """A copy of the offline bundle whose agent says it is `version`, with
    its SHA256SUMS made again: a release made for the test."""
    shutil.copytree(bundle, directory)
    program = os.path.join(directory, "chatops_agent.py")
    with open(program) as f:
        text = f.read().replace(f'__version__ = "{agent.__version__}"',
                                f'__version__ = "{version}"')
    with open(program, "w") as f:
        f.write(text)
    return sign_bundle(directory)


def sign_bundle(directory):
    """The bundle in `directory` with its SHA256SUMS made again."""
    sums = []
    for root, _, files in os.walk(directory):
        for name in sorted(files):
            path = os.path.join(root, name)
            if name != "SHA256SUMS":
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                sums.append(f"{digest}  {os.path.relpath(path, directory)}")
    with open(os.path.join(directory, "SHA256SUMS"), "w") as f:
        f.write("\n".join(sorted(sums, key=lambda s: s.split("  ")[1])) + "\n")
    return str(directory)


@pytest.fixture
def fleet(docker_engine):
    """Four hosts booted with systemd, as systemd_box: Debian 11, 12, 13 and
    12, so that the role runs on each release it names."""
    images = [debian_image(release) for release in ("11", "12", "13", "12")]
    names = [f"chatops-fleet-{os.getpid()}-{n}" for n in range(1, 5)]
    try:
        for name, image in zip(names, images):
            docker("run", "-d", "--name", name, "--cap-add", "SYS_ADMIN",
                   "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw", "--tmpfs", "/run",
                   "--tmpfs", "/run/lock", "--network", "host", image,
                   "/lib/systemd/systemd")

        def up(name):
            state = in_box(name, "systemctl", "is-system-running").stdout.strip()
            return state in ("running", "degraded")

        for name in names:
            wait_until(lambda name=name: up(name), 60, f"systemd to boot in {name}")
        yield names
    finally:
        docker("rm", "-f", *names, check=False)


class Watcher:
    """Calls `sample()` every `period` s, in a thread, while `with` lasts."""

    period = 0.05

    def __enter__(self):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self.stop.wait(self.period):
            self.sample()

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)


class Uptime(Watcher):
    """Watches which hosts' agents are connected to their API, every 50 ms,
    and keeps each host's times without one."""

    def __init__(self, apis):
        self.apis = apis
        self.down = {host: [] for host in apis}  # host -> [[from, to or None]]

    def sample(self):
        now = time.monotonic()
        for host, api in self.apis.items():
            spans = self.down[host]
            up = any(conn.protocol.state.name == "OPEN"
                     for conn in list(api.connections))
            if not up and not (spans and spans[-1][1] is None):
                spans.append([now, None])
            elif up and spans and spans[-1][1] is None:
                spans[-1][1] = now

    def most_down_at_once(self):
        edges = sorted((t, step) for spans in self.down.values() for start, end in spans
                       for t, step in ((start, 1), (end or time.monotonic(), -1)))
        most = now = 0
        for _, step in edges:
            now += step
            most = max(most, now)
        return most


class KeyWatch(Watcher):
    """Samples every process's command line on this machine, every 20 ms,
    while it runs: the controller's, and (sharing this kernel) the hosts'
    in their containers. `seen` keeps each one that held a key."""

    period = 0.02

    def __init__(self, *keys):
        self.keys, self.seen, self.samples = keys, [], 0

    def sample(self):
        self.samples += 1
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                with contextlib.suppress(OSError):
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        line = f.read().replace(b"\0", b" ").decode("latin-1")
                    if any(key in line for key in self.keys):
                        self.seen.append(line)


def inventory_hosts(inventory):
    return list(json.loads(inventory.read_text())["chatops_agents"]["hosts"])


class TestFleet:
    """The role deploy/ansible/roles/chatops_agent on four systemd hosts,
    reached through Ansible's community.docker.docker connection, each agent
    with a test API of its own on 127.0.0.1. Every play runs with -vvv:
    the key must be in none of its output, and on no command line of the
    controller or a host while it runs."""

    def test_lint_production(self):
        lint = subprocess.run(
            [os.path.join(need_ansible(), "ansible-lint"), "--profile", "production",
             "playbook.yml", "roles/chatops_agent"], cwd=ANSIBLE_DIR,
            capture_output=True, text=True, timeout=120)
        assert lint.returncode == 0, lint.stdout + lint.stderr
        assert "Profile 'production' was required, and it passed" in lint.stderr

    def play(self, inventory, extra=None, *flags):
        """ansible-playbook -vvv with the example playbook; (rc, {host:
        changed}, output), the key found in neither its output nor any
        command line while it ran."""
        extra_file = inventory.parent / "extra.json"
        extra_file.write_text(json.dumps(extra or {}))
        started = time.monotonic()
        with KeyWatch(KEY, "not-the-key") as watch:
            result = subprocess.run(
                [os.path.join(need_ansible(), "ansible-playbook"), "-vvv", "-i",
                 str(inventory), "-e", f"@{extra_file}", *flags,
                 os.path.join(ANSIBLE_DIR, "playbook.yml")],
                capture_output=True, text=True, timeout=600,
                env=clean_env(ANSIBLE_NOCOLOR="1", ANSIBLE_PIPELINING="True",
                              ANSIBLE_ROLES_PATH=os.path.join(ANSIBLE_DIR, "roles")))
        output = result.stdout + result.stderr
        print(f"ansible-playbook {' '.join(flags)} {extra or ''}: exit "
              f"{result.returncode} in {time.monotonic() - started:.1f} s, "
              f"{watch.samples} process lists sampled")
        assert watch.samples > 10 and watch.seen == []
        assert KEY not in output and "not-the-key" not in output
        recap = {m.group(1): int(m.group(2)) for m in re.finditer(
            r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", result.stdout, re.M)}
        print(result.stdout[result.stdout.find("PLAY RECAP"):])
        return result.returncode, recap, output

    def versions(self, fleet):
        return [in_box(host, "sed", "-n", 's/^__version__ = "\\(.*\\)"$/\\1/p',
                       "/opt/chatops-agent/chatops_agent.py").stdout.strip()
                for host in fleet]

    def inventory(self, tmp_path, fleet, apis):
        """An inventory of the fleet, each host with its own API: (path,
        hosts, write), write() writing it again after a change to hosts."""
        inventory = tmp_path / "inventory.json"
        hosts = {host: {"chatops_agent_api_url": apis[host].url} for host in fleet}
        shared = {
            "ansible_connection": "community.docker.docker", "ansible_user": "root",
            "ansible_become": False, "ansible_python_interpreter": "/usr/bin/python3",
            "chatops_agent_api_key": KEY, "chatops_agent_health_timeout_s": 12,
            "chatops_agent_settings": {"metrics_interval_s": 1}}

        def write():
            inventory.write_text(json.dumps(
                {"chatops_agents": {"hosts": hosts, "vars": shared}}))

        write()
        return inventory, hosts, write

    LEFT = ("ls -d /opt/chatops-agent /etc/chatops-agent /var/lib/chatops-agent "
            "/var/tmp/chatops-agent-install "
            "/etc/systemd/system/chatops-agent.service* 2>/dev/null; "
            "getent passwd chatops-agent; "
            "systemctl list-units --all --no-legend 'chatops-agent*'")

    @pytest.mark.timeout(480)  # five playbook runs over four hosts: ~3 min here
    def test_install_again_upgrade_stop_at_a_bad_key_and_purge(self, fleet,
                                                                 tmp_path):
        bundle = need_bundle()
        apis = {host: FakeAPI(key=KEY).start() for host in fleet}
        inventory, hosts, write_inventory = self.inventory(tmp_path, fleet, apis)
        old = bundle_of(agent.__version__, bundle, tmp_path / "old")
        try:
            rc, first, _ = self.play(inventory, {"chatops_agent_bundle": old})
            assert rc == 0 and all(first[host] > 0 for host in fleet), first
            for host in fleet:
                wait_until(apis[host].metrics, 30, f"{host} to connect")
            rc, second, _ = self.play(inventory, {"chatops_agent_bundle": old})
            assert rc == 0 and second == {host: 0 for host in fleet}, second
            # One start per change: the settings came with the first install.
            assert [len(apis[host].connects) for host in fleet] == [1] * 4

            new = bundle_of("9.0.1", bundle, tmp_path / "new")
            with Uptime(apis) as uptime:
                started = time.monotonic()
                rc, upgrade, _ = self.play(inventory, {"chatops_agent_bundle": new})
            assert rc == 0 and all(upgrade[host] > 0 for host in fleet), upgrade
            assert self.versions(fleet) == ["9.0.1"] * 4
            for host in fleet:  # each connected again, and reporting as the new one
                wait_until(lambda host=host: apis[host].metrics()[-1]["agent_version"]
                           == "9.0.1", 10, f"{host}'s agent 9.0.1 reporting")
            assert uptime.most_down_at_once() <= 1, uptime.down
            went = sorted((spans[0][0] - started, host)
                          for host, spans in uptime.down.items() if spans)
            print("upgraded, in order:", [(host, f"{t:.1f} s") for t, host in went])
            assert [host for _, host in went] == fleet  # one at a time, in order

            newer = bundle_of("9.0.2", bundle, tmp_path / "newer")
            hosts[fleet[2]]["chatops_agent_api_key"] = "not-the-key"
            write_inventory()
            rc, bad, output = self.play(inventory, {"chatops_agent_bundle": newer})
            assert rc != 0
            failed = re.search(r"^fatal: \[(\S+)\]: FAILED! => (\{.*?^\})$", output,
                               re.M | re.S)
            report = json.loads(failed.group(2))["msg"]
            print("the failure:", failed.group(1), report)
            assert failed.group(1) == fleet[2]
            assert f"{fleet[2]}: chatops-agent is not active and connected after " \
                "12 s" in report, report
            assert "what the agent says: " in report and "ERROR authentication " \
                "rejected by the API" in report, report
            assert "WARNING docker" not in report
            assert f"Not reached, left as they were: {fleet[3]}." in report, report
            assert self.versions(fleet) == ["9.0.2", "9.0.2", "9.0.2", "9.0.1"]
            assert fleet[3] not in bad  # never reached
            frames = len(apis[fleet[3]].metrics())
            wait_until(lambda: len(apis[fleet[3]].metrics()) > frames, 10,
                       "the last host's agent, untouched, still reporting")

            rc, purged, _ = self.play(inventory, {
                "chatops_agent_bundle": old, "chatops_agent_state": "absent",
                "chatops_agent_purge": True})
            assert rc == 0 and all(purged[host] > 0 for host in fleet), purged
            for host in fleet:
                left = in_box(host, "sh", "-c", self.LEFT)
                assert left.stdout.strip() == "", (host, left.stdout)
        finally:
            for api in apis.values():
                api.stop()

    @pytest.mark.timeout(480)
    def test_from_a_published_directory_without_pypi_curl_or_wget(self, fleet,
                                                                   tmp_path):
        """The URL path: each host downloads the published directory itself
        (get_url), with neither curl nor wget, and pip's only index a
        recording stand-in for PyPI; a host first installed from a bundle
        gets the published release; check mode previews and changes
        nothing; a wrong variable stops the play before any task."""
        apis = {host: FakeAPI(key=KEY).start() for host in fleet}
        inventory, _, _ = self.inventory(tmp_path, fleet, apis)
        published = tmp_path / "published"
        published.mkdir()
        bundle_of("9.0.1", need_bundle(), published / "9.0.1")
        old = bundle_of(agent.__version__, need_bundle(), tmp_path / "old")
        with PackageIndex(tmp_path / "pypi") as pypi, FileServer(published) as url:
            for host in fleet:
                firewalled = in_box(host, "sh", "-c",
                                    "rm -f /usr/bin/curl /usr/bin/wget && printf "
                                    f"'[global]\\nindex-url = {pypi.url}/simple/\\n' "
                                    "> /etc/pip.conf")
                assert firewalled.returncode == 0, firewalled.stderr
            by_url = {"chatops_agent_base_url": url, "chatops_agent_version": "9.0.1"}
            try:
                self.check_a_wrong_value_stops_before_any_task(inventory)
                self.check_mode_on_a_fresh_host(inventory, fleet, by_url)
                rc, _, _ = self.play(inventory, {"chatops_agent_bundle": old},
                                     "--limit", ",".join(fleet[:2]))
                assert rc == 0
                assert self.versions(fleet) == [agent.__version__] * 2 + ["", ""]
                rc, first, _ = self.play(inventory, by_url)
                assert rc == 0 and all(first[host] > 0 for host in fleet), first
                assert self.versions(fleet) == ["9.0.1"] * 4
                for host in fleet:
                    wait_until(lambda host=host: apis[host].metrics() and apis[
                        host].metrics()[-1]["agent_version"] == "9.0.1", 30,
                        f"{host}'s agent 9.0.1 reporting")
                rc, again, _ = self.play(inventory, by_url)
                assert rc == 0 and again == {host: 0 for host in fleet}, again
                rc, health, output = self.play(inventory, by_url, "--tags", "health")
                assert rc == 0 and health == {host: 0 for host in fleet}, health
                assert "TASK [chatops_agent : Wait for chatops-agent" in output
                assert "TASK [chatops_agent : Run install.sh" not in output  # gate only
                self.check_mode_on_an_installed_host(inventory, fleet[1], apis, by_url)
                assert pypi.asked == []
                for host in fleet:  # nothing left behind on the hosts
                    left = in_box(host, "ls", "/var/tmp/chatops-agent-install")
                    assert left.returncode != 0, (host, left.stdout)
            finally:
                for api in apis.values():
                    api.stop()

    def check_a_wrong_value_stops_before_any_task(self, inventory):
        """A wrong value, and a login that is not root."""
        rc, _, output = self.play(inventory, {"chatops_agent_state": "installed",
                                              "chatops_agent_bundle": "/nowhere"})
        assert rc != 0
        assert "chatops_agent_state" in output and "present, absent" in output, (
            output[-3000:])
        assert "TASK [chatops_agent : Check the API" not in output
        rc, _, output = self.play(inventory, {"chatops_agent_bundle": "/nowhere",
                                              "ansible_user": "nobody"},
                                  "--limit", inventory_hosts(inventory)[0])
        assert rc != 0
        assert "chatops-agent is installed as a system service, as root: let the " \
            "play become root" in output, output[-3000:]

    def check_mode_on_a_fresh_host(self, inventory, fleet, by_url):
        rc, recap, output = self.play(inventory, by_url, "--check", "--diff",
                                      "--limit", fleet[0])
        assert rc == 0, output[-3000:]
        assert recap == {fleet[0]: 1}, recap
        assert "dry-run: useradd --system" in output
        assert "dry-run: install -m 0755 " in output
        assert "api_key, api_url, metrics_interval_s, state_dir" in output
        left = in_box(fleet[0], "sh", "-c", self.LEFT)
        assert left.stdout.strip() == "", left.stdout

    def check_mode_on_an_installed_host(self, inventory, host, apis, by_url):
        config = in_box(host, "cat", "/etc/chatops-agent/config.json").stdout
        connects = len(apis[host].connects)
        changed = dict(by_url, chatops_agent_settings={"metrics_interval_s": 2})
        rc, recap, output = self.play(inventory, changed, "--check", "--diff",
                                      "--limit", host)
        assert rc == 0 and recap == {host: 1}, (recap, output[-3000:])
        assert "/etc/chatops-agent/config.json (mode 600, owner " in output
        assert "): metrics_interval_s" in output
        assert "dry-run: systemctl restart chatops-agent.service" in output
        assert in_box(host, "cat", "/etc/chatops-agent/config.json").stdout == config
        assert len(apis[host].connects) == connects  # not restarted


###############################################################################
# The role's README, run as written ###########################################
###############################################################################

ROLE_README = os.path.join(ANSIBLE_DIR, "README.md")
ROLE_SETUP = (
    "sh install.sh --prepare-offline chatops-bundle\n"
    "mkdir -p group_vars/chatops_agents\n"
    "ansible-vault encrypt_string --stdin-name vault_chatops_agent_api_key < "
    "chatops.key > group_vars/chatops_agents/vault.yml\n"
    "cp deploy/ansible/inventory.example.yml inventory.yml")
ROLE_PLAY = ("ansible-playbook -i inventory.yml deploy/ansible/playbook.yml "
             "--ask-vault-pass")
ROLE_CHECK = ROLE_PLAY + " --check --diff"
ROLE_REMOVE = ROLE_PLAY + " -e chatops_agent_state=absent -e chatops_agent_purge=true"
ROLE_README_BLOCKS = (ROLE_SETUP, ROLE_PLAY, ROLE_CHECK, ROLE_REMOVE)


def on_a_terminal(command, answers, cwd, env, timeout=300):
    """`command` run by sh with a terminal of its own as its controlling tty
    (as a user types it), each password prompt answered in turn from
    `answers`; returns (exit status, all it wrote)."""
    master, slave = pty.openpty()

    def controlling_tty():
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(["sh", "-c", command], stdin=slave, stdout=slave,
                            stderr=slave, cwd=cwd, env=env, start_new_session=True,
                            preexec_fn=controlling_tty)
    os.close(slave)
    output, answered, deadline = b"", 0, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every process on the terminal is gone
                    break
                if not chunk:
                    break
                output += chunk
            waiting = output.lower().count(b"password: ")
            if waiting > answered and answered < len(answers):
                os.write(master, answers[answered].encode() + b"\n")
                answered += 1
        return proc.wait(timeout=max(1, deadline - time.monotonic())), \
            output.decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class TestRoleReadme:
    """deploy/ansible/README.md's commands, as written, on the controller
    (here, in a copy of the checkout, with Ansible on the PATH) for two
    Debian 12 hosts booted with systemd. Only what the README says is the
    user's own is changed: the key file's contents, the hosts and how they
    are reached, the API's address, and the root login the README names
    for hosts without sudo. The vault password is typed at its prompt."""

    VAULT = "a-vault-password"

    def test_every_block_is_known(self):
        with open(ROLE_README) as f:
            blocks = re.findall(r"^```sh\n(.*?)\n```$", f.read(), re.S | re.M)
        assert blocks == list(ROLE_README_BLOCKS), (
            "the role README's command blocks changed: enter them in "
            "ROLE_README_BLOCKS, and run them in TestRoleReadme")

    @pytest.mark.timeout(480)
    def test_the_role_readme_runs_as_written(self, image, api, tmp_path):
        bin_dir = need_ansible()
        checkout = tmp_path / "checkout"
        checkout.mkdir()
        for name in ("install.sh", "chatops_agent.py"):
            shutil.copy(os.path.join(os.path.dirname(AGENT), name), checkout)
        shutil.copytree(ANSIBLE_DIR, checkout / "deploy" / "ansible")
        (checkout / "chatops.key").write_text(KEY + "\n")
        os.chmod(checkout / "chatops.key", 0o600)
        env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", ANSIBLE_NOCOLOR="1",
                        PIP_NO_INDEX="1",  # the bundle's wheel from a local mirror
                        PIP_FIND_LINKS=os.path.join(need_bundle(), "wheels"))
        with contextlib.ExitStack() as stack:
            hosts = [stack.enter_context(booted(image)) for _ in range(2)]
            rc, said = on_a_terminal(ROLE_SETUP, [self.VAULT] * 2, checkout, env)
            assert rc == 0, said
            vault = (checkout / "group_vars/chatops_agents/vault.yml").read_text()
            assert "$ANSIBLE_VAULT" in vault and KEY not in vault
            self.own_inventory(checkout / "inventory.yml", hosts, api)

            rc, said = on_a_terminal(ROLE_PLAY, [self.VAULT], checkout, env)
            assert rc == 0, said[-3000:]
            recap = re.findall(r"^(\S+)\s+: ok=\d+\s+changed=1 ", said, re.M)
            assert sorted(recap) == sorted(hosts), said[-1500:]
            for host in hosts:
                assert in_box(host, "systemctl", "is-active",
                              "chatops-agent").stdout == "active\n"
            wait_until(lambda: len(api.connects) >= 2, 30, "both hosts to connect")
            rc, said = on_a_terminal(ROLE_CHECK, [self.VAULT], checkout, env)
            assert rc == 0, said[-3000:]
            assert "info: nothing changed" in said
            rc, said = on_a_terminal(ROLE_REMOVE, [self.VAULT], checkout, env)
            assert rc == 0, said[-3000:]
            for host in hosts:
                left = in_box(host, "sh", "-c", TestFleet.LEFT)
                assert left.stdout.strip() == "", (host, left.stdout)
        assert KEY not in said

    def own_inventory(self, path, hosts, api):
        """The example inventory with the user's own hosts (these two,
        reached through Docker, as root: no sudo there) and API."""
        text = path.read_text()
        example_hosts = ("    web-1.example.com:\n    web-2.example.com:\n"
                         "    db-1.example.com:\n"
                         "      chatops_agent_docker_access: true\n")
        root_login = "    # ansible_user: root\n    # ansible_become: false\n"
        assert example_hosts in text and root_login in text
        text = text.replace(example_hosts, "".join(f"    {h}:\n" for h in hosts))
        text = text.replace(root_login, root_login.replace("# ", "") +
                            "    ansible_connection: community.docker.docker\n")
        path.write_text(text.replace("https://chatops.example.com", api.url))
