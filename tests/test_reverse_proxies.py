"""The API behind a reverse proxy, as companies run it: Debian's nginx on
127.0.0.1 terminating TLS with a test CA, the test API behind it in plain
HTTP, at the root or under a path; and nginx without the lines a WebSocket
needs, the commonest mistake.
"""

import os
import shutil
import socket
import subprocess

import pytest

import chatops_agent as agent
from test_chatops_agent import (  # the fast suite's helpers
    KEY,
    Commander,
    FakeAPI,
    clean_env,
    fresh_port,
    need_module,
    require,
    run_cli,
    wait_until,
)


class Nginx:
    """nginx in front of `backend` (a FakeAPI on 127.0.0.1), TLS here with a
    certificate for 127.0.0.1 from a test CA (`ca_file`), under `prefix`.
    `upgrade=False` leaves out the two headers that pass a WebSocket upgrade
    on (Upgrade, Connection)."""

    def __init__(self, workdir, backend, prefix="", upgrade=True):
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        require(os.access(binary, os.X_OK),
                "no nginx (apt-get install nginx-light; .ci/run installs it)")
        trustme = need_module("trustme")
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        self.dir = workdir
        os.makedirs(self.dir, exist_ok=True)
        files = {name: os.path.join(self.dir, name)
                 for name in ("ca.pem", "cert.pem", "key.pem", "nginx.conf")}
        ca.cert_pem.write_to_path(files["ca.pem"])
        leaf.private_key_and_cert_chain_pem.write_to_path(files["cert.pem"])
        leaf.private_key_pem.write_to_path(files["key.pem"])
        self.ca_file = files["ca.pem"]
        self.port = fresh_port()
        self.url = f"https://127.0.0.1:{self.port}{prefix}"
        # HTTP/1.1 either way: the test API of Python 3.8's websockets answers
        # no HTTP/1.0 request at all, where the ChatOps API's uvicorn does.
        passing = ("      proxy_set_header Upgrade $http_upgrade;\n"
                   '      proxy_set_header Connection "upgrade";\n') if upgrade else ""
        with open(files["nginx.conf"], "w") as f:
            f.write(f"""
user root;
daemon off;
worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log info;
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
    ssl_certificate {files["cert.pem"]};
    ssl_certificate_key {files["key.pem"]};
    location {prefix}/ {{
      proxy_pass http://127.0.0.1:{backend.port}/;
      proxy_http_version 1.1;
{passing}      proxy_read_timeout 45s;
    }}
  }}
}}
""")
        self.proc = subprocess.Popen(
            [binary, "-c", files["nginx.conf"], "-p", self.dir + "/",
             "-e", f"{self.dir}/error.log"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        wait_until(self._listening, 10, self.log)

    def _listening(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"nginx exited: {self.log()}")
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def log(self):
        try:
            with open(os.path.join(self.dir, "error.log")) as f:
                return f.read()[-2000:]
        except OSError:
            return "(no error.log)"

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def behind_nginx(tmp_path):
    """Starts nginx in front of a plain test API; (nginx, api); both stopped
    after the test."""
    started = []

    def start(**options):
        api = FakeAPI(deflate="uvicorn").start()
        started.append(api)
        proxy = Nginx(str(tmp_path / f"nginx{len(started)}"), api, **options)
        started.append(proxy)
        return proxy, api

    yield start
    for thing in reversed(started):
        (thing.close if isinstance(thing, Nginx) else thing.stop)()


class TestBehindNginx:
    @pytest.mark.parametrize("prefix", ["", "/chatops"])
    def test_the_agent_connects_and_works_through_it(self, behind_nginx, run_agent,
                                                       prefix):
        """TLS ends at nginx, plain HTTP behind it, at the root or under a
        path: the agent connects, compression is agreed through nginx, a
        command runs, samples flow, and --check passes every line."""
        nginx, api = behind_nginx(prefix=prefix)
        proc = run_agent(nginx.url, "--ca-file", nginx.ca_file)
        wait_until(lambda: len(api.metrics()) >= 2, 15, proc.log)
        assert f"connected to wss://127.0.0.1:{nginx.port}{prefix}{agent.WS_PATH}" \
            in proc.log()
        assert "frames: permessage-deflate" in proc.log()
        assert Commander(api, proc).run("true")["data"]["exit_code"] == 0
        check = run_cli("--check", "--api-url", nginx.url, "--ca-file", nginx.ca_file,
                        env=clean_env(CHATOPS_API_KEY=KEY))
        assert check.returncode == 0, check.stdout
        assert "ok   WebSocket opened at wss://" in check.stdout

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
