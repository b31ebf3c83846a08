#!/bin/sh
# Install chatops-agent as a hardened systemd service (as root), or for the
# current user (without root).
#
#   sh install.sh --api-url URL --api-key-file KEYFILE     # from a checkout
#   curl -fsSL BASE_URL/install.sh | sh -s -- --base-url BASE_URL --api-url URL --api-key-file KEYFILE
#   sh install.sh --offline DIR ...           # from a bundle, no network
#   sh install.sh --version 0.1.0 ...         # exactly that release
#   sh install.sh --prepare-offline DIR       # make that bundle (needs network)
#   sh install.sh --uninstall [--purge]
#   sh install.sh --help
#
# The whole script is functions; the last line runs main, so a download cut
# short runs nothing.
set -eu

# Where the agent comes from: a bundle (--offline DIR, made by
# --prepare-offline); the copy beside this script (a checkout, or a bundle);
# or a published directory (--base-url; there is no default: such a bundle,
# served over HTTPS by whoever runs the ChatOps platform). A published
# directory is downloaded whole (the agent and its websocket-client wheel)
# and checked against its SHA256SUMS before anything changes: the newest
# release at BASE_URL/, each release X at BASE_URL/X/.
#
# websocket-client comes from the bundle or the published directory; from
# PyPI only from a checkout (there is no wheel beside it) or with --pypi.

NAME=chatops-agent
PYTHON_MIN_MINOR=8 # Python 3.8 or newer
# The one websocket-client a bundle carries and --pypi installs: the version
# CI tests the agent with (its run on 3.13 installs the bundle's wheel), the
# newest that still runs on Python 3.8; pinned by its wheel's hash.
WEBSOCKET_CLIENT_VERSION=1.8.0
WEBSOCKET_CLIENT_SHA256=17b44cc997f5c498e809b22cdf2d9c7a9e71c02c8cc2b6c56e7c2d1239bfa526

# Exit statuses, one per kind of failure.
E_USAGE=2
E_UNSUPPORTED=3
E_PYTHON=4
E_SOURCE=5
E_BUNDLE=6
E_SERVICE=7
E_CONFIG=8
E_STEP=9 # a command failed unforeseen; its own message is above

info() { printf 'info: %s\n' "$*" >&2; }
warn() { printf 'warn: %s\n' "$*" >&2; }
die() {
    code=$1
    shift
    printf 'error: %s\n' "$*" >&2
    exit "$code"
}

usage() {
    cat <<EOF
Usage: install.sh [options]
  --api-url URL         ChatOps API URL (env CHATOPS_API_URL)
  --api-key KEY         API key (env CHATOPS_API_KEY); visible in the process list:
  --api-key-file FILE   prefer this (env CHATOPS_API_KEY_FILE), or the variable
  --offline DIR         install from a bundle made by --prepare-offline (env CHATOPS_OFFLINE)
  --prepare-offline DIR write such a bundle (on a connected machine) and exit
  --base-url URL        where the agent is published, when it is not beside this
                        script: the address install.sh came from (env CHATOPS_BASE_URL);
                        the agent and its websocket-client wheel are taken from there
  --pypi                take websocket-client $WEBSOCKET_CLIENT_VERSION from PyPI (hash-checked), not
                        from the bundle or published directory (env CHATOPS_PYPI=1)
  --config-file FILE    the service's whole configuration, a JSON object of the
                        settings in docs/configuration.md (the key may be in it):
                        replaces config.json, keeping its api_key and state_dir
                        if FILE has none (env CHATOPS_CONFIG_FILE)
  --version X           install exactly release X (env CHATOPS_VERSION): from the
                        bundle or the file beside this script if it is X, else
                        from BASE_URL/X/; default: the newest
  --proxy URL           the HTTP proxy the service reaches the API through, and
                        install.sh its downloads: http://[USER:PASSWORD@]HOST:PORT,
                        or none for none at all (env CHATOPS_PROXY; a password is
                        visible in the process list on the command line: use the
                        variable); a service does not see a shell's https_proxy
  --allow-plaintext     let the agent send its key over http:// or ws:// to a host that
                        is not loopback (env CHATOPS_ALLOW_PLAINTEXT=true); kept by a
                        re-run only while the API URL stays the same
  --no-start            install, but do not enable or start the service (env CHATOPS_NO_START=1)
  --docker-access       let the service use Docker (root-equivalent!) (env CHATOPS_DOCKER_ACCESS=1)
  --dry-run             print what would be done, change nothing
  --uninstall           remove service, program and venv; --purge also config, spool, user
  --root DIR            install under DIR instead of / (for tests and images; implies --no-start)
  --help                this text
EOF
}

# -- options ---------------------------------------------------------------------

