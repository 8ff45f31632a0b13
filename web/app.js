// amphi web client: lobby, room creation, and publishing into a room over WHIP (RFC 9725).
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { room: null, token: null, role: null, pc: null, stream: null, location: null, status: "idle" };
window.amphi = state; // inspected by end-to-end tests

function showError(msg) {
  const el = $("#error");
  el.textContent = msg;
  el.hidden = !msg;
}

function setStatus(s) {
  state.status = s;
  $("#status").textContent = s;
}

async function api(path, options = {}) {
  const resp = await fetch(path, {
    ...options,
    headers: { "Content-Type": "application/json", ...(options.headers || {}) },
  });
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(body.message || `${resp.status} ${resp.statusText}`);
  return body;
}

async function loadRooms() {
  const list = $("#rooms");
  try {
    const { rooms } = await api("/v1/rooms");
    list.replaceChildren();
    if (rooms.length === 0) list.innerHTML = '<li class="muted">no live rooms yet</li>';
    for (const r of rooms) {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.href = `#room=${r.room}`;
      a.textContent = r.title + (r.topic ? ` — ${r.topic}` : "");
      li.append(a);
      list.append(li);
    }
  } catch (e) {
    list.innerHTML = "";
    showError(`Could not load rooms: ${e.message}`);
  }
}

async function enterRoom(room, token, role) {
  state.room = room;
  state.token = token;
  state.role = role;
  sessionStorage.setItem(`amphi:${room}`, JSON.stringify({ token, role }));
  const info = await api(`/v1/rooms/${room}`);
  $("#lobby").hidden = true;
  $("#room").hidden = false;
  $("#room-title").textContent = info.title;
  $("#room-id").textContent = room;
  $("#role").textContent = role;
  $("#hls").href = info.hls_url;
  $("#hls").textContent = info.hls_url;
  $("#speak").disabled = !(role === "host" || role === "speaker");
}

function waitForIceGathering(pc, ms) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") { clearTimeout(t); resolve(); }
    });
  });
}

async function speak() {
  showError("");
  $("#speak").disabled = true;
  try {
    setStatus("routing");
    const route = await api(`/v1/route?room=${state.room}${regionParam()}`);
    $("#region").textContent = route.region;
    setStatus("microphone");
    state.stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const pc = new RTCPeerConnection();
    state.pc = pc;
    for (const track of state.stream.getAudioTracks()) {
      pc.addTransceiver(track, { direction: "sendonly", streams: [state.stream] });
    }
    pc.addEventListener("connectionstatechange", () => setStatus(pc.connectionState));
    await pc.setLocalDescription(await pc.createOffer());
    // The edge is ICE-lite without trickle: send the offer with all candidates.
    await waitForIceGathering(pc, 2000);
    setStatus("publishing");
    const resp = await fetch(route.whip_url, {
      method: "POST",
      headers: { "Content-Type": "application/sdp", Authorization: `Bearer ${state.token}` },
      body: pc.localDescription.sdp,
    });
    if (resp.status !== 201) {
      const err = await resp.json().catch(() => ({}));
      throw new Error(err.message || `WHIP answered ${resp.status}`);
    }
    state.location = new URL(resp.headers.get("Location"), route.whip_url).href;
    await pc.setRemoteDescription({ type: "answer", sdp: await resp.text() });
    $("#stop").disabled = false;
  } catch (e) {
    setStatus("failed");
    showError(`Could not publish: ${e.message}`);
    await stop();
  }
}

async function stop() {
  if (state.location) {
    await fetch(state.location, { method: "DELETE", headers: { Authorization: `Bearer ${state.token}` } }).catch(() => {});
  }
  state.location = null;
  if (state.pc) state.pc.close();
  state.pc = null;
  if (state.stream) state.stream.getTracks().forEach((t) => t.stop());
  state.stream = null;
  if (state.status !== "failed") setStatus("idle");
  $("#stop").disabled = true;
  $("#speak").disabled = !(state.role === "host" || state.role === "speaker");
}

function regionParam() {
  const region = new URLSearchParams(location.hash.slice(1)).get("region");
  return region ? `&region=${encodeURIComponent(region)}` : "";
}

async function route() {
  const params = new URLSearchParams(location.hash.slice(1));
  const room = params.get("room");
  if (!room) {
    $("#lobby").hidden = false;
    $("#room").hidden = true;
    return loadRooms();
  }
  try {
    let token = params.get("token");
    let role = params.get("role");
    const saved = JSON.parse(sessionStorage.getItem(`amphi:${room}`) || "null");
    if (!token && saved) ({ token, role } = saved);
    if (!token) {
      const name = `guest-${Math.floor(Math.random() * 1e4)}`;
      ({ token } = await api(`/v1/rooms/${room}/tokens`, {
        method: "POST",
        body: JSON.stringify({ role: "listener", name }),
      }));
      role = "listener";
    }
    await enterRoom(room, token, role || "listener");
  } catch (e) {
    showError(`Could not open the room: ${e.message}`);
  }
}

$("#create-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  showError("");
  try {
    const topic = $("#topic").value.trim();
    const created = await api("/v1/rooms", {
      method: "POST",
      body: JSON.stringify({ title: $("#title").value.trim(), topic: topic || null }),
    });
    sessionStorage.setItem(`amphi:${created.room}`, JSON.stringify({ token: created.host_token, role: "host" }));
    location.hash = `room=${created.room}`;
  } catch (e) {
    showError(`Could not create the room: ${e.message}`);
  }
});
$("#speak").addEventListener("click", speak);
$("#stop").addEventListener("click", stop);
window.addEventListener("hashchange", route);
route();
