// The room page's push listen mode in headless Chromium (playwright-core): a listener opens
// `#room=ID&listen=push` at eu-west, web/push.js plays the room's program from the edge's WebSocket
// with WebCodecs, and the page's analyser hears the speaker's tone.
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
  const page = await (await browser.newContext()).newPage();
  page.on("console", (m) => console.error(`[push] ${m.text()}`));
  page.on("pageerror", (e) => console.error(`[push] page error: ${e.message}`));
  await page.goto(`${base}/#region=eu-west`);
  await page.fill("#my-name", "Pia");
  await page.dispatchEvent("#my-name", "change");
  await page.evaluate((r) => (location.hash = `room=${r}&listen=push&region=eu-west`), room);
  await page.waitForFunction(() => window.amphi.phase === "joined" && window.amphi.listenMode === "push", null, {
    timeout: 20000,
  });
  await page.waitForFunction((f) => window.amphi.hears(f), freq, { timeout: 20000, polling: 100 });
  const label = (await page.textContent("#listen-mode")).trim();
  const stats = await page.evaluate(() => window.amphi.push.stats());
  if (label !== "push") throw new Error(`listen mode label ${label}`);
  console.log(JSON.stringify({ result: { ...stats, label } }));
} finally {
  await browser.close();
}
