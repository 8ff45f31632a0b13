// The web client keeps its session past its token's expiry by refreshing the token (headless
// Chromium, playwright-core): the page joins with a short-lived token given in the URL, mints a
// new one for the same user through the router before it expires and hands it to the edge
// (`refresh_token`); once the first token is past its expiry and the edge's grace, the page is
// still in the room.
// Env: AMPHI_URL (geo-router), AMPHI_ROOM, AMPHI_TOKEN (the short-lived token), AMPHI_GRACE_SECS.
// Prints {"result": {...}} at the end; exits non-zero on failure.
import { launch } from "./launch.mjs";

const base = process.env.AMPHI_URL;
const room = process.env.AMPHI_ROOM;
const token = process.env.AMPHI_TOKEN;
const grace = Number(process.env.AMPHI_GRACE_SECS || "0");
if (!base || !room || !token) {
  console.error("AMPHI_URL, AMPHI_ROOM and AMPHI_TOKEN are required");
  process.exit(2);
}
const log = (msg) => console.error(`[refresh] ${msg}`);

const browser = await launch();
let failed = false;
try {
  const page = await (await browser.newContext()).newPage();
  page.on("console", (m) => console.error(`[page] ${m.text()}`));
  page.on("pageerror", (e) => console.error(`[page] page error: ${e.message}`));
  await page.goto(`${base}/#room=${room}&token=${token}`);
  await page.waitForFunction(() => window.amphi.phase === "joined", null, { timeout: 15000, polling: 100 });
  const firstExp = await page.evaluate(() => window.amphi.claims.exp);
  log(`joined; the first token expires at ${firstExp}`);
  await page.waitForFunction(() => window.amphi.tokenRefreshes >= 1, null, { timeout: 30000, polling: 100 });
  log("token refreshed");
  // Past the first token's expiry and the edge's grace, with a second to spare for its tick.
  await page.waitForFunction((until) => Date.now() / 1000 > until, firstExp + grace + 1, {
    timeout: 30000,
    polling: 200,
  });
  const result = await page.evaluate(() => ({
    phase: window.amphi.phase,
    closedReason: window.amphi.closedReason,
    refreshes: window.amphi.tokenRefreshes,
    refreshError: window.amphi.refreshError,
    exp: window.amphi.claims.exp,
    errors: window.amphi.errors,
  }));
  console.log(JSON.stringify({ result }));
} catch (e) {
  failed = true;
  console.error(`[refresh] ${e.stack || e}`);
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
