"""Tests of chatops_agent.py against real things: a WebSocket server on 127.0.0.1,
real agent processes, real files and this machine's /proc.

Run: python3 -m pytest -q test_chatops_agent.py
"""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import venv
import zipfile

import pytest

import chatops_agent as agent

try:
    import psutil
except ImportError:
    psutil = None

from websockets.exceptions import ConnectionClosed
from websockets.http11 import Response
from websockets.datastructures import Headers
from websockets.sync.server import serve

AGENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chatops_agent.py")
KEY = "test-key-7f3a9c1e5b2d"
SERVER_ID = "0b7c1a52-5d1e-4c55-9a43-6f0b6b1c9e21"


###############################################################################
# Helpers #####################################################################
###############################################################################

def wait_until(predicate, timeout_s=10.0, what="condition"):
    """Poll `predicate` until it is true; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out after %.1f s waiting for %s" % (timeout_s, what))


def require(condition, reason):
    """Skip with a reason locally; in CI what the test needs must be there."""
    if condition:
        return
    if os.environ.get("CI") and reason not in os.environ.get("CHATOPS_TEST_EXPECT_MISSING", ""):
        pytest.fail("CI must provide this: " + reason)
    pytest.skip(reason)


def clean_env(**extra):
    """The environment for an agent process: no proxies, no CHATOPS_ leftovers."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CHATOPS_") and "proxy" not in k.lower()}
    env.update(extra)
    return env


def parse_ts(text):
    return time.mktime(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")) + float(text[19:-1] or 0)


###############################################################################
# A fake ChatOps API ##########################################################
###############################################################################

class FakeAPI:
    """The ChatOps API's WebSocket side, as PROTOCOL.md describes it, on 127.0.0.1.

    Records every frame as (connection number, message). Can reject keys with
    close 1008, stop acknowledging, go silent, drop connections, and stop and
    start again on the same port. Answers GET /health and /api/v1/api-keys/me.
    """

    def __init__(self, key=KEY, ack=True, ssl_context=None):
        self.key = key
        self.ack = ack
        self.silent = False
        self.ssl_context = ssl_context
        self.port = 0
        self.frames = []
        self.connections = []        # live server connections
        self.connects = []           # monotonic time of each accepted TCP+WS connection
        self.closes = []             # (code, reason) the agent closed with
        self.rejections = 0
        self.lock = threading.Lock()
        self.server = None

    # -- lifecycle -------------------------------------------------------------
    def start(self):
        self.server = serve(self._handle, "127.0.0.1", self.port, ssl=self.ssl_context,
                            process_request=self._http, ping_interval=None)
        self.port = self.server.socket.getsockname()[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self.server.shutdown()
        self.drop()

    def drop(self):
        """Break every connection without a close handshake, like a crashed server."""
        with self.lock:
            conns, self.connections = list(self.connections), []
        for conn in conns:
            try:
                conn.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def url(self):
        return "%s://127.0.0.1:%d" % ("https" if self.ssl_context else "http", self.port)

    # -- what it saw -----------------------------------------------------------
    def messages(self, kind=None):
        with self.lock:
            return [m for _, m in self.frames if kind is None or m.get("type") == kind]

    def metrics(self):
        return [m["data"] for m in self.messages("metrics")]

    # -- the server ------------------------------------------------------------
    def _http(self, connection, request):
        if request.path == "/health":
            return self._json(200, {"status": "healthy"})
        if request.path == "/api/v1/api-keys/me":
            if request.headers.get("X-API-Key") != self.key:
                return self._json(401, {"detail": "Invalid API key"})
            return self._json(200, {"server_id": SERVER_ID, "key_id": "k1", "name": "test",
                                    "is_active": True})
        return None

    @staticmethod
    def _json(status, body):
        data = json.dumps(body).encode()
        return Response(status, "OK" if status == 200 else "Unauthorized",
                        Headers([("Content-Type", "application/json"),
                                 ("Content-Length", str(len(data)))]), data)

    def _handle(self, conn):
        with self.lock:
            number = len(self.connects)
            self.connects.append(time.monotonic())
            self.connections.append(conn)
        try:
            if not self._authenticate(conn, number):
                return
            for raw in conn:
                self._on_frame(conn, number, raw)
        except ConnectionClosed:
            pass
        finally:
            if conn.close_code is not None:
                with self.lock:
                    self.closes.append((conn.close_code, conn.close_reason))

    def _authenticate(self, conn, number):
        first = json.loads(conn.recv())
        with self.lock:
            self.frames.append((number, first))
        if first.get("type") != "auth" or first.get("api_key") != self.key:
            with self.lock:
                self.rejections += 1
            conn.close(1008, "Invalid or inactive API key")
            return False
        conn.send(json.dumps({"type": "auth_success", "server_id": SERVER_ID,
                              "message": "Connected successfully"}))
        return True

    def _on_frame(self, conn, number, raw):
        message = json.loads(raw)
        with self.lock:
            self.frames.append((number, message))
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


class AgentProcess:
    """chatops_agent.py in a subprocess, its log in a file we can read while it runs."""

    def __init__(self, tmp_path, *args, env=None):
        self.log_path = tmp_path / ("agent-%d.log" % time.monotonic_ns())
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, AGENT, *args], env=env or clean_env(),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.log_file, text=True)

    def log(self):
        return self.log_path.read_text()

    def wait_log(self, text, timeout_s=10.0):
        wait_until(lambda: text in self.log(), timeout_s, "%r in the agent's log:\n%s"
                   % (text, self.log()[-2000:]))

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
        flags = ["--api-url", url, "--metrics-interval-s", "0.5", "--top-processes", "3",
                 *args]
        extra = {"CHATOPS_API_KEY": key} if key else {}
        proc = AgentProcess(tmp_path, *flags, env=clean_env(**extra, **env))
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.terminate()


