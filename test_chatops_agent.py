"""The fast suite: chatops_agent.py's own behaviour, against real things (a
WebSocket server on 127.0.0.1, agent processes, files, this machine's /proc),
with no Docker engine, no container and no systemd.

    python3 -m pytest -q test_chatops_agent.py              # this suite alone
    python3 -m pytest -q --timeout 180 test_chatops_agent.py tests   # everything

The suites that drive real systems are in tests/, a file per subject (the
Docker engine, the hostile campaign, the installer and systemd, the README,
the fleet); they reuse this file's test API and helpers.
"""

import ast
import base64
import bisect
import collections
import contextlib
import datetime
import hashlib
import inspect
import itertools
import json
import os
import pathlib
import pwd
import random
import re
import shutil
import signal
import socket
import stat
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import venv
import symtable
import tempfile
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
    127.0.0.1 (or `host`, e.g. ::1).

    Records every frame as (connection number, message). Can reject keys with
    close 1008, stop acknowledging, go silent, stop reading, drop connections,
    and stop and start again on the same port. Answers GET /health and
    /api/v1/api-keys/me. Misbehaves on demand: redirects, a raw auth answer,
    WebSocket pings, a key echoed in a 401.

    `deflate`: "capped", websockets' own default (the client's window capped
    at 12 bits); "uvicorn", as the ChatOps API's uvicorn configures it (no
    cap, context kept both ways); None, no compression.
    """

    def __init__(self, key=KEY, ack=True, ssl_context=None, port=0, deflate="capped",
                 host="127.0.0.1"):
        self.key = key
        self.host = host
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
        # As the ChatOps server: one connection per key, the latest authenticated,
        # forgotten when any authenticated connection of the key ends.
        self.registered = None
        self.ended = 0  # connections whose handling has ended
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
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
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
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

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
        authenticated = False
        try:
            if not self._authenticate(conn, number):
                with self.lock:  # refused: never one to send to
                    self.connections.remove(conn)
                return
            authenticated = True
            with self.lock:
                self.registered = conn
            while self.hearing.wait():
                self._on_frame(conn, number, conn.recv())
        except ConnectionClosed:
            pass
        finally:
            received = conn.protocol.close_rcvd  # the agent's close frame, if any
            with self.lock:
                if received is not None:
                    self.closes.append((received.code, received.reason))
                if authenticated:  # any of the key's connections: as the server
                    self.registered = None
                self.ended += 1

    def _authenticate(self, conn, number):
        first = json.loads(conn.recv())
        with self.lock:
            self.frames.append((number, first))
        if first.get("type") != "auth":  # as the ChatOps server answers it
            conn.close(1008, "Authentication required: send {'type': 'auth', "
                             "'api_key': '...'} as first message")
            return False
        if first.get("api_key") != self.key:
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

    def route(self, text):
        """Send `text` as the ChatOps server routes a request: to the key's
        registered connection; False when it has none (the server's 503
        'Agent not connected')."""
        with self.lock:
            conn = self.registered
        if conn is None:
            return False
        try:
            conn.send(text)
        except ConnectionClosed:
            return False
        return True

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
    """A FakeAPI behind TLS, its certificate for 127.0.0.1, ::1 and localhost
    from a test CA; and the CA's PEM file."""
    context, ca_file = tls_context(tmp_path)
    server = FakeAPI(ssl_context=context).start()
    yield server, ca_file
    server.stop()


def have_ipv6_loopback():
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        return False
    return True


def mutual_tls(tmp_path, not_after=None):
    """A server's TLS context that asks for a client certificate of the test
    CA; the CA's PEM file; and a client certificate (CN agent-7, valid until
    `not_after`) and its key, mode 600, from that CA."""
    trustme = need_module("trustme")
    ssl = __import__("ssl")
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    context.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(context)
    files = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "client.pem",
             "key": tmp_path / "client.key"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    client = ca.issue_cert("agent.example", common_name="agent-7",
                           not_after=not_after)
    client.cert_chain_pems[0].write_to_path(str(files["cert"]))
    client.private_key_pem.write_to_path(str(files["key"]))
    files["key"].chmod(0o600)
    return context, *(str(files[name]) for name in ("ca", "cert", "key"))


