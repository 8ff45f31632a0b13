// A person's path through the web client: open the lobby, create a room; as its host the page joins
// over the edge's WebSocket listening, and publishes the microphone (the fake one plays AMPHI_WAV) on
// its PeerConnection only once the person presses "Start speaking". Prints {"room": ID} once publishing is connected, keeps talking for AMPHI_SECONDS
// (with AMPHI_SENT_STATS set, printing {"sent": [...]}: the audio packets it sent, every 500 ms),
// leaves, and saves screenshots into AMPHI_ARTIFACTS.
import { launch } from "./launch.mjs";

const base = process.env.AMPHI_URL;
const wav = process.env.AMPHI_WAV;
const seconds = Number(process.env.AMPHI_SECONDS || 8);
const artifacts = process.env.AMPHI_ARTIFACTS || ".";
if (!base || !wav) {
  console.error("AMPHI_URL and AMPHI_WAV are required");
  process.exit(2);
}

const browser = await launch({ wav });
try {
  const context = await browser.newContext({ permissions: ["microphone"] });
  const page = await context.newPage();
  page.on("console", (m) => console.error(`[page] ${m.text()}`));
  await page.goto(`${base}/`);
  await page.waitForSelector("#create");
  await page.screenshot({ path: `${artifacts}/lobby.png` });
  // A pure tone is "noise" to speech processing: send the original sound.
  await page.check("#original-sound");
  await page.fill("#title", "browser tone");
  await page.fill("#topic", "e2e");
  await page.click("#create");
  await page.waitForSelector("#room:not([hidden])");
  await page.waitForSelector("#start-speaking", { state: "visible", timeout: 20000 });
  await page.click("#start-speaking");
  await page.waitForFunction(() => window.amphi.status === "connected" && window.amphi.sending, null, {
    timeout: 20000,
  });
  const room = await page.evaluate(() => window.amphi.room);
  console.log(JSON.stringify({ room }));
  await page.screenshot({ path: `${artifacts}/room.png` });
  if (process.env.AMPHI_SENT_STATS) {
    // Audio packets this page sent so far, every 500 ms while it talks (from its own RTP stats).
    const sent = [];
    for (let i = 0; i < seconds * 2; i++) {
      sent.push(
        await page.evaluate(async () => {
          let n = 0;
          for (const r of (await window.amphi.pc.getStats()).values()) {
            if (r.type === "outbound-rtp" && r.kind === "audio") n += r.packetsSent;
          }
          return n;
        }),
      );
      await page.waitForTimeout(500);
    }
    console.log(JSON.stringify({ sent }));
  } else {
    await page.waitForTimeout(seconds * 1000);
  }
  await page.click("#leave");
  await page.waitForFunction(() => !window.amphi.ws && !window.amphi.pc && !document.querySelector("#lobby").hidden, null, {
    timeout: 5000,
  });
} finally {
  await browser.close();
}
