#!/usr/bin/env bash
# Speech quality through amphi, scored with ITU-T P.862 PESQ wide-band (issue 18, issue 11 fault 4).
#
#   bench/quality/run.sh [--smoke] [--tools PATH] [--out DIR] [--seed N]
#
# --tools: the amphi-tools binary (default target/release, else target/debug); it starts the dev
# mesh from the `amphi` binary beside it.
#
# Makes a synthetic speech reference with espeak-ng, then measures side by side in one run:
#   ceiling       reference -> ffmpeg libopus 64 kb/s -> decode
#   speaker       the bench speaker's own packets (libopus 32 kb/s voip 20 ms FEC, as a browser)
#                 decoded without a network: the WHEP ceiling
#   fair ceiling  those packets decoded -> ffmpeg libopus 64 kb/s (as the mixer) -> decode: the
#                 HLS ceiling
#   amphi         `amphi-tools bench quality`: a WHEP listener, the HLS Opus and the HLS AAC rendition,
#                 on a clean path, with 5 % uplink loss + 0..30 ms jitter (without and with RFC 2198
#                 RED from the speaker, the same loss pattern), and with 5 % loss on the
#                 edge -> origin relay.
# --smoke: a 3 s sample, the clean row only, and it fails unless every score is in 1.0..4.7.
# Installs espeak-ng (apt) and the `pesq` package (a venv under ~/.cache/amphi) if missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
CACHE=${AMPHI_CACHE:-$HOME/.cache/amphi}
SMOKE=0
TOOLS=""
OUT=""
SEED=1
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --tools) TOOLS=$2; shift ;;
    --out) OUT=$2; shift ;;
    --seed) SEED=$2; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$TOOLS" ]; then
  TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
  TOOLS=$TARGET_DIR/release/amphi-tools
  [ -x "$TOOLS" ] || TOOLS=$TARGET_DIR/debug/amphi-tools
fi
[ -x "$TOOLS" ] || { echo "no amphi-tools binary (build it or pass --tools)" >&2; exit 1; }
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
if ! command -v espeak-ng >/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq espeak-ng >/dev/null
fi
VENV="$CACHE/pesqvenv"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import pesq, numpy' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "pesq==0.0.4" "numpy==2.4.6"
fi

WORK=${OUT:-$(mktemp -d)}
mkdir -p "$WORK"
[ -n "$OUT" ] || trap 'rm -rf "$WORK"' EXIT
if [ "$SMOKE" = 1 ]; then
  TEXT="The birch canoe slid on the smooth planks."
else
  TEXT="The birch canoe slid on the smooth planks. Glue the sheet to the dark blue background. \
It is easy to tell the depth of a well. These days a chicken leg is a rare dish. \
Rice is often served in round bowls. The juice of lemons makes fine punch. \
The box was thrown beside the parked truck. The hogs were fed chopped corn and garbage."
fi
espeak-ng -v en-us -s 150 -w "$WORK/espeak.wav" "$TEXT"
ff() { ffmpeg -nostdin -loglevel error -y "$@"; }
# 0.3 s of silence around the speech; 48 kHz mono s16 is what the bench publishes.
ff -i "$WORK/espeak.wav" -af "adelay=300,apad=pad_dur=0.3" -ac 1 -ar 48000 -c:a pcm_s16le "$WORK/ref.wav"
ff -i "$WORK/ref.wav" -c:a libopus -b:a 64k "$WORK/ceiling.opus"
ff -i "$WORK/ceiling.opus" -ar 48000 "$WORK/ceiling.wav"

# condition name, uplink loss, jitter ms, relay loss, RED (1: the speaker publishes with RED)
if [ "$SMOKE" = 1 ]; then
  CONDITIONS=("clean 0 0 0 0")
else
  CONDITIONS=("clean 0 0 0 0" "uplink-5%-loss+30ms-jitter 0.05 30 0 0"
    "uplink-5%-loss+30ms-jitter+RED 0.05 30 0 1" "relay-5%-loss 0 0 0.05 0")
fi
ARGS=("ceiling: ffmpeg libopus 64k=$WORK/ceiling.wav")
offset=23000
for c in "${CONDITIONS[@]}"; do
  read -r name up jit relay red <<<"$c"
  dir="$WORK/$name"
  RED_ARG=()
  [ "$red" = 1 ] && RED_ARG=(--red)
  RUST_LOG=warn "$TOOLS" bench quality --wav "$WORK/ref.wav" --out "$dir" --uplink-loss "$up" \
    --jitter-ms "$jit" --relay-loss "$relay" --seed "$SEED" --port-offset "$offset" "${RED_ARG[@]}"
  offset=$((offset + 50))
  if [ "$name" = clean ]; then
    # The fair ceiling: the speaker's very packets, decoded, re-encoded once at 64 kb/s.
    ff -i "$dir/speaker.wav" -c:a libopus -b:a 64k "$WORK/fair.opus"
    ff -i "$WORK/fair.opus" -ar 48000 "$WORK/fair.wav"
    ARGS+=("ceiling: speaker encode alone (32k voip, WHEP ceiling)=$dir/speaker.wav"
      "ceiling: speaker encode -> libopus 64k (fair, HLS ceiling)=$WORK/fair.wav")
  fi
  ARGS+=("$name: WHEP listener=$dir/whep.wav" "$name: HLS Opus=$dir/hls_opus.wav" "$name: HLS AAC=$dir/hls_aac.wav")
done
"$VENV/bin/python" bench/quality/score.py "$WORK/ref.wav" "${ARGS[@]}" | tee "$WORK/scores.tsv"
# A busy host delays packets past the origin's playout point (the run lines above count late and
# concealed frames): read the amphi rows together with the load.
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| path | PESQ-WB | offset ms |"
echo "|---|---|---|"
awk -F'\t' '{printf "| %s | %s | %s |\n", $1, $2, $3}' "$WORK/scores.tsv"
if [ "$SMOKE" = 1 ]; then
  rows=$(wc -l <"$WORK/scores.tsv")
  [ "$rows" = 6 ] || { echo "expected 6 scores, got $rows" >&2; exit 1; }
  awk -F'\t' '$2 == "error" || $2 < 1.0 || $2 > 4.7 { print "score out of range: " $0; bad=1 } END { exit bad }' \
    "$WORK/scores.tsv"
fi
