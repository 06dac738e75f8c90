#!/usr/bin/env bash
# Test "hosts" on one machine: Linux network namespaces joined by veth links.
#
#   launch/netns_hosts.sh up     [--hosts N] [--rate RATE] [--burst B] [--latency L] [--prefix P] [--subnet A.B.C]
#   launch/netns_hosts.sh down   [--prefix P]
#   launch/netns_hosts.sh status [--prefix P]
#   launch/netns_hosts.sh addr   HOST [--prefix P]         # prints the host's address
#   launch/netns_hosts.sh exec   HOST CMD [ARGS...]        # HOST: index (0, 1, ...) or namespace name
#                                 (an index uses the prefix in $DS_NETNS_PREFIX, default "ds")
#   launch/netns_hosts.sh check  [--prefix P] [--mb M]     # TCP round trip and throughput h0 -> h1
#
# Layout (nothing is added to the caller's own namespace; every address lives only inside the
# namespaces made here, so the default 10.200.0.0/24 never reaches a real network):
#   2 hosts : P_h0 [eth0 10.200.0.1/24] <-- veth --> [eth0 10.200.0.2/24] P_h1
#   N hosts : P_hI [eth0 10.200.0.(I+1)/24] <-- veth --> [pI] bridge br0 in namespace P_sw
# With --rate (e.g. 1gbit) each host's eth0 gets a `tc tbf` qdisc, so every host sends at most
# RATE (the link is capped in both directions). netem is absent from some kernels, so no delay
# emulation is attempted. `down` removes every namespace with the prefix, so it also cleans up
# after a partial `up`. Needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN) and iproute2 (`ip`, `tc`).
# Inside a host, gloo needs GLOO_SOCKET_IFNAME=eth0 (the host name resolves to nothing there).
# Example: one rank per host
#   launch/netns_hosts.sh up --rate 1gbit
#   launch/netns_hosts.sh exec 1 env GLOO_SOCKET_IFNAME=eth0 python train.py --rank 1 ... &
#   launch/netns_hosts.sh exec 0 env GLOO_SOCKET_IFNAME=eth0 python train.py --rank 0 ...
#   launch/netns_hosts.sh down
set -euo pipefail

PREFIX="${DS_NETNS_PREFIX:-ds}"
HOSTS=2
RATE=""
BURST="256kb"      # >= rate/HZ and >= one 64 KB GSO segment, or tbf drops / stalls big segments
LATENCY="50ms"     # tbf queue bound expressed as time
SUBNET="10.200.0"  # hosts get SUBNET.1 .. SUBNET.N, /24
CHECK_MB=200       # megabytes sent by `check`
PYTHON="${PYTHON:-python3}"

die() { echo "netns_hosts.sh: $*" >&2; exit 1; }

need_tools() {
    command -v ip >/dev/null 2>&1 || die "'ip' not found: install iproute2 (apt-get install -y iproute2)"
    if [[ -n "$RATE" ]]; then
        command -v tc >/dev/null 2>&1 || die "'tc' not found: install iproute2 (apt-get install -y iproute2)"
    fi
}

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

parse_opts() {
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --hosts)   HOSTS="${2:?--hosts needs a value}"; shift 2 ;;
            --rate)    RATE="${2:?--rate needs a value, e.g. 1gbit}"; shift 2 ;;
            --burst)   BURST="${2:?--burst needs a value, e.g. 256kb}"; shift 2 ;;
            --latency) LATENCY="${2:?--latency needs a value, e.g. 50ms}"; shift 2 ;;
            --prefix)  PREFIX="${2:?--prefix needs a value}"; shift 2 ;;
            --subnet)  SUBNET="${2:?--subnet needs a value, e.g. 10.200.0}"; shift 2 ;;
            --mb)      CHECK_MB="${2:?--mb needs a value}"; shift 2 ;;
            -h|--help) usage; exit 0 ;;
            *) die "unknown option '$1' (allowed: --hosts --rate --burst --latency --prefix --subnet --mb)" ;;
        esac
    done
    [[ "$HOSTS" =~ ^[0-9]+$ ]] && (( HOSTS >= 2 && HOSTS <= 250 )) \
        || die "--hosts must be an integer in [2, 250], got '$HOSTS'"
    [[ "$PREFIX" =~ ^[A-Za-z0-9_]{1,20}$ ]] \
        || die "--prefix must be 1-20 letters, digits or '_', got '$PREFIX'"
    [[ "$SUBNET" =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] \
        || die "--subnet must be three octets like 10.200.0, got '$SUBNET'"
}

