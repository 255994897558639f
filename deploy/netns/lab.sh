#!/usr/bin/env bash
# A lab of N "hosts" on this machine: network namespaces joined by one bridge, for multi-host tests.
#
# Layout (lab name LAB, default "rpbx"; set RPBX_LAB=rpbx-something to run several labs side by side):
#   - host i is the namespace LAB-hI with one interface eth0 (MAC 02:52:50:00:00:II), address
#     198.51.100.(10+i)/24 (RFC 5737 documentation range), loopback up, IPv6 off, NO default route:
#     the only reachable addresses are the other hosts of the lab, nothing can leave the machine;
#   - the switch is the namespace LAB-br0 holding the bridge br0; host i's veth peer there is hI.
#   Nothing is created in the root namespace, so destroying the namespaces removes every link.
#
# Faults:
#   - partition: nftables rules (bridge family, forward hook) in the switch namespace that drop frames
#     between the bridge ports of the chosen hosts, like a managed switch cutting links. They match
#     ports, not addresses, so they also cut ARP, broadcasts and any floating address a host adds.
#   - netem: `tc qdisc replace dev eth0 root netem ...` inside the host: delays, loses or reorders the
#     packets the HOST SENDS (its egress). Kernels built without sch_netem (some VMs) get the same
#     effect from netem_relay.py: the host's switch port is moved off the bridge and a relay in the
#     switch namespace forwards its frames to the bridge through a veth pair qI/rI with the delay,
#     loss and reordering asked for.
#   - heal removes every partition rule, qdisc and relay; the lab stays up.
#
# Idempotent: `create N` twice gives the same lab (hosts beyond N are removed); `destroy` on nothing is
# fine. Every process still running in a lab namespace is killed by destroy (they are lab processes).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LAB="${RPBX_LAB:-rpbx}"
SUBNET_PREFIX="198.51.100"
SW="$LAB-br0"
TABLE="rpbx_lab"
RUN_DIR="/run/rpbx-lab/$LAB"
PYTHON="${RPBX_LAB_PYTHON:-python3}"