parse_args() {
    API_URL=${CHATOPS_API_URL:-}
    API_KEY=${CHATOPS_API_KEY:-}
    API_KEY_FILE=${CHATOPS_API_KEY_FILE:-}
    OFFLINE=${CHATOPS_OFFLINE:-}
    BASE_URL=${CHATOPS_BASE_URL:-}
    VERSION=${CHATOPS_VERSION:-}
    NO_START=${CHATOPS_NO_START:-0}
    PYPI=${CHATOPS_PYPI:-0}
    CONFIG_FILE=${CHATOPS_CONFIG_FILE:-}
    PROXY=${CHATOPS_PROXY:-}
    PROXY_ARGUMENT=0
    case ${CHATOPS_ALLOW_PLAINTEXT:-} in
    true | 1) ALLOW_PLAINTEXT=1 ;;
    *) ALLOW_PLAINTEXT=0 ;;
    esac
    DOCKER_ACCESS=${CHATOPS_DOCKER_ACCESS:-0}
    ROOT=${CHATOPS_ROOT:-}
    DRY_RUN=0
    MODE=install
    PREPARE_DIR=
    while [ $# -gt 0 ]; do
        case $1 in
        --api-url) need_value "$@" && API_URL=$2 && shift ;;
        --api-key) need_value "$@" && API_KEY=$2 && shift ;;
        --api-key-file) need_value "$@" && API_KEY_FILE=$2 && shift ;;
        --offline) need_value "$@" && OFFLINE=$2 && shift ;;
        --prepare-offline) need_value "$@" && PREPARE_DIR=$2 && MODE=prepare && shift ;;
        --base-url) need_value "$@" && BASE_URL=$2 && shift ;;
        --config-file) need_value "$@" && CONFIG_FILE=$2 && shift ;;
        --proxy) need_value "$@" && PROXY=$2 && PROXY_ARGUMENT=1 && shift ;;
        --pypi) PYPI=1 ;;
        --version) need_value "$@" && VERSION=$2 && shift ;;
        --root) need_value "$@" && ROOT=$2 && shift ;;
        --no-start) NO_START=1 ;;
        --allow-plaintext) ALLOW_PLAINTEXT=1 ;;
        --docker-access) DOCKER_ACCESS=1 ;;
        --dry-run) DRY_RUN=1 ;;
        --uninstall) MODE=uninstall ;;
        --purge) MODE=purge ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) die "$E_USAGE" "unknown option $1 (see --help)" ;;
        esac
        shift
    done
    case $VERSION in
    *[!0-9A-Za-z.+-]* | [!0-9]*) die "$E_USAGE" "--version $VERSION is not a version (like 0.1.0)" ;;
    esac
    check_proxy
    if [ -n "$ROOT" ]; then
        NO_START=1
        ROOT=$(cd "$ROOT" && pwd) || die "$E_USAGE" "--root $ROOT is not a directory"
    fi
}

need_value() {
    [ $# -ge 2 ] || die "$E_USAGE" "$1 needs a value"
}

# A proxy URL (--proxy's, if none is given) as it may be shown: its password
# replaced, as the agent shows it.
shown_proxy() {
    printf '%s\n' "${1-$PROXY}" | sed 's#^\([A-Za-z0-9+.-]*://[^:/@]*\):[^@/]*@#\1:<redacted>@#'
}

# --proxy: a form the agent takes (it checks the rest), and a password kept
# off the command line from now on. install.sh's own downloads (curl, wget,
# pip, apt-get) go through it too: they read these variables, which keeps
# the password off their command lines.
check_proxy() {
    case $PROXY in
    "") return ;;
    none) unset https_proxy http_proxy HTTPS_PROXY HTTP_PROXY ;;
    http://?* | HTTP://?*)
        export https_proxy="$PROXY" http_proxy="$PROXY" HTTPS_PROXY="$PROXY" HTTP_PROXY="$PROXY"
        ;;
    *) die "$E_USAGE" "--proxy $(shown_proxy) is not a proxy: give" \
        "http://[USER:PASSWORD@]HOST:PORT, or none for no proxy at all" ;;
    esac
    case $PROXY_ARGUMENT$PROXY in
    1*://*:*@*) warn "the proxy's password was on install.sh's command line, where the" \
        "process list shows it: give the URL in CHATOPS_PROXY instead" ;;
    esac
}

# -- where things go ---------------------------------------------------------------

set_paths() {
    if [ "$(id -u)" -eq 0 ]; then
        SYSTEM=1
        APP_DIR=$ROOT/opt/$NAME
        CONF_DIR=$ROOT/etc/$NAME
        STATE_DIR=/var/lib/$NAME # the spool of undelivered samples
        UNIT_DIR=$ROOT/etc/systemd/system
    else
        SYSTEM=0
        [ "$MODE" = install ] && info "not root: installing for $(id -un) only; for the" \
            "system service run it as root, e.g. ... | sudo sh -s -- OPTIONS"
        APP_DIR=$ROOT${XDG_DATA_HOME:-$HOME/.local/share}/$NAME
        CONF_DIR=$ROOT${XDG_CONFIG_HOME:-$HOME/.config}/$NAME
        STATE_DIR= # the agent's default: ~/.local/state/chatops-agent
        UNIT_DIR=
    fi
    CONFIG=$CONF_DIR/config.json
    VENV=$APP_DIR/venv
}

# Run a command, or only show it under --dry-run.
run() {
    if [ "$DRY_RUN" = 1 ]; then
        printf 'dry-run: %s\n' "$*" >&2
    else
        "$@"
    fi
}

# -- checks, before anything changes ------------------------------------------------

report_system() {
    warn "to report this, include:"
    [ -r /etc/os-release ] && sed 's/^/  /' /etc/os-release >&2
    printf '  %s\n' "$(uname -a)" >&2
    printf '  python3: %s\n' "$(python3 --version 2>&1 || echo none)" >&2
}

check_system() {
    case $(uname -s) in
    Linux) ;;
    *)
        report_system
        die "$E_UNSUPPORTED" "this installer supports Linux only"
        ;;
    esac
    command -v python3 >/dev/null 2>&1 || {
        report_system
        die "$E_PYTHON" "python3 is missing: install it (Debian/Ubuntu: apt-get install python3 python3-venv)"
    }
    minor=$(python3 -c 'import sys; print(sys.version_info[1] if sys.version_info[0] == 3 else 0)')
    [ "$minor" -ge "$PYTHON_MIN_MINOR" ] || {
        report_system
        die "$E_PYTHON" "python3 is older than 3.$PYTHON_MIN_MINOR: install a newer one"
    }
    HAVE_VENV=1
    probe=$(mktemp -d)
    python3 -m venv "$probe/v" >/dev/null 2>&1 || HAVE_VENV=0
    rm -rf "$probe"
    if [ "$HAVE_VENV" = 0 ]; then
        warn "python3 cannot make a venv (Debian/Ubuntu: apt-get install python3-venv);" \
            "the distro's python3-websocket will be used instead"
    fi
    SYSTEMD=0
    if [ -z "$ROOT" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        case $(systemctl is-system-running 2>/dev/null || true) in
        running | degraded | starting) SYSTEMD=1 ;;
        esac
    fi
}

