#!/usr/bin/env python3
"""chatops-agent: reports this server's metrics to a ChatOps API over one WebSocket.

Run it:
    CHATOPS_API_KEY=KEY python3 chatops_agent.py --api-url https://chatops.example.com
    python3 chatops_agent.py --once        # one sample as JSON, no API needed
    python3 chatops_agent.py --check       # diagnostics, one line per check
    python3 chatops_agent.py --help

Needs Python 3.8+ and websocket-client; on systems without Linux's /proc it
also needs psutil. See README.md, and docs/ for the protocol, settings and design.

The file, top to bottom: each section uses only those above it (a test reads
the syntax tree to hold that). docs/architecture.md is the longer map.

    Platform              what this system offers, decided once (HAVE_*)
    Defaults              every constant with its reason; SETTINGS, the settings
    Errors                AgentError and its kinds, each with its exit status
    Helpers               JSON, text safe for a log line, small reads, Backoff
    Configuration         load_config: flags, variables, the file, checked
    Metrics: sources      ProcSource (/proc), PsutilSource (elsewhere)
    Metrics: collector    MetricsCollector: two readings into one sample
    Protocol: messages, and the two forms of a request
                          Dialect (API, DOCS): every reply's shape; Job
    Commands              Children (every process started), CommandRunner
    Docker                DockerCLI, ContainerList/Cache, DockerActions
    Requests: the table, lanes, deadlines, cancel
                          REQUESTS, Dispatcher, Lane, Requests
    Delivery: what waits to be sent
                          Outbox (replies), ReadProof, SampleQueue (samples)
    The spool: samples kept on disk, in the state directory
                          Spool, SpoolReader, the state directory's checks
    Connection            Transport, Proxy, Deflate, FrameReader, Session;
                          Connector, Writer, Link
    The agent             Agent: builds the parts, runs the threads, stops
    Command line          build_parser, the re-run as an import
    One sample: --once, and a person's view of it (--once --text)
    Diagnostics (--check) the checks, and main()

Threads: main (waits for a signal or a dead thread), metrics (a sample each
interval), receive (Link: connects, reads, hands each message on), writer (one
per connection, the only one that sends), command-N and docker-N (the workers
of the request lanes), docker and docker-events (the container list).

Where to start: main() at the end, then Agent.start(). A request goes Link ->
Dispatcher -> a lane's worker -> Outbox -> Writer; a sample goes
MetricsCollector -> SampleQueue -> Writer, and the Spool when the API is away.
"""

__version__ = "0.1.0"

import argparse
import binascii
import codecs
import collections
import contextlib
import datetime
import errno
import functools
import glob
import ipaddress
import itertools
import json
import logging
import math
import os
import platform
import queue
import random
import re
import selectors
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import urllib.parse

try:
    import pwd
except ImportError:  # not a POSIX system: platform_problem() says so
    pwd = None
try:
    import fcntl
except ImportError:
    fcntl = None
try:
    import zlib
except ImportError:  # a Python built without it: frames go uncompressed
    zlib = None


###############################################################################
# Platform ####################################################################
###############################################################################

# Decided once, here. Linux is supported, and tested. Other POSIX systems
# (macOS, the BSDs) read their metrics through psutil and are not tested.
# Anything else, Windows included, is refused at start in one sentence.
LINUX = sys.platform.startswith("linux")
POSIX_NEEDS = (("pwd", pwd), ("fcntl", fcntl), ("os.geteuid", "geteuid"),
               ("os.killpg", "killpg"), ("os.O_NOFOLLOW", "O_NOFOLLOW"),
               ("os.O_DIRECTORY", "O_DIRECTORY"),
               ("dir_fd", os.open in os.supports_dir_fd))

# What this Python and kernel offer, decided once (as CPython's subprocess
# decides _USE_POSIX_SPAWN): the code below asks these, never hasattr().
HAVE_PROC = LINUX and os.path.isdir("/proc/self")  # process table, cmdlines
HAVE_WAITID = hasattr(os, "waitid")  # see a child's exit without reaping it
HAVE_PIDFD = hasattr(os, "pidfd_open")  # Python 3.9 on; Linux 5.3 on, or OSError
HAVE_ORIG_ARGV = hasattr(sys, "orig_argv")  # Python 3.10 on
FROZEN = bool(getattr(sys, "frozen", False))  # sys.executable is not a Python
# ssl's reader of a certificate file (subject, expiry), for --check: CPython
# has had it from 2.7 to 3.13, but it is not public, so it is asked for.
DECODE_CERT = getattr(ssl._ssl, "_test_decode_cert", None)

# The connection's TCP options, as websocket-client sets them on sockets of
# its own: no Nagle delay for small frames, and keepalive that gives up on a
# dead peer after about a minute, where the system has them.
TCP_OPTIONS = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)] + [
    (level, getattr(socket, name), value)
    for level, name, value in ((socket.SOL_SOCKET, "SO_KEEPALIVE", 1),
                               (socket.IPPROTO_TCP, "TCP_KEEPIDLE", 30),
                               (socket.IPPROTO_TCP, "TCP_KEEPINTVL", 10),
                               (socket.IPPROTO_TCP, "TCP_KEEPCNT", 3))
    if hasattr(socket, name)]


def platform_problem():
    """Why this system cannot run the agent, in one sentence; None if it can."""
    missing = [name for name, have in POSIX_NEEDS
               if not (hasattr(os, have) if isinstance(have, str) else have)]
    if os.name == "posix" and not missing:
        return None
    what = f"{platform.system() or sys.platform}, Python {platform.python_version()}"
    lacks = f": this Python lacks {', '.join(missing)}" if missing else ""
    return (f"this system ({what}) cannot run the agent{lacks}. It runs on Linux, "
            "and on other POSIX systems with psutil (see README.md, Platforms)")


###############################################################################
# Defaults ####################################################################
###############################################################################

WS_PATH = "/api/v1/agents/ws"
FRAGMENT_BYTES = 65536  # larger messages go out in fragments of this size
AUTH_TIMEOUT_S = 10.0  # how long the API may take to answer "auth"
CONNECT_TIMEOUT_S = 10.0  # one read or write while connecting
CONNECT_DEADLINE_S = 15.0  # the whole TCP, TLS and upgrade, however slow the peer
MAX_HEAD_BYTES = 65536  # of an HTTP answer's head: the upgrade's, a proxy's
MAX_REFUSAL_BODY = 4096  # of the page that answers an upgrade with no 101
PROXY_PORT = 1080  # of a proxy URL without one, as curl has it
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # larger messages from the API are refused,
# compressed or inflated. permessage-deflate (RFC 7692), as the agent offers it:
# first with the API's own compression reset at each message (the agent then
# keeps no inflate state between messages), else as the API likes; either way
# the API may cap the window of the agent's compressor.
DEFLATE_OFFER = ("permessage-deflate; server_no_context_takeover; "
                 "client_max_window_bits, permessage-deflate; client_max_window_bits")
DEFLATE_PARAMS = ("server_no_context_takeover", "client_no_context_takeover",
                  "server_max_window_bits", "client_max_window_bits")
DEFLATE_WINDOW_BITS = 15  # 32 KiB: the previous frame is in reach (docs/performance.md)
DEFLATE_MEM_LEVEL = 5  # with level 6: 212 B a frame, 30 us, 144 KiB of state
DEFLATE_LEVEL = 6
DEFLATE_TAIL = b"\x00\x00\xff\xff"  # the empty block each compressed message ends with
WINDOW_BITS = re.compile("[0-9]{1,2}")  # a _window_bits value: ASCII digits
INFLATE_STEP = 64 * 1024  # inflated at a time, each step checked against the cap
MAX_DEFLATE_STREAMS = 16  # deflate streams ended in one message (RFC 7692 7.2.3.3)
FIRST_RETRY_CEILING = 0.25  # first reconnect delay: uniform in [0, 0.25] x the cap
STEADY_RETRY_FLOOR = 0.8  # later reconnect delays: uniform in [0.8, 1] x the cap
STABLE_AFTER_S = 30.0  # a connection up this long resets the backoff
# A connection ended with nothing from the API for this long may have been
# cut by an idle timeout on the way (cut_when_quiet): the API speaks at least
# once a sample (its acknowledgement, or the pong) or a heartbeat.
IDLE_CUT_MIN_S = 2.0
AUTH_RETRY_FIRST_S = 60.0  # a rejected key is retried slowly: 1, 2, 4, ... min
AUTH_RETRY_MAX_S = 900.0
METRICS_WINDOW = 32  # metrics frames sent but not yet shown read
MAX_UNANSWERED_PINGS = 1024  # pings noted for the pongs that prove samples read
MAX_KEPT_REPLIES = 256  # replies waiting for a reconnect
MAX_ID_CHARS = 200  # a request id or server id longer than this is not used
NUL_STAND_IN = "\u2400"  # U+2400 SYMBOL FOR NULL, sent in place of a NUL byte
MAX_WAITING_MESSAGES = 1024  # replies, pongs and chunks waiting to be sent;
MAX_WAITING_BYTES = 32 * 1024 * 1024  # beyond either, the oldest are dropped
MAX_SAMPLE_BYTES = 64 * 1024 * 1024  # samples kept undelivered: buffer_size, and this
MAX_BUFFER_SIZE = 100000  # samples kept undelivered, at most (buffer_size)
SPOOL_FILE, SPOOL_NEW = "spool", "spool.new"  # in the state directory
SPOOL_HEADER = b"chatops-agent spool 1\n"  # the spool file's format, version 1
SPOOL_RECORD_HEAD = 17  # a record: kind, number (8 bytes), length (4), CRC-32 (4)
MAX_SPOOL_RECORD_BYTES = 16 * 1024 * 1024  # a longer one is damage, not a sample
SPOOL_SYNC_S = 30.0  # the spool is fsynced at most this often, and at a clean stop
SPOOL_COMPACT_RECORDS = 256  # rewritten once this many records (and half) are done,
SPOOL_COMPACT_BYTES = 4 * 1024 * 1024  # or this many bytes (and half) are
# So a spool holds at most about twice what is pending: a file beyond these
# is none the agent wrote, and is set aside or given up on, unread.
MAX_SPOOL_FILE_BYTES = 4 * MAX_SAMPLE_BYTES
MAX_SPOOL_RECORDS = 2 * MAX_BUFFER_SIZE + 4 * SPOOL_COMPACT_RECORDS
SPOOL_RESYNC_TRIES = 100000  # after damage: places tried as a record's start,
SPOOL_RESYNC_BYTES = 64 * 1024 * 1024  # and bytes of checksums that may fail
CPU_PRIME_S = 0.25  # first sample's CPU window after start
SLOW_REFRESH_S = 60.0  # the mount table and CPU frequency are re-read this often
ONCE_CPU_WINDOW_S = 0.5  # CPU window of --once
CHECK_LINE_S = 10.0  # a --check line that asks the API gives up after this
PROBE_ANSWER_S = 5.0  # --check's WebSocket: how long the API may take to answer
CERT_WARN_DAYS = 30  # --check warns of a client certificate this close to its end
CLOSE_REPLY_WAIT_S = 1.0  # how long the writer may take to answer the API's close
SHUTDOWN_S = 5.0  # a stop takes at most this (Agent.shutdown); then the process ends
SHUTDOWN_KILL_AT_S = 1.0  # points in it: commands get TERM, and KILL at this one;
SHUTDOWN_REPLIES_AT_S = 1.5  # their replies are queued by this one;
SHUTDOWN_CLOSED_AT_S = 4.0  # and the connection closed by this one, after
SHUTDOWN_CLOSE_WAIT_S = 1.5  # sending what waits, then waiting this long at most;
SHUTDOWN_METRICS_AT_S = 4.5  # the metrics loop is waited for until this one, so
# that a hung statvfs leaves the spool's sync the rest of SHUTDOWN_S
EXIT_THREAD_DIED = 70  # EX_SOFTWARE: a thread died; the service manager restarts us
EXIT_SHUTDOWN_OVERRAN = 75  # EX_TEMPFAIL: a stop took more than SHUTDOWN_S
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")  # each stops the agent cleanly,
# unless the agent was started with it ignored (nohup ignores SIGHUP)
THREAD_DIED = 0  # on the stop socket, where the other bytes are signal numbers
LOG_LEVELS = ("debug", "info", "warning", "error")


class Setting:
    """One configuration setting: its JSON key, flag and variable follow from `name`.

    Every number has a range, `low` to `high`: a value outside it is refused
    at start. Without an upper bound a setting could pass validation and then
    kill a thread (a wait of 1e300 s overflows) or take all memory; without a
    lower one, spin (a metrics interval of 1e-300 s) or hammer the API.
    """

    def __init__(self, name, default, kind, meaning, low=None, high=None,
                 secret=False):
        self.name = name
        self.default = default
        self.kind = kind  # a key of CONVERTERS
        self.meaning = meaning
        self.low, self.high = low, high  # the range of a number, both included
        self.secret = secret  # never shown, not even in an error about its type

    @property
    def flag(self):
        return "--" + self.name.replace("_", "-")

    @property
    def env(self):
        return "CHATOPS_" + self.name.upper()

    @property
    def range_text(self):
        return f"from {self.low} to {self.high}" if self.low is not None else ""


DAY_S, WEEK_S = 86400, 7 * 86400
SETTINGS = (
    Setting("api_key", None, "key",
            "API key that authenticates this agent (secret)", secret=True),
    Setting("api_url", "http://localhost:8000", "url",
            "ChatOps API base URL (http/https), or a ws/wss URL used as is"),
    Setting("metrics_interval_s", 5.0, "float",
            "seconds between metrics samples", 0.1, 3600),
    Setting("heartbeat_interval_s", 30.0, "float",
            "seconds between pings; silence for two of them means the link is dead",
            1, 3600),
    Setting("reconnect_max_delay_s", 16.0, "float",
            "longest wait between connection attempts; the API is found this "
            "soon after it is back, and 16 s means at most 6 attempts a minute",
            0.5, 3600),
    Setting("buffer_size", 720, "int",
            "samples kept while the API is unreachable (720 = 1 hour at 5 s)",
            1, MAX_BUFFER_SIZE),
    Setting("state_dir", None, "str",
            "directory whose spool keeps undelivered samples across restarts; "
            "none: memory only (default: $STATE_DIRECTORY, else "
            "$XDG_STATE_HOME/chatops-agent or ~/.local/state/chatops-agent)"),
    Setting("top_processes", 0, "int",
            "processes listed in each sample, top by CPU; 0: every process",
            0, 1000000),
    Setting("process_refresh_s", 15.0, "float",
            "seconds between reads of the process table (reused in between)",
            0.1, DAY_S),
    Setting("disk_include_network", False, "bool",
            "also report network filesystems (nfs, cifs, ...), whose statvfs can hang"),
    Setting("ca_file", None, "str",
            "PEM file of the CA that signed the API's certificate"),
    Setting("tls_skip_verify", False, "bool",
            "do not verify the API's TLS certificate (insecure; warned at connect)"),
    Setting("tls_client_cert", None, "str",
            "PEM file of the client certificate given when the API's TLS asks "
            "for one (its key in it, or in tls_client_key)"),
    Setting("tls_client_key", None, "str",
            "PEM file of the client certificate's private key, private to the "
            "agent's user (mode 600)"),
    Setting("allow_plaintext", False, "bool",
            "allow http/ws to a host that is not loopback (the key goes in clear)"),
    Setting("proxy", None, "proxy",
            "HTTP proxy to reach the API through (a CONNECT tunnel), "
            "http://[USER:PASSWORD@]HOST:PORT; none: no proxy at all; unset: "
            "https_proxy (or http_proxy for http/ws) and no_proxy decide, in "
            "either case"),
    Setting("compression", True, "bool",
            "offer permessage-deflate to the API and compress frames when it agrees "
            "(a metrics frame about 40 times smaller); false: plain frames"),
    Setting("log_level", "info", "level",
            "one of " + ", ".join(LOG_LEVELS)),
    Setting("commands_enabled", True, "bool",
            "run the shell commands the API sends (false: refuse every one)"),
    Setting("command_allow", [], "regexes",
            "if not empty, only commands that one of these regexes matches whole run"),
    Setting("command_timeout_s", 300.0, "float",
            "default and longest run time of a command; a request may ask less",
            0.1, WEEK_S),
    Setting("command_grace_s", 5.0, "float",
            "on timeout or cancel, seconds between SIGTERM and SIGKILL", 0, 3600),
    Setting("command_workers", 4, "int",
            "commands that run at once", 1, 64),
    Setting("command_queue_size", 64, "int",
            "commands that may wait for a worker; beyond, the agent answers busy",
            0, 10000),
    Setting("request_deadline_s", 10.0, "float",
            "a request that waited this long for a worker is never started, but "
            "answered as expired (the API waits 10 s); 0: never", 0, DAY_S),
    Setting("command_output_max_bytes", 1048576, "int",
            "output kept per command: the first and last halves, the middle cut; "
            "at most 2 MiB, so that a reply, escaped as JSON, stays within the "
            "16 MiB the API takes in one message",
            1024, 2 * 1024 * 1024),
    Setting("command_cwd", "/", "str",
            "working directory of commands"),
    Setting("command_allow_cwd", True, "bool",
            "let a request choose the working directory (its cwd field)"),
    Setting("command_env", {}, "env",
            "extra environment variables for commands, a JSON object"),
    Setting("reply_keep_s", 300.0, "float",
            "how long a reply that could not be sent waits for a reconnect",
            0, DAY_S),
    Setting("docker_enabled", True, "bool",
            "report containers and answer docker requests (false: neither)"),
    Setting("docker_binary", "docker", "str",
            "the docker CLI: a name looked up in PATH, or a path"),
    Setting("docker_timeout_s", 30.0, "float",
            "longest wait for one docker CLI call (a hung daemon)", 1, 3600),
    Setting("docker_workers", 2, "int",
            "Docker requests carried out at once, apart from commands", 1, 64),
    Setting("docker_queue_size", 16, "int",
            "Docker requests that may wait for a worker; beyond, the agent "
            "answers busy", 0, 10000),
    Setting("docker_stop_timeout_s", 5, "int",
            "stop/restart without a timeout: seconds before Docker kills the "
            "container, short enough for the reply to beat the API's 10 s wait",
            0, 3600),
    Setting("docker_refresh_s", 300.0, "float",
            "safety re-read of the whole container list; events keep it current",
            1, DAY_S),
    Setting("docker_check_s", 30.0, "float",
            "while Docker is unavailable, how often to look again", 0.5, DAY_S),
)
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}
CONFIG_ENV = "CHATOPS_CONFIG"

# Filesystems that are not disks: kernel views, images and layers. Network
# filesystems are left out unless asked for, because statvfs on a dead server
# blocks uninterruptibly and would stall the metrics loop.
PSEUDO_FS = frozenset({
    "autofs", "binfmt_misc", "bpf", "cgroup", "cgroup2", "configfs", "debugfs",
    "devpts", "devtmpfs", "efivarfs", "fusectl", "hugetlbfs", "mqueue", "nsfs",
    "overlay", "proc", "pstore", "ramfs", "rpc_pipefs", "securityfs", "selinuxfs",
    "squashfs", "sysfs", "tmpfs", "tracefs", "nfsd", "devfs", "iso9660", "aufs",
})
NETWORK_FS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "fuse.glusterfs",
    "fuse.sshfs", "sshfs", "9p", "afs", "lustre", "gpfs", "fuse.s3fs", "fuse.rclone",
    "ncpfs", "davfs", "fuse.davfs2",
})

# How flags and variables spell true and false, and how errors name each kind.
BOOL_WORDS = {
    **dict.fromkeys(("1", "true", "yes", "on"), True),
    **dict.fromkeys(("0", "false", "no", "off"), False),
}
KIND_WORDS = {"str": "a string", "level": "a string", "url": "a URL (a string)",
              "proxy": "a proxy URL (a string)",
              "key": "a string",
              "bool": "true or false",
              "int": "a whole number", "float": "a number",
              "regexes": "a JSON list of regular expressions (or, as text, one)",
              "env": 'a JSON object of variables, {"NAME": "value"}'}
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f]")
MAX_CONFIG_BYTES = 1024 * 1024  # a config file larger than this is refused
MAX_CA_FILE_BYTES = 4 * 1024 * 1024  # and a CA file (the system's bundle: 0.2 MiB)


###############################################################################
# Errors ######################################################################
###############################################################################


class AgentError(Exception):
    """An error the operator can act on; `main()` prints it, exits with `exit_code`."""

    exit_code = 1


class ConfigError(AgentError):
    exit_code = 2


class DependencyError(AgentError):
    exit_code = 2


class PlatformError(AgentError):
    exit_code = 2


class AuthError(AgentError):
    """The API refused our key (close 1008, an error frame, or HTTP 401/403)."""

    def __init__(self, reason, code=None):
        self.reason = reason
        self.code = code
        suffix = f" (close {code})" if code else ""
        super().__init__(f"authentication rejected by the API: {reason}{suffix}")


class TLSFileError(AgentError):
    """A client certificate or key file that cannot be used; says which."""


class RequestError(AgentError):
    """A request from the API that cannot be carried out; answered with an error."""


class LinkError(AgentError):
    """The connection could not be made or broke; retried with backoff."""


class ProtocolError(LinkError):
    """The API broke RFC 6455: the agent fails the connection with a close
    frame of `code` (1002 protocol error, 1007 a text message that is not
    UTF-8, 1009 a message too big), and connects again."""

    def __init__(self, text, code=1002):
        super().__init__(f"protocol error: {text}")
        self.code = code


###############################################################################
# Helpers #####################################################################
###############################################################################

LOG = logging.getLogger("chatops-agent")


def utc_now():
    """RFC 3339 UTC with milliseconds and `Z`: samples 1 s apart never collide."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def to_json(message):
    """The UTF-8 bytes of a text frame: compact, storable, never an exception.

    Plain UTF-8 keeps non-ASCII output at 1-3 bytes a character (escapes
    would cost 6). A number JSON cannot hold (NaN, infinity) becomes null
    rather than failing the send, and a NUL becomes NUL_STAND_IN: the API
    stores replies in PostgreSQL text, which cannot hold NUL (docs/protocol.md).
    Both are rare, so they cost a second pass only when present.
    """
    text = json_text(message)
    if text is None or "\\u0000" in text:
        text = json_text(storable(message))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate echoed from a request
        return json.dumps(storable(message), separators=(",", ":")).encode()


def json_text(message):
    """Compact JSON text, or None when it holds a number JSON cannot."""
    try:
        return json.dumps(message, separators=(",", ":"), allow_nan=False,
                          ensure_ascii=False)
    except ValueError:
        return None


def storable(value):
    """`value` with every NaN or infinity replaced by None, every NUL in a
    string by NUL_STAND_IN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value.replace("\0", NUL_STAND_IN)
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [storable(v) for v in value]
    return value


def usable_id(value):
    """`value` if it can name a request or server in a reply (a string or a whole
    number, of sane size), else None. NaN, floats and objects cannot."""
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value if len(str(value)) <= MAX_ID_CHARS else None
    return None


# Characters that let text from the network forge or hide a line of a log or
# a terminal: C0 and C1 controls, DEL, line and paragraph separators, and
# lone surrogates (which cannot even be encoded).
UNSAFE_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def one_line(text):
    """`text` with those characters escaped (\\n, \\x1b, ...): one line, as written."""
    return UNSAFE_TEXT.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def shown(value, limit=60):
    """A value from the API as a log or error message may show it: short, one line."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return one_line(text[:limit])


def bracketed(host):
    """A host as it goes before a port: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def redact_proxy(url):
    """A proxy URL as it may be shown: its password replaced."""
    at = url.rfind("@")
    if at < 0:
        return url
    start = url.find("://") + 3 if "://" in url[:at] else 0
    user = url[start:at].partition(":")[0]
    return f"{url[:start]}{user}:<redacted>{url[at:]}"


def redact(text, secret):
    return text.replace(secret, "<redacted>") if secret and len(secret) >= 4 else text


def gib(n_bytes):
    return round(n_bytes / 1024**3, 2)


def percent(part, whole):
    return round(100.0 * part / whole, 1) if whole > 0 else 0.0


def tenths(x):
    """x to one decimal, without ".0" when whole. For the lists the server
    keeps as JSON (processes, cores, interfaces), where most numbers are 0:
    "0" rather than "0.0" saves 2 bytes each, about 3 % of a frame. The
    fields the server stores in columns stay floats, as it has always had them."""
    x = round(float(x), 1)
    return int(x) if x.is_integer() else x


def is_loopback(host):
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or bool(mapped and mapped.is_loopback)


FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
              (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
              (stat.S_ISSOCK, "a socket"))


def open_regular(path):
    """(descriptor, os.stat_result) of the regular file at `path`, or OSError
    saying why not: what the path names instead (a FIFO, a device) is opened
    without waiting, then refused."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        for is_kind, kind in FILE_KINDS:
            if is_kind(info.st_mode):
                raise OSError(f"it is {kind}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def read_small_file(path, max_bytes):
    """(bytes, os.stat_result) of the regular file at `path` (open_regular),
    or OSError saying why not; no more than `max_bytes` is read, whatever
    the file claims, so that it cannot fill the agent's memory."""
    fd, info = open_regular(path)
    try:
        data = os.read(fd, max_bytes + 1)
        while len(data) <= max_bytes:  # a file that grows, or /proc's size 0
            more = os.read(fd, max_bytes + 1 - len(data))
            if not more:
                return data, info
            data += more
        raise OSError(
            f"it is larger than {max_bytes // 1024} KiB; is it the right file?")
    finally:
        os.close(fd)


class Backoff:
    """Waits between attempts, with jitter. The ceiling starts at `first_s`
    and grows `growth` times with each attempt, up to `cap_s`; each wait is
    uniform in [floor x ceiling, ceiling], the first in [first_floor x
    ceiling, ceiling]. `reset()` starts over."""

    def __init__(self, first_s, cap_s, floor=0.0, first_floor=None, growth=2.0):
        self.first_s = first_s
        self.cap_s = cap_s
        self.floor = floor  # >0 keeps waits from collapsing to nothing
        self.first_floor = floor if first_floor is None else first_floor
        self.growth = growth
        self.attempt = 0

    def next_delay(self):
        ceiling = min(self.cap_s, self.first_s * self.growth ** min(self.attempt, 30))
        floor = self.first_floor if self.attempt == 0 else self.floor
        self.attempt += 1
        return random.uniform(ceiling * floor, ceiling)

    def reset(self):
        self.attempt = 0


def reconnect_backoff(cap_s):
    """Waits between connection attempts (docs/protocol.md, Connection: Reconnect).

    The first after a connection that worked is uniform in [0, cap / 4]: a
    blip is over in seconds, and a fleet that lost its API at once comes back
    spread over 4 s; each later one is uniform in [0.8 cap, cap]. So an API
    that is back is found within `cap` (16 s), half the time within 0.45 cap
    (7 s), while 7 attempts span at least 5 x 0.8 cap = 64 s: at most 6 a
    minute.
    """
    return Backoff(FIRST_RETRY_CEILING * cap_s, cap_s, floor=STEADY_RETRY_FLOOR,
                   first_floor=0.0, growth=1 / FIRST_RETRY_CEILING)


class LogFormatter(logging.Formatter):
    """One record, one line, and never the key.

    Ids, names, commands and error texts from the API reach log lines: their
    control characters are escaped, so no text can start a line that looks like
    a record of its own. A traceback keeps its lines, each indented. The key is
    cut from everything, tracebacks included.
    """

    def __init__(self, secret):
        super().__init__("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%SZ")
        self.converter = time.gmtime
        self.secret = secret

    def formatMessage(self, record):
        record.message = one_line(record.message)
        return super().formatMessage(record)

    def formatException(self, exc_info):
        lines = super().formatException(exc_info).splitlines()
        return "\n".join("    " + one_line(line) for line in lines)

    def format(self, record):
        return redact(super().format(record), self.secret)


def setup_logging(level, secret):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter(secret))
    log = logging.getLogger("chatops-agent")
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
    return log


def wheel_version(path):
    """(1, 10, 0) from .../websocket_client-1.10.0-py3-none-any.whl: 1.10 > 1.9."""
    version = os.path.basename(path).split("-")[1]
    return tuple(int(part) if part.isdigit() else 0 for part in version.split("."))


def load_websocket():
    """Import websocket-client, or from a websocket_client-*.whl beside this file."""
    try:
        import websocket

        if hasattr(websocket, "create_connection"):
            return websocket
    except ImportError:
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    wheels = glob.glob(os.path.join(here, "websocket_client-*.whl"))
    for wheel in sorted(wheels, key=wheel_version, reverse=True):
        sys.path.insert(0, wheel)  # a wheel is a zip: zipimport reads it as it is
        sys.modules.pop("websocket", None)
        try:
            import websocket

            if hasattr(websocket, "create_connection"):
                return websocket
        except ImportError:
            pass
        sys.path.remove(wheel)
    raise DependencyError(
        "the Python package websocket-client is not installed (or a module named "
        "'websocket' hides it). Install it: 'pip install websocket-client' or "
        "'apt-get install python3-websocket', or put websocket_client-*.whl "
        "beside chatops_agent.py"
    )


###############################################################################
# Configuration ###############################################################
###############################################################################


class Config:
    """The effective settings and, for each, where its value came from."""

    def __init__(self, values, sources, config_path):
        self.values = values
        self.sources = sources
        self.config_path = config_path

    def __getattr__(self, name):
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def redacted(self):
        shown = {}
        for name, value in self.values.items():
            if name == "api_key" and value:
                value = "<redacted>"
            elif name == "proxy" and value:
                value = redact_proxy(value)
            shown[name] = {"value": value, "source": self.sources[name]}
        return {"config_file": self.config_path, "settings": shown}


def convert(setting, raw, origin, text):
    """Turn a raw value into its kind: `text` from a flag or variable, else JSON."""
    try:
        value = CONVERTERS[setting.kind](raw, text)
    except (TypeError, ValueError):
        got = f"a {type(raw).__name__}" if setting.secret else json.dumps(raw)[:80]
        raise ConfigError(
            f"{origin}: {setting.name} must be {KIND_WORDS[setting.kind]}, got {got}"
        ) from None
    check_value(setting, value, origin)
    return value


def as_str(raw, text):
    if not isinstance(raw, str):
        raise TypeError
    return raw


def as_bool(raw, text):
    if text and isinstance(raw, str):
        raw = BOOL_WORDS.get(raw.strip().lower(), raw)
    if not isinstance(raw, bool):
        raise TypeError
    return raw


def as_number(kind):
    def convert_number(raw, text):
        value = kind(raw) if text else raw
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        if kind is int and not isinstance(value, int):
            raise TypeError
        return kind(value)

    return convert_number


def as_regexes(raw, text):
    """A JSON list of strings; as text also one regex alone."""
    if text:
        raw = json.loads(raw) if raw.lstrip().startswith("[") else [raw]
    if not isinstance(raw, list) or not all(isinstance(r, str) for r in raw):
        raise TypeError
    return raw


def as_env(raw, text):
    """A JSON object of variable names to string values."""
    if text:
        raw = json.loads(raw)
    if not isinstance(raw, dict) or not all(
        isinstance(v, str) and ENV_NAME.match(k) for k, v in raw.items()
    ):
        raise TypeError
    return raw


def as_level(raw, text):
    return as_str(raw, text).strip().lower()


def as_key(raw, text):
    return as_str(raw, text).strip()  # a trailing newline from a key file


def as_url(raw, text):
    return as_str(raw, text).strip()  # a trailing newline from a file or variable


CONVERTERS = {"str": as_str, "level": as_level, "url": as_url, "proxy": as_url,
              "key": as_key,
              "bool": as_bool,
              "int": as_number(int), "float": as_number(float),
              "regexes": as_regexes, "env": as_env}


def check_value(setting, value, origin):
    where = f"{origin}: {setting.name}"
    if setting.kind in ("int", "float"):
        check_number(setting, value, where)
    if setting.kind == "level" and value not in LOG_LEVELS:
        levels = ", ".join(LOG_LEVELS)
        raise ConfigError(f"{where} must be one of {levels}, got {value!r}")
    if setting.kind == "proxy" and value != "none":
        parse_proxy(value, where)  # ConfigError for what is no proxy
    for pattern in value if setting.kind == "regexes" else ():
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(
                f"{where}: {pattern!r} is not a valid regular expression: {e}"
            ) from None
    check_text(setting, value, where)


