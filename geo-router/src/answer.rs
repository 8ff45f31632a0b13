//! The `/v1/route` answer, written straight into the response body: the same JSON as
//! serializing an [`amphi_protocol::api::RouteResponse`] (same fields, order and text), without
//! building its eight strings first. The URLs and the `why` are rendered by `Display` values
//! that serde_json escapes as it writes them.

use crate::geoip::Place;
use crate::select::Fixed;
use amphi_protocol::RoomId;
use serde::ser::{Serialize, SerializeStruct, Serializer};
use std::fmt::{self, Display, Formatter};

/// Bytes reserved for a route answer (they are ~400 to ~700; more grows the buffer).
pub const ANSWER_CAPACITY: usize = 1024;

/// `{base}{middle}{room}{tail}`.
struct Joined<'a> {
    base: &'a str,
    middle: &'a str,
    room: RoomId,
    tail: &'a str,
}

impl Display for Joined<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}{}{}", self.base, self.middle, self.room, self.tail)
    }
}

/// The WebSocket signaling URL of an edge: its public URL with `ws(s)://`, then `/v1/ws`.
struct WsUrl<'a>(&'a str);

impl Display for WsUrl<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        if let Some(rest) = self.0.strip_prefix("https://") {
            write!(f, "wss://{rest}/v1/ws")
        } else if let Some(rest) = self.0.strip_prefix("http://") {
            write!(f, "ws://{rest}/v1/ws")
        } else {
            write!(f, "{}/v1/ws", self.0)
        }
    }
}

/// `why`: where the client is (and how that was learnt), then the selection's reasons.
struct Why<'a> {
    source: &'a str,
    place: Place,
    choice: &'a str,
}

impl Display for Why<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self.place {
            Place::Located { point, country, .. } => write!(
                f,
                "{} at {},{} ({})",
                self.source,
                Fixed(point.latitude, 2),
                Fixed(point.longitude, 2),
                String::from_utf8_lossy(&country).trim()
            )?,
            Place::NotPublic => write!(f, "{}: not a public address", self.source)?,
            Place::Unknown => write!(f, "{}: not in the GeoIP databases", self.source)?,
        }
        write!(f, "; {}", self.choice)
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
    /// Base of the HLS URL (`{hls_base}/hls/{room}/index.m3u8`).
    pub hls_base: &'a str,
    /// Listen over HLS (the room is full on the edge for listeners).
    pub hls_only: bool,
    /// How the client address was learnt.
    pub source: &'a str,
    /// Where the client is.
    pub place: Place,
    /// The selection's reasons.
    pub choice: &'a str,
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

    /// The JSON body.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ANSWER_CAPACITY);
        // Writing into a Vec cannot fail, and every field is a string.
        let _ = serde_json::to_writer(&mut out, self);
        out
    }
}

impl Serialize for RouteAnswer<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let url = |middle| Joined {
            base: self.public_url,
            middle,
            room: self.room,
            tail: "",
        };
        let mut st = s.serialize_struct("RouteResponse", 8)?;
        st.serialize_field("region", self.region)?;
        st.serialize_field("edge", self.edge)?;
        st.serialize_field("whip_url", &Collected(url("/whip/")))?;
        st.serialize_field("whep_url", &Collected(url("/whep/")))?;
        st.serialize_field("ws_url", &Collected(WsUrl(self.public_url)))?;
        st.serialize_field(
            "hls_url",
            &Collected(Joined {
                base: self.hls_base,
                middle: "/hls/",
                room: self.room,
                tail: "/index.m3u8",
            }),
        )?;
        st.serialize_field("mode", if self.hls_only { "hls" } else { "interactive" })?;
        st.serialize_field("why", &Collected(self.why()))?;
        st.end()
    }
}

/// A `Display` value serialized as a string, written as it is formatted.
struct Collected<D>(D);

impl<D: Display> Serialize for Collected<D> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
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
            mode: if a.hls_only { "hls" } else { "interactive" }.into(),
            why: format!("{located}; {}", a.choice),
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
        for place in places {
            for url in urls {
                for hls_only in [false, true] {
                    let a = RouteAnswer {
                        room: RoomId(0x00ab_cdef_0123_4567),
                        edge: "edge-\"x\"",
                        region: "eu-west",
                        public_url: url,
                        hls_base: "https://cdn.example.com",
                        hls_only,
                        source: "peer (untrusted forwarding headers ignored)",
                        place,
                        choice: "located client; edge-x of 4 candidates, 3865 km, load 0.10\n",
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
