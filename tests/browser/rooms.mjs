// A room, end to end, as people use it through the web client (headless Chromium, playwright-core):
//
//   host (us-east, fake mic 440 Hz)  creates a room in the lobby and speaks;
//   guest (eu-west, fake mic 660 Hz) joins as an interactive (WebRTC) listener and hears 440 Hz;
//   hal  (eu-west, no mic)           listens passively over LL-HLS and hears 440 Hz;
//   the guest raises a hand, the host promotes it, the host hears 660 Hz; chat and a reaction go round;
//   the HLS listener reports the guest and the room, which the host sees;
//   the host mutes the guest and the 660 Hz stops; the host kicks the guest, whose rejoin is refused;
//   the host ends the room and everyone left gets the ended event.
//
// Chromium's fake microphone file is per browser process, so each tone gets its own browser.
// Env: AMPHI_URL (geo-router), AMPHI_WAV_HOST, AMPHI_WAV_GUEST, AMPHI_ARTIFACTS (screenshots).
// Prints {"room": ID} once the room is live and {"result": {...}} at the end; exits non-zero on failure.
import { launch, openPage as open } from "./launch.mjs";

const base = process.env.AMPHI_URL;
const wavHost = process.env.AMPHI_WAV_HOST;
const wavGuest = process.env.AMPHI_WAV_GUEST;
const artifacts = process.env.AMPHI_ARTIFACTS || ".";
if (!base || !wavHost || !wavGuest) {
  console.error("AMPHI_URL, AMPHI_WAV_HOST and AMPHI_WAV_GUEST are required");
  process.exit(2);
}

const log = (msg) => console.error(`[rooms] ${msg}`);
const result = {};

function check(cond, msg) {
  if (!cond) throw new Error(`check failed: ${msg}`);
}

/** Wait (bounded) until the page's analyser does (or does not) hear `freq`. */
async function waitTone(page, freq, present, ms) {
  await page.waitForFunction(
    ([f, want]) => window.amphi.hears(f) === want,
    [freq, present],
    { timeout: ms, polling: 100 }
  );
}

async function state(page, fn) {
  return page.evaluate(fn);
}