def check_number(setting, value, where):
    if not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number")
    if not setting.low <= value <= setting.high:
        raise ConfigError(f"{where} must be {setting.range_text}, got {value}")


def check_text(setting, value, where):
    """No NUL in any text: a path, an argument or a variable cannot hold one,
    and it would fail only when used, in a thread. No control character in
    the key, where it is a copy mistake (and breaks --check's header)."""
    if isinstance(value, dict):
        value = list(value.values())
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str) and "\0" in text:
            raise ConfigError(f"{where} holds a NUL character")
    if setting.kind == "key" and value and CONTROL_CHARACTER.search(value):
        raise ConfigError(
            f"{where} holds a control character (a line break, a tab, ...); "
            "the key is one line of printable characters: check where it comes from"
        )


def read_config_file(path):
    """The JSON object in `path`, after the checks ssh makes of a private key."""
    try:
        data, info = read_small_file(path, MAX_CONFIG_BYTES)
        text = data.decode("utf-8")
    except OSError as e:
        raise ConfigError(
            f"cannot read config file {path}: {e.strerror or e}"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    mode = info.st_mode
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"config file {path} is not valid JSON: {e.msg} "
            f"at line {e.lineno} column {e.colno}"
        ) from None
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"config file {path} is not usable JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a JSON object ({{...}}), "
            f"not {type(data).__name__}"
        )
    if data.get("api_key") and mode & 0o077:
        raise ConfigError(
            f"config file {path} holds the API key but is accessible by others "
            f"(mode {oct(stat.S_IMODE(mode))}); the agent refuses it, as ssh refuses "
            f"such a private key. Fix: chmod 600 {path}"
        )
    return data


def file_values(path):
    if not path:
        return {}
    data = read_config_file(path)
    for key in data:
        if key not in SETTINGS_BY_NAME:
            import difflib  # only on this error path

            close = difflib.get_close_matches(key, list(SETTINGS_BY_NAME), 1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known = ", ".join(SETTINGS_BY_NAME)
            raise ConfigError(
                f"config file {path}: unknown key {key!r}{hint}; known keys: {known}"
            )
    return {
        k: convert(SETTINGS_BY_NAME[k], v, f"config file {path}", text=False)
        for k, v in data.items()
        if v is not None
    }


def load_config(flags, environ):
    """Merge flags > environment > config file > defaults, and validate the result.

    `flags` maps setting names to the raw text given on the command line (or
    True for switches), plus "config" for the file's path.
    """
    path = flags.get("config") or environ.get(CONFIG_ENV) or None
    from_file = file_values(path)
    values, sources = {}, {}
    for s in SETTINGS:
        raw = flags.get(s.name)
        if raw is not None:
            values[s.name] = convert(s, raw, "flag " + s.flag, text=True)
            sources[s.name] = "flag"
        elif environ.get(s.env):
            values[s.name] = convert(
                s, environ[s.env], "environment variable " + s.env, text=True
            )
            sources[s.name] = "env " + s.env
        elif s.name in from_file:
            values[s.name], sources[s.name] = from_file[s.name], "file " + path
        else:
            values[s.name], sources[s.name] = s.default, "default"
    config = Config(values, sources, path)
    validate(config)
    return config


def validate(config):
    parts = split_api_url(config.api_url)
    plaintext = parts.scheme in ("http", "ws")
    if plaintext and not is_loopback(parts.hostname) and not config.allow_plaintext:
        raise ConfigError(
            f"refusing plaintext URL {config.api_url}: the API key would cross the "
            "network in clear. Use https:// (or wss://), or if this network is "
            "trusted pass --allow-plaintext (CHATOPS_ALLOW_PLAINTEXT=true, or "
            '"allow_plaintext": true in the config file; install.sh --allow-plaintext)'
        )
    if config.commands_enabled and not os.path.isdir(config.command_cwd):
        raise ConfigError(
            f"command_cwd {config.command_cwd} is not a directory; give an existing "
            "one with --command-cwd"
        )
    if config.tls_client_key and not config.tls_client_cert:
        raise ConfigError("tls_client_key is set without tls_client_cert: give the "
                          "client certificate with --tls-client-cert")
    if config.tls_client_cert:
        check_client_key_private(config.tls_client_key or config.tls_client_cert)
    if config.ca_file or config.tls_client_cert:
        try:
            tls_context(config)
        except TLSFileError as e:
            raise ConfigError(str(e)) from None
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(
                f"CA file {config.ca_file} cannot be used ({e.strerror or e}); give "
                "the path of a PEM file with --ca-file"
            ) from None


def check_client_key_private(path):
    """ConfigError unless the file with the client key is the agent user's
    own and readable by nobody else, as ssh wants of a private key. Root
    may use (and install.sh check) a key that the service's user owns."""
    try:
        info = os.stat(path)
    except OSError as e:
        raise ConfigError(f"the client key {path} cannot be used ({e.strerror or e}); "
                          "give its PEM file with --tls-client-key") from None
    euid = os.geteuid()
    if stat.S_IMODE(info.st_mode) & 0o077 or (info.st_uid != euid and euid != 0):
        raise ConfigError(
            f"the client key {path} is not private to this user (mode "
            f"{oct(stat.S_IMODE(info.st_mode))}, owner uid {info.st_uid}); the agent "
            f"refuses it, as ssh refuses such a key. Fix: chmod 600 {path}, owned "
            "by the agent's user")


# What different URL parsers may read differently: whitespace and controls
# (some strip them, some do not), and backslashes (some read them as '/').
URL_AMBIGUOUS = re.compile(r"[\s\x00-\x1f\x7f\\]")
SCHEMES = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}


def split_api_url(api_url):
    """The parts of api_url, or ConfigError. The plaintext check, websocket-client
    and --check's HTTP each parse the URL; only text that all read alike passes."""
    example = "give http(s)://HOST[:PORT] or ws(s)://HOST[:PORT]/PATH"
    if URL_AMBIGUOUS.search(api_url) or not api_url.isascii():
        raise ConfigError(
            f"api_url {one_line(api_url)!r} holds whitespace, a control character, a "
            f"backslash or a non-ASCII character; {example} (an international host "
            "name in its xn-- form)"
        )
    try:
        parts = urllib.parse.urlsplit(api_url)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as e:
        raise ConfigError(f"api_url {api_url!r} is not a usable URL ({e})") from None
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise ConfigError(
            f"api_url {api_url!r} is not a URL the agent can use: {example}"
        )
    if "@" in parts.netloc:
        raise ConfigError(
            f"api_url {api_url!r} holds credentials (user@host); the agent sends "
            "only its key, given with api_key: remove them"
        )
    return parts


ProxyURL = collections.namedtuple("ProxyURL", "host port authorization name")


def parse_proxy(url, origin):
    """The parts of a proxy URL, http://[USER:PASSWORD@]HOST[:PORT] (port 1080
    if none, as curl reads it), or ConfigError naming `origin`. The
    credentials become `authorization` (Basic) only: `name` never shows them."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        parts = port = None
    if not parts or parts.scheme != "http" or not parts.hostname or \
            URL_AMBIGUOUS.search(url) or parts.path not in ("", "/"):
        raise ConfigError(
            f"{origin} ({redact_proxy(url)}) is not a proxy the agent can use: "
            "give http://HOST:PORT, or http://USER:PASSWORD@HOST:PORT")
    authorization = None
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        authorization = binascii.b2a_base64(
            f"{user}:{password}".encode(), newline=False).decode("ascii")
    port = port or PROXY_PORT
    return ProxyURL(parts.hostname, port, authorization,
                    f"http://{bracketed(parts.hostname)}:{port}")


def ws_url(api_url):
    """The WebSocket URL for an API URL (docs/protocol.md, Endpoint)."""
    parts = split_api_url(api_url)
    path = parts.path
    if parts.scheme in ("http", "https") or path in ("", "/"):
        path = path.rstrip("/") + WS_PATH
    return urllib.parse.urlunsplit(
        (SCHEMES[parts.scheme], parts.netloc, path, parts.query, "")
    )


def http_base(api_url):
    """The HTTP base for /health and /api/v1/api-keys/me, from either kind of URL."""
    parts = split_api_url(api_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    if parts.scheme in ("ws", "wss"):
        path = path[: -len(WS_PATH)] if path.endswith(WS_PATH) else ""
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


def tls_context(config):
    """The SSLContext of every TLS connection to the API, the WebSocket's and
    --check's: the system's CAs, or the CA file's only. The agent reads that
    file itself, as it reads any file (a FIFO or a huge file put in its place
    is refused, never waited on), at each connection: a renewed CA is taken
    up without a restart."""
    if config.tls_skip_verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif config.ca_file:
        pem, _ = read_small_file(config.ca_file, MAX_CA_FILE_BYTES)
        context = ssl.create_default_context(cadata=pem.decode("ascii", "replace"))
    else:
        context = ssl.create_default_context()
    if config.tls_client_cert:
        load_client_certificate(context, config)
    return context


def load_client_certificate(context, config):
    """The client certificate (and its key) into `context`, read at each
    connection as the CA file is: a renewed one is taken up without a
    restart. TLSFileError naming the file when it cannot be used."""
    cert, key = config.tls_client_cert, config.tls_client_key
    try:
        with regular_file(cert) as cert_path, regular_file(key) as key_path:
            context.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as e:
        files = f"{cert} and its key {key}" if key else cert
        raise TLSFileError(
            f"the client certificate {files} cannot be used ({e.strerror or e}); "
            "give PEM files with --tls-client-cert and --tls-client-key"
        ) from None


@contextlib.contextmanager
def regular_file(path):
    """A path that names the regular file at `path` (None: None) for APIs
    that read a file themselves (ssl's), or OSError: on Linux /dev/fd/N of a
    descriptor opened without waiting, so that neither a FIFO nor a file
    swapped in after the check is what they read."""
    if path is None:
        yield None
        return
    fd, info = open_regular(path)
    try:
        if info.st_size > MAX_CA_FILE_BYTES:
            raise OSError(f"it is larger than {MAX_CA_FILE_BYTES // 1024} KiB")
        yield f"/dev/fd/{fd}" if HAVE_PROC else path
    finally:
        os.close(fd)


###############################################################################
# Metrics: sources ############################################################
###############################################################################
#
# A source reads raw counters; `MetricsCollector` turns two readings into
# percents and rates. Both sources return the same shapes:
#   cpu_times()    -> [(busy_s, total_s)] per logical CPU
#   memory()       -> (total, available, swap_total, swap_free) in bytes
#   mounts()       -> [(device, mount_point, fs_type)]
#   net()          -> {interface: (bytes_sent, bytes_recv, packets_sent, packets_recv)}
#   processes()    -> [(pid, started, name, cpu_s, rss_bytes, status, user)]
#   frequency_mhz(), uptime_s()


def busy_total(times):
    """CPU busy and total seconds from one CPU's times (guest time is inside user)."""
    fields = times._asdict() if hasattr(times, "_asdict") else times
    total = sum(fields.values()) - fields.get("guest", 0) - fields.get("guest_nice", 0)
    idle = fields.get("idle", 0) + fields.get("iowait", 0)
    return total - idle, total


def unescape_mount(field):
    """/proc/self/mounts writes space, tab, newline and backslash as octal escapes."""
    for code, char in (
        ("\\040", " "),
        ("\\011", "\t"),
        ("\\012", "\n"),
        ("\\134", "\\"),
    ):
        field = field.replace(code, char)
    return field


def proc_mounts(path="/proc/self/mounts"):
    with open(path, encoding="utf-8", errors="replace") as f:
        rows = [line.split() for line in f]
    return [
        (unescape_mount(r[0]), unescape_mount(r[1]), r[2]) for r in rows if len(r) >= 3
    ]


class UserNames:
    """uid -> user name, cached: the password database is slow to search."""

    def __init__(self):
        self._names = {}

    def __call__(self, uid):
        if uid not in self._names:
            try:
                self._names[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self._names[uid] = str(uid)
        return self._names[uid]


# /proc/PID/stat's state letter as the word psutil gives (psutil/_pslinux.py):
# the web UI paints a process green only when its status is "running".
PROC_STATUS = {
    "R": "running", "S": "sleeping", "D": "disk-sleep", "T": "stopped",
    "t": "tracing-stop", "Z": "zombie", "X": "dead", "x": "dead", "K": "wake-kill",
    "W": "waking", "I": "idle", "P": "parked",
}


class ProcSource:
    """Linux /proc and os.statvfs: the metrics source on Linux."""

    name = "/proc"

    def __init__(self, root="/proc"):
        self.root = root
        self.tick = os.sysconf("SC_CLK_TCK")
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.user_name = UserNames()

    def _read(self, name):
        with open(
            os.path.join(self.root, name), encoding="utf-8", errors="replace"
        ) as f:
            return f.read()

    def cpu_times(self):
        names = (
            "user",
            "nice",
            "system",
            "idle",
            "iowait",
            "irq",
            "softirq",
            "steal",
            "guest",
            "guest_nice",
        )
        cores = []
        for line in self._read("stat").splitlines():
            if line.startswith("cpu") and line[3:4].isdigit():
                values = [int(v) / self.tick for v in line.split()[1:11]]
                cores.append(busy_total(dict(zip(names, values))))
        return cores

    def memory(self):
        info = {}
        for line in self._read("meminfo").splitlines():
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0]) * 1024 if rest.split() else 0
        total = info.get("MemTotal", 0)
        available = info.get("MemAvailable")
        if available is None:  # kernels before 3.14
            available = (
                info.get("MemFree", 0) + info.get("Buffers", 0) + info.get("Cached", 0)
            )
        return total, available, info.get("SwapTotal", 0), info.get("SwapFree", 0)

    def mounts(self):
        return proc_mounts(os.path.join(self.root, "self/mounts"))

    def net(self):
        counters = {}
        for line in self._read("net/dev").splitlines()[2:]:
            name, _, rest = line.partition(":")
            f = rest.split()
            if len(f) >= 16:
                counters[name.strip()] = (int(f[8]), int(f[0]), int(f[9]), int(f[1]))
        return counters

    def frequency_mhz(self):
        try:
            mhz = [
                float(line.split(":")[1])
                for line in self._read("cpuinfo").splitlines()
                if line.startswith("cpu MHz")
            ]
        except (OSError, ValueError, IndexError):
            return 0.0
        return round(sum(mhz) / len(mhz), 1) if mhz else 0.0

    def uptime_s(self):
        return float(self._read("uptime").split()[0])

    def processes(self):
        table = []
        for entry in os.listdir(self.root):
            if entry.isdigit():
                row = self._process(entry)
                if row:
                    table.append(row)
        return table

    def _process(self, pid):
        try:
            name, f = proc_stat(self._read(pid + "/stat"))
            uid = os.stat(os.path.join(self.root, pid)).st_uid
        except (OSError, ValueError):  # the process ended while we looked
            return None
        cpu_s = (int(f[11]) + int(f[12])) / self.tick
        return (
            int(pid),
            int(f[19]),
            name,
            cpu_s,
            int(f[21]) * self.page,
            PROC_STATUS.get(f[0], "unknown"),
            self.user_name(uid),
        )


def proc_stat(text):
    """(name, [state, ppid, pgrp, ...]) of a /proc/PID/stat: the name is in
    parentheses and may hold anything, ')' too: the fields follow the last."""
    end = text.rindex(")")
    return text[text.index("(") + 1 : end], text[end + 2 :].split()


class PsutilSource:
    """psutil, on the systems without Linux's /proc: the same readings."""

    name = "psutil"

    def __init__(self, psutil):
        self.psutil = psutil
        self.user_name = UserNames()
        self._boot_time = None

    def cpu_times(self):
        return [busy_total(t) for t in self.psutil.cpu_times(percpu=True)]

    def memory(self):
        vm, sw = self.psutil.virtual_memory(), self.psutil.swap_memory()
        return vm.total, vm.available, sw.total, sw.free

    def mounts(self):
        return [
            (p.device, p.mountpoint, p.fstype)
            for p in self.psutil.disk_partitions(all=False)
        ]

    def net(self):
        return {
            name: (c.bytes_sent, c.bytes_recv, c.packets_sent, c.packets_recv)
            for name, c in self.psutil.net_io_counters(pernic=True).items()
        }

    def frequency_mhz(self):
        try:
            freq = self.psutil.cpu_freq()
        except (OSError, RuntimeError, NotImplementedError):
            return 0.0
        return round(freq.current, 1) if freq else 0.0

    def uptime_s(self):
        if self._boot_time is None:  # psutil reads /proc/stat for it each time
            self._boot_time = self.psutil.boot_time()
        return max(0.0, time.time() - self._boot_time)

    def processes(self):
        table = []
        attrs = ["pid", "create_time", "name", "cpu_times", "memory_info", "status"]
        for p in self.psutil.process_iter([*attrs, "uids"]):  # POSIX: it has uids
            info = p.info
            if info["cpu_times"] is None or info["memory_info"] is None:
                continue  # access denied or gone
            uids = info.get("uids")
            user = self.user_name(uids.real) if uids else ""
            table.append(
                (
                    info["pid"],
                    info["create_time"],
                    info["name"] or "",
                    info["cpu_times"].user + info["cpu_times"].system,
                    info["memory_info"].rss,
                    info["status"] or "unknown",
                    user,
                )
            )
        return table


def pick_source():
    """/proc on Linux, psutil elsewhere. On Linux psutil reads the same files
    and gives the same readings, no faster (0.12 vs 0.13 ms a tick), and
    importing it costs 0.8 MiB: a quarter of what the agent itself needs."""
    if LINUX:
        return ProcSource()
    try:
        import psutil
    except ImportError:
        raise DependencyError(
            "psutil is not installed, and this system has no Linux /proc to read "
            "metrics from instead: install it with 'pip install psutil'"
        ) from None
    return PsutilSource(psutil)


###############################################################################
# Metrics: collector ##########################################################
###############################################################################


def real_filesystems(mounts, include_network):
    """Disks worth reporting: one entry per device, pseudo filesystems left out."""
    chosen = {}
    for device, mount, fstype in mounts:
        network = fstype in NETWORK_FS or fstype.startswith("nfs")
        if network and not include_network:
            continue
        if not network and (
            fstype in PSEUDO_FS
            or not device.startswith("/")
            or device.startswith("/dev/loop")
        ):
            continue
        # Bind mounts repeat a device: keep its shortest mount point
        # ("/" rather than /var/lib/docker).
        if device not in chosen or len(mount) < len(chosen[device][1]):
            chosen[device] = (device, mount, fstype)
    return sorted(chosen.values(), key=lambda m: m[1])


def disk_usage(path):
    """statvfs figures as df shows them: used excludes the root-reserved blocks."""
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    return total, used, free, percent(used, used + free)


class MetricsCollector:
    """Turns readings of a source into the `data` of a metrics message."""

    def __init__(
        self, source, top_processes=None, process_refresh_s=15.0,
        include_network_fs=False, containers=None,
    ):
        self.source = source
        # () -> (containers, docker status); the Docker section provides it
        self.containers = containers or (lambda: ([], {"status": "disabled"}))
        self.top_processes = top_processes  # the top N by CPU; None: every one
        self.process_refresh_s = process_refresh_s
        self.include_network_fs = include_network_fs
        self.hostname = socket.gethostname()
        self._cpu = self._net = None
        self._net_at = 0.0
        self._procs, self._procs_at, self._top = {}, None, []
        self._top_measured = False  # False until a table has a previous one to compare
        self._failed = set()  # sections whose failure was logged already
        self._slow = {}  # name -> (read at, value): readings that change rarely

    @classmethod
    def for_config(cls, config, containers, source=None):
        """The collector the settings ask for (the agent's and --once's)."""
        return cls(source or pick_source(), config.top_processes or None,  # 0: all
                   config.process_refresh_s, config.disk_include_network, containers)

    def prime(self):
        """Read the baselines the first sample's CPU, network and processes need."""
        self._cpu = self.source.cpu_times()
        self._net, self._net_at = self.source.net(), time.monotonic()
        if self.top_processes != 0:
            self._refresh_processes()

    def collect(self):
        data = {
            "timestamp": utc_now(),
            "hostname": self.hostname,
            "agent_version": __version__,
        }
        errors = {}
        for section, read in (
            ("cpu", self._cpu_section),
            ("memory", self._memory_section),
            ("disk", self._disk_section),
            ("network", self._net_section),
            ("processes", self._process_section),
        ):
            try:
                data[section] = read()
                self._failed.discard(section)
            except (OSError, ValueError, IndexError, KeyError, RuntimeError) as e:
                errors[section] = f"{type(e).__name__}: {e}"
                if section not in self._failed:
                    LOG.warning("metrics: cannot read %s: %s", section, errors[section])
                    self._failed.add(section)
        data.update(self._host_section())
        data["containers"], data["docker"] = self.containers()
        if errors:
            data["errors"] = errors
        return data

    def _every(self, name, period_s, read):
        """`read()` at most every `period_s`, the last value in between."""
        at, value = self._slow.get(name, (None, None))
        now = time.monotonic()
        if at is None or now - at >= period_s:
            value = read()
            self._slow[name] = (now, value)
        return value

    def _cpu_section(self):
        now = self.source.cpu_times()
        before = self._cpu if self._cpu and len(self._cpu) == len(now) else now
        self._cpu = now
        per_core = [
            tenths(percent(max(0.0, b1 - b0), t1 - t0))
            for (b0, t0), (b1, t1) in zip(before, now)
        ]
        busy = sum(max(0.0, b1 - b0) for (b0, _), (b1, _) in zip(before, now))
        total = sum(t1 - t0 for (_, t0), (_, t1) in zip(before, now))
        return {
            "usage_percent": percent(busy, total),
            "cores": len(now),
            "frequency_mhz": self._every(
                "frequency", SLOW_REFRESH_S, self.source.frequency_mhz
            ),
            "per_core": per_core,
        }

    def _memory_section(self):
        total, available, swap_total, swap_free = self.source.memory()
        used = total - available  # the same in both sources, and across psutil versions
        return {
            "total_gb": gib(total),
            "used_gb": gib(used),
            "available_gb": gib(available),
            "usage_percent": percent(used, total),
            "swap_total_gb": gib(swap_total),
            "swap_used_gb": gib(swap_total - swap_free),
            "swap_usage_percent": percent(swap_total - swap_free, swap_total),
        }

    def _disk_section(self):
        total, used, free, pct = disk_usage("/")
        section = {
            "total_gb": gib(total),
            "used_gb": gib(used),
            "available_gb": gib(free),
            "usage_percent": pct,
            "filesystems": [],
        }
        filesystems = self._every("filesystems", SLOW_REFRESH_S, self._filesystems)
        for device, mount, fstype in filesystems:
            try:
                t, u, f, p = disk_usage(mount)
            except OSError:
                continue  # unmounted meanwhile, or not ours to read
            section["filesystems"].append(
                {
                    "mount": mount,
                    "device": device,
                    "fstype": fstype,
                    "total_bytes": t,
                    "used_bytes": u,
                    "free_bytes": f,
                    "usage_percent": p,
                }
            )
        return section

    def _filesystems(self):
        return real_filesystems(self.source.mounts(), self.include_network_fs)

    def _net_section(self):
        now, at = self.source.net(), time.monotonic()
        before, elapsed = self._net or now, max(at - self._net_at, 1e-6)
        self._net, self._net_at = now, at
        interfaces = []
        for name in sorted(now):
            counts = now[name]
            if not any(counts):
                continue  # never carried a packet (an unused ifb or dummy): no news
            rates = [
                max(0, c - b) / elapsed
                for c, b in zip(counts, before.get(name, counts))
            ]
            interfaces.append(
                {
                    "name": name,
                    "bytes_sent": counts[0],
                    "bytes_recv": counts[1],
                    "packets_sent": counts[2],
                    "packets_recv": counts[3],
                    "bytes_sent_per_s": tenths(rates[0]),
                    "bytes_recv_per_s": tenths(rates[1]),
                    "packets_sent_per_s": tenths(rates[2]),
                    "packets_recv_per_s": tenths(rates[3]),
                }
            )
        totals = [sum(c[i] for c in now.values()) for i in range(4)]
        return {
            "bytes_sent": totals[0],
            "bytes_recv": totals[1],
            "packets_sent": totals[2],
            "packets_recv": totals[3],
            "interfaces": interfaces,
        }

    def _host_section(self):
        host = {}
        with contextlib.suppress(OSError, AttributeError):
            host["load_average"] = [round(x, 2) for x in os.getloadavg()]
        with contextlib.suppress(OSError, ValueError):
            host["uptime_s"] = int(self.source.uptime_s())
        return host

    def _process_section(self):
        due = (
            not self._top_measured
            or time.monotonic() - self._procs_at >= self.process_refresh_s
        )
        if self.top_processes != 0 and due:
            self._refresh_processes()
        return self._top

    def _refresh_processes(self):
        """CPU % of one core over the refresh window, sorted, the top N (or
        all); reused until the next."""
        now, table = time.monotonic(), self.source.processes()
        elapsed = now - self._procs_at if self._procs_at else None
        seen, rows = {}, []
        for pid, started, name, cpu_s, rss, status, user in table:
            seen[(pid, started)] = cpu_s
            previous = self._procs.get((pid, started))
            cpu = (
                tenths(percent(cpu_s - previous, elapsed))
                if elapsed and previous is not None
                else 0
            )
            rows.append(
                {
                    "pid": pid,
                    "name": name,
                    "cpu": cpu,
                    "memory": tenths(rss / 1024**2),
                    "status": status,
                    "user": user,
                }
            )
        rows.sort(key=lambda r: (r["cpu"], r["memory"]), reverse=True)
        self._procs, self._procs_at, self._top = seen, now, rows[: self.top_processes]
        self._top_measured = elapsed is not None


###############################################################################
# Protocol: messages, and the two forms of a request ##########################
###############################################################################

ID_FIELDS = ("request_id", "command_id")


def reply_ids(message):
    """The ids of a request to copy into its reply (see `usable_id`)."""
    ids = {}
    for field in ID_FIELDS:
        value = usable_id(message.get(field)) if isinstance(message, dict) else None
        if value is not None:
            ids[field] = value
    return ids


def is_reply(message):
    """True for a message that answers a request (it carries the request's id);
    a stream chunk is not the answer."""
    return message.get("type") != "command_output" and bool(reply_ids(message))


class Dialect:
    """One of the two forms a request comes in (docs/protocol.md, "Two
    forms"), chosen by the request's type in REQUESTS; the reply is made in
    the same form. Every shape of reply is made here: nothing else asks which
    form a request came in."""

    def __init__(self, id_field, nested, command_reply, cancel_reply, docker_reply):
        self.id_field = id_field  # where the request's id is, and the reply's goes
        self.nested = nested  # a reply's fields go under "data"
        self.command_reply = command_reply
        self.cancel_reply = cancel_reply
        self.docker_reply = docker_reply  # None: the type of the action's row

    def request_id(self, message):
        """The request's id, or RequestError: without one it cannot be answered."""
        request_id = reply_ids(message).get(self.id_field)
        if request_id is None or request_id == "":
            raise RequestError(f"the request has no usable '{self.id_field}'")
        return request_id

    def _reply(self, message_type, request_id, fields):
        ids = {self.id_field: request_id}
        if self.nested:
            return dict({"type": message_type}, **ids, data=fields)
        return dict({"type": message_type}, **ids, **fields)

    def command_result(self, request_id, fields):
        return self._reply(self.command_reply, request_id, fields)

    def command_output(self, request_id, seq, text):
        """A chunk of a streamed command's output; not its answer."""
        return self._reply("command_output", request_id, {"seq": seq, "output": text})

    def cancel_result(self, request_id, target, cancelled, state, text):
        return self._reply(self.cancel_reply, request_id, {
            "target_id": target, "cancelled": cancelled, "state": state,
            "message": text})

    def docker_result(self, request_id, route, ref, text, fields):
        """A Docker action carried out: the API's form has a reply type and a
        status word per action (its row in REQUESTS), the docs' one type."""
        ref = {"container_id": ref} if ref else {}
        if self.docker_reply is None:
            status = {"status": route.status} if route.status else {}
            return self._reply(route.reply, request_id, dict(ref, **status, **fields))
        return self._reply(self.docker_reply, request_id,
                           dict(success=True, message=text, **ref, **fields))

    def failure(self, lane, request_id, text):
        """A request not carried out (refused, busy, expired, failed); the API
        shows `message` to its user."""
        return self._failure(lane, {self.id_field: request_id}, text)

    def refusal(self, lane, message, text):
        """A message refused before it became a job: with every usable id it
        carried, since its own may be the one that is missing."""
        return self._failure(lane, reply_ids(message), text)

    def _failure(self, lane, ids, text):
        if lane == "docker" and self.docker_reply is not None:  # the docs' form
            return dict({"type": self.docker_reply}, **ids, success=False,
                        message=text)
        return dict({"type": "error"}, **ids, message=text)


API = Dialect("request_id", nested=True, command_reply="command_result",
              cancel_reply="cancel_result", docker_reply=None)
DOCS = Dialect("command_id", nested=False, command_reply="command_response",
               cancel_reply="cancel_response", docker_reply="docker_response")


def dialect_of(message):
    """The form of a message whose type both forms share (cancel_command,
    the agent's own): the id it carries decides."""
    return API if "request_id" in message else DOCS


class Job:
    """An accepted request, from its queue to its reply (see Requests).

    A job carries its row of REQUESTS (what runs it, in which lane) and what
    it needs to answer in its request's form; where it stands (queued,
    running) is kept by Requests, under one lock.
    """

    def __init__(self, route, dialect, request_id):
        self.route = route
        self.lane = route.lane
        self.dialect = dialect
        self.id = request_id
        self.received_at = time.monotonic()

    def error(self, text):
        """The reply of a request that was not carried out, saying why."""
        return self.dialect.failure(self.lane, self.id, text)

    def cancelled_unstarted(self, by):
        return self.error(f"cancelled by {by} before it started; nothing was done")


def parse_frame(payload):
    """(message, None) for a JSON object with a string `type`, else (None, why)."""
    if isinstance(payload, bytes):
        try:
            payload = payload.decode("utf-8")
        except UnicodeDecodeError:
            return None, "frame is not UTF-8 text"
    try:
        message = json.loads(payload)
    except (ValueError, RecursionError) as e:
        return None, f"frame is not JSON ({str(e)[:100]})"
    if not isinstance(message, dict):
        return None, "frame is JSON but not an object"
    if not isinstance(message.get("type"), str):
        return message, "message has no string field 'type'"
    return message, None


def request_field(message, name, kinds, what, default=None):
    """message[name] if it is of `kinds` (JSON true is no number), else RequestError."""
    value = message.get(name, default)
    if value is None:
        return None
    if (kinds is bool) != isinstance(value, bool) or not isinstance(value, kinds):
        raise RequestError(f"'{name}' must be {what}, got {json.dumps(value)[:60]}")
    return value


# The heartbeat's ping, which also shows (by its pong) that samples were read.
PING_MESSAGE = to_json({"type": "ping"})
# What --check sends in place of `auth`: the ChatOps server closes with 1008
# and registers nothing (PROTOCOL.md, section 9), so a service that runs with
# the same key keeps its connection.
PROBE_MESSAGE = to_json({"type": "check"})


def auth_server_id(message):
    """auth_success's server_id if it can go back in metrics; an unusable one
    (NaN, an object, ...) is logged and left out of them."""
    if "server_id" not in message:
        return None
    server_id = usable_id(message["server_id"])
    if server_id is None:
        LOG.warning(
            "auth_success carried an unusable server_id (%s); metrics are sent "
            "without one",
            shown(message["server_id"]),
        )
    return server_id


###############################################################################
# Commands ####################################################################
###############################################################################

COMMAND_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
READ_CHUNK = 65536
LINE_CUT_SEARCH = 4096  # a cut of long output moves this far to end a line
POLL_S = 0.1  # how often a running command looks at its deadline and cancel flag
DRAIN_S = 0.5  # after the shell exits, how long background jobs may hold the pipe
STREAM_FLUSH_S = 0.2  # streamed output is sent at least this often, in chunks
MAX_COMMAND_CHARS = 65536
MAX_TIMEOUT_S = 7 * 86400.0  # a request's timeout beyond this is absurd: refused
ORPHAN_SCAN_S = 60.0  # and look through /proc for any others this often
EXIT_TIMEOUT, EXIT_CANCELLED = 124, 130
# The child that matches a command against command_allow (CommandRunner.refusal).
ALLOW_MATCH = ("import json,re,sys;c,p=json.load(sys.stdin);"
               "sys.exit(0 if any(re.fullmatch(x,c) for x in p) else 1)")
