// A passive listener with a player other than hls.js, in headless Chromium:
//   AMPHI_ENGINE=shaka   Shaka Player (npm, debug build injected into the page, errors logged)
//   AMPHI_ENGINE=native  Chromium's own HLS player (<audio src=...>, no MSE library at all)
//
// Env: AMPHI_PAGE (an http URL on the HLS origin to load first, so requests are same-origin),
// AMPHI_HLS_URL (multivariant or media playlist), AMPHI_SECONDS (how long to listen).
// Prints JSON lines on stdout:
//   {"ev":"support","native":..}                          what canPlayType says about HLS
//   {"ev":"variant","codec":..,"mime":..,"at":unix_ms}    the variant Shaka plays (each change)
//   {"ev":"playing","at":unix_ms}
//   {"ev":"status","currentTime":..,"at":unix_ms}         every 250 ms
//   {"ev":"error","details":..}                           player error, media element error
//   {"ev":"log","level":..,"text":..}                     Shaka's own warnings and errors
//   {"ev":"http","status":..,"url":..}                    a response with status >= 400
//   {"ev":"done","currentTime":..}
import { createRequire } from "node:module";
import { launch } from "./launch.mjs";

const require = createRequire(import.meta.url);
const engine = process.env.AMPHI_ENGINE || "shaka";
const pageUrl = process.env.AMPHI_PAGE;
const hlsUrl = process.env.AMPHI_HLS_URL;
const seconds = Number(process.env.AMPHI_SECONDS || 10);
if (!pageUrl || !hlsUrl || !["shaka", "native"].includes(engine)) {
  console.error("AMPHI_PAGE and AMPHI_HLS_URL are required; AMPHI_ENGINE is shaka or native");
  process.exit(2);
}

const browser = await launch();
try {
  const page = await browser.newPage();
  page.on("console", (m) => {
    console.error(`[page] ${m.text()}`);
    if (engine === "shaka" && (m.type() === "error" || m.type() === "warning")) {
      console.log(JSON.stringify({ ev: "log", level: m.type(), text: m.text() }));
    }
  });
  page.on("response", (r) => {
    if (r.status() >= 400) console.log(JSON.stringify({ ev: "http", status: r.status(), url: r.url() }));
  });
  await page.exposeFunction("report", (obj) => console.log(JSON.stringify(obj)));
  await page.goto(pageUrl);
  await page.setContent("<!doctype html><title>amphi player</title><audio id=a></audio>");
  if (engine === "shaka") {
    await page.addScriptTag({ path: require.resolve("shaka-player/dist/shaka-player.compiled.debug.js") });
  }
  await page.evaluate(async ([engine, url]) => {
    const audio = document.getElementById("a");
    window.report({ ev: "support", native: audio.canPlayType("application/vnd.apple.mpegurl") });
    audio.addEventListener("playing", () => window.report({ ev: "playing", at: Date.now() }));
    audio.addEventListener("error", () =>
      window.report({ ev: "error", details: `media element: ${audio.error && audio.error.code} ${audio.error && audio.error.message}` })
    );
    let lastStatus = 0;
    setInterval(() => {
      const now = performance.now();
      if (now - lastStatus >= 250) {
        lastStatus = now;
        window.report({ ev: "status", currentTime: audio.currentTime, at: Date.now() });
      }
    }, 50);
    if (engine === "native") {
      audio.src = url;
      audio.play().catch((e) => window.report({ ev: "error", details: "play: " + e }));
      return;
    }
    shaka.polyfill.installAll();
    shaka.log.setLevel(shaka.log.Level.WARNING);
    const player = new shaka.Player();
    window.player = player;
    await player.attach(audio);
    player.configure({ streaming: { lowLatencyMode: true } });
    player.addEventListener("error", (e) =>
      window.report({ ev: "error", details: `shaka ${e.detail.code} ${JSON.stringify(e.detail.data).slice(0, 300)}` })
    );
    const active = () => {
      const t = player.getVariantTracks().find((v) => v.active);
      if (t) window.report({ ev: "variant", codec: t.audioCodec || t.codecs, mime: t.mimeType, at: Date.now() });
    };
    player.addEventListener("variantchanged", active);
    player.addEventListener("adaptation", active);
    try {
      await player.load(url);
    } catch (e) {
      window.report({ ev: "error", details: `shaka load ${e.code} ${JSON.stringify(e.data).slice(0, 300)}` });
      return;
    }
    active();
    audio.play().catch((e) => window.report({ ev: "error", details: "play: " + e }));
  }, [engine, hlsUrl]);
  await page.waitForTimeout(seconds * 1000);
  const done = await page.evaluate(() => ({ currentTime: document.getElementById("a").currentTime }));
  console.log(JSON.stringify({ ev: "done", ...done }));
} finally {
  await browser.close();
}
