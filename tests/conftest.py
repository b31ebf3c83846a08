"""What the suites in tests/ share: fixtures that start real systems (the
Docker engine's containers, booted Debian images), the file and package
servers the installer's tests publish on, and the fast suite's own fixtures
(the test API, agent processes), which they reuse.

The fast suite is test_chatops_agent.py at the top of the checkout; its
helpers (FakeAPI, wait_until, ...) are imported from it.
"""

import contextlib
import functools
import hashlib
import http.server
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time

import pytest

# The agent and the fast suite are at the top of the checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import chatops_agent as agent
from test_chatops_agent import (  # noqa: F401  its fixtures, for tests/ too
    api,
    commander,
    run_agent,
    stop_signals_at_their_defaults,
    tinyproxy,
)

from test_chatops_agent import (  # the fast suite's helpers
    TEST_IMAGE,
    docker,
    docker_ready,
    require,
    wait_until,
)


# Tests of minutes (a connection held for ten) -------------------------------
#
# Such a test is marked `alongside(Watch)`. Its Watch (a class taking a work
# directory, with close()) starts with the first test of tests/, so that its
# minutes pass while the other tests run; the test itself runs last, and
# only checks what the watch saw. CHATOPS_TEST_MINUTES=0 leaves them to
# another pass (.ci/run runs them once, in its first pass).

MINUTES_LEFT = ("the tests of minutes are left to another pass "
                "(CHATOPS_TEST_MINUTES=0)")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "alongside(watch): a test of minutes, whose watch starts with "
        "the first test of tests/ and which runs last (tests/conftest.py)")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.get_closest_marker("alongside") is not None)


@pytest.fixture(scope="session", autouse=True)
def watches(request, tmp_path_factory):
    """Each selected `alongside` test's watch, started now, by node id; a
    watch that could not start is kept as its exception, for its own test
    to raise (it must not fail the tests it runs beside)."""
    started = {}
    if os.environ.get("CHATOPS_TEST_MINUTES") != "0":
        for item in request.session.items:
            marker = item.get_closest_marker("alongside")
            if marker:
                try:
                    started[item.nodeid] = marker.args[0](
                        tmp_path_factory.mktemp("alongside"))
                except BaseException as e:  # noqa: BLE001 -- a skip too: its test's
                    started[item.nodeid] = e
    yield started
    for watch in started.values():
        if not isinstance(watch, BaseException):
            watch.close()


@pytest.fixture
def alongside(request, watches):
    """This test's watch, running since the first test of tests/."""
    require(os.environ.get("CHATOPS_TEST_MINUTES") != "0", MINUTES_LEFT)
    watch = watches[request.node.nodeid]
    if isinstance(watch, BaseException):
        raise watch
    return watch


@pytest.fixture(scope="session")
def docker_engine():
    require(os.environ.get("CHATOPS_TEST_DOCKER_ENGINE") != "0",
            "the Docker engine tests are left to another pass "
            "(CHATOPS_TEST_DOCKER_ENGINE=0)")
    ready = docker_ready()
    required = os.environ.get("CHATOPS_TEST_REQUIRE_DOCKER")
    require(ready or not required, "no Docker engine, and CI requires one")
    require(ready, "no Docker engine with the test image")


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


def listed(server, name):
    """The container `name` in the latest metrics sample `server` (a FakeAPI)
    has, if it is there."""
    latest = server.metrics()[-1]["containers"] if server.metrics() else []
    return next((c for c in latest if c["name"] == name), None)


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


CHECK_LINE = ("runuser -u chatops-agent -- /opt/chatops-agent/venv/bin/python "
              "/opt/chatops-agent/chatops_agent.py --check "
              "--config /etc/chatops-agent/config.json")


@pytest.fixture
def image(docker_engine):
    """A fresh Debian 12 (debootstrap minbase with python3, python3-venv and
    systemd), imported as an image by .ci/run."""
    return debian_image("12")


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
