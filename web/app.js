// amphi web client: lobby (live rooms, create a room) and the room view (speakers, listeners, hands,
// moderation, chat, reactions). Signaling is the edge's WebSocket (`/v1/ws?token=...`, JSON messages
// documented in docs/signaling.md); audio is one RTCPeerConnection per participant with
// LISTENER_AUDIO_SLOTS receive-only transceivers, plus a send-only one while the participant may
// speak (promotion renegotiates on the same PeerConnection). Passive listeners play the room's LL-HLS
// stream (native HLS where the browser has it, else the vendored hls.js light build).
// Plain JS, no framework, no build step; works in Chromium and Firefox.
"use strict";

/** Receive slots per participant (`LISTENER_AUDIO_SLOTS` in protocol/src/room.rs). */
const SLOTS = 3;
/** Roles that may publish audio. */
const PUBLISHERS = new Set(["host", "cohost", "speaker"]);
const MODERATORS = new Set(["host", "cohost"]);
const MAX_EVENTS = 1000;
const MAX_CHAT_ITEMS = 200;
const RECONNECT_LIMIT = 8;

const $ = (sel) => document.querySelector(sel);

/**
 * Everything the page knows. Exposed as `window.amphi` so end-to-end tests (and curious users) can
 * inspect it; nothing in it is secret beyond the page's own token.
 */
const amphi = {
  room: null, // room id (16 hex digits)
  token: null,
  claims: null, // decoded token claims (sub, name, role, room)
  info: null, // RoomInfo from the REST API
  route: null, // RouteResponse
  ws: null,
  me: null, // my participant id
  role: null, // my room role
  participants: new Map(), // id -> Participant
  counts: null, // {participants, listeners} of a large room (listeners listed on request)
  partial: false, // a large room: the listeners are fetched page by page (list_participants)
  listAfter: null, // `next` of the last participants page; null before the first page
  listDone: false, // every page was fetched
  hands: [], // raised hands, oldest first
  phase: "idle", // idle | connecting | joined | closed
  status: "idle", // connection status shown in the badge ("connected" once media flows)
  listenMode: null, // "webrtc" | "hls" | "push" | null
  wantHls: false, // the participant chose HLS (or the edge had no room for WebRTC)
  wantPush: false, // the participant chose the push stream (WebSocket, web/push.js)
  push: null, // AmphiPush player
  pushTransport: null, // "websocket" to keep the push stream off WebTransport (#push=websocket)
  tierPinned: false, // the person chose the tier (the edge never moves it)
  moving: null, // the tier a move (the edge's `move`) is starting, until it crossed over
  moves: [], // moves done: {from, to, ms from the offer to the cross-over's end, startedAt, crossfadeAt, endedAt (performance.now())}
  sending: false, // my microphone is on an accepted offer
  pc: null,
  sendTx: null, // the send-only transceiver, once created
  mic: null, // MediaStream from getUserMedia
  micError: null,
  closedReason: null, // kicked | banned | ended | left | failed | revoked | expired
  tokenRefreshes: 0, // tokens handed to the edge (refresh_token) and accepted
  refreshError: null, // why the last token refresh failed, if it did
  notice: "", // text of the banner
  latencyMs: null,
  active: new Map(), // participant id -> RFC 6464 level (0 loud .. 127 silent)
  activeAt: 0,
  events: [], // every server message received, with `at` = performance.now()
  errors: [], // error events {code, message}
  reports: [], // reports received as a host or co-host (newest first, at most MAX_REPORTS)
  reportTarget: null, // what the open report dialog reports: "room" or {user}
  keepMicOnMute: false, // test hook: ignore a moderator mute locally to prove the edge enforces it
  audio: null, // { ctx, analyser, webrtcGain, hlsGain, hlsSource }
  hls: null, // hls.js instance
  reconnects: 0,
};
window.amphi = amphi;

// ---------------------------------------------------------------------------------------------
// small helpers

function showError(msg) {
  const el = $("#error");
  el.textContent = msg || "";
  el.hidden = !msg;
}

function setNotice(msg, kind = "info") {
  amphi.notice = msg || "";
  const el = $("#notice");
  el.textContent = amphi.notice;
  el.className = `notice ${kind}`;
  el.hidden = !msg;
}

function setStatus(s) {
  amphi.status = s;
  $("#status").textContent = s;
}

async function api(path, options = {}) {
  const resp = await fetch(path, {
    ...options,
    headers: { "Content-Type": "application/json", ...(options.headers || {}) },
  });
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const err = new Error(body.message || `${resp.status} ${resp.statusText}`);
    err.code = body.error;
    err.status = resp.status;
    throw err;
  }
  return body;
}

function hashParams() {
  return new URLSearchParams(location.hash.slice(1));
}

/** Region override (dev mesh only): `#region=eu-west`, remembered for this tab. */
function regionOverride() {
  const r = hashParams().get("region");
  if (r) sessionStorage.setItem("amphi:region", r);
  return r || sessionStorage.getItem("amphi:region");
}

function decodeClaims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const json = decodeURIComponent(
      atob(part)
        .split("")
        .map((c) => "%" + c.charCodeAt(0).toString(16).padStart(2, "0"))
        .join("")
    );
    return JSON.parse(json);
  } catch {
    return null;
  }
}

function myName() {
  return ($("#my-name").value || "").trim() || localStorage.getItem("amphi:name") || "";
}

function participantName(id) {
  const p = amphi.participants.get(id);
  return p ? p.name : `#${id}`;
}

function loadScript(src) {
  return new Promise((resolve, reject) => {
    const s = document.createElement("script");
    s.src = src;
    s.onload = resolve;
    s.onerror = () => reject(new Error(`could not load ${src}`));
    document.head.append(s);
  });
}

// ---------------------------------------------------------------------------------------------
// lobby

async function loadRooms() {
  const list = $("#rooms");
  try {
    const { rooms } = await api("/v1/rooms");
    list.replaceChildren();
    if (rooms.length === 0) {
      const li = document.createElement("li");
      li.className = "muted";
      li.textContent = "No live rooms yet. Start one!";
      list.append(li);
    }
    for (const r of rooms) {
      const li = document.createElement("li");
      li.dataset.room = r.room;
      const a = document.createElement("a");
      a.href = `#room=${r.room}`;
      a.className = "room-link";
      const title = document.createElement("b");
      title.textContent = r.title;
      a.append(title);
      if (r.topic) {
        const topic = document.createElement("span");
        topic.className = "muted";
        topic.textContent = ` — ${r.topic}`;
        a.append(topic);
      }
      const live = document.createElement("span");
      live.className = "live-dot";
      live.textContent = "LIVE";
      li.append(live, a);
      if (Number.isFinite(r.listeners)) {
        const count = document.createElement("span");
        count.className = "muted small";
        count.textContent = `${r.listeners} in the room`;
        li.append(count);
      }
      list.append(li);
    }
  } catch (e) {
    list.replaceChildren();
    showError(`Could not load rooms: ${e.message}`);
  }
}

// ---------------------------------------------------------------------------------------------
// audio graph: remote WebRTC tracks and the HLS element both feed one analyser and the speakers

function audioGraph() {
  if (amphi.audio) return amphi.audio;
  const Ctx = window.AudioContext || window.webkitAudioContext;
  const ctx = new Ctx();
  const analyser = ctx.createAnalyser();
  // 43 ms windows at 48 kHz, 23 Hz bins: enough to tell tones apart, short enough to follow them.
  analyser.fftSize = 2048;
  analyser.smoothingTimeConstant = 0;
  const webrtcGain = ctx.createGain();
  const hlsGain = ctx.createGain();
  const pushGain = ctx.createGain();
  webrtcGain.connect(analyser);
  hlsGain.connect(analyser);
  pushGain.connect(analyser);
  analyser.connect(ctx.destination);
  amphi.audio = { ctx, analyser, webrtcGain, hlsGain, pushGain, hlsSource: null, bins: new Float32Array(analyser.frequencyBinCount) };
  checkAudioUnlocked();
  return amphi.audio;
}