ALLOW_MATCH_TIMEOUT_S = 2.0
PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
JOB_TAG = "CHATOPS_JOB"  # in each command's environment: AGENT_PID.N


@functools.lru_cache(maxsize=None)
def linux_libc():
    """The C library through ctypes on Linux (glibc or musl), else None: also
    where Python was built without ctypes (no libffi), when only the extras it
    gives are missing (the subreaper, the trimming of freed memory). Loaded on
    first use: only the running agent needs it."""
    if not LINUX:
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return None


def death_signal_setter():
    """For Popen's preexec_fn: the child gets SIGKILL when the thread that
    started it ends (PR_SET_PDEATHSIG; the thread, not the process, is the
    kernel's parent). None off Linux or without ctypes: there a killed agent
    leaves it behind. It runs in the child between fork and exec, so it only
    calls what is ready: the function looked up here, and getppid to catch
    a parent that died before the signal was set."""
    libc = linux_libc()
    if libc is None:
        return None
    prctl, parent, kill = libc.prctl, os.getpid(), int(signal.SIGKILL)

    def set_death_signal():
        prctl(PR_SET_PDEATHSIG, kill, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return set_death_signal


class Children:
    """The processes the agent starts, and the orphans it adopts.

    As a child subreaper (Linux), the agent inherits what its commands leave
    behind when their shell exits, instead of PID 1 — which may not reap
    them (in a container whose PID 1 is the agent, or under a minimal init).
    Such orphans are reaped here: by process group for commands whose group
    outlived their shell, and by a scan of /proc once a minute for daemons
    that left their group. Processes the agent started itself are reaped
    only by their owners, or their exit status would be lost.

    Each command carries a tag in its environment (JOB_TAG), which whatever
    it starts inherits, so that what left the command's group (setsid) and
    was orphaned can still be found and ended with it.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._owned = {}  # pid -> Popen: our own children not yet waited for
        self._closed = False  # set by stop(): nothing starts any more
        self._groups = set()  # groups that outlived their shell
        self._scan_at = math.inf  # no scan until a command has run
        self._tag_prefix = f"{os.getpid()}."
        self._tags = itertools.count(1)

    def new_tag(self):
        """A tag for one command's environment: JOB_TAG=tag."""
        return self._tag_prefix + str(next(self._tags))

    def become_subreaper(self):
        libc = linux_libc()
        if libc is None:
            return
        try:
            if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
                import ctypes  # loaded already, by linux_libc()

                raise OSError(ctypes.get_errno(), "prctl")
        except (OSError, AttributeError) as e:
            LOG.debug("cannot become a child subreaper: %s", e)

    def spawn(self, argv, die_with_agent=False, **popen_args):
        """A Popen, started in a session of its own; OSError once stop()
        has run. `die_with_agent`: the child is killed when the thread that
        starts it ends, so also when the agent is killed (SIGKILL, the OOM
        killer), which nothing else could clean up after; for processes that
        would never end on their own (`docker events`), or not in time."""
        preexec = death_signal_setter() if die_with_agent else None
        with self._lock:
            if self._closed:
                raise OSError("not started: the agent is shutting down")
            proc = subprocess.Popen(argv, start_new_session=True,
                                    preexec_fn=preexec, **popen_args)
            self._owned[proc.pid] = proc
        return proc

    def call(self, argv, timeout_s, max_bytes, env=None, data=b""):
        """(returncode, stdout, stderr) of a short-lived program given `data`
        on its stdin, or None when it did not end within `timeout_s` (it is
        killed then, and with the agent if that comes first); OSError when it
        cannot start. Each output keeps its last max_bytes (see read_pipes)."""
        deadline = time.monotonic() + timeout_s
        proc = self.spawn(argv, die_with_agent=True,
                          stdin=subprocess.PIPE if data else subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            fed = feed(proc.stdin, data, deadline) if data else True
            out, err = read_pipes(proc, deadline, max_bytes) if fed else (None, None)
        finally:
            self.finish(proc)
        return None if out is None else (proc.returncode, out, err)

    def finish(self, proc):
        """The end of a process spawn() started: killed if it still runs,
        waited for, its pipes closed; its group is looked at (see _reaped)."""
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        self._reaped(proc)

    def stop(self):
        """At shutdown, once commands have had their TERM and grace: kill what
        they left running, and every process the agent started that still
        runs (a docker CLI call in flight, a command that outlived its KILL's
        wait), with its group; start none from now on. Else they would
        outlive the agent, orphaned to PID 1."""
        self.signal_leftovers(signal.SIGKILL)
        with self._lock:
            self._closed = True
            running = [p for p in self._owned.values() if not leader_exited(p)]
        for proc in running:  # unreaped, so its pid is still its own
            signal_group(proc.pid, signal.SIGKILL)

    def _reaped(self, proc):
        """`proc` has been waited for; see whether its group lives on."""
        with self._lock:
            self._owned.pop(proc.pid, None)
            self._scan_at = min(self._scan_at, time.monotonic() + ORPHAN_SCAN_S)
        try:
            os.killpg(proc.pid, 0)  # signal 0: only asks whether the group exists
        except (ProcessLookupError, PermissionError):
            return
        with self._lock:
            self._groups.add(proc.pid)

    def reap_group(self, pgid, timeout_s):
        """After killing a group: reap its members as they die, up to `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not self._reap_group_now(pgid) and time.monotonic() < deadline:
            time.sleep(0.01)

    @staticmethod
    def _reap_group_now(pgid):
        """Reap the group's dead members that are our children; True if none is left."""
        while True:
            try:
                pid, _ = os.waitpid(-pgid, os.WNOHANG)
            except ChildProcessError:
                return True
            if pid == 0:
                return False

    def reap(self):
        """Reap adopted orphans: of tracked groups now, any others once a minute."""
        with self._lock:
            self._groups = {g for g in self._groups if not self._reap_group_now(g)}
            if time.monotonic() < self._scan_at:
                return
            self._scan_at = time.monotonic() + ORPHAN_SCAN_S
            for pid, (state, ppid, _) in process_table().items():
                if state == "Z" and ppid == os.getpid() and pid not in self._owned:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)

    def signal_job(self, shell_pid, tag, sig):
        """Signal a command's whole tree: its process group, and every process
        that descends from its shell or carries its tag: what left the group
        with setsid, whether its parent is still the shell or it was orphaned."""
        signal_group(shell_pid, sig)
        table = process_table()
        escaped = descendants(table, shell_pid) | tagged(table, tag_needle(tag))
        self._signal(escaped - {shell_pid}, sig)

    def signal_leftovers(self, sig):
        """At shutdown: signal what commands left running (nohup jobs, daemons):
        every process below the agent or with one of its tags, but for the
        agent's own children and the groups of running commands, which their
        owners stop."""
        table = process_table()
        ours = descendants(table, os.getpid()) | tagged(
            table, tag_needle(self._tag_prefix, whole=False)
        )
        with self._lock:
            owned = set(self._owned)
        self._signal({p for p in ours - owned if table[p][2] not in owned}, sig)

    def _signal(self, pids, sig):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        if pids:
            with self._lock:
                self._scan_at = 0.0  # reap at the next look: they may be ours now


def process_table():
    """{pid: (state, ppid, pgid)} of every process, from /proc ({} without it)."""
    table = {}
    if not HAVE_PROC:
        return table
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    with open(f"/proc/{entry}/stat", errors="replace") as f:
                        _, fields = proc_stat(f.read())
                    table[int(entry)] = (fields[0], int(fields[1]), int(fields[2]))
    return table


def descendants(table, root):
    """The pids below `root` in the process tree of `table`."""
    children = {}
    for pid, (_, ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def tag_needle(tag, whole=True):
    """What JOB_TAG=tag looks like in /proc/PID/environ (whole: not a prefix)."""
    return f"\0{JOB_TAG}={tag}{chr(0) if whole else ''}".encode()


def tagged(table, needle):
    """The pids of `table` whose environment holds `needle`."""
    found = set()
    for pid in table:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/environ", "rb") as f:
            if needle in b"\0" + f.read():
                found.add(pid)
    return found


def leader_exited(proc):
    """True once the shell has exited, without reaping it: while it is unreaped,
    its pid, and so the group id, cannot be reused, and killpg stays safe."""
    if HAVE_WAITID:
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        try:
            return os.waitid(os.P_PID, proc.pid, flags) is not None
        except ChildProcessError:
            return True
    return proc.poll() is not None


@contextlib.contextmanager
def exit_watch(proc):
    """A descriptor that turns readable when `proc` exits (a pidfd: Linux 5.3
    and Python 3.9 on), or None, and the caller polls. Waking on the exit
    itself, rather than polling after the output's end, saves 1 to 2 ms of
    every short command."""
    fd = None
    with contextlib.suppress(OSError):  # a kernel before 5.3, or a seccomp filter
        fd = os.pidfd_open(proc.pid) if HAVE_PIDFD else None  # novermin: guarded
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def signal_group(pgid, sig):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def feed(pipe, data, deadline):
    """Write `data` to a child's stdin and close it; False at the deadline (a
    child that does not read). A child that has exited already is fed: what
    it printed tells what happened."""
    os.set_blocking(pipe.fileno(), False)
    with memoryview(data) as view, selectors.DefaultSelector() as selector:
        selector.register(pipe, selectors.EVENT_WRITE)
        while view:
            if not selector.select(max(0.0, deadline - time.monotonic())):
                return False
            try:
                view = view[os.write(pipe.fileno(), view):]
            except BrokenPipeError:
                break
    pipe.close()
    return True


def read_pipes(proc, deadline, max_bytes):
    """(stdout, stderr) bytes, (None, None) at the deadline.

    Each keeps the *last* max_bytes of its stream, cut at a line boundary: the
    newest lines are what matter (a log's tail, an error's last words), and a
    cut line would be a broken JSON row.
    """
    kept = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    with selectors.DefaultSelector() as selector:
        for pipe in kept:
            selector.register(pipe, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None, None
            for key, _ in selector.select(remaining):
                data = os.read(key.fd, READ_CHUNK)
                if not data:
                    selector.unregister(key.fileobj)
                    continue
                buffer = kept[key.fileobj]
                buffer += data
                if len(buffer) > 2 * max_bytes:  # trim now and then, not each read
                    del buffer[:-max_bytes]
    out, err = kept[proc.stdout], kept[proc.stderr]
    return last_lines(out, max_bytes), last_lines(err, max_bytes)


def last_lines(buffer, max_bytes):
    """The whole lines within the last max_bytes of `buffer`."""
    if len(buffer) <= max_bytes:
        return bytes(buffer)
    tail = buffer[-max_bytes:]
    return bytes(tail[tail.find(b"\n") + 1 :])


class OutputCapture:
    """The first and last halves of a command's output, `cap` bytes in all."""

    def __init__(self, cap):
        self.head_cap = cap // 2
        self.tail_cap = cap - self.head_cap
        self.head = bytearray()
        self.tail = collections.deque()
        self.tail_size = 0
        self.total = 0
        self.dropped_end = b""  # the last byte dropped before the tail

    def add(self, data):
        self.total += len(data)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail.append(data)
            self.tail_size += len(data)
            while self.tail_size - len(self.tail[0]) >= self.tail_cap:
                dropped = self.tail.popleft()
                self.tail_size -= len(dropped)
                self.dropped_end = dropped[-1:]

    def text(self, footer=""):
        """(output + footer, truncated): decoded with replacement, a marker where
        cut. A cut moves to a line boundary within LINE_CUT_SEARCH bytes, so
        that both parts hold whole lines; the marker counts what it omits."""
        tail = b"".join(self.tail)
        start = max(0, len(tail) - self.tail_cap)  # where the kept tail starts
        if self.total == len(self.head) + len(tail) - start:
            return (bytes(self.head) + tail).decode("utf-8", "replace") + footer, False
        head = self.head[: line_end(self.head)]
        before = tail[start - 1 : start] if start else self.dropped_end
        tail = tail[line_start(tail, start, before) :]
        omitted = self.total - len(head) - len(tail)
        marker = f"\n[... {omitted} bytes of output omitted ...]\n"
        return "".join((head.decode("utf-8", "replace"), marker,
                        tail.decode("utf-8", "replace"), footer)), True


def line_end(head):
    """Where to end a kept head: after its last newline near the end, if any."""
    newline = head.rfind(b"\n", max(0, len(head) - LINE_CUT_SEARCH))
    return newline + 1 if newline >= 0 else len(head)


def line_start(tail, start, before):
    """Where to start a kept tail: at `start` if `before` (the byte before it)
    ends a line, else after the next newline near it, if any."""
    if before == b"\n":
        return start
    newline = tail.find(b"\n", start, start + LINE_CUT_SEARCH)
    return newline + 1 if newline >= 0 else start


class OutputStream:
    """Sends output as `command_output` chunks when a request asked to stream.

    Chunks are gathered for STREAM_FLUSH_S, decoded incrementally (a UTF-8
    character split between reads stays whole), and stop after `cap` bytes:
    the final reply still has the head and tail of everything.
    """

    def __init__(self, job, send, cap):
        self.job = job
        self.send = send
        self.cap = cap
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.buffer = bytearray()
        self.sent_bytes = 0
        self.seq = 0
        self.flushed_at = time.monotonic()
        self.stopped = False

    def add(self, data):
        if not self.stopped:
            self.buffer += data[: max(0, self.cap - self.sent_bytes - len(self.buffer))]

    def tick(self, now):
        if self.buffer and now - self.flushed_at >= STREAM_FLUSH_S:
            self.flush()

    def flush(self, final=False):
        self.flushed_at = time.monotonic()
        text = self.decoder.decode(bytes(self.buffer), final)
        self.sent_bytes += len(self.buffer)
        self.buffer.clear()
        if self.sent_bytes >= self.cap and not self.stopped:
            self.stopped = True
            text += f"\n[streaming stopped after {self.cap} bytes]\n"
        if text:
            self.seq += 1
            self.send(self.job.dialect.command_output(self.job.id, self.seq, text))


class PumpState:
    """Where reading a command's output stands."""

    def __init__(self, proc, tag):
        self.proc = proc
        self.tag = tag  # JOB_TAG in its environment: finds what left its group
        self.eof = False
        self.exited_at = None  # when the shell was seen to exit
        self.reason = None  # "timeout" or "cancelled" once the group was stopped
        self.cancelled_by = None
        self.grace_s = None  # between SIGTERM and SIGKILL, once stopped
        self.term_at = None
        self.killed = False
        self.pause_s = 0.0005

    def finished(self, now):
        # Done when the shell exited and the pipe closed, or DRAIN_S after the
        # exit if a background job keeps the pipe open.
        return self.exited_at is not None and (
            self.eof or now - self.exited_at > DRAIN_S
        )

    def pause(self):
        """Wait a little for the shell's exit: 0.5 ms first (it is usually that
        close behind EOF), growing to POLL_S."""
        time.sleep(self.pause_s)
        self.pause_s = min(POLL_S, self.pause_s * 2)


class CommandJob(Job):
    """One shell command request."""

    def __init__(self, route, dialect, request_id, command, timeout_s, grace_s, cwd,
                 stream, by):
        super().__init__(route, dialect, request_id)
        self.command = command
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self.cwd = cwd
        self.stream = stream
        self.requested_by = by
        # Cancels reach the worker running it through this queue: (by whom,
        # the grace before SIGKILL). Once the worker has settled how the
        # command ended, none is taken: a cancel then says so, and the two
        # replies never disagree about whether it was cancelled.
        self.stops = queue.SimpleQueue()
        self._stops_lock = threading.Lock()
        self._settled = False

    def describe(self):
        by = f" by {self.requested_by}" if self.requested_by else ""
        return f"command {self.id}{by}: {self.command[:200]!r}"

    def result(self, fields):
        return self.dialect.command_result(self.id, fields)

    def cancelled_unstarted(self, by):
        text = f"[cancelled by {by} before it started]\n"
        return self.result(result_fields(text, EXIT_CANCELLED, cancelled=True))

    def cancel_running(self, by, grace_s=None):
        """(cancelled, state, text): the worker stops its group as a timeout
        would, with at most `grace_s` (or command_grace_s) before SIGKILL;
        unless it has settled already how the command ended."""
        with self._stops_lock:
            if self._settled:
                return False, "finished", (f"command {self.id!r} had already "
                                           "ended; its own reply says how")
            self.stops.put((by, self.grace_s if grace_s is None else grace_s))
        return True, "running", f"command {self.id!r} cancelled"

    def settle(self):
        """True, and no cancel is taken from now on, unless one came that the
        worker has not read yet (then False: it reads it first)."""
        with self._stops_lock:
            self._settled = self.stops.empty()
            return self._settled


def parse_command_request(message, route, config):
    """A CommandJob this agent may run, or RequestError saying why not."""
    if not config.commands_enabled:
        raise RequestError("command execution is disabled on this agent")
    request_id = route.dialect.request_id(message)
    command = request_field(message, "command", str, "a string")
    if command is None or not command.strip():
        raise RequestError("'command' is missing or empty")
    if len(command) > MAX_COMMAND_CHARS or "\0" in command:
        raise RequestError(
            f"'command' is longer than {MAX_COMMAND_CHARS} characters or holds NUL"
        )
    timeout = request_field(message, "timeout", (int, float), "a number of seconds")
    if timeout is not None and not 0 < timeout <= MAX_TIMEOUT_S:
        raise RequestError(f"'timeout' must be between 0 and {MAX_TIMEOUT_S:.0f} s")
    stream = request_field(message, "stream", bool, "true or false", False)
    cwd = request_cwd(message, config)
    by = request_field(message, "requested_by", str, "a string")
    timeout_s = min(timeout or config.command_timeout_s, config.command_timeout_s)
    return CommandJob(route, route.dialect, request_id, command, timeout_s,
                      config.command_grace_s, cwd, stream, by and by[:100])


def request_cwd(message, config):
    cwd = request_field(message, "cwd", str, "a string")
    if cwd is None:
        return config.command_cwd
    if not config.command_allow_cwd:
        raise RequestError("this agent does not let requests choose 'cwd'")
    if not os.path.isabs(cwd) or not os.path.isdir(cwd):
        raise RequestError(
            f"'cwd' {cwd[:200]!r} is not an absolute path to a directory"
        )
    return cwd


def command_environment(config):
    """What commands see: a fixed set, never the agent's own (it holds the key)."""
    try:
        user = pwd.getpwuid(os.geteuid())
    except KeyError:
        user = None
    env = {"PATH": COMMAND_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
           "HOME": user.pw_dir if user else "/", "TERM": "dumb",
           "USER": user.pw_name if user else str(os.geteuid()),
           "LOGNAME": user.pw_name if user else str(os.geteuid())}
    env.update(config.command_env)
    return env


def result_fields(output, exit_code, truncated=False, output_bytes=0,
                  timed_out=False, cancelled=False):
    """The fields of a command's reply (duration_ms is added by the runner)."""
    return {"output": output, "exit_code": exit_code, "duration_ms": 0,
            "truncated": truncated, "output_bytes": output_bytes,
            "timed_out": timed_out, "cancelled": cancelled}


class CommandRunner:
    """Runs one command in a worker of the command lane: its process group, its
    output, its timeout and cancel, its reply."""

    def __init__(self, config, send, children):
        self.config = config
        self.send = send  # Outbox.put, for streamed output
        self.children = children
        self.env = None

    def start(self):
        self.env = command_environment(self.config)
        self.children.become_subreaper()

    def refusal(self, job):
        """Why command_allow does not let the job run, or None if it does.

        Matched in a child process, with a deadline: an expression with
        nested repeats ('(a+)+$') takes time exponential in the command's
        length, and Python's re holds the interpreter lock all the while: in
        the agent it would freeze every thread. Undecided is refused."""
        if not self.config.command_allow:
            return None
        data = json.dumps([job.command, self.config.command_allow]).encode()
        try:
            result = self.children.call(
                [sys.executable, "-I", "-S", "-c", ALLOW_MATCH],
                ALLOW_MATCH_TIMEOUT_S, 4096, data=data)
        except OSError as e:
            return f"command_allow could not be checked ({e})"
        if result is None:
            return (f"deciding command_allow took more than {ALLOW_MATCH_TIMEOUT_S:g} "
                    "s: does one of its expressions have nested repeats, as (a+)+? "
                    "Fix command_allow")
        if result[0] == 1:
            return "it matches none of this agent's allowed commands (command_allow)"
        if result[0] != 0:
            why = one_line(result[2].decode("utf-8", "replace").strip()[-200:])
            return f"command_allow could not be checked ({why})"
        return None

    def execute(self, job):
        """Run the job's command; its reply. Orphans are reaped afterwards."""
        refusal = self.refusal(job)
        if refusal:
            LOG.warning("refused %s: %s", job.describe(), refusal)
            return job.error(f"command refused: {refusal}")
        LOG.info("%s started", job.describe())
        started = time.monotonic()
        try:
            result = self._run(job)
        except OSError as e:
            result = result_fields(f"cannot start the command: {e}\n", 127)
        result["duration_ms"] = int((time.monotonic() - started) * 1000)
        LOG.info("command %s ended: exit %s in %d ms, %d bytes of output%s", job.id,
                 result["exit_code"], result["duration_ms"], result["output_bytes"],
                 " (timed out)" if result["timed_out"] else
                 " (cancelled)" if result["cancelled"] else "")
        self.children.reap()
        return job.result(result)

    def _run(self, job):
        tag = self.children.new_tag()
        proc = self.children.spawn(
            ["/bin/sh", "-c", job.command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=job.cwd,
            env=dict(self.env, **{JOB_TAG: tag}),
        )
        capture = OutputCapture(self.config.command_output_max_bytes)
        stream = OutputStream(job, self.send, capture.head_cap + capture.tail_cap) \
            if job.stream else None
        state = PumpState(proc, tag)
        try:
            self._pump(job, state, capture, stream)
        finally:
            self.children.finish(proc)
        if state.reason:  # what the command started may now be our children
            self.children.reap_group(proc.pid, timeout_s=1.0)
        if stream:
            stream.flush(final=True)
        return self._result(job, proc.returncode, capture, state)

    def _pump(self, job, state, capture, stream):
        """Read output until EOF and the shell's exit; on timeout or cancel stop
        the whole group, and say why in `state.reason`.

        The group is signalled only while the shell is unreaped, so that its
        id cannot belong to anyone else yet.
        """
        fd = state.proc.stdout.fileno()
        deadline = time.monotonic() + job.timeout_s
        with selectors.DefaultSelector() as selector, exit_watch(state.proc) as exit_fd:
            selector.register(fd, selectors.EVENT_READ)
            if exit_fd is not None:
                selector.register(exit_fd, selectors.EVENT_READ)
            while True:
                now = time.monotonic()
                self._enforce_limits(job, state, now, deadline)
                if state.exited_at is None and leader_exited(state.proc):
                    state.exited_at = now
                    if exit_fd is not None:
                        selector.unregister(exit_fd)
                if state.finished(now) and job.settle():
                    break
                if stream:
                    stream.tick(now)
                if state.eof and exit_fd is None:
                    state.pause()  # the shell closed its output but still runs
                    continue
                for key, _ in selector.select(POLL_S):
                    if key.fd == fd:
                        data = os.read(fd, READ_CHUNK)
                        state.eof = not data
                        if state.eof:
                            selector.unregister(fd)
                        capture.add(data)
                        if stream:
                            stream.add(data)
        if state.reason:  # nothing it started survives
            self.children.signal_job(state.proc.pid, state.tag, signal.SIGKILL)

    def _enforce_limits(self, job, state, now, deadline):
        """SIGTERM to the group on timeout or cancel, SIGKILL after the grace."""
        stop = None
        with contextlib.suppress(queue.Empty):
            stop = job.stops.get_nowait()  # (by whom, grace_s)
        if state.reason is None and (stop or now >= deadline):
            state.reason = "cancelled" if stop else "timeout"
            state.cancelled_by = stop and stop[0]
            state.term_at, state.grace_s = now, job.grace_s
            self.children.signal_job(state.proc.pid, state.tag, signal.SIGTERM)
        if state.reason and stop:  # a later stop (the agent's) may shorten it
            state.grace_s = min(state.grace_s, stop[1])
        if state.reason and not state.killed and now >= state.term_at + state.grace_s:
            state.killed = True
            self.children.signal_job(state.proc.pid, state.tag, signal.SIGKILL)

    def _result(self, job, returncode, capture, state):
        exit_code, footer = returncode, ""
        if state.reason == "timeout":
            exit_code = EXIT_TIMEOUT
            footer = f"\n[timed out after {job.timeout_s:g} s]\n"
        elif state.reason == "cancelled":
            exit_code = EXIT_CANCELLED
            footer = f"\n[cancelled by {state.cancelled_by}]\n"
        elif returncode < 0:
            exit_code = 128 - returncode
            name = signal.Signals(-returncode).name if -returncode in \
                signal.valid_signals() else "?"
            footer = f"\n[killed by signal {-returncode} ({name})]\n"
        output, truncated = capture.text(footer)
        return result_fields(output, exit_code, truncated=truncated,
                             output_bytes=capture.total,
                             timed_out=state.reason == "timeout",
                             cancelled=state.reason == "cancelled")


###############################################################################
# Docker ######################################################################
###############################################################################

DOCKER_REF = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}\Z")
DOCKER_SINCE = re.compile(
    r"\d{1,10}(\.\d{1,9})?[smh]?\Z|\d{4}-\d\d-\d\dT[\d:.]+(Z|[+-]\d\d:\d\d)?\Z"
)
MAX_LOG_LINES = 10000
DEFAULT_LOG_LINES = 500
DOCKER_MAX_OUTPUT = 8 * 1024 * 1024  # per stream of one CLI call
DOCKER_CHECK_S = 15.0  # at most, for the calls that only ask whether Docker works
LOG_REPLY_MAX_BYTES = 1024 * 1024
MAX_STOP_TIMEOUT_S = 3600
MAX_PORTS_LISTED = 1000  # of one container, in the metrics
MAX_EVENT_BYTES = 65536  # one line of docker events, read at most
MAX_REPLAYED = 10000  # events kept to apply again after a read; beyond, a re-read
MAX_EVENT_ROWS = 256  # rows create events may add between reads; beyond, a re-read
MAX_CONTAINERS_LISTED = 1000  # in a sample, the newest first; docker.omitted: the rest
# The container events that can change what `docker ps` prints. Others, such
# as the exec_create, exec_start and exec_die of every health check, cannot,
# and must not cost a re-read of the list.
LIST_EVENTS = ("create", "start", "restart", "die", "stop", "pause", "unpause",
               "rename", "destroy", "health_status")
# `docker ps` with the fields named: {{json .}} would make the daemon compute
# every container's size, which takes seconds to minutes on a big host.
PS_FORMAT = ('{"id":{{json .ID}},"names":{{json .Names}},"image":{{json .Image}},'
             '"status":{{json .Status}},"state":{{json .State}},'
             '"created":{{json .CreatedAt}},"ports":{{json .Ports}}}')
# `docker container inspect`, one line a container: the state each sample's
# status is worded from, the ports it publishes, and what its next start or
# death will do (the ports it will publish, a restart, a health check).
# `index`, because the CLI fails the whole call on a key the JSON leaves out
# (ExposedPorts and Healthcheck, when there are none).
INSPECT_FORMAT = (
    '{"id":{{json .Id}},"state":{{json .State}},'
    '"ports":{{json (index .NetworkSettings "Ports")}},'
    '"network":{{json (index .HostConfig "NetworkMode")}},'
    '"exposed":{{json (index .Config "ExposedPorts")}},'
    '"bindings":{{json (index .HostConfig "PortBindings")}},'
    '"publish_all":{{json (index .HostConfig "PublishAllPorts")}},'
    '"restart":{{json (index .HostConfig "RestartPolicy")}},'
    '"healthcheck":{{json (index .Config "Healthcheck")}}}')
# What a health_status event may say (and docker ps print in brackets).
HEALTH_WORDS = ("starting", "healthy", "unhealthy")
# Network modes in which a container publishes no port, whatever it exposes.
NO_PORT_NETWORKS = ("none", "host")
PORT_SPEC = re.compile(
    r"(?:(?P<ip>[0-9A-Fa-f.:\[\]]*):(?P<public>\d+(?:-\d+)?)->)?"
    r"(?P<private>\d+(?:-\d+)?)/(?P<type>\w+)"
)
DOCKER_PS_TIME = re.compile(  # docker ps times: 2026-11-25 14:28:30 +0000 UTC
    r"(\d{4}-\d\d-\d\d) (\d\d:\d\d:\d\d) ([+-]\d\d)(\d\d)\b"
)
DOCKER_INSTANT = re.compile(  # docker inspect's times: RFC 3339, nanoseconds
    r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)"
)
UNIT_BYTES = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
              "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
SOCKET_FIX = (
    "add the agent's user to the 'docker' group (usermod -aG docker USER) and "
    "restart the agent; note that access to the docker socket is root-equivalent"
)


class DockerError(RequestError):
    """A docker CLI call that failed. `status`, when set, says that Docker as a
    whole is unavailable and why (for the metrics); None means only this call
    failed (a missing container, a bad argument)."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


def docker_environment():
    """The agent's environment (DOCKER_HOST...) without its own (the key)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CHATOPS_")}


def classify_docker_error(stderr):
    """A DockerError from what the CLI wrote: one sentence in the CLI's own
    words (its first line: `docker start` adds a second that repeats it),
    and a fix where there is one."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    text = (lines[0] if lines else "docker failed without a message")[:300]
    for prefix in ("Error response from daemon: ", "Error: "):
        text = text[len(prefix):] if text.startswith(prefix) else text
    lower = " ".join(lines).lower()
    if "permission denied" in lower and "docker" in lower:
        return DockerError(f"permission denied on the docker socket: {SOCKET_FIX}",
                           "permission denied")
    if "cannot connect to the docker daemon" in lower or "daemon running" in lower:
        return DockerError(f"the Docker daemon is not running: {text}",
                           "daemon not running")
    return DockerError(text)


def parse_bytes(text):
    """'788KiB' -> 806912, '1.5GB' -> 1500000000, '0B' -> 0."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", text)
    if not match:
        return None
    return int(float(match.group(1)) * UNIT_BYTES.get(match.group(2).lower(), 1))


def parse_pair(text):
    """'788KiB / 23.54GiB' -> (806912, 25275588853)."""
    parts = text.split("/")
    return [parse_bytes(p) for p in parts] if len(parts) == 2 else [None, None]


def parse_ports(text):
    """docker ps's "0.0.0.0:8080->80/tcp, :::8080->80/tcp, 443/tcp" as the API
    wants; a spec that is no port or range of ports is left out."""
    ports, seen = [], set()
    for spec in text.split(","):
        match = PORT_SPEC.search(spec.strip())
        if not match:
            continue
        try:
            private = port_range(match.group("private"))
            public = match.group("public") and port_range(match.group("public"))
        except ValueError:  # beyond 65535
            continue
        for i, port in enumerate(private[:100]):
            if len(ports) >= MAX_PORTS_LISTED:
                return ports
            entry = {"private_port": port, "type": match.group("type")}
            if public:
                entry["public_port"] = public[min(i, len(public) - 1)]
            key = tuple(sorted(entry.items()))
            if key not in seen:  # IPv4 and IPv6 bindings repeat each port
                seen.add(key)
                ports.append(entry)
    return ports


def port_range(text):
    """The ports of '80' or '8000-8100', as a range (never a list: docker may
    print '1-4294967295'); ValueError for what is no TCP or UDP port."""
    low, _, high = text.partition("-")
    low, high = int(low), int(high or low)
    if not 0 <= low <= high <= 65535:
        raise ValueError(f"not a range of ports: {text[:40]}")
    return range(low, high + 1)


def rfc3339(docker_time):
    """'2026-11-25 14:28:30 +0000 UTC' (docker ps) -> '2026-11-25T14:28:30Z'.
    Without strptime: its first call imports _strptime, calendar and locale
    data, 0.3 MiB that the agent would keep for good."""
    match = DOCKER_PS_TIME.match(docker_time)
    if not match:
        return docker_time
    day, clock, zone_hours, zone_minutes = match.groups()
    try:
        parsed = datetime.datetime.fromisoformat(
            f"{day}T{clock}{zone_hours}:{zone_minutes}")
    except ValueError:
        return docker_time
    return parsed.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def docker_instant(text):
    """Unix time of a `docker inspect` time ('2026-11-27T09:00:00.123456789Z');
    None for Docker's zero time (never started, never finished) or garbage."""
    match = DOCKER_INSTANT.match(text) if isinstance(text, str) else None
    if not match or match.group(1).startswith("0001"):
        return None
    zone = "+00:00" if match.group(3) == "Z" else match.group(3)
    try:
        moment = datetime.datetime.fromisoformat(match.group(1) + zone)
    except ValueError:
        return None
    return moment.timestamp() + float(match.group(2) or 0)


def human_duration(seconds):
    """A duration as `docker ps` words it (HumanDuration of docker/go-units)."""
    if seconds < 1:
        return "Less than a second"
    if seconds < 60:
        return "1 second" if int(seconds) == 1 else f"{int(seconds)} seconds"
    minutes = int(seconds // 60)
    if minutes < 60:
        return "About a minute" if minutes == 1 else f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    for limit, unit, size in ((48, "hours", 1), (24 * 14, "days", 24),
                              (24 * 60, "weeks", 24 * 7),
                              (24 * 730, "months", 24 * 30)):
        if hours < limit:
            return "About an hour" if hours == 1 else f"{hours // size} {unit}"
    return f"{int(seconds // 3600) // 24 // 365} years"


# What the status text is worded from: docker inspect's State, its times
# parsed once, then changed by each event, not re-read at every sample.
ContainerState = collections.namedtuple(
    "ContainerState",
    "running paused restarting dead removing exit_code health started finished")
CREATED = ContainerState(False, False, False, False, False, 0, None, None, None)


def container_state(state):
    """A ContainerState from the State object of `docker inspect`, whatever
    its fields hold (ValueError if it is no object at all)."""
    if not isinstance(state, dict):
        raise ValueError("State is not an object")
    health = state.get("Health")
    health = health.get("Status") if isinstance(health, dict) else None
    exit_code = state.get("ExitCode")
    return ContainerState(
        bool(state.get("Running")), bool(state.get("Paused")),
        bool(state.get("Restarting")), bool(state.get("Dead")),
        state.get("Status") == "removing",
        exit_code if isinstance(exit_code, int) else 0,
        health if isinstance(health, str) else None,
        docker_instant(state.get("StartedAt")), docker_instant(state.get("FinishedAt")),
    )


def status_text(state, now):
    """What `docker ps` prints as STATUS at Unix time `now`, from a
    ContainerState (as the daemon words it, container/state.go)."""
    if state.running:
        up = human_duration(now - (state.started or now))
        if state.paused:
            return f"Up {up} (Paused)"
        if state.restarting:
            since = human_duration(now - (state.finished or now))
            return f"Restarting ({state.exit_code}) {since} ago"
        if state.health:
            health = "health: starting" if state.health == "starting" else state.health
            return f"Up {up} ({health})"
        return f"Up {up}"
    if state.removing:
        return "Removal In Progress"
    if state.dead:
        return "Dead"
    if state.started is None:
        return "Created"
    if state.finished is None:
        return ""
    return f"Exited ({state.exit_code}) {human_duration(now - state.finished)} ago"


def state_word(state):
    """docker ps's STATE of a ContainerState (container/state.go, StateString)."""
    if state.running:
        return "paused" if state.paused else (
            "restarting" if state.restarting else "running")
    if state.removing:
        return "removing"
    if state.dead:
        return "dead"
    return "created" if state.started is None else "exited"


def container_row(row):
    """One line of docker ps (PS_FORMAT) in the shape of docs/protocol.md, Metrics;
    ValueError for a line not of that shape (the CLI may print anything)."""
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    texts = [row.get(k) for k in ("id", "names", "image", "status", "state", "created")]
    ports = row.get("ports") or ""
    if not all(isinstance(t, str) for t in [*texts, ports]):
        raise ValueError("a field is not a string")
    return {"id": row["id"][:12], "name": row["names"].split(",")[0].lstrip("/"),
            "image": row["image"], "status": row["status"], "state": row["state"],
            "created": rfc3339(row["created"]), "ports": parse_ports(ports)}


# What a container's configuration decides when it starts or dies, from
# `docker inspect`: `restart`, its restart policy's name; `ports`, the ports
# it publishes while it runs (None: the engine picks them at start); and
# whether it has a health check (then a start words it "health: starting").
ContainerConfig = collections.namedtuple("ContainerConfig", "restart ports healthcheck")
Inspected = collections.namedtuple("Inspected", "id state ports config")


def inspected(info):
    """An Inspected from one line of INSPECT_FORMAT; ValueError for what is
    not of that shape (the CLI may print anything)."""
    if not isinstance(info, dict) or not isinstance(info.get("id"), str):
        raise ValueError("not a container")
    state = container_state(info.get("state"))
    ports = live_ports(info.get("ports")) if state.running else []
    return Inspected(info["id"][:12], state, ports, container_config(info))


def container_config(info):
    restart = info.get("restart")
    restart = restart.get("Name") if isinstance(restart, dict) else None
    test = info.get("healthcheck")
    test = test.get("Test") if isinstance(test, dict) else None
    return ContainerConfig(restart if isinstance(restart, str) else "unknown",
                           ports_when_running(info),
                           isinstance(test, list) and test not in ([], ["NONE"]))


def may_restart(config, exit_code):
    """Whether the engine may restart a container that died with `exit_code`
    (by its restart policy; an unknown policy may). docker stop kills
    without a restart, but its death's event does not say so."""
    if config is None:
        return True
    if config.restart == "on-failure":
        return exit_code != 0
    return config.restart not in ("", "no")


def live_ports(mapping):
    """inspect's NetworkSettings.Ports ({"80/tcp": [{"HostPort": "8080"}],
    "81/tcp": null}) as the API wants them, by docker ps's parser."""
    if not isinstance(mapping, dict):
        return []
    specs = []
    for port, bindings in mapping.items():
        bindings = bindings if isinstance(bindings, list) else []
        specs += [f":{b.get('HostPort')}->{port}" for b in bindings
                  if isinstance(b, dict)] or [port]
    return parse_ports(", ".join(specs))


def ports_when_running(info):
    """The ports a container will publish once started, from its
    configuration; None when the engine picks them at start (a random host
    port) or the configuration cannot be read."""
    network, publish_all = info.get("network"), info.get("publish_all")
    exposed, bindings = info.get("exposed") or {}, info.get("bindings") or {}
    if not (isinstance(network, str) and isinstance(exposed, dict)
            and isinstance(bindings, dict)):
        return None
    if network in NO_PORT_NETWORKS or network.startswith("container:"):
        return []
    specs = []
    for port in sorted(set(exposed) | set(bindings)):
        chosen = bindings.get(port) or []
        if not isinstance(chosen, list) or (not chosen and publish_all is not False):
            return None
        for binding in chosen:
            host_port = binding.get("HostPort") if isinstance(binding, dict) else None
            if not (isinstance(host_port, str) and host_port.isdigit()):
                return None  # none, or a range: the engine picks one at start
            specs.append(f":{host_port}->{port}")
        specs += [] if chosen else [port]
    return parse_ports(", ".join(specs))


# One record of `docker events`, as the list is changed by it: `detail` is
# the exit code of a death and the word of a health_status.
ContainerEvent = collections.namedtuple("ContainerEvent",
                                        "action id name image detail when")


def container_event(line):
    """A ContainerEvent from a line of `docker events --format '{{json .}}'`,
    or None for one the agent cannot read (the CLI may print anything)."""
    try:
        event = json.loads(line)
        action, _, detail = event["Action"].partition(": ")  # health_status: healthy
        attributes, nanos = event["Actor"]["Attributes"], event["timeNano"]
        container_id, name, image = (event["Actor"]["ID"], attributes["name"],
                                     attributes["image"])
        if action == "die":
            detail = int(attributes["exitCode"])
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError):
        return None
    if not (all(isinstance(t, str) for t in (container_id, name, image))
            and isinstance(nanos, int)
            and 0 < nanos < 2**62 and len(container_id) >= 12):
        return None
    if action == "die" and not -2**31 <= detail < 2**31:  # an int32 in the engine
        return None
    if action == "health_status" and detail not in HEALTH_WORDS:
        return None
    return ContainerEvent(action, container_id[:12], name, image, detail, nanos / 1e9)


def created_row(event):
    """The row of a container its create event tells of. Its time is the
    event's, a few milliseconds after docker's own."""
    return {"id": event.id, "name": event.name, "image": event.image,
            "status": "Created", "state": "created",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(event.when)),
            "ports": []}