host_ns() { echo "${PREFIX}_h$1"; }
switch_ns() { echo "${PREFIX}_sw"; }
host_ip() { echo "${SUBNET}.$(( $1 + 1 ))"; }

# Namespaces of this prefix that exist now (hosts and switch).
our_namespaces() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX}_(h[0-9]+|sw)$" | sort -V || true
}

cmd_down() {
    need_tools
    local ns found=0
    for ns in $(our_namespaces); do
        # Deleting a namespace destroys its veth ends, and with them their peers.
        ip netns del "$ns" 2>/dev/null || true
        found=1
    done
    if (( found )); then echo "removed namespaces with prefix '${PREFIX}_'"; else echo "nothing to remove for prefix '${PREFIX}_'"; fi
}

cap_link() {  # ns dev
    [[ -z "$RATE" ]] && return 0
    ip netns exec "$1" tc qdisc replace dev "$2" root tbf rate "$RATE" burst "$BURST" latency "$LATENCY" \
        || die "tc tbf failed in $1 (rate=$RATE burst=$BURST latency=$LATENCY); is sch_tbf available?"
}

cmd_up() {
    need_tools
    if [[ -n "$(our_namespaces)" ]]; then
        echo "namespaces with prefix '${PREFIX}_' exist; removing them first" >&2
        cmd_down >/dev/null
    fi
    # A failure half-way (a failed command under set -e, or die) leaves nothing behind.
    local up_done=0
    trap '[[ $up_done == 1 ]] || { echo "netns_hosts.sh: up failed; cleaning up" >&2; cmd_down >/dev/null 2>&1; }' EXIT

    local i ns
    for (( i = 0; i < HOSTS; i++ )); do
        ns="$(host_ns "$i")"
        ip netns add "$ns" 2>/dev/null || die "cannot create network namespace $ns (needs root / CAP_SYS_ADMIN)"
        ip -n "$ns" link set lo up
    done

    if (( HOSTS == 2 )); then
        # Created inside h0 with its peer placed straight into h1: never visible outside them.
        ip -n "$(host_ns 0)" link add eth0 type veth peer name eth0 netns "$(host_ns 1)"
    else
        local sw; sw="$(switch_ns)"
        ip netns add "$sw"
        ip -n "$sw" link set lo up
        ip -n "$sw" link add br0 type bridge
        ip -n "$sw" link set br0 up
        for (( i = 0; i < HOSTS; i++ )); do
            ip -n "$sw" link add "p$i" type veth peer name eth0 netns "$(host_ns "$i")"
            ip -n "$sw" link set "p$i" master br0
            ip -n "$sw" link set "p$i" up
        done
    fi

    for (( i = 0; i < HOSTS; i++ )); do
        ns="$(host_ns "$i")"
        ip -n "$ns" addr add "$(host_ip "$i")/24" dev eth0
        ip -n "$ns" link set eth0 up
        cap_link "$ns" eth0
        # Loopback must be up: gloo and c10d also bind local sockets.
        ip -n "$ns" link show lo | grep -q "UP" || die "loopback is not up in $ns"
    done
    up_done=1
    trap - EXIT
    echo "up: ${HOSTS} hosts (prefix '${PREFIX}_', subnet ${SUBNET}.0/24, rate ${RATE:-uncapped})"
    for (( i = 0; i < HOSTS; i++ )); do echo "  $(host_ns "$i") $(host_ip "$i")"; done
}

