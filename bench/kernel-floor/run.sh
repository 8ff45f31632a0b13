#!/usr/bin/env bash
# The kernel's floor on this machine, without any of our code: the CPU one UDP datagram
# (sendmmsg, the SFU's fan-out) and one small TCP write (answering a held HLS request) cost.
# On loopback the sender also runs the receiver's softirq work; as root, the same is measured
# between two network namespaces over a veth pair, with and without RPS sending receive work
# to the other core (the closest this box gets to a NIC and a second machine).
# Usage: bench/kernel-floor/run.sh [TCP_CONNECTIONS]   (default 5000; needs gcc)
set -euo pipefail
cd "$(dirname "$0")"
n=${1:-5000}
out=${TMPDIR:-/tmp}/amphi-kernel-floor
mkdir -p "$out"
for p in udp_send sink tcp_write tcp_read; do gcc -O2 -Wall -o "$out/$p" "$p.c"; done
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  ip netns del amphi-floor-a 2>/dev/null || true
  ip netns del amphi-floor-b 2>/dev/null || true
}
trap cleanup EXIT
ulimit -n $((n * 2 + 100))

udp() { # label, netns-prefix for the sender, target ip, port
  taskset -c 0 $2 "$out/udp_send" "$3" "$4" 640000 "$1"
}
tcp() { # label, server prefix, client prefix, server ip, port
  taskset -c 0 $2 "$out/tcp_write" "$5" "$n" 749 "$1" &
  local s=$!
  sleep 0.3
  taskset -c 1 $3 "$out/tcp_read" "$4" "$5" "$n" &
  local c=$!
  wait "$s"
  kill "$c" 2>/dev/null || true
}

"$out/sink" 127.0.0.1 29411 & pids+=($!)
sleep 0.2
udp loopback "" 127.0.0.1 29411
tcp loopback "" "" 127.0.0.1 29412

if ip netns add amphi-floor-a 2>/dev/null && ip netns add amphi-floor-b; then
  ip link add fa0 netns amphi-floor-a type veth peer name fb0 netns amphi-floor-b
  ip -n amphi-floor-a addr add 10.233.0.1/30 dev fa0
  ip -n amphi-floor-b addr add 10.233.0.2/30 dev fb0
  for ns in amphi-floor-a amphi-floor-b; do ip -n $ns link set lo up; done
  ip -n amphi-floor-a link set fa0 up
  ip -n amphi-floor-b link set fb0 up
  A="ip netns exec amphi-floor-a"
  B="ip netns exec amphi-floor-b"
  $B "$out/sink" 10.233.0.2 29413 & pids+=($!)
  sleep 0.2
  for rps in 0 1; do
    # RPS: the receiving side's packets are processed on the other core (CPU 1 for b, 0 for a).
    $B sh -c "echo $((rps * 2)) > /sys/class/net/fb0/queues/rx-0/rps_cpus"
    $A sh -c "echo $((rps * 1)) > /sys/class/net/fa0/queues/rx-0/rps_cpus"
    label="veth-netns rps=$rps"
    udp "$label" "$A" 10.233.0.2 29413
    tcp "$label" "$A" "$B" 10.233.0.1 $((29414 + rps))
  done
else
  echo "(not root or no netns support: veth runs skipped)"
fi
