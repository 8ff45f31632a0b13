// Live-latency keeper for hls.js: plays slightly faster while the player sits behind its
// target latency, so every listener converges on PART-HOLD-BACK instead of keeping whatever
// extra delay its start position gave it.
//
// hls.js only adjusts the rate itself with more than one second of forward buffer, which an
// LL-HLS player holding back 0.6 s never has. Chromium and Firefox keep the pitch when the
// rate changes (`preservesPitch`), so a 1.1x catch-up is barely audible in speech.
//
// Loaded as a plain script by the room page and by the hls.js benchmark harness; defines
// `globalThis.AmphiLatency`.
(function (root) {
  "use strict";

  /** Catch-up tuning: start above target + `start`, stop at target + `stop` (seconds). */
  const DEFAULTS = { start: 0.1, stop: 0.03, rate: 1.1, minBuffer: 0.2, everyMs: 250 };

  /**
   * The playback rate to use now. Pure: `latency` and `target` in seconds (null when hls.js
   * does not know them yet), `forwardBuffer` in seconds, `rate` the current playback rate.
   */
  function rateFor({ latency, target, forwardBuffer, rate }, opts = DEFAULTS) {
    if (latency == null || target == null || !Number.isFinite(latency) || !Number.isFinite(target)) {
      return 1;
    }
    const behind = latency - target;
    // Never run the buffer dry to gain time: a stall costs more than it saves.
    if (forwardBuffer < opts.minBuffer) return 1;
    if (rate > 1) return behind > opts.stop ? rate : 1;
    return behind > opts.start ? opts.rate : 1;
  }

  /** Seconds buffered ahead of the playhead. */
  function forwardBuffer(media) {
    const t = media.currentTime;
    for (let i = 0; i < media.buffered.length; i++) {
      if (media.buffered.start(i) <= t + 0.05 && t < media.buffered.end(i)) {
        return media.buffered.end(i) - t;
      }
    }
    return 0;
  }

  /** Drive `media.playbackRate` from `hls.latency` and `hls.targetLatency`; returns a stop function. */
  function keep(hls, media, opts = DEFAULTS) {
    const timer = setInterval(() => {
      if (media.paused) return;
      const next = rateFor(
        {
          latency: hls.latency || null,
          target: hls.targetLatency,
          forwardBuffer: forwardBuffer(media),
          rate: media.playbackRate,
        },
        opts
      );
      if (next !== media.playbackRate) media.playbackRate = next;
    }, opts.everyMs);
    return () => {
      clearInterval(timer);
      media.playbackRate = 1;
    };
  }

  root.AmphiLatency = { DEFAULTS, rateFor, keep };
})(globalThis);