def tls_context(tmp_path):
    """A server's TLS context with a certificate for 127.0.0.1, ::1 and
    localhost from a test CA, and the CA's PEM file."""
    trustme = need_module("trustme")
    ca = trustme.CA()
    context = __import__("ssl").create_default_context(
        __import__("ssl").Purpose.CLIENT_AUTH
    )
    ca.issue_cert("127.0.0.1", "::1", "localhost").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return context, str(ca_file)


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
            # (urllib keeps the case after a '%', read as an IPv6 zone)
            assert host.lower() == checked.lower(), (text, url)
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

    def test_never_acking_api_gets_no_duplicates(self, run_agent):
        api = FakeAPI(ack=False).start()
        try:
            proc = run_agent(api.url, "--reconnect-max-delay-s", "1")
            proc.wait_log("does not acknowledge metrics")
            wait_until(lambda: len(api.metrics()) >= 3, 6, "metrics")
            # A ping after each sample at most (and the heartbeat's).
            assert len(api.messages("ping")) <= len(api.metrics()) + 2
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
        assert [line.split()[0] for line in lines] == ["ok"] * 7 + ["note"] * 2
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

    def test_check_opens_the_websocket_and_never_authenticates(self, api, run_agent):
        """Beside a running service with the same key: --check opens the
        WebSocket as the agent does and sends no key on it (the API keeps one
        connection per key), and the service still gets requests. An upgrade
        the API refuses fails the line while /health and the key pass."""
        service = run_agent(api.url)
        wait_until(api.metrics, 6, service.log)
        env = clean_env(CHATOPS_API_KEY=KEY)
        result = run_cli("--check", "--api-url", api.url, env=env)
        assert result.returncode == 0, result.stdout
        line = next(x for x in result.stdout.splitlines() if "WebSocket opened" in x)
        assert line.startswith(
            f"ok   WebSocket opened at ws://127.0.0.1:{api.port}{agent.WS_PATH} in ")
        assert line.endswith(
            "not authenticated (--check never is): the API answered its probe with "
            "close 1008, policy violation: Authentication required: send {'type': "
            "'auth', 'api_key': '...'} as first message")
        with api.lock:
            probe = [m for n, m in api.frames if n == 1]
            auths = [m for _, m in api.frames if m.get("type") == "auth"]
        assert probe == [{"type": "check"}] and len(auths) == 1
        assert KEY not in json.dumps(probe)
        assert Commander(api, service).run("true")["data"]["exit_code"] == 0
        api.upgrade_status = 403
        refused = run_cli("--check", "--api-url", api.url, env=env)
        assert refused.returncode == 1
        assert "ok   API key accepted" in refused.stdout
        assert (f"FAIL WebSocket at ws://127.0.0.1:{api.port}{agent.WS_PATH} not "
                "opened: authentication rejected by the API: HTTP 403 on the WebSocket "
                "upgrade") in refused.stdout

    def test_a_name_of_two_addresses_connects_through_the_second(self, api,
                                                                monkeypatch):
        """A host name that resolves to two addresses, the first refusing
        (nothing listens on 127.0.0.2): one attempt connects through the
        second, within the connect deadline."""
        real = socket.getaddrinfo

        def resolve(host, port, *args, **kwargs):
            if host != "api.test":
                return real(host, port, *args, **kwargs)
            return [*real("127.0.0.2", port, *args, **kwargs),
                    *real("127.0.0.1", port, *args, **kwargs)]
        monkeypatch.setattr(socket, "getaddrinfo", resolve)
        config = agent.load_config({"api_url": f"http://api.test:{api.port}",
                                    "api_key": KEY, "allow_plaintext": "true"}, {})
        started = time.monotonic()
        session = agent.Connector(config, {}, agent.load_websocket()).connect()
        try:
            assert time.monotonic() - started < agent.CONNECT_DEADLINE_S
            assert session.ws.sock.getpeername() == ("127.0.0.1", api.port)
            assert api.messages("auth")
        finally:
            session.kill()
            session.ws.shutdown()

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

    def test_an_ipv6_address_in_brackets(self, tmp_path, run_agent):
        """https://[::1]:PORT: the agent connects, and --check reads it alike."""
        require(have_ipv6_loopback(), "no IPv6 loopback (::1) on this machine")
        context, ca_file = tls_context(tmp_path)
        api = FakeAPI(ssl_context=context, host="::1").start()
        try:
            assert api.url.startswith("https://[::1]:")
            proc = run_agent(api.url, "--ca-file", ca_file)
            wait_until(lambda: len(api.metrics()) >= 2, 15, proc.log)
            assert f"connected to wss://[::1]:{api.port}{agent.WS_PATH}" in proc.log()
            check = run_cli("--check", "--api-url", api.url, "--ca-file", ca_file,
                            env=clean_env(CHATOPS_API_KEY=KEY))
            assert check.returncode == 0, check.stdout
            assert f"WebSocket opened at wss://[::1]:{api.port}" in check.stdout
        finally:
            api.stop()

    def test_a_client_certificate_when_the_api_asks_for_one(self, tmp_path,
                                                            run_agent):
        """An API whose TLS asks for a client certificate (as nginx with
        ssl_verify_client on): without one the agent says what to set; with
        one it connects, and --check takes it too and shows whose it is."""
        context, ca_file, cert, key = mutual_tls(tmp_path)
        api = FakeAPI(ssl_context=context).start()
        try:
            without = run_agent(api.url, "--ca-file", ca_file)
            without.wait_log("the API's TLS asks for a client certificate and none "
                             "was given: set tls_client_cert and tls_client_key", 15)
            proc = run_agent(api.url, "--ca-file", ca_file, "--tls-client-cert", cert,
                             CHATOPS_TLS_CLIENT_KEY=key)
            wait_until(lambda: len(api.metrics()) >= 2, 15, proc.log)
            check = run_cli("--check", "--api-url", api.url, "--ca-file", ca_file,
                            "--tls-client-cert", cert, "--tls-client-key", key,
                            env=clean_env(CHATOPS_API_KEY=KEY))
            assert check.returncode == 0, check.stdout
            line = next(x for x in check.stdout.splitlines() if "client cert" in x)
            assert line.startswith(f"ok   client certificate {cert}: subject ")
            assert "commonName=agent-7" in line and "WARNING" not in line
            assert "ok   API key accepted" in check.stdout
        finally:
            api.stop()

    def test_a_client_certificate_near_its_end_is_warned_of(self, tmp_path):
        soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
            days=10, hours=1)
        _, _, cert, key = mutual_tls(tmp_path, not_after=soon)
        check = run_cli("--check", "--api-url", "https://127.0.0.1:9",
                        "--tls-client-cert", cert, "--tls-client-key", key)
        assert f"ok   client certificate {cert}: subject " in check.stdout
        assert f"; expires {soon:%Y-%m-%d}, in 10 days: WARNING, renew it within " \
            "30 days" in check.stdout

    def test_a_client_key_others_may_read_is_refused_at_start(self, tmp_path):
        _, _, cert, key = mutual_tls(tmp_path)

        def start():
            return run_cli("--api-url", "https://127.0.0.1:9", "--tls-client-cert",
                           cert, "--tls-client-key", key,
                           env=clean_env(CHATOPS_API_KEY=KEY))
        os.chmod(key, 0o640)
        result = start()
        assert result.returncode == 2
        assert f"the client key {key} is not private to this user (mode 0o640" \
            in result.stderr
        assert f"chmod 600 {key}" in result.stderr
        os.chmod(key, 0o600)
        with open(key, "w") as f:
            f.write("not a key\n")
        broken = start()
        assert broken.returncode == 2
        assert f"the client certificate {cert} and its key {key} cannot be used" \
            in broken.stderr

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

    refused = "Access violation"  # its reason phrase for a CONNECT it does not allow

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
        wait_listening(self.port, self.proc, "tinyproxy", self.log_path.read_text)
        self.url = f"http://127.0.0.1:{self.port}"

    def connects(self):
        """The targets of the CONNECTs it was asked, in order."""
        return re.findall(r"Request \(file descriptor \d+\): CONNECT (\S+)",
                          self.log_path.read_text())

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)