def run_cli(*args, env=None, timeout=30):
    return subprocess.run([sys.executable, AGENT, *args], env=env or clean_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


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
        path = write_config(tmp_path, {"metrics_interval_s": 3, "heartbeat_interval_s": 7,
                                       "buffer_size": 10})
        env = {"CHATOPS_CONFIG": path, "CHATOPS_METRICS_INTERVAL_S": "2",
               "CHATOPS_HEARTBEAT_INTERVAL_S": "9"}
        config = agent.load_config({"metrics_interval_s": "1"}, env)
        assert config.metrics_interval_s == 1.0 and config.sources["metrics_interval_s"] == "flag"
        assert config.heartbeat_interval_s == 9.0
        assert config.sources["heartbeat_interval_s"] == "env CHATOPS_HEARTBEAT_INTERVAL_S"
        assert config.buffer_size == 10 and config.sources["buffer_size"] == "file " + path
        assert config.top_processes == 25 and config.sources["top_processes"] == "default"

    def test_go_agent_single_dash_flags(self, tmp_path):
        path = write_config(tmp_path, {"log_level": "debug"})
        args = agent.build_parser().parse_args(
            ["-api-key", "abc", "-api-url", "https://api.example.com", "-config", path])
        config = agent.load_config(agent.flags_given(args), {})
        assert (config.api_key, config.api_url, config.log_level) == \
            ("abc", "https://api.example.com", "debug")

    def test_bool_from_env_and_file(self, tmp_path):
        path = write_config(tmp_path, {"tls_skip_verify": True})
        config = agent.load_config({}, {"CHATOPS_CONFIG": path,
                                        "CHATOPS_ALLOW_PLAINTEXT": "yes"})
        assert config.tls_skip_verify is True and config.allow_plaintext is True

    @pytest.mark.parametrize("content, message", [
        ({"metrics_interval": 5}, "unknown key 'metrics_interval' (did you mean "
                                  "'metrics_interval_s'?)"),
        ({"buffer_size": "720"}, "buffer_size must be a whole number"),
        ({"tls_skip_verify": 1}, "tls_skip_verify must be true or false"),
        ({"metrics_interval_s": -5}, "metrics_interval_s must be positive"),
        ({"heartbeat_interval_s": 0}, "heartbeat_interval_s must be positive"),
        ({"log_level": "loud"}, "log_level must be one of"),
        ({"api_url": "ftp://x"}, "is not a URL the agent can use"),
        ([1, 2], "must hold a JSON object"),
    ])
    def test_bad_file_values(self, tmp_path, content, message):
        path = write_config(tmp_path, content)
        with pytest.raises(agent.ConfigError, match=message.replace("(", r"\(")
                           .replace(")", r"\)").replace("?", r"\?")):
            agent.load_config({"config": path}, {})

    def test_invalid_json_names_line_and_column(self, tmp_path):
        path = write_config(tmp_path, None, raw='{\n  "api_url": "http://x",\n  oops\n}')
        with pytest.raises(agent.ConfigError, match="not valid JSON: .* at line 3 column 3"):
            agent.load_config({"config": path}, {})

    def test_unreadable_file(self, tmp_path):
        with pytest.raises(agent.ConfigError, match="cannot read config file .*missing.json"):
            agent.load_config({"config": str(tmp_path / "missing.json")}, {})

    def test_bad_env_value(self):
        with pytest.raises(agent.ConfigError,
                           match="environment variable CHATOPS_BUFFER_SIZE: buffer_size"):
            agent.load_config({}, {"CHATOPS_BUFFER_SIZE": "lots"})

    def test_key_file_readable_by_others_refused_like_ssh(self, tmp_path):
        path = write_config(tmp_path, {"api_key": "k"}, mode=0o644)
        with pytest.raises(agent.ConfigError, match="chmod 600 " + path):
            agent.load_config({"config": path}, {})
        os.chmod(path, 0o600)
        assert agent.load_config({"config": path}, {}).api_key == "k"

    def test_world_readable_file_without_key_is_fine(self, tmp_path):
        path = write_config(tmp_path, {"buffer_size": 5}, mode=0o644)
        assert agent.load_config({"config": path}, {}).buffer_size == 5

    def test_plaintext_to_remote_host_refused(self):
        with pytest.raises(agent.ConfigError, match="--allow-plaintext"):
            agent.load_config({"api_url": "http://192.0.2.10:8000"}, {})
        with pytest.raises(agent.ConfigError, match="in clear"):
            agent.load_config({"api_url": "ws://api.example.com/ws"}, {})
        allowed = agent.load_config({"api_url": "http://192.0.2.10", "allow_plaintext": True}, {})
        assert allowed.allow_plaintext
        for url in ("http://localhost:8000", "http://127.0.0.2", "ws://[::1]:9/x",
                    "https://api.example.com"):
            agent.load_config({"api_url": url}, {})

    def test_bad_config_exits_2_with_one_message(self, tmp_path):
        path = write_config(tmp_path, {"nope": 1})
        result = run_cli("--config", path, "--once")
        assert result.returncode == 2
        assert result.stdout == ""
        assert result.stderr.count("\n") == 1 and "unknown key 'nope'" in result.stderr

    def test_plaintext_refused_at_start_before_any_connection(self):
        result = run_cli("--api-url", "http://192.0.2.10:8000",
                         env=clean_env(CHATOPS_API_KEY=KEY))
        assert result.returncode == 2
        assert "refusing plaintext URL http://192.0.2.10:8000" in result.stderr

    def test_print_config_redacts_key_and_names_sources(self, tmp_path):
        path = write_config(tmp_path, {"api_key": KEY, "buffer_size": 9})
        result = run_cli("--print-config", "--config", path, "--log-level", "debug",
                         env=clean_env(CHATOPS_API_URL="https://api.example.com"))
        assert result.returncode == 0, result.stderr
        assert KEY not in result.stdout + result.stderr
        shown = json.loads(result.stdout)
        assert shown["settings"]["api_key"] == {"value": "<redacted>", "source": "file " + path}
        assert shown["settings"]["api_url"]["source"] == "env CHATOPS_API_URL"
        assert shown["settings"]["log_level"] == {"value": "debug", "source": "flag"}
        assert shown["settings"]["buffer_size"]["value"] == 9

    def test_key_on_command_line_warns(self):
        result = run_cli("--print-config", "--api-key", KEY)
        assert "process list" in result.stderr and "CHATOPS_API_KEY" in result.stderr
        assert KEY not in result.stderr + result.stdout

    def test_missing_key_is_a_clear_error(self, api):
        result = run_cli("--api-url", api.url)
        assert result.returncode == 2 and "no API key" in result.stderr


class TestURLs:
    @pytest.mark.parametrize("given, expected", [
        ("http://localhost:8000", "ws://localhost:8000/api/v1/agents/ws"),
        ("http://localhost:8000/", "ws://localhost:8000/api/v1/agents/ws"),
        ("https://chatops.example.com", "wss://chatops.example.com/api/v1/agents/ws"),
        ("https://example.com/chatops/", "wss://example.com/chatops/api/v1/agents/ws"),
        ("ws://10.0.0.1:9000/custom/path", "ws://10.0.0.1:9000/custom/path"),
        ("wss://example.com", "wss://example.com/api/v1/agents/ws"),
        ("wss://example.com/api/v1/agents/ws", "wss://example.com/api/v1/agents/ws"),
    ])
    def test_ws_url(self, given, expected):
        assert agent.ws_url(given) == expected

    @pytest.mark.parametrize("given, expected", [
        ("http://localhost:8000/", "http://localhost:8000"),
        ("wss://example.com/api/v1/agents/ws", "https://example.com"),
        ("ws://example.com/other", "http://example.com"),
    ])
    def test_http_base(self, given, expected):
        assert agent.http_base(given) == expected

    @pytest.mark.parametrize("bad", ["localhost:8000", "ftp://x", "http://", "http://h:99999"])
    def test_bad_urls(self, bad):
        with pytest.raises(agent.ConfigError):
            agent.ws_url(bad)


class TestHelpers:
    def test_backoff_full_jitter_grows_to_cap_and_resets(self):
        backoff = agent.Backoff(1.0, 60.0)
        delays = [backoff.next_delay() for _ in range(12)]
        ceilings = [min(60.0, 2 ** i) for i in range(12)]
        assert all(0 <= d <= c for d, c in zip(delays, ceilings))
        assert max(agent.Backoff(1.0, 60.0).next_delay() for _ in range(50)) <= 1.0
        backoff.reset()
        assert backoff.next_delay() <= 1.0

    def test_utc_timestamps_are_rfc3339_z(self):
        stamp = agent.utc_now()
        assert len(stamp) == 24 and stamp.endswith("Z") and stamp[10] == "T"
        assert abs(parse_ts(stamp) - time.mktime(time.gmtime())) < 5

    def test_redact_filter(self):
        record = agent.logging.LogRecord("x", 20, "f", 1, "key is %s", (KEY,), None)
        agent.RedactFilter(KEY).filter(record)
        assert KEY not in record.getMessage()
