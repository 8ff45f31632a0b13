#!/usr/bin/env bash
# Figure for issue 11, fault 5 (S3 outage): 50 live rooms, s3s-fs frozen (SIGSTOP) then killed
# for 120 s in total and restarted on the same directory and port. Runs the packager's
# end-to-end outage test (cdn-packager/tests/s3_outage.rs) at that size in a release build and
# prints its FIGURE line: parts published vs stored in the bucket (parts_lost, goal 0), the
# peak memory held for uploads and spilled to disk, and the peak RSS of the process (the
# packager library, 50 synthetic program feeds and the test's HTTP polling; s3s-fs runs apart).
#
# Usage: bench/s3-outage/run.sh [ROOMS] [OUTAGE_SECS] [BUDGET_BYTES]
# Needs s3s-fs (scripts/test.sh installs it under ~/.cache/amphi/s3s; or set AMPHI_S3S_FS).
set -euo pipefail
cd "$(dirname "$0")/../.."
export AMPHI_OUTAGE_ROOMS="${1:-50}"
export AMPHI_OUTAGE_SECS="${2:-120}"
export AMPHI_OUTAGE_BUDGET="${3:-16777216}"
export AMPHI_S3S_FS="${AMPHI_S3S_FS:-$HOME/.cache/amphi/s3s/bin/s3s-fs}"
PROFILE="${AMPHI_BENCH_PROFILE:-release}" # `debug` reuses the test build
flag=()
[ "$PROFILE" = release ] && flag=(--release)
cargo test "${flag[@]}" -p amphi-packager --test s3_outage \
  live_hls_rides_out_an_s3_outage_and_every_part_reaches_s3_after -- --nocapture --exact \
  2>&1 | tee "${AMPHI_BENCH_LOG:-/tmp/amphi-s3-outage.log}" | grep -o "FIGURE.*" || {
  echo "no figure: the run failed (log: ${AMPHI_BENCH_LOG:-/tmp/amphi-s3-outage.log})" >&2
  exit 1
}
