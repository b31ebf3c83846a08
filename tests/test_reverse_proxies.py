"""The API behind a reverse proxy, as companies run it: Debian's nginx and
HAProxy on 127.0.0.1 terminating TLS with a test CA, the test API behind
them in plain HTTP, at the root or under a path; asking for a client
certificate; cutting idle connections; and nginx without the lines a
WebSocket needs, the commonest mistake.
"""

import os
import re
import shutil
import subprocess
import time

import pytest

import chatops_agent as agent
from test_chatops_agent import (  # the fast suite's helpers
    KEY,
    AgentProcess,
    Commander,
    FakeAPI,
    clean_env,
    fresh_port,
    mutual_tls,
    need_module,
    require,
    run_cli,
    wait_listening,
    wait_until,
)


class ReverseProxy:
    """A reverse proxy started for a test on 127.0.0.1, in front of `backend`
    (a test API), TLS here with a certificate for 127.0.0.1 from a test CA
    (`ca_file`). `client_ca`: ask for a client certificate, and accept
    those of that CA file only. Subclasses write their configuration and
    say how to run it."""

    name = program = package = ""

    def __init__(self, workdir, backend, client_ca=None):
        binary = shutil.which(self.program) or f"/usr/sbin/{self.program}"
        require(os.access(binary, os.X_OK), f"no {self.name} (apt-get install "
                f"{self.package}; .ci/run installs it)")
        trustme = need_module("trustme")
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        self.dir = workdir
        os.makedirs(self.dir, exist_ok=True)
        self.files = {name: os.path.join(self.dir, name) for name in (
            "ca.pem", "cert.pem", "key.pem", "both.pem", "proxy.conf", "proxy.log")}
        ca.cert_pem.write_to_path(self.files["ca.pem"])
        leaf.private_key_and_cert_chain_pem.write_to_path(self.files["both.pem"])
        leaf.cert_chain_pems[0].write_to_path(self.files["cert.pem"])
        leaf.private_key_pem.write_to_path(self.files["key.pem"])
        self.ca_file = self.files["ca.pem"]
        self.port = fresh_port()
        with open(self.files["proxy.conf"], "w") as f:
            f.write(self.configuration(backend, client_ca))
        with open(self.files["proxy.log"], "w") as log:
            self.proc = subprocess.Popen(
                [binary, *self.arguments()], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT)
        wait_listening(self.port, self.proc, self.name, self.log)

    def log(self):
        with open(self.files["proxy.log"]) as f:
            return f.read()[-2000:]

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Nginx(ReverseProxy):
    """nginx, under `prefix`; `upgrade=False` leaves out the two headers that
    pass a WebSocket upgrade on (Upgrade, Connection). Connections quiet
    for `idle_s` from the API are cut (proxy_read_timeout)."""

    name, program, package = "nginx", "nginx", "nginx-light"

    def __init__(self, workdir, backend, prefix="", upgrade=True, idle_s=45,
                 client_ca=None):
        self.prefix, self.upgrade, self.idle_s = prefix, upgrade, idle_s
        super().__init__(workdir, backend, client_ca)
        self.url = f"https://127.0.0.1:{self.port}{prefix}"

    def arguments(self):
        return ["-c", self.files["proxy.conf"], "-p", self.dir + "/",
                "-e", self.files["proxy.log"]]

    def configuration(self, backend, client_ca):
        # HTTP/1.1 either way: the test API of Python 3.8's websockets answers
        # no HTTP/1.0 request at all, where the ChatOps API's uvicorn does.
        passing = ("      proxy_set_header Upgrade $http_upgrade;\n"
                   '      proxy_set_header Connection "upgrade";\n'
                   ) if self.upgrade else ""
        verify = (f"    ssl_client_certificate {client_ca};\n"
                  "    ssl_verify_client on;\n") if client_ca else ""
        return f"""
user root;
daemon off;
worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.files["proxy.log"]} info;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {self.dir}/body;
  proxy_temp_path {self.dir}/proxy;
  fastcgi_temp_path {self.dir}/fastcgi;
  uwsgi_temp_path {self.dir}/uwsgi;
  scgi_temp_path {self.dir}/scgi;
  server {{
    listen 127.0.0.1:{self.port} ssl;
    ssl_certificate {self.files["both.pem"]};
    ssl_certificate_key {self.files["key.pem"]};
{verify}    location {self.prefix}/ {{
      proxy_pass http://127.0.0.1:{backend.port}/;
      proxy_http_version 1.1;
{passing}      proxy_read_timeout {self.idle_s}s;
    }}
  }}
}}
"""