class Squid:
    """Debian's squid on 127.0.0.1, started for a test, as Tinyproxy is: CONNECT
    allowed to `connect_ports` only (to any port if none), Basic auth if
    `auth` (user, password) is given (squid's basic_ncsa_auth, the password
    MD5-crypted by openssl). Its cache.log, at debug level 11,2, shows each
    request as it comes: that tells which CONNECTs it was asked. It runs as
    Debian's user `proxy`, so its files are in a directory of their own."""

    refused = "Forbidden"  # its reason phrase for a CONNECT it does not allow

    def __init__(self, tmp_path, connect_ports=(), auth=None):
        require(shutil.which("squid") or os.path.exists("/usr/sbin/squid"),
                "squid is not installed (apt-get install squid)")
        self.port = fresh_port()
        self.dir = tempfile.mkdtemp(prefix="chatops-squid-")
        os.chmod(self.dir, 0o755)
        lines = [f"http_port 127.0.0.1:{self.port}", f"pid_filename {self.dir}/pid",
                 f"cache_log {self.dir}/cache.log", "access_log none",
                 f"coredump_dir {self.dir}", "cache deny all", "pinger_enable off",
                 "dns_nameservers 127.0.0.1",
                 "debug_options ALL,1 11,2", "acl CONNECT method CONNECT"]
        if connect_ports:
            lines += ["acl allowed_ports port " + " ".join(map(str, connect_ports)),
                      "http_access deny CONNECT !allowed_ports"]
        if auth:
            crypted = subprocess.run(["openssl", "passwd", "-1", auth[1]], check=True,
                                     capture_output=True, text=True).stdout.strip()
            with open(f"{self.dir}/passwd", "w") as f:
                f.write(f"{auth[0]}:{crypted}\n")
            lines += [f"auth_param basic program /usr/lib/squid/basic_ncsa_auth "
                      f"{self.dir}/passwd", "auth_param basic realm chatops",
                      "acl users proxy_auth REQUIRED", "http_access allow users"]
        lines += ["http_access allow localhost", "http_access deny all"]
        with open(f"{self.dir}/squid.conf", "w") as f:
            f.write("\n".join(lines) + "\n")
        with contextlib.suppress(KeyError):
            proxy_user = pwd.getpwnam("proxy")
            for name in os.listdir(self.dir):
                os.chown(os.path.join(self.dir, name), proxy_user.pw_uid, -1)
            os.chown(self.dir, proxy_user.pw_uid, -1)
        self.log_path = pathlib.Path(self.dir, "cache.log")
        self.proc = subprocess.Popen(
            [shutil.which("squid") or "/usr/sbin/squid", "-N", "-f",
             f"{self.dir}/squid.conf"], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        wait_listening(self.port, self.proc, "squid", self._log)
        self.url = f"http://127.0.0.1:{self.port}"

    def _log(self):
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no cache.log)"

    def connects(self):
        """The targets of the CONNECTs it was asked, in order."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return re.findall(r"^CONNECT (\S+) HTTP/", text, re.M)

    def close(self):
        """Killed with its helpers, its group: asked to stop, squid takes 2 s
        whatever shutdown_lifetime says, and it keeps no state worth that."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def tinyproxy(tmp_path):
    started = []

    def start(**options):
        started.append(Tinyproxy(tmp_path, **options))
        return started[-1]

    yield start
    for proxy in started:
        proxy.close()


