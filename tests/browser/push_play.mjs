// The room page's push listen mode in headless Chromium (playwright-core): a listener opens
// `#room=ID&listen=push` at eu-west, web/push.js plays the room's program from the edge over
// WebTransport (HTTP/3), then a second page over the WebSocket (`#push=websocket`), with
// WebCodecs, and each page's analyser hears the speaker's tone.
//
// Env: AMPHI_URL (geo-router), AMPHI_ROOM, AMPHI_FREQ (the tone, Hz).
// Prints {"result": {...}} (the player's stats) and exits non-zero on failure.
import { launch } from "./launch.mjs";

const base = process.env.AMPHI_URL;
const room = process.env.AMPHI_ROOM;
const freq = Number(process.env.AMPHI_FREQ || "660");
if (!base || !room) {
  console.error("AMPHI_URL and AMPHI_ROOM are required");
  process.exit(2);
}

const browser = await launch();
try {
  // The route answer offers WebTransport (the edge's own certificate, pinned by its hash); the
  // page plays over it. Then a page that asks for the WebSocket (#push=websocket), and one whose
  // WebTransport sessions never open (as on a network that drops UDP): it falls back to the
  // WebSocket.
  const result = {};
  for (const [name, transport, extra, blocked] of [
    ["webtransport", "webtransport", "", false],
    ["websocket", "websocket", "&push=websocket", false],
    ["fallback", "websocket", "", true],
  ]) {
    const context = await browser.newContext();
    if (blocked) {
      await context.addInitScript(() => {
        window.WebTransport = class {
          constructor() {
            this.ready = Promise.reject(new Error("UDP blocked"));
            this.ready.catch(() => {});
            this.closed = new Promise(() => {});
          }
          close() {}
        };
      });
    }
    const page = await context.newPage();
    page.on("console", (m) => console.error(`[push ${name}] ${m.text()}`));
    page.on("pageerror", (e) => console.error(`[push ${name}] page error: ${e.message}`));
    await page.goto(`${base}/#region=eu-west`);
    await page.fill("#my-name", "Pia");
    await page.dispatchEvent("#my-name", "change");
    await page.evaluate(([r, x]) => (location.hash = `room=${r}&listen=push&region=eu-west${x}`), [room, extra]);
    await page.waitForFunction(() => window.amphi.phase === "joined" && window.amphi.listenMode === "push", null, {
      timeout: 20000,
    });
    await page.waitForFunction((f) => window.amphi.hears(f), freq, { timeout: 20000, polling: 100 });
    const label = (await page.textContent("#listen-mode")).trim();
    const stats = await page.evaluate(() => window.amphi.push.stats());
    if (label !== "push") throw new Error(`listen mode label ${label}`);
    if (stats.transport !== transport) throw new Error(`${name}: played over ${stats.transport}, expected ${transport}`);
    result[name] = { ...stats, label };
    await context.close();
  }
  console.log(JSON.stringify({ result }));
} finally {
  await browser.close();
}
