// Launch Debian's headless Chromium the way this machine allows (no downloads, loopback only),
// with a fake microphone that plays a WAV file.
import { chromium } from "playwright-core";

export async function launch({ wav } = {}) {
  const args = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
  ];
  if (wav) args.push(`--use-file-for-fake-audio-capture=${wav}`);
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args,
  });
}

/** A page in a new context of `browser`, its console and errors logged as `[name]`, dialogs
 * accepted; with `mic`, the context may use the (fake) microphone. */
export async function openPage(browser, name, { mic }) {
  const context = await browser.newContext(mic ? { permissions: ["microphone"] } : {});
  const page = await context.newPage();
  page.on("console", (m) => console.error(`[${name}] ${m.text()}`));
  page.on("pageerror", (e) => console.error(`[${name}] page error: ${e.message}`));
  page.on("dialog", (d) => d.accept());
  return page;
}