@pytest.fixture(params=[Tinyproxy, Squid], ids=["tinyproxy", "squid"])
def http_proxy(request, tmp_path):
    """Starts an HTTP proxy of each kind in turn (Debian's tinyproxy and
    squid), as `tinyproxy` does."""
    started = []

    def start(**options):
        started.append(request.param(tmp_path, **options))
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
    def test_through_the_proxy_named(self, tls_api, http_proxy, run_agent, how):
        api, ca_file = tls_api
        proxy = http_proxy()
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
            self, tls_api, http_proxy, run_agent):
        api, ca_file = tls_api
        proxy = http_proxy(connect_ports=[443])
        proc = run_agent(api.url, "--ca-file", ca_file, https_proxy=proxy.url)
        proc.wait_log(f"the proxy {proxy.url} refused CONNECT to 127.0.0.1:"
                      f"{api.port} (403 {proxy.refused}): ask for port "
                      f"{api.port} to be allowed, or serve the API on 443", 15)
        assert api.connects == []

    def test_credentials_go_to_the_proxy_and_nowhere_else(
            self, tls_api, http_proxy, run_agent):
        api, ca_file = tls_api
        proxy = http_proxy(auth=("chatops", "s3cret-pw"))
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

    def test_check_takes_the_same_proxy(self, tls_api, api, http_proxy):
        tls, ca_file = tls_api
        proxy = http_proxy()
        env = clean_env(CHATOPS_API_KEY=KEY, https_proxy=proxy.url,
                        http_proxy=proxy.url)
        result = run_cli("--check", "--api-url", tls.url, "--ca-file", ca_file,
                         env=env)
        assert result.returncode == 0, result.stdout
        # /health, the key, and the WebSocket, each through the tunnel
        assert proxy.connects() == [f"127.0.0.1:{tls.port}"] * 3
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


