#!/usr/bin/env bash
# The production-shaped test bed on one machine: one network namespace per host (geo-router,
# two origins, packager, Redis, s3s-fs, two us-east-1 edges, one eu-west-1 and one
# ap-southeast-1 edge, one client namespace per region), each joined by a veth to a "core"
# namespace that routes between them. Every forwarded packet goes through an iptables NFQUEUE
# rule to amphi-netem (this kernel has no tc netem), which delays it by its region pair's
# one-way delay (us-east-1<->eu-west-1 RTT 75 ms, <->ap-southeast-1 220 ms, eu-west-1<->
# ap-southeast-1 160 ms, 1 ms inside a region) or drops it (partitions).
#
# Every role runs `amphi <role> --config` with the config rendered from the Terraform templates
# (amphi-tools bed-setup) and nothing else: no AMPHI__* variable. Every HTTP listener serves TLS
# with a certificate of the bed's CA ($RUN/ca.pem) naming the host's address. Addresses are
# 10.77.0.0/16 inside the namespaces only: nothing is routed to or from the host's interfaces.
#
# Usage (root):  scripts/mesh.sh up | down | status | partition on|off | lossy on|off | kill HOST
#                | start redis|s3 (after a kill) | pause HOST | resume HOST (SIGSTOP / SIGCONT)
# Env: AMPHI_MESH_RUN (run directory, default /tmp/amphi-mesh), AMPHI_MESH_PREFIX (namespace name
# prefix, default amb-: two beds with different prefixes can run at once), AMPHI_BIN (amphi binary;
# amphi-tools and amphi-netem are taken from the same directory), AMPHI_S3S_FS (s3s-fs binary).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUN=${AMPHI_MESH_RUN:-/tmp/amphi-mesh}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
AMPHI_BIN=${AMPHI_BIN:-$TARGET_DIR/debug/amphi}
BIN_DIR=$(dirname "$AMPHI_BIN")
TOOLS=$BIN_DIR/amphi-tools
NETEM=$BIN_DIR/amphi-netem
S3S_FS=${AMPHI_S3S_FS:-$HOME/.cache/amphi/s3s/bin/s3s-fs}
PREFIX=${AMPHI_MESH_PREFIX:-amb-}
CORE=${PREFIX}core
export RUST_LOG=${RUST_LOG:-info}

log() { printf 'mesh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

hosts() { cat "$RUN/hosts.tsv"; }
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# Start a command in a namespace in the background; its pid goes to $RUN/pids/NAME.pid.
start() {
  local name=$1 ns=$2; shift 2
  mkdir -p "$RUN/pids" "$RUN/logs"
  ip netns exec "$ns" "$@" >"$RUN/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN/pids/$name.pid"
}

# Poll (at most $2 tenths of a second) until the command succeeds.
wait_for() {
  local what=$1 tries=$2; shift 2
  for _ in $(seq 1 "$tries"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  die "$what: not ready in $((tries / 10)) s (logs in $RUN/logs)"
}

# Every HTTP listener of the bed serves TLS with a certificate of the bed's CA ($RUN/ca.pem).
http_ok() { in_ns "${PREFIX}client-use1" curl -fsS -m 2 --cacert "$RUN/ca.pem" -o /dev/null "$1"; }

registered_edges() {
  in_ns "${PREFIX}client-use1" "$TOOLS" api --secret "$(cat "$RUN/api_secret")" \
    --ca "$RUN/ca.pem" GET "https://$(addr router):8080/v1/edges" | grep -o '"id":"edge-[^"]*"' | sort -u | wc -l
}

all_edges_registered() { [ "$(registered_edges)" -ge 4 ]; }

addr() { awk -v n="$1" '$1 == n { print $5 }' "$RUN/hosts.tsv"; }

# Start Redis or s3s-fs in its namespace (s3s-fs keeps its objects in $RUN/s3 across restarts).
start_store() {
  case "$1" in
    redis)
      start redis "${PREFIX}redis" redis-server --bind "$(addr redis)" --port 6379 --save '' \
        --appendonly no --protected-mode no --dir "$RUN/redis"
      wait_for redis 100 in_ns "${PREFIX}redis" redis-cli -h "$(addr redis)" ping
      ;;
    s3)
      start s3 "${PREFIX}s3" "$S3S_FS" --host "$(addr s3)" --port 9000 \
        --access-key bedaccess --secret-key bedsecret0123456789 "$RUN/s3"
      wait_for s3 100 in_ns "${PREFIX}s3" bash -c "exec 3<>/dev/tcp/$(addr s3)/9000"
      ;;
    *) die "usage: mesh.sh start redis|s3" ;;
  esac
  log "started $1"
}

# Freeze or thaw a host's process (SIGSTOP / SIGCONT): a server that stops answering without
# closing its connections, the hardest outage for clients.
signal_host() {
  local f="$RUN/pids/${2:?usage: mesh.sh pause|resume HOST}.pid"
  [ -f "$f" ] || die "no process for $2"
  kill "-$1" "$(cat "$f")"
  log "$1 $2 (pid $(cat "$f"))"
}

is_up() { [ -f "$RUN/up" ] && ip netns list | grep -qw "$CORE"; }

