#!/bin/sh
# Host side of deploy.sh: copied to PREFIX/host.sh with host.env, the wheels, the node's config and the
# credentials in PREFIX/stage; run over ssh as `sh PREFIX/host.sh COMMAND ID`. POSIX sh, root (or sudo -n).
#
#   install ID          venv at PREFIX/venv (created once, without pip: pip runs from its wheel), packages
#                       from PREFIX/stage/wheels only (the host needs no index), config and credentials to
#                       CONFIG_DIR (secret and token mode 0600), data dir mode 0700, systemd unit
#   start ID [bootstrap | join TOKEN]  start the node unless it runs; `bootstrap` only for a brand-new
#                       cluster, `join TOKEN` for a node just added with add-node (its first start)
#   stop ID | restart ID | running ID | dropin ID (print the systemd drop-in install writes)
#   is-new ID           exit 0 when the data dir has never been used (no identity marker)
#   finish ID           forget the first-start bootstrap or join setting
#   add-node URL ID RAFT ADMIN_URL  (prints the join token) | remove-node URL ID   (through the node at URL)
#   wait-healthy URL [N] | leader URL | caught-up ID URL   (deploy/ssh/clusterwait.py, the host's token)
#   status URL          `raftpbx admin cluster status`;  log ID: the node's last log lines
#
# Modes (MODE in host.env: auto, yes, no): systemd (unit raftpbx@ID, user raftpbx) when the host runs
# systemd (auto) or MODE=yes; otherwise the fallback: the node runs
# as the ssh user under setsid, pid file RUN_DIR/ID.pid, log RUN_DIR/ID.log (hosts without systemd,
# such as the network-namespace lab).
set -eu

HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=/dev/null
. "$HERE/host.env"  # PREFIX CONFIG_DIR DATA_DIR RUN_DIR PYTHON MODE (auto | yes | no) SERVICE_MODE
case "$MODE" in
    yes) MODE=systemd ;;
    no) MODE=fallback ;;
    *) if [ -d /run/systemd/system ]; then MODE=systemd; else MODE=fallback; fi ;;
esac

if [ "$(id -u)" -ne 0 ]; then
    exec sudo -n sh "$0" "$@"
fi

die() { echo "host.sh: $*" >&2; exit 1; }

CMD="${1:-}"
ID="${2:-}"
UNIT="raftpbx@$ID.service"
CONFIG="$CONFIG_DIR/$ID.toml"
PIDFILE="$RUN_DIR/$ID.pid"
LOGFILE="$RUN_DIR/$ID.log"