# The key from --api-key-file, read as the agent reads its own files: only a
# small regular file holding one line. What the path names instead is
# refused without waiting (a FIFO, a device) and without reading more than
# 4 KiB (a link to some other file).
read_key_file() {
    [ -n "$API_KEY_FILE" ] || return 0
    API_KEY=$(python3 - "$API_KEY_FILE" <<'PY'
import os, stat, sys
path = sys.argv[1]
def refuse(why):
    print(f"the key file {path} {why}; nothing was changed")
    sys.exit(1)
try:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        refuse("is not a regular file: give the file that holds the key (a key "
               "from a pipe goes in CHATOPS_API_KEY instead)")
    data = os.read(fd, 4097)
except OSError as e:
    refuse(f"cannot be read ({e.strerror})")
if len(data) > 4096:
    refuse("is larger than 4 KiB, and a key is one short line: is it the right file?")
try:
    key = data.decode("ascii").strip()
except UnicodeDecodeError:
    refuse("holds more than plain text: it must hold the key alone, on one line")
if not key:
    refuse("is empty: paste the key into it (the ChatOps web UI makes one, under API Keys)")
if any(c.isspace() or not c.isprintable() for c in key):
    refuse("holds more than one line, or spaces: it must hold the key alone, on one line")
print(key)
PY
    ) || die "$E_USAGE" "$API_KEY"
}

# No key given and none in a config.json: said before anything is fetched.
check_key() {
    if [ -z "$API_KEY" ] && [ -z "$CONFIG_FILE" ] && ! grep -qs '"api_key"' "$CONFIG" &&
        [ "$NO_START" = 0 ]; then
        no_key
    fi
}

no_key() {
    die "$E_CONFIG" "no API key: give --api-key-file FILE, CHATOPS_API_KEY, or --api-key" \
        "(a key is made in the ChatOps web UI, under API Keys; or --no-start to" \
        "install without one)"
}

