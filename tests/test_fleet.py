"""A fleet, through the Ansible role (deploy/ansible), and the role's README
run as written, on Debian hosts in containers.
"""

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import shutil
import subprocess
import termios
import threading
import time

import pytest

import chatops_agent as agent
from test_chatops_agent import (  # the fast suite's helpers
    AGENT,
    FakeAPI,
    KEY,
    clean_env,
    docker,
    require,
    wait_until,
)
from conftest import (
    FileServer,
    PackageIndex,
    booted,
    bundle_of,
    debian_image,
    in_box,
    need_bundle,
)


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


PROXY_PASSWORD = "pr0xy-pw"  # a secret like the key: in no output, on no command line


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
        with KeyWatch(KEY, "not-the-key", PROXY_PASSWORD) as watch:
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
        assert PROXY_PASSWORD not in output
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
                                                                   tmp_path, tinyproxy):
        """The URL path: each host downloads the published directory itself
        (get_url), with neither curl nor wget, and pip's only index a
        recording stand-in for PyPI; a host first installed from a bundle
        gets the published release; check mode previews and changes
        nothing; a wrong variable stops the play before any task. The last
        host's service reaches its API through a proxy that wants a
        password (chatops_agent_proxy; issue 29, goal 1)."""
        apis = {host: FakeAPI(key=KEY).start() for host in fleet}
        inventory, hosts, write_inventory = self.inventory(tmp_path, fleet, apis)
        proxy = tinyproxy(auth=("chatops", PROXY_PASSWORD))
        hosts[fleet[3]].update(
            chatops_agent_proxy=proxy.url.replace("//", f"//chatops:{PROXY_PASSWORD}@"),
            chatops_agent_settings={"metrics_interval_s": 1, "allow_plaintext": True})
        write_inventory()
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
                assert set(proxy.connects()) == {f"127.0.0.1:{apis[fleet[3]].port}"}
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