usage() {
    cat <<EOF
usage: lab.sh COMMAND ...   (lab name: \$RPBX_LAB, default rpbx; must start with "rpbx")
  create N                       hosts $LAB-h1..hN at $SUBNET_PREFIX.11.., switch $SW
  list                           hosts, addresses and active faults
  destroy                        remove the lab (idempotent), killing processes left in it
  exec HOST CMD...               run CMD inside HOST (h1, 1 or $LAB-h1)
  partition A,B... [--from X,Y...] [--oneway]
                                 cut the links between hosts A,B... and hosts X,Y... (default: every
                                 other host), both directions; --oneway drops only A,B... -> X,Y...
  netem HOST ARGS...             netem on HOST's egress, e.g. netem h1 delay 50ms 5ms loss 5% reorder 25%
  heal                           remove every fault
environment: RPBX_LAB_RTO_MIN=20ms (create) gives the hosts' subnet route that TCP minimum retransmission
  timeout (Linux default 200 ms, longer than Raft's 0.15-0.3 s election timeout); RPBX_LAB_NETEM=relay
  forces the user-space netem relay
EOF
}

die() { echo "lab.sh: $*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root: network namespaces, veths and nftables need CAP_NET_ADMIN (try: sudo $0 $*)"
    command -v ip >/dev/null || die "ip not found (Debian: apt-get install iproute2)"
}

check_name() {
    [[ "$LAB" =~ ^rpbx(-[a-z0-9]+)*$ ]] || die "lab name '$LAB' must match rpbx(-[a-z0-9]+)* (namespaces are named after it)"
}

ns_exists() { [ -e "/run/netns/$1" ]; }
# Alive and not a zombie: kill -0 succeeds on a zombie, and an init that reaps slowly (some containers'
# pid 1 never does) would make every heal wait out the 2.5 s bound for relays that exited long ago.
running() {
    local state
    state="$(sed -n 's/^State:[[:space:]]*\(.\).*/\1/p' "/proc/$1/status" 2>/dev/null)"
    [ -n "$state" ] && [ "$state" != Z ]
}
in_ns() { local ns="$1"; shift; ip netns exec "$ns" "$@"; }

# Host indices of the lab, ascending.
host_indices() {
    local name
    for name in $(ip netns list 2>/dev/null | awk '{print $1}'); do
        if [[ "$name" =~ ^${LAB}-h([0-9]+)$ ]]; then echo "${BASH_REMATCH[1]}"; fi
    done | sort -n
}

# h3, 3 or LAB-h3 -> 3
host_index() {
    local h="$1"
    h="${h#"$LAB"-}"
    h="${h#h}"
    [[ "$h" =~ ^[0-9]+$ ]] || die "bad host name '$1' (expected h1, 1 or $LAB-h1)"
    ns_exists "$LAB-h$h" || die "no host $LAB-h$h (create the lab first: lab.sh create N)"
    echo "$h"
}

mac_of() { printf '02:52:50:00:00:%02x' "$1"; }

ensure_ns() {
    local ns="$1"
    ns_exists "$ns" || ip netns add "$ns"
    in_ns "$ns" ip link set lo up
    in_ns "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 >/dev/null
}

create() {
    local n="${1:-}"
    [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 200 ] || die "create: N must be 1..200"
    ensure_ns "$SW"
    in_ns "$SW" ip link show br0 >/dev/null 2>&1 || in_ns "$SW" ip link add br0 type bridge
    in_ns "$SW" ip link set br0 up
    local i ns
    for i in $(host_indices); do
        [ "$i" -le "$n" ] || remove_host "$i"
    done
    for ((i = 1; i <= n; i++)); do
        ns="$LAB-h$i"
        ensure_ns "$ns"
        if ! in_ns "$ns" ip link show eth0 >/dev/null 2>&1; then
            in_ns "$SW" ip link del "h$i" 2>/dev/null || true
            in_ns "$ns" ip link add eth0 address "$(mac_of "$i")" type veth peer name "h$i" netns "$SW"
        fi
        if ! in_ns "$SW" ip link show "r$i" >/dev/null 2>&1; then  # not behind a netem relay
            in_ns "$SW" ip link set "h$i" master br0
        fi
        in_ns "$SW" ip link set "h$i" up
        in_ns "$ns" ip addr replace "$SUBNET_PREFIX.$((10 + i))/24" dev eth0
        in_ns "$ns" ip link set eth0 up
        # No default route, ever: only the lab subnet is reachable.
        in_ns "$ns" ip route del default 2>/dev/null || true
        if [ -n "${RPBX_LAB_RTO_MIN:-}" ]; then
            # Experiment knob: TCP's minimum retransmission timeout on the lab subnet (Linux default 200 ms).
            in_ns "$ns" ip route replace "$SUBNET_PREFIX.0/24" dev eth0 proto kernel scope link \
                src "$SUBNET_PREFIX.$((10 + i))" rto_min "$RPBX_LAB_RTO_MIN"
        fi
    done
}

remove_host() {
    local i="$1"
    stop_relay "$i"
    kill_ns_pids "$LAB-h$i"
    ip netns del "$LAB-h$i" 2>/dev/null || true
    in_ns "$SW" ip link del "h$i" 2>/dev/null || true
}

kill_ns_pids() {
    local ns="$1" pids pid
    ns_exists "$ns" || return 0
    pids="$(ip netns pids "$ns" 2>/dev/null || true)"
    [ -n "$pids" ] || return 0
    for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 50); do  # up to 5 s for a graceful exit, then SIGKILL
        pids="$(ip netns pids "$ns" 2>/dev/null || true)"
        [ -n "$pids" ] || return 0
        sleep 0.1
    done
    for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
}

destroy() {
    local i
    for i in $(host_indices); do remove_host "$i"; done
    if ns_exists "$SW"; then
        kill_ns_pids "$SW"
        ip netns del "$SW"
    fi
    rm -rf "$RUN_DIR"
}

