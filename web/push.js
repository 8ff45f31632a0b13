// amphi push player: a room's program stream at an edge (docs/push.md), over WebTransport where
// the browser and the edge have it, else over a WebSocket; decoded with WebCodecs' AudioDecoder
// and scheduled on an AudioContext at a latency target with a small jitter buffer. Reconnects
// resume after the last frame played (`after=`).
//
//   const player = AmphiPush.play({ url, webtransport: { url, certSha256 }, ctx, destination, targetMs: 150 });
//   player.stats(); // { frames, unmatched, late, gaps, reanchors, catchups, latencyMs, bufferedMs, connected, transport }
//   player.stop();
//
// Both transports carry the same bytes: WebSocket server frames (RFC 6455), on WebTransport as
// the one unidirectional stream the edge opens. A WebTransport session that cannot be opened
// (a browser or network without HTTP/3 over UDP) makes the player use the WebSocket from then on.
//
// Scheduling: each decoded 20 ms frame is an AudioBuffer played by an AudioBufferSourceNode at
// `start + (ts - ts0) / 48000` on the context's clock, where `start` is fixed by the first frame
// plus the latency target. A frame that would play in the past is dropped (counted late); when
// frames keep arriving later than the target allows (or far earlier), the timeline is re-anchored.
// A re-anchor (or a slow first frame) can leave more delay than the target: when every frame of
// the last 2 s came at least 30 ms earlier than needed, the extra delay is dropped during silence.
(function () {
  "use strict";

  const SAMPLE_RATE = 48000;
  const FRAME = 960;
  // Catch-up: every 2 s, if no frame of the last 2 s came with less than 30 ms more lead than
  // the target, the extra delay is dropped during silence.
  const CATCH_UP_WINDOW_S = 2;
  const CATCH_UP_MIN_S = 0.03;

  /** Parse one binary audio message (u8 version, u8 kind, u16 count, u32 seq, frames). */
  function parseAudio(buf) {
    const v = new DataView(buf);
    if (buf.byteLength < 8 || v.getUint8(0) !== 1 || v.getUint8(1) !== 1) throw new Error("bad push message");
    const count = v.getUint16(2, true);
    const seq = v.getUint32(4, true);
    const frames = [];
    let at = 8;
    for (let i = 0; i < count; i++) {
      if (at + 10 > buf.byteLength) throw new Error("truncated push message");
      const ts = Number(v.getBigUint64(at, true));
      const len = v.getUint16(at + 8, true);
      at += 10;
      if (len === 0 || at + len > buf.byteLength) throw new Error("bad push frame");
      frames.push({ ts, data: new Uint8Array(buf, at, len) });
      at += len;
    }
    if (at !== buf.byteLength) throw new Error("trailing bytes in push message");
    return { seq, frames };
  }

  /** Whether a decoded frame is silence (what a catch-up may shorten unheard). */
  function quiet(buf) {
    const x = buf.getChannelData(0);
    let sum = 0;
    for (let i = 0; i < x.length; i++) sum += x[i] * x[i];
    return Math.sqrt(sum / Math.max(1, x.length)) < 0.003;
  }

  /** Bytes of a hex string (a certificate hash). */
  function hexBytes(hex) {
    const out = new Uint8Array(hex.length / 2);
    for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.substr(2 * i, 2), 16);
    return out;
  }

  /**
   * The first WebSocket server frame in `buf` (Uint8Array): { opcode, payload, taken }, or null
   * while incomplete. Throws on a masked or oversized frame.
   */
  function serverFrame(buf) {
    if (buf.length < 2) return null;
    if (buf[1] & 0x80) throw new Error("masked server frame");
    let len = buf[1] & 0x7f;
    let at = 2;
    if (len === 126) {
      if (buf.length < 4) return null;
      len = (buf[2] << 8) | buf[3];
      at = 4;
    } else if (len === 127) {
      if (buf.length < 10) return null;
      const v = new DataView(buf.buffer, buf.byteOffset + 2, 8);
      len = Number(v.getBigUint64(0));
      at = 10;
    }
    if (len > 1 << 20) throw new Error("push frame too large");
    if (buf.length < at + len) return null;
    return { opcode: buf[0] & 0x0f, payload: buf.slice(at, at + len), taken: at + len };
  }

  function play({ url, webtransport = null, ctx, destination, targetMs = 150 }) {
    const st = {
      frames: 0,
      unmatched: 0,
      late: 0,
      gaps: 0,
      reanchors: 0,
      catchups: 0,
      connected: false,
      transport: null,
      latencyMs: null,
      bufferedMs: 0,
    };
    let stopped = false;
    let ws = null;
    let wt = null; // the WebTransport session
    // WebTransport is tried while it works; one failure to open a session falls back for good.
    let useWebTransport =
      !!(webtransport && webtransport.url) && typeof window.WebTransport === "function";
    let header = null;
    let lastTs = null; // last frame handed to the decoder
    let anchor = null; // { ts, at } : room timestamp ts plays at context time `at`
    // Frames handed to the decoder, in order: [decoder timestamp (µs), room ts]. The decoder's
    // outputs come back in the same order, but Chromium's may carry a timestamp 1 µs off the
    // chunk's (a round trip through its own time units), so they are matched within a
    // millisecond (frames are 20,000 µs apart), never exactly.
    const pending = [];
    // The least lead (seconds) any frame had since `windowStart` (context time): when even the
    // least-early frame of a window was well ahead of the target, the player holds more delay than
    // it needs (its anchor was set, or moved, by a late frame) and catches up in a quiet moment.
    let minAhead = Infinity;
    let windowStart = null;
    let retry = 250;
    const gain = ctx.createGain();
    gain.connect(destination || ctx.destination);

    const decoder = new AudioDecoder({
      output: (audio) => {
        // Chunks older than this output were dropped by the decoder.
        while (pending.length && pending[0][0] < audio.timestamp - 1000) pending.shift();
        const ts = pending.length && pending[0][0] <= audio.timestamp + 1000 ? pending.shift()[1] : null;
        const n = audio.numberOfFrames;
        const buf = ctx.createBuffer(1, n, audio.sampleRate);
        audio.copyTo(buf.getChannelData(0), { planeIndex: 0, format: "f32-planar" });
        audio.close();
        if (ts == null) {
          st.unmatched++;
          return;
        }
        schedule(ts, buf);
      },
      error: (e) => console.warn("push decoder", e),
    });
    decoder.configure({ codec: "opus", sampleRate: SAMPLE_RATE, numberOfChannels: 1 });

    function schedule(ts, buf) {
      const now = ctx.currentTime;
      const target = targetMs / 1000;
      if (!anchor) anchor = { ts, at: now + target };
      let when = anchor.at + (ts - anchor.ts) / SAMPLE_RATE;
      const ahead = when - now;
      if (ahead < 0.005 || ahead > target + 0.5) {
        // Behind the clock (a stall) or far ahead of it (a burst after a reconnect): re-anchor.
        st.reanchors++;
        if (ahead < 0.005) st.late++;
        anchor = { ts, at: now + target };
        when = anchor.at;
        minAhead = Infinity;
        windowStart = now;
      } else {
        if (windowStart == null) windowStart = now;
        minAhead = Math.min(minAhead, ahead);
        const excess = minAhead - target;
        if (now - windowStart >= CATCH_UP_WINDOW_S) {
          if (excess > CATCH_UP_MIN_S && quiet(buf)) {
            // Every frame of the window came early enough: drop the extra delay while this
            // frame is silence (the frames already scheduled overlap it by that much).
            anchor = { ts: anchor.ts, at: anchor.at - excess };
            when -= excess;
            st.catchups++;
          }
          minAhead = Infinity;
          windowStart = now;
        }
      }
      const src = ctx.createBufferSource();
      src.buffer = buf;
      src.connect(gain);
      src.start(when);
      st.frames++;
      st.bufferedMs = Math.round((when - now) * 1000);
      if (header) {
        // Program time of this frame on the wall clock, and when it will be heard.
        const programUs = header.ts_base_unix_us + ((ts - header.ts_base) * 1000) / 48;
        const heardMs = Date.now() + (when - now) * 1000;
        st.latencyMs = Math.round(heardMs - programUs / 1000);
      }
    }

    function onAudio(buf) {
      const { frames } = parseAudio(buf);
      for (const f of frames) {
        if (lastTs != null && f.ts <= lastTs) continue;
        if (lastTs != null && f.ts !== lastTs + FRAME) st.gaps++;
        lastTs = f.ts;
        const us = Math.round((f.ts * 1e6) / SAMPLE_RATE);
        pending.push([us, f.ts]);
        decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: us, data: f.data }));
      }
    }

    function reconnect() {
      st.connected = false;
      st.transport = null;
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 5000);
    }

    function connect() {
      if (stopped) return;
      if (useWebTransport) {
        connectWebTransport();
        return;
      }
      const u = new URL(url, location.href);
      if (lastTs != null) u.searchParams.set("after", String(lastTs));
      ws = new WebSocket(u.toString());
      ws.binaryType = "arraybuffer";
      ws.onopen = () => {
        st.connected = true;
        st.transport = "websocket";
        retry = 250;
      };
      ws.onmessage = (ev) => {
        try {
          if (typeof ev.data === "string") header = JSON.parse(ev.data);
          else onAudio(ev.data);
        } catch (e) {
          console.warn("push message", e);
        }
      };
      ws.onclose = (ev) => {
        ws = null;
        // The room ended (4002): no reconnect.
        if (stopped || ev.code === 4002) {
          st.connected = false;
          return;
        }
        reconnect();
      };
    }

    async function connectWebTransport() {
      const u = new URL(webtransport.url, location.href);
      // The same token (and resume point) as the WebSocket's URL.
      const token = new URL(url, location.href).searchParams.get("token");
      if (token) u.searchParams.set("token", token);
      if (lastTs != null) u.searchParams.set("after", String(lastTs));
      const options = {};
      if (webtransport.certSha256) {
        options.serverCertificateHashes = [{ algorithm: "sha-256", value: hexBytes(webtransport.certSha256) }];
      }
      let stream;
      try {
        wt = new WebTransport(u.toString(), options);
        wt.closed.catch(() => {});
        await wt.ready;
        const streams = wt.incomingUnidirectionalStreams.getReader();
        const next = await streams.read();
        streams.releaseLock();
        if (next.done) throw new Error("no stream");
        stream = next.value;
      } catch (e) {
        if (wt) wt.close();
        wt = null;
        if (stopped) return;
        if (!st.connected && st.frames === 0) {
          // Never worked here: WebSocket from now on.
          console.warn("push over WebTransport unavailable, using WebSocket", e);
          useWebTransport = false;
          connect();
        } else {
          reconnect();
        }
        return;
      }
      st.connected = true;
      st.transport = "webtransport";
      retry = 250;
      let ended = false;
      let buf = new Uint8Array(0);
      const reader = stream.getReader();
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done || stopped) break;
          const joined = new Uint8Array(buf.length + value.length);
          joined.set(buf);
          joined.set(value, buf.length);
          buf = joined;
          let f;
          while ((f = serverFrame(buf))) {
            buf = buf.subarray(f.taken);
            if (f.opcode === 1) header = JSON.parse(new TextDecoder().decode(f.payload));
            else if (f.opcode === 2) onAudio(f.payload.buffer);
            else if (f.opcode === 8) ended = f.payload.length >= 2 && ((f.payload[0] << 8) | f.payload[1]) === 4002;
          }
        }
      } catch (e) {
        if (!stopped) console.warn("push over WebTransport", e);
      }
      if (wt) wt.close();
      wt = null;
      if (stopped || ended) {
        st.connected = false;
        return;
      }
      reconnect();
    }
    connect();

    return {
      stats: () => ({ ...st }),
      stop() {
        stopped = true;
        if (ws) ws.close(1000);
        if (wt) wt.close();
        try {
          decoder.close();
        } catch {
          /* already closed */
        }
        gain.disconnect();
      },
    };
  }

  window.AmphiPush = { play, parseAudio, serverFrame, supported: () => typeof window.AudioDecoder === "function" };
})();