class DockerCLI:
    """Runs the docker CLI: argument lists (never a shell), timeouts, bounded output."""

    def __init__(self, config, children):
        self.binary = config.docker_binary
        self.timeout_s = config.docker_timeout_s
        self.children = children

    def run(self, *args, timeout_s=None, max_bytes=DOCKER_MAX_OUTPUT):
        """stdout and stderr of a successful call, or a DockerError saying why not."""
        rc, out, err = self._call(args, timeout_s or self.timeout_s, max_bytes)
        if rc < 0:
            raise DockerError(f"docker {args[0]} was killed (signal {-rc}) before it "
                              "answered (the agent's shutdown, or the OOM killer); "
                              "the engine may have carried it out")
        if rc != 0:
            raise classify_docker_error(err.decode("utf-8", "replace"))
        return out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    def _call(self, args, timeout_s, max_bytes):
        try:
            result = self.children.call([self.binary, *args], timeout_s, max_bytes,
                                        env=docker_environment())
        except FileNotFoundError:
            raise DockerError(
                f"the docker CLI ({self.binary}) was not found: install Docker "
                "(e.g. apt-get install docker.io) or set docker_binary",
                "not installed",
            ) from None
        except OSError as e:
            raise DockerError(f"cannot run {self.binary}: {e}") from None
        if result is None:
            raise DockerError(f"docker {args[0]} did not answer within {timeout_s:g} s "
                              "(is the daemon hung?)")
        return result

    def list_containers(self):
        """Every container, running or not, in the shape of docs/protocol.md, Metrics.
        A row the CLI garbled is left out (and logged), not fatal."""
        out, _ = self.run("ps", "--all", "--no-trunc", "--format", PS_FORMAT)
        rows = []
        for line in out.splitlines():
            try:
                rows.append(container_row(json.loads(line)))
            except (ValueError, RecursionError) as e:
                LOG.debug("docker ps: skipped a row (%s): %s", e, shown(line))
        return rows

    def inspect(self, ids):
        """{12-character id: Inspected} of the containers `ids`. One removed
        meanwhile, or garbled, is left out (the CLI then fails, but still
        prints the others)."""
        if not ids:
            return {}
        _, out, _ = self._call(["container", "inspect", "--format", INSPECT_FORMAT,
                                "--", *ids], self.timeout_s, DOCKER_MAX_OUTPUT)
        found = {}
        for line in out.decode("utf-8", "replace").splitlines():
            with contextlib.suppress(ValueError, RecursionError):  # a garbled line
                item = inspected(json.loads(line))
                found[item.id] = item
        return found

    def check(self):
        """(status, detail): is there a CLI, and a daemon it may talk to?"""
        try:
            out, _ = self.run("version", "--format", "{{.Server.Version}}",
                              timeout_s=min(self.timeout_s, DOCKER_CHECK_S))
        except DockerError as e:
            return e.status or "error", str(e)
        return "ok", out.strip()

    def count_containers(self):
        """How many containers the daemon has, running or not (DockerError)."""
        out, _ = self.run("ps", "--all", "--quiet",
                          timeout_s=min(self.timeout_s, DOCKER_CHECK_S))
        return len(out.split())


class ContainerList:
    """The containers as the reads and events left them: each row as docker
    ps prints it, the state its status words are derived from, what a start
    or death does, and what is in doubt. An event changes it in a time that
    does not grow with the list. It has no lock: ContainerCache's guards it.
    """

    def __init__(self):
        # id -> row, the oldest first: a create adds at the end, without a
        # copy. Samples list them the newest first, as docker ps does.
        self.rows = {}
        self.added = 0  # rows create events added since the whole list was read
        self.states = {}  # id -> ContainerState: the status text's words
        self.configs = {}  # id -> ContainerConfig: what a start or death does
        self.doubts = set()  # ids an event left uncertain: inspected next
        self.stale = True  # the whole list is read next

    def forget(self):
        """Docker is gone: no container is known (whether the list is stale
        stays as it was)."""
        self.rows, self.states, self.configs = {}, {}, {}
        self.doubts.clear()

    def current(self):
        """The rows, the newest first and at most MAX_CONTAINERS_LISTED, each
        with its status and state as `docker ps` would print them now ("Up
        37 seconds"): the words are derived at each sample, from the state
        the reads and events left."""
        now, rows = time.time(), []
        for container_id in itertools.islice(reversed(self.rows),
                                             MAX_CONTAINERS_LISTED):
            row, state = self.rows[container_id], self.states.get(container_id)
            rows.append(row if state is None else dict(
                row, status=status_text(state, now), state=state_word(state)))
        return rows

    def install(self, rows, found):
        """What a read found: the whole list (`rows` from docker ps), or the
        containers in doubt (`rows` None), with what inspect said of each."""
        if rows is not None:
            self.rows = {row["id"]: row for row in reversed(rows)}
            self.states, self.configs, self.added = {}, {}, 0
        for container_id, item in found.items():
            if container_id in self.rows:
                self.states[container_id] = item.state
                self.configs[container_id] = item.config
                if rows is None:
                    self._set_ports(container_id, item.ports)

    def apply(self, event):
        """Change the list as `event` tells, in a time that does not grow
        with the list. One that cannot be applied (not read, of a container
        the list does not hold, or a create beyond MAX_EVENT_ROWS since the
        last read: a flood, which a read sets right) makes it stale."""
        if event is None:
            self.stale = True
        elif event.action == "create":
            if event.id in self.rows:
                pass  # a read already found it
            elif self.added >= MAX_EVENT_ROWS:
                self.stale = True
            else:
                self.rows[event.id] = created_row(event)
                self.states[event.id] = CREATED
                self.added += 1
        elif event.action == "destroy":
            for table in (self.rows, self.states, self.configs):
                table.pop(event.id, None)
            self.doubts.discard(event.id)
        elif event.id not in self.states:
            self.stale = True
        else:
            self.states[event.id] = self._changed(self.states[event.id], event)

    def _changed(self, state, event):
        """The state of a container the list holds after `event`; its row's
        ports and name follow, and what the event leaves unknown is doubted."""
        config, action = self.configs.get(event.id), event.action
        if action == "start":
            ports = config.ports if config else None
            self._set_ports(event.id, ports or [])
            if ports is None:  # new since the last read, or a random host port
                self.doubts.add(event.id)
            return state._replace(
                running=True, paused=False, restarting=False, dead=False,
                exit_code=0, started=event.when,
                health="starting" if config and config.healthcheck else None)
        if action == "die":
            self._set_ports(event.id, [])
            if may_restart(config, event.detail):  # then it shows "Restarting"
                self.doubts.add(event.id)
            return state._replace(running=False, paused=False, restarting=False,
                                  exit_code=event.detail, finished=event.when)
        if action == "pause":  # its health checks stop: the engine says
            # "unhealthy" then, with no event, until the first after unpause
            return state._replace(paused=True, health=state.health and "unhealthy")
        if action == "unpause":
            return state._replace(paused=False)
        if action == "health_status":
            return state._replace(health=event.detail)
        if action == "rename":
            self.rows[event.id] = dict(self.rows[event.id], name=event.name)
        if action == "stop" and state.running:  # a restarting one, stopped
            self.doubts.add(event.id)
        return state  # a restart: its start said it all

    def _set_ports(self, container_id, ports):
        self.rows[container_id] = dict(self.rows[container_id], ports=ports)


class ContainerCache:
    """The container list for metrics, kept current by one `docker events` process.

    Each event that can change the list (LIST_EVENTS, not the execs of
    health checks) is applied to it as it comes, with no process started: a
    create adds a row, a start or a death changes its state, a rename its
    name, a destroy takes it away. What an event does not tell is read with
    one `docker container inspect` of the containers concerned, at most once
    per sample: the ports and health check of a container created since the
    last read, when it starts, and whether one with a restart policy is
    restarting, when it dies. The whole list is read (`docker ps` and an
    inspect of all) at start, when the events process starts again, after
    an event the agent cannot read or apply, and every docker_refresh_s as
    a safety net. When the CLI or daemon is missing, the status says why
    and is checked again every docker_check_s; a daemon that comes back is
    noticed.
    """

    def __init__(self, config, cli):
        self.config = config
        self.cli = cli
        self.stop = threading.Event()  # set by stop_watching()
        self.status, self.detail = "starting", ""
        self._list = ContainerList()  # under self._lock
        self._replay = None  # during a read, the events that came meanwhile
        self._lock = threading.Lock()
        self._read = threading.Condition(self._lock)  # a read ended
        self._wake = threading.Event()
        self._asked = self._answered = 0  # reads samples asked for, done
        self._events = None

    def snapshot(self, wait_s=1.0):
        """(containers, status) for a metrics sample. If events left the list
        uncertain, it is read first, by a read that begins after the sample
        asked (waiting at most `wait_s`), so that the sample shows the
        change: the one read a sample may cost."""
        if not self.config.docker_enabled:
            return [], {"status": "disabled"}
        with self._lock:
            if self.status == "ok" and (self._list.stale or self._list.doubts):
                self._asked += 1
                asked = self._asked
                self._wake.set()
                self._read.wait_for(
                    lambda: self._answered >= asked or self.status != "ok", wait_s)
            status = {"status": self.status}
            if self.detail:
                status["detail" if self.status != "ok" else "server_version"] = (
                    self.detail
                )
            if len(self._list.rows) > MAX_CONTAINERS_LISTED:
                status["omitted"] = len(self._list.rows) - MAX_CONTAINERS_LISTED
            return self._list.current(), status

    def read_once(self):
        """Check and list once, without watching (for --once)."""
        if not self.config.docker_enabled:
            return self.snapshot()
        status, detail = self.cli.check()
        self._set_status(status, detail)
        if status == "ok":
            try:
                self._refresh()
            except DockerError as e:
                self._set_status(e.status or "error", str(e))
        return self.snapshot(wait_s=0)

    def run(self):
        """The docker thread: check, watch events, refresh; again when they fail."""
        backoff = Backoff(1.0, 60.0)
        while not self.stop.is_set():
            try:
                delay = self._check_and_watch(backoff)
            except Exception as e:  # an answer of the CLI nobody foresaw
                LOG.exception("docker: watching containers failed")
                self._set_status("error", f"{type(e).__name__}: {e}")
                delay = self.config.docker_check_s
            if self.stop.wait(delay):
                return

    def _check_and_watch(self, backoff):
        """Watch while Docker works; the delay before looking again."""
        status, detail = self.cli.check()
        self._set_status(status, detail)
        if status != "ok":
            return self.config.docker_check_s
        watched_from = time.monotonic()
        self._watch()
        if time.monotonic() - watched_from > 60:
            backoff.reset()  # it had worked for a while: a restart
        return backoff.next_delay()

    def _watch(self):
        """Follow events and read what they leave uncertain until the events
        process ends (or is ended by stop_watching(), from another thread)."""
        try:
            events = self._start_events()
            self._list.stale = True  # events may have been missed before it started
            self._wake.set()  # the first list, at once
            while not self.stop.is_set() and events.poll() is None:
                if not self._wake.wait(self.config.docker_refresh_s):
                    self._list.stale = True  # the safety net
                self._wake.clear()
                if not self.stop.is_set():
                    self._refresh()
        except DockerError as e:
            if not self.stop.is_set():  # else it is the shutdown that cut it off
                self._set_status(e.status or "error", str(e))
        finally:
            self._stop_events()

    def _refresh(self):
        """Read the whole list if it is stale, else the containers in doubt.
        The events that come meanwhile are applied again, in order, on top
        of what was read: each sets what it tells, so the last one wins."""
        with self._lock:
            whole, doubts = self._list.stale, sorted(self._list.doubts)
            self._list.stale = False
            self._list.doubts.clear()
            answering = self._asked  # the samples that asked so far
            self._replay = []
        try:
            rows = self.cli.list_containers() if whole else None
            found = self.cli.inspect([row["id"] for row in rows] if whole else doubts)
        except BaseException:
            with self._lock:
                self._replay, self._list.stale = None, True
            raise
        with self._lock:
            self._list.install(rows, found)
            replay, self._replay = self._replay, None
            for event in replay:
                self._list.apply(event)
            self._answered = answering
            self._read.notify_all()

    def _on_event(self, event):
        """One line of docker events, read (`event`) or not (None)."""
        with self._lock:
            if self._replay is not None and len(self._replay) < MAX_REPLAYED:
                self._replay.append(event)
            elif self._replay is not None:
                self._list.stale = True  # too many to apply again: read it all after
            self._list.apply(event)

    def _start_events(self):
        filters = [f"--filter=event={event}" for event in LIST_EVENTS]
        try:
            proc = self._events = self.cli.children.spawn(
                [self.cli.binary, "events", "--format", "{{json .}}",
                 "--filter=type=container", *filters], die_with_agent=True,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, env=docker_environment())
        except OSError as e:
            raise DockerError(f"cannot run {self.cli.binary} events: {e}") from None
        threading.Thread(target=self._read_events, args=(proc,),
                         name="docker-events", daemon=True).start()
        return proc

    def _read_events(self, proc):
        """Apply each event as it comes. Lines are read in bounded pieces:
        the CLI may print anything."""
        with contextlib.suppress(OSError, ValueError):  # closed under us at the end
            for line in iter(lambda: proc.stdout.readline(MAX_EVENT_BYTES), b""):
                self._on_event(container_event(line))
        self._wake.set()  # the process ended: the daemon went away or restarted

    def _stop_events(self):
        proc, self._events = self._events, None
        if proc is not None:
            self.cli.children.finish(proc)

    def _set_status(self, status, detail):
        if self.stop.is_set():
            return  # the shutdown cut a call off: nothing to report
        with self._lock:
            changed = status != self.status
            self.status, self.detail = status, detail
            if status != "ok":
                self._list.forget()
            self._read.notify_all()
        if changed and status == "ok":
            LOG.info("docker: daemon %s reachable", detail)
        elif changed:
            LOG.warning("docker: %s (%s); containers are not reported", status, detail)

    def stop_watching(self):
        """No list re-read from now on, and the events process ended. Nothing
        waits here: a CLI call in flight ends when Children.stop kills it."""
        self.stop.set()
        self._wake.set()
        self._stop_events()


class DockerJob(Job):
    """One Docker request. Once the engine carries it out it cannot be undone
    halfway, so a running one cannot be cancelled."""

    def __init__(self, route, dialect, request_id, ref, params):
        super().__init__(route, dialect, request_id)
        self.action = route.action  # start, stop, logs, ...: as the docs name it
        self.ref = ref  # validated container name or id, or None for "list"
        self.params = params

    def describe(self):
        return f"docker {self.action} {self.ref or ''} (request {self.id})"

    def success(self, text, fields=None):
        LOG.info("%s: %s", self.describe(), text)
        return self.dialect.docker_result(self.id, self.route, self.ref, text,
                                          fields or {})

    def cancel_running(self, by, grace_s=None):
        return False, "running", (f"docker {self.action} cannot be cancelled once "
                                  "started: the engine is carrying it out; its own "
                                  "reply follows")


def parse_docker_request(message, route, config):
    """A DockerJob of the row's action, or RequestError before any process
    starts."""
    check_docker_enabled(config)
    return docker_job(message, route, route.dialect, route.dialect.request_id(message))


def check_docker_enabled(config):
    if not config.docker_enabled:
        raise RequestError("Docker support is disabled on this agent (docker_enabled)")


def docker_job(message, route, dialect, request_id):
    ref = container_ref(message) if "container_id" in route.fields else None
    params = route.params(message) if route.params else {}
    return DockerJob(route, dialect, request_id, ref, params)


def container_ref(message):
    ref = message.get("container_id", message.get("container"))
    if not isinstance(ref, str) or not DOCKER_REF.match(ref):
        shown = json.dumps(ref)[:60]
        raise RequestError(
            f"invalid container reference {shown}: give a container name or id "
            "(letters, digits, '_', '.', '-'; at most 128 characters)"
        )
    return ref


def stop_params(message):
    """Without a timeout, docker_stop_timeout_s applies."""
    timeout = request_field(message, "timeout", int, "whole seconds")
    if timeout is not None and not 0 <= timeout <= MAX_STOP_TIMEOUT_S:
        raise RequestError(f"'timeout' must be 0 to {MAX_STOP_TIMEOUT_S} seconds")
    return {"timeout": timeout}


def logs_params(message):
    tail = request_field(message, "tail", int, "a whole number", DEFAULT_LOG_LINES)
    if tail < 0:
        raise RequestError("'tail' must not be negative")
    since = request_field(message, "since", str, "a string")
    if since is not None and not DOCKER_SINCE.match(since):
        raise RequestError("'since' must be like 10m, 2h, a Unix time or RFC 3339")
    return {"tail": min(tail, MAX_LOG_LINES), "since": since,
            "timestamps": request_field(message, "timestamps", bool,
                                        "true or false", False)}


class DockerActions:
    """What each docker request does, through the CLI: one method an action,
    named as the docs' docker_command names it, each in a row of REQUESTS.
    A DockerError (a RequestError) becomes the request's error reply."""

    def __init__(self, config, cli):
        self.config = config
        self.cli = cli

    def _simple(self, job, verb, done, *options, extra_s=0):
        self.cli.run(verb, *options, "--", job.ref,  # its events change the list
                     timeout_s=self.config.docker_timeout_s + extra_s)
        return job.success(f"Container {done}")

    def start(self, job):
        return self._simple(job, "start", "started")

    def stop(self, job):
        t = self._stop_timeout(job)
        return self._simple(job, "stop", "stopped", "--time", str(t), extra_s=t)

    def restart(self, job):
        t = self._stop_timeout(job)
        return self._simple(job, "restart", "restarted", "--time", str(t), extra_s=t)

    def _stop_timeout(self, job):
        """The request's own, or one short enough for the reply to arrive
        within the API's wait (Docker's own default, 10 s, is that wait)."""
        timeout = job.params["timeout"]
        return self.config.docker_stop_timeout_s if timeout is None else timeout

    def pause(self, job):
        return self._simple(job, "pause", "paused")

    def unpause(self, job):
        return self._simple(job, "unpause", "unpaused")

    def list(self, job):
        rows = self.cli.list_containers()
        return job.success(f"{len(rows)} containers", {"containers": rows})

    def logs(self, job):
        p = job.params
        args = ["logs", "--tail", str(p["tail"]), "--timestamps"]
        args += ["--since", p["since"]] if p["since"] else []
        # Twice the reply's size of each stream: its newest part fits whole.
        out, err = self.cli.run(*args, "--", job.ref, max_bytes=2 * LOG_REPLY_MAX_BYTES)
        entries = merge_log_streams(out, err)[-p["tail"] :] if p["tail"] else []
        entries, truncated = bound_log_entries(entries, LOG_REPLY_MAX_BYTES)
        lines = entries if p["timestamps"] else [e["line"] for e in entries]
        fields = {"logs": lines}
        if truncated:
            fields["truncated"] = True
        return job.success(f"{len(lines)} log lines", fields)

    def inspect(self, job):
        out, _ = self.cli.run("container", "inspect", "--", job.ref)
        return job.success("Container inspected", {"info": read_cli_output(
            "inspect", out, lambda: inspect_summary(json.loads(out)[0]))})

    def stats(self, job):
        out, _ = self.cli.run("stats", "--no-stream", "--no-trunc", "--format",
                              "{{json .}}", "--", job.ref)
        return job.success("Container stats", {"stats": read_cli_output(
            "stats", out, lambda: stats_numbers(json.loads(out.splitlines()[0])))})


def read_cli_output(verb, out, read):
    """read(), or a DockerError when what the CLI printed is not what the
    agent reads (the CLI may print anything): never an exception from
    parsing, which would end as an 'internal error'."""
    try:
        return read()
    except (ValueError, TypeError, KeyError, IndexError, AttributeError,
            RecursionError) as e:
        raise DockerError(
            f"docker {verb} printed what the agent cannot read ({type(e).__name__}: "
            f"{one_line(str(e))[:100]}; output starts {shown(out[:40])}); is "
            "docker_binary the docker CLI?"
        ) from None


def merge_log_streams(stdout, stderr):
    """Both streams of `docker logs --timestamps`, merged in time order."""
    entries = []
    for stream, text in (("stdout", stdout), ("stderr", stderr)):
        for line in text.splitlines():
            stamp, _, rest = line.partition(" ")
            entries.append({"time": stamp, "stream": stream, "line": rest})
    return sorted(entries, key=lambda e: log_time_key(e["time"]))


def log_time_key(stamp):
    """RFC 3339 with nanoseconds whose trailing zeros docker trims: sortable."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    return whole, fraction.ljust(9, "0")


def bound_log_entries(entries, max_bytes):
    """The newest entries that fit in max_bytes; (entries, truncated)."""
    total, keep = 0, len(entries)
    while keep > 0:
        total += len(entries[keep - 1]["line"]) + 60
        if total > max_bytes:
            break
        keep -= 1
    return entries[keep:], keep > 0


def inspect_summary(info):
    state, config = info.get("State", {}), info.get("Config", {})
    ports = []
    for spec, bindings in (info.get("NetworkSettings", {}).get("Ports") or {}).items():
        private, _, kind = spec.partition("/")
        for binding in bindings or [{}]:
            entry = {"private_port": int(private), "type": kind}
            if binding.get("HostPort"):
                entry["public_port"] = int(binding["HostPort"])
            if entry not in ports:
                ports.append(entry)
    return {
        "id": info.get("Id", "")[:12], "name": info.get("Name", "").lstrip("/"),
        "image": config.get("Image"), "created": info.get("Created"),
        "state": state.get("Status"), "running": state.get("Running"),
        "paused": state.get("Paused"), "exit_code": state.get("ExitCode"),
        "started_at": state.get("StartedAt"), "finished_at": state.get("FinishedAt"),
        "health": (state.get("Health") or {}).get("Status"),
        "restart_count": info.get("RestartCount"), "ports": ports,
        "mounts": [{"type": m.get("Type"), "source": m.get("Source"),
                    "destination": m.get("Destination"), "read_only": not m.get("RW")}
                   for m in info.get("Mounts") or []],
    }


def stats_numbers(row):
    """docker stats' human strings ("788KiB / 23.54GiB") as numbers."""
    memory, net, block = (
        parse_pair(row.get(k, "")) for k in ("MemUsage", "NetIO", "BlockIO")
    )
    return {
        "cpu_percent": float(row.get("CPUPerc", "0").rstrip("%") or 0),
        "memory_used_bytes": memory[0], "memory_limit_bytes": memory[1],
        "memory_percent": float(row.get("MemPerc", "0").rstrip("%") or 0),
        "network_rx_bytes": net[0], "network_tx_bytes": net[1],
        "block_read_bytes": block[0], "block_write_bytes": block[1],
        "pids": int(row["PIDs"]) if str(row.get("PIDs", "")).isdigit() else None,
    }


###############################################################################
# Requests: the table, lanes, deadlines, cancel ###############################
###############################################################################

# One row per message type the API sends (docs/protocol.md):
#   dialect  the form of its replies; None: no request, or both forms share it
#   lane     "command" or "docker": it becomes a job for that lane's workers;
#            None: it is handled at once, in the receive loop, never waiting
#   parse    (message, route, config) -> what `run` takes, or RequestError,
#            answered at once; None: `run` takes the message as it came
#   run      in a lane: (the lane's worker object, job) -> its reply;
#            at once: (the Dispatcher, what `parse` gave)
#   fields   what it reads, besides its type and id
#   params   of a Docker action: (message) -> its parameters, or RequestError
#   reply, status: of a Docker action, its reply type and status word in the
#            API's form (the docs' form answers every action docker_response)
# A row of REQUESTS. Every name on the wire is data here (`reply`, `status`,
# and `action`: a Docker action as the docs' docker_command names it), never
# a Python name: renaming a method changes nothing the API sees.
Route = collections.namedtuple(
    "Route", "dialect lane parse run fields params reply status action",
    defaults=(None, None, None, None),
)
COMMAND_FIELDS = ("command", "timeout", "cwd", "stream", "requested_by")
REF = ("container_id", "container")  # the container, by either name (container_ref)


def docker(action, run, reply, status=None, params=None, fields=REF):
    """The row of a Docker action, in the API's form: `run` (a method of
    DockerActions) carries it out; the docs' docker_command names it `action`."""
    return Route(API, "docker", parse_docker_request, run, fields, params, reply,
                 status, action)


