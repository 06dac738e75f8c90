#!/usr/bin/env bash
# The collectives benchmark between network-namespace test hosts, one rank per host:
# brings up the hosts (launch/netns_hosts.sh, capped by `tc tbf` at RATE), measures their link,
# runs benchmarks/collectives.py on every host, prints rank 0's table and removes the hosts.
#
#   benchmarks/collectives_netns.sh [--rate 1gbit|none] [--hosts 2] [collectives.py flags...]
#   e.g. benchmarks/collectives_netns.sh --rate 1gbit --codecs identity,fp16,qsgd4 --iters 7
#
# Needs root and iproute2. PYTHON defaults to the project's .venv.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"

RATE="1gbit"
HOSTS=2
PASS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --rate)  RATE="${2:?--rate needs a value (e.g. 1gbit, or none)}"; shift 2 ;;
        --hosts) HOSTS="${2:?--hosts needs a value}"; shift 2 ;;
        *) PASS+=("$1"); shift ;;
    esac
done

# The link itself first, so the table can be read against what the cap really delivers.
PREFIX="dsl$$"
trap 'bash "$ROOT/launch/netns_hosts.sh" down --prefix "$PREFIX" >/dev/null 2>&1 || true' EXIT
UP=(up --prefix "$PREFIX" --hosts 2)
[[ "$RATE" != "none" ]] && UP+=(--rate "$RATE")
bash "$ROOT/launch/netns_hosts.sh" "${UP[@]}" >/dev/null
PYTHON="$PYTHON" bash "$ROOT/launch/netns_hosts.sh" check --prefix "$PREFIX" --mb 100
bash "$ROOT/launch/netns_hosts.sh" down --prefix "$PREFIX" >/dev/null

ARGS=(netns --ranks "$HOSTS")
[[ "$RATE" != "none" ]] && ARGS+=(--rate "$RATE")
cd "$ROOT"
exec "$PYTHON" "$HERE/collectives.py" "${ARGS[@]}" "${PASS[@]+"${PASS[@]}"}"
