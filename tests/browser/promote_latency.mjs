// Promotion latency from the push and HLS tiers, in headless Chromium (playwright-core): the time
// from the host's click on "Invite to speak" to the host hearing the promoted listener's microphone.
//
//   host  (us-east, no microphone)    creates a room in the lobby and listens over WebRTC;
//   guest (eu-west, fake mic 660 Hz)  listens over push (then HLS), raises a hand (its page
//                                      pre-warms a receive-only WebRTC session), is promoted, heard,
//                                      moved back to the audience, and goes back to its tier.
//
// Env: AMPHI_URL (geo-router), AMPHI_WAV_GUEST (660 Hz), AMPHI_TRIALS (per tier, default 1).
// Prints {"result": {"push_ms": [...], "hls_ms": [...]}} and exits non-zero on failure.
import { launch, openPage as open } from "./launch.mjs";

const base = process.env.AMPHI_URL;
const wavGuest = process.env.AMPHI_WAV_GUEST;
const trials = Number(process.env.AMPHI_TRIALS || "1");
if (!base || !wavGuest) {
  console.error("AMPHI_URL and AMPHI_WAV_GUEST are required");
  process.exit(2);
}
const log = (msg) => console.error(`[promote] ${msg}`);

const joined = { timeout: 20000 };
const hostBrowser = await launch();
const guestBrowser = await launch({ wav: wavGuest });
try {
  const host = await open(hostBrowser, "host", { mic: false });
  await host.goto(`${base}/#region=us-east`);
  await host.waitForSelector("#create");
  await host.fill("#my-name", "Hana");
  await host.dispatchEvent("#my-name", "change");
  await host.fill("#title", "Promotion latency");
  await host.click("#create");
  await host.waitForFunction(() => window.amphi.phase === "joined" && window.amphi.status === "connected", null, joined);
  const room = await host.evaluate(() => window.amphi.room);
  log(`room ${room}: host listening over WebRTC`);

  const guest = await open(guestBrowser, "guest", { mic: true });
  await guest.goto(`${base}/#region=eu-west`);
  await guest.fill("#my-name", "Grace");
  await guest.dispatchEvent("#my-name", "change");
  await guest.check("#original-sound");
  await guest.evaluate((r) => (location.hash = `room=${r}&listen=push&region=eu-west`), room);
  await guest.waitForFunction(() => window.amphi.phase === "joined" && window.amphi.listenMode === "push", null, joined);
  const guestId = await guest.evaluate(() => window.amphi.me);

  const result = { push_ms: [], hls_ms: [] };
  for (const tier of ["push", "hls"]) {
    for (let i = 0; i < trials; i++) {
      if ((await guest.evaluate(() => window.amphi.listenMode)) !== tier) {
        await guest.click(`#switch-${tier}`);
        await guest.waitForFunction((t) => window.amphi.listenMode === t && !window.amphi.pc, tier, joined);
      }
      await guest.click("#raise-hand");
      // The raised hand pre-warms WebRTC while the guest keeps listening on its tier.
      await guest.waitForFunction(
        (t) => window.amphi.pc && window.amphi.pc.connectionState === "connected" && window.amphi.listenMode === t,
        tier,
        joined
      );
      const promote = `#hands button[data-action="promote"][data-id="${guestId}"]`;
      await host.waitForSelector(promote, { timeout: 10000 });
      await host.waitForFunction(() => !window.amphi.hears(660), null, { timeout: 10000, polling: 100 });
      // Click and listen inside the page: one clock, sampled every 5 ms.
      const ms = await host.evaluate(
        (sel) =>
          new Promise((resolve, reject) => {
            const t0 = performance.now();
            document.querySelector(sel).click();
            const poll = setInterval(() => {
              if (window.amphi.hears(660)) {
                clearInterval(poll);
                resolve(performance.now() - t0);
              } else if (performance.now() - t0 > 15000) {
                clearInterval(poll);
                reject(new Error("the promoted guest was not heard within 15 s"));
              }
            }, 5);
          }),
        promote
      ).catch(async (e) => {
        const sent = await guest.evaluate(async () => {
          const out = [];
          (await window.amphi.pc.getStats()).forEach((r) => {
            if (r.type === "outbound-rtp") out.push({ ssrc: r.ssrc, packets: r.packetsSent, mid: r.mid });
          });
          const t = window.amphi.pc.getTransceivers().map((x) => ({ mid: x.mid, dir: x.direction, cur: x.currentDirection, track: !!x.sender.track && x.sender.track.readyState }));
          return { out, t };
        });
        const heard = await host.evaluate(async () => {
          const out = [];
          (await window.amphi.pc.getStats()).forEach((r) => {
            if (r.type === "inbound-rtp") out.push({ ssrc: r.ssrc, packets: r.packetsReceived, level: r.audioLevel, mid: r.mid });
          });
          return out;
        });
        log(`not heard: the guest sends ${JSON.stringify(sent)}; the host receives ${JSON.stringify(heard)}`);
        const g = await guest.evaluate(() => ({
          role: window.amphi.role,
          sending: window.amphi.sending,
          mode: window.amphi.listenMode,
          pc: window.amphi.pc && window.amphi.pc.connectionState,
          mic: !!window.amphi.mic,
          micError: window.amphi.micError,
          notice: document.querySelector("#notice").textContent,
        }));
        throw new Error(`${e.message}; guest ${JSON.stringify(g)}`);
      });
      result[`${tier}_ms`].push(Math.round(ms));
      log(`from ${tier}, trial ${i + 1}: heard ${Math.round(ms)} ms after the click`);
      await host.click(`#speakers button[data-action="demote"][data-id="${guestId}"]`);
      await guest.waitForFunction(() => window.amphi.role === "listener" && !window.amphi.sending, null, joined);
      await host.waitForFunction(() => !window.amphi.hears(660), null, { timeout: 10000, polling: 100 });
    }
  }
  console.log(JSON.stringify({ result }));
} finally {
  await hostBrowser.close();
  await guestBrowser.close();
}