def take_server_id(dispatcher, message):
    """An auth_success after authentication may name the server anew."""
    if "server_id" in message:
        server_id = auth_server_id(message)
        if server_id is not None:
            dispatcher.samples.use_server_id(server_id)


def take_acknowledgement(dispatcher, message):
    dispatcher.samples.acknowledged()


def take_pong(dispatcher, message):
    dispatcher.samples.pong_received()


def answer_ping(dispatcher, message):
    dispatcher.send(dict({"type": "pong"}, **reply_ids(message)))


def log_api_error(dispatcher, message):
    LOG.warning("the API reported an error: %s", str(message.get("message"))[:300])


Cancel = collections.namedtuple("Cancel", "dialect id target")


def parse_cancel(message, route, config):
    dialect = dialect_of(message)
    request_id = dialect.request_id(message)
    target = message.get("target_id")
    if isinstance(target, bool) or not isinstance(target, (str, int)):
        raise RequestError("'target_id' must name the command to cancel")
    return Cancel(dialect, request_id, target)


def cancel_request(dispatcher, cancel):
    result = dispatcher.requests.cancel(cancel.target, f"request {cancel.id!r}")
    dispatcher.send(cancel.dialect.cancel_result(cancel.id, cancel.target, *result))


def parse_docker_command(message, route, config):
    """The docs' form names the action in a field: a job of that action's
    row, answered in the docs' form."""
    check_docker_enabled(config)
    request_id = route.dialect.request_id(message)
    action = request_field(message, "action", str, "a string")
    if action not in DOCKER_ACTIONS:
        raise RequestError(f"unknown docker action {str(action)[:40]!r}; known: "
                           + ", ".join(DOCKER_ACTIONS))
    return docker_job(message, DOCKER_ACTIONS[action], route.dialect, request_id)


REQUESTS = {
    # Not requests: answered by nothing, or by a pong.
    "auth_success": Route(None, None, None, take_server_id, ("server_id", "message")),
    "metrics_received": Route(None, None, None, take_acknowledgement, ("status",)),
    "pong": Route(None, None, None, take_pong, ()),
    "ping": Route(None, None, None, answer_ping, ()),
    "error": Route(None, None, None, log_api_error, ("message",)),
    # Commands, in each form, and their cancel (the agent's own, in both).
    "execute_command": Route(API, "command", parse_command_request,
                             CommandRunner.execute, COMMAND_FIELDS),
    "command": Route(DOCS, "command", parse_command_request, CommandRunner.execute,
                     COMMAND_FIELDS),
    "cancel_command": Route(None, None, parse_cancel, cancel_request, ("target_id",)),
    # Docker, in the API's form: one row an action.
    "start_container": docker("start", DockerActions.start, "container_started",
                              "started"),
    "stop_container": docker("stop", DockerActions.stop, "container_stopped",
                             "stopped", stop_params, (*REF, "timeout")),
    "restart_container": docker("restart", DockerActions.restart,
                                "container_restarted", "restarted", stop_params,
                                (*REF, "timeout")),
    "pause_container": docker("pause", DockerActions.pause, "container_paused",
                              "paused"),
    "unpause_container": docker("unpause", DockerActions.unpause,
                                "container_unpaused", "unpaused"),
    "get_container_logs": docker("logs", DockerActions.logs, "container_logs", None,
                                 logs_params, (*REF, "tail", "since", "timestamps")),
    "inspect_container": docker("inspect", DockerActions.inspect, "container_info"),
    "get_container_stats": docker("stats", DockerActions.stats, "container_stats"),
    "list_containers": docker("list", DockerActions.list, "container_list",
                              fields=()),
    # Docker in the docs' form: any of the actions above, named in 'action'.
    "docker_command": Route(DOCS, "docker", parse_docker_command, None, (
        "action", *REF, "timeout", "tail", "since", "timestamps")),
}
DOCKER_ACTIONS = {r.action: r for r in REQUESTS.values() if r.action is not None}


class Dispatcher:
    """Routes each frame from the API by its type, through REQUESTS: a
    request for a lane becomes a job; any other message is handled at once.
    Whatever is refused is answered at once, in the request's form."""

    def __init__(self, config, outbox, samples, requests):
        self.config = config
        self.send = outbox.put  # queues a reply; never blocks
        self.samples = samples
        self.requests = requests

    def dispatch(self, payload, session):
        message, problem = parse_frame(payload)
        if problem:
            LOG.warning("invalid message from the API: %s", problem)
            self.send(API.refusal(None, message, "Invalid message format: " + problem))
            return
        route = REQUESTS.get(message["type"])
        if route is None:
            shown = message["type"][:64]
            LOG.warning("unknown message type %r from the API; ignored", shown)
            self.send(API.refusal(None, message, f"unknown message type {shown!r}"))
            return
        try:
            self._handle(route, message)
        except RequestError as e:
            LOG.warning("refused %r request: %s", message["type"][:64], e)
            self.send((route.dialect or API).refusal(route.lane, message, str(e)))
        except Exception:  # a handler bug must not end the connection
            LOG.exception("handling %r failed", message["type"])
            why = (
                f"internal error handling {message['type'][:64]!r}; see the agent's log"
            )
            self.send((route.dialect or API).refusal(route.lane, message, why))

    def _handle(self, route, message):
        item = route.parse(message, route, self.config) if route.parse else message
        if route.lane:
            self.requests.submit(item)
        else:
            route.run(self, item)


class Lane:
    """Bounded workers and a bounded queue for one kind of request, so that
    shell commands and Docker requests never wait behind each other."""

    def __init__(self, name, workers, queue_size, owner):
        self.name = name  # "command" or "docker", as in its settings' names
        self.workers = workers
        self.queue_size = queue_size
        self.owner = owner  # what its jobs' `run` is a method of
        self.waiting = collections.deque()  # oldest first
        self.running = {}  # id -> job
        self.work = None  # Condition on the Requests lock: a job is waiting

    def full(self):
        return len(self.waiting) + len(self.running) >= self.workers + self.queue_size

    def busy(self):
        return (f"agent busy: {self.workers} {self.name} requests running and "
                f"{self.queue_size} waiting, as many as it takes ({self.name}_workers, "
                f"{self.name}_queue_size); try again later")


class Requests:
    """Every accepted request, waiting or running in its lane, until its reply.

    The ChatOps API waits `request_deadline_s` (10 s) for a reply and drops
    later ones: a request that waited longer for a worker is never started,
    but answered as expired when a worker takes it, so that a user told it
    failed never sees it run later. All job state is read and written under
    one lock; cancels reach a running command through its `stops` queue.
    """

    def __init__(self, config, send, lanes):
        self.config = config
        self.send = send  # Outbox.put: queues a message, never blocks
        self.lanes = {lane.name: lane for lane in lanes}
        self.lock = threading.Lock()
        self.finished = threading.Condition(self.lock)  # a running job ended
        self.stopping = False
        for lane in lanes:
            lane.work = threading.Condition(self.lock)

    def start(self):
        for lane in self.lanes.values():
            for n in range(lane.workers):
                threading.Thread(target=self._work, args=(lane,),
                                 name=f"{lane.name}-{n}", daemon=True).start()

    # -- from the receive loop: fast, never blocking --------------------------
    def submit(self, job):
        lane = self.lanes[job.lane]
        with self.lock:
            if self._find(job.id)[1] is not None:
                raise RequestError(f"a request with id {job.id!r} is already running")
            if self.stopping:
                raise RequestError("the agent is shutting down; try again once it "
                                   "is back")
            if lane.full():
                raise RequestError(lane.busy())
            lane.waiting.append(job)
            lane.work.notify()

    def cancel(self, target, by):
        """(cancelled, state, text) of a cancel_command aimed at `target`."""
        with self.lock:
            lane, job = self._find(target)
            queued = job is not None and job in lane.waiting
            if queued:
                lane.waiting.remove(job)
        if job is None:
            return False, "not running", f"command {target!r} is not running"
        if queued:
            LOG.info("%s cancelled by %s before it started", job.describe(), by)
            self._answer(job, job.cancelled_unstarted(by))
            return True, "queued", f"command {target!r} cancelled"
        return job.cancel_running(by)

    def _find(self, request_id):
        """(lane, job) of a waiting or running job with this id, or (None, None)."""
        for lane in self.lanes.values():
            job = lane.running.get(request_id) or next(
                (j for j in lane.waiting if j.id == request_id), None)
            if job is not None:
                return lane, job
        return None, None

    # -- workers ------------------------------------------------------------------
    def _work(self, lane):
        # Idle workers block without waking.
        while True:
            job, expired = self._next(lane)
            if expired:
                self._answer_expired(job)
                continue
            try:
                reply = job.route.run(lane.owner, job)
            except RequestError as e:  # the user can act on it: a DockerError
                LOG.info("%s failed: %s", job.describe(), e)
                reply = job.error(str(e))
            except Exception as e:  # a bug here must still answer the request
                LOG.exception("%s failed", job.describe())
                reply = job.error(f"the agent failed to carry out the request: {e}")
            with self.lock:
                del lane.running[job.id]
                self.finished.notify_all()
            self._log_if_late(job)
            self._answer(job, reply)

    def _next(self, lane):
        """(the oldest waiting job, whether it expired); it is running unless so."""
        with self.lock:
            while not lane.waiting:
                lane.work.wait()
            job = lane.waiting.popleft()
            expired = self._waited_too_long(job, time.monotonic())
            if not expired:
                lane.running[job.id] = job
            return job, expired

    def _waited_too_long(self, job, now):
        deadline_s = self.config.request_deadline_s
        return bool(deadline_s) and now - job.received_at >= deadline_s

    def _answer_expired(self, job):
        waited = time.monotonic() - job.received_at
        LOG.warning("%s expired unstarted after %.1f s in the queue", job.describe(),
                    waited)
        self._answer(job, job.error(
            f"expired unstarted: it waited {waited:.1f} s for a free worker, longer "
            f"than the API waits for a reply (request_deadline_s = "
            f"{self.config.request_deadline_s:g} s); send it again if still wanted"))

    def _log_if_late(self, job):
        """A job that ran past the API's wait is still answered; say so."""
        took = time.monotonic() - job.received_at
        deadline_s = self.config.request_deadline_s
        if deadline_s and took > deadline_s:
            LOG.info("%s answered %.1f s after it came, later than the API waits "
                     "(%g s): the API may drop the reply", job.describe(), took,
                     deadline_s)

    def _answer(self, job, reply):
        self.send(reply, keep_until=job.received_at + self.config.reply_keep_s)

    # -- stopping -----------------------------------------------------------------
    def stop(self, kill_at):
        """Answer what waits, stop running commands (TERM now, KILL at
        `kill_at`, monotonic) and wait until then for the running jobs to
        end; take no more."""
        grace_s = max(0.0, kill_at - time.monotonic())
        with self.lock:
            self.stopping = True
            waiting = [job for lane in self.lanes.values() for job in lane.waiting]
            running = [job for lane in self.lanes.values()
                       for job in lane.running.values()]
            for lane in self.lanes.values():
                lane.waiting.clear()
        for job in waiting:
            self._answer(job, job.cancelled_unstarted("the agent's shutdown"))
        for job in running:
            job.cancel_running("the agent's shutdown", grace_s)
        self.wait_idle(kill_at + POLL_S * 3)

    def wait_idle(self, deadline):
        """Wait, until `deadline` at most, until no job runs (idle workers need
        no waiting for: they are daemons)."""
        with self.lock:
            self.finished.wait_for(
                lambda: not any(lane.running for lane in self.lanes.values()),
                max(0.0, deadline - time.monotonic()),
            )


###############################################################################
# Delivery: what waits to be sent #############################################
###############################################################################


class DropCounter:
    """Counts what had to be dropped, and says so at most once a minute."""

    def __init__(self, text):
        self.text = text  # a format with {n} (dropped since last said) and {total}
        self.total = 0
        self._unlogged = 0
        self._logged_at = None

    def add(self, n=1):
        self.total += n
        self._unlogged += n

    def log(self):
        now = time.monotonic()
        if self._unlogged and (self._logged_at is None or now - self._logged_at >= 60):
            LOG.warning(self.text.format(n=self._unlogged, total=self.total))
            self._unlogged, self._logged_at = 0, now


# A reply, pong or stream chunk, encoded, waiting for the writer. A reply has
# `keep_until` (monotonic): it waits for a reconnect until then. A bare pong
# (`coalesce`) is never queued twice: one answers any number of pings.
Waiting = collections.namedtuple("Waiting", "kind payload keep_until coalesce")


class Sample:
    """A metrics sample: its number (for the spool), its `data` as JSON, when
    it was queued (monotonic seconds), and whether it is in the spool yet."""

    __slots__ = ("number", "data", "queued_at", "spooled")

    def __init__(self, number, data, queued_at, spooled=False):
        self.number, self.data, self.spooled = number, data, spooled
        self.queued_at = queued_at


