"""install.sh, for real: into a temporary root, on fresh Debian images in
containers, and under systemd booted as PID 1 in Debian 11, 12 and 13.
"""

import contextlib
import json
import os
import pathlib
import re
import shutil
import stat
import subprocess
import tempfile
import time
import venv

import pytest

import chatops_agent as agent

from test_chatops_agent import (  # the fast suite's helpers
    AGENT,
    Commander,
    KEY,
    clean_env,
    docker,
    require,
    tls_context,
    wait_until,
)
from conftest import (
    CHECK_LINE,
    DEBIAN_RELEASES,
    FileServer,
    PackageIndex,
    QuietFiles,
    booted,
    bundle_of,
    debian_image,
    in_box,
    need_bundle,
    sign_bundle,
)


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
        context, ca_file = tls_context(tmp_path)
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

    def test_a_proxy_carries_the_downloads_and_goes_to_the_service(
            self, system_root, tmp_path, tinyproxy):
        """--proxy (or CHATOPS_PROXY): install.sh's downloads go through it,
        and config.json gives it to the service, which sees no shell's
        https_proxy; its password is shown nowhere and kept off command
        lines (issue 29, goal 1)."""
        context, ca_file = tls_context(tmp_path)
        proxy = tinyproxy(auth=("chatops", "pr0xy-pw"))
        with_password = proxy.url.replace("//", "//chatops:pr0xy-pw@")
        alone = tmp_path / "alone" / "install.sh"  # as piped from curl
        alone.parent.mkdir()
        shutil.copy(INSTALLER, alone)
        served = tmp_path / "served"
        shutil.copytree(need_bundle(), served)

        def install(*args, **env):
            return installer("--root", str(system_root), "--api-url",
                             "https://chatops.example.com", *args, script=str(alone),
                             env=pypi_out_of_reach(CHATOPS_API_KEY=KEY,
                                                   CURL_CA_BUNDLE=str(ca_file), **env))

        with FileServer(served, context) as base_url:
            got = install("--base-url", base_url, CHATOPS_PROXY=with_password)
            assert got.returncode == 0, got.stderr
            port = base_url.rsplit(":", 1)[1]
            assert len(proxy.connects()) >= 3  # SHA256SUMS, the agent, the wheel
            assert set(proxy.connects()) == {f"127.0.0.1:{port}"}
            assert f"{base_url} through the proxy http://chatops:<redacted>@" \
                f"127.0.0.1:{proxy.port}" in got.stderr
            config = json.loads((system_root / "etc/chatops-agent/config.json")
                                .read_text())
            assert config["proxy"] == with_password
            wrong = install("--base-url", base_url, CHATOPS_PROXY=with_password
                            .replace("pr0xy-pw", "not-it"))
            assert wrong.returncode == 5, wrong.stderr
            assert "error: the proxy http://chatops:<redacted>@127.0.0.1:" \
                f"{proxy.port} refused CONNECT to 127.0.0.1:{port} (401), so " \
                f"{base_url}/SHA256SUMS could not be downloaded: check the user " \
                "and password in its URL" in wrong.stderr, wrong.stderr
        visible = install("--dry-run", "--offline", need_bundle(),
                          "--proxy", with_password.replace("pr0xy-pw", "0ther-pw"))
        assert visible.returncode == 0, visible.stderr
        assert "the proxy's password was on install.sh's command line, where the " \
            "process list shows it: give the URL in CHATOPS_PROXY instead" in (
                visible.stderr)
        assert re.search(r"dry-run: write \S+/config.json \(mode 600, owner [^)]+\): "
                         r"proxy\n", visible.stderr), visible.stderr
        unseen = install("--dry-run", "--offline", need_bundle(), "--proxy", "none",
                         https_proxy=proxy.url)
        assert unseen.returncode == 0, unseen.stderr
        assert "a service does not see it" not in unseen.stderr
        config.pop("proxy")
        (system_root / "etc/chatops-agent/config.json").write_text(json.dumps(config))
        unseen = install("--dry-run", "--offline", need_bundle(), https_proxy=proxy.url)
        assert "https_proxy is set here, and a service does not see it: --proxy URL " \
            "(or CHATOPS_PROXY) gives the service its proxy" in unseen.stderr
        socks = install("--dry-run", "--proxy", "socks5://u:pw@127.0.0.1:1080")
        assert socks.returncode == 2
        assert "--proxy socks5://u:<redacted>@127.0.0.1:1080 is not a proxy" in (
            socks.stderr)
        for result in (got, wrong, visible, unseen, socks):
            shown = result.stdout + result.stderr
            assert "pr0xy-pw" not in shown and "not-it" not in shown
            assert "0ther-pw" not in shown and ":pw@" not in shown

    def test_help(self):
        result = installer("--help")
        assert result.returncode == 0 and "--prepare-offline" in result.stdout
        bad = installer("--bogus")
        assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr


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
