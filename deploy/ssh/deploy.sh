#!/usr/bin/env bash
# Deploy a raftpbx cluster onto real hosts over ssh, and restart it one node at a time.
#
#   deploy.sh INVENTORY [deploy]        build, install on every host, configure, start, wait until healthy
#   deploy.sh INVENTORY upgrade         build and install the new version everywhere, then rolling-restart
#   deploy.sh INVENTORY rolling-restart restart one node at a time (followers first, the leader last),
#                                       each time waiting until the node is back, healthy and caught up
#                                       (applied index equal to the leader's, equal state digest)
#   deploy.sh INVENTORY replace ID      a node whose disk is gone (empty data dir): install it, remove it from
#                                       the cluster, add it back (new join token), start it with --join and
#                                       wait until it caught up; refused when its data dir is not empty
#   deploy.sh INVENTORY build           only build the wheels into OUT/wheels (e.g. on a machine with an
#                                       index; then deploy from another with RAFTPBX_WHEELS_READY=1)
#   deploy.sh INVENTORY status | stop
#
# INVENTORY is the TOML file deploy/gen_configs.py reads (see deploy/inventory.example.toml).
# Environment:
#   RAFTPBX_DEPLOY_OUT   where generated configs, credentials, wheels and logs go
#                        (default: ./deploy-out/<inventory name>); keep it: it holds the cluster secret
#                        and the admin token (mode 0600), reused by later runs
#   RAFTPBX_SSH_CONFIG   an ssh_config file (ssh -F): identity, known hosts, jump hosts...
#   RAFTPBX_WHEELHOUSE   a folder of dependency wheels (pip included) for hosts without an index;
#                        without it, `pip wheel` fetches the dependencies on this machine
#   RAFTPBX_SOURCE       the raftpbx source tree to build (default: this checkout)
#   RAFTPBX_WHEELS_READY=1  deploy the wheels already in OUT/wheels instead of building
#   PYTHON               local interpreter with pip and setuptools (default: the checkout's .venv, else python3)
#
# On each host (over ssh, as root or a user with passwordless sudo): a venv at PREFIX/venv, configs and
# credentials in CONFIG_DIR (secret and token mode 0600), state in DATA_DIR (mode 0700), and either the
# systemd unit raftpbx@ID (user raftpbx) or, without systemd, the node under setsid with a pid file.
# A brand-new cluster is started with --bootstrap (every data dir empty); a mix of empty and used data
# dirs is refused: a node with an empty data dir joins through `raftpbx admin cluster add-node`.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEPLOY="$(dirname "$HERE")"
REPO="$(dirname "$DEPLOY")"

die() { echo "deploy.sh: $*" >&2; exit 1; }
say() { echo "deploy.sh: $*" >&2; }

