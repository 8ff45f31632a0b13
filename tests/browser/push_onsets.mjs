// A push listener on the room page in headless Chromium (playwright-core), for glass-to-glass:
// `#room=ID&listen=push` (web/push.js, WebCodecs) and an onset detector on the page's own analyser
// (what the listener hears), timed like tests/browser/hls_play.mjs.
//
// Env: AMPHI_URL (geo-router), AMPHI_ROOM, AMPHI_REGION (the edge's region), AMPHI_SECONDS (how long
// to listen once joined), AMPHI_PUSH_TRANSPORT (`websocket`: keep the player off WebTransport).
// Prints JSON lines on stdout:
//   {"ev":"joined","at":unix_ms}
//   {"ev":"onset","at":unix_ms}   a sound after >= 300 ms of silence
//   {"ev":"done","stats":{...}}   web/push.js's player stats
import { launch } from "./launch.mjs";

const base = process.env.AMPHI_URL;
const room = process.env.AMPHI_ROOM;
const region = process.env.AMPHI_REGION || "us-east";
const seconds = Number(process.env.AMPHI_SECONDS || 10);
const transport = process.env.AMPHI_PUSH_TRANSPORT === "websocket" ? "&push=websocket" : "";
if (!base || !room) {
  console.error("AMPHI_URL and AMPHI_ROOM are required");
  process.exit(2);
}

const browser = await launch();
try {
  const page = await (await browser.newContext()).newPage();
  page.on("console", (m) => console.error(`[push] ${m.text()}`));
  await page.exposeFunction("report", (obj) => console.log(JSON.stringify(obj)));
  await page.goto(`${base}/#region=${region}`);
  await page.fill("#my-name", "Glass");
  await page.dispatchEvent("#my-name", "change");
  await page.evaluate(([r, g, t]) => (location.hash = `room=${r}&listen=push&region=${g}${t}`), [room, region, transport]);
  await page.waitForFunction(() => window.amphi.phase === "joined" && window.amphi.listenMode === "push" && window.amphi.audio, null, {
    timeout: 20000,
  });
  console.log(JSON.stringify({ ev: "joined", at: Date.now() }));
  await page.evaluate(() => {
    const an = window.amphi.audio.analyser;
    const wave = new Float32Array(an.fftSize);
    let silentSince = performance.now();
    let loud = false;
    setInterval(() => {
      an.getFloatTimeDomainData(wave);
      let sum = 0;
      for (const v of wave.subarray(wave.length - 960)) sum += v * v;
      const rms = Math.sqrt(sum / 960);
      const now = performance.now();
      if (rms > 0.02) {
        if (!loud && now - silentSince >= 300) window.report({ ev: "onset", at: Date.now() });
        loud = true;
      } else {
        if (loud) silentSince = now;
        loud = false;
      }
    }, 5);
  });
  await page.waitForTimeout(seconds * 1000);
  const stats = await page.evaluate(() => window.amphi.push && window.amphi.push.stats());
  console.log(JSON.stringify({ ev: "done", stats }));
} finally {
  await browser.close();
}
