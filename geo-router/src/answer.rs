//! The `/v1/route` answer, written straight into the response body: the same JSON as
//! serializing an [`amphi_protocol::api::RouteResponse`] (same fields, order and text), without
//! building its eight strings first and without the formatting machinery: each piece is copied
//! (escaped as serde_json escapes) into one buffer.

use crate::geoip::Place;
use crate::select::{Fixed, Tier, FIXED_MAX};
use amphi_protocol::api::WebTransportEndpoint;
use amphi_protocol::RoomId;
use std::fmt::{self, Display, Formatter};

/// Bytes reserved for a route answer (they are ~400 to ~700; more grows the buffer).
pub const ANSWER_CAPACITY: usize = 1024;

/// Where the answer's text goes: a JSON string (escaped) or plain text.
trait Sink {
    fn put(&mut self, s: &str);
}

/// The inside of a JSON string, escaped exactly as serde_json does: `"`, `\`, and control
/// characters (`\b \f \n \r \t`, else `\u00xx`); everything else verbatim.
struct JsonText<'a>(&'a mut Vec<u8>);

impl Sink for JsonText<'_> {
    fn put(&mut self, s: &str) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let bytes = s.as_bytes();
        // The usual case: nothing to escape, one copy.
        if bytes.iter().all(|&b| b >= 0x20 && b != b'"' && b != b'\\') {
            self.0.extend_from_slice(bytes);
            return;
        }
        let mut start = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let short: &[u8] = match b {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0x08 => b"\\b",
                0x0c => b"\\f",
                0..=0x1f => b"",
                _ => continue,
            };
            self.0.extend_from_slice(&bytes[start..i]);
            if short.is_empty() {
                self.0.extend_from_slice(b"\\u00");
                self.0.push(HEX[usize::from(b >> 4)]);
                self.0.push(HEX[usize::from(b & 0xf)]);
            } else {
                self.0.extend_from_slice(short);
            }
            start = i + 1;
        }
        self.0.extend_from_slice(&bytes[start..]);
    }
}

/// Plain text into a formatter (the `why` in logs); the first error is kept.
struct Plain<'a, 'b>(&'a mut Formatter<'b>, fmt::Result);

impl Sink for Plain<'_, '_> {
    fn put(&mut self, s: &str) {
        if self.1.is_ok() {
            self.1 = self.0.write_str(s);
        }
    }
}

/// A room id as its 16 lowercase hex digits (`{:016x}`, as `RoomId` displays).
fn room_hex(room: RoomId, buf: &mut [u8; 16]) -> &str {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, d) in buf.iter_mut().enumerate() {
        *d = HEX[((room.0 >> (60 - 4 * i)) & 0xf) as usize];
    }
    // Hex digits are ASCII.
    std::str::from_utf8(buf).unwrap_or_default()
}

/// A fixed-point number into `sink` (the integer path, else the standard formatting).
fn put_fixed(sink: &mut impl Sink, x: Fixed) {
    let mut buf = [0u8; FIXED_MAX];
    match x.digits(&mut buf) {
        Some(text) => sink.put(text),
        None => sink.put(&x.to_string()),
    }
}

/// `why`: where the client is (and how that was learnt), then the selection's reasons.
fn put_why(sink: &mut impl Sink, source: &str, place: Place, choice: &str) {
    sink.put(source);
    match place {
        Place::Located { point, country, .. } => {
            sink.put(" at ");
            put_fixed(sink, Fixed(point.latitude, 2));
            sink.put(",");
            put_fixed(sink, Fixed(point.longitude, 2));
            sink.put(" (");
            sink.put(String::from_utf8_lossy(&country).trim());
            sink.put(")");
        }
        Place::NotPublic => sink.put(": not a public address"),
        Place::Unknown => sink.put(": not in the GeoIP databases"),
    }
    sink.put("; ");
    sink.put(choice);
}

/// `why` as text (for logs).
struct Why<'a> {
    source: &'a str,
    place: Place,
    choice: &'a str,
}

impl Display for Why<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let mut plain = Plain(f, Ok(()));
        put_why(&mut plain, self.source, self.place, self.choice);
        plain.1
    }
}

/// What a route answer says.
pub struct RouteAnswer<'a> {
    /// The room.
    pub room: RoomId,
    /// Chosen edge id.
    pub edge: &'a str,
    /// Its region.
    pub region: &'a str,
    /// Its public URL.
    pub public_url: &'a str,
    /// Its WebTransport listener for push listeners, if any.
    pub webtransport: Option<&'a WebTransportEndpoint>,
    /// Base of the HLS URL (`{hls_base}/hls/{room}/index.m3u8`).
    pub hls_base: &'a str,
    /// How the client listens.
    pub tier: Tier,
    /// How the client address was learnt.
    pub source: &'a str,
    /// Where the client is.
    pub place: Place,
    /// The selection's reasons.
    pub choice: &'a str,
    /// Whether the answer carries `why` (the request asked: `explain=1`).
    pub explain: bool,
}