/** Browsers may start audio suspended until a click: offer a button then. */
function checkAudioUnlocked() {
  const a = amphi.audio;
  const suspended = a && a.ctx.state === "suspended";
  $("#enable-sound").hidden = !suspended;
  if (suspended) a.ctx.resume().then(() => ($("#enable-sound").hidden = a.ctx.state !== "suspended"), () => {});
}

/**
 * Strength of a tone in what the page plays: the loudest bin within ±2 bins of `freq`, in dB, and how
 * far it stands above the median bin (the noise floor). Used by the latency-free "do I hear X" checks.
 */
function toneDb(freq) {
  const a = amphi.audio;
  if (!a) return { peak: -200, floor: -200, snr: 0 };
  a.analyser.getFloatFrequencyData(a.bins);
  const hz = a.ctx.sampleRate / a.analyser.fftSize;
  const k = Math.round(freq / hz);
  let peak = -200;
  for (let i = Math.max(0, k - 2); i <= Math.min(a.bins.length - 1, k + 2); i++) {
    if (Number.isFinite(a.bins[i])) peak = Math.max(peak, a.bins[i]);
  }
  const sorted = Array.from(a.bins.subarray(1, Math.floor(4000 / hz)), (v) => (Number.isFinite(v) ? v : -200)).sort((x, y) => x - y);
  const floor = sorted.length ? sorted[Math.floor(sorted.length / 2)] : -200;
  return { peak, floor, snr: peak - floor };
}
amphi.toneDb = toneDb;

/**
 * Whether `freq` is clearly audible in the page's output: above -60 dB (a full-scale sine reads about
 * -6 dB; a -18 dBFS tone after Opus about -30 dB) and 25 dB over the noise floor.
 */
amphi.hears = (freq) => {
  const t = toneDb(freq);
  return t.peak > -60 && t.snr > 25;
};

function setListenMode(mode) {
  amphi.listenMode = mode;
  $("#listen-mode").textContent = mode === "webrtc" ? "WebRTC" : mode === "hls" ? "HLS" : mode === "push" ? "push" : "—";
  const a = amphi.audio;
  if (a) {
    a.webrtcGain.gain.value = mode === "webrtc" ? 1 : 0;
    a.hlsGain.gain.value = mode === "hls" ? 1 : 0;
    a.pushGain.gain.value = mode === "push" ? 1 : 0;
  }
  renderControls();
  sayListening();
}

// ---------------------------------------------------------------------------------------------
// WebRTC: one PeerConnection, SLOTS receive-only transceivers, one send-only while speaking

function waitForIceGathering(pc, ms) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(t);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    };
    const check = () => pc.iceGatheringState === "complete" && done();
    const t = setTimeout(done, ms);
    pc.addEventListener("icegatheringstatechange", check);
  });
}

let pendingAnswer = null; // {resolve, reject, timer}
let negotiation = Promise.resolve();

function createPeer() {
  const pc = new RTCPeerConnection({ bundlePolicy: "max-bundle" });
  amphi.pc = pc;
  amphi.sendTx = null;
  for (let i = 0; i < SLOTS; i++) pc.addTransceiver("audio", { direction: "recvonly" });
  pc.addEventListener("track", (ev) => attachRemoteTrack(ev.track));
  pc.addEventListener("connectionstatechange", () => {
    if (amphi.pc !== pc) return;
    setStatus(pc.connectionState);
    if (pc.connectionState === "disconnected" && amphi.ws && amphi.ws.readyState === WebSocket.OPEN) {
      // A network blip: restart ICE on the same PeerConnection (a re-offer with new credentials);
      // the role and the receive slots stay as they are.
      pc.restartIce();
      Promise.resolve(negotiate()).catch(() => {});
    }
    if (pc.connectionState === "failed") {
      setNotice("Audio connection lost; reconnecting…", "warn");
      reconnectSoon();
    }
  });
  return pc;
}

function attachRemoteTrack(track) {
  const stream = new MediaStream([track]);
  // Chromium only pulls a remote track that is played by a media element: play it muted and hear
  // it through WebAudio (which also feeds the analyser).
  const el = document.createElement("audio");
  el.muted = true;
  el.autoplay = true;
  el.srcObject = stream;
  $("#remote-audio").append(el);
  el.play().catch(() => {});
  const a = audioGraph();
  const src = a.ctx.createMediaStreamSource(stream);
  src.connect(a.webrtcGain);
  track.addEventListener("ended", () => {
    src.disconnect();
    el.remove();
  });
}

/**
 * The answer with Opus discontinuous transmission asked of this browser's encoder (`usedtx=1`
 * in every Opus fmtp line, RFC 7587): in silence it then sends a packet every ~400 ms instead of
 * 50 per second, and the edge, the relay and the origin's mixer carry next to nothing for a
 * speaker who is not talking. A browser takes its sending parameters from the remote answer.
 */
function preferDtx(sdp) {
  const opus = new Set();
  for (const m of sdp.matchAll(/^a=rtpmap:(\d+) opus\/48000/gim)) opus.add(m[1]);
  return sdp.replace(/^(a=fmtp:(\d+) [^\r\n]*)$/gm, (line, _all, pt) =>
    opus.has(pt) && !/usedtx=/.test(line) ? `${line};usedtx=1` : line);
}

/** Send an offer for the PeerConnection's current transceivers and apply the edge's answer. */
function negotiate() {
  const run = async () => {
    const pc = amphi.pc;
    if (!pc || !amphi.ws || amphi.ws.readyState !== WebSocket.OPEN) return;
    await pc.setLocalDescription(await pc.createOffer());
    // The edge is ICE-lite without trickle: send the offer with every candidate in it.
    await waitForIceGathering(pc, 2000);
    const answer = new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        pendingAnswer = null;
        reject(Object.assign(new Error("no answer from the edge"), { code: "timeout" }));
      }, 10000);
      pendingAnswer = { resolve, reject, timer };
    });
    send({ type: "offer", sdp: pc.localDescription.sdp });
    let sdp;
    try {
      sdp = await answer;
    } catch (e) {
      if (pc.signalingState === "have-local-offer") await pc.setLocalDescription({ type: "rollback" }).catch(() => {});
      throw e;
    }
    if (amphi.pc !== pc) return;
    await pc.setRemoteDescription({ type: "answer", sdp: preferDtx(sdp) });
    amphi.sending = !!(amphi.sendTx && amphi.sendTx.sender.track && amphi.sendTx.direction === "sendonly");
  };
  negotiation = negotiation.then(run, run);
  return negotiation;
}

async function acquireMic() {
  if (amphi.mic) return amphi.mic;
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    amphi.micError = "unsupported";
    setNotice("This browser cannot capture a microphone here (a secure https:// page is required). You can listen.", "warn");
    return null;
  }
  try {
    amphi.mic = await navigator.mediaDevices.getUserMedia({ audio: micConstraints(), video: false });
    amphi.micError = null;
    return amphi.mic;
  } catch (e) {
    amphi.micError = e.name || "error";
    const msg =
      e.name === "NotAllowedError"
        ? "Microphone blocked: allow microphone access for this site (the icon in the address bar), then press Unmute."
        : e.name === "NotFoundError"
          ? "No microphone found: plug one in, then press Unmute."
          : `Microphone unavailable (${e.message || e.name}).`;
    setNotice(msg, "warn");
    return null;
  }
}

/** Voice processing for speech; "original sound" turns off noise suppression and gain control. */
function micConstraints() {
  const original = localStorage.getItem("amphi:original-sound") === "1";
  return { echoCancellation: true, noiseSuppression: !original, autoGainControl: !original };
}