cmd_status() {
    need_tools
    local list; list="$(our_namespaces)"
    if [[ -z "$list" ]]; then echo "no namespaces with prefix '${PREFIX}_'"; return 1; fi
    local ns
    for ns in $list; do
        echo "== $ns"
        ip -n "$ns" -brief addr show | sed 's/^/   /'
        if [[ "$ns" == "${PREFIX}"_h* ]] && command -v tc >/dev/null 2>&1; then
            ip netns exec "$ns" tc qdisc show dev eth0 2>/dev/null | sed 's/^/   qdisc: /' || true
        fi
    done
}

# Connectivity and bandwidth without ping/iperf (often absent): a TCP server in h1, a client in
# h0 that measures the round trip of 1-byte messages, then streams CHECK_MB megabytes.
cmd_check() {
    command -v "$PYTHON" >/dev/null 2>&1 || die "check needs python3 (or set PYTHON=...)"
    local a b port=47123
    a="$(resolve_host 0)"; b="$(resolve_host 1)"
    local server_ip; server_ip="$(ip -n "$b" -4 -o addr show dev eth0 | awk '{split($4, x, "/"); print x[1]}')"
    [[ -n "$server_ip" ]] || die "no IPv4 address on eth0 in $b"
    ip netns exec "$b" "$PYTHON" -c '
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(20)
c, _ = s.accept(); c.settimeout(60)
for _ in range(50):
    c.sendall(c.recv(1))
got = 0
while True:
    d = c.recv(1 << 20)
    if not d: break
    got += len(d)
c.sendall(got.to_bytes(8, "little")); c.close()
' "$server_ip" "$port" &
    local server=$!
    ip netns exec "$a" "$PYTHON" -c '
import socket, sys, time
ip, port, mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(100):
    try:
        c = socket.create_connection((ip, port), timeout=2); break
    except OSError:
        time.sleep(0.05)
else:
    sys.exit("check: cannot connect to %s:%d" % (ip, port))
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtt = []
for _ in range(50):
    t = time.perf_counter(); c.sendall(b"x"); c.recv(1); rtt.append(time.perf_counter() - t)
rtt.sort()
buf = b"\0" * (1 << 20); t = time.perf_counter()
for _ in range(mb):
    c.sendall(buf)
c.shutdown(socket.SHUT_WR)
got = int.from_bytes(c.recv(8), "little"); dt = time.perf_counter() - t
assert got == mb << 20, (got, mb << 20)
print("check: %s -> %s  rtt median %.3f ms  throughput %.3f Gbit/s (%d MB in %.2f s)"
      % (sys.argv[4], ip, rtt[len(rtt) // 2] * 1e3, got * 8 / dt / 1e9, mb, dt))
' "$server_ip" "$port" "$CHECK_MB" "$a"
    wait "$server"
}

resolve_host() {  # index or name -> namespace name
    local h="$1"
    if [[ "$h" =~ ^[0-9]+$ ]]; then h="$(host_ns "$h")"; fi
    ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$h" \
        || die "no namespace '$h' (run '$0 up' first; existing: $(our_namespaces | tr '\n' ' '))"
    echo "$h"
}

main() {
    local sub="${1:-}"
    [[ -z "$sub" ]] && { usage; exit 2; }
    shift
    case "$sub" in
        up)     parse_opts "$@"; cmd_up ;;
        down)   parse_opts "$@"; cmd_down ;;
        status) parse_opts "$@"; cmd_status ;;
        check)  parse_opts "$@"; need_tools; cmd_check ;;
        addr)
            [[ $# -ge 1 ]] || die "addr needs HOST (index or namespace name)"
            local h="$1"; shift; parse_opts "$@"
            [[ "$h" =~ ^[0-9]+$ ]] || h="${h##*_h}"
            [[ "$h" =~ ^[0-9]+$ ]] || die "cannot read a host index from '$1'"
            host_ip "$h" ;;
        exec)
            [[ $# -ge 2 ]] || die "exec needs HOST and a command"
            need_tools
            local ns; ns="$(resolve_host "$1")"; shift
            exec ip netns exec "$ns" "$@" ;;
        -h|--help|help) usage ;;
        *) die "unknown subcommand '$sub' (allowed: up, down, status, check, addr, exec)" ;;
    esac
}

main "$@"