list() {
    ns_exists "$SW" || { echo "no lab $LAB"; return 0; }
    local i
    echo "lab $LAB (switch namespace $SW)"
    for i in $(host_indices); do
        printf '  h%-3s %-18s %s  %s\n' "$i" "$LAB-h$i" "$SUBNET_PREFIX.$((10 + i))" "$(mac_of "$i")"
    done
    local rules
    rules="$(in_ns "$SW" nft list table bridge "$TABLE" 2>/dev/null | grep -E 'iifname' || true)"
    [ -z "$rules" ] || { echo "partition rules:"; echo "$rules" | sed 's/^[[:space:]]*/  /'; }
    for i in $(host_indices); do
        local q
        q="$(in_ns "$LAB-h$i" tc qdisc show dev eth0 2>/dev/null | grep netem || true)"
        [ -z "$q" ] || echo "netem h$i: $q"
        [ ! -f "$RUN_DIR/relay-h$i.args" ] || echo "netem h$i (relay): $(cat "$RUN_DIR/relay-h$i.args")"
    done
}

# Names of host i's port(s) on the switch: hI, and rI while a netem relay stands between.
ports_of() { echo "\"h$1\", \"r$1\""; }

partition() {
    local side_a="" side_b="" oneway=0
    while [ $# -gt 0 ]; do
        case "$1" in
            --from) side_b="${2:-}"; [ -n "$side_b" ] || die "partition: --from needs hosts"; shift 2 ;;
            --oneway) oneway=1; shift ;;
            -*) die "partition: unknown option $1" ;;
            *) [ -z "$side_a" ] || die "partition: give the hosts as one comma-separated list"; side_a="$1"; shift ;;
        esac
    done
    [ -n "$side_a" ] || die "partition: which hosts? (e.g. partition h1 or partition h1,h2 --from h3)"
    local -a a=() b=()
    local h i
    IFS=, read -ra hs <<<"$side_a"
    for h in "${hs[@]}"; do a+=("$(host_index "$h")"); done
    if [ -n "$side_b" ]; then
        IFS=, read -ra hs <<<"$side_b"
        for h in "${hs[@]}"; do b+=("$(host_index "$h")"); done
    else
        for i in $(host_indices); do
            [[ " ${a[*]} " == *" $i "* ]] || b+=("$i")
        done
    fi
    [ ${#b[@]} -gt 0 ] || die "partition: nothing on the other side"
    command -v nft >/dev/null || die "nft not found (Debian: apt-get install nftables)"
    in_ns "$SW" nft add table bridge "$TABLE"
    in_ns "$SW" nft add chain bridge "$TABLE" cut '{ type filter hook forward priority 0; policy accept; }'
    local x y
    for x in "${a[@]}"; do
        for y in "${b[@]}"; do
            [ "$x" != "$y" ] || die "partition: h$x is on both sides"
            in_ns "$SW" nft add rule bridge "$TABLE" cut iifname "{ $(ports_of "$x") }" oifname "{ $(ports_of "$y") }" drop
            [ "$oneway" -eq 1 ] || in_ns "$SW" nft add rule bridge "$TABLE" cut iifname "{ $(ports_of "$y") }" oifname "{ $(ports_of "$x") }" drop
        done
    done
}

kernel_has_netem() {
    # Probe on the switch's own bridge: adding then removing a netem qdisc touches no host.
    if in_ns "$SW" tc qdisc add dev br0 root netem delay 0ms 2>/dev/null; then
        in_ns "$SW" tc qdisc del dev br0 root 2>/dev/null || true
        return 0
    fi
    return 1
}

netem() {
    local i
    i="$(host_index "${1:-}")"; shift
    [ $# -gt 0 ] || die "netem: give netem arguments, e.g. delay 50ms loss 5%"
    if [ "${RPBX_LAB_NETEM:-auto}" != "relay" ] && kernel_has_netem; then
        in_ns "$LAB-h$i" tc qdisc replace dev eth0 root netem "$@"
        return 0
    fi
    start_relay "$i" "$@"
}

start_relay() {
    local i="$1"; shift
    stop_relay "$i"
    mkdir -p "$RUN_DIR"
    in_ns "$SW" ip link add "r$i" type veth peer name "q$i"
    in_ns "$SW" ip link set "r$i" up
    in_ns "$SW" ip link set "q$i" up
    printf '%s\n' "$*" >"$RUN_DIR/relay-h$i.args"
    # The relay checks its arguments and opens its sockets before it writes "ready". It already reads hI
    # while hI is still on the bridge (what it forwards leaves rI, which is on no bridge yet, and is
    # dropped), so the swap below is the only moment the host is off the switch: one `ip -batch`, not the
    # relay's start-up time.
    local ready="$RUN_DIR/relay-h$i.ready"
    rm -f "$ready"
    setsid ip netns exec "$SW" "$PYTHON" "$HERE/netem_relay.py" --host-port "h$i" --bridge-port "q$i" \
        --ready-file "$ready" -- "$@" </dev/null >>"$RUN_DIR/relay-h$i.log" 2>&1 &
    echo $! >"$RUN_DIR/relay-h$i.pid"
    for _ in $(seq 1 100); do
        if [ -f "$ready" ]; then
            printf 'link set h%s nomaster\nlink set r%s master br0\n' "$i" "$i" | in_ns "$SW" ip -batch -
            return 0
        fi
        running "$(cat "$RUN_DIR/relay-h$i.pid")" || break
        sleep 0.05
    done
    local log
    log="$(tail -5 "$RUN_DIR/relay-h$i.log" 2>/dev/null || true)"
    stop_relay "$i"
    die "netem: the relay for h$i did not start: $log"
}

stop_relay() {
    local i="$1" pidf="$RUN_DIR/relay-h$i.pid"
    # Host port back on the bridge first (one `ip -batch`), then stop the relay: the host is never off the
    # switch for longer than the swap.
    if ns_exists "$SW" && in_ns "$SW" ip link show "r$i" >/dev/null 2>&1; then
        printf 'link set r%s nomaster\nlink set h%s master br0\n' "$i" "$i" | in_ns "$SW" ip -batch - || true
    fi
    if [ -f "$pidf" ]; then
        local pid
        pid="$(cat "$pidf")"
        # Only our relay: its command line names netem_relay.py and this host's port.
        if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "netem_relay.py --host-port h$i "; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do running "$pid" || break; sleep 0.05; done
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$pidf"
    fi
    rm -f "$RUN_DIR/relay-h$i.args" "$RUN_DIR/relay-h$i.ready"
    ns_exists "$SW" || return 0
    in_ns "$SW" ip link del "r$i" 2>/dev/null || true
    if in_ns "$SW" ip link show "h$i" >/dev/null 2>&1; then
        in_ns "$SW" ip link set "h$i" master br0
    fi
}

heal() {
    ns_exists "$SW" || return 0
    in_ns "$SW" nft delete table bridge "$TABLE" 2>/dev/null || true
    local i
    for i in $(host_indices); do
        in_ns "$LAB-h$i" tc qdisc del dev eth0 root 2>/dev/null || true
        stop_relay "$i"
    done
}

main() {
    local cmd="${1:-}"
    case "$cmd" in
        ""|-h|--help|help) usage; [ -n "$cmd" ] || exit 2; exit 0 ;;
    esac
    shift
    check_name
    need_root "$cmd" "$@"
    case "$cmd" in
        create) create "$@" ;;
        list) list ;;
        destroy) destroy ;;
        exec)
            [ $# -ge 2 ] || die "exec: usage: exec HOST CMD..."
            local i
            i="$(host_index "$1")"; shift
            exec ip netns exec "$LAB-h$i" "$@" ;;
        partition) partition "$@" ;;
        netem) netem "$@" ;;
        heal) heal ;;
        *) usage >&2; exit 2 ;;
    esac
}

main "$@"
