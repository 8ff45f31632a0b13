// Three listeners of one room on three tiers, chosen by the router, in headless Chromium
// (playwright-core). The mesh runs with one interactive and one push seat per room and edge: the
// first listener at eu-west gets WebRTC, the second (once the edge's heartbeat counts the first)
// the push stream, the third (once it counts the second) LL-HLS. Each page must hear the tone.
//
// Env: AMPHI_URL (geo-router), AMPHI_ROOM, AMPHI_FREQ (the tone, Hz).
// Prints {"result": {"modes": [...], ...}} and exits non-zero on failure.
import { launch } from "./launch.mjs";

const base = process.env.AMPHI_URL;
const room = process.env.AMPHI_ROOM;
const freq = Number(process.env.AMPHI_FREQ || "660");
if (!base || !room) {
  console.error("AMPHI_URL and AMPHI_ROOM are required");
  process.exit(2);
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const expected = ["webrtc", "push", "hls"];

const browser = await launch();
try {
  const pages = [];
  const modes = [];
  const heardAfterMs = [];
  for (let i = 0; i < expected.length; i++) {
    const name = `Tier${i}`;
    const page = await (await browser.newContext()).newPage();
    page.on("console", (m) => console.error(`[${name}] ${m.text()}`));
    page.on("pageerror", (e) => console.error(`[${name}] page error: ${e.message}`));
    await page.goto(`${base}/#region=eu-west`);
    await page.fill("#my-name", name);
    await page.dispatchEvent("#my-name", "change");
    const started = Date.now();
    // No listen= parameter: the route answer's mode decides.
    await page.evaluate((r) => (location.hash = `room=${r}&region=eu-west`), room);
    await page.waitForFunction(() => window.amphi.phase === "joined" && window.amphi.listenMode, null, {
      timeout: 20000,
    });
    const mode = await page.evaluate(() => window.amphi.listenMode);
    const routed = await page.evaluate(() => window.amphi.route.mode);
    console.error(`[${name}] route mode ${routed}, listening over ${mode}`);
    modes.push(mode);
    await page.waitForFunction((f) => window.amphi.hears(f), freq, { timeout: 30000, polling: 100 });
    heardAfterMs.push(Date.now() - started);
    pages.push(page);
    // Let the edge's heartbeat (every 0.5 s) tell the router about this listener.
    await sleep(2000);
  }
  // All three still hear it at the end.
  for (const page of pages) {
    await page.waitForFunction((f) => window.amphi.hears(f), freq, { timeout: 10000, polling: 100 });
  }
  if (JSON.stringify(modes) !== JSON.stringify(expected)) {
    throw new Error(`tiers ${JSON.stringify(modes)}, expected ${JSON.stringify(expected)}`);
  }
  console.log(JSON.stringify({ result: { modes, heard_after_ms: heardAfterMs } }));
} finally {
  await browser.close();
}