def fresh_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proc, name, log, timeout_s=15):
    """Wait until `proc`, a server started for a test, accepts connections
    on 127.0.0.1:`port`; fail with `log()` if it exits first, or never does."""
    def listening():
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited: {log()}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, timeout_s, log)


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


def docker(*args, check=True):
    return subprocess.run(["docker", *args], capture_output=True, text=True,
                          timeout=60, check=check)


def docker_state(name):
    return docker(
        "container", "inspect", "--format", "{{.State.Status}}", name
    ).stdout.strip()


def fake_docker(tmp_path, body):
    """A docker CLI that is a shell script: `body` is its case of "$1"."""
    path = tmp_path / "fake-docker"
    path.write_text(f'#!/bin/sh\ncase "$1" in\n{body}\nesac\n')
    path.chmod(0o755)
    return str(path)


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


def send(api, kind, request_id, id_field="request_id", **fields):
    api.send_all(json.dumps({"type": kind, id_field: request_id, **fields}))


def docker_cli_running(verb, name):
    """True while the agent's `docker VERB ... -- NAME` runs."""
    return any(f"docker {verb} " in cmdline and cmdline.rstrip().endswith(f"-- {name}")
               for members in process_groups().values() for _, _, cmdline in members)


# A container that stops at once on SIGTERM (a PID 1 without a handler ignores it).
STOPS_ON_TERM = "trap 'exit 0' TERM; while :; do sleep 0.1; done"


class TestRequests:
    """Lanes, deadlines and cancel, as a user of the ChatOps web UI meets them:
    the API waits 10 s for a reply and drops a later one."""

    def test_a_late_reply_is_still_sent_and_logged_as_late(self, commander):
        cmd = commander("--request-deadline-s", "0.5")
        reply = cmd.run("sleep 1; echo done")
        assert reply["data"]["output"] == "done\n"
        assert "later than the API waits (0.5 s)" in cmd.proc.log()


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

    def test_one_ping_for_the_samples_sent_before_it_not_one_per_pong(self):
        """An answered ping still counts: the next ping waits for the next
        sample. (Each pong called for another ping, thousands a second to
        an API that does not acknowledge; issue 29, found behind HAProxy.)"""
        box = Queues(10)
        box.samples.add({"n": 0})
        assert taken(box)["type"] == "metrics"
        assert taken(box) == {"type": "ping"}
        box.samples.pong_received()
        assert box.samples.proof.mode == agent.ReadProof.NO_ACKS
        assert taken(box) is None
        box.samples.add({"n": 1})
        assert taken(box)["type"] == "metrics"
        assert taken(box) == {"type": "ping"}
        assert taken(box) is None

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
        with pytest.raises(agent.SpoolHeld, match="another agent uses the spool"):
            second.open(100)
        first.samples.close()

    def test_a_second_agent_on_the_state_directory_does_not_start(
            self, api, run_agent, tmp_path):
        """Two agents of one state_dir most likely share the key, and the API
        keeps one connection per key: the second one would cut the first off
        from the UI's commands. It stops before it connects, and says why."""
        state = str(tmp_path / "state")
        first = run_agent(api.url, "--state-dir", state)
        wait_until(api.metrics, 6, first.log)
        second = subprocess.run(
            [sys.executable, AGENT, "--api-url", api.url, "--state-dir", state],
            env=clean_env(CHATOPS_API_KEY=KEY), capture_output=True, text=True,
            timeout=30)
        assert second.returncode == 1
        assert f"another agent uses the spool {state}/" in second.stderr
        assert "a second agent would cut the first off from the web UI's " \
            "commands" in second.stderr
        assert "--check never authenticates" in second.stderr
        with api.lock:
            assert len(api.connects) == 1
        assert Commander(api, first).run("true")["data"]["exit_code"] == 0

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


###############################################################################
# The file's own rules ########################################################
###############################################################################


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