[ $# -ge 1 ] || { sed -n '2,10p' "$0" >&2; exit 2; }
INVENTORY="$1"
ACTION="${2:-deploy}"
[ -f "$INVENTORY" ] || die "no inventory file $INVENTORY"
name="$(basename "$INVENTORY")"
OUT="${RAFTPBX_DEPLOY_OUT:-./deploy-out/${name%.*}}"
SOURCE="${RAFTPBX_SOURCE:-$REPO}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
SSH=(ssh -o BatchMode=yes -o ConnectTimeout=10)
[ -z "${RAFTPBX_SSH_CONFIG:-}" ] || SSH+=(-F "$RAFTPBX_SSH_CONFIG")

declare -a IDS=() TARGETS=() PORTS=() PREFIXES=() URLS=()
declare -A ENVS=()

load_plan() {
    mkdir -p "$OUT"
    chmod 0700 "$OUT"
    "$PYTHON" "$DEPLOY/gen_configs.py" "$INVENTORY" "$OUT" >/dev/null
    local id ssh port prefix config_dir data_dir run_dir python systemd url service_mode
    while IFS=$'\t' read -r id ssh port prefix config_dir data_dir run_dir python systemd url service_mode; do
        IDS+=("$id"); TARGETS+=("$ssh"); PORTS+=("$port"); PREFIXES+=("$prefix"); URLS+=("$url")
        ENVS[$id]="PREFIX=$prefix
CONFIG_DIR=$config_dir
DATA_DIR=$data_dir
RUN_DIR=$run_dir
PYTHON=$python
MODE=$systemd
SERVICE_MODE=$service_mode"
    done <"$OUT/hosts.tsv"
}

# on INDEX COMMAND [ARGS...]: run host.sh COMMAND on host INDEX.
on() {
    local i="$1"; shift
    "${SSH[@]}" -p "${PORTS[$i]}" "${TARGETS[$i]}" -- sh "${PREFIXES[$i]}/stage/host.sh" "$@"
}

build() {
    local wheels="$OUT/wheels" tmp
    if [ "${RAFTPBX_WHEELS_READY:-}" = 1 ]; then
        ls "$wheels"/raftpbx-*.whl >/dev/null 2>&1 || die "RAFTPBX_WHEELS_READY=1 but no raftpbx wheel in $wheels (run: deploy.sh INVENTORY build)"
        say "using the wheels in $wheels"
        return 0
    fi
    rm -rf "$wheels"
    mkdir -p "$wheels"
    tmp="$(mktemp -d)"
    # Build from a copy, so the source tree gets no build/ folder.
    if git -C "$SOURCE" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        (cd "$SOURCE" && git ls-files -z --cached --others --exclude-standard |
            tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -C "$tmp" -xf -
    else
        cp -a "$SOURCE/." "$tmp/"
    fi
    say "building the raftpbx wheel"
    # The usual isolated build (pip fetches setuptools and wheel from the index); without an index, the
    # local interpreter's own setuptools and wheel.
    if ! "$PYTHON" -m pip wheel -q --no-deps -w "$wheels" "$tmp" >"$OUT/build.log" 2>&1 &&
        ! "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$wheels" "$tmp" >>"$OUT/build.log" 2>&1; then
        tail -20 "$OUT/build.log" >&2
        rm -rf "$tmp"
        die "building the wheel failed (log: $OUT/build.log)"
    fi
    if [ -n "${RAFTPBX_WHEELHOUSE:-}" ]; then
        cp "$RAFTPBX_WHEELHOUSE"/*.whl "$wheels/"
    else
        say "fetching dependency wheels (set RAFTPBX_WHEELHOUSE to ship prepared ones)"
        "$PYTHON" -m pip wheel -q -w "$wheels" "$tmp" pip >>"$OUT/build.log" 2>&1 || {
            rm -rf "$tmp"; die "fetching dependencies failed (log: $OUT/build.log)"; }
    fi
    rm -rf "$tmp"
    ls "$wheels"/pip-*.whl >/dev/null 2>&1 || die "no pip wheel among the wheels (the hosts' venvs are made without pip)"
}

install_one() {
    local i="$1" id="${IDS[$1]}" stage
    stage="$(mktemp -d)"
    cp -r "$OUT/wheels" "$stage/wheels"
    cp "$HERE/host.sh" "$HERE/clusterwait.py" "$DEPLOY/systemd/raftpbx@.service" "$stage/"
    [ ! -d "$DEPLOY/hooks" ] || cp -r "$DEPLOY/hooks" "$stage/hooks"
    cp "$OUT/$id.toml" "$OUT/secret" "$OUT/token" "$stage/"
    printf '%s\n' "${ENVS[$id]}" >"$stage/host.env"
    chmod -R go-rwx "$stage"
    # One connection carries everything; the stage folder is private (umask 077).
    tar -C "$stage" -cf - . | "${SSH[@]}" -p "${PORTS[$i]}" "${TARGETS[$i]}" -- \
        "mkdir -p '${PREFIXES[$i]}' && rm -rf '${PREFIXES[$i]}/stage' && (umask 077 && mkdir '${PREFIXES[$i]}/stage') && tar -C '${PREFIXES[$i]}/stage' -xf -"
    rm -rf "$stage"
    on "$i" install "$id"
}

install_all() {
    mkdir -p "$OUT/logs"
    local i failed=0
    declare -a pids=()
    for i in "${!IDS[@]}"; do
        say "installing on ${IDS[$i]} (${TARGETS[$i]})"
        install_one "$i" >"$OUT/logs/${IDS[$i]}.install.log" 2>&1 &
        pids[$i]=$!
    done
    for i in "${!IDS[@]}"; do
        if ! wait "${pids[$i]}"; then
            failed=1
            say "install on ${IDS[$i]} failed:"
            tail -15 "$OUT/logs/${IDS[$i]}.install.log" >&2
        fi
    done
    [ "$failed" -eq 0 ] || die "installation failed (logs in $OUT/logs)"
}

# A reachable host's index, to ask the cluster.
any_host() {
    local i
    for i in "${!IDS[@]}"; do
        if "${SSH[@]}" -p "${PORTS[$i]}" "${TARGETS[$i]}" -- true 2>/dev/null; then echo "$i"; return 0; fi
    done
    die "no host reachable over ssh"
}

start_all() {
    local i new=0 flag=""
    for i in "${!IDS[@]}"; do
        if on "$i" is-new "${IDS[$i]}"; then new=$((new + 1)); fi
    done
    if [ "$new" -eq "${#IDS[@]}" ]; then
        say "every data dir is empty: bootstrapping a new cluster of ${#IDS[@]} nodes"
        flag=bootstrap
    elif [ "$new" -gt 0 ]; then
        die "$new node(s) have an empty data dir but the others do not: a new node must be added with \`raftpbx admin cluster add-node\` and started with --join, and a wiped node removed then added again (see docs/operations.md); refusing to start them as members"
    fi
    for i in "${!IDS[@]}"; do
        on "$i" start "${IDS[$i]}" $flag
    done
    wait_healthy
    if [ -n "$flag" ]; then
        for i in "${!IDS[@]}"; do on "$i" finish "${IDS[$i]}"; done
    fi
}

wait_healthy() {
    local i
    i="$(any_host)"
    say "waiting for a healthy cluster (asking ${IDS[$i]})"
    on "$i" wait-healthy "${URLS[$i]}" "${#IDS[@]}" || {
        for i in "${!IDS[@]}"; do say "log of ${IDS[$i]}:"; on "$i" log "${IDS[$i]}" >&2 || true; done
        die "the cluster did not become healthy"
    }
}

rolling_restart() {
    local i leader order=()
    i="$(any_host)"
    leader="$(on "$i" leader "${URLS[$i]}")" || die "no leader: refusing to restart anything (status: deploy.sh $INVENTORY status)"
    for i in "${!IDS[@]}"; do [ "${IDS[$i]}" = "$leader" ] || order+=("$i"); done
    for i in "${!IDS[@]}"; do [ "${IDS[$i]}" != "$leader" ] || order+=("$i"); done
    for i in "${order[@]}"; do
        say "restarting ${IDS[$i]}$([ "${IDS[$i]}" != "$leader" ] || echo ' (the leader, last)')"
        on "$i" restart "${IDS[$i]}"
        if ! on "$i" caught-up "${IDS[$i]}" "${URLS[$i]}"; then
            on "$i" log "${IDS[$i]}" >&2 || true
            die "${IDS[$i]} did not rejoin and catch up: stopping the rolling restart here (the other nodes were not touched)"
        fi
    done
    wait_healthy
}

replace_node() {
    local id="$1" t="" i l="" leader raft token
    for i in "${!IDS[@]}"; do [ "${IDS[$i]}" != "$id" ] || t="$i"; done
    [ -n "$t" ] || die "replace: no host with id '$id' in $INVENTORY"
    build
    mkdir -p "$OUT/logs"
    say "installing on $id (${TARGETS[$t]})"
    install_one "$t" >"$OUT/logs/$id.install.log" 2>&1 || { tail -15 "$OUT/logs/$id.install.log" >&2; die "install on $id failed"; }
    if ! on "$t" is-new "$id"; then
        die "replace: $id's data dir is not empty. replace is for a node whose disk is gone; a node that kept its data rejoins by itself when started (deploy.sh $INVENTORY). To discard its data on purpose, stop it and empty its data dir first."
    fi
    on "$t" stop "$id"
    for i in "${!IDS[@]}"; do
        [ "$i" != "$t" ] || continue
        if leader="$(on "$i" leader "${URLS[$i]}" 2>/dev/null)"; then break; fi
        leader=""
    done
    [ -n "$leader" ] || die "replace: no leader among the other members: refusing to change the membership"
    for i in "${!IDS[@]}"; do [ "${IDS[$i]}" != "$leader" ] || l="$i"; done
    [ -n "$l" ] && [ "$l" != "$t" ] || die "replace: the cluster names '$leader' as its leader, which is not another host of $INVENTORY"
    raft="$("$PYTHON" -c 'import json, sys; print(next(n["raft"] for n in json.load(open(sys.argv[1]))["nodes"] if n["id"] == sys.argv[2]))' "$OUT/cluster.json" "$id")"
    say "removing $id from the cluster (through the leader, $leader)"
    on "$l" remove-node "${URLS[$l]}" "$id" >&2
    say "adding $id back ($raft)"
    token="$(on "$l" add-node "${URLS[$l]}" "$id" "$raft" "${URLS[$t]}")" || die "add-node $id failed: look at \`cluster members\` before retrying"
    on "$t" start "$id" join "$token"
    if ! on "$t" caught-up "$id" "${URLS[$t]}"; then
        on "$t" log "$id" >&2 || true
        die "$id did not catch up after joining"
    fi
    on "$t" finish "$id"
    wait_healthy
}

load_plan
case "$ACTION" in
    deploy) build; install_all; start_all ;;
    build) build; say "wheels in $OUT/wheels" ;;
    upgrade) build; install_all; rolling_restart ;;
    rolling-restart) rolling_restart ;;
    replace) [ -n "${3:-}" ] || die "replace: which node? (deploy.sh INVENTORY replace ID)"; replace_node "$3" ;;
    status) i="$(any_host)"; on "$i" status "${URLS[$i]}" ;;
    stop) for i in "${!IDS[@]}"; do say "stopping ${IDS[$i]}"; on "$i" stop "${IDS[$i]}"; done ;;
    *) die "unknown action '$ACTION' (deploy, upgrade, rolling-restart, replace ID, build, status, stop)" ;;
esac
