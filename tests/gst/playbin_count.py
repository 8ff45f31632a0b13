#!/usr/bin/python3
"""Legacy GStreamer `playbin` (decodebin2 with the legacy `hlsdemux`, not playbin3 / hlsdemux2)
playing an HLS URL into a synchronising fakesink that counts the decoded audio buffers.

hlsdemux2 (adaptivedemux2) is demoted below hlsdemux so `playbin` takes the legacy demuxer a
player built on `playbin` gets. The sink syncs to the clock, as a real audio sink does: audio whose
timestamps lie far in the future is never rendered.

Prints one JSON object per line: {"event": ...}; the last one is {"event": "done", "buffers": N,
"demuxers": [...], "first_pts": seconds or null}. Exits 0 once BUFFERS decoded audio buffers
were rendered, 1 on timeout or error.

usage: playbin_count.py URL [--buffers N] [--timeout S]
"""

import argparse
import json
import sys

import gi

gi.require_version("Gst", "1.0")
from gi.repository import GLib, Gst  # noqa: E402


def say(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--buffers", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=30.0)
    args = ap.parse_args()

    Gst.init(None)
    newer = Gst.ElementFactory.find("hlsdemux2")
    if newer is not None:
        newer.set_rank(Gst.Rank.NONE)
    if Gst.ElementFactory.find("hlsdemux") is None:
        say("error", message="the legacy hlsdemux element is not installed")
        return 1

    playbin = Gst.ElementFactory.make("playbin", None)
    sink = Gst.ElementFactory.make("fakesink", None)
    sink.set_property("sync", True)
    sink.set_property("signal-handoffs", True)
    playbin.set_property("audio-sink", sink)
    playbin.set_property("video-sink", Gst.ElementFactory.make("fakesink", None))
    playbin.set_property("uri", args.url)

    state = {"buffers": 0, "first_pts": None, "demuxers": [], "code": 1}
    loop = GLib.MainLoop()

    def on_handoff(_sink, buf, _pad):
        if state["first_pts"] is None and buf.pts != Gst.CLOCK_TIME_NONE:
            state["first_pts"] = buf.pts / Gst.SECOND
        state["buffers"] += 1
        if state["buffers"] >= args.buffers:
            state["code"] = 0
            GLib.idle_add(loop.quit)

    def on_element(_bin, _sub, element):
        factory = element.get_factory()
        name = factory.get_name() if factory else ""
        if "demux" in name and name not in state["demuxers"]:
            state["demuxers"].append(name)

    def on_message(_bus, msg):
        if msg.type == Gst.MessageType.ERROR:
            err, dbg = msg.parse_error()
            say("error", message=err.message, debug=dbg)
            loop.quit()
        elif msg.type == Gst.MessageType.EOS:
            say("eos")
            loop.quit()

    sink.connect("handoff", on_handoff)
    playbin.connect("deep-element-added", on_element)
    bus = playbin.get_bus()
    bus.add_signal_watch()
    bus.connect("message", on_message)
    GLib.timeout_add(int(args.timeout * 1000), loop.quit)
    playbin.set_state(Gst.State.PLAYING)
    loop.run()
    playbin.set_state(Gst.State.NULL)
    say(
        "done",
        buffers=state["buffers"],
        demuxers=state["demuxers"],
        first_pts=state["first_pts"],
    )
    return state["code"]


if __name__ == "__main__":
    sys.exit(main())