class Outbox:
    """Replies, pongs and stream chunks, waiting for the writer: what must go
    first, and how much may wait.

    The writer sends what `take()` hands it and says `sent()`. Waiting
    messages are bounded by MAX_WAITING_MESSAGES and MAX_WAITING_BYTES, so an
    API that sends but does not read cannot make answers pile up; a reply
    waits for a reconnect until its `keep_until`.
    """

    def __init__(self, doorbell, reply_keep_s=300.0):
        self.doorbell = doorbell  # an Event the writer waits on: set, it looks
        self.reply_keep_s = reply_keep_s
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # the writer took a message
        self._waiting = collections.deque()  # of Waiting, oldest first
        self._bytes = 0
        self._taken = 0  # messages the writer took, ever: its progress
        self._pong_waiting = False
        self._sending = None  # what the writer took and has not reported sent
        self.drops = DropCounter(
            "the API is not reading what the agent sends: dropped {n} waiting "
            f"replies, pongs or output chunks ({{total}} in all; at most "
            f"{MAX_WAITING_MESSAGES} or {MAX_WAITING_BYTES // 2**20} MiB wait; "
            "later drops are counted here once a minute)"
        )

    def put(self, message, keep_until=None):
        """Queue a reply, pong or stream chunk; never blocks.

        A reply to a request waits for a reconnect until `keep_until`
        (monotonic; by default reply_keep_s from now). When too much waits,
        the oldest messages that are not replies go first, then the oldest
        replies: the API has given up on those first.
        """
        coalesce = message == {"type": "pong"}
        if keep_until is None and is_reply(message):
            keep_until = time.monotonic() + self.reply_keep_s
        entry = Waiting(message["type"], to_json(message), keep_until, coalesce)
        with self._lock:
            if coalesce and self._pong_waiting:
                return
            self._pong_waiting |= coalesce
            self._waiting.append(entry)
            self._bytes += len(entry.payload)
            self._make_room()
        self.doorbell.set()
        self.drops.log()

    def _make_room(self):
        while (len(self._waiting) > MAX_WAITING_MESSAGES
               or self._bytes > MAX_WAITING_BYTES):
            unkept = (w for w in self._waiting if w.keep_until is None)
            victim = next(unkept, self._waiting[0])
            self._waiting.remove(victim)
            self._forget(victim)
            self.drops.add()

    def _forget(self, entry):
        """Bookkeeping for an entry that leaves the queue."""
        self._bytes -= len(entry.payload)
        if entry.coalesce:
            self._pong_waiting = False

    def take(self):
        """(type, payload) of the oldest message, or None; `sent()` follows."""
        with self._lock:
            if not self._waiting:
                return None
            entry = self._sending = self._waiting.popleft()
            self._forget(entry)
            self._taken += 1
            self._room.notify_all()
        return entry.kind, entry.payload

    def sent(self):
        with self._lock:
            self._sending = None

    def wait_for_room(self, timeout):
        """True once fewer than half of MAX_WAITING_MESSAGES and of
        MAX_WAITING_BYTES wait to be sent; False after `timeout`. The receive
        loop reads on only then, so that a burst of requests slows the API
        down instead of filling the queue: replies are dropped only when the
        API stops reading altogether."""
        with self._room:
            return self._room.wait_for(self._has_room, timeout)

    def _has_room(self):
        return (len(self._waiting) < MAX_WAITING_MESSAGES // 2
                and self._bytes < MAX_WAITING_BYTES // 2)

    def taken_count(self):
        """How many messages the writer has taken, ever: whether it moves."""
        with self._lock:
            return self._taken

    def connection_lost(self):
        """Replies wait for the next connection, until their `keep_until` (at
        most MAX_KEPT_REPLIES of them), what the writer took but could not
        send in front; pongs and stream chunks are dropped."""
        with self._lock:
            if self._sending is not None:
                self._waiting.appendleft(self._sending)
                self._sending = None
            now = time.monotonic()
            kept = [w for w in self._waiting if w.keep_until and w.keep_until > now]
            if len(kept) > MAX_KEPT_REPLIES:
                LOG.warning("dropped %d replies waiting for a reconnect (more than %d)",
                            len(kept) - MAX_KEPT_REPLIES, MAX_KEPT_REPLIES)
            self._waiting = collections.deque(kept[-MAX_KEPT_REPLIES:])
            self._bytes = sum(len(w.payload) for w in self._waiting)
            self._pong_waiting = False
            self._room.notify_all()


class ReadProof:
    """What shows that the API read the samples sent on one connection.

    Its acknowledgement (`metrics_received`, in order, no id), from an API
    that acknowledges; else the pong to a ping sent after them, because the
    API handles messages in order. Whether it acknowledges is learnt on each
    connection: a pong that answers a ping sent after a sample, with no
    acknowledgement before it, means it never does. Each connection has a
    new one; it is used under the SampleQueue's lock and has none of its own.
    """

    UNKNOWN, ACKS, NO_ACKS = "unknown", "acks", "no acks"

    def __init__(self):
        self.mode = self.UNKNOWN
        self.last_sent = 0  # number of the last sample sent on this connection
        # The number of the last sample sent before the latest ping: kept
        # apart from the pings waiting for their pong, so that an answered
        # ping still counts as sent (else each pong called for another ping).
        self.last_pinged = 0
        # For each ping sent on this connection and not yet answered, oldest
        # first: the number of the last sample sent before it (0: none).
        self._pings = collections.deque()

    def ping_due(self):
        """True when samples went out since the last ping, and only a pong
        can show them read (the API is not known to acknowledge)."""
        return self.mode != self.ACKS and self.last_sent > self.last_pinged

    def ping_taken(self):
        # Not noted once the API acknowledges: its pongs then prove nothing.
        # Nor beyond a bound, for an API that never answers pings: a later
        # pong is then matched to an older ping, which proves less, never more.
        if self.mode == self.ACKS:
            return
        self.last_pinged = self.last_sent
        if len(self._pings) < MAX_UNANSWERED_PINGS:
            self._pings.append(self.last_sent)

    def pong(self):
        """A pong answers the oldest ping not yet answered: every sample sent
        before that ping has been read. (The number of the last sample it
        shows read, 0 for none; True when it taught that the API does not
        acknowledge.)"""
        if not self._pings:
            return 0, False  # a pong to a heartbeat while the API acknowledges
        shown_read = self._pings.popleft()
        if self.mode == self.ACKS or not shown_read:
            return 0, False
        learnt = self.mode == self.UNKNOWN
        self.mode = self.NO_ACKS
        return shown_read, learnt


class SampleQueue:
    """The metrics samples not yet delivered, oldest first, in memory and in
    the spool; and how far this connection's delivery has got.

    A sample is delivered only when the API has shown that it read it
    (ReadProof). The first `_in_flight` samples are sent and not yet shown
    read, at most METRICS_WINDOW; they go out again on the next connection
    if the link drops, however it drops (a link that dies silently swallows
    whatever is written into it). After samples go out, `take()` hands out
    a ping, unless the API acknowledges.

    At most `capacity` samples and MAX_SAMPLE_BYTES are kept; the oldest go
    first. The spool (when a state directory is in use) is written only for
    samples that may need it, so that a healthy API costs no disk writes at
    all: a sample is written when it is taken while the link is down, or
    when a later one comes at least `grace_s` after it (half the metrics
    interval) and it is still undelivered, and at a clean stop whatever is
    undelivered; a "done" record follows only a sample that was written. The
    grace is there because ticks can bunch: a tick that ran late under load
    is followed by one on time, and the API has not answered in between. So
    a restart loses none, and SIGKILL loses at most the samples of the last
    interval or two that the API had not acknowledged. All file work
    happens in the metrics thread (`add`) and at the end (`close`), never in
    the receive loop.
    """

    def __init__(self, doorbell, capacity, spool=None, grace_s=0.0):
        self.doorbell = doorbell  # an Event the writer waits on: set, it looks
        self.capacity = capacity
        self.spool = spool
        self.grace_s = grace_s  # how long a sample may wait unwritten (see above)
        self.clock = time.monotonic
        self.proof = ReadProof()  # under self._lock: it has no lock of its own
        self._lock = threading.Lock()
        self._samples = collections.deque()  # of Sample, oldest first
        self._in_flight = 0  # how many of the first are sent, unacknowledged
        self._bytes = 0
        self._numbers = itertools.count(1)
        self._done = []  # numbers delivered or dropped, not yet in the spool
        self._sending = None  # the sample the writer took, until sent()
        self._linked = False  # a connection is up (between link_up and its loss)
        self._spooled_bytes = 0  # of the samples in the spool, undelivered
        self._server_id = b""  # '"server_id":ID,' put in each sample sent
        self._waiting_since = None  # when in-flight samples last saw progress
        self.drops = DropCounter(
            f"offline buffer full ({capacity} samples or "
            f"{MAX_SAMPLE_BYTES // 2**20} MiB): dropped the {{n}} oldest "
            "({total} in all); raise buffer_size to keep more"
        )

    # -- the spool: at start, at each sample, at the end -----------------------
    def open(self):
        """Take up the samples a spool kept from before a restart, oldest first
        (as many as fit: buffer_size may have been lowered since). New samples
        are numbered past every number in the file, delivered ones included:
        a new sample must never take the number of an old "done" record."""
        if self.spool is None:
            return
        found, last, dropped = self.spool.open(self.capacity)
        with self._lock:
            for number, data in found:
                self._samples.append(Sample(number, data, 0.0, spooled=True))
                self._bytes += len(data)
                self._spooled_bytes += len(data)
            self._numbers = itertools.count(last + 1)
        self.drops.add(dropped)
        self.drops.log()

    def add(self, data):
        """A new sample (the metrics thread): queued. The spool gets what is
        due (see the class), with the deliveries of samples it holds."""
        sample = Sample(next(self._numbers), to_json(data), self.clock())
        with self._lock:
            self._samples.append(sample)
            self._bytes += len(sample.data)
            self._make_room()
            due = self._to_spool(everything=not self._linked)
        self.doorbell.set()
        self.drops.log()
        self._write(*due)

    def close(self):
        """At the end: every undelivered sample in the spool, the deliveries
        recorded, and the file synced: a clean stop loses nothing."""
        if self.spool is not None:
            with self._lock:
                due = self._to_spool(everything=True)
            self._write(*due)
            self.spool.close()

    def _to_spool(self, everything):
        """(samples, done numbers, the spool's live bytes) to write now: the
        undelivered samples not in the spool yet, unless `everything` only
        those queued at least the grace before the newest. They are always
        the newest ones (older ones went in when a sample came late enough
        after theirs), so the look starts at the end."""
        newest = self._samples[-1] if self._samples else None
        due_before = newest.queued_at - self.grace_s if newest else 0.0
        samples = []
        for sample in reversed(self._samples):
            if sample.spooled:
                break
            if everything or (sample is not newest and sample.queued_at <= due_before):
                sample.spooled = True
                self._spooled_bytes += len(sample.data)
                samples.append((sample.number, sample.data))
        done, self._done = self._done, []
        return samples[::-1], done, self._spooled_bytes

    def _write(self, samples, done, live_bytes):
        if self.spool is not None and (samples or done):
            self.spool.append(samples, done)
            self.spool.compact(self._spooled_pending, live_bytes)

    def _make_room(self):
        while len(self._samples) > self.capacity or (
            self._bytes > MAX_SAMPLE_BYTES and len(self._samples) > self._in_flight + 1
        ):
            # The oldest unsent one: dropping a sent one would make the next
            # acknowledgement count against the wrong sample.
            if len(self._samples) > self._in_flight:
                dropped = self._samples[self._in_flight]
                del self._samples[self._in_flight]
            else:
                dropped = self._samples.popleft()
                self._in_flight -= 1
            self._forget(dropped)
            self.drops.add()

    def _forget(self, sample):
        """A sample delivered or dropped: the spool learns it with the next
        write, if it holds it."""
        self._bytes -= len(sample.data)
        if sample.spooled:
            self._spooled_bytes -= len(sample.data)
            self._done.append(sample.number)

    def _spooled_pending(self):
        """What a rewrite of the spool keeps: the samples it holds, undelivered."""
        with self._lock:
            return [(s.number, s.data) for s in self._samples if s.spooled]

    def counts(self):
        """(unsent, sent and unacknowledged) samples."""
        with self._lock:
            return len(self._samples) - self._in_flight, self._in_flight

    # -- the writer ------------------------------------------------------------
    def link_up(self, server_id):
        """A connection is up: samples taken from now on wait a sample's time
        before they are written (see the class)."""
        with self._lock:
            self._linked = True
        self.use_server_id(server_id)

    def use_server_id(self, server_id):
        """Samples sent from now on carry this server id (None: the API gave
        none), set at each connection and by a later auth_success."""
        stamp = b""
        if server_id is not None:
            stamp = b'"server_id":' + to_json(server_id) + b","
        with self._lock:
            self._server_id = stamp

    def ping(self):
        """The heartbeat's ping, noted: its pong shows what was sent before it read."""
        with self._lock:
            self.proof.ping_taken()
        return PING_MESSAGE

    def take(self):
        """(type, payload) of the next sample the window lets out, else of a
        ping whose pong will show the samples sent so far read; or None.
        `sent()` follows a sample."""
        with self._lock:
            if not self._ready():
                if not self.proof.ping_due():
                    return None
                self.proof.ping_taken()
                return "ping", PING_MESSAGE
            sample = self._sending = self._samples[self._in_flight]
            stamp = self._server_id
        # The sample's JSON goes out as it was made, the server id put in front.
        return "metrics", b'{"type":"metrics","data":{' + stamp + sample.data[1:] + b"}"

    def sent(self):
        with self._lock:
            sample, self._sending = self._sending, None
            if sample is None or len(self._samples) <= self._in_flight or \
                    self._samples[self._in_flight] is not sample:
                return  # dropped while it was being sent
            if not self._in_flight:
                self._waiting_since = time.monotonic()
            self._in_flight += 1
            self.proof.last_sent = sample.number

    def _ready(self):
        return self._in_flight < METRICS_WINDOW and len(self._samples) > self._in_flight

    # -- the receiver -------------------------------------------------------------
    def acknowledged(self):
        with self._lock:
            self.proof.mode = ReadProof.ACKS
            if self._in_flight:
                self._forget(self._samples.popleft())
                self._in_flight -= 1
            self._waiting_since = time.monotonic() if self._in_flight else None
        self.doorbell.set()

    def unread_for(self):
        """Seconds the samples in flight have waited with none shown read."""
        with self._lock:
            since = self._waiting_since
        return time.monotonic() - since if since is not None else 0.0

    def pong_received(self):
        """A pong: the samples it shows read are delivered."""
        with self._lock:
            shown_read, learnt = self.proof.pong()
            if not shown_read:
                return
            while self._in_flight and self._samples[0].number <= shown_read:
                self._forget(self._samples.popleft())
                self._in_flight -= 1
            self._waiting_since = time.monotonic() if self._in_flight else None
        if learnt:
            LOG.info("the API does not acknowledge metrics; a sample counts as "
                     "delivered when the pong to a ping sent after it comes")
        self.doorbell.set()

    def connection_lost(self):
        """Unacknowledged samples are sent again on the next connection, which
        learns afresh whether the API acknowledges: it may be another server,
        and a window waiting for acks that never come would stop metrics
        altogether."""
        with self._lock:
            self._linked = False
            self._in_flight = 0
            self._sending = None
            self._waiting_since = None
            self.proof = ReadProof()

    @property
    def dropped_total(self):
        return self.drops.total


###############################################################################
# The spool: samples kept on disk, in the state directory #####################
###############################################################################

class Spool:
    """The samples not yet delivered, on disk too, so that a restart loses none.

    One append-only file of records: S (a sample: its number and its JSON)
    and D (that sample is done: delivered, or dropped as the oldest). Each
    record carries its length and a CRC-32, so a torn or corrupt record is
    found, skipped and reported once; the rest is delivered. Appends reach
    the page cache at once, so a crash of the agent (SIGKILL, the OOM killer)
    loses nothing; fsync runs at most every SPOOL_SYNC_S and at a clean stop,
    so a power cut loses at most that long. When done records dominate, the
    file is rewritten with the pending samples only. Any failure to write
    (a full disk, a read-only directory) turns the spool off with one
    warning: the agent goes on from memory.

    The directory is held by a descriptor, opened without following a link
    once every directory above it has passed ssh's checks (see
    open_state_directory), and locked for as long as the agent runs: one
    agent per spool. Its files are opened relative to that descriptor, never
    through a link, so that a directory swapped on the path after the start
    cannot point the agent's writes at a file of someone else's choosing.
    """

    def __init__(self, directory):
        self.directory = directory
        self.path = os.path.join(directory, SPOOL_FILE)
        self.problem = None  # why the spool is off, for the log and --check
        self._dir = None  # descriptor of the directory, locked
        self._fd = None  # the spool file, for appending
        self._records = 0  # records in the file
        self._dead = 0  # of which done records, or samples they mark done
        self._size = 0  # bytes in the file
        self._synced_at = time.monotonic()
        # The metrics thread writes; at the end the main thread closes, even if
        # a hung statvfs kept the metrics thread from ending.
        self._guard = threading.Lock()

    # -- start ----------------------------------------------------------------
    def open(self, capacity):
        """(pending, last, dropped): the samples found pending [(number,
        JSON)], oldest first, at most `capacity` and MAX_SAMPLE_BYTES of them;
        the highest number in the file, which new samples must pass; how many
        of the oldest did not fit. ([], 0, 0) when the spool cannot be used
        (then `problem` says why)."""
        try:
            self._dir = lock_directory(open_state_directory(self.directory), self.path)
            self._fd = self._open_spool()
            found = self._load(capacity)
        except SpoolRefused as e:
            return self._refused(str(e))
        except OSError as e:
            return self._refused(f"cannot use the spool {self.path}: {e}")
        if found[0]:
            LOG.info("spool: %d samples from before the restart, delivered first",
                     len(found[0]))
        return found

    def _open_spool(self):
        """The spool file, made 0600, for appending."""
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND
        fd = open_in_directory(SPOOL_FILE, flags, self._dir, self.path)
        try:
            check_private(os.fstat(fd), self.path, stat.S_ISREG)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _load(self, capacity):
        """(pending, last, dropped) of the file, read within bounds (see
        SpoolReader); after damage or drops a clean file is left behind."""
        size = os.fstat(self._fd).st_size
        header = os.pread(self._fd, len(SPOOL_HEADER), 0)
        if size <= len(SPOOL_HEADER) and SPOOL_HEADER.startswith(header):
            # new, empty, or cut while its header was written
            os.ftruncate(self._fd, 0)
            self._write(SPOOL_HEADER)
            return [], 0, 0
        if header != SPOOL_HEADER or size > MAX_SPOOL_FILE_BYTES:
            self._set_aside(header, size)
            return [], 0, 0
        os.lseek(self._fd, len(SPOOL_HEADER), os.SEEK_SET)
        reader = SpoolReader(self._fd, size - len(SPOOL_HEADER))
        pending, last, dropped = newest_pending(reader, capacity)
        if reader.skipped:
            LOG.warning("spool %s: skipped %d damaged bytes (a torn or corrupt "
                        "record%s); the intact samples are delivered", self.path,
                        reader.skipped, f"; {reader.gave_up}" if reader.gave_up else "")
        if reader.skipped or dropped:  # a clean file: the damage is reported once
            self._rewrite(pending)
        else:
            self._records, self._dead, self._size = reader.records, \
                reader.records - len(pending), size
        return pending, last, dropped

    def _set_aside(self, header, size):
        """A spool of another format (a later version of the agent), or larger
        than this agent ever writes, is kept aside unread, and a new one begun."""
        aside = f"{SPOOL_FILE}.unknown-{int(time.time())}"
        os.rename(SPOOL_FILE, aside, src_dir_fd=self._dir, dst_dir_fd=self._dir)
        what = (f"of {size} bytes, more than any this agent writes" if
                header == SPOOL_HEADER else f"of an unknown format ({header!r}); a "
                "newer agent may deliver it")
        LOG.warning("spool %s is %s; set aside as %s, not read", self.path, what,
                    os.path.join(self.directory, aside))
        os.close(self._fd)
        self._fd = self._open_spool()
        self._write(SPOOL_HEADER)

    # -- while running (the metrics thread only) --------------------------------
    def append(self, samples, done):
        """Write the numbers now done and new samples [(number, JSON)]: done
        first, so that reading the file back never holds more pending samples
        than the agent did."""
        if self._fd is None or not (samples or done):
            return  # off: nothing to encode at each tick
        records = b"".join([encode_record(b"D", n, b"") for n in done]
                           + [encode_record(b"S", n, data) for n, data in samples])
        with self._guard:
            if self._fd is None:  # turned off meanwhile, by close()
                return
            try:
                self._write(records)
                if time.monotonic() - self._synced_at >= SPOOL_SYNC_S:
                    self._sync()
            except OSError as e:
                self._off(f"writing the spool {self.path} failed: {e}")
                return
            self._records += len(samples) + len(done)
            self._dead += 2 * len(done)

    def compact(self, pending_samples, live_bytes):
        """Rewrite the file with the pending samples only (`live_bytes` of
        them), when done records make up most of it, by count or by size: an
        atomic replace (a crash keeps either file). So the file stays within
        about twice what is pending, and never grows past what a restart reads
        (MAX_SPOOL_FILE_BYTES)."""
        with self._guard:
            if self._fd is None:
                return
            dead_records = self._dead >= max(SPOOL_COMPACT_RECORDS, self._records // 2)
            dead_bytes = self._size - live_bytes >= max(SPOOL_COMPACT_BYTES,
                                                        self._size // 2)
            if not (dead_records or dead_bytes):
                return
            try:
                self._rewrite(pending_samples())
            except OSError as e:
                self._off(f"compacting the spool {self.path} failed: {e}")

    def _rewrite(self, pending):
        """The file replaced by one of the pending samples only, atomically:
        a crash in between leaves either the old file or the new one. The lock
        is on the directory, so no other agent can step in meanwhile."""
        with contextlib.suppress(FileNotFoundError):  # left by a crash
            os.unlink(SPOOL_NEW, dir_fd=self._dir)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND
        fd = open_in_directory(SPOOL_NEW, flags, self._dir, self.path)
        try:
            write_all(fd, SPOOL_HEADER)
            for number, data in pending:
                write_all(fd, encode_record(b"S", number, data))
            os.fsync(fd)
            os.replace(SPOOL_NEW, SPOOL_FILE, src_dir_fd=self._dir,
                       dst_dir_fd=self._dir)
        except BaseException:
            os.close(fd)
            raise
        os.close(self._fd)
        self._fd = fd
        with contextlib.suppress(OSError):  # the rename itself, durable
            os.fsync(self._dir)
        self._records, self._dead = len(pending), 0
        self._size = os.fstat(fd).st_size

    def _write(self, data):
        write_all(self._fd, data)
        self._size += len(data)

    def _sync(self):
        self._synced_at = time.monotonic()
        try:
            os.fsync(self._fd)
        except OSError as e:
            self._off(f"syncing the spool {self.path} failed: {e}")

    def close(self):
        """At the end: the file synced and closed, and the directory's lock let go."""
        with self._guard:
            if self._fd is not None:
                self._sync()
            self._close_file()
            if self._dir is not None:
                os.close(self._dir)
                self._dir = None

    def _close_file(self):
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _off(self, problem):
        """The spool is off: samples are kept in memory only. The directory
        stays locked: no other agent takes it over while this one runs."""
        self.problem = problem
        LOG.warning("%s; samples are kept in memory only, as many as buffer_size, "
                    "and a restart loses them", problem)
        self._close_file()

    def _refused(self, problem):
        self._off(problem)
        return [], 0, 0


class SpoolRefused(Exception):
    """A spool the agent must not use (another user's, readable by others, a
    link, under a directory others may change): samples stay in memory."""


class SpoolHeld(AgentError):
    """Another agent holds the spool's lock, and so, most likely, the same API
    key: the ChatOps API keeps one connection per key and forgets it when any
    connection of that key ends, so a second agent would cut the first off
    from the UI's requests (PROTOCOL.md, section 9). The agent does not start.
    What it cannot see: an agent with the same key elsewhere (another state
    directory, another machine); docs/troubleshooting.md says how that shows."""


def newest_pending(records, capacity):
    """(pending [(number, JSON)] oldest first, highest number seen, dropped)
    from a spool's records: the samples not marked done, at most `capacity`
    and MAX_SAMPLE_BYTES of them, the oldest dropped first. Memory stays
    within those bounds whatever the file holds: a done record follows its
    sample, so nothing is kept for numbers already let go."""
    kept, kept_bytes, last, dropped = collections.OrderedDict(), 0, 0, 0
    for kind, number, payload in records:
        last = max(last, number)
        if number in kept:  # done, or (in a damaged file) a sample twice
            kept_bytes -= len(kept.pop(number))
        if kind == b"S":
            kept[number] = payload
            kept_bytes += len(payload)
        while len(kept) > capacity or (kept_bytes > MAX_SAMPLE_BYTES and len(kept) > 1):
            kept_bytes -= len(kept.popitem(last=False)[1])
            dropped += 1
    return sorted(kept.items()), last, dropped


class SpoolReader:
    """The sound records of a spool file, (kind, number, payload) in file
    order, read from a descriptor in chunks: memory stays within one record
    and one chunk however large the file. Damage costs bounded work: after a
    record that fails its checks, each byte that could begin one (S or D) is
    tried, and the rest of the file is given up once SPOOL_RESYNC_TRIES
    places or SPOOL_RESYNC_BYTES of checksums have failed, or past
    MAX_SPOOL_RECORDS records (more than the agent ever writes). A crafted
    file cannot keep the agent from starting."""

    CHUNK = 1024 * 1024

    def __init__(self, fd, size):
        self._fd = fd
        self._left = size  # bytes from the descriptor's offset not yet read
        self._buffer = bytearray()
        self._tries = SPOOL_RESYNC_TRIES
        self._checksums = SPOOL_RESYNC_BYTES
        self.records = 0
        self.skipped = 0  # bytes of damage passed over
        self.gave_up = None  # why the rest was not read, if it was not

    def __iter__(self):
        while self._more(1):
            if self.records >= MAX_SPOOL_RECORDS:
                self._give_up(f"more than {MAX_SPOOL_RECORDS} records")
                return
            record = self._record()
            if record is not None:
                self.records += 1
                yield record
                continue
            self._tries -= 1
            if self._tries <= 0 or self._checksums <= 0:
                self._give_up("damaged throughout; the rest was not read")
                return
            self._skip()

    def _more(self, n):
        """True once at least n bytes are buffered; False if the file ends first."""
        while len(self._buffer) < n and self._left > 0:
            chunk = os.read(self._fd, min(max(n - len(self._buffer), self.CHUNK),
                                          self._left))
            if not chunk:
                self._left = 0
                break
            self._left -= len(chunk)
            self._buffer += chunk
        return len(self._buffer) >= n

    def _record(self):
        """The sound record the buffer begins with, taken from it, or None."""
        buffer = self._buffer
        if not self._more(SPOOL_RECORD_HEAD) or buffer[0] not in b"SD":
            return None
        length = int.from_bytes(buffer[9:13], "big")
        end = SPOOL_RECORD_HEAD + length
        if length > MAX_SPOOL_RECORD_BYTES or not self._more(end):
            return None
        with memoryview(buffer) as view:
            checksum = binascii.crc32(view[SPOOL_RECORD_HEAD:end],
                                      binascii.crc32(view[:13]))
        if checksum != int.from_bytes(buffer[13:17], "big"):
            self._checksums -= length
            return None
        record = bytes(buffer[:1]), int.from_bytes(buffer[1:9], "big"), \
            bytes(buffer[SPOOL_RECORD_HEAD:end])
        del buffer[:end]  # cheap: a bytearray drops its front without copying
        return record

    def _skip(self):
        """Past the first byte, to the next that could begin a record."""
        found = RECORD_START.search(self._buffer, 1)
        end = found.start() if found else len(self._buffer)
        self.skipped += end
        del self._buffer[:end]

    def _give_up(self, why):
        self.gave_up = why
        self.skipped += len(self._buffer) + self._left
        self._buffer.clear()
        self._left = 0


RECORD_START = re.compile(b"[SD]")


def encode_record(kind, number, payload):
    head = kind + number.to_bytes(8, "big") + len(payload).to_bytes(4, "big")
    return head + binascii.crc32(head + payload).to_bytes(4, "big") + payload


def write_all(fd, data):
    """Write all of `data`; OSError (a full disk) if it cannot."""
    with memoryview(data) as view:
        while view:
            view = view[os.write(fd, view):]


# -- the state directory ------------------------------------------------------------


def open_state_directory(path):
    """A descriptor of the spool's directory, made (0700) if missing, or
    SpoolRefused / OSError. It is opened without following a link, and must
    be the agent user's and closed to others; every directory above it must
    pass check_directories_above."""
    check_state_directory(path)
    path = os.path.abspath(path)
    os.makedirs(path, mode=0o700, exist_ok=True)  # under safe directories only
    parent = os.path.realpath(os.path.dirname(path))
    check_directories_above(parent, path)  # again: makedirs may have made some
    parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = open_in_directory(os.path.basename(path), os.O_RDONLY | os.O_DIRECTORY,
                               parent_fd, path)
    finally:
        os.close(parent_fd)
    try:
        check_private(os.fstat(fd), path, stat.S_ISDIR)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_state_directory(path):
    """SpoolRefused if what exists of `path` already rules it out: a directory
    above it that others may change, or the directory itself a link, another
    user's or open to others. Changes nothing (--check uses it too)."""
    path = os.path.abspath(path)
    existing = nearest_existing(path)
    above = os.path.dirname(path) if existing == path else existing
    check_directories_above(os.path.realpath(above), path)
    if existing == path:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            raise SpoolRefused(f"the spool's directory {path} is a symbolic link, "
                               "which the agent does not follow: give its target as "
                               "state_dir")
        check_private(info, path, stat.S_ISDIR)
    spool = os.path.join(path, SPOOL_FILE)
    if os.path.lexists(spool):
        check_private(os.lstat(spool), spool, stat.S_ISREG)


def nearest_existing(path):
    """`path` (absolute), or the nearest directory above it that exists."""
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def check_directories_above(directory, path):
    """SpoolRefused unless `directory` (a path without links) and every one
    above it is root's or the agent user's, and no one else may write in it:
    ssh's rule for the directories above a key. Someone who could rename an
    entry there could swap the spool's directory for one of theirs. A sticky
    directory of root's (/tmp) passes: in it, no one can rename or remove
    what another user made."""
    uid = os.geteuid()
    while True:
        info = os.lstat(directory)
        mode = stat.S_IMODE(info.st_mode)
        sticky = info.st_uid == 0 and mode & stat.S_ISVTX
        if info.st_uid not in (0, uid) or (mode & 0o022 and not sticky):
            raise SpoolRefused(
                f"the spool's directory {path} lies under {directory}, which "
                f"others may change (owner uid {info.st_uid}, mode {mode:o}): "
                "choose a state_dir under directories only root and this user may "
                f"write, or fix that one (chown root, chmod go-w {directory})"
            )
        above = os.path.dirname(directory)
        if above == directory:
            return
        directory = above


def check_private(info, path, is_kind):
    """SpoolRefused unless `info` (of `path`) is of the kind `is_kind` (a stat
    test), the agent user's, and closed to others."""
    if not is_kind(info.st_mode):
        kind = "directory" if is_kind is stat.S_ISDIR else "regular file"
        raise SpoolRefused(f"the spool's {path} is not a {kind}: remove it, or set "
                           "state_dir")
    if info.st_uid != os.geteuid():
        # Never advise a chown: the spool is most likely the service's, and
        # this is someone else (root, running --check) looking at it.
        names = UserNames()
        owner, me = names(info.st_uid), names(os.geteuid())
        raise SpoolRefused(
            f"the spool {path} belongs to {owner}, and this agent runs as {me}: "
            f"run the agent (and --check) as {owner}, e.g. runuser -u {owner} -- "
            "..., or give this one a state_dir of its own"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        mode = "700" if stat.S_ISDIR(info.st_mode) else "600"
        raise SpoolRefused(
            f"the spool {path} is accessible by others "
            f"(mode {stat.S_IMODE(info.st_mode):o}): chmod {mode} {path}"
        )


def open_in_directory(name, flags, dir_fd, path):
    """os.open of `name` in the directory `dir_fd`, never following a link
    and never waiting (on a FIFO put there); SpoolRefused for a link."""
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                       0o600, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SpoolRefused(f"{path} is a symbolic link, which the agent does "
                               "not follow: remove it, or set state_dir") from None
        raise


def lock_directory(fd, path):
    """`fd` locked for as long as it stays open (the agent's life): one agent
    per spool. The lock is on the directory, not on the file, so that a
    rewrite of the file never lets go of it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolHeld(
            f"another agent uses the spool {path}, and so most likely this API "
            "key: the ChatOps API keeps one connection per key, and a second "
            "agent would cut the first off from the web UI's commands. Stop the "
            "other one first (systemctl stop chatops-agent), or give this one a "
            "key and a state_dir of its own; --check never authenticates and may "
            "run beside it"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def state_directory(config, environ=None):
    """Where the spool lives, or None to keep samples in memory only."""
    environ = os.environ if environ is None else environ
    if config.state_dir is not None:
        chosen = config.state_dir.strip()
        return None if chosen.lower() in ("", "none") else chosen
    if environ.get("STATE_DIRECTORY"):  # systemd's StateDirectory=
        return environ["STATE_DIRECTORY"].split(":")[0]
    base = environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "chatops-agent")


def spool_for(config):
    directory = state_directory(config)
    return Spool(directory) if directory else None


###############################################################################
# Connection ##################################################################
###############################################################################

# RFC 6455 opcodes.
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CLOSE_REASONS = {1000: b"agent shutting down", 1011: b"agent restarting after an error"}


def close_frame_status(data):
    """(code, reason, answer) of a close frame's payload: what it says, and the
    code to answer it with. 1000; 1002 for what no endpoint may send (a
    payload of one byte, a code that is reserved or not in use: RFC 6455
    section 7.4); 1007 for a reason that is not UTF-8 (section 8.1)."""
    if not data:
        return None, "", 1000
    if len(data) == 1:
        return None, "", 1002
    code = int.from_bytes(data[:2], "big")
    try:
        reason, answer = data[2:].decode("utf-8"), 1000
    except UnicodeDecodeError:
        reason, answer = data[2:].decode("utf-8", "replace"), 1007
    if not (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999):
        answer = 1002
    return code, reason, answer


def answer_close(ws, code):
    """Send a close frame, if the socket still takes one (before the writer
    exists: during authentication)."""
    with contextlib.suppress(Exception):  # the peer may be gone already
        ws.send_close(code, b"")


# What a close code means (RFC 6455 section 7.4.1, IANA registry), for the log.
CLOSE_MEANINGS = {
    1000: "normal closure", 1001: "going away", 1002: "protocol error",
    1003: "unsupported data", 1005: "no status", 1006: "abnormal closure",
    1007: "invalid payload", 1008: "policy violation", 1009: "message too big",
    1010: "extension required", 1011: "server error", 1012: "server restarting",
    1013: "try again later", 1014: "bad gateway", 1015: "TLS handshake failed",
}


def describe_close(code, reason):
    """'close 1012, server restarting: REASON' (the reason when there is one)."""
    meaning = CLOSE_MEANINGS.get(code)
    text = f"close {code}, {meaning}" if meaning else f"close {code}"
    if code is None:
        text = "a close frame without a code"
    return f"{text}: {one_line(reason[:200])}" if reason else text


def shut_down(sock):
    """Shut a socket (None: none) down from any thread: wakes a receive, fails
    a send, breaks off a connect or a TLS handshake."""
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


# What a TLS server's alert says of the client certificate (OpenSSL's reasons).
CERT_ASKED = ("TLSV13_ALERT_CERTIFICATE_REQUIRED",)
CERT_REFUSED = ("SSLV3_ALERT_BAD_CERTIFICATE", "TLSV1_ALERT_UNKNOWN_CA",
                "SSLV3_ALERT_CERTIFICATE_EXPIRED", "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
                "TLSV1_ALERT_ACCESS_DENIED", "SSLV3_ALERT_CERTIFICATE_REVOKED")


# What nginx answers in place of the upgrade when `ssl_verify_client on`
# finds no client certificate, or one it does not trust: it completes the
# TLS handshake either way and says so in a page of status 400.
NGINX_NO_CERTIFICATE = "No required SSL certificate was sent"
NGINX_BAD_CERTIFICATE = "The SSL certificate error"
CERT_ASKED_TEXT = ("the API's TLS asks for a client certificate and none was given: "
                   "set tls_client_cert and tls_client_key (--tls-client-cert, "
                   "--tls-client-key)")


def client_certificate_problem(error, config):
    """What a TLS alert says of the client certificate, and what to do; None
    when it says nothing of it."""
    reason = getattr(error, "reason", None) if isinstance(error, ssl.SSLError) else None
    if reason in CERT_ASKED or (reason == "SSLV3_ALERT_HANDSHAKE_FAILURE"
                                and not config.tls_client_cert):
        return CERT_ASKED_TEXT
    if reason in CERT_REFUSED and config.tls_client_cert:
        return certificate_refused(config, reason.lower().replace("_", " "))
    return None


def certificate_page(body, config):
    """What nginx's page in place of the upgrade says of the client
    certificate, and what to do; None when it says nothing of it."""
    if NGINX_NO_CERTIFICATE in body:
        return CERT_ASKED_TEXT
    if NGINX_BAD_CERTIFICATE in body and config.tls_client_cert:
        return certificate_refused(config, f"HTTP 400, {NGINX_BAD_CERTIFICATE}")
    return None


def certificate_refused(config, why):
    return (f"the API refused the client certificate {config.tls_client_cert} "
            f"({why}): is it the one its CA signed, and still valid? --check "
            "shows its subject and expiry")


def check_plaintext_peer(peer, allow_plaintext):
    """Refuse to go on in clear with a peer that is not loopback.

    The configuration allows ws:// only to a loopback host; what counts is the
    address actually connected to, whatever the host's name resolved to.
    """
    address = str(peer[0]).split("%")[0]  # an IPv6 address may carry a zone
    if not allow_plaintext and not is_loopback(address):
        raise LinkError(
            f"refusing to send the API key in clear to {address}, which is not "
            "loopback (the URL's host resolved there): use https://, or pass "
            "--allow-plaintext if this network is trusted"
        )


# What nginx needs in the API's location to pass a WebSocket upgrade on.
NGINX_UPGRADE_LINES = ('proxy_http_version 1.1; proxy_set_header Upgrade '
                       '$http_upgrade; proxy_set_header Connection "upgrade";')


def upgrade_not_passed(status, headers):
    """What to do when the answer to the upgrade looks like a reverse proxy
    that did not pass it on: the API then gets a plain GET, and answers it
    (or the proxy does) with no 101. '' when it does not look so."""
    server = one_line(str(headers.get("server", "")))[:60]
    if status not in (200, 400, 404, 405, 426) and "nginx" not in server.lower():
        return ""
    by = f" ({server})" if server else ""
    return (f"; a reverse proxy{by} in front of the API did not pass the WebSocket "
            f"upgrade on: for nginx, put these in the API's location: "
            f"{NGINX_UPGRADE_LINES}")


def cut_when_quiet(quiet_s, heartbeat_s):
    """What to say of a connection that ended with no close frame after
    `quiet_s` with nothing from the API: a proxy or load balancer that cuts
    idle connections does that, and a ping is what keeps the API talking.
    '' when the API spoke too recently for an idle cut."""
    if quiet_s < IDLE_CUT_MIN_S:
        return ""
    return (f", after {quiet_s:.1f} s with nothing from the API: if a proxy or "
            "load balancer on the way cuts connections idle that long, make its "
            f"idle timeout longer than the agent's heartbeat ({heartbeat_s:g} s; "
            "HAProxy: timeout tunnel, nginx: proxy_read_timeout), or set "
            "heartbeat_interval_s below it")


def refused_body(error, sock):
    """The start of the body of an answer that refused the upgrade:
    websocket-client 1.8 and later read it into the error; with 1.2.3 it is
    what the socket recorded after the head (HeadRecorder.close)."""
    body = getattr(error, "resp_body", None)
    if body is None and sock is not None and sock.head:
        body = bytes(sock.head).partition(b"\r\n\r\n")[2]
    if isinstance(body, (bytes, bytearray)):
        body = bytes(body).decode("utf-8", "replace")
    return str(body or "")[:MAX_REFUSAL_BODY]


def upgrade_answer(ws, error):
    """(status, headers) of the API's answer to the upgrade, as far as known."""
    response = getattr(ws, "handshake_response", None)
    status = getattr(error, "status_code", None) or getattr(response, "status", None)
    headers = getattr(error, "resp_headers", None) or getattr(response, "headers", None)
    return status, headers or {}


class Deadline:
    """Calls `expire(*args)` from a timer thread if a block takes too long."""

    def __init__(self, seconds, expire, *args):
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire, (expire, args))
        self._timer.daemon = True

    def _expire(self, expire, args):
        self.expired = True
        expire(*args)

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc_info):
        self._timer.cancel()


# -- the way to the API: TCP, a proxy's tunnel, TLS ----------------------------


class HeadRecorder:
    """Keeps what a socket receives while its `head` is a bytearray.

    websocket-client reads the answer to the upgrade itself and keeps only
    the last line of each header; the agent must see them all, because two
    Sec-WebSocket-Extensions lines are two extensions, as if on one line
    (RFC 9110 section 5.3). It reads that answer a byte at a time and no
    further, so what is recorded until the upgrade is done is the head.

    It also keeps the last TLS error it met (`failure`): websocket-client
    may report one in its own words ("socket is already closed"), and the
    TLS alert says what the server wanted, e.g. a client certificate.
    """

    head = None
    failure = None

    def recv(self, *args):
        try:
            data = super().recv(*args)
        except ssl.SSLError as e:
            self.failure = e
            raise
        head = self.head
        if head is not None and len(head) < MAX_HEAD_BYTES:
            head += data
        return data

    def send(self, *args):
        try:
            return super().send(*args)
        except (ssl.SSLError, ConnectionError) as e:
            if isinstance(e, ssl.SSLError):
                self.failure = e
            if self.head is not None and isinstance(self, ssl.SSLSocket):
                self._read_the_alert()
            raise

    def close(self):
        """websocket-client 1.2.3 closes the socket as soon as the upgrade is
        refused, before anyone reads the page that says why (nginx's about a
        client certificate, for one): what of it has come is recorded first.
        Only without waiting, and only after a whole head without a 101."""
        head = self.head
        if head is not None and b"\r\n\r\n" in head and not head.startswith(
                (b"HTTP/1.1 101", b"HTTP/1.0 101")):
            with contextlib.suppress(OSError, ValueError):
                self.setblocking(False)
                while len(head) < MAX_HEAD_BYTES and self.recv(MAX_REFUSAL_BODY):
                    pass
        super().close()

    def _read_the_alert(self):
        """The upgrade's write failed because the server ended TLS: its alert,
        if it came, waits to be read, and says why (TLS 1.3 clients learn of a
        refused certificate only after their handshake is done). Only while
        the upgrade is under way, when no other thread reads this socket."""
        try:
            super().recv(1)
        except ssl.SSLError as alert:
            self.failure = alert
        except OSError:
            pass


class RecordingSocket(HeadRecorder, socket.socket):
    """A TCP socket that can record (HeadRecorder)."""


class RecordingTLSSocket(HeadRecorder, ssl.SSLSocket):
    """A TLS socket that can record; SSLContext.sslsocket_class makes it."""


def connect_tcp(host, port, deadline, track):
    """A TCP connection to host:port by `deadline` (monotonic), each address
    the name resolves to tried in turn, IPv6 and IPv4 alike, with a share of
    the time left. `track(sock)` is told of each socket, so that another
    thread can shut it to break the attempt off."""
    addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error = None
    for n, (family, kind, proto, _, address) in enumerate(addresses):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock = RecordingSocket(family, kind, proto)
        track(sock)
        try:
            sock.settimeout(min(CONNECT_TIMEOUT_S, left / (len(addresses) - n)))
            sock.connect(address)
        except OSError as e:
            sock.close()
            error = e
            continue
        for option in TCP_OPTIONS:
            with contextlib.suppress(OSError):
                sock.setsockopt(*option)
        return sock
    raise error or socket.timeout(f"no connection to {host} port {port} in time")


def read_head(sock, deadline, limit=MAX_HEAD_BYTES):
    """An HTTP head from `sock`, up to its blank line and no further (what
    follows is the tunnel's), by `deadline`. OSError if it does not come."""
    head = bytearray()
    while not head.endswith(b"\r\n\r\n"):
        left = deadline - time.monotonic()
        if left <= 0 or len(head) > limit:
            raise socket.timeout("no whole answer in time" if left <= 0 else
                                 f"an answer longer than {limit} bytes")
        sock.settimeout(left)
        byte = sock.recv(1)
        if not byte:
            raise ConnectionResetError("it closed the connection")
        head += byte
    return bytes(head)


def status_line(head):
    """(status, reason) of an HTTP answer's head; (None, its first line) when
    it is no HTTP."""
    first = head.split(b"\r\n", 1)[0].decode("utf-8", "replace")
    match = re.fullmatch(r"HTTP/\d\.\d (\d{3})(?: (.*))?", first)
    if not match:
        return None, one_line(first[:80])
    return int(match.group(1)), one_line((match.group(2) or "")[:80])


def header_values(head, name):
    """Every value of the header `name` (lower case) in an HTTP head, in
    order, each line on its own (RFC 9110 section 5.3: together, one list)."""
    values = []
    for line in head.decode("utf-8", "replace").split("\r\n")[1:]:
        key, colon, value = line.partition(":")
        if colon and key.strip().lower() == name:
            values.append(value.strip())
    return values


class Proxy:
    """An HTTP proxy the agent reaches the API through, with a CONNECT
    tunnel, whatever the scheme: TLS then runs inside the tunnel, end to
    end, and the proxy sees only the API's name and port. `origin` says
    where it was set (parse_proxy)."""

    def __init__(self, url, origin):
        self.url, self.origin = url, origin  # the url may hold credentials
        self.host, self.port, self.authorization, self.name = parse_proxy(url, origin)

    def tunnel(self, host, port, deadline, track):
        """A socket through which host:port is reached, or LinkError saying
        what the proxy did instead."""
        try:
            sock = connect_tcp(self.host, self.port, deadline, track)
        except OSError as e:
            raise LinkError(f"cannot reach the proxy {self.name} ({self.origin}): "
                            f"{e.strerror or e}") from None
        target = f"{bracketed(host)}:{port}"
        request = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
        if self.authorization:
            request += f"Proxy-Authorization: Basic {self.authorization}\r\n"
        try:
            sock.sendall(request.encode("ascii") + b"\r\n")
            status, reason = status_line(read_head(sock, deadline))
        except OSError as e:
            sock.close()
            raise LinkError(f"the proxy {self.name} did not answer CONNECT to "
                            f"{target}: {e.strerror or e}") from None
        if status == 200:
            return sock
        sock.close()
        raise LinkError(self._refusal(status, reason, host, port))

    def _refusal(self, status, reason, host, port):
        said = f"{status} {reason}".strip() if status else f"not HTTP: {reason!r}"
        target = f"{bracketed(host)}:{port}"
        refused = f"the proxy {self.name} refused CONNECT to {target} ({said})"
        if status is None:
            return f"{refused}: is {self.name} ({self.origin}) an HTTP proxy?"
        if status in (401, 407) and self.authorization:
            return f"{refused}: check the user and password in {self.origin}"
        if status == 407:
            return (f"{refused}: it wants a user and password; give them in "
                    f"{self.origin}, http://USER:PASSWORD@{bracketed(self.host)}:"
                    f"{self.port}")
        if port == 443:
            return f"{refused}: ask for {host} to be allowed"
        return f"{refused}: ask for port {port} to be allowed, or serve the API on 443"


def bypasses_proxy(host, no_proxy):
    """Whether `host` is in `no_proxy`, read as curl reads it: a comma-separated
    list of host names, each matching itself and the names under it
    (`corp.example` and `.corp.example` match `a.corp.example`, never
    `evilcorp.example`), IP addresses and CIDR ranges (IPv6 without
    brackets), or `*` for every host. Case does not matter, nor ports."""
    host = host.lower().strip("[]").rstrip(".")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in no_proxy.split(","):
        entry = entry.strip().lower()
        if entry == "*":
            return True
        if entry.startswith("["):  # [::1] or [::1]:8080
            entry = entry[1:].partition("]")[0]
        elif entry.count(":") == 1:  # host:port
            entry = entry.partition(":")[0]
        entry = entry.strip(".")
        if not entry:
            continue
        if address is not None:
            with contextlib.suppress(ValueError):
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
        elif host == entry or host.endswith("." + entry):
            return True
    return False


def proxy_for(host, secure, config, environ):
    """The Proxy to reach `host` through, or None: the `proxy` setting
    ("none": none at all), else https_proxy (wss) or http_proxy (ws), in
    either case, the lower first; unless `no_proxy` (either case) names the
    host. Loopback is a host like any other, as curl has it: list it in
    no_proxy to keep it direct. ConfigError for a value that is no proxy."""
    if config.proxy == "none":
        return None
    url, origin = config.proxy, "the proxy setting"
    name = "https_proxy" if secure else "http_proxy"
    for variable in () if url else (name, name.upper()):
        url, origin = environ.get(variable), f"the environment variable {variable}"
        if url:
            break
    if not url:
        return None
    no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
    if bypasses_proxy(host, no_proxy):
        return None
    return Proxy(url.strip(), origin)


class Transport:
    """How the agent reaches the API, the same for the WebSocket and --check:
    straight or through a proxy's tunnel, then TLS for wss. The API key
    never crosses a proxy in clear: ws:// through a proxy is refused unless
    allow_plaintext says otherwise."""

    def __init__(self, url, config, environ):
        parts = urllib.parse.urlsplit(url)
        self.host, self.secure = parts.hostname, parts.scheme in ("wss", "https")
        self.port = parts.port or (443 if self.secure else 80)
        self.config = config
        self.proxy = proxy_for(self.host, self.secure, config, environ)

    def describe(self):
        return f"through the proxy {self.proxy.name}" if self.proxy else "direct"

    def open(self, deadline, track):
        """A socket to the API, TLS done for wss, by `deadline` (monotonic);
        `track` is told of each socket made (connect_tcp). LinkError, or
        what the socket or TLS raised; nothing is left open then."""
        if self.proxy is None:
            sock = connect_tcp(self.host, self.port, deadline, track)
        elif not self.secure and not self.config.allow_plaintext:
            raise LinkError(
                f"refusing to send the API key in clear through the proxy "
                f"{self.proxy.name} ({self.proxy.origin}): use https://, or pass "
                "--allow-plaintext if this network and that proxy are trusted")
        else:
            sock = self.proxy.tunnel(self.host, self.port, deadline, track)
        try:
            if not self.secure:
                if self.proxy is None:
                    check_plaintext_peer(sock.getpeername(),
                                         self.config.allow_plaintext)
                return sock
            return self._tls(sock, deadline, track)
        except BaseException:
            sock.close()
            raise

    def _tls(self, sock, deadline, track):
        """TLS over `sock`, the API's certificate checked (tls_context); the
        handshake is tracked too, so that a deadline can break it off."""
        try:
            context = tls_context(self.config)
        except TLSFileError as e:
            raise LinkError(str(e)) from None
        except (OSError, ssl.SSLError) as e:
            raise LinkError(
                f"cannot use the CA file {self.config.ca_file} ({e.strerror or e}); "
                "put the PEM file of the API's CA back, or give another with --ca-file"
            ) from None
        context.sslsocket_class = RecordingTLSSocket
        tls = context.wrap_socket(sock, server_hostname=self.host,
                                  do_handshake_on_connect=False)
        track(tls)
        try:
            tls.settimeout(max(0.001, min(CONNECT_TIMEOUT_S,
                                          deadline - time.monotonic())))
            tls.do_handshake()
        except BaseException:
            tls.close()
            raise
        return tls


def deflate_params(answer, offered=True):
    """{name: value or None} of the permessage-deflate an upgrade's answer
    (its Sec-WebSocket-Extensions) agrees to; None when it names none.
    ProtocolError for an answer the agent's offer does not allow: any, when
    nothing was `offered`; another extension, two of them, an unknown or
    repeated parameter, a bad value (a window's bits in ASCII digits: `²`
    is a digit to str.isdigit(), and no number to int())."""
    if not answer:
        return None

    def refuse(why):
        return ProtocolError("the API agreed to an extension the agent did not "
                             f"offer ({why}: {shown(answer, 120)})")

    if not offered:
        raise refuse("none was offered")
    extensions = [e.strip() for e in answer.split(",") if e.strip()]
    if len(extensions) != 1:
        raise refuse("more than one")
    name, *params = (part.strip() for part in extensions[0].split(";"))
    if name.lower() != "permessage-deflate":
        raise refuse("not permessage-deflate")
    agreed = {}
    for param in params:
        key, has_value, value = (s.strip() for s in param.partition("="))
        key, value = key.lower(), value.strip('"') if has_value else None
        if key not in DEFLATE_PARAMS or key in agreed:
            raise refuse(f"parameter {key!r}")
        bits = key.endswith("_window_bits")
        if bits != (value is not None) or bits and not (
                WINDOW_BITS.fullmatch(value) and 8 <= int(value) <= 15):
            raise refuse(f"value of {key!r}")
        agreed[key] = value
    return agreed


class Deflate:
    """permessage-deflate (RFC 7692) on one connection, as the API agreed:
    the agent's compressor, and the `inflater` of what the API sends.

    The agent's compressor keeps its context from message to message: a
    metrics frame is then mostly a reference to the previous one, which its
    32 KiB window reaches.
    """

    def __init__(self, agreed):
        self.window_bits = min(DEFLATE_WINDOW_BITS,
                               int(agreed.get("client_max_window_bits") or 15))
        self.keep_compressor = "client_no_context_takeover" not in agreed
        # zlib's raw inflate reads any window up to its own size; 9 is its least
        self.inflater = Inflater(
            max(9, int(agreed.get("server_max_window_bits") or 15)),
            keep="server_no_context_takeover" not in agreed)
        self._compressor = None

    def describe(self):
        context = "kept" if self.keep_compressor else "reset at each message"
        return (f"permessage-deflate, a window of {self.window_bits} bits, context "
                f"{context}")

    def compress(self, payload):
        """The message deflated, without its tail (RFC 7692 section 7.2.1); None
        when the API capped the window at 8 bits, which zlib cannot make: the
        message then goes plain, as the extension allows."""
        if self.window_bits < 9:
            return None
        compressor = self._compressor
        if compressor is None:
            compressor = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED,
                                          -self.window_bits, DEFLATE_MEM_LEVEL)
            if self.keep_compressor:
                self._compressor = compressor
        data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
        return data[: -len(DEFLATE_TAIL)]


class Inflater:
    """The API's compressed messages, inflated as their bytes arrive, with a
    bound: at most MAX_MESSAGE_BYTES of each, checked INFLATE_STEP at a time,
    so that a few KB cannot become gigabytes, and a message over the bound
    is refused before the rest of it is read.

    The context goes on from message to message unless the API resets it
    (`keep`). A deflate stream may end inside the connection: RFC 7692
    section 7.2.3.3 lets a sender end a message with a block whose BFINAL
    bit is set. zlib then takes no more input (it would pile every later
    byte up in unused_data and inflate nothing), so a new stream begins,
    seeded with the last window of output, which later data may still
    refer back to.
    """

    def __init__(self, window_bits, keep):
        self.window_bits = window_bits
        self.keep = keep
        self._zlib = None
        self._history = b""  # the last window of earlier messages' output, if kept
        self._fresh = False  # a new stream that has had no input yet
        self._streams = 0  # streams this message began

    def begin(self):
        """A new message."""
        self._streams = 0
        if self._zlib is None or not self.keep:
            self._zlib, self._history = zlib.decompressobj(-self.window_bits), b""

    def feed(self, data, out):
        """`data`, the next part of the message, inflated onto `out` (Pieces).
        ProtocolError: 1009 once `out` would pass MAX_MESSAGE_BYTES, 1002 for
        what does not inflate."""
        while data:
            room = MAX_MESSAGE_BYTES - out.size
            try:
                piece = self._zlib.decompress(data, min(INFLATE_STEP, room + 1))
            except zlib.error as e:
                raise ProtocolError(
                    f"a compressed message that does not inflate ({e})") from None
            if len(piece) > room:
                raise ProtocolError(f"a message that inflates to more than "
                                    f"{MAX_MESSAGE_BYTES} bytes", 1009)
            out.add(piece)
            self._fresh = False
            if self._zlib.eof:  # a final block: what follows is a new stream
                data = self._zlib.unused_data
                self._new_stream(out)
            else:
                data = self._zlib.unconsumed_tail

    def end(self, out):
        """The message is whole: the empty block the sender left out (RFC 7692
        section 7.2.2), unless its stream ended just there."""
        if not self._fresh:
            self.feed(DEFLATE_TAIL, out)
        if self.keep:
            self._history = self._last_window(out)

    def _new_stream(self, out):
        self._streams += 1
        if self._streams > MAX_DEFLATE_STREAMS:  # each costs a window's copy
            raise ProtocolError(f"a compressed message of more than "
                                f"{MAX_DEFLATE_STREAMS} deflate streams")
        seed = self._last_window(out)
        self._zlib = zlib.decompressobj(-self.window_bits, **(
            {"zdict": seed} if seed else {}))
        self._fresh = True

    def _last_window(self, out):
        """The last window of output: the end of `history`, then of `out`."""
        window = 1 << self.window_bits
        tail = out.tail(window)
        if len(tail) >= window:
            return tail
        return self._history[len(self._history) - (window - len(tail)):] + tail


class Pieces:
    """A message's bytes as they come, kept in pieces: a buffer grown in
    place may be copied whole at each step (glibc's realloc, once an
    allocation lies after it), twice the message for a moment."""

    __slots__ = ("parts", "size")

    def __init__(self):
        self.parts, self.size = [], 0

    def add(self, piece):
        if piece:
            self.parts.append(piece)
            self.size += len(piece)

    def tail(self, n):
        """The last `n` bytes, or all of them if fewer."""
        tail, size = [], 0
        for piece in reversed(self.parts):
            if size >= n:
                break
            tail.append(piece)
            size += len(piece)
        return b"".join(reversed(tail))[-n:]

    def join(self):
        return b"".join(self.parts)


class Parts:
    """A data message arriving in frames: its bytes so far, inflated as they
    come when it came compressed."""

    __slots__ = ("opcode", "data", "inflater", "received")

    def __init__(self, opcode, inflater):
        self.opcode, self.inflater = opcode, inflater
        self.data = Pieces()
        self.received = 0  # bytes of payload, compressed or not
        if inflater is not None:
            inflater.begin()

    def add(self, chunk):
        self.received += len(chunk)
        if self.inflater is None:
            self.data.add(bytes(chunk))
        else:
            self.inflater.feed(chunk, self.data)

    def end(self):
        if self.inflater is not None:
            self.inflater.end(self.data)
        return message(self.opcode, self.data.join())


class FrameReader:
    """Reads the API's WebSocket frames (RFC 6455 section 5) from the socket.

    websocket-client's own receive answers a ping or a close from inside the
    receive call, under the send lock: a writer stuck on a peer that stopped
    reading then froze the receive loop too. It also buffers a frame of any
    announced length. Here receiving only receives: a ping is handed to the
    writer. A data frame's payload is taken as it arrives, and inflated then
    if compressed: no frame is held whole beside what it becomes, and a
    message larger than MAX_MESSAGE_BYTES (announced, received or inflated)
    ends the connection as soon as that shows.
    """

    def __init__(self, sock, deflate=None):
        self.sock = sock
        self.deflate = deflate  # a Deflate when the API agreed to compression
        self.buffer = bytearray()
        self.parts = None  # the data message under way, a Parts
        self.left = 0  # of the data frame under way: payload bytes to come,
        self.fin = False  # and whether it ends its message

    def next_message(self, deadline=None):
        """(opcode, payload) of the next data message or control frame, or None
        when the socket's timeout passed first, or the `deadline` (monotonic):
        a peer that drips a frame a byte at a time never lets one read time
        out. LinkError when the connection ended or the API broke the
        protocol; OSError from the socket."""
        while True:
            message = self._next()
            if message is not None:
                return message
            if not self._fill(deadline):
                return None

    def _fill(self, deadline):
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
        try:
            data = self.sock.recv(READ_CHUNK)
        except socket.timeout:
            return False
        if not data:
            raise LinkError("the API closed the TCP connection")
        self.buffer += data
        return True

    def _next(self):
        """A whole message or control frame from the buffer, or None until
        more is read. A data frame's payload is handed on as it comes."""
        while True:
            if self.left:
                self._take_payload()
                if self.left:
                    return None  # the buffer is empty
                if self.fin:
                    return self._finish()
            head = self._head()
            if head is None:
                return None
            fin, opcode, compressed, start, length = head
            if opcode >= 0x8:  # a control frame: whole, 125 bytes at most
                if len(self.buffer) < start + length:
                    return None
                return opcode, self._cut(start, length)
            if fin and opcode != OP_CONT and not compressed and \
                    len(self.buffer) >= start + length:
                return message(opcode, self._cut(start, length))  # the common case
            del self.buffer[:start]
            if opcode != OP_CONT:
                inflater = self.deflate.inflater if compressed else None
                self.parts = Parts(opcode, inflater)
            self.left, self.fin = length, fin
            if fin and not length:
                return self._finish()

    def _head(self):
        """(fin, opcode, compressed, start of payload, its length) of the frame
        at the buffer's front, once its header is in; ProtocolError for a
        frame the API may not send."""
        buf = self.buffer
        if len(buf) < 2:
            return None
        first, second = buf[0], buf[1]
        compressed = self._compressed(first)
        if second & 0x80:
            raise ProtocolError("a masked frame from the server")
        length, start = second & 0x7F, 2
        if length >= 126:
            start = 4 if length == 126 else 10
            if len(buf) < start:
                return None
            length = int.from_bytes(buf[2:start], "big")
        fin, opcode = bool(first & 0x80), first & 0x0F
        so_far = self.parts.received if opcode == OP_CONT and self.parts else 0
        self._check_size(so_far + length)
        if opcode >= 0x8:
            if not (opcode in (OP_CLOSE, OP_PING, OP_PONG) and fin and length <= 125):
                raise ProtocolError(f"a bad control frame ({opcode:#x})")
        elif opcode not in (OP_CONT, OP_TEXT, OP_BINARY):
            raise ProtocolError(f"unknown opcode {opcode:#x}")
        elif (opcode == OP_CONT) != (self.parts is not None):
            raise ProtocolError("fragments out of order")
        return fin, opcode, compressed, start, length

    def _compressed(self, first):
        """Whether a frame's RSV1 marks a compressed message: only on the
        first frame of a data message, only when compression was agreed."""
        if first & 0x30:
            raise ProtocolError("a frame with reserved bits set")
        if not first & 0x40:
            return False
        if self.deflate is None:
            raise ProtocolError("a compressed frame (RSV1), though no compression "
                                "was agreed")
        if (first & 0x0F) not in (OP_TEXT, OP_BINARY):
            raise ProtocolError("RSV1 on a control or continuation frame")
        return True

    def _cut(self, start, length):
        """The payload at `start` of the buffer, which then drops the frame."""
        end = start + length
        with memoryview(self.buffer) as view:
            payload = bytes(view[start:end])
        del self.buffer[:end]  # cheap: a bytearray drops its front without copying
        return payload

    def _take_payload(self):
        """What the buffer holds of the data frame under way, to its message."""
        take = min(self.left, len(self.buffer))
        with memoryview(self.buffer) as view:
            self.parts.add(view[:take])
        del self.buffer[:take]
        self.left -= take

    def _finish(self):
        parts, self.parts = self.parts, None
        return parts.end()

    @staticmethod
    def _check_size(length):
        if length > MAX_MESSAGE_BYTES:
            raise ProtocolError(
                f"a message of {length} bytes, larger than {MAX_MESSAGE_BYTES}", 1009)


def message(opcode, payload):
    """A whole message as the reader hands it on: a text message decoded. One
    that is not UTF-8 fails the connection (RFC 6455 section 8.1); a binary
    one is the dispatcher's to judge."""
    if opcode != OP_TEXT:
        return opcode, payload
    try:
        return opcode, payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("a text message that is not UTF-8", 1007) from None


class Session:
    """One authenticated WebSocket connection: its socket and reader, what the
    receive loop hands to the writer, and its liveness."""

    def __init__(self, ws, reader, server_id, abnf):
        self.ws = ws
        self.reader = reader
        self.deflate = reader.deflate  # compresses what is sent, when agreed
        self.abnf = abnf  # websocket-client's frame class
        self.server_id = server_id
        # When the API was last heard from, or seen reading (see Link._wait_for_room)
        self.opened_at = self.last_rx = time.monotonic()
        self.dead = threading.Event()
        self.closing = threading.Event()  # the writer is to send a close and end
        self.close_code = 1000
        self._lock = threading.Lock()
        self._pong = None  # the payload of the latest WebSocket ping, unanswered

    def ping_received(self, payload):
        """Called by the receive loop, which never sends (it would wait behind a
        stuck writer): the writer answers the latest ping once, as RFC 6455
        section 5.5.3 allows."""
        with self._lock:
            self._pong = payload

    def close(self, code):
        """Have the writer send a close frame of `code` and end the connection:
        the answer to the API's close, or the failure of a connection whose
        peer broke the protocol (RFC 6455 section 7.1.7)."""
        self.close_code = code
        self.closing.set()

    def ending(self):
        """True once the connection is dead or its close is under way."""
        return self.dead.is_set() or self.closing.is_set()

    def pong_due(self):
        with self._lock:
            return self._pong is not None

    def take_pong(self):
        with self._lock:
            payload, self._pong = self._pong, None
        return payload

    def send(self, payload):
        """One text message (UTF-8 bytes), compressed when agreed (RSV1 on its
        first frame); a large one in fragments (RFC 6455 section 5.4).

        websocket-client masks a frame by building several copies of it; for
        a 1 MiB command reply that made 5 MB of transient memory. Fragments
        of FRAGMENT_BYTES keep it small; the server reassembles them.
        """
        body = self.deflate.compress(payload) if self.deflate else None
        if body is None and len(payload) <= FRAGMENT_BYTES:
            self.ws.send(payload, opcode=OP_TEXT)
            return
        rsv1, body = (0, payload) if body is None else (1, body)
        view = memoryview(body)
        for start in range(0, max(1, len(body)), FRAGMENT_BYTES):
            first, fin = start == 0, start + FRAGMENT_BYTES >= len(body)
            part = bytes(view[start : start + FRAGMENT_BYTES])
            # By position: the mask's keyword differs between versions.
            frame = self.abnf(int(fin), rsv1 if first else 0, 0, 0,
                              OP_TEXT if first else self.abnf.OPCODE_CONT, 1, part)
            self.ws.send_frame(frame)

    def kill(self):
        self.dead.set()
        shut_down(self.ws.sock)


# What --check's probe of the WebSocket found: how long the upgrade took, the
# compression agreed (a Deflate, or None), and the API's answer, in words.
Probe = collections.namedtuple("Probe", "upgraded_s deflate answer")


class Connector:
    """Opens one connection to the API as the agent does: the socket
    (Transport: TCP, a proxy's tunnel, TLS), the upgrade with its offer of
    compression, and `auth`. `connect()` returns the Session, or raises a
    LinkError or AuthError that says why not and what to do; `probe()`
    does the same for --check without authenticating."""

    def __init__(self, config, agent_info, websocket):
        self.config = config
        self.agent_info = agent_info
        self.websocket = websocket  # the websocket-client module
        self.url = ws_url(config.api_url)
        self.transport = Transport(self.url, config, os.environ)
        self._connecting = None  # the socket being opened or authenticated, for stop()

    def connect(self):
        if self.config.tls_skip_verify and self.url.startswith("wss:"):
            LOG.warning(
                "TLS certificate verification is OFF (tls_skip_verify): anyone "
                "on the path can read the API key and the commands"
            )
        try:
            ws, reader = self._upgraded()
            try:
                server_id = self._authenticate(ws, reader)
            except BaseException:
                ws.shutdown()
                raise
        finally:
            self._connecting = None
        ws.settimeout(max(1.0, self.config.heartbeat_interval_s))
        as_server = f" as server {server_id}" if server_id is not None else ""
        if self.transport.proxy:
            as_server = f" {self.transport.describe()}{as_server}"
        frames = reader.deflate.describe() if reader.deflate else "uncompressed"
        LOG.info("connected to %s%s; frames: %s", self.url, as_server, frames)
        return Session(ws, reader, server_id, self.websocket.ABNF)

    def probe(self):
        """Open the WebSocket as connect() does, but send PROBE_MESSAGE in
        place of `auth`, and read the answer: the key never goes out, and
        the API registers no connection. A Probe; LinkError or AuthError
        saying why the WebSocket did not open."""
        started = time.monotonic()
        try:
            ws, reader = self._upgraded()
            upgraded_s = time.monotonic() - started
            try:
                ws.send(PROBE_MESSAGE, opcode=OP_TEXT)
                answer = self._probe_answer(ws, reader)
            finally:
                ws.shutdown()
        finally:
            self._connecting = None
        return Probe(upgraded_s, reader.deflate, answer)

    def _upgraded(self):
        """A WebSocket upgraded as the service's is (_open), and the
        FrameReader on its socket; nothing is left open when it fails."""
        ws = self.websocket.WebSocket(skip_utf8_validation=True,
                                      enable_multithread=True)
        try:
            head = self._open(ws)
            return ws, FrameReader(ws.sock, self._deflate(ws, head))
        except BaseException:
            ws.shutdown()
            raise

    def _probe_answer(self, ws, reader):
        """The API's answer to the probe, in words: the ChatOps server's is
        a close 1008 asking for `auth`."""
        deadline = time.monotonic() + PROBE_ANSWER_S
        try:
            while time.monotonic() < deadline:
                frame = reader.next_message(deadline)
                if frame is None:
                    continue
                opcode, payload = frame
                if opcode == OP_CLOSE:
                    code, reason, answer = close_frame_status(payload)
                    answer_close(ws, answer)
                    return describe_close(code, reason)
                if opcode in (OP_TEXT, OP_BINARY):
                    message, _ = parse_frame(payload)
                    kind = message.get("type") if message else None
                    return f"a {shown(kind)} message"
        except ProtocolError as e:
            answer_close(ws, e.code)
            return f"a frame that broke the WebSocket protocol ({e})"
        except (OSError, LinkError, self.websocket.WebSocketException) as e:
            return f"the connection's end ({one_line(str(e)) or type(e).__name__})"
        return f"nothing within {PROBE_ANSWER_S:g} s"

    def _offer(self):
        """The upgrade's extra headers: the offer of compression, if any."""
        if not (self.config.compression and zlib):
            return []
        return [f"Sec-WebSocket-Extensions: {DEFLATE_OFFER}"]

    def _deflate(self, ws, head):
        """The Deflate the API agreed to in its answer to the upgrade (`head`,
        every line of it), or None; ProtocolError (the connection failed with
        1002) for an answer that agrees to what was not offered."""
        answer = ", ".join(header_values(head, "sec-websocket-extensions")) or None
        try:
            agreed = deflate_params(answer, offered=bool(self._offer()))
        except ProtocolError as e:
            answer_close(ws, e.code)
            raise
        return Deflate(agreed) if agreed is not None else None

    def _open(self, ws):
        """Connect and upgrade `ws` on the transport to the API; the head of the
        API's answer. LinkError / AuthError saying why not.

        The agent opens the socket itself (Transport: TCP, a proxy's tunnel,
        TLS), and websocket-client upgrades it. No redirect is followed: the
        key must go only where api_url says (a redirect may lead from wss://
        to ws://, or to another host). The whole attempt has a deadline,
        however slowly the peer answers.
        """
        deadline = Deadline(CONNECT_DEADLINE_S, self.stop)
        sock = None
        try:
            with deadline:
                sock = self.transport.open(time.monotonic() + CONNECT_DEADLINE_S,
                                       self._track)
                sock.settimeout(CONNECT_TIMEOUT_S)
                sock.head = bytearray()
                ws.connect(self.url, socket=sock, redirect_limit=0,
                           header=self._offer())
                head, sock.head = bytes(sock.head), None
            if ws.getstatus() != 101:  # 1.2.3 and 1.8.0 return a redirect as is
                raise self.websocket.WebSocketException("the upgrade was refused")
        except Exception as e:  # a garbled answer raises anything: ValueError, ...
            cause, tls_said = e, getattr(sock, "failure", None)
            if client_certificate_problem(tls_said, self.config):
                cause = tls_said  # what the TLS alert said, not the library's words
            raise self._connect_error(ws, cause, deadline.expired, sock) from None
        return head

    def _track(self, sock):
        self._connecting = sock

    def _connect_error(self, ws, error, expired, sock):
        """The LinkError (or AuthError) that says what went wrong, and what to
        do. `sock`: the socket the upgrade went on, if one was opened."""
        wsc = self.websocket
        status, headers = upgrade_answer(ws, error)
        text = one_line(str(error))[:300] or type(error).__name__
        if expired:
            via = f" ({self.transport.describe()})" if self.transport.proxy else ""
            return LinkError(
                f"the API at {self.url}{via} did not complete the WebSocket "
                f"upgrade within {CONNECT_DEADLINE_S:.0f} s"
            )
        if isinstance(error, AgentError):  # the transport's own, said already
            return error
        if status in (401, 403):
            return AuthError(f"HTTP {status} on the WebSocket upgrade")
        if isinstance(status, int) and 300 <= status < 400:
            location = one_line(str(headers.get("location", ""))[:200])
            return LinkError(
                f"the API answered the WebSocket upgrade with a redirect (HTTP "
                f"{status} to {location!r}); the agent follows no redirects, so "
                "that the key goes only where api_url says: set api_url to the "
                "address the API really serves"
            )
        if isinstance(error, wsc.WebSocketBadStatusException):
            certificate = certificate_page(refused_body(error, sock), self.config)
            if certificate:
                server = one_line(str(headers.get("server", "")))[:60] or "no name"
                return LinkError(f"{certificate} (at {self.url}: HTTP {status} "
                                 f"from the server {server})")
            return LinkError(f"the API refused the WebSocket at {self.url}: {text}"
                             f"{upgrade_not_passed(status, headers)}")
        if isinstance(error, ssl.SSLCertVerificationError):
            return LinkError(
                f"the API's TLS certificate is not trusted ({error.verify_message}); "
                "for a private CA pass --ca-file"
            )
        asked = client_certificate_problem(error, self.config)
        if asked:
            return LinkError(f"{asked} (at {self.url})")
        if isinstance(error, (OSError, wsc.WebSocketException)):
            return LinkError(f"cannot reach the API at {self.url}: {text}")
        return LinkError(
            f"the answer at {self.url} to the WebSocket upgrade is not valid HTTP "
            f"({type(error).__name__}: {text}); is api_url the ChatOps API?"
        )

    def _authenticate(self, ws, reader):
        """Send `auth`; wait for `auth_success`. The key goes in this one frame
        only, and in clear only to a loopback address."""
        wsc = self.websocket
        try:
            auth = {"type": "auth", "api_key": self.config.api_key}
            ws.send(to_json(dict(auth, agent=self.agent_info)), opcode=OP_TEXT)
            deadline = time.monotonic() + AUTH_TIMEOUT_S
            while time.monotonic() < deadline:
                frame = reader.next_message(deadline)
                if frame is not None:
                    done, server_id = self._auth_answer(ws, *frame)
                    if done:
                        return server_id
        except ProtocolError as e:
            answer_close(ws, e.code)
            raise
        except (OSError, wsc.WebSocketException) as e:
            raise LinkError(
                "connection lost during authentication: %s" % (e or type(e).__name__)
            ) from None
        raise LinkError(f"the API did not answer 'auth' within {AUTH_TIMEOUT_S:.0f} s")

    def _auth_answer(self, ws, opcode, payload):
        """(True, server_id) once authenticated, (False, None) for a frame that
        is no answer; AuthError or LinkError for a refusal."""
        if opcode == OP_CLOSE:
            code, reason, answer = close_frame_status(payload)
            answer_close(ws, answer)
            if code == 1008:
                raise AuthError(one_line(reason) or "no reason given", code)
            raise LinkError(
                "the API closed the connection during authentication "
                f"({describe_close(code, reason)})"
            )
        if opcode == OP_PING:
            ws.pong(payload)  # there is no writer yet: this thread may answer
        if opcode not in (OP_TEXT, OP_BINARY):
            return False, None
        message, _ = parse_frame(payload)
        kind = message.get("type") if message else None
        if kind == "auth_success":
            return True, auth_server_id(message)
        if kind == "error":
            reason = str(message.get("message", "no reason given"))
            raise AuthError(one_line(reason)[:300])
        LOG.debug("ignored %s before auth_success", shown(kind))
        return False, None

    def stop(self):
        """Break off a connection not yet authenticated: at shutdown nothing
        waits to be sent on it."""
        shut_down(self._connecting)



class Writer:
    """The one thread that sends on a session: replies before samples, the
    heartbeat, the pong to the latest ping, and the liveness check that gives
    a dead connection up. It ends with the session; at shutdown it first
    sends what waits, until `farewell()` says, then a close frame of its own.
    A peer that stops reading blocks this thread only, for at most one
    socket timeout."""

    def __init__(self, session, link):
        self.session = session
        self.outbox = link.outbox
        self.samples = link.samples
        self.doorbell = link.doorbell  # set: there is something to look at
        self.heartbeat_s = link.config.heartbeat_interval_s
        self.stop_event = link.stop_event  # set: the agent stops
        self.farewell = link.farewell  # () -> (close code, send what waits until)
        self.errors = (OSError, link.websocket.WebSocketException)
        self.thread = threading.Thread(target=self.run, name="writer", daemon=True)

    def start(self):
        self.thread.start()

    def join(self, timeout=None):
        self.thread.join(timeout)

    def run(self):
        """Everything sent on one connection, the heartbeat and the liveness
        check; ends with the connection."""
        heartbeat = self.heartbeat_s
        next_ping = time.monotonic() + heartbeat
        try:
            while not self._ending():
                now = time.monotonic()
                problem = self._liveness_problem(now)
                if problem:
                    LOG.warning("%s; reconnecting", problem)
                    break
                pong = self.session.take_pong()
                if pong is not None:
                    self.session.ws.pong(pong)
                elif now >= next_ping:
                    self.session.send(self.samples.ping())
                    next_ping = now + heartbeat
                else:
                    wake_at = min(next_ping, self.session.last_rx + 2 * heartbeat)
                    self._send_next(timeout=max(0.01, wake_at - now))
            self._close()
        except self.errors as e:
            if not self.session.dead.is_set():
                LOG.warning("sending failed: %s", e or type(e).__name__)
            self.session.kill()

    def _ending(self):
        return self.session.ending() or self.stop_event.is_set()

    def _close(self):
        """How the writer ends: answering the API's close or failing the
        connection (Session.close), or at shutdown sending what waits and a
        close of its own."""
        if self.session.closing.is_set():
            self.session.ws.send_close(self.session.close_code, b"")
        elif self.stop_event.is_set() and not self.session.dead.is_set():
            code, flush_until = self.farewell()
            self._flush(flush_until)
            self.session.ws.send_close(code, CLOSE_REASONS[code])
            return  # the receive loop waits for the API's close frame
        self.session.kill()

    def _send_next(self, timeout):
        """Send the next message, or wait up to `timeout` for one. The bell is
        cleared before looking, at the queues and at what else rings it (the
        connection's end, a ping to answer): a ring after the look is heard."""
        self.doorbell.clear()
        if self._ending() or self.session.pong_due():
            return
        if not self._send_one():
            self.doorbell.wait(timeout)

    def _send_one(self):
        """Send a reply, pong or chunk first, else a probe or a sample; False
        when none may go now."""
        for source in (self.outbox, self.samples):
            item = source.take()
            if item is not None:
                LOG.debug("-> %s", item[0])
                self.session.send(item[1])
                source.sent()
                return True
        return False

    def _liveness_problem(self, now):
        """Why the connection should be given up, or None while it works."""
        limit = 2 * self.heartbeat_s
        if now - self.session.last_rx > limit:
            return (
                f"nothing heard from the API for {now - self.session.last_rx:.1f} s "
                "(two heartbeats)"
            )
        waited = self.samples.unread_for()
        if waited > limit:
            return (
                f"the API has shown no metrics read for {waited:.1f} s (two "
                "heartbeats: no acknowledgement, no pong to a ping after them) "
                "though it answers; sending them again"
            )
        return None

    def _flush(self, deadline):
        """Send what still waits (replies, the last samples), until `deadline`."""
        while time.monotonic() < deadline and self._send_one():
            pass


class Link:
    """The receive thread: connects (Connector), serves the session with the
    receive loop and a Writer, and reconnects with backoff, until the agent
    stops.

    The receive loop only reads and hands messages on (to the dispatcher, or
    to the writer a ping to answer); each connection gets one Writer thread
    that alone sends, so a peer that stops reading blocks only the writer
    (for at most one socket timeout), never the metrics loop, the receive
    loop or a handler.
    """

    def __init__(self, config, outbox, samples, dispatcher, agent_info, stop):
        self.config = config
        self.outbox = outbox
        self.samples = samples
        self.doorbell = outbox.doorbell  # set: the writer has something to look at
        self.dispatcher = dispatcher
        self.agent_info = agent_info
        self.stop_event = stop  # set: the agent stops
        self.websocket = load_websocket()
        self.connector = Connector(config, agent_info, self.websocket)
        self.url = self.connector.url
        self.session = None
        self.backoff = reconnect_backoff(config.reconnect_max_delay_s)
        self.auth_backoff = Backoff(AUTH_RETRY_FIRST_S, AUTH_RETRY_MAX_S, floor=0.5)
        self._close_code = 1000  # 1011 when the agent exits because a thread died
        self._flush_until = None  # at shutdown: when sending what waits ends
        self.thread = threading.Thread(target=self.run, name="receive", daemon=True)

    def start(self):
        """The receive thread, which runs `run()`; `stop()` ends it."""
        self.thread.start()

    def run(self):
        """Connect, serve, reconnect, until the agent stops. Nothing that
        happens to one connection may end this loop."""
        while not self.stop_event.is_set():
            try:
                delay = self._attempt()
            except Exception:  # a case nobody foresaw: report it, and try again
                delay = self.backoff.next_delay()
                LOG.exception(
                    "the connection failed unexpectedly; retrying in %.1f s", delay
                )
            if delay is not None:
                self.stop_event.wait(delay)

    def _attempt(self):
        """One connection from start to end; the delay before the next, if any."""
        try:
            session = self.connector.connect()
        except AuthError as e:
            text = "%s; check the key; retrying in %.0f s"
            return self._retry_after(e, self.auth_backoff, logging.ERROR, text)
        except LinkError as e:
            text = "%s; retrying in %.1f s"
            return self._retry_after(e, self.backoff, logging.WARNING, text)
        self.auth_backoff.reset()
        self._serve(session)
        if self.stop_event.is_set():
            return None
        if time.monotonic() - session.opened_at >= STABLE_AFTER_S:
            self.backoff.reset()
        delay = self.backoff.next_delay()
        LOG.info("reconnecting in %.1f s", delay)
        return delay

    def _retry_after(self, error, backoff, level, text):
        """The delay before the next attempt, logged; None once the agent stops
        (a connect broken off by shutdown is nothing to report)."""
        if self.stop_event.is_set():
            return None
        delay = backoff.next_delay()
        LOG.log(level, text, error, delay)
        return delay

    def _serve(self, session):
        self.session = session
        self.samples.link_up(session.server_id)
        writer = Writer(session, self)
        writer.start()
        try:
            self._receive_loop(session)
        finally:
            if session.closing.is_set():  # the writer sends the close frame
                self.doorbell.set()
                writer.join(CLOSE_REPLY_WAIT_S)
            session.kill()
            self.doorbell.set()
            writer.join()
            session.ws.shutdown()
            self.outbox.connection_lost()
            self.samples.connection_lost()
            self.session = None
            if not self.stop_event.is_set():
                LOG.warning(
                    "disconnected from the API; %d samples wait to be sent",
                    self.samples.counts()[0],
                )

    def _receive_loop(self, session):
        while not session.dead.is_set() and self._wait_for_room(session):
            try:
                frame = session.reader.next_message()
            except ProtocolError as e:
                LOG.warning("the API broke the WebSocket protocol (%s); closing "
                            "with %d and connecting again", e, e.code)
                session.close(e.code)
                return
            except (OSError, LinkError) as e:
                if not session.dead.is_set():
                    quiet = time.monotonic() - session.last_rx
                    LOG.warning("connection lost: %s%s", e or type(e).__name__,
                                cut_when_quiet(quiet, self.config.heartbeat_interval_s))
                return
            if frame is not None:
                session.last_rx = time.monotonic()
                if not self._received(session, *frame):
                    return

    def _wait_for_room(self, session):
        """Read nothing more while the replies waiting to be sent pile up
        faster than the writer sends them: TCP then slows the API down,
        where a full queue would drop replies. While the writer gets them
        through, the API is reading, and so alive. False once the session
        ends meanwhile."""
        if self.outbox.wait_for_room(timeout=0):
            return True  # the usual case: one look, no wait
        taken = self.outbox.taken_count()
        while not self.outbox.wait_for_room(timeout=1.0):
            if session.ending() or self.stop_event.is_set():
                return False
            if self.outbox.taken_count() != taken:
                taken, session.last_rx = self.outbox.taken_count(), time.monotonic()
        return True

    def _received(self, session, opcode, payload):
        """Handles one frame; False once the API has closed the connection."""
        if opcode == OP_CLOSE:
            code, reason, answer = close_frame_status(payload)
            session.close(answer)
            if not self.stop_event.is_set():
                LOG.warning("the API closed the connection (%s)%s",
                            describe_close(code, reason),
                            f"; it broke RFC 6455 there: answered {answer}"
                            if answer != 1000 else "")
            return False
        if opcode == OP_PING:
            session.ping_received(payload)
            self.doorbell.set()
        elif opcode in (OP_TEXT, OP_BINARY):
            LOG.debug("<- frame of %d bytes", len(payload))
            self.dispatcher.dispatch(payload, session)
        return True

    def farewell(self):
        """How the writer ends at shutdown: (close code, send what waits until)."""
        return self._close_code, self._flush_until or time.monotonic()

    def stop(self, deadline, close_code=1000):
        """Send what waits and close with `close_code`, by `deadline`
        (monotonic): the writer sends until SHUTDOWN_CLOSE_WAIT_S before it,
        then its close frame, and the receive loop waits for the API's. What
        is still open then is broken off."""
        self._close_code = close_code
        self._flush_until = deadline - SHUTDOWN_CLOSE_WAIT_S
        self.stop_event.set()
        self.connector.stop()
        self.doorbell.set()
        self.thread.join(max(0.0, deadline - time.monotonic()))
        if self.thread.is_alive():
            self.abort()
            self.thread.join(0.5)

    def abort(self):
        """Break off what the receive thread waits for: a session, or a connect."""
        session = self.session
        if session is not None:
            session.kill()
        self.connector.stop()


###############################################################################
# The agent ###################################################################
###############################################################################


def agent_info(source_name, config):
    """Extra fields of the `auth` message: this agent (docs/protocol.md)."""
    return {
        "name": "chatops-agent",
        "version": __version__,
        "hostname": socket.gethostname(),
        "os": platform.system(),
        "os_release": platform.release(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "metrics_source": source_name,
        "capabilities": ["metrics", "heartbeat"]
        + (["commands", "cancel_command", "stream"] if config.commands_enabled else [])
        + (["docker"] if config.docker_enabled else []),
    }


def noted_by_wakeup_fd(_signum, _frame):
    """The Python-level handler of a stop signal: nothing (Agent.handle_signals)."""


M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h


def glibc():
    """linux_libc() when it is glibc (musl has no malloc_trim, and returns
    free memory eagerly anyway), else None."""
    libc = linux_libc()
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def one_malloc_arena():
    """One glibc malloc arena for all threads, as MALLOC_ARENA_MAX=1 would
    give. Each thread otherwise gets an arena of its own, which keeps its free
    memory: 0.2 MiB measured, with trimming. Python threads hardly ever
    allocate at the same moment (the GIL), so sharing costs nothing. Called
    before the agent starts its threads."""
    libc = glibc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, 1)


class FreeMemory:
    """Hands the C allocator's free pages back to the system, once a minute.

    Start-up (importing, parsing the arguments), a reconnect or a command's
    large output free memory that lies scattered between live blocks, and
    glibc gives back only what is at the top of its heap: the rest stays in
    the agent's resident memory for good. malloc_trim(0) returns every free
    page; it costs about 5 us when there is nothing to return.
    """

    EVERY_S = 60.0

    def __init__(self):
        libc = glibc()
        self._trim = libc.malloc_trim if libc is not None else None
        self._due = 0.0  # the first call trims: start-up is done by then

    def now_and_then(self):
        if self._trim is not None and time.monotonic() >= self._due:
            self._due = time.monotonic() + self.EVERY_S
            self._trim(0)


class Agent:
    """Owns the threads: metrics loop, receive loop (with its writer)."""

    def __init__(self, config, source=None):
        self.config = config
        self.stop_event = threading.Event()  # set: the threads wind down
        # What asks the agent to stop (a signal's number, or THREAD_DIED) arrives
        # as a byte on this socket pair; see handle_signals().
        self._stop_in, self._stop_out = socket.socketpair()
        self._stop_out.setblocking(False)
        self.exit_code = 0
        doorbell = threading.Event()  # rung by both: the writer has to look
        self.outbox = Outbox(doorbell, config.reply_keep_s)
        self.samples = SampleQueue(doorbell, config.buffer_size, spool_for(config),
                                   grace_s=config.metrics_interval_s / 2)
        self.children = Children()
        self.docker_cli = DockerCLI(config, self.children)
        self.containers = ContainerCache(config, self.docker_cli)
        self.collector = MetricsCollector.for_config(
            config, self.containers.snapshot, source)
        self.docker = DockerActions(config, self.docker_cli)
        self.commands = CommandRunner(config, self.outbox.put, self.children)
        self.requests = Requests(config, self.outbox.put, (
            Lane("command", config.command_workers, config.command_queue_size,
                 self.commands),
            Lane("docker", config.docker_workers, config.docker_queue_size,
                 self.docker),
        ))
        self.dispatcher = Dispatcher(config, self.outbox, self.samples, self.requests)
        self.link = None
        self.metrics_thread = None
        self._stopping = None  # the step of shutdown() under way

    # -- threads ------------------------------------------------------------------
    def start(self):
        # Samples a spool kept from before, delivered first; SpoolHeld (the
        # agent does not start) when another agent runs on this state_dir.
        self.samples.open()
        self.link = Link(
            self.config,
            self.outbox,
            self.samples,
            self.dispatcher,
            agent_info(self.collector.source.name, self.config),
            self.stop_event,
        )
        LOG.info(
            "chatops-agent %s: metrics from %s every %g s, API %s",
            __version__,
            self.collector.source.name,
            self.config.metrics_interval_s,
            self.link.url,
        )
        self.metrics_thread = threading.Thread(
            target=self._metrics_loop, name="metrics", daemon=True
        )
        self.commands.start()
        self.requests.start()
        if self.config.docker_enabled:
            threading.Thread(
                target=self.containers.run, name="docker", daemon=True
            ).start()
        self.metrics_thread.start()
        self.link.start()

    def _metrics_loop(self):
        try:
            self.collector.prime()
        except Exception:  # the first sample's rates will be missing, no more
            LOG.exception("metrics: reading the first baselines failed")
        interval = self.config.metrics_interval_s
        next_at = time.monotonic() + CPU_PRIME_S
        free_memory = FreeMemory()
        while not self.stop_event.wait(max(0.0, next_at - time.monotonic())):
            try:
                self.samples.add(self.collector.collect())
            except Exception:  # keep sampling whatever one tick hit
                LOG.exception("metrics collection failed")
            self.children.reap()  # what commands left behind; cheap when nothing is
            free_memory.now_and_then()
            next_at += interval
            if next_at < time.monotonic():  # overran: skip ticks rather than burst
                next_at = time.monotonic() + interval

    # -- stopping -------------------------------------------------------------------
    def handle_signals(self):
        """Route the stop signals to wait(), without running anything in a handler.

        A Python signal handler runs in the main thread between two bytecodes,
        where that thread may hold a lock (an Event's, a logging stream's): a
        handler that logs or sets an Event can deadlock or garble the log. So
        the handler does nothing; Python's own C-level handler writes the
        signal's number to the wake-up socket, and wait() reads it. That also
        wakes the main thread when the kernel delivered the signal to another
        thread. A signal the agent was started with ignored stays ignored
        (nohup ignores SIGHUP).
        """
        signal.set_wakeup_fd(self._stop_out.fileno())
        for name in STOP_SIGNALS:
            signum = signal.Signals[name]
            if signal.getsignal(signum) != signal.SIG_IGN:
                signal.signal(signum, noted_by_wakeup_fd)

    def on_thread_death(self, args):
        """threading.excepthook: a thread that dies takes the agent down, with
        EXIT_THREAD_DIED, so that its service manager starts it afresh, rather
        than living on without that thread."""
        if issubclass(args.exc_type, SystemExit):
            return
        name = args.thread.name if args.thread else "a"
        exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
        LOG.critical(
            "the %s thread died (%s: %s); the agent exits with status %d so that "
            "its service manager restarts it",
            name,
            args.exc_type.__name__,
            args.exc_value,
            EXIT_THREAD_DIED,
            exc_info=exc_info,
        )
        self.exit_code = EXIT_THREAD_DIED
        with contextlib.suppress(OSError):  # full: a stop is asked for already
            self._stop_out.send(bytes([THREAD_DIED]))

    def wait(self):
        """Block, with no wake-ups, until a stop signal or a dead thread asks
        the agent to stop. Later stop signals are ignored: the shutdown ends
        within SHUTDOWN_S anyway, and a second Ctrl-C must not kill the
        process halfway through it."""
        number = self._stop_in.recv(1)[0]
        if number != THREAD_DIED:
            LOG.info("received %s; shutting down", signal.Signals(number).name)
        for name in STOP_SIGNALS:
            signal.signal(signal.Signals[name], signal.SIG_IGN)

    def shutdown(self):
        """Stop within SHUTDOWN_S (5 s), in four steps, each done by its point
        in that time:

        1. processes, by SHUTDOWN_REPLIES_AT_S: Docker's list is no longer
           re-read; requests waiting are answered as cancelled; running
           commands, and what any command left running, get TERM, then KILL
           at SHUTDOWN_KILL_AT_S, with every other process the agent started
           (a docker CLI call in flight); their replies are queued.
        2. connection, by SHUTDOWN_CLOSED_AT_S: what waits is sent, then a
           close frame, and the API's close is waited for.
        3. metrics: the metrics loop ends, or is left hung, by
           SHUTDOWN_METRICS_AT_S.
        4. spool: it learns what was delivered, and is synced.

        A step still running at SHUTDOWN_S ends the process at once, with
        EXIT_SHUTDOWN_OVERRAN; the log names the step.
        """
        start = time.monotonic()
        with Deadline(SHUTDOWN_S, self._shutdown_overran):
            self._stopping = "processes"
            self._stop_processes(start + SHUTDOWN_KILL_AT_S,
                                 start + SHUTDOWN_REPLIES_AT_S)
            self._stopping = "connection"
            self.link.stop(start + SHUTDOWN_CLOSED_AT_S,
                           close_code=1011 if self.exit_code else 1000)
            self._stopping = "metrics"
            self._stop_metrics(start + SHUTDOWN_METRICS_AT_S)
            self._stopping = "spool"
            self.samples.close()

    def _stop_processes(self, kill_at, deadline):
        """Nothing the agent started outlives it: commands get their grace
        until `kill_at`; what is killed then is answered by `deadline`."""
        self.containers.stop_watching()
        self.children.signal_leftovers(signal.SIGTERM)
        self.requests.stop(kill_at)
        self.children.stop()
        self.requests.wait_idle(deadline)  # the replies of what was killed

    def _stop_metrics(self, deadline):
        """The stop event is set (Link.stop); a hung statvfs must not hold the exit."""
        self.metrics_thread.join(max(0.0, deadline - time.monotonic()))

    def _shutdown_overran(self):
        LOG.critical("shutdown took more than %.0f s (step %r hung); exiting at "
                     "once with status %d", SHUTDOWN_S, self._stopping,
                     EXIT_SHUTDOWN_OVERRAN)
        os._exit(EXIT_SHUTDOWN_OVERRAN)


###############################################################################
# Command line ################################################################
###############################################################################

# CPython keeps a script's syntax tree for as long as the script runs, and the
# tree pins the memory its compilation used: for this file 9 MiB, three times
# what the rest of the agent needs. A module's tree is freed once compiled, so
# the long-running agent replaces itself (same pid, interpreter, flags and
# arguments) by an interpreter that runs RUN_AS_IMPORT: it compiles this file
# as the module `chatops_agent` and calls main().
#
# `-c` puts the working directory first on sys.path, where anyone may have
# left an importlib.py: the code imports nothing (`sys` is built in) before it
# has taken that entry out, then puts the agent's own folder there, as a
# script has it. It reads the file itself, so that any name works (a symlink
# `chatops-agent`, a copy without .py) and no .pyc lands beside a link.
RUN_AS_IMPORT = (
    "import sys;"
    "sys.path[:1]==[''] and sys.path.pop(0);"
    "import types;"
    "d,f,*a=sys.argv[1:];"
    "d and sys.path.insert(0,d);"
    "m=sys.modules['chatops_agent']=types.ModuleType('chatops_agent');"
    "m.__file__=f;"
    "exec(compile(open(f,'rb').read(),f,'exec'),m.__dict__);"
    "sys.exit(m.main(a))"
)


def run_as_import():
    """Exec the agent again as an import. Returns only if that cannot be done
    (see rerun_argv); the agent then runs on as a script, with the larger
    footprint."""
    argv = rerun_argv()
    if argv is not None:
        with contextlib.suppress(OSError):
            os.execv(argv[0], argv)


def rerun_argv():
    """The command line that runs this script again as an import, or None when
    the new interpreter could not load it: the script is not a regular file
    it can read again (`python3 /dev/stdin`, a pipe), or how this interpreter
    was started, and so its flags, is not known (see started_as)."""
    if __spec__ is not None:
        return None  # python3 -m chatops_agent: an import already
    if not sys.executable or FROZEN:
        return None  # a frozen binary's sys.executable is the program, not Python
    script = os.path.abspath(__file__)
    try:
        readable = stat.S_ISREG(os.stat(script).st_mode) and os.access(script, os.R_OK)
    except OSError:
        readable = False
    if not readable:
        return None
    started = started_as()
    if not started or started[-len(sys.argv):] != sys.argv:
        return None
    flags = started[1 : len(started) - len(sys.argv)]
    here = os.path.dirname(os.path.realpath(script))
    folder = sys.path[0] if sys.path and os.path.realpath(sys.path[0]) == here else ""
    return [sys.executable, *flags, "-c", RUN_AS_IMPORT, folder, script, *sys.argv[1:]]


def started_as():
    """The command line this interpreter was started with, its own flags (-X
    utf8, -I, ...) included: sys.orig_argv from Python 3.10 on, else Linux's
    /proc/self/cmdline; None where neither tells."""
    if HAVE_ORIG_ARGV:
        return list(sys.orig_argv)  # novermin: guarded
    if not HAVE_PROC:
        return None
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return [os.fsdecode(arg) for arg in f.read().split(b"\0")[:-1]]
    except OSError:
        return None


def build_parser():
    parser = argparse.ArgumentParser(
        prog="chatops_agent.py",
        allow_abbrev=False,
        description="Report this server's metrics to a ChatOps API over a WebSocket.",
        epilog="Each setting can also come from CHATOPS_<NAME> or the JSON config "
        "file; flags win over variables, variables over the file. Single-dash "
        "spellings (-api-key, -api-url, -config) are accepted too.",
    )
    parser.add_argument(
        "--config",
        "-config",
        metavar="PATH",
        help=f"JSON config file (or {CONFIG_ENV})",
    )
    for s in SETTINGS:
        names = [s.flag, "-" + s.flag[2:]]
        if s.kind == "bool":  # --switch alone means true; --switch false also works
            default = str(s.default).lower()
            parser.add_argument(*names, dest=s.name, nargs="?", const="true",
                                metavar="true|false",
                                help=f"{s.meaning} (default: {default})")
        else:
            bounds = f"; {s.range_text}" if s.low is not None else ""
            parser.add_argument(
                *names,
                dest=s.name,
                metavar=s.name.upper(),
                help=f"{s.meaning} (default: {s.default}{bounds})",
            )
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument(
        "--once",
        action="store_true",
        help="print one metrics message as JSON and exit (no API needed)",
    )
    parser.add_argument(
        "--text",
        action="store_true",
        help="with --once: print the sample for a person to read, not as JSON",
    )
    modes.add_argument("--check", action="store_true", help="run diagnostics and exit")
    modes.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration (key redacted) and exit",
    )
    parser.add_argument(
        "--version", action="version", version="chatops-agent " + __version__
    )
    return parser