# The config this run will install, made in $WORK before anything changes:
# the values given now replace those of an existing config.json, the others
# are kept; allow_plaintext is kept only while api_url stays the same (a new
# URL must ask for it again). --config-file replaces the settings whole (but
# for api_key and state_dir, kept if it has none). Then the agent itself
# checks it, so that a setting it would refuse changes nothing. The names of
# the settings that change go to $WORK/config.changes (for --dry-run).
prepare_config() {
    NEW_CONFIG=$WORK/config.json
    has_key=$(CHATOPS_NEW_URL=$API_URL CHATOPS_NEW_KEY=$API_KEY CHATOPS_NEW_STATE=$STATE_DIR \
        CHATOPS_NEW_PLAINTEXT=$ALLOW_PLAINTEXT CHATOPS_NEW_FILE=$CONFIG_FILE \
        CHATOPS_NEW_PROXY=$PROXY \
        python3 - "$CONFIG" "$NEW_CONFIG" "$WORK/config.changes" <<'PY'
import json, os, stat, sys
old, new, changes = sys.argv[1:]

def refuse(why):
    print(why)  # said by die, below
    sys.exit(1)

def load(path, what):
    """A JSON object from a small regular file, or the reason why not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                refuse(f"{what} {path} is not a regular file")
            data = f.read(65537)
        if len(data) > 65536:
            refuse(f"{what} {path} is larger than 64 KiB: is it the right file?")
        config = json.loads(data)
    except OSError as e:
        refuse(f"{what} {path} cannot be read ({e.strerror})")
    except ValueError as e:
        refuse(f"{what} {path} is not valid JSON ({e}): fix it, or remove it and re-run")
    if not isinstance(config, dict):
        refuse(f"{what} {path} is not a JSON object of settings")
    return config

before = load(old, "the existing config") if os.path.exists(old) else {}
config = dict(before)
if os.environ["CHATOPS_NEW_FILE"]:
    config = load(os.environ["CHATOPS_NEW_FILE"], "--config-file")
    for kept in ("api_key", "state_dir"):
        if kept in before:
            config.setdefault(kept, before[kept])
url = os.environ["CHATOPS_NEW_URL"]
if url and url != config.get("api_url"):
    config.pop("allow_plaintext", None)
if url:
    config["api_url"] = url
if os.environ["CHATOPS_NEW_KEY"]:
    config["api_key"] = os.environ["CHATOPS_NEW_KEY"]
if os.environ["CHATOPS_NEW_PROXY"]:
    config["proxy"] = os.environ["CHATOPS_NEW_PROXY"]
if os.environ["CHATOPS_NEW_PLAINTEXT"] == "1":
    config["allow_plaintext"] = True
if os.environ["CHATOPS_NEW_STATE"]:  # the operator's own choice stays
    config.setdefault("state_dir", os.environ["CHATOPS_NEW_STATE"])
text = json.dumps(config, indent=2, sort_keys=True) + "\n"
if config == before and os.path.exists(old):  # the same: the file as it is
    with open(old) as f:
        text = f.read()
with open(os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
    f.write(text)
missing = object()
with open(changes, "w") as f:
    f.write(", ".join(sorted(name for name in set(before) | set(config)
                             if before.get(name, missing) != config.get(name, missing))))
print("yes" if config.get("api_key") else "no")
PY
    ) || die "$E_CONFIG" "$has_key; nothing was changed"
    [ "$has_key" = no ] && [ "$NO_START" = 0 ] && no_key
    if [ "$SYSTEM" = 1 ] && [ -n "${https_proxy:-${HTTPS_PROXY:-}}" ] &&
        ! grep -q '"proxy"' "$NEW_CONFIG"; then
        info "https_proxy is set here, and a service does not see it: --proxy URL (or" \
            "CHATOPS_PROXY) gives the service its proxy, --proxy none says it needs none"
    fi
    # As the service will run it: no CHATOPS_ variables, only the file.
    refusal=$(env -i PATH="$PATH" HOME="$HOME" python3 -I "$WORK/chatops_agent.py" \
        --config "$NEW_CONFIG" --print-config 2>&1 >/dev/null) ||
        die "$E_CONFIG" "the agent refuses this configuration, so nothing was changed:" \
            "${refusal#chatops-agent: error: }"
}

# -- the agent and its dependencies ----------------------------------------------------

# The directory this script is in, when it is a file (not a pipe).
script_dir() {
    case $0 in
    */install.sh) (cd "${0%/*}" && pwd) ;;
    install.sh) pwd ;;
    *) echo "" ;;
    esac
}

fetch_agent() {
    dest=$1
    here=$(script_dir)
    if [ -n "$OFFLINE" ]; then
        cp "$OFFLINE/chatops_agent.py" "$dest"
        check_version "$dest" "the bundle in $OFFLINE" \
            "make a bundle of it: sh install.sh --version $VERSION --prepare-offline DIR"
    elif [ -n "$here" ] && [ -f "$here/chatops_agent.py" ] &&
        { [ -z "$VERSION" ] || [ "$(agent_version "$here/chatops_agent.py")" = "$VERSION" ]; }; then
        info "using chatops_agent.py beside install.sh"
        cp "$here/chatops_agent.py" "$dest"
        if [ -f "$here/SHA256SUMS" ]; then # a bundle, run without --offline
            OFFLINE=$here
            check_bundle
        else
            PYPI=1 # a checkout: there is no wheel beside it
        fi
    else
        download_published "$BASE_URL${VERSION:+/$VERSION}" "$WORK/published"
        OFFLINE=$WORK/published # from here on, as a bundle
        cp "$OFFLINE/chatops_agent.py" "$dest"
        check_version "$dest" "$BASE_URL${VERSION:+/$VERSION}" \
            "ask whoever publishes $BASE_URL"
    fi
    head -n 1 "$dest" | grep -q python3 || die "$E_SOURCE" "what was fetched is not chatops_agent.py"
    info "chatops-agent $(agent_version "$dest")"
}

# download_published URL DIR: the published directory at URL, as much of it
# as this run installs (the agent; its websocket-client wheel unless --pypi),
# into DIR, each file checked against URL's SHA256SUMS.
download_published() {
    need_base_url
    hint=": --base-url names a directory made by install.sh --prepare-offline, published as it is"
    [ -n "$VERSION" ] && hint=": is $VERSION a release (see CHANGELOG.md)? Without --version the newest is installed"
    mkdir -p "$2/wheels"
    case $PROXY in
    "" | none) info "downloading chatops-agent from $1" ;;
    *) info "downloading chatops-agent from $1 through the proxy $(shown_proxy)" ;;
    esac
    download "$1/SHA256SUMS" "$2/SHA256SUMS.all" || die "$E_SOURCE" "cannot download $1/SHA256SUMS$hint"
    # Only the files this run needs, by names this script knows: what
    # SHA256SUMS lists is never taken as a path as it is.
    wheel='wheels/websocket_client-[0-9][0-9A-Za-z.+_-]*[.]whl'
    [ "$PYPI" = 1 ] && wheel=none
    awk -v wheel="^$wheel\$" 'NF == 2 && $1 ~ /^[0-9a-f]+$/ && length($1) == 64 &&
        ($2 == "chatops_agent.py" || $2 ~ wheel) { print $1 "  " $2 }' \
        "$2/SHA256SUMS.all" >"$2/SHA256SUMS"
    grep -q '  chatops_agent[.]py$' "$2/SHA256SUMS" ||
        die "$E_SOURCE" "$1/SHA256SUMS lists no chatops_agent.py$hint"
    if [ "$PYPI" = 0 ] && ! grep -q '  wheels/' "$2/SHA256SUMS"; then
        die "$E_SOURCE" "$1 publishes no websocket-client wheel (an older publication?):" \
            "publish a bundle made by install.sh --prepare-offline there, or give --pypi" \
            "to take websocket-client $WEBSOCKET_CLIENT_VERSION from PyPI"
    fi
    while read -r _ name; do
        download "$1/$name" "$2/$name" || die "$E_SOURCE" "cannot download $1/$name"
    done <"$2/SHA256SUMS"
    (cd "$2" && sha256sum --quiet -c SHA256SUMS) >&2 ||
        die "$E_SOURCE" "what $1 serves does not match its SHA256SUMS: the download is" \
            "damaged or altered; nothing was changed"
    info "checksums verified (SHA256SUMS)"
}

need_base_url() {
    [ -n "$BASE_URL" ] || die "$E_USAGE" "chatops_agent.py is not beside install.sh:" \
        "give --base-url, the address where it is published (where install.sh came" \
        "from), or run install.sh from a checkout of chatops-agent or a bundle"
}

# The version a copy of the agent says it is.
agent_version() {
    sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$1"
}

# check_version FILE WHERE FIX: with --version X, FILE must be release X.
check_version() {
    [ -z "$VERSION" ] && return
    found=$(agent_version "$1")
    [ "$found" = "$VERSION" ] ||
        die "$E_SOURCE" "$2 holds chatops-agent ${found:-of no version}, not $VERSION; $3"
}

# download URL FILE [quiet]: URL's body into FILE, or status 1 (said, unless
# quiet: the caller has another way). Once at https, never in clear: a
# redirect from https to anything else ends the run (curl's --proto-redir;
# GNU wget follows redirects one at a time, only to https; BusyBox's wget,
# which follows any, is not used for https).
download() {
    case $1 in
    https://*) SECURE=1 ;;
    *) SECURE=0 ;;
    esac
    if command -v curl >/dev/null 2>&1; then
        download_with_curl "$@"
    elif command -v wget >/dev/null 2>&1; then
        download_with_wget "$@"
    else
        die "$E_SOURCE" "neither curl nor wget is installed: install one (Debian:" \
            "apt-get install curl), or install from a bundle with --offline DIR"
    fi
}

download_with_curl() {
    allowed='=https,http'
    [ "$SECURE" = 1 ] && allowed='=https'
    said=$(curl -fsSL --proto "$allowed" --proto-redir "$allowed" -o "$2" \
        -w '\nCONNECT %{http_connect}\n' "$1" 2>&1) && return 0
    status=$?
    # Status 1, from https: a redirect to a protocol not allowed.
    [ "$status" = 1 ] && [ "$SECURE" = 1 ] && refuse_redirect "$1"
    # A proxy's answer to CONNECT (000: no proxy, or none reached).
    connect=$(printf '%s\n' "$said" | sed -n 's/^CONNECT \([0-9]*\)$/\1/p')
    case $connect in
    "" | 000 | 200) ;;
    *) proxy_refused "$1" "$connect" ;;
    esac
    [ -n "${3:-}" ] || printf '%s\n' "$said" | sed '/^CONNECT [0-9]*$/d; /^$/d' >&2
    return 1
}

# proxy_refused URL STATUS: what the proxy said to CONNECT, and what to do.
proxy_refused() {
    target=$(printf '%s\n' "$1" | sed 's#^[A-Za-z]*://\([^/]*\).*#\1#')
    case $2 in
    401 | 407) what="check the user and password in its URL" ;;
    403) what="ask for $target to be allowed through it" ;;
    *) what="can it reach $target?" ;;
    esac
    die "$E_SOURCE" "the proxy $(shown_proxy "${https_proxy:-${HTTPS_PROXY:-}}") refused" \
        "CONNECT to $target ($2), so $1 could not be downloaded: $what"
}

download_with_wget() {
    if [ "$SECURE" = 0 ]; then
        wget -q -O "$2" "$1" 2>/dev/null && return 0
        [ -n "${3:-}" ] || warn "wget could not download $1"
        return 1
    fi
    wget --version 2>/dev/null | grep -q '^GNU Wget' ||
        die "$E_SOURCE" "this wget (BusyBox's) follows any redirect, so it cannot" \
            "keep $1 on https: install curl (or GNU wget)"
    url=$1 hops=0
    while [ "$hops" -le 5 ]; do
        said=$(wget -q -S --max-redirect=0 -O "$2" "$url" 2>&1) && return 0
        location=$(printf '%s\n' "$said" | sed -n 's/^ *[Ll]ocation: *//p' | tail -n 1 | tr -d '\r')
        case $location in
        "") break ;;
        https://*) url=$location ;;
        /*) url=$(printf '%s\n' "$url" | sed 's#^\(https://[^/]*\).*#\1#')$location ;;
        *) refuse_redirect "$url" "$location" ;;
        esac
        hops=$((hops + 1))
    done
    [ -n "${3:-}" ] || warn "wget could not download $1:" \
        "$(printf '%s\n' "$said" | grep -m 1 'HTTP/' || echo 'no answer')"
    return 1
}

refuse_redirect() {
    die "$E_SOURCE" "$1 redirected to ${2:-an address that is not https}, which" \
        "the installer refuses: once at https it never goes on in clear. Give" \
        "--base-url the https address where the files are"
}

check_bundle() {
    [ -f "$OFFLINE/SHA256SUMS" ] || die "$E_BUNDLE" "$OFFLINE has no SHA256SUMS: not a bundle"
    (cd "$OFFLINE" && sha256sum --quiet -c SHA256SUMS) >&2 ||
        die "$E_BUNDLE" "the bundle in $OFFLINE is damaged: SHA256SUMS does not match"
    info "bundle verified"
}

install_python_deps() {
    if [ "$HAVE_VENV" = 0 ]; then
        use_distro_packages
        return
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        CHANGED=1
        [ -d "$VENV" ] || made "$VENV"
        run python3 -m venv "$VENV"
    fi
    # Only websocket-client: on Linux the agent reads its metrics from /proc.
    pip_install || die "$E_SOURCE" "cannot install websocket-client (pip's message is above)"
    PYTHON=$VENV/bin/python
}

# websocket-client into the venv: the bundle's wheel, or with --pypi (and
# from a checkout, which has none) the pinned version from PyPI, its wheel
# checked against the pinned hash.
pip_install() {
    if [ "$PYPI" = 0 ]; then
        run "$VENV/bin/pip" install -q --disable-pip-version-check --no-index \
            --find-links "$OFFLINE/wheels" websocket-client
        return
    fi
    info "websocket-client $WEBSOCKET_CLIENT_VERSION from PyPI (hash-checked)"
    pinned_requirement >"$WORK/pinned.txt"
    run "$VENV/bin/pip" install -q --disable-pip-version-check --only-binary=:all: \
        --require-hashes -r "$WORK/pinned.txt"
}

pinned_requirement() {
    printf 'websocket-client==%s --hash=sha256:%s\n' "$WEBSOCKET_CLIENT_VERSION" \
        "$WEBSOCKET_CLIENT_SHA256"
}

use_distro_packages() {
    PYTHON=python3
    python3 -c 'import websocket' 2>/dev/null && return
    if [ -n "$OFFLINE" ] && ls "$OFFLINE"/wheels/websocket_client-*.whl >/dev/null 2>&1; then
        info "no venv: the agent will import websocket-client from its wheel"
        run cp "$OFFLINE"/wheels/websocket_client-*.whl "$APP_DIR/"
    elif [ "$SYSTEM" = 1 ] && command -v apt-get >/dev/null 2>&1; then
        info "installing python3-websocket with apt-get"
        run apt-get install -y -q python3-websocket >&2 ||
            die "$E_PYTHON" "cannot install python3-websocket; install python3-venv and re-run"
    else
        die "$E_PYTHON" "no venv and no websocket-client: install python3-venv, and re-run"
    fi
}

# -- undoing a failed install ----------------------------------------------------------
# Each change is written down as it is made ($WORK/undo, newest last), so that
# a failure after the first change puts the machine back as it was before the
# run: a fresh install leaves nothing, an upgrade the previous install,
# running again if it ran. Nothing is written down under --dry-run.

# make_dir DIR: mkdir -p, writing down the first directory it makes.
make_dir() {
    first=$1
    while ! [ -d "$(dirname "$first")" ]; do
        first=$(dirname "$first")
    done
    [ -d "$1" ] || made "$first"
    run mkdir -p "$1"
}

made() { # made PATH: this run creates PATH (a file or a directory)
    [ "$DRY_RUN" = 1 ] || printf 'M - %s\n' "$1" >>"$WORK/undo"
}

replaced() { # replaced FILE: this run is about to replace FILE; a copy is kept
    [ "$DRY_RUN" = 1 ] && return
    saved=$WORK/saved.$(wc -l <"$WORK/undo")
    cp -p "$1" "$saved"
    printf 'R %s %s\n' "$saved" "$1" >>"$WORK/undo"
}

# At every exit: a failure nobody foresaw (a command that stopped set -e) gets
# its own status, what the run changed is put back, the work directory goes.
on_exit() {
    status=$?
    case $status in
    0 | "$E_USAGE" | "$E_UNSUPPORTED" | "$E_PYTHON" | "$E_SOURCE" | "$E_BUNDLE" | \
        "$E_SERVICE" | "$E_CONFIG") ;;
    *)
        printf 'error: a step failed (status %s; its own message is above)\n' "$status" >&2
        status=$E_STEP
        ;;
    esac
    [ "$status" = 0 ] || [ "$UNDO" = 0 ] || undo
    [ -z "$WORK" ] || rm -rf "$WORK"
    exit "$status"
}

undo() {
    [ -s "$WORK/undo" ] || return 0
    warn "putting back what this run changed"
    if [ "$SYSTEMD" = 1 ]; then # the service first, while its unit is there
        if [ "$WAS_ENABLED" = 0 ]; then
            systemctl disable --now "$NAME.service" 2>/dev/null || true
        elif [ "$WAS_ACTIVE" = 0 ]; then
            systemctl stop "$NAME.service" || true
        fi
    fi
    # Newest first (sed reverses the lines).
    sed -n '1!G;h;$p' "$WORK/undo" | while read -r kind saved path; do
        case $kind in
        M) rm -rf "$path" || true ;;
        R) cp -p "$saved" "$path" || true ;;
        U) if [ -n "$ROOT" ]; then userdel --root "$ROOT" "$NAME"; else userdel "$NAME"; fi ||
            true ;;
        esac
    done
    if [ "$SYSTEMD" = 1 ]; then
        systemctl daemon-reload || true
        [ "$WAS_ACTIVE" = 1 ] && { systemctl restart "$NAME.service" || true; }
    fi
    if [ "$FRESH" = 1 ]; then
        warn "nothing of chatops-agent is left installed"
    else
        warn "the previous install is back as it was"
    fi
}

# -- files --------------------------------------------------------------------------

# install_file SRC DEST MODE: replace DEST if it differs, keeping DEST.bak; CHANGED=1 then.
install_file() {
    if [ -f "$2" ] && cmp -s "$1" "$2"; then
        return
    fi
    CHANGED=1
    if [ -f "$2" ]; then
        replaced "$2"
        if [ -f "$2.bak" ]; then replaced "$2.bak"; else made "$2.bak"; fi
        run cp -p "$2" "$2.bak"
    else
        made "$2"
    fi
    run install -m "$3" "$1" "$2"
}

create_user() {
    [ "$SYSTEM" = 1 ] || return 0
    if [ -n "$ROOT" ]; then
        grep -q "^$NAME:" "$ROOT/etc/passwd" 2>/dev/null && return
        [ -f "$ROOT/etc/passwd" ] || return 0 # a bare directory tree: files stay root's
        run useradd --root "$ROOT" --system --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin "$NAME"
        [ "$DRY_RUN" = 1 ] || echo "U - $NAME" >>"$WORK/undo"
        return
    fi
    id "$NAME" >/dev/null 2>&1 && return
    CHANGED=1
    info "creating the system user $NAME (no login shell, no home)"
    [ "$DRY_RUN" = 1 ] || echo "U - $NAME" >>"$WORK/undo"
    if command -v useradd >/dev/null 2>&1; then
        run useradd --system --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin "$NAME"
    else
        run adduser -S -D -H -s /sbin/nologin "$NAME"
    fi
}

# uid:gid of the service user, from the passwd file of the tree being installed
# (numbers: under --root the host may not know the name).
owner() {
    ids=
    if [ "$SYSTEM" = 1 ] && [ -f "$ROOT/etc/passwd" ]; then
        ids=$(awk -F: -v n="$NAME" '$1 == n { print $3 ":" $4 }' "$ROOT/etc/passwd")
        # Under --dry-run the user may be one this run would have made.
        [ -z "$ids" ] && [ "$DRY_RUN" = 1 ] && ids=$NAME:$NAME
    fi
    echo "${ids:-$(id -u):$(id -g)}"
}

# Where undelivered samples wait across restarts (the service's spool): 0700,
# the service user's. systemd's StateDirectory= makes it too; this is for
# machines without systemd, where the agent is run by hand.
make_state_dir() {
    [ "$SYSTEM" = 1 ] || return 0
    make_dir "$ROOT$STATE_DIR"
    run chmod 0700 "$ROOT$STATE_DIR"
    run chown "$(owner)" "$ROOT$STATE_DIR"
}

# The config prepare_config made: mode 0600, owned by the service user, in a
# directory of the service user's (0750), replaced in one rename.
install_config() {
    make_dir "$CONF_DIR"
    if [ "$SYSTEM" = 1 ]; then
        run chmod 0750 "$CONF_DIR"
        run chown "$(owner)" "$CONF_DIR"
    fi
    if [ -f "$CONFIG" ] && cmp -s "$NEW_CONFIG" "$CONFIG"; then
        return
    fi
    CHANGED=1
    if [ "$DRY_RUN" = 1 ]; then # the names of the settings that change, never values
        printf 'dry-run: write %s (mode 600, owner %s): %s\n' "$CONFIG" "$(owner)" \
            "$(cat "$WORK/config.changes")" >&2
        return
    fi
    if [ -f "$CONFIG" ]; then
        replaced "$CONFIG"
    else
        made "$CONFIG"
    fi
    new=$(mktemp "$CONF_DIR/.config.XXXXXX")
    cat "$NEW_CONFIG" >"$new"
    chmod 0600 "$new"
    [ "$SYSTEM" = 1 ] && chown "$(owner)" "$new"
    mv -f "$new" "$CONFIG"
}

write_unit() {
    [ "$SYSTEM" = 1 ] || return 0
    JOURNAL_ACCESS=
    if grep -q '^systemd-journal:' "$ROOT/etc/group" 2>/dev/null; then
        JOURNAL_ACCESS="# Commands may read the journal (journalctl -u $NAME): all of the
# system journal, as the systemd-journal group may.
SupplementaryGroups=systemd-journal"
    fi
    tmp=$WORK/unit
    cat >"$tmp" <<EOF
[Unit]
Description=ChatOps agent: metrics, commands and Docker for the ChatOps API
After=network-online.target
Wants=network-online.target

[Service]
User=$NAME
Group=$NAME
ExecStart=$PYTHON_PATH /opt/$NAME/chatops_agent.py --config /etc/$NAME/config.json
Restart=always
RestartSec=5
KillMode=mixed
# Journal lines read chatops-agent[PID], not python[PID].
SyslogIdentifier=$NAME
# Hardening. It binds remote commands too: they cannot write outside /tmp
# (private) and the agent's own directories, cannot gain privileges (sudo and
# setuid programs fail), and see no devices. Loosen it with a drop-in, e.g.
#   systemctl edit chatops-agent  ->  [Service] ProtectSystem=full
# (docs/install.md lists what each line forbids and the drop-in that undoes it).
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictNamespaces=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallArchitectures=native
ProtectClock=yes
ProtectHostname=yes
RestrictRealtime=yes
RemoveIPC=yes
UMask=0077
# The spool of samples not yet delivered (writable under ProtectSystem=strict).
StateDirectory=$NAME
StateDirectoryMode=0700
$JOURNAL_ACCESS

[Install]
WantedBy=multi-user.target
EOF
    make_dir "$UNIT_DIR"
    install_file "$tmp" "$UNIT_DIR/$NAME.service" 0644
    dropin=$UNIT_DIR/$NAME.service.d/docker.conf
    if [ "$DOCKER_ACCESS" = 1 ] && ! grep -q '^docker:' "$ROOT/etc/group" 2>/dev/null; then
        warn "--docker-access: there is no 'docker' group (is Docker installed?); skipped"
    elif [ "$DOCKER_ACCESS" = 1 ]; then
        warn "--docker-access: the agent (and every remote command) joins the docker group," \
            "which is root-equivalent on this machine"
        printf '[Service]\nSupplementaryGroups=docker\n' >"$WORK/docker.conf"
        make_dir "${dropin%/*}"
        install_file "$WORK/docker.conf" "$dropin" 0644
    fi
}

start_service() {
    if [ "$SYSTEM" = 0 ]; then
        info "installed for $(id -un); run it with:"
        info "  $(agent_command)"
        return
    fi
    if [ "$NO_START" = 1 ] || [ "$SYSTEMD" = 0 ]; then
        [ "$SYSTEMD" = 0 ] && [ "$NO_START" = 0 ] && warn "systemd is not running here"
        info "to run the agent by hand:"
        info "  $(agent_command)"
        return
    fi
    run systemctl daemon-reload
    run systemctl enable "$NAME.service" >&2
    if [ "$CHANGED" = 1 ] || ! systemctl is-active --quiet "$NAME.service"; then
        since=$(date +%s)
        # A start that fails is judged below, with its journal, not by set -e.
        run systemctl restart "$NAME.service" || true
        [ "$DRY_RUN" = 1 ] && return
        sleep 2 # an agent that fails at start exits within this
    fi
    if ! systemctl is-active --quiet "$NAME.service"; then
        # This run's lines only: the journal keeps those of earlier installs.
        # --sync first, so that what the service and systemd just logged is in.
        journalctl --sync 2>/dev/null || true
        journalctl -u "$NAME.service" --since "@${since:-0}" -n 30 --no-pager >&2 || true
        die "$E_SERVICE" "the service did not start; its log is above"
    fi
    info "chatops-agent is running: systemctl status $NAME"
}

# The agent's command line as the service runs it, as its user: by hand, or
# with --check to see what it sees (agent_command --check).
agent_command() {
    if [ "$SYSTEM" = 1 ]; then
        printf 'runuser -u %s -- ' "$NAME"
    fi
    printf '%s %s/chatops_agent.py%s --config %s\n' "$PYTHON_PATH" "${APP_DIR#"$ROOT"}" \
        "${1:+ $1}" "${CONFIG#"$ROOT"}"
}

# -- modes ----------------------------------------------------------------------------

do_install() {
    check_system
    read_key_file
    check_key
    [ -n "$OFFLINE" ] && check_bundle
    CHANGED=0
    WORK=$(mktemp -d)
    fetch_agent "$WORK/chatops_agent.py"
    prepare_config
    # Everything is checked: from here on each change is written down, and
    # any failure puts back what was changed (undo, from on_exit).
    note_before
    : >"$WORK/undo"
    UNDO=1
    create_user
    make_dir "$APP_DIR"
    install_file "$WORK/chatops_agent.py" "$APP_DIR/chatops_agent.py" 0755
    install_python_deps
    # What the unit runs, as seen from inside the installed system.
    PYTHON_PATH=${PYTHON#"$ROOT"}
    [ "$PYTHON" = python3 ] && PYTHON_PATH=$(command -v python3)
    make_state_dir
    install_config
    write_unit
    start_service
    info "to see what the agent sees (the API, the key, the spool), as it runs:"
    info "  $(agent_command --check)"
    # The last line says whether this run changed anything (Ansible's role
    # reads it): the program, its venv, the user, the config or the unit.
    if [ "$CHANGED" = 1 ]; then info "changed"; else info "nothing changed"; fi
}

# What there was before this run, for undo.
note_before() {
    FRESH=1
    for path in "$APP_DIR" "$CONFIG" "$UNIT_DIR/$NAME.service"; do
        [ -n "$path" ] && [ -e "$path" ] && FRESH=0
    done
    WAS_ACTIVE=0
    WAS_ENABLED=0
    if [ "$SYSTEMD" = 1 ]; then
        systemctl is-active --quiet "$NAME.service" && WAS_ACTIVE=1
        systemctl is-enabled --quiet "$NAME.service" 2>/dev/null && WAS_ENABLED=1
    fi
    return 0
}

do_uninstall() {
    if [ "$SYSTEM" = 1 ] && [ -z "$ROOT" ] && command -v systemctl >/dev/null 2>&1; then
        run systemctl disable --now "$NAME.service" 2>/dev/null || true
    fi
    [ -n "$UNIT_DIR" ] && run rm -rf "$UNIT_DIR/$NAME.service" "$UNIT_DIR/$NAME.service.d"
    [ -n "$UNIT_DIR" ] && [ -z "$ROOT" ] && command -v systemctl >/dev/null 2>&1 &&
        run systemctl daemon-reload
    run rm -rf "$APP_DIR"
    if [ "$MODE" = purge ]; then
        run rm -rf "$CONF_DIR"
        [ -n "$STATE_DIR" ] && run rm -rf "$ROOT$STATE_DIR"
        if [ "$SYSTEM" = 1 ] && grep -q "^$NAME:" "$ROOT/etc/passwd" 2>/dev/null; then
            if [ -n "$ROOT" ]; then run userdel --root "$ROOT" "$NAME"; else run userdel "$NAME"; fi
        fi
        info "chatops-agent, its configuration, its undelivered samples and its user are removed"
    else
        info "chatops-agent is removed; its configuration stays in $CONF_DIR${STATE_DIR:+ and its undelivered samples in $STATE_DIR} (--purge removes them)"
    fi
}

# --prepare-offline DIR: the agent, this script, the wheels for the common Linux
# platforms, and SHA256SUMS. Made in a directory beside DIR and renamed into
# place at the end, so that a failure leaves no partial bundle.
do_prepare() {
    command -v python3 >/dev/null 2>&1 ||
        die "$E_PYTHON" "python3 is needed to prepare a bundle (apt-get install python3)"
    python3 -m pip --version >/dev/null 2>&1 ||
        die "$E_PYTHON" "python3 has no pip, which fetches the websocket-client wheel:" \
            "apt-get install python3-pip (Debian/Ubuntu; dnf install python3-pip on" \
            "Fedora/RHEL), then re-run"
    if [ -e "$PREPARE_DIR" ] && ! [ -f "$PREPARE_DIR/SHA256SUMS" ] &&
        [ -n "$(ls -A "$PREPARE_DIR" 2>/dev/null)" ]; then
        die "$E_USAGE" "$PREPARE_DIR is not empty and not a bundle: name a new directory"
    fi
    parent=$(dirname "$PREPARE_DIR")
    if ! [ -d "$parent" ] || ! [ -w "$parent" ]; then
        die "$E_USAGE" "cannot write a bundle in $parent: name a directory you can write"
    fi
    WORK=$(mktemp -d "$parent/.chatops-bundle.XXXXXX")
    bundle=$WORK/bundle
    mkdir -p "$bundle/wheels"
    fetch_agent "$bundle/chatops_agent.py"
    here=$(script_dir)
    if [ -n "$here" ] && [ -f "$here/install.sh" ]; then
        cp "$here/install.sh" "$bundle/install.sh"
    else
        need_base_url
        download "$BASE_URL/install.sh" "$bundle/install.sh" ||
            die "$E_SOURCE" "cannot download $BASE_URL/install.sh"
    fi
    # The pinned websocket-client (pure Python: one wheel for every Python),
    # checked against its pinned hash.
    pinned_requirement >"$WORK/pinned.txt"
    python3 -m pip download -q --disable-pip-version-check --no-deps --require-hashes \
        --only-binary=:all: --python-version 3.8 -d "$bundle/wheels" -r "$WORK/pinned.txt" >&2 ||
        die "$E_SOURCE" "pip could not download the websocket-client wheel (see above):" \
            "this needs PyPI, or pip's own index settings"
    (cd "$bundle" && find . -type f | LC_ALL=C sort | sed 's#^\./##' |
        xargs sha256sum) >"$WORK/SHA256SUMS"
    mv "$WORK/SHA256SUMS" "$bundle/SHA256SUMS"
    if [ "$DRY_RUN" = 1 ]; then
        printf 'dry-run: write the bundle to %s\n' "$PREPARE_DIR" >&2
        return
    fi
    rm -rf "$PREPARE_DIR"
    mv "$bundle" "$PREPARE_DIR"
    info "bundle ready in $PREPARE_DIR: chatops-agent $(agent_version "$PREPARE_DIR/chatops_agent.py")" \
        "and websocket-client $WEBSOCKET_CLIENT_VERSION (the version CI tests it with)."
    info "Copy it over and run sh install.sh --offline DIR, or publish it for --base-url"
}

main() {
    WORK=
    UNDO=0
    trap on_exit EXIT
    parse_args "$@"
    set_paths
    case $MODE in
    install) do_install ;;
    prepare) do_prepare ;;
    uninstall | purge) do_uninstall ;;
    esac
}

main "$@"
