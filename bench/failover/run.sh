#!/usr/bin/env bash
# Origin death on the namespace test bed, RUNS times (default 3): each run brings the bed up
# (scripts/mesh.sh), kills the owning origin of a live room with SIGKILL (tests/prod_failover.rs)
# and prints its FIGURE line: the audio gap on a WHEP listener and on the HLS output (by
# PROGRAM-DATE-TIME), with the speaker's 500 ms burst period as the resolution. The summary gives
# each gap's minimum / median / maximum over the runs. Needs root (network namespaces).
#
# Usage: sudo bench/failover/run.sh [RUNS]
# Env: AMPHI_S3S_FS (s3s-fs binary, default ~/.cache/amphi/s3s/bin/s3s-fs).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-3}
export AMPHI_S3S_FS=${AMPHI_S3S_FS:-$HOME/.cache/amphi/s3s/bin/s3s-fs}
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 1; }
cargo build -q -p amphi -p amphi-tools
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for i in $(seq 1 "$RUNS"); do
  if ! cargo test -q -p amphi --test prod_failover -- --nocapture >"$out.run" 2>&1; then
    tail -40 "$out.run" >&2
    echo "run $i failed" >&2
    exit 1
  fi
  grep '^FIGURE' "$out.run" | tee -a "$out"
  rm -f "$out.run"
done
python3 - "$out" <<'PY'
import re, statistics, sys
lines = open(sys.argv[1]).read().splitlines()
whep = [float(re.search(r"audio gap (\d+) ms on WHEP", l).group(1)) for l in lines]
hls = [float(re.search(r"(\d+) ms on HLS", l).group(1)) for l in lines]
for name, v in (("WHEP", whep), ("HLS", hls)):
    print(f"audio gap on {name} after kill -9 of the room's origin, {len(v)} runs: "
          f"min {min(v):.0f} ms, median {statistics.median(v):.0f} ms, max {max(v):.0f} ms")
PY