###############################################################################
# One sample: --once, and a person's view of it (--once --text) ###############
###############################################################################

def run_once(config, text=False):
    cache = ContainerCache(config, DockerCLI(config, Children()))

    collector = MetricsCollector.for_config(config, cache.read_once)
    collector.prime()
    time.sleep(ONCE_CPU_WINDOW_S)  # the CPU and rate window of this one sample
    data = collector.collect()
    if text:
        print(render_text(data, collector.source.name, config))
    else:
        print(json.dumps({"type": "metrics", "data": data}, indent=2))
    return 0


TEXT_PROCESSES = 10  # the busiest processes shown; the JSON has them all


def render_text(data, source_name, config):
    """One sample as a short screen a person reads at a glance."""
    lines = [f"chatops-agent {__version__} on {data['hostname']}, "
             f"{data['timestamp']} (metrics from {source_name})", ""]
    for part in (text_host, text_processes, text_containers, text_settings):
        lines += part(data, config) + [""]
    return "\n".join(lines).rstrip()


def text_host(data, config):
    cpu, mem, net = data["cpu"], data["memory"], data["network"]
    load = " ".join(f"{n:.2f}" for n in data.get("load_average") or [])
    lines = [
        f"CPU      {cpu['usage_percent']:.1f} % of {cpu['cores']} cores at "
        f"{cpu['frequency_mhz']:.0f} MHz; load {load or 'n/a'}",
        f"Memory   {mem['used_gb']:.2f} of {mem['total_gb']:.2f} GiB used "
        f"({mem['usage_percent']:.1f} %), {mem['available_gb']:.2f} GiB available; "
        f"swap {mem['swap_used_gb']:.2f} of {mem['swap_total_gb']:.2f} GiB",
    ]
    for n, fs in enumerate(data["disk"]["filesystems"]):
        lines.append(f"{'Disk' if n == 0 else '':9}{fs['mount']}: "
                     f"{fs['used_bytes'] / 1024**3:.1f} of "
                     f"{fs['total_bytes'] / 1024**3:.1f} GiB used "
                     f"({fs['usage_percent']:.1f} %), {fs['fstype']} on {fs['device']}")
    for n, i in enumerate(net["interfaces"]):
        lines.append(f"{'Network' if n == 0 else '':9}{i['name']}: "
                     f"{i['bytes_recv_per_s'] / 1e3:.1f} kB/s in, "
                     f"{i['bytes_sent_per_s'] / 1e3:.1f} kB/s out; since boot "
                     f"{i['bytes_recv'] / 1e6:.1f} MB in, "
                     f"{i['bytes_sent'] / 1e6:.1f} MB out")
    lines.append(f"Uptime   {human_duration(data.get('uptime_s') or 0)}")
    return lines