up() {
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
  if is_up; then log "already up ($RUN)"; return 0; fi
  down >/dev/null 2>&1 || true
  for b in "$AMPHI_BIN" "$TOOLS" "$NETEM" "$S3S_FS"; do
    [ -x "$b" ] || die "missing $b (cargo build -p amphi -p amphi-tools; s3s-fs: see scripts/test.sh)"
  done
  command -v iptables >/dev/null || die "missing iptables (apt-get install iptables)"
  mkdir -p "$RUN"
  head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$RUN/api_secret"
  "$TOOLS" bed-setup --repo "$ROOT" --run "$RUN" --api-secret "$(cat "$RUN/api_secret")"
  # The router's GeoIP database where the geo-router module's user data installs it.
  mkdir -p "$RUN/router/var/geoip"
  perl "$ROOT/tests/geoip/write_fixture.pl" "$RUN/router/var/geoip/city.mmdb"

  # The core router namespace and one veth per host.
  ip netns add "$CORE"
  ip -n "$CORE" link set lo up
  in_ns "$CORE" sysctl -qw net.ipv4.ip_forward=1
  local i=0
  while IFS=$'\t' read -r name ns _kind _region a gw _net; do
    i=$((i + 1))
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$CORE" link add "v$i" type veth peer name eth0 netns "$ns"
    ip -n "$CORE" addr add "$gw/30" dev "v$i"
    ip -n "$CORE" link set "v$i" up
    ip -n "$ns" addr add "$a/30" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$gw"
  done < <(hosts)

  # The link emulator, then the rule that sends it every forwarded packet.
  start netem "$CORE" "$NETEM" --config "$RUN/netem.toml" --stats "$RUN/netem-stats.json"
  wait_for "amphi-netem" 50 grep -q "bound" "$RUN/logs/netem.log"
  in_ns "$CORE" iptables -A FORWARD -j NFQUEUE --queue-num 0

  # Redis and S3.
  mkdir -p "$RUN/redis" "$RUN/s3/amphi-hls"
  start_store redis
  start_store s3

  # The roles, in dependency order, with the rendered files only: no AMPHI__* override from the
  # caller's environment either.
  local v
  for v in $(compgen -e | grep '^AMPHI__' || true); do unset "$v"; done
  local kind
  for kind in origin packager geo-router edge; do
    while IFS=$'\t' read -r name ns k _region _a _gw _net; do
      [ "$k" = "$kind" ] || continue
      start "$name" "$ns" "$AMPHI_BIN" "$kind" --config "$RUN/$name/config.toml"
    done < <(hosts)
  done
  wait_for geo-router 300 http_ok "https://$(addr router):8080/healthz"
  wait_for packager 300 http_ok "https://$(addr packager):8443/healthz"
  while IFS=$'\t' read -r name _ns k _region a _gw _net; do
    [ "$k" = edge ] || continue
    wait_for "$name" 300 http_ok "https://$a:8080/healthz"
  done < <(hosts)
  wait_for "edge registration" 300 all_edges_registered
  touch "$RUN/up"
  log "up: $RUN (logs in $RUN/logs)"
}

stop_pid() {
  local f=$1 pid
  pid=$(cat "$f" 2>/dev/null || true)
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || { rm -f "$f"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$f"
}

down() {
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
  rm -f "$RUN/up"
  local f
  # Edges first (they drain on SIGTERM), then everything else.
  for f in "$RUN"/pids/edge-*.pid; do [ -e "$f" ] && stop_pid "$f"; done
  for f in "$RUN"/pids/*.pid; do [ -e "$f" ] && stop_pid "$f"; done
  # Anything still inside our namespaces was started by this script: stop it, then delete them.
  local ns pid
  for ns in $(ip netns list | awk '{print $1}' | grep "^$PREFIX" || true); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns"
  done
  log "down"
}

status() {
  if ! is_up; then echo "down"; return 1; fi
  echo "up: $RUN"
  local f name pid
  for f in "$RUN"/pids/*.pid; do
    name=$(basename "$f" .pid); pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then echo "  $name pid $pid running"; else echo "  $name pid $pid EXITED"; fi
  done
  echo "  registered edges: $(registered_edges)"
  [ -f "$RUN/netem-stats.json" ] && echo "  netem: $(cat "$RUN/netem-stats.json")"
}

partition() {
  case "${1:-}" in
    on) "$TOOLS" netem-config --out "$RUN/netem.toml" --partition-eu-origins ;;
    off) "$TOOLS" netem-config --out "$RUN/netem.toml" ;;
    *) die "usage: mesh.sh partition on|off" ;;
  esac
  # amphi-netem re-reads the file within 200 ms.
  sleep 0.5
  log "partition eu-west-1 <-> origins: $1"
}

# 5 % loss + 30 ms jitter on the us-east-1 edges' relay links and the us-east-1 client uplink
# (rewrites the emulator config: clears a partition).
lossy() {
  case "${1:-}" in
    on) "$TOOLS" netem-config --out "$RUN/netem.toml" --lossy ;;
    off) "$TOOLS" netem-config --out "$RUN/netem.toml" ;;
    *) die "usage: mesh.sh lossy on|off" ;;
  esac
  sleep 0.5
  log "lossy us-east-1 relay and uplink: $1"
}

kill_host() {
  local f="$RUN/pids/${1:?usage: mesh.sh kill HOST}.pid"
  [ -f "$f" ] || die "no process for $1"
  kill -KILL "$(cat "$f")"
  log "killed $1 (pid $(cat "$f"))"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  partition) partition "${2:-}" ;;
  kill) kill_host "${2:-}" ;;
  lossy) lossy "${2:-}" ;;
  start) start_store "${2:-}" ;;
  pause) signal_host STOP "${2:-}" ;;
  resume) signal_host CONT "${2:-}" ;;
  *) echo "usage: $0 up|down|status|partition on|off|lossy on|off|kill HOST|start redis|s3|pause HOST|resume HOST" >&2; exit 2 ;;
esac