impl RouteAnswer<'_> {
    /// The `why` text (for logs).
    pub fn why(&self) -> impl Display + '_ {
        Why {
            source: self.source,
            place: self.place,
            choice: self.choice,
        }
    }

    /// The JSON body: `RouteResponse`'s fields in its order (region, edge, whip_url, whep_url,
    /// ws_url, hls_url, push_url, webtransport_url and webtransport_cert_sha256 when the edge
    /// has them, mode, and `why` when [`RouteAnswer::explain`]).
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ANSWER_CAPACITY);
        let mut hex = [0u8; 16];
        let room = room_hex(self.room, &mut hex);
        let url = self.public_url;
        let field = |out: &mut Vec<u8>, name: &str, parts: &[&str]| {
            out.extend_from_slice(if out.is_empty() { b"{\"" } else { b",\"" });
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":\"");
            for p in parts {
                JsonText(out).put(p);
            }
            out.push(b'"');
        };
        field(&mut out, "region", &[self.region]);
        field(&mut out, "edge", &[self.edge]);
        field(&mut out, "whip_url", &[url, "/whip/", room]);
        field(&mut out, "whep_url", &[url, "/whep/", room]);
        let ws = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
            (Some(rest), _) => ["wss://", rest, "/v1/ws"],
            (None, Some(rest)) => ["ws://", rest, "/v1/ws"],
            (None, None) => ["", url, "/v1/ws"],
        };
        field(&mut out, "ws_url", &ws);
        field(
            &mut out,
            "hls_url",
            &[self.hls_base, "/hls/", room, "/index.m3u8"],
        );
        field(
            &mut out,
            "push_url",
            &[ws[0], ws[1], "/v1/rooms/", room, "/push"],
        );
        if let Some(wt) = self.webtransport {
            field(
                &mut out,
                "webtransport_url",
                &[wt.url.trim_end_matches('/'), "/v1/rooms/", room, "/push"],
            );
            if let Some(sha256) = &wt.cert_sha256 {
                field(&mut out, "webtransport_cert_sha256", &[sha256]);
            }
        }
        field(&mut out, "mode", &[self.tier.as_str()]);
        if !self.explain {
            out.push(b'}');
            return out;
        }
        field(&mut out, "why", &[]);
        // Reopen the empty `why` string and write it piece by piece.
        out.pop();
        put_why(
            &mut JsonText(&mut out),
            self.source,
            self.place,
            self.choice,
        );
        out.extend_from_slice(b"\"}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::GeoPoint;
    use amphi_protocol::api::RouteResponse;

    /// The answer as the router built it before: eight strings, then serde.
    fn reference(a: &RouteAnswer<'_>) -> Vec<u8> {
        let url = a.public_url;
        let ws = if let Some(rest) = url.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = url.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            url.to_string()
        };
        let located = match a.place {
            Place::Located { point, country, .. } => format!(
                "{} at {:.2},{:.2} ({})",
                a.source,
                point.latitude,
                point.longitude,
                String::from_utf8_lossy(&country).trim()
            ),
            Place::NotPublic => format!("{}: not a public address", a.source),
            Place::Unknown => format!("{}: not in the GeoIP databases", a.source),
        };
        serde_json::to_vec(&RouteResponse {
            region: a.region.into(),
            whip_url: format!("{url}/whip/{}", a.room),
            whep_url: format!("{url}/whep/{}", a.room),
            ws_url: format!("{ws}/v1/ws"),
            edge: a.edge.into(),
            hls_url: format!("{}/hls/{}/index.m3u8", a.hls_base, a.room),
            push_url: format!("{ws}/v1/rooms/{}/push", a.room),
            webtransport_url: a
                .webtransport
                .map(|wt| format!("{}/v1/rooms/{}/push", wt.url.trim_end_matches('/'), a.room))
                .unwrap_or_default(),
            webtransport_cert_sha256: a
                .webtransport
                .and_then(|wt| wt.cert_sha256.clone())
                .unwrap_or_default(),
            mode: a.tier.as_str().into(),
            why: if a.explain {
                format!("{located}; {}", a.choice)
            } else {
                String::new()
            },
        })
        .unwrap()
    }

    #[test]
    fn the_answer_is_byte_for_byte_the_route_response() {
        let places = [
            Place::Located {
                point: GeoPoint {
                    latitude: 37.4219,
                    longitude: -122.0841,
                },
                country: *b"US",
                source: 0,
            },
            Place::Located {
                point: GeoPoint {
                    latitude: -33.0,
                    longitude: 151.005,
                },
                country: *b"  ",
                source: 1,
            },
            Place::NotPublic,
            Place::Unknown,
        ];
        let urls = [
            "https://edge-1.example.com",
            "http://127.0.0.1:8443",
            "edge-without-scheme:1",
            "https://quote\"and\\back\u{1}slash",
        ];
        let choices = [
            "located client; edge-x of 4 candidates, 3865 km, load 0.10\n",
            "tab\there, DEL \u{7f}, é and ✓, \u{1f}\u{0}\u{8}\u{c}\r</script>\"\\",
        ];
        let pinned = WebTransportEndpoint {
            url: "https://edge-1.example.com:4433/".into(),
            cert_sha256: Some("ab".repeat(32)),
        };
        let trusted = WebTransportEndpoint {
            url: "https://wt.example.com".into(),
            cert_sha256: None,
        };
        let webtransports = [None, Some(&pinned), Some(&trusted)];
        for (place, choice) in places.into_iter().flat_map(|p| choices.map(|c| (p, c))) {
            for (url, webtransport) in urls.into_iter().flat_map(|u| webtransports.map(|w| (u, w)))
            {
                for (tier, explain) in [
                    (Tier::Interactive, true),
                    (Tier::Push, true),
                    (Tier::Hls, true),
                    (Tier::Interactive, false),
                ] {
                    let a = RouteAnswer {
                        room: RoomId(0x00ab_cdef_0123_4567),
                        edge: "edge-\"x\"",
                        region: "eu-west",
                        public_url: url,
                        webtransport,
                        hls_base: "https://cdn.example.com",
                        tier,
                        source: "peer (untrusted forwarding headers ignored)",
                        place,
                        choice,
                        explain,
                    };
                    assert_eq!(
                        String::from_utf8(a.to_json()).unwrap(),
                        String::from_utf8(reference(&a)).unwrap()
                    );
                }
            }
        }
    }
}