class HAProxy(ReverseProxy):
    """HAProxy in HTTP mode, which passes a WebSocket upgrade on by itself;
    an upgraded connection idle for `idle_s` is cut (timeout tunnel)."""

    name, program, package = "HAProxy", "haproxy", "haproxy"

    def __init__(self, workdir, backend, idle_s=45, client_ca=None):
        self.idle_s = idle_s
        super().__init__(workdir, backend, client_ca)
        self.url = f"https://127.0.0.1:{self.port}"

    def arguments(self):
        return ["-db", "-f", self.files["proxy.conf"]]

    def configuration(self, backend, client_ca):
        verify = f" verify required ca-file {client_ca}" if client_ca else ""
        return f"""
global
  maxconn 64
  log stderr format raw local0 info
defaults
  mode http
  log global
  option httplog
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout tunnel {self.idle_s}s
frontend api
  bind 127.0.0.1:{self.port} ssl crt {self.files["both.pem"]}{verify}
  default_backend chatops
backend chatops
  server api 127.0.0.1:{backend.port}
"""


@pytest.fixture
def behind(tmp_path):
    """Starts a reverse proxy (Nginx or HAProxy) in front of a test API
    answering as uvicorn does; (proxy, api); both stopped after the test.
    `ack=False`: an API that never acknowledges metrics, so that only the
    agent's heartbeat has the API say anything on an idle connection."""
    started = []

    def start(kind, ack=True, **options):
        api = FakeAPI(deflate="uvicorn", ack=ack).start()
        started.append(api)
        proxy = kind(str(tmp_path / f"{kind.name}{len(started)}"), api, **options)
        started.append(proxy)
        return proxy, api

    yield start
    for thing in reversed(started):
        (thing.close if isinstance(thing, ReverseProxy) else thing.stop)()


QUIET_MINUTES_S = 600  # how long each agent must keep its one connection
IDLE_CUT_S = 45  # after which the proxies cut a connection on which the API is quiet
METRICS_INTERVAL_S = next(s.default for s in agent.SETTINGS
                          if s.name == "metrics_interval_s")


class QuietMinutes:
    """A watch (tests/conftest.py, `alongside`): two agents at their
    defaults, one behind nginx and one behind HAProxy, each cutting a
    connection quiet for IDLE_CUT_S, each agent with a test API of its own
    (which acknowledges samples, as the ChatOps API does). Docker is off in
    them: the engine is the Docker tests' to use meanwhile."""

    def __init__(self, workdir):
        self.runs, self.things = [], []
        try:
            for kind in (Nginx, HAProxy):
                api = FakeAPI(deflate="uvicorn").start()
                self.things.append(api)
                proxy = kind(str(workdir / kind.name), api, idle_s=IDLE_CUT_S)
                self.things.append(proxy)
                watched = AgentProcess(
                    workdir, "--api-url", proxy.url, "--ca-file", proxy.ca_file,
                    "--docker-enabled", "false", env=clean_env(CHATOPS_API_KEY=KEY))
                self.things.append(watched)
                self.runs.append((kind.name, api, watched))
        except BaseException:
            self.close()
            raise

    def broken(self):
        """What went wrong so far: a second connection, a lost one."""
        return [f"{name}: {len(api.connects)} connections:\n{watched.log()[-1500:]}"
                for name, api, watched in self.runs
                if len(api.connects) > 1 or "connection lost" in watched.log()]

    def close(self):
        for thing in reversed(self.things):
            if isinstance(thing, AgentProcess):
                thing.terminate()
            else:
                (thing.close if isinstance(thing, ReverseProxy) else thing.stop)()


@pytest.fixture
def behind_nginx(behind):
    return lambda **options: behind(Nginx, **options)


