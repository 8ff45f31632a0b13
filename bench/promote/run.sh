#!/usr/bin/env bash
# Promotion latency from the push and HLS tiers (issue 15): headless Chromium, an `amphi dev`
# mesh, a host at us-east and a listener at eu-west with a fake 660 Hz microphone. Each trial:
# the listener raises a hand on its tier (its page pre-warms WebRTC), the host clicks
# "Invite to speak", and the host's page measures the time until it hears 660 Hz (same page
# clock, sampled every 5 ms); then the listener is moved back and returns to its tier.
# Prints each trial and the p50 / max per tier (tests/e2e_push.rs runs one trial per tier).
#
# Usage: bench/promote/run.sh [TRIALS]   (default 10 per tier; release build)
set -euo pipefail
cd "$(dirname "$0")/../.."
TRIALS=${1:-10}
(cd tests/browser && npm ci --no-audit --no-fund --prefer-offline >/dev/null)
AMPHI_PROMOTE_TRIALS=$TRIALS cargo test -q --release -p amphi --test e2e_push \
  a_listener_on_push_or_hls_is_promoted_and_heard -- --nocapture 2>&1 |
  grep -E '^\[promote\] (from|room)|^promotion from'