/** The "original sound" preference changed while speaking: capture again and swap the track. */
async function reapplyMic() {
  if (!amphi.mic || !amphi.sendTx) return;
  const enabled = amphi.mic.getAudioTracks().every((t) => t.enabled);
  stopMic();
  const stream = await acquireMic();
  if (!stream) return;
  const track = stream.getAudioTracks()[0];
  track.enabled = enabled;
  await amphi.sendTx.sender.replaceTrack(track);
}

function stopMic() {
  if (amphi.mic) amphi.mic.getTracks().forEach((t) => t.stop());
  amphi.mic = null;
}

/** Start (or resume) sending my microphone on the existing PeerConnection. */
async function startSending() {
  // Reached from "Start speaking", Unmute, or accepting the stage after a raised hand.
  amphi.micConsent = true;
  const stream = await acquireMic();
  if (!amphi.pc) return renderControls();
  if (stream) {
    const track = stream.getAudioTracks()[0];
    const meP = amphi.participants.get(amphi.me);
    track.enabled = !(meP && meP.muted);
    if (amphi.sendTx) {
      await amphi.sendTx.sender.replaceTrack(track);
      amphi.sendTx.direction = "sendonly";
    } else {
      amphi.sendTx = amphi.pc.addTransceiver(track, { direction: "sendonly", streams: [stream] });
    }
  }
  // Without a microphone the participant still listens on the receive slots.
  await negotiate();
  renderControls();
}

/** Stop sending (demoted): remove the track and tell the edge with another offer. */
async function stopSending() {
  amphi.sending = false;
  if (amphi.sendTx && amphi.pc) {
    await amphi.sendTx.sender.replaceTrack(null).catch(() => {});
    amphi.sendTx.direction = "inactive";
    stopMic();
    await negotiate().catch((e) => reportError(e));
  } else {
    stopMic();
  }
  renderControls();
}

function closePeer() {
  if (pendingAnswer) {
    clearTimeout(pendingAnswer.timer);
    pendingAnswer.reject(new Error("closed"));
    pendingAnswer = null;
  }
  if (amphi.pc) amphi.pc.close();
  amphi.pc = null;
  amphi.sendTx = null;
  amphi.sending = false;
  $("#remote-audio").replaceChildren();
}

