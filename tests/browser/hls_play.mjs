// A passive listener: hls.js (npm, injected into the page) plays an LL-HLS URL in headless
// Chromium; a WebAudio AnalyserNode listens to what the <audio> element plays.
//
// Env: AMPHI_PAGE (an http URL on the HLS origin to load first, so requests are same-origin),
// AMPHI_HLS_URL (multivariant or media playlist), AMPHI_SECONDS (how long to listen),
// AMPHI_HLS_CONFIG (optional JSON merged into the hls.js config), AMPHI_LATENCY_KEEPER (optional
// path of web/latency.js: hold the live latency the way the room page does).
// Prints JSON lines on stdout:
//   {"ev":"level","codec":..}            the level hls.js picked
//   {"ev":"playing","at":unix_ms}
//   {"ev":"status","currentTime":..,"latency":..,"rate":..,"peakHz":..,"peakDb":..,"rms":..,"at":unix_ms}
//                                        every 250 ms
//   {"ev":"onset","at":unix_ms,"currentTime":..}  a tone after >= 300 ms of silence
//   {"ev":"error","fatal":..,"details":..}
//   {"ev":"done","currentTime":..,"maxPeakHz":..}
import { createRequire } from "node:module";
import { launch } from "./launch.mjs";

const require = createRequire(import.meta.url);
const hlsPath = require.resolve("hls.js/dist/hls.min.js");
const pageUrl = process.env.AMPHI_PAGE;
const hlsUrl = process.env.AMPHI_HLS_URL;
const seconds = Number(process.env.AMPHI_SECONDS || 10);
const extraConfig = JSON.parse(process.env.AMPHI_HLS_CONFIG || "{}");
const latencyKeeper = process.env.AMPHI_LATENCY_KEEPER;
if (!pageUrl || !hlsUrl) {
  console.error("AMPHI_PAGE and AMPHI_HLS_URL are required");
  process.exit(2);
}

const browser = await launch();
try {
  const page = await browser.newPage();
  page.on("console", (m) => console.error(`[page] ${m.text()}`));
  await page.exposeFunction("report", (obj) => console.log(JSON.stringify(obj)));
  await page.goto(pageUrl);
  await page.setContent("<!doctype html><title>amphi hls</title><audio id=a></audio>");
  await page.addScriptTag({ path: hlsPath });
  if (latencyKeeper) await page.addScriptTag({ path: latencyKeeper });
  await page.evaluate(([url, extra]) => {
    const audio = document.getElementById("a");
    const ctx = new AudioContext();
    const an = ctx.createAnalyser();
    an.fftSize = 8192;
    an.smoothingTimeConstant = 0;
    ctx.createMediaElementSource(audio).connect(an);
    an.connect(ctx.destination);
    const freq = new Float32Array(an.frequencyBinCount);
    const wave = new Float32Array(an.fftSize);
    const hls = new Hls({ lowLatencyMode: true, debug: false, ...extra });
    window.hls = hls;
    hls.on(Hls.Events.ERROR, (_e, d) => window.report({ ev: "error", fatal: !!d.fatal, details: d.details }));
    hls.on(Hls.Events.LEVEL_SWITCHED, (_e, d) => {
      const l = hls.levels[d.level];
      window.report({ ev: "level", codec: l && (l.audioCodec || l.codecSet), url: l && l.url && String(l.url) });
    });
    audio.addEventListener("playing", () => window.report({ ev: "playing", at: Date.now() }));
    hls.on(Hls.Events.MANIFEST_PARSED, () => {
      ctx.resume();
      audio.play().catch((e) => window.report({ ev: "error", fatal: false, details: "play: " + e }));
    });
    hls.loadSource(url);
    hls.attachMedia(audio);
    if (window.AmphiLatency) window.AmphiLatency.keep(hls, audio);
    let silentSince = performance.now();
    let loud = false;
    let lastStatus = 0;
    const tick = () => {
      an.getFloatTimeDomainData(wave);
      let sum = 0;
      for (const v of wave.slice(wave.length - 960)) sum += v * v;
      const rms = Math.sqrt(sum / 960);
      const now = performance.now();
      if (rms > 0.02) {
        if (!loud && now - silentSince >= 300) {
          window.report({ ev: "onset", at: Date.now(), currentTime: audio.currentTime });
        }
        loud = true;
      } else {
        if (loud) silentSince = now;
        loud = false;
      }
      if (now - lastStatus >= 250) {
        lastStatus = now;
        an.getFloatFrequencyData(freq);
        let best = 0;
        const binHz = ctx.sampleRate / an.fftSize;
        for (let i = Math.floor(100 / binHz); i < Math.min(freq.length, 2000 / binHz); i++) {
          if (freq[i] > freq[best]) best = i;
        }
        window.report({
          ev: "status",
          currentTime: audio.currentTime,
          latency: hls.latency,
          rate: audio.playbackRate,
          peakHz: best * binHz,
          peakDb: freq[best],
          rms,
          at: Date.now(),
        });
      }
    };
    setInterval(tick, 5);
  }, [hlsUrl, extraConfig]);
  await page.waitForTimeout(seconds * 1000);
  const done = await page.evaluate(() => ({ currentTime: document.getElementById("a").currentTime }));
  console.log(JSON.stringify({ ev: "done", ...done }));
} finally {
  await browser.close();
}
