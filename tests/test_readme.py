"""The README, run as written: every command block, in a booted Debian image.
"""

import os
import re
import shutil
import subprocess

import pytest


from test_chatops_agent import (  # the fast suite's helpers
    AGENT,
    KEY,
    clean_env,
    docker,
    wait_until,
)
from conftest import (
    CHECK_LINE,
    FileServer,
    PackageIndex,
    booted,
    need_bundle,
)


@pytest.fixture
def systemd_box(image):
    """The Debian 12 image booted with systemd."""
    with booted(image) as name:
        yield name


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
TESTS = "python3 -m pytest -q --timeout 180 test_chatops_agent.py tests"
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
