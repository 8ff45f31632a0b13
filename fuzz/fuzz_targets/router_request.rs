//! Geo-router request parsing from the network: forwarding headers from a trusted proxy, edge
//! heartbeats and API key signatures never panic; a made-up signature never verifies.
#![no_main]
use amphi_geo_router::auth::ApiKeys;
use amphi_geo_router::client_ip::client_ip;
use amphi_geo_router::registry::validate;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let trusted = [
        "127.0.0.0/8".parse().unwrap(),
        "10.0.0.0/8".parse().unwrap(),
    ];
    let (a, b) = data.split_at(data.len() / 2);
    let _ = client_ip(
        "127.0.0.1".parse().unwrap(),
        std::iter::once(a),
        std::iter::once(b),
        &trusted,
    );
    let _ = client_ip(
        "127.0.0.1".parse().unwrap(),
        std::iter::empty(),
        std::iter::once(data),
        &trusted,
    );
    if let Ok(hb) = serde_json::from_slice::<amphi_protocol::api::EdgeHeartbeat>(data) {
        let _ = validate(&hb);
    }
    let keys = ApiKeys::new([(
        "k1".to_string(),
        "secret".to_string(),
        amphi_geo_router::auth::ApiScope::App,
    )]);
    let text = String::from_utf8_lossy(data);
    let sig = format!("v1={}", text);
    assert!(keys
        .verify(
            Some("k1"),
            Some("1000"),
            Some(&sig),
            "POST",
            "/v1/rooms",
            data,
            1000
        )
        .is_err());
    // The replay cache takes any signature text without panicking.
    let mut replays = amphi_geo_router::auth::ReplayCache::new(4);
    let _ = replays.check(&sig, 1000);
    let _ = replays.check(&sig, 1000);
});