def text_processes(data, config):
    processes = data["processes"]
    header = f"  {'PID':>7}  {'USER':10} {'CPU %':>6} {'MEM MB':>8}  {'STATUS':11} NAME"
    lines = [f"Processes: the {min(TEXT_PROCESSES, len(processes))} busiest of "
             f"{len(processes)} listed", header]
    for p in processes[:TEXT_PROCESSES]:
        lines.append(f"  {p['pid']:>7}  {p['user'][:10]:10} {p['cpu']:>6.1f} "
                     f"{p['memory']:>8.1f}  {p['status']:11} {p['name']}")
    return lines


def text_containers(data, config):
    docker = data["docker"]
    state = docker["status"]
    about = docker.get("server_version") or docker.get("detail") or ""
    lines = [f"Containers: Docker {state}" + (f" ({about})" if about else "")]
    for c in data["containers"]:
        lines.append(f"  {c['name'][:30]:30} {c['state']:10} {c['status'][:28]:28} "
                     f"{c['image']}")
    return lines


def text_settings(data, config):
    key = (f"set (from {config.sources['api_key']}; never shown)" if config.api_key
           else "not set: the agent cannot connect (set CHATOPS_API_KEY)")
    return [
        "Connection settings in effect",
        f"  API        {ws_url(config.api_url)}",
        f"  key        {key}",
        f"  metrics    every {config.metrics_interval_s:g} s; heartbeat every "
        f"{config.heartbeat_interval_s:g} s; up to {config.buffer_size} samples "
        "kept while offline",
        f"  commands   {'enabled' if config.commands_enabled else 'disabled'}; "
        f"Docker {'enabled' if config.docker_enabled else 'disabled'}",
    ]


def run_agent(config):
    if not config.api_key:
        raise ConfigError(
            "no API key: set CHATOPS_API_KEY, or api_key in the config file "
            "(mode 600), or pass --api-key"
        )
    one_malloc_arena()
    agent = Agent(config)
    agent.handle_signals()
    threading.excepthook = agent.on_thread_death
    agent.start()
    agent.wait()
    agent.shutdown()
    LOG.info("stopped")
    return agent.exit_code


###############################################################################
# Diagnostics (--check) #######################################################
###############################################################################


def http_get(url, config, headers=None):
    """(status, parsed JSON or text, redirect location) of a GET; OSError when
    unreachable. A redirect is not followed: urllib would carry X-API-Key
    along, from https to http or to another host."""
    # Imported here: only --check needs HTTP, and urllib.request brings the
    # email and http packages, 2-3 MB of memory the running agent never uses.
    import urllib.error
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None  # urllib then raises HTTPError with the 3xx

    # The proxy the WebSocket takes, decided by the agent (Transport), never by
    # urllib's own reading of the environment.
    transport = Transport(url, config, os.environ)
    scheme = url.partition(":")[0]
    proxies = {scheme: transport.proxy.url} if transport.proxy else {}
    opener = urllib.request.build_opener(
        NoRedirect, urllib.request.ProxyHandler(proxies),
        urllib.request.HTTPSHandler(context=tls_context(config))
    )
    request = urllib.request.Request(
        url, headers=dict(headers or {}, **{"User-Agent": "chatops-agent"})
    )
    location = None
    try:
        with opener.open(request, timeout=10) as response:
            status, body = response.status, response.read(65536)
    except urllib.error.HTTPError as e:
        status, body, location = e.code, e.read(65536), e.headers.get("Location")
    try:
        return status, json.loads(body.decode("utf-8", "replace")), location
    except (ValueError, RecursionError):
        return status, body.decode("utf-8", "replace")[:200], location


def finished_within(seconds, work, *args):
    """work(*args), or TimeoutError once it has taken `seconds`. It runs in a
    thread of its own, left behind if it never returns (a server that
    answers a byte at a time never lets a socket time out, and a name
    lookup has no timeout at all): --check ends soon after anyway."""
    outcome = {}

    def run():
        try:
            outcome["result"] = work(*args)
        except BaseException as e:  # handed to the caller
            outcome["error"] = e

    thread = threading.Thread(target=run, name="check", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


KEY_NOT_CHECKED = "API key not checked: GET /health failed first"


def check_api(config):
    """Yields (ok, text) for the checks that talk to the API: a line for
    each, within CHECK_LINE_S each, whatever the API does."""
    base = http_base(config.api_url)
    try:
        status, body, location = finished_within(
            CHECK_LINE_S, http_get, base + "/health", config)
    except (OSError, ssl.SSLError) as e:
        yield False, f"API not reachable at {base}/health: {unreachable(e, config)}"
        yield False, KEY_NOT_CHECKED
        return
    if location is not None:
        yield False, not_followed(f"GET {base}/health", status, location)
        yield False, KEY_NOT_CHECKED
        return
    yield status == 200, f"API reachable: GET {base}/health -> {status} {body}"
    if not config.api_key:
        yield (
            False,
            "no API key configured: set CHATOPS_API_KEY or api_key in the config file",
        )
        return
    me = base + "/api/v1/api-keys/me"
    transport = Transport(me, config, os.environ)
    if transport.proxy and not transport.secure and not config.allow_plaintext:
        yield False, (f"API key not checked: it would cross the proxy "
                      f"{transport.proxy.name} in clear; use https://, or "
                      "--allow-plaintext if this network and that proxy are trusted")
        return
    try:
        status, body, location = finished_within(
            CHECK_LINE_S, http_get, me, config, {"X-API-Key": config.api_key})
    except (OSError, ssl.SSLError) as e:
        yield False, f"API key not checked: GET {me} failed: {unreachable(e, config)}"
        return
    if location is not None:
        yield False, not_followed(f"GET {me}", status, location)
    elif status == 200 and isinstance(body, dict):
        key = f"key {body.get('name')!r}, active {body.get('is_active')}"
        yield True, f"API key accepted: server_id {body.get('server_id')}, {key}"
    else:
        detail = str(body.get("detail") if isinstance(body, dict) else body)[:200]
        yield (
            False,
            f"API key rejected: HTTP {status} {detail}; check it in the ChatOps UI",
        )


def unreachable(error, config):
    reason = getattr(error, "reason", error)
    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"{reason}; for a private CA pass --ca-file"
    return client_certificate_problem(reason, config) or str(reason)


def not_followed(request, status, location):
    return (
        f"{request} -> HTTP {status}, a redirect to {location[:200]}: not followed "
        "(the key goes only where api_url says); set api_url to the address the "
        "API really serves"
    )


def run_check(config):
    """One line per check; exit 1 if any failed. Docker is reported, never failed:
    it is optional."""
    results = [(True, f"config valid: {config.config_path or 'no config file'}")]
    results.append((True, check_url(config)))
    if config.tls_client_cert:
        results.append(check_client_certificate(config.tls_client_cert))
    results.extend(check_api(config))
    results.append(check_source())
    results.append(check_websocket())
    results.append(check_websocket_path(config))
    for ok, text in results:  # the API's words among them: one line, no key
        print(f"{'ok' if ok else 'FAIL':<4} {redact(one_line(text), config.api_key)}")
    print(f"note {one_line(check_docker(config))}")
    print(f"note {one_line(check_spool(config))}")
    return 0 if all(ok for ok, _ in results) else 1


def check_spool(config):
    """Where undelivered samples would be kept, without touching anything."""
    directory = state_directory(config)
    if directory is None:
        return "spool: off (state_dir none): a restart loses undelivered samples"
    path = os.path.join(directory, SPOOL_FILE)
    try:
        check_state_directory(directory)
    except (SpoolRefused, OSError) as e:
        return f"spool: refused, samples would be kept in memory only: {e}"
    existing = nearest_existing(os.path.abspath(directory))  # makedirs starts there
    if not (os.path.isdir(existing) and os.access(existing, os.W_OK)):
        memory = "samples would be kept in memory only"
        return f"spool: {directory} cannot be made or written: {memory}"
    return f"spool: {path}"


def check_url(config):
    url = ws_url(config.api_url)
    if url.startswith("ws:"):
        tls = "not used"
    elif config.tls_skip_verify:
        tls = "NOT VERIFIED (tls_skip_verify)"
    else:
        tls = f"verified with {config.ca_file or 'the system CAs'}"
    return f"WebSocket URL {url}; TLS {tls}"


def check_client_certificate(path):
    """The client certificate's subject and the days until it expires: a
    warning under CERT_WARN_DAYS, a failure once it has expired."""
    if DECODE_CERT is None:
        return True, (f"client certificate {path}: loaded (this Python cannot read "
                      "its subject and expiry)")
    try:
        with regular_file(path) as readable:
            cert = DECODE_CERT(readable)
        expires = ssl.cert_time_to_seconds(cert["notAfter"])
    except (OSError, ssl.SSLError, ValueError, KeyError) as e:
        return False, f"client certificate {path} cannot be read ({e})"
    subject = ", ".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)
    days = (expires - time.time()) / DAY_S
    text = (f"client certificate {path}: subject {subject or '(none)'}; expires "
            f"{time.strftime('%Y-%m-%d', time.gmtime(expires))}")
    if days < 0:
        return False, f"{text}, {-days:.0f} days ago: the API will refuse it; renew it"
    if days < CERT_WARN_DAYS:
        return True, (f"{text}, in {days:.0f} days: WARNING, renew it within "
                      f"{CERT_WARN_DAYS} days")
    return True, f"{text}, in {days:.0f} days"


def check_source():
    try:
        source = pick_source()
    except DependencyError as e:
        return False, f"metrics source: {e}"
    if source.name == "psutil":
        return True, f"metrics source: psutil {source.psutil.__version__}"
    return True, "metrics source: /proc"


def check_websocket():
    try:
        websocket = load_websocket()
    except DependencyError as e:
        return False, str(e)
    return True, f"websocket-client {getattr(websocket, '__version__', '?')}"


def check_websocket_path(config):
    """The WebSocket opened as the service will open it (proxy, TLS, the
    client's offer of compression), and never authenticated: a --check that
    authenticated beside a running service would cut that service off from
    the UI's requests (the API keeps one connection per key)."""
    try:
        connector = Connector(config, {}, load_websocket())
    except DependencyError as e:
        return False, f"WebSocket not opened: {e}"
    where = connector.url
    if connector.transport.proxy:
        where += f" ({connector.transport.describe()})"
    try:
        probe = finished_within(CHECK_LINE_S, connector.probe)
    except TimeoutError as e:
        connector.stop()
        return False, f"WebSocket at {where} not opened: {e}"
    except AgentError as e:
        return False, f"WebSocket at {where} not opened: {e}"
    frames = probe.deflate.describe() if probe.deflate else "uncompressed (none agreed)"
    return True, (f"WebSocket opened at {where} in {probe.upgraded_s * 1000:.0f} ms; "
                  f"frames: {frames}; not authenticated (--check never is): the "
                  f"API answered its probe with {probe.answer}")


def check_docker(config):
    """What Docker gives the web UI's container list, which looks the same
    (empty) whether Docker is missing, out of reach, or has no containers."""
    empty = "the web UI's container list stays empty"
    if not config.docker_enabled:
        return f"docker: disabled (docker_enabled): {empty}"
    cli = DockerCLI(config, Children())
    status, detail = cli.check()
    if status != "ok":
        return f"docker: {status} ({detail}): {empty}"
    try:
        count = cli.count_containers()
    except DockerError as e:
        return f"docker: daemon {detail} reachable; listing its containers failed: {e}"
    return f"docker: daemon {detail} reachable, {count} containers"


def flags_given(args):
    flags = {s.name: getattr(args, s.name) for s in SETTINGS}
    flags["config"] = args.config
    return flags


def main(argv=None, environ=None, as_script=False):
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    try:
        problem = platform_problem()
        if problem:
            raise PlatformError(problem)
        if as_script and not (args.once or args.check or args.print_config):
            run_as_import()  # the agent's long run; the short ones do not care
        config = load_config(flags_given(args), environ)
        setup_logging(config.log_level, config.api_key)
        if config.sources["api_key"] == "flag":
            LOG.warning(
                "the API key was given on the command line, where any user can read "
                "it in the process list; use CHATOPS_API_KEY or api_key in a config "
                "file with mode 600 instead"
            )
        if args.print_config:
            print(json.dumps(config.redacted(), indent=2))
            return 0
        if args.text and not args.once:
            raise ConfigError("--text goes with --once: chatops_agent.py --once --text")
        if args.once:
            return run_once(config, text=args.text)
        if args.check:
            return run_check(config)
        return run_agent(config)
    except AgentError as e:
        print(f"chatops-agent: error: {one_line(str(e))}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main(as_script=True))
