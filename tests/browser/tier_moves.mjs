// A room grows past both of its tier thresholds under `amphi-tools loadgen listeners`, then
// shrinks, and the room pages the router placed on push and LL-HLS are moved up without a gap
// (headless Chromium, playwright-core). The room has 2 interactive and 2 push seats per edge
// (`tiers` at creation); everyone listens at eu-west while a tone plays without a pause.
//
//   loadgen L1: 2 listeners -> interactive, interactive          (interactive seats full)
//   page A    : push
//   loadgen L2: 2 listeners -> push, hls                         (push seats full)
//   page B    : hls
//   L2 leaves : B is moved hls -> push
//   L1 leaves : A and B are moved to interactive (WebRTC)
//
// Each page samples whether it hears the tone every 5 ms (its analyser, 43 ms windows) from
// before the first move to after the last; a gap is a run of samples without the tone.
//
// Env: AMPHI_URL (geo-router), AMPHI_ROOM, AMPHI_FREQ (the tone, Hz), AMPHI_TOOLS (the
// amphi-tools binary). Prints {"result": {...}} and exits non-zero on failure.
import { spawn } from "node:child_process";
import { launch, openPage } from "./launch.mjs";

const base = process.env.AMPHI_URL;
const room = process.env.AMPHI_ROOM;
const tools = process.env.AMPHI_TOOLS;
const freq = Number(process.env.AMPHI_FREQ || "440");
if (!base || !room || !tools) {
  console.error("AMPHI_URL, AMPHI_ROOM and AMPHI_TOOLS are required");
  process.exit(2);
}
const log = (msg) => console.error(`[tiers] ${msg}`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Start `loadgen listeners` with `n` listeners; resolves with the process and its `joined` tiers. */
function loadgen(name, n) {
  const child = spawn(
    tools,
    ["loadgen", "listeners", "--router", base, "--room", room, "--region", "eu-west", "--listeners", String(n), "--seconds", "300"],
    { stdio: ["ignore", "pipe", "pipe"] }
  );
  const lines = [];
  let exited = null;
  const done = new Promise((resolve) => child.on("exit", (code) => resolve((exited = code))));
  child.stderr.on("data", (d) => process.stderr.write(`[${name}] ${d}`));
  let out = "";
  const joined = new Promise((resolve, reject) => {
    child.stdout.on("data", (d) => {
      out += d;
      let i;
      while ((i = out.indexOf("\n")) >= 0) {
        const line = out.slice(0, i);
        out = out.slice(i + 1);
        log(`${name}: ${line}`);
        const v = JSON.parse(line);
        lines.push(v);
        if (v.joined) resolve(v.joined);
      }
    });
    done.then((code) => reject(new Error(`${name} exited (${code}) before joining`)));
  });
  return {
    joined,
    /** SIGINT: its listeners leave; resolves with its last report once it exited. */
    async leave() {
      child.kill("SIGINT");
      const code = await done;
      if (code !== 0) throw new Error(`${name} exited with ${code}`);
      return lines[lines.length - 1];
    },
    kill: () => exited === null && child.kill("SIGKILL"),
  };
}

async function joinPage(browser, name) {
  const page = await openPage(browser, name, { mic: false });
  await page.goto(`${base}/#region=eu-west`);
  await page.fill("#my-name", name);
  await page.dispatchEvent("#my-name", "change");
  // No listen= parameter: the router picks the tier, and the edge may move it.
  await page.evaluate((r) => (location.hash = `room=${r}&region=eu-west`), room);
  await page.waitForFunction(() => window.amphi.phase === "joined" && window.amphi.listenMode, null, { timeout: 20000 });
  await page.waitForFunction((f) => window.amphi.hears(f), freq, { timeout: 30000, polling: 100 });
  const mode = await page.evaluate(() => window.amphi.listenMode);
  log(`${name} listens over ${mode}`);
  return { page, mode };
}

/** Sample whether the page hears the tone every 5 ms; `window.__gaps` keeps the runs without it. */
function startGapMonitor(page) {
  return page.evaluate((f) => {
    const g = { samples: 0, heard: 0, longestMs: 0, gaps: [], runStart: null, started: performance.now(), last: null, stalls: [], player: [] };
    window.__gaps = g;
    g.timer = setInterval(() => {
      const now = performance.now();
      if (g.last !== null && now - g.last > 40) g.stalls.push({ at_ms: Math.round(g.last - g.started), ms: Math.round(now - g.last) });
      g.last = now;
      const p = window.amphi.push;
      // The push player's own troubles (late frames, missing frames, re-anchors), as they happen.
      if (p) {
        const st = p.stats();
        const key = `${st.late}/${st.gaps}/${st.reanchors}/${st.unmatched}/${st.frames}`;
        if (key !== g.key) g.player.push({ at_ms: Math.round(now - g.started), late_gaps_reanchors: key });
        g.key = key;
      }
      g.samples++;
      if (window.amphi.hears(f)) {
        g.heard++;
        if (g.runStart !== null) {
          const ms = now - g.runStart;
          g.longestMs = Math.max(g.longestMs, ms);
          if (ms >= 20) g.gaps.push({ at: g.runStart, ms });
          g.runStart = null;
        }
      } else if (g.runStart === null) {
        g.runStart = now;
      }
    }, 5);
  }, freq);
}

function stopGapMonitor(page) {
  return page.evaluate(() => {
    const g = window.__gaps;
    clearInterval(g.timer);
    const now = performance.now();
    if (g.runStart !== null) {
      g.longestMs = Math.max(g.longestMs, now - g.runStart);
      g.gaps.push({ at: g.runStart, ms: now - g.runStart });
    }
    // What a move changes audibly is its cross-over: the gaps that begin from the start of the
    // cross-fade until 200 ms after the old path was closed. Before it the new path plays at
    // gain 0 beside the old one, which plays on unchanged: gaps that begin then are the old
    // path's (reported as `starting_gap_ms`).
    const longest = (from, to) =>
      Math.round(Math.max(0, ...g.gaps.filter((x) => x.at >= from && x.at < to).map((x) => x.ms)));
    const moves = window.amphi.moves.map((m) => ({
      from: m.from,
      to: m.to,
      ms: m.ms,
      crossover_gap_ms: longest(m.crossfadeAt, m.endedAt + 200),
      starting_gap_ms: longest(m.startedAt, m.crossfadeAt),
    }));
    return {
      seconds: Math.round((now - g.started) / 100) / 10,
      samples: g.samples,
      heard: g.heard,
      longest_gap_ms: Math.round(g.longestMs),
      gaps: g.gaps.map((x) => ({ at_ms: Math.round(x.at - g.started), ms: Math.round(x.ms) })),
      moves,
      main_thread_stalls: g.stalls,
      push_player: g.player,
      moves_at_ms: window.amphi.moves.map((m) => [Math.round(m.startedAt - g.started), Math.round(m.endedAt - g.started)]),
    };
  });
}

// One browser per page: pages of one browser share its audio service, where one page's new
// output stream can silence another page's AudioContext for a moment.
const browsers = [await launch(), await launch()];
const loads = [];
try {
  const l1 = loadgen("L1", 2);
  loads.push(l1);
  const j1 = await l1.joined;
  if (j1.interactive !== 2) throw new Error(`L1 joined ${JSON.stringify(j1)}, expected 2 interactive`);
  await sleep(1500);
  const a = await joinPage(browsers[0], "A");
  if (a.mode !== "push") throw new Error(`A listens over ${a.mode}, expected push`);
  await sleep(1500);
  const l2 = loadgen("L2", 2);
  loads.push(l2);
  const j2 = await l2.joined;
  if (j2.push !== 1 || j2.hls !== 1) throw new Error(`L2 joined ${JSON.stringify(j2)}, expected 1 push and 1 hls`);
  await sleep(1500);
  const b = await joinPage(browsers[1], "B");
  if (b.mode !== "hls") throw new Error(`B listens over ${b.mode}, expected hls`);

  // Nobody moved while the room grew.
  await sleep(3000);
  const still = [await a.page.evaluate(() => window.amphi.listenMode), await b.page.evaluate(() => window.amphi.listenMode)];
  if (still[0] !== "push" || still[1] !== "hls") throw new Error(`tiers changed while the room grew: ${still}`);

  await startGapMonitor(a.page);
  await startGapMonitor(b.page);
  await sleep(2000);
  const t0 = Date.now();
  const left2 = await l2.leave();
  log(`L2 left: ${JSON.stringify(left2)}`);
  await b.page.waitForFunction(() => window.amphi.listenMode === "push", null, { timeout: 20000, polling: 50 });
  const bToPushMs = Date.now() - t0;
  log(`B moved to push ${bToPushMs} ms after L2 left`);
  await sleep(2000);
  const t1 = Date.now();
  const left1 = await l1.leave();
  log(`L1 left: ${JSON.stringify(left1)}`);
  for (const p of [a.page, b.page]) {
    await p.waitForFunction(() => window.amphi.listenMode === "webrtc", null, { timeout: 20000, polling: 50 });
  }
  const toWebrtcMs = Date.now() - t1;
  log(`A and B moved to WebRTC within ${toWebrtcMs} ms after L1 left`);
  await sleep(2000);
  const gapsA = await stopGapMonitor(a.page);
  const gapsB = await stopGapMonitor(b.page);
  for (const [name, g] of [
    ["A", gapsA],
    ["B", gapsB],
  ]) {
    log(`${name}: ${JSON.stringify(g)}`);
  }
  console.log(
    JSON.stringify({
      result: {
        l1: j1,
        l2: j2,
        modes: [a.mode, b.mode],
        b_to_push_ms: bToPushMs,
        to_webrtc_ms: toWebrtcMs,
        a: gapsA,
        b: gapsB,
      },
    })
  );
} finally {
  for (const l of loads) l.kill();
  for (const b of browsers) await b.close();
}