install_files() {
    stage="$PREFIX/stage"
    mkdir -p "$PREFIX" "$CONFIG_DIR" "$DATA_DIR"
    if [ "$MODE" = systemd ] && ! id raftpbx >/dev/null 2>&1; then
        useradd --system --home-dir /var/lib/raftpbx --no-create-home --shell /usr/sbin/nologin raftpbx
    fi
    if [ ! -x "$PREFIX/venv/bin/python" ]; then
        "$PYTHON" -m venv --without-pip "$PREFIX/venv"
    fi
    pipwheel="$(ls "$stage"/wheels/pip-*.whl 2>/dev/null | head -n1)"
    [ -n "$pipwheel" ] || die "no pip wheel in $stage/wheels"
    # The host's pip configuration (indexes, constraints) must not change what the wheels install.
    export PIP_CONFIG_FILE=/dev/null
    pip="$PREFIX/venv/bin/python $pipwheel/pip"
    appwheel="$(ls "$stage"/wheels/raftpbx-*.whl | head -n1)"
    # Dependencies, then the application itself (reinstalled even when its version did not change).
    $pip install -q --no-index --find-links "$stage/wheels" --disable-pip-version-check "$appwheel"
    $pip install -q --no-index --no-deps --force-reinstall --disable-pip-version-check "$appwheel"
    owner=root
    [ "$MODE" != systemd ] || owner=raftpbx
    umask 077
    for f in secret token; do
        install -m 0600 -o "$owner" "$stage/$f" "$CONFIG_DIR/$f"
    done
    install -m 0600 -o "$owner" "$stage/$ID.toml" "$CONFIG"
    rm -rf "$stage/secret" "$stage/token" "$stage/wheels"
    # Service-address hooks (ip mode runs PREFIX/hooks/service-address): root-owned, not writable by the
    # node's user, so the node cannot change what it later runs with CAP_NET_ADMIN.
    if [ -d "$stage/hooks" ]; then
        mkdir -p "$PREFIX/hooks"
        for hook in "$stage"/hooks/*; do
            install -m 0755 -o root -g root "$hook" "$PREFIX/hooks/$(basename "$hook")"
        done
    fi
    chown "$owner" "$DATA_DIR"
    chmod 0700 "$DATA_DIR"  # the journal holds password-equivalent HA1 digests
    "$PREFIX/venv/bin/raftpbx" node --config "$CONFIG" --check >/dev/null
    if [ "$MODE" = systemd ]; then
        install -m 0644 "$stage/raftpbx@.service" /etc/systemd/system/raftpbx@.service
        dropin=/etc/systemd/system/raftpbx@.service.d
        mkdir -p "$dropin"
        dropin_text >"$dropin/deploy.conf"
        systemctl daemon-reload
        systemctl enable -q "$UNIT"
    fi
}

# The unit's drop-in: this prefix, config dir and data dir; in ip service-address mode, the capabilities
# its hook needs: adding and removing the floating address (netlink, CAP_NET_ADMIN) and announcing it with
# a gratuitous ARP (a packet socket, CAP_NET_RAW). Other modes keep the unit's empty capability sets.
dropin_text() {
    echo "[Service]"
    echo "ExecStart="
    echo "ExecStart=$PREFIX/venv/bin/raftpbx node --config $CONFIG_DIR/%i.toml"
    echo "EnvironmentFile=-$CONFIG_DIR/%i.env"
    [ "$DATA_DIR" = /var/lib/raftpbx ] || echo "ReadWritePaths=$DATA_DIR"
    if [ "${SERVICE_MODE:-none}" = ip ]; then
        echo "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW"
        echo "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW"
        echo "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK AF_PACKET"
    fi
}

alive() {
    kill -0 "$1" 2>/dev/null && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

pid_running() {
    [ -f "$PIDFILE" ] || return 1
    pid="$(cat "$PIDFILE")"
    # Ours only: the process's command line names this node's config.
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "--config $CONFIG" || return 1
    alive "$pid"
}

running() {
    if [ "$MODE" = systemd ]; then
        systemctl is-active -q "$UNIT"
    else
        pid_running
    fi
}

start() {
    how="${1:-}"
    token="${2:-}"
    if running; then
        return 0
    fi
    case "$how" in
        ""|bootstrap) ;;
        join) [ -n "$token" ] || die "start $ID join: no join token" ;;
        *) die "start: unknown first-start setting '$how'" ;;
    esac
    if [ "$MODE" = systemd ]; then
        # The first-start setting lives in ID.env (0600: the join token) until `finish` removes it.
        case "$how" in
            bootstrap) (umask 077; echo "RAFTPBX_RAFT_BOOTSTRAP=true" >"$CONFIG_DIR/$ID.env") ;;
            join) (umask 077; printf 'RAFTPBX_RAFT_JOIN=true\nRAFTPBX_RAFT_JOIN_TOKEN=%s\n' "$token" >"$CONFIG_DIR/$ID.env") ;;
        esac
        systemctl start "$UNIT"
        return 0
    fi
    mkdir -p "$RUN_DIR"
    set --
    case "$how" in
        bootstrap) set -- --bootstrap ;;
        join) set -- --join --join-token "$token" ;;
    esac
    setsid "$PREFIX/venv/bin/raftpbx" node --config "$CONFIG" "$@" </dev/null >>"$LOGFILE" 2>&1 &
    echo $! >"$PIDFILE"
}

stop() {
    if [ "$MODE" = systemd ]; then
        systemctl stop "$UNIT"
        return 0
    fi
    pid_running || { rm -f "$PIDFILE"; return 0; }
    pid="$(cat "$PIDFILE")"
    kill -TERM "$pid" 2>/dev/null || true
    i=0
    while alive "$pid" && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done  # 20 s
    if alive "$pid"; then
        echo "host.sh: $ID did not stop within 20 s; SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDFILE"
}

case "$CMD" in
    install) install_files ;;
    start) start "${3:-}" "${4:-}" ;;
    stop) stop ;;
    restart) stop; start ;;
    running) running ;;
    dropin) dropin_text ;;
    is-new) [ ! -e "$DATA_DIR/raftpbx-node.json" ] ;;
    finish) rm -f "$CONFIG_DIR/$ID.env" ;;
    wait-healthy)
        "$PYTHON" "$HERE/clusterwait.py" healthy --url "$2" --token-file "$CONFIG_DIR/token" ${3:+--expect "$3"}
        "$PREFIX/venv/bin/raftpbx" admin --url "$2" --token-file "$CONFIG_DIR/token" cluster status ;;
    leader)
        "$PYTHON" "$HERE/clusterwait.py" leader --url "$2" --token-file "$CONFIG_DIR/token" --timeout 30 ;;
    add-node)
        # $2 URL, $3 ID, $4 RAFT, $5 ADMIN_URL: print the new member's single-use join token.
        "$PREFIX/venv/bin/raftpbx" admin --url "$2" --token-file "$CONFIG_DIR/token" --json cluster add-node "$3" \
            --raft "$4" --admin-url "$5" | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["token"])' ;;
    remove-node)
        "$PREFIX/venv/bin/raftpbx" admin --url "$2" --token-file "$CONFIG_DIR/token" cluster remove-node "$3" ;;
    status)
        "$PREFIX/venv/bin/raftpbx" admin --url "$2" --token-file "$CONFIG_DIR/token" cluster status ;;
    caught-up)
        "$PYTHON" "$HERE/clusterwait.py" caught-up --node "$ID" --url "$3" --token-file "$CONFIG_DIR/token" ;;
    log)
        if [ "$MODE" = systemd ]; then journalctl -u "$UNIT" -n 30 --no-pager; else tail -n 30 "$LOGFILE"; fi ;;
    *) die "unknown command '$CMD'" ;;
esac