class TestBehindReverseProxies:
    @pytest.mark.parametrize("kind, prefix", [
        (Nginx, ""), (Nginx, "/chatops"), (HAProxy, "")])
    def test_the_agent_connects_and_works_through_it(self, behind, run_agent,
                                                       kind, prefix):
        """TLS ends at the proxy, plain HTTP behind it, at the root or under a
        path: the agent connects, compression is agreed through the proxy, a
        command runs, samples flow, and --check passes every line."""
        proxy, api = behind(kind, **({"prefix": prefix} if prefix else {}))
        proc = run_agent(proxy.url, "--ca-file", proxy.ca_file)
        wait_until(lambda: len(api.metrics()) >= 2, 15, proc.log)
        assert f"connected to wss://127.0.0.1:{proxy.port}{prefix}{agent.WS_PATH}" \
            in proc.log()
        assert "frames: permessage-deflate" in proc.log()
        assert Commander(api, proc).run("true")["data"]["exit_code"] == 0
        check = run_cli("--check", "--api-url", proxy.url, "--ca-file", proxy.ca_file,
                        env=clean_env(CHATOPS_API_KEY=KEY))
        assert check.returncode == 0, check.stdout
        assert "ok   WebSocket opened at wss://" in check.stdout

    @pytest.mark.parametrize("kind", [Nginx, HAProxy])
    def test_a_proxy_that_cuts_sooner_than_the_api_speaks_is_named(
            self, behind, run_agent, kind):
        """A proxy whose idle timeout (3 s here) is shorter than the quiet
        between what the API says (a sample every 10 s, a heartbeat every
        30): the agent says the connection went quiet before it was cut,
        and which settings on either side mend it."""
        proxy, api = behind(kind, ack=False, idle_s=3)
        proc = run_agent(proxy.url, "--ca-file", proxy.ca_file,
                         "--metrics-interval-s", "10")
        proc.wait_log("connection lost: ", 20)
        line = next(x for x in proc.log().splitlines() if "connection lost" in x)
        quiet = float(re.search(r"after (\d+\.\d) s with nothing from the API", line)
                      .group(1))
        assert 2.5 <= quiet < 10, line
        assert "make its idle timeout longer than the agent's heartbeat (30 s; " \
            "HAProxy: timeout tunnel, nginx: proxy_read_timeout), or set " \
            "heartbeat_interval_s below it" in line

    @pytest.mark.parametrize("kind", [Nginx, HAProxy])
    def test_a_client_certificate_asked_by_the_proxy(self, behind, run_agent,
                                                     tmp_path, kind):
        """The proxy asks for a client certificate (nginx ssl_verify_client
        on; HAProxy verify required): without one the agent says to set
        it, one of another CA is named as refused, the right one connects
        and --check names it (issue 29, goal 3). nginx finishes the TLS
        handshake either way and says it in a page of status 400, which
        the agent must not take for an upgrade not passed on."""
        _, client_ca, cert, key = mutual_tls(tmp_path)
        proxy, api = behind(kind, client_ca=client_ca)
        without = run_agent(proxy.url, "--ca-file", proxy.ca_file)
        without.wait_log("the API's TLS asks for a client certificate and none was "
                         "given: set tls_client_cert and tls_client_key", 15)
        assert "did not pass the WebSocket upgrade" not in without.log()
        assert api.connects == []
        (tmp_path / "other").mkdir()
        _, _, stranger, stranger_key = mutual_tls(tmp_path / "other")  # another CA's
        refused = run_agent(proxy.url, "--ca-file", proxy.ca_file,
                            "--tls-client-cert", stranger,
                            "--tls-client-key", stranger_key)
        refused.wait_log(f"the API refused the client certificate {stranger} (", 15)
        assert api.connects == []
        proc = run_agent(proxy.url, "--ca-file", proxy.ca_file,
                         "--tls-client-cert", cert, "--tls-client-key", key)
        wait_until(lambda: len(api.metrics()) >= 2, 15, proc.log)
        assert Commander(api, proc).run("true")["data"]["exit_code"] == 0
        check = run_cli("--check", "--api-url", proxy.url, "--ca-file", proxy.ca_file,
                        "--tls-client-cert", cert, "--tls-client-key", key,
                        env=clean_env(CHATOPS_API_KEY=KEY))
        assert check.returncode == 0, check.stdout
        assert "commonName=agent-7" in check.stdout, check.stdout

    @pytest.mark.alongside.with_args(QuietMinutes)  # a class: not marked itself
    @pytest.mark.timeout(QUIET_MINUTES_S + 120)  # when run alone
    def test_ten_minutes_on_one_connection_through_proxies_that_cut_at_45_s(
            self, alongside):
        """An agent at its defaults keeps one connection for ten minutes
        behind nginx (proxy_read_timeout 45s) and HAProxy (timeout tunnel
        45s): what the API says (acknowledgements, pongs to the heartbeat)
        never leaves it quiet that long. It runs beside the other tests of
        tests/ (QuietMinutes), and then still answers a command."""
        watch = alongside
        for _, api, watched in watch.runs:
            wait_until(lambda api=api: api.connects, 30, watched.log)
        until = max(api.connects[0] for _, api, _ in watch.runs) + QUIET_MINUTES_S
        # Usually over already: the other tests took longer than ten minutes.
        wait_until(lambda: watch.broken() or time.monotonic() >= until,
                   max(until - time.monotonic(), 0) + 30, "ten minutes")
        assert watch.broken() == []
        for name, api, watched in watch.runs:
            held = time.monotonic() - api.connects[0]
            samples = len(api.metrics())
            print(f"{name}: one connection for {held:.0f} s, {samples} samples")
            assert samples >= held / METRICS_INTERVAL_S - 3
            assert Commander(api, watched).run("true")["data"]["exit_code"] == 0

    def test_an_nginx_that_does_not_pass_the_upgrade_is_named(self, behind_nginx,
                                                               run_agent):
        """The commonest mistake: /health and the key pass through nginx,
        the WebSocket does not. The log and --check say so, and give the
        lines that fix it."""
        nginx, api = behind_nginx(upgrade=False)
        fix = ('proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; '
               'proxy_set_header Connection "upgrade";')
        proc = run_agent(nginx.url, "--ca-file", nginx.ca_file)
        proc.wait_log("a reverse proxy (nginx", 15)
        assert fix in proc.log()
        assert not api.messages()
        check = run_cli("--check", "--api-url", nginx.url, "--ca-file", nginx.ca_file,
                        env=clean_env(CHATOPS_API_KEY=KEY))
        assert check.returncode == 1
        assert "ok   API key accepted" in check.stdout
        line = next(x for x in check.stdout.splitlines() if "WebSocket at" in x)
        assert line.startswith("FAIL WebSocket at wss://") and fix in line
        assert "did not pass the WebSocket upgrade on" in line