const hostBrowser = await launch({ wav: wavHost });
const guestBrowser = await launch({ wav: wavGuest });
try {
  // --- the host creates a room from the lobby and speaks (440 Hz) from us-east
  const host = await open(hostBrowser, "host", { mic: true });
  await host.goto(`${base}/#region=us-east`);
  await host.waitForSelector("#create");
  // Pure tones are "noise" to speech processing: both speakers send the original sound.
  await host.check("#original-sound");
  await host.fill("#my-name", "Hana");
  await host.dispatchEvent("#my-name", "change");
  await host.fill("#title", "Rooms end to end");
  await host.fill("#topic", "tones");
  await host.click("#create");
  // Creating a room opens no microphone: the host joins listening, with a "Start speaking" button
  // and a "mic off" badge, until the host presses it.
  await host.waitForFunction(() => window.amphi.phase === "joined" && window.amphi.status === "connected", null, {
    timeout: 20000,
  });
  await host.waitForTimeout(500);
  check(!(await state(host, () => window.amphi.mic || window.amphi.sending)), "no microphone before the click");
  check(await host.isVisible("#start-speaking"), "the host sees Start speaking");
  check((await host.textContent("#start-speaking")).includes("Start speaking"), "button label");
  check((await host.textContent("#mic-state")).trim() === "mic off", "mic badge says off");
  check(!(await host.isVisible("#mute")), "no Mute before speaking");
  const hostCard = await host.textContent(`#speakers .person[data-id="${await state(host, () => window.amphi.me)}"]`);
  check(hostCard.includes("Hana (you)"), `the host's card shows the chosen name: ${hostCard}`);
  await host.screenshot({ path: `${artifacts}/rooms-host-before-speaking.png` });
  await host.click("#start-speaking");
  await host.waitForFunction(
    () => window.amphi.phase === "joined" && window.amphi.sending && window.amphi.status === "connected",
    null,
    { timeout: 20000 }
  );
  await host.waitForFunction(() => document.querySelector("#mic-state").textContent.includes("mic live"), null, {
    timeout: 5000,
  });
  check(!(await host.isVisible("#start-speaking")), "Start speaking is gone once live");
  // The host alone on stage hears nobody, yet its latency badge shows an estimate.
  await host.waitForFunction(() => window.amphi.latencyMs != null, null, { timeout: 10000 });
  check(/≈\d/.test(await host.textContent("#latency")), "the host's latency badge shows a value");
  check(await host.isVisible("#mute"), "the live host can mute");
  await host.screenshot({ path: `${artifacts}/rooms-host-speaking.png` });
  const room = await state(host, () => window.amphi.room);
  const hostId = await state(host, () => window.amphi.me);
  check((await state(host, () => window.amphi.role)) === "host", "creator is the host");
  check((await host.textContent("#region")) === "us-east", "host routed to us-east");
  console.log(JSON.stringify({ room }));
  log(`room ${room} live, host #${hostId} publishing`);

  // --- a passive listener finds the room in the lobby and listens over LL-HLS from eu-west
  const hal = await open(hostBrowser, "hal", { mic: false });
  await hal.goto(`${base}/#region=eu-west`);
  await hal.fill("#my-name", "Hal");
  await hal.dispatchEvent("#my-name", "change");
  await hal.waitForSelector(`#rooms li[data-room="${room}"]`, { timeout: 10000 });
  await hal.screenshot({ path: `${artifacts}/rooms-lobby.png` });
  await hal.evaluate((r) => (location.hash = `room=${r}&listen=hls`), room);
  await hal.waitForFunction(() => window.amphi.phase === "joined" && window.amphi.listenMode === "hls", null, {
    timeout: 15000,
  });

  // --- an interactive listener joins from eu-west over WebRTC and hears the host
  const guest = await open(guestBrowser, "guest", { mic: true });
  await guest.goto(`${base}/#region=eu-west`);
  await guest.fill("#my-name", "Grace");
  await guest.dispatchEvent("#my-name", "change");
  await guest.check("#original-sound");
  await guest.waitForSelector(`#rooms li[data-room="${room}"]`, { timeout: 10000 });
  await guest.click(`#rooms li[data-room="${room}"] a`);
  await guest.waitForFunction(
    () => window.amphi.phase === "joined" && window.amphi.listenMode === "webrtc" && window.amphi.status === "connected",
    null,
    { timeout: 20000 }
  );
  const guestId = await state(guest, () => window.amphi.me);
  check((await state(guest, () => window.amphi.role)) === "listener", "guest is a listener");
  check((await guest.textContent("#region")) === "eu-west", "guest routed to eu-west");
  check((await guest.textContent("#listen-mode")) === "WebRTC", "guest's listen mode reads WebRTC");
  check(!(await state(guest, () => window.amphi.sending)), "a listener sends no audio");
  await waitTone(guest, 440, true, 20000);
  log("eu-west WebRTC listener hears the us-east host's 440 Hz");
  await waitTone(hal, 440, true, 30000);
  check((await hal.textContent("#listen-mode")) === "HLS", "hal's listen mode reads HLS");
  result.hls_engine = await state(hal, () => window.amphi.hlsEngine);
  log(`eu-west HLS listener (${result.hls_engine}) hears 440 Hz`);
  if (result.hls_engine === "hls.js") {
    check(
      await state(hal, () => typeof window.amphi.stopLatencyKeeper === "function" && !!window.AmphiLatency),
      "hls.js plays with the live-latency keeper (web/latency.js)"
    );
  }
  await guest.waitForFunction(() => window.amphi.latencyMs != null, null, { timeout: 10000 });
  await hal.waitForFunction(() => window.amphi.latencyMs != null, null, { timeout: 10000 });
  result.webrtc_latency_estimate_ms = await state(guest, () => window.amphi.latencyMs);
  result.hls_latency_estimate_ms = await state(hal, () => window.amphi.latencyMs);
  await host.waitForFunction(() => document.querySelector("#listener-count").textContent === "2", null, {
    timeout: 10000,
  });
  // The host is the one speaking: the edge reports it as an active speaker (ring on its avatar).
  await guest.waitForSelector(`#speakers .person.speaking[data-id="${hostId}"]`, { timeout: 10000 });

  // --- raise hand -> promote -> the guest speaks 660 Hz on the same PeerConnection
  const pcBefore = await guest.evaluateHandle(() => window.amphi.pc);
  await guest.click("#raise-hand");
  await host.waitForSelector(`#hands li[data-id="${guestId}"]`, { timeout: 10000 });
  await host.click(`#hands button[data-action="promote"][data-id="${guestId}"]`);
  await guest.waitForFunction(
    () => window.amphi.role === "speaker" && window.amphi.sending && window.amphi.status === "connected",
    null,
    { timeout: 20000 }
  );
  check(await guest.evaluate((pc) => pc === window.amphi.pc, pcBefore), "promotion kept the PeerConnection");
  await host.waitForFunction((id) => !window.amphi.hands.includes(id), guestId, { timeout: 5000 });
  await waitTone(host, 660, true, 20000);
  log("host hears the promoted guest's 660 Hz");

  // --- chat and a reaction
  await hal.fill("#chat-text", "hello from the audience");
  await hal.click("#chat-send");
  await host.waitForFunction(
    () => [...document.querySelectorAll("#chat-log li")].some((li) => li.textContent.includes("hello from the audience")),
    null,
    { timeout: 5000 }
  );
  await guest.click('#reactions button[data-emoji="👏"]');
  await hal.waitForFunction(() => window.amphi.events.some((e) => e.type === "reaction" && e.emoji === "👏"), null, {
    timeout: 5000,
  });
  await host.screenshot({ path: `${artifacts}/rooms-host.png` });
  await guest.screenshot({ path: `${artifacts}/rooms-speaker.png` });
  await hal.screenshot({ path: `${artifacts}/rooms-hls-listener.png` });

  // --- the HLS listener raises a hand: its page pre-warms a receive-only WebRTC session while it
  // keeps listening over HLS. Promoted, it has no microphone (the person denies the permission):
  // it is told so and listens over WebRTC; moved back to the audience it stays on WebRTC.
  const halId = await state(hal, () => window.amphi.me);
  await hal.click("#raise-hand");
  await hal.waitForFunction(
    () => window.amphi.pc && window.amphi.pc.connectionState === "connected" && window.amphi.listenMode === "hls",
    null,
    { timeout: 20000 }
  );
  await hal.evaluate(() => {
    navigator.mediaDevices.getUserMedia = () => Promise.reject(new DOMException("Permission denied", "NotAllowedError"));
  });
  await host.click(`#hands button[data-action="promote"][data-id="${halId}"]`);
  await hal.waitForFunction(
    () => window.amphi.role === "speaker" && window.amphi.listenMode === "webrtc" && window.amphi.micError === "NotAllowedError",
    null,
    { timeout: 10000 }
  );
  check((await hal.textContent("#notice")).includes("Microphone blocked"), "hal is told the microphone is blocked");
  check(await hal.isVisible("#unmute"), "hal can retry the microphone");
  await hal.screenshot({ path: `${artifacts}/rooms-mic-blocked.png` });
  await host.click(`#speakers button[data-action="demote"][data-id="${halId}"]`);
  await hal.waitForFunction(() => window.amphi.role === "listener" && !window.amphi.sending, null, { timeout: 10000 });
  check((await state(hal, () => window.amphi.listenMode)) === "webrtc", "hal keeps listening over WebRTC");
  await waitTone(hal, 440, true, 20000);
  log("HLS listener: hand pre-warmed WebRTC, promoted without a microphone, demoted, still hears 440 Hz");

  // --- reports: hal reports the speaking guest (a reason and text) and the room from the page; the
  // host sees a notice and both in its list, the guest (a speaker) sees neither.
  await hal.click(`#speakers button[data-action="report"][data-id="${guestId}"]`);
  await hal.selectOption("#report-reason", "harassment");
  await hal.fill("#report-text", "shouting over everyone");
  await hal.click("#report-send");
  await host.waitForFunction(
    () => [...document.querySelectorAll("#reports li")].some((li) => li.textContent.includes("shouting over everyone")),
    null,
    { timeout: 10000 }
  );
  check((await host.textContent("#notice")).includes("reported"), "the host is told of the report");
  await hal.click("#report-room");
  await hal.selectOption("#report-reason", "spam");
  await hal.click("#report-send");
  await host.waitForFunction(() => window.amphi.reports.some((r) => r.target === "room"), null, { timeout: 10000 });
  result.reports = await state(host, () =>
    window.amphi.reports.map((r) => [r.reason, r.target === "room" ? "room" : "user", r.program_ms != null])
  );
  check(!(await state(guest, () => window.amphi.events.some((e) => e.type === "reported"))), "a speaker sees no reports");
  await host.screenshot({ path: `${artifacts}/rooms-host-reports.png` });
  log(`host got the reports ${JSON.stringify(result.reports)}`);

  // --- the host mutes the guest: the 660 Hz stops. The guest's page keeps its microphone on (test
  // hook) so what stops the tone is the edge dropping a muted participant's packets.
  await guest.evaluate(() => (window.amphi.keepMicOnMute = true));
  await host.evaluate(() => {
    window.__tone = [];
    window.__sampler = setInterval(() => {
      const { peak, snr } = window.amphi.toneDb(660);
      window.__tone.push({ t: performance.now(), on: window.amphi.hears(660), peak: Math.round(peak), snr: Math.round(snr) });
    }, 50);
  });
  await host.waitForTimeout(500);
  await host.click(`#speakers button[data-action="mute"][data-id="${guestId}"]`);
  await host.waitForFunction((id) => window.amphi.events.some((e) => e.type === "muted" && e.id === id), guestId, {
    timeout: 5000,
  });
  await host.waitForTimeout(1500);
  const mute = await host.evaluate((id) => {
    clearInterval(window.__sampler);
    const ev = window.amphi.events.find((e) => e.type === "muted" && e.id === id);
    return { at: ev.at, samples: window.__tone };
  }, guestId);
  const before = mute.samples.filter((s) => s.t < mute.at);
  const after = mute.samples.filter((s) => s.t >= mute.at);
  check(before.length >= 5 && before.slice(-5).some((s) => s.on), "660 Hz audible right before the mute");
  // The first sample from which the tone stays gone.
  let stop = mute.samples.length;
  while (stop > 0 && !mute.samples[stop - 1].on) stop -= 1;
  check(stop < mute.samples.length, "660 Hz never stopped after the mute");
  result.mute_to_silence_ms = Math.round(mute.samples[stop].t - mute.at);
  result.mute_samples_after = after.length;
  // 660 Hz level (dB) around the mute, for the record: [ms after the muted event, peak dB].
  result.mute_trace = mute.samples
    .filter((s) => s.t >= mute.at - 200 && s.t <= mute.at + 700)
    .map((s) => [Math.round(s.t - mute.at), s.peak, s.snr]);
  log(`660 Hz gone ${result.mute_to_silence_ms} ms after the muted event arrived`);
  check(
    after.filter((s) => s.t >= mute.at + 500).every((s) => !s.on),
    `660 Hz still audible 500 ms after the muted event (stopped at ${result.mute_to_silence_ms} ms)`
  );
  await guest.waitForFunction(() => window.amphi.notice.includes("muted you"), null, { timeout: 5000 });

  // --- kick: the guest is told, and its rejoin (same identity) is refused
  await host.click(`#speakers button[data-action="kick"][data-id="${guestId}"]`);
  await guest.waitForFunction(() => window.amphi.closedReason === "kicked", null, { timeout: 10000 });
  result.kicked_notice = await state(guest, () => window.amphi.notice);
  await host.waitForFunction((id) => !window.amphi.participants.has(id), guestId, { timeout: 5000 });
  await guest.reload();
  await guest.waitForFunction(() => window.amphi.closedReason === "banned", null, { timeout: 15000 });
  result.rejoin_error = await state(guest, () => window.amphi.errors.map((e) => e.code));
  await guest.screenshot({ path: `${artifacts}/rooms-banned.png` });
  log(`kicked guest's rejoin refused: ${result.rejoin_error}`);

  // --- the host ends the room: everyone still there gets the ended event
  await host.click("#end-room");
  await host.waitForFunction(() => window.amphi.closedReason === "ended", null, { timeout: 10000 });
  await hal.waitForFunction(() => window.amphi.closedReason === "ended", null, { timeout: 10000 });
  result.ended = ["host", "hal"];
  await host.screenshot({ path: `${artifacts}/rooms-ended.png` });
  console.log(JSON.stringify({ result }));
} finally {
  await Promise.allSettled([hostBrowser.close(), guestBrowser.close()]);
}