async function startWebRtc() {
  if (amphi.pc) return;
  createPeer();
  setStatus("connecting");
  try {
    // The microphone opens only after the person's own click ("Start speaking"): a publisher who
    // has not pressed it yet (a host who just created the room) joins receive-only.
    if (PUBLISHERS.has(amphi.role) && amphi.micConsent) await startSending();
    else await negotiate();
    if (!amphi.wantHls && !amphi.wantPush) {
      stopHls();
      stopPush();
      setListenMode("webrtc");
    }
  } catch (e) {
    if (amphi.closedReason) return;
    closePeer();
    if (!PUBLISHERS.has(amphi.role)) {
      setNotice(`Interactive listening is unavailable right now (${e.message}); listening via HLS.`, "warn");
      amphi.wantHls = true;
      await startHls();
    } else {
      reportError(e);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tier moves: when a seat frees on a better tier, the edge offers it to a listener the router
// placed on push or HLS (`move`, docs/signaling.md). The page starts the new path beside the old
// one (its gain at 0), waits until it plays, cross-fades, closes the old path, then says
// `listening` with the new tier (or the old one to decline).

/** How long the two paths overlap in a move (a linear cross-fade). */
const CROSSFADE_S = 0.08;
/** How long a move waits for the new path to play before it gives up. */
const MOVE_READY_MS = 8000;
/** How long after its first audio a new path is trusted to keep playing. */
const MOVE_SETTLE_MS = 400;

/** Tell the edge how this page hears the room (listeners only). */
function sayListening() {
  if (amphi.phase !== "joined" || PUBLISHERS.has(amphi.role) || !amphi.listenMode || amphi.moving) return;
  if (!amphi.ws || amphi.ws.readyState !== WebSocket.OPEN) return;
  const tier = amphi.listenMode === "webrtc" ? "interactive" : amphi.listenMode;
  amphi.ws.send(JSON.stringify({ type: "listening", tier, movable: !amphi.tierPinned }));
}

/** Whether a WebRTC receive slot delivered audio in the last 300 ms. */
function webrtcPlaying() {
  if (!amphi.pc || amphi.pc.connectionState !== "connected") return false;
  const now = performance.timeOrigin + performance.now();
  return amphi.pc
    .getReceivers()
    .some((r) => r.getSynchronizationSources().some((s) => now - s.timestamp < 300));
}

const pause = (ms) => new Promise((r) => setTimeout(r, ms));

function waitUntil(check, ms) {
  return new Promise((resolve, reject) => {
    const end = Date.now() + ms;
    const poll = () => {
      if (check()) return resolve();
      if (Date.now() > end || amphi.closedReason) return reject(new Error("the new path did not start"));
      setTimeout(poll, 20);
    };
    poll();
  });
}

function gainOf(mode) {
  const a = amphi.audio;
  return mode === "webrtc" ? a.webrtcGain : mode === "push" ? a.pushGain : a.hlsGain;
}

async function onMove({ tier }) {
  const from = amphi.listenMode;
  const to = tier === "interactive" ? "webrtc" : tier;
  const better = { hls: 0, push: 1, webrtc: 2 };
  const pushless = to === "push" && !(window.AmphiPush && window.AmphiPush.supported());
  if (amphi.moving || amphi.tierPinned || PUBLISHERS.has(amphi.role) || pushless || !(to in better) || !(from in better) || better[to] <= better[from]) {
    // Not now, or not this page: saying the current tier declines the offer.
    return sayListening();
  }
  amphi.moving = to;
  const started = performance.now();
  const a = audioGraph();
  try {
    if (to === "webrtc") {
      if (!amphi.pc) {
        createPeer();
        await negotiate();
      }
      await waitUntil(webrtcPlaying, MOVE_READY_MS);
    } else {
      startPush(false);
      await waitUntil(() => amphi.push && amphi.push.stats().frames > 0, MOVE_READY_MS);
      // The first frame plays the player's latency target after it arrived.
      await pause(150);
    }
    await pause(MOVE_SETTLE_MS);
    const crossfadeAt = performance.now();
    const now = a.ctx.currentTime;
    for (const [mode, value] of [
      [from, 0],
      [to, 1],
    ]) {
      const g = gainOf(mode).gain;
      g.cancelScheduledValues(now);
      g.setValueAtTime(g.value, now);
      g.linearRampToValueAtTime(value, now + CROSSFADE_S);
    }
    await pause(CROSSFADE_S * 1000 + 40);
    if (from === "push") stopPush();
    if (from === "hls") stopHls();
    amphi.wantPush = to === "push";
    amphi.wantHls = false;
    amphi.moves.push({ from, to, ms: Math.round(performance.now() - started), startedAt: started, crossfadeAt, endedAt: performance.now() });
    amphi.moving = null;
    setListenMode(to);
  } catch (e) {
    console.warn(`move to ${to} failed: ${e.message}`);
    if (to === "webrtc") closePeer();
    else stopPush();
    gainOf(to).gain.value = 0;
    amphi.moving = null;
    sayListening();
  }
}

// ---------------------------------------------------------------------------------------------
// Push: the room's program over a WebSocket at the edge (docs/push.md), played by web/push.js

/** Play the push stream; `handOver` (default) makes it the page's tier at once (a move starts it
 * beside the current path instead, silent until the cross-fade). */
function startPush(handOver = true) {
  if (amphi.push || !amphi.route) return;
  if (!window.AmphiPush || !window.AmphiPush.supported()) {
    setNotice("This browser has no WebCodecs audio decoder; listening via HLS.", "warn");
    amphi.wantPush = false;
    amphi.wantHls = true;
    startHls();
    return;
  }
  const a = audioGraph();
  // The route answer names the push stream (older routers did not: derive it from ws_url).
  const url = new URL(amphi.route.push_url || amphi.route.ws_url);
  if (!amphi.route.push_url) url.pathname = `/v1/rooms/${amphi.room}/push`;
  url.search = "";
  url.searchParams.set("token", amphi.token);
  // Over WebTransport when the edge offers it (the route answer names it and, for the edge's own
  // short-lived certificate, its hash), unless the page asks for the WebSocket (#push=websocket).
  const webtransport =
    amphi.route.webtransport_url && amphi.pushTransport !== "websocket"
      ? { url: amphi.route.webtransport_url, certSha256: amphi.route.webtransport_cert_sha256 || null }
      : null;
  amphi.push = window.AmphiPush.play({
    url: url.href,
    webtransport,
    ctx: a.ctx,
    destination: a.pushGain,
    targetMs: 150,
  });
  if (!handOver) return;
  stopHls();
  setListenMode("push");
}

function stopPush() {
  if (amphi.push) amphi.push.stop();
  amphi.push = null;
}

// ---------------------------------------------------------------------------------------------
// LL-HLS: native where the browser says it can play HLS, else hls.js (light build, vendored)

async function startHls() {
  if (!amphi.info || amphi.hlsStarted) return;
  amphi.hlsStarted = true;
  const url = amphi.info.hls_url;
  const el = $("#hls-audio");
  const a = audioGraph();
  if (!a.hlsSource) {
    a.hlsSource = a.ctx.createMediaElementSource(el);
    a.hlsSource.connect(a.hlsGain);
  }
  try {
    if (el.canPlayType("application/vnd.apple.mpegurl") && !amphi.nativeHlsFailed) {
      amphi.hlsEngine = "native";
      el.src = url;
      // `url` is the main multivariant playlist: AAC-LC only, so the player never switches
      // codecs (Chromium's native player cannot). A native player that still fails falls back
      // to hls.js once.
      el.addEventListener(
        "error",
        () => {
          if (amphi.hlsEngine !== "native" || !amphi.hlsStarted) return;
          console.warn(`native HLS failed (${el.error && el.error.message}); using hls.js`);
          amphi.nativeHlsFailed = true;
          stopHls();
          startHls();
        },
        { once: true }
      );
    } else {
      if (!window.Hls) await loadScript("/vendor/hls.light.min.js");
      if (!window.Hls || !window.Hls.isSupported()) throw new Error("this browser cannot play HLS");
      amphi.hlsEngine = "hls.js";
      const hls = new window.Hls({ lowLatencyMode: true, backBufferLength: 30 });
      amphi.hls = hls;
      hls.on(window.Hls.Events.ERROR, (_ev, data) => {
        if (!data.fatal) return;
        if (data.type === window.Hls.ErrorTypes.NETWORK_ERROR && amphi.hls === hls) {
          setTimeout(() => amphi.hls === hls && hls.startLoad(), 1000);
        } else if (data.type === window.Hls.ErrorTypes.MEDIA_ERROR) {
          hls.recoverMediaError();
        } else {
          reportError(new Error(`HLS playback failed: ${data.details}`));
        }
      });
      // One codec per multivariant playlist: hls.js gets the Opus one where MSE plays Opus in
      // MP4 (no transcoding, 200 ms parts), else the AAC-LC one.
      const opus = window.MediaSource && MediaSource.isTypeSupported('audio/mp4; codecs="opus"');
      hls.loadSource(url.replace(/\/index\.m3u8$/, opus ? "/index-opus.m3u8" : "/index-aac.m3u8"));
      hls.attachMedia(el);
      amphi.stopLatencyKeeper = window.AmphiLatency.keep(hls, el);
    }
    setListenMode("hls");
    await el.play().catch(() => checkAudioUnlocked());
    checkAudioUnlocked();
  } catch (e) {
    amphi.hlsStarted = false;
    reportError(e);
  }
}

function stopHls() {
  amphi.hlsStarted = false;
  amphi.hlsEngine = null;
  if (amphi.stopLatencyKeeper) amphi.stopLatencyKeeper();
  amphi.stopLatencyKeeper = null;
  if (amphi.hls) amphi.hls.destroy();
  amphi.hls = null;
  const el = $("#hls-audio");
  el.pause();
  el.removeAttribute("src");
  el.load();
}

// ---------------------------------------------------------------------------------------------
// latency estimate

let jbPrev = new Map();

async function updateLatency() {
  let ms = null;
  try {
    if (amphi.listenMode === "webrtc" && amphi.pc) {
      const stats = await amphi.pc.getStats();
      let rtt = null;
      let jbSum = 0;
      let jbN = 0;
      stats.forEach((r) => {
        if (r.type === "candidate-pair" && r.nominated && r.currentRoundTripTime != null) rtt = r.currentRoundTripTime;
        if (r.type === "inbound-rtp" && r.kind === "audio" && r.jitterBufferEmittedCount) {
          const prev = jbPrev.get(r.id) || { d: 0, n: 0 };
          const dn = r.jitterBufferEmittedCount - prev.n;
          if (dn > 0) {
            jbSum += (r.jitterBufferDelay - prev.d) / dn;
            jbN += 1;
          }
          jbPrev.set(r.id, { d: r.jitterBufferDelay, n: r.jitterBufferEmittedCount });
        }
      });
      if (jbN > 0) {
        // Both network legs (the speaker's and mine, estimated by my round trip), the jitter
        // buffer, and one 20 ms Opus frame of packetization.
        ms = ((rtt || 0) + jbSum / jbN + 0.02) * 1000;
      } else if (rtt != null) {
        // Nothing to hear yet (e.g. the only speaker is me): both network legs estimated by my
        // round trip plus one Opus frame, without a jitter buffer.
        ms = (rtt + 0.02) * 1000;
      }
    } else if (amphi.listenMode === "hls") {
      const el = $("#hls-audio");
      if (amphi.hls && amphi.hls.playingDate) {
        ms = Date.now() - amphi.hls.playingDate.getTime();
      } else if (amphi.hls && Number.isFinite(amphi.hls.latency) && amphi.hls.latency > 0) {
        ms = amphi.hls.latency * 1000;
      } else if (el.getStartDate && !el.paused) {
        const start = el.getStartDate().getTime();
        if (Number.isFinite(start)) ms = Date.now() - (start + el.currentTime * 1000);
      }
    }
  } catch {
    ms = null;
  }
  amphi.latencyMs = ms == null || !Number.isFinite(ms) ? null : Math.max(0, Math.round(ms));
  $("#latency").textContent = amphi.latencyMs == null ? "—" : amphi.latencyMs >= 1000 ? `≈${(amphi.latencyMs / 1000).toFixed(1)} s` : `≈${amphi.latencyMs} ms`;
}

// ---------------------------------------------------------------------------------------------
// signaling

function send(msg) {
  if (amphi.ws && amphi.ws.readyState === WebSocket.OPEN) {
    amphi.ws.send(JSON.stringify(msg));
    return true;
  }
  showError("Not connected to the room.");
  return false;
}
amphi.send = send;

let pingTimer = null;
let reconnectTimer = null;

function connect() {
  if (amphi.closedReason) return;
  const url = new URL(amphi.route.ws_url);
  url.searchParams.set("token", amphi.token);
  amphi.phase = "connecting";
  setStatus("connecting");
  const ws = new WebSocket(url.href);
  amphi.ws = ws;
  let joined = false;
  ws.addEventListener("open", () => ws.send(JSON.stringify({ type: "join" })));
  ws.addEventListener("message", (ev) => {
    if (amphi.ws !== ws) return;
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch {
      return;
    }
    if (msg.type === "snapshot") {
      joined = true;
      amphi.reconnects = 0;
    }
    handle(msg);
  });
  ws.addEventListener("close", (ev) => {
    if (amphi.ws !== ws) return;
    amphi.ws = null;
    clearInterval(pingTimer);
    if (amphi.closedReason) return;
    // The edge closes with these codes after sending the matching event (in case it was lost).
    if (ev.code === 4001) return onKicked({ id: amphi.me, by: null });
    if (ev.code === 4002) return onEnded({ by: null });
    if (ev.code === 4008) return fail("Disconnected for sending too many messages.");
    if (ev.code === 4003) return onTokenEnd("token_revoked");
    if (ev.code === 4004) return onTokenEnd("token_expired");
    closePeer();
    amphi.phase = "connecting";
    if (!joined && amphi.listenMode === "hls") {
      // A passive listener whose edge has no room for another session keeps listening.
      amphi.phase = "idle";
      setStatus("HLS only");
      setNotice("Listening over HLS. Chat and raising a hand are unavailable right now (the edge is full).", "warn");
      return render();
    }
    if (!joined && amphi.reconnects >= 2) {
      // Refused at the door (bad token, unknown room, edge down): say so rather than loop.
      fail(`Could not join the room (connection closed${ev.code ? `, code ${ev.code}` : ""}).`);
      return;
    }
    reconnectSoon();
  });
  clearInterval(pingTimer);
  pingTimer = setInterval(() => send({ type: "ping" }), 15000);
}

// Edges this page lost or could not join lately (edge id -> Date.now()), sent to the router as
// `avoid` so a dead edge is skipped before the router has missed its heartbeats.
const failedEdges = new Map();
const AVOID_MS = 30000;

function reconnectSoon() {
  if (amphi.closedReason || reconnectTimer) return;
  if (amphi.reconnects >= RECONNECT_LIMIT) {
    fail("Lost the connection to the room. Check your network and press Rejoin.");
    return;
  }
  // The first try goes at once (the edge may have died: the router sends us to another one);
  // later ones back off.
  const delay = amphi.reconnects === 0 ? 0 : Math.min(5000, 250 * 2 ** amphi.reconnects);
  if (amphi.route && amphi.route.edge) failedEdges.set(amphi.route.edge, Date.now());
  amphi.reconnects += 1;
  setStatus("reconnecting");
  reconnectTimer = setTimeout(async () => {
    reconnectTimer = null;
    if (amphi.ws) {
      const old = amphi.ws;
      amphi.ws = null;
      old.close();
    }
    closePeer();
    await reroute();
    connect();
  }, delay);
}

// Ask the router again where to connect, avoiding the edges that failed lately; on any error
// keep the current route.
async function reroute() {
  if (!amphi.routeQuery) return;
  const now = Date.now();
  for (const [edge, at] of failedEdges) if (now - at > AVOID_MS) failedEdges.delete(edge);
  const q = new URLSearchParams(amphi.routeQuery);
  const avoid = [...failedEdges.keys()].slice(-8);
  if (avoid.length) q.set("avoid", avoid.join(","));
  try {
    const route = await api(`/v1/route?${q}`);
    if (route && route.ws_url) {
      amphi.route = route;
      $("#region").textContent = route.region;
    }
  } catch {
    // The router is unreachable: try the edge we know.
  }
}

function record(msg) {
  amphi.events.push({ at: performance.now(), ...msg, sdp: undefined });
  if (amphi.events.length > MAX_EVENTS) amphi.events.splice(0, amphi.events.length - MAX_EVENTS);
}

function handle(msg) {
  record(msg);
  switch (msg.type) {
    case "snapshot":
      return onSnapshot(msg);
    case "answer":
      if (pendingAnswer) {
        clearTimeout(pendingAnswer.timer);
        pendingAnswer.resolve(msg.sdp);
        pendingAnswer = null;
      }
      return;
    case "active_speakers":
      amphi.active = new Map(msg.speakers.map((s) => [s.id, s.level]));
      amphi.activeAt = performance.now();
      return renderActive();
    case "error":
      return onError(msg);
    case "pong":
      return;
    case "token_refreshed":
      amphi.tokenRefreshes += 1;
      return scheduleRefresh();
    case "participant_joined":
      amphi.participants.set(msg.participant.id, msg.participant);
      return render();
    case "participant":
      // A large room's listener we had not been sent, before an event about it.
      amphi.participants.set(msg.participant.id, msg.participant);
      return;
    case "counts":
      amphi.counts = msg.counts;
      return render();
    case "participants":
      for (const p of msg.participants) amphi.participants.set(p.id, p);
      amphi.counts = msg.counts;
      amphi.listAfter = msg.next;
      amphi.listDone = msg.next == null;
      return render();
    case "participant_left":
      amphi.participants.delete(msg.id);
      amphi.hands = amphi.hands.filter((h) => h !== msg.id);
      return render();
    case "role_changed":
      return onRoleChanged(msg);
    case "hand_raised":
      if (!amphi.hands.includes(msg.id)) amphi.hands.push(msg.id);
      if (msg.id === amphi.me) prewarm();
      return render();
    case "hand_lowered":
      amphi.hands = amphi.hands.filter((h) => h !== msg.id);
      return render();
    case "muted":
      return onMuted(msg);
    case "unmuted":
      return onUnmuted(msg);
    case "chat":
      return addChat(msg);
    case "reaction":
      return addReaction(msg);
    case "move":
      return onMove(msg);
    case "kicked":
      return onKicked(msg);
    case "ended":
      return onEnded(msg);
    case "reported":
      return onReported(msg.report);
    default:
      return;
  }
}

function onSnapshot({ you, state, counts, partial }) {
  amphi.me = you;
  scheduleRefresh();
  amphi.participants = new Map(state.participants.map((p) => [p.id, p]));
  amphi.counts = counts || null;
  amphi.partial = !!partial;
  amphi.listAfter = null;
  amphi.listDone = !partial;
  amphi.hands = state.hands.slice();
  amphi.phase = "joined";
  const mine = amphi.participants.get(you);
  amphi.role = mine ? mine.role : amphi.claims && amphi.claims.role;
  if (state.phase === "ended") return onEnded({ by: null });
  setStatus("joined");
  render();
  const listenerOnly = !PUBLISHERS.has(amphi.role);
  if (amphi.wantPush && listenerOnly) startPush();
  else if (amphi.wantHls && listenerOnly) startHls();
  else startWebRtc();
  // A new signaling session (a reconnect) on a tier already playing: tell the edge again.
  sayListening();
}

function onRoleChanged({ id, role, by }) {
  const p = amphi.participants.get(id);
  if (p) p.role = role;
  if (id === amphi.me) {
    const before = amphi.role;
    amphi.role = role;
    const byName = by === id ? "you" : participantName(by);
    if (PUBLISHERS.has(role) && !PUBLISHERS.has(before)) {
      setNotice(`${byName} invited you to speak. You're on stage${role === "cohost" ? " as a co-host" : ""}.`, "info");
      goOnStage();
    } else if (!PUBLISHERS.has(role) && PUBLISHERS.has(before)) {
      setNotice(by === id ? "You moved to the audience." : `${byName} moved you back to the audience.`, "info");
      stopSending();
    } else {
      setNotice(`Your role is now ${role}.`, "info");
    }
  }
  render();
}

/** Promoted: listen over WebRTC (if I was on HLS) and add my microphone on the same connection. */
async function goOnStage() {
  amphi.wantHls = false;
  amphi.wantPush = false;
  stopPush();
  try {
    if (!amphi.pc) {
      await startWebRtc();
    } else {
      stopHls();
      setListenMode("webrtc");
      await startSending();
    }
  } catch (e) {
    reportError(e);
  }
}

/** A passive listener raised a hand: set up the receive-only WebRTC session now so promotion is quick. */
function prewarm() {
  if (amphi.pc || PUBLISHERS.has(amphi.role)) return;
  createPeer();
  negotiate().catch(() => closePeer());
}

function onMuted({ id, by }) {
  const p = amphi.participants.get(id);
  if (p) p.muted = true;
  if (id === amphi.me) {
    if (by !== amphi.me) setNotice(`${participantName(by)} muted you. Unmute when you're ready to talk again.`, "warn");
    if (amphi.mic && !amphi.keepMicOnMute) amphi.mic.getAudioTracks().forEach((t) => (t.enabled = false));
  }
  render();
}

function onUnmuted({ id }) {
  const p = amphi.participants.get(id);
  if (p) p.muted = false;
  if (id === amphi.me) {
    if (amphi.mic) amphi.mic.getAudioTracks().forEach((t) => (t.enabled = true));
    if (amphi.notice.includes("muted you")) setNotice("");
  }
  render();
}

function onKicked({ id, by }) {
  if (id !== amphi.me) {
    amphi.participants.delete(id);
    amphi.hands = amphi.hands.filter((h) => h !== id);
    return render();
  }
  close("kicked", `${by == null ? "A moderator" : participantName(by)} removed you from this room. You can't rejoin until the room ends.`, "error");
}

/** Reports shown to a host or co-host (the edge sends them to moderators only). */
const MAX_REPORTS = 20;
const REPORT_REASONS = {
  spam: "Spam",
  harassment: "Harassment",
  hate: "Hate speech",
  violence: "Violence or threats",
  sexual: "Sexual content",
  self_harm: "Self-harm",
  impersonation: "Impersonation",
  other: "Something else",
};

function reportTargetLabel(report) {
  if (report.target === "room") return "the room";
  return report.target_name || report.target.user;
}

function onReported(report) {
  amphi.reports.unshift(report);
  amphi.reports.length = Math.min(amphi.reports.length, MAX_REPORTS);
  const at = report.program_ms != null ? ` at ${Math.floor(report.program_ms / 60000)}:${String(Math.floor(report.program_ms / 1000) % 60).padStart(2, "0")} of the recording` : "";
  setNotice(`${report.reporter_name || report.reporter} reported ${reportTargetLabel(report)} (${REPORT_REASONS[report.reason] || report.reason})${at}.`, "warn");
  render();
}

/** Open the report dialog for a participant id, or the room (`null`). */
function openReport(id) {
  const p = id == null ? null : amphi.participants.get(id);
  if (id != null && !p) return;
  amphi.reportTarget = p ? { user: p.user } : "room";
  $("#report-what").textContent = p ? p.name : "this room";
  $("#report-reason").value = "spam";
  $("#report-text").value = "";
  $("#report-dialog").hidden = false;
  $("#report-reason").focus();
}

function closeReport() {
  amphi.reportTarget = null;
  $("#report-dialog").hidden = true;
}

function onEnded({ by }) {
  const who = by != null && by !== amphi.me ? ` by ${participantName(by)}` : "";
  close("ended", `This room has ended${who}. Thanks for listening!`, "info");
}

function onError({ code, message }) {
  amphi.errors.push({ code, message });
  if (code === "token_revoked" || code === "token_expired") return onTokenEnd(code);
  if (code === "banned") {
    return close("banned", "You were removed from this room and can't rejoin until it ends.", "error");
  }
  if (code === "room_ended") return onEnded({ by: null });
  if (pendingAnswer && code !== "rate_limited") {
    clearTimeout(pendingAnswer.timer);
    pendingAnswer.reject(Object.assign(new Error(message || code), { code }));
    pendingAnswer = null;
    return;
  }
  if (amphi.phase !== "joined") {
    return close("failed", `Could not join the room: ${message || code}.`, "error");
  }
  const friendly = {
    rate_limited: "Slow down: you're sending too fast. Try again in a few seconds.",
    forbidden: `Not allowed: ${message}`,
  };
  showError(friendly[code] || `${message || code}`);
  setTimeout(() => $("#error").textContent.startsWith(friendly[code] || message || code) && showError(""), 6000);
}

// ---------------------------------------------------------------------------------------------
// token lifetime: the edge ends a session once its token's `exp` has passed (plus a short grace).
// Before then the page mints a new token for the same user through the router (the path it
// joined with) and hands it to the edge (`refresh_token`). Host tokens come with the room and
// cannot be minted again: a host session lasts its token's lifetime (the router's token_ttl_secs).

let refreshTimer = null;
/** Seconds before `exp` the token is replaced (at most; a quarter of short lifetimes). */
const REFRESH_MARGIN_S = 60;

function scheduleRefresh() {
  clearTimeout(refreshTimer);
  refreshTimer = null;
  const c = amphi.claims;
  if (!c || !c.exp || c.role === "host" || amphi.closedReason) return;
  const lifetime = Math.max(0, c.exp - (c.iat || c.exp));
  const margin = Math.min(REFRESH_MARGIN_S, Math.max(1, lifetime / 4));
  const inMs = Math.max(0, (c.exp - margin) * 1000 - Date.now());
  refreshTimer = setTimeout(refreshToken, Math.min(inMs, 2 ** 31 - 1));
}

async function refreshToken() {
  refreshTimer = null;
  const c = amphi.claims;
  if (!c || amphi.closedReason) return;
  try {
    const { token } = await api(`/v1/rooms/${amphi.room}/tokens`, {
      method: "POST",
      body: JSON.stringify({ role: c.role, name: c.name, user_id: c.sub }),
    });
    // Reconnects use the new token too; the edge answers `token_refreshed` (which schedules the
    // next refresh) or an error.
    amphi.token = token;
    amphi.claims = decodeClaims(token);
    sessionStorage.setItem(`amphi:${amphi.room}`, JSON.stringify({ token }));
    amphi.refreshError = null;
    send({ type: "refresh_token", token });
  } catch (e) {
    amphi.refreshError = e.message;
  }
}

function onTokenEnd(code) {
  // The saved token is no good any more: a Rejoin mints a new one.
  sessionStorage.removeItem(`amphi:${amphi.room}`);
  if (code === "token_revoked") {
    return close("revoked", "Your access to this room was revoked.", "error");
  }
  return close("expired", "Your session expired. Reload the room to rejoin.", "error");
}

/** Leave the room for good (kicked, banned, ended, left): stop media, show why. */
function close(reason, text, kind) {
  clearTimeout(refreshTimer);
  refreshTimer = null;
  amphi.closedReason = reason;
  amphi.phase = "closed";
  setNotice(text, kind);
  clearInterval(pingTimer);
  clearTimeout(reconnectTimer);
  reconnectTimer = null;
  closePeer();
  stopMic();
  // A passive listener keeps hearing the last seconds of an ended room until the playlist ends.
  if (!(reason === "ended" && amphi.listenMode === "hls")) {
    stopHls();
    stopPush();
    setListenMode(null);
  }
  if (amphi.ws) {
    const ws = amphi.ws;
    amphi.ws = null;
    ws.close();
  }
  setStatus(reason);
  render();
}

function fail(text) {
  close("failed", text, "error");
}

function reportError(e) {
  console.error(e);
  showError(e.message || String(e));
}

// ---------------------------------------------------------------------------------------------
// rendering

function canModerate(target) {
  if (!MODERATORS.has(amphi.role) || amphi.phase !== "joined" || !target || target.id === amphi.me) return false;
  if (target.role === "host") return false;
  if (amphi.role === "cohost" && target.role === "cohost") return false;
  return true;
}

function actionButton(action, id, label, extra = "") {
  const b = document.createElement("button");
  b.type = "button";
  b.className = `small ${extra}`;
  b.dataset.action = action;
  b.dataset.id = String(id);
  b.textContent = label;
  return b;
}

function personItem(p) {
  const li = document.createElement("li");
  li.className = "person";
  li.dataset.id = String(p.id);
  li.dataset.role = p.role;
  if (p.id === amphi.me) li.classList.add("me");
  if (p.muted) li.classList.add("is-muted");
  const avatar = document.createElement("span");
  avatar.className = "avatar";
  avatar.textContent = (p.name || "?").slice(0, 1).toUpperCase();
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = p.name + (p.id === amphi.me ? " (you)" : "");
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = [p.role !== "listener" && p.role !== "speaker" ? p.role : "", p.region, p.muted ? "🔇" : "", amphi.hands.includes(p.id) ? "✋" : ""]
    .filter(Boolean)
    .join(" · ");
  li.append(avatar, name, meta);
  const tools = document.createElement("span");
  tools.className = "tools";
  if (canModerate(p)) {
    if (p.role === "listener") {
      tools.append(actionButton("promote", p.id, "Invite to speak"));
    } else {
      if (!p.muted) tools.append(actionButton("mute", p.id, "Mute"));
      if (amphi.role === "host" && p.role === "speaker") tools.append(actionButton("make-cohost", p.id, "Make co-host", "ghost"));
      if (amphi.role === "host" && p.role === "cohost") tools.append(actionButton("make-speaker", p.id, "Make speaker", "ghost"));
      tools.append(actionButton("demote", p.id, "Move to audience", "ghost"));
    }
    tools.append(actionButton("kick", p.id, "Remove", "danger"));
  }
  // Anyone may report anyone else.
  if (amphi.phase === "joined" && p.id !== amphi.me) tools.append(actionButton("report", p.id, "Report", "ghost"));
  if (tools.childElementCount > 0) li.append(tools);
  return li;
}

function render() {
  const people = [...amphi.participants.values()];
  const speakers = people.filter((p) => PUBLISHERS.has(p.role));
  const listeners = people.filter((p) => !PUBLISHERS.has(p.role));
  $("#speakers").replaceChildren(...speakers.map(personItem));
  $("#listeners").replaceChildren(...listeners.map(personItem));
  $("#listener-count").textContent = String(
    amphi.partial && amphi.counts ? amphi.counts.listeners : listeners.length,
  );
  $("#more-listeners").hidden = !amphi.partial || amphi.listDone;
  $("#role").textContent = amphi.role || (amphi.claims && amphi.claims.role) || "…";

  const moderator = MODERATORS.has(amphi.role) && amphi.phase === "joined";
  $("#hands-panel").hidden = !moderator;
  const hands = $("#hands");
  hands.replaceChildren();
  for (const id of amphi.hands) {
    const p = amphi.participants.get(id);
    const li = document.createElement("li");
    li.dataset.id = String(id);
    const name = document.createElement("span");
    name.textContent = p ? p.name : `#${id}`;
    li.append(name);
    if (moderator) li.append(actionButton("promote", id, "Invite to speak"), actionButton("lower", id, "Lower", "ghost"));
    hands.append(li);
  }
  $("#no-hands").hidden = amphi.hands.length > 0;
  $("#reports-panel").hidden = !moderator || amphi.reports.length === 0;
  $("#reports").replaceChildren(
    ...amphi.reports.map((r) => {
      const li = document.createElement("li");
      li.textContent = `${r.reporter_name || r.reporter} → ${reportTargetLabel(r)}: ${REPORT_REASONS[r.reason] || r.reason}${r.text ? ` — “${r.text}”` : ""}`;
      return li;
    }),
  );
  renderControls();
  renderActive();
}

/** Whether my microphone is captured, sent and not muted: what the "mic live" badge shows. */
function micLive() {
  const meP = amphi.participants.get(amphi.me);
  return !!(amphi.mic && amphi.sending && !(meP && meP.muted) && amphi.mic.getAudioTracks().some((t) => t.enabled));
}

function renderControls() {
  const joined = amphi.phase === "joined";
  const publisher = PUBLISHERS.has(amphi.role);
  const meP = amphi.participants.get(amphi.me);
  const muted = !!(meP && meP.muted);
  const waiting = joined && publisher && !amphi.micConsent && !amphi.mic;
  $("#start-speaking").hidden = !waiting;
  const live = joined && micLive();
  const badge = $("#mic-state");
  badge.hidden = !(joined && publisher);
  badge.textContent = live ? "● mic live" : "mic off";
  badge.className = `badge ${live ? "mic-live" : "mic-off"}`;
  const handUp = amphi.hands.includes(amphi.me);
  $("#mute").hidden = !(joined && publisher && !muted) || waiting;
  $("#unmute").hidden = !(joined && publisher && (muted || (amphi.micError && !amphi.mic))) || waiting;
  $("#raise-hand").hidden = !(joined && !publisher && !handUp);
  $("#lower-hand").hidden = !(joined && !publisher && handUp);
  $("#switch-hls").hidden = !(joined && !publisher && amphi.listenMode === "webrtc");
  $("#switch-webrtc").hidden = !(joined && !publisher && (amphi.listenMode === "hls" || amphi.listenMode === "push"));
  $("#switch-push").hidden = !(joined && !publisher && amphi.listenMode !== "push");
  $("#end-room").hidden = !(joined && amphi.role === "host");
  $("#report-room").hidden = !joined;
  $("#step-down").hidden = !(joined && (amphi.role === "speaker" || amphi.role === "cohost"));
  $("#rejoin").hidden = amphi.closedReason !== "failed";
  $("#leave").textContent = amphi.closedReason ? "Back to lobby" : "Leave";
  for (const el of document.querySelectorAll("#chat-form input, #chat-form button, #reactions button")) el.disabled = !joined;
}

function renderActive() {
  const fresh = performance.now() - amphi.activeAt < 1000;
  for (const li of document.querySelectorAll("#speakers .person")) {
    const level = fresh ? amphi.active.get(Number(li.dataset.id)) : undefined;
    const speaking = level !== undefined && level < 127;
    li.classList.toggle("speaking", speaking);
    // RFC 6464: 0 dBov loudest, 127 silent; a thicker ring for louder speech.
    li.style.setProperty("--ring", speaking ? `${Math.max(2, 6 - Math.floor(level / 16))}px` : "0px");
  }
}

function addChat({ from, name, text, at_ms }) {
  const li = document.createElement("li");
  if (from === amphi.me) li.className = "mine";
  const who = document.createElement("b");
  who.textContent = name || participantName(from);
  const when = document.createElement("time");
  when.textContent = new Date(at_ms || Date.now()).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  const body = document.createElement("span");
  body.textContent = text;
  li.append(who, " ", body, " ", when);
  const log = $("#chat-log");
  log.append(li);
  while (log.children.length > MAX_CHAT_ITEMS) log.firstChild.remove();
  log.scrollTop = log.scrollHeight;
}

function addReaction({ from, emoji }) {
  const span = document.createElement("span");
  span.className = "reaction";
  span.textContent = emoji;
  span.title = participantName(from);
  span.style.left = `${10 + Math.random() * 70}%`;
  $("#reaction-stream").append(span);
  setTimeout(() => span.remove(), 3000);
}

// ---------------------------------------------------------------------------------------------
// entering and leaving a room

async function tokenFor(room) {
  const params = hashParams();
  let token = params.get("token");
  const saved = JSON.parse(sessionStorage.getItem(`amphi:${room}`) || "null");
  if (!token && saved) token = saved.token;
  if (!token) {
    const name = myName() || `guest-${Math.floor(Math.random() * 1e4)}`;
    ({ token } = await api(`/v1/rooms/${room}/tokens`, {
      method: "POST",
      body: JSON.stringify({ role: "listener", name }),
    }));
  }
  sessionStorage.setItem(`amphi:${room}`, JSON.stringify({ token }));
  return token;
}

function resetRoomState() {
  clearTimeout(reconnectTimer);
  reconnectTimer = null;
  clearTimeout(refreshTimer);
  refreshTimer = null;
  clearInterval(pingTimer);
  if (amphi.ws) {
    const ws = amphi.ws;
    amphi.ws = null;
    ws.close();
  }
  closePeer();
  stopMic();
  stopHls();
  stopPush();
  Object.assign(amphi, {
    me: null,
    role: null,
    participants: new Map(),
    hands: [],
    phase: "idle",
    closedReason: null,
    sending: false,
    reconnects: 0,
    routeQuery: null,
    active: new Map(),
    micError: null,
    micConsent: false,
    reports: [],
    reportTarget: null,
    moving: null,
    moves: [],
  });
  closeReport();
  jbPrev = new Map();
  setListenMode(null);
  setNotice("");
  showError("");
  $("#chat-log").replaceChildren();
}

async function enterRoom(room) {
  resetRoomState();
  amphi.room = room;
  $("#lobby").hidden = true;
  $("#room").hidden = false;
  $("#room-id").textContent = room;
  amphi.wantHls = hashParams().get("listen") === "hls";
  amphi.wantPush = hashParams().get("listen") === "push";
  amphi.pushTransport = hashParams().get("push");
  // A tier the person chose (listen= or the switch buttons) is kept; one the router chose is
  // moved up when a seat frees.
  amphi.tierPinned = hashParams().has("listen");
  try {
    amphi.info = await api(`/v1/rooms/${room}`);
    $("#room-title").textContent = amphi.info.title;
    $("#room-topic").textContent = amphi.info.topic ? `${amphi.info.topic} · ` : "";
    $("#hls").href = amphi.info.hls_url;
    $("#hls").textContent = amphi.info.hls_url;
    if (amphi.info.status === "ended") {
      amphi.closedReason = "ended";
      setNotice("This room has ended.", "info");
      render();
      return;
    }
    amphi.token = await tokenFor(room);
    amphi.claims = decodeClaims(amphi.token);
    amphi.role = amphi.claims ? amphi.claims.role : null;
    render();
    const region = regionOverride();
    const q = new URLSearchParams({ room });
    if (amphi.role) q.set("role", amphi.role);
    if (region) q.set("region", region);
    amphi.routeQuery = q.toString();
    amphi.route = await api(`/v1/route?${q}`);
    $("#region").textContent = amphi.route.region;
    audioGraph();
    if (amphi.route.mode === "push" && amphi.role === "listener" && !amphi.wantHls) {
      amphi.wantPush = true;
      setNotice("The interactive seats near you are full: you're listening to the room's live stream (a fraction of a second behind).", "info");
    }
    if (amphi.route.mode === "hls" && amphi.role === "listener") {
      amphi.wantHls = true;
      amphi.wantPush = false;
      setNotice("The interactive seats near you are full: you're listening over HLS (a second or two behind).", "info");
    }
    if (amphi.wantHls && amphi.role === "listener") startHls();
    connect();
  } catch (e) {
    fail(`Could not open the room: ${e.message}`);
  }
}

function route() {
  const room = hashParams().get("room");
  regionOverride();
  if (!room) {
    resetRoomState();
    amphi.room = null;
    $("#lobby").hidden = false;
    $("#room").hidden = true;
    return loadRooms();
  }
  if (room !== amphi.room || amphi.phase === "idle" || amphi.closedReason) return enterRoom(room);
}

// ---------------------------------------------------------------------------------------------
// wiring

$("#my-name").value = localStorage.getItem("amphi:name") || "";
$("#original-sound").checked = localStorage.getItem("amphi:original-sound") === "1";
$("#original-sound").addEventListener("change", () => {
  localStorage.setItem("amphi:original-sound", $("#original-sound").checked ? "1" : "0");
  reapplyMic().catch(reportError);
});
$("#my-name").addEventListener("change", () => localStorage.setItem("amphi:name", $("#my-name").value.trim()));

$("#create-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  showError("");
  $("#create").disabled = true;
  try {
    const topic = $("#topic").value.trim();
    const created = await api("/v1/rooms", {
      method: "POST",
      body: JSON.stringify({ title: $("#title").value.trim(), topic: topic || null, host_name: myName() || null }),
    });
    sessionStorage.setItem(`amphi:${created.room}`, JSON.stringify({ token: created.host_token }));
    location.hash = `room=${created.room}`;
  } catch (e) {
    showError(`Could not create the room: ${e.message}`);
  } finally {
    $("#create").disabled = false;
  }
});
$("#refresh").addEventListener("click", loadRooms);

$("#start-speaking").addEventListener("click", async () => {
  amphi.micConsent = true;
  renderControls();
  try {
    if (!amphi.pc) await startWebRtc();
    else await startSending();
  } catch (e) {
    reportError(e);
  }
});
$("#mute").addEventListener("click", () => send({ type: "mute" }));
$("#unmute").addEventListener("click", async () => {
  if (!amphi.mic && PUBLISHERS.has(amphi.role)) await startSending();
  const meP = amphi.participants.get(amphi.me);
  if (meP && meP.muted) send({ type: "unmute" });
});
$("#raise-hand").addEventListener("click", () => send({ type: "raise_hand" }));
// A large room's listeners, one page per click (the snapshot leaves them out).
$("#more-listeners").addEventListener("click", () =>
  send({ type: "list_participants", after: amphi.listAfter, limit: 200 }),
);
$("#step-down").addEventListener("click", () => send({ type: "demote", target: amphi.me }));
$("#lower-hand").addEventListener("click", () => send({ type: "lower_hand" }));
$("#end-room").addEventListener("click", () => {
  if (confirm("End the room for everyone?")) send({ type: "end" });
});
$("#leave").addEventListener("click", () => {
  if (!amphi.closedReason) close("left", "You left the room.", "info");
  location.hash = "";
});
$("#rejoin").addEventListener("click", () => enterRoom(amphi.room));
$("#enable-sound").addEventListener("click", () => {
  if (amphi.audio) amphi.audio.ctx.resume().then(checkAudioUnlocked);
  const el = $("#hls-audio");
  if (amphi.listenMode === "hls") el.play().catch(() => {});
});
$("#switch-hls").addEventListener("click", () => {
  amphi.tierPinned = true;
  amphi.wantHls = true;
  amphi.wantPush = false;
  closePeer();
  stopPush();
  startHls();
});
$("#switch-push").addEventListener("click", () => {
  amphi.tierPinned = true;
  amphi.wantPush = true;
  amphi.wantHls = false;
  closePeer();
  startPush();
});
$("#switch-webrtc").addEventListener("click", () => {
  amphi.tierPinned = true;
  amphi.wantHls = false;
  amphi.wantPush = false;
  stopPush();
  startWebRtc();
});
$("#chat-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("#chat-text").value.trim();
  if (text && send({ type: "chat", text })) $("#chat-text").value = "";
});
$("#reactions").addEventListener("click", (ev) => {
  const b = ev.target.closest("button[data-emoji]");
  if (b) send({ type: "react", emoji: b.dataset.emoji });
});
$("#room").addEventListener("click", (ev) => {
  const b = ev.target.closest("button[data-action]");
  if (!b) return;
  const target = Number(b.dataset.id);
  switch (b.dataset.action) {
    case "promote":
      return send({ type: "promote", target });
    case "make-cohost":
      return send({ type: "promote", target, role: "cohost" });
    case "make-speaker":
      return send({ type: "promote", target, role: "speaker" });
    case "demote":
      return send({ type: "demote", target });
    case "mute":
      return send({ type: "mute", target });
    case "lower":
      return send({ type: "lower_hand", target });
    case "kick":
      return send({ type: "kick", target });
    case "report":
      return openReport(target);
  }
});
$("#report-room").addEventListener("click", () => openReport(null));
$("#report-cancel").addEventListener("click", closeReport);
$("#report-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const target = amphi.reportTarget;
  if (!target) return closeReport();
  const msg = { type: "report", target, reason: $("#report-reason").value, text: $("#report-text").value.trim() };
  if (send(msg)) setNotice("Report sent. The room's hosts and the moderators will see it.");
  closeReport();
});
document.addEventListener("click", () => amphi.audio && amphi.audio.ctx.state === "suspended" && checkAudioUnlocked());
$("#hls-audio").addEventListener("ended", () => {
  amphi.hlsEnded = true;
});

setInterval(() => {
  if (amphi.phase === "joined" || amphi.listenMode) updateLatency();
  renderActive();
}, 1000);
window.addEventListener("hashchange", route);
route();
