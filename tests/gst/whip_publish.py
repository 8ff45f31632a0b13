#!/usr/bin/python3
"""A WHIP (RFC 9725) publisher made of GStreamer's own WebRTC stack, as a third party would write it.

audiotestsrc (a sine tone) -> opusenc -> rtpopuspay -> webrtcbin. The offer is POSTed to the WHIP
endpoint once ICE gathering is complete (no trickle), the answer applied, the tone sent for
SECONDS, then the session is DELETEd. webrtcbin brings its own DTLS certificate: GStreamer 1.22
makes an RSA-2048 one, which is the point of this client.

libnice gathers no candidates on the loopback interface by default; --loopback gives its agent
127.0.0.1 as the only local address, so the whole session stays on this machine.

Prints one JSON object per line: {"event": ...}. Exits 0 when the peer connection reached
"connected" and the tone was sent; non-zero otherwise.

usage: whip_publish.py WHIP_URL TOKEN [--seconds S] [--freq HZ] [--loopback]
"""

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstWebRTC", "1.0")
gi.require_version("GstSdp", "1.0")
from gi.repository import GLib, Gst, GstSdp, GstWebRTC  # noqa: E402


def say(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)


class Publisher:
    def __init__(self, args):
        self.args = args
        self.location = None
        self.connected = False
        self.failed = None
        self.loop = GLib.MainLoop()
        desc = (
            f"audiotestsrc is-live=true wave=sine freq={args.freq} volume=0.3 ! "
            "audioconvert ! audioresample ! audio/x-raw,rate=48000,channels=1 ! "
            "opusenc bitrate=64000 frame-size=20 ! rtpopuspay pt=111 ! "
            "application/x-rtp,media=audio,encoding-name=OPUS,clock-rate=48000,payload=111 ! "
            "webrtcbin name=webrtc bundle-policy=max-bundle"
        )
        self.pipe = Gst.parse_launch(desc)
        self.webrtc = self.pipe.get_by_name("webrtc")
        # The request pad linked by parse_launch made one transceiver: a publisher only sends.
        transceiver = self.webrtc.emit("get-transceiver", 0)
        transceiver.set_property("direction", GstWebRTC.WebRTCRTPTransceiverDirection.SENDONLY)
        if args.loopback:
            self.loopback_only()
        self.webrtc.connect("on-negotiation-needed", self.on_negotiation_needed)
        self.webrtc.connect("notify::ice-gathering-state", self.on_gathering)
        self.webrtc.connect("notify::connection-state", self.on_connection)
        bus = self.pipe.get_bus()
        bus.add_signal_watch()
        bus.connect("message::error", self.on_error)

    def loopback_only(self):
        gi.require_version("Nice", "0.1")
        from gi.repository import Nice

        # PyGObject drops one reference too many on these objects when their wrappers die:
        # keep the wrappers for the life of the pipeline.
        self.ice = self.webrtc.get_property("ice-agent")
        self.agent = self.ice.get_property("agent")
        addr = Nice.Address.new()
        addr.set_from_string("127.0.0.1")
        self.agent.add_local_address(addr)

    def run(self):
        self.pipe.set_state(Gst.State.PLAYING)
        GLib.timeout_add_seconds(int(self.args.timeout), self.on_deadline)
        self.loop.run()
        self.pipe.set_state(Gst.State.NULL)
        if self.location:
            self.delete()
        return 0 if self.connected and not self.failed else 1

    def on_negotiation_needed(self, element):
        promise = Gst.Promise.new_with_change_func(self.on_offer, element, None)
        element.emit("create-offer", None, promise)

    def on_offer(self, promise, element, _):
        promise.wait()
        reply = promise.get_reply()
        offer = reply.get_value("offer")
        if offer is None:
            self.fail(f"create-offer: {reply.to_string()}")
            return
        element.emit("set-local-description", offer, Gst.Promise.new())

    def on_gathering(self, element, _pspec):
        state = element.get_property("ice-gathering-state")
        if state == GstWebRTC.WebRTCICEGatheringState.COMPLETE and self.location is None:
            sdp = element.get_property("local-description").sdp.as_text()
            self.post(sdp)

    def post(self, sdp):
        req = urllib.request.Request(
            self.args.whip_url,
            data=sdp.encode(),
            method="POST",
            headers={
                "Content-Type": "application/sdp",
                "Authorization": f"Bearer {self.args.token}",
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                status = resp.status
                answer = resp.read().decode()
                location = resp.headers.get("Location")
        except urllib.error.HTTPError as e:
            self.fail(f"POST answered {e.code}: {e.read().decode(errors='replace')}")
            return
        except OSError as e:
            self.fail(f"POST failed: {e}")
            return
        if status != 201 or not location:
            self.fail(f"POST answered {status} without a Location")
            return
        self.location = urllib.parse.urljoin(self.args.whip_url, location)
        say("answered", status=status, location=self.location)
        ok, msg = GstSdp.SDPMessage.new_from_text(answer)
        if ok != GstSdp.SDPResult.OK:
            self.fail("answer is not SDP GStreamer reads")
            return
        desc = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.ANSWER, msg)
        self.webrtc.emit("set-remote-description", desc, Gst.Promise.new())

    def on_connection(self, element, _pspec):
        state = element.get_property("connection-state")
        say("connection-state", state=state.value_nick)
        if state == GstWebRTC.WebRTCPeerConnectionState.CONNECTED and not self.connected:
            self.connected = True
            GLib.timeout_add(int(self.args.seconds * 1000), self.loop.quit)
        elif state == GstWebRTC.WebRTCPeerConnectionState.FAILED:
            self.fail("peer connection failed")

    def on_error(self, _bus, msg):
        err, debug = msg.parse_error()
        self.fail(f"{err.message} ({debug})")

    def on_deadline(self):
        if not self.connected:
            self.fail(f"not connected after {self.args.timeout} s")
        return False

    def fail(self, reason):
        self.failed = reason
        say("failed", reason=reason)
        self.loop.quit()

    def delete(self):
        req = urllib.request.Request(
            self.location,
            method="DELETE",
            headers={"Authorization": f"Bearer {self.args.token}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                say("deleted", status=resp.status)
        except (urllib.error.HTTPError, OSError) as e:
            say("delete-failed", reason=str(e))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("whip_url")
    p.add_argument("token")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--freq", type=float, default=660.0)
    p.add_argument("--timeout", type=float, default=15.0)
    p.add_argument("--loopback", action="store_true")
    args = p.parse_args()
    Gst.init(None)
    sys.exit(Publisher(args).run())


if __name__ == "__main__":
    main()
