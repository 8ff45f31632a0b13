//! Geo-router request parsing from the network: forwarding headers from a trusted proxy, edge
//! heartbeats, API key headers and signatures, `/v1/route` query strings, room ids and
//! `avoid=` lists never panic; a made-up signature never verifies; an accepted avoid list is
//! within its limits; a room id parses exactly when it is 16 hexadecimal digits, to their value.
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
    // Key id and timestamp headers checked before the body is read.
    let mid = (0..=text.len() / 2)
        .rev()
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    let (key, stamp) = text.split_at(mid);
    for k in [key, "k1"] {
        if keys.precheck(Some(k), Some(stamp), 1000).is_ok() {
            assert_eq!(k, "k1");
            assert!(
                stamp.len() <= 20 && stamp.parse::<u64>().is_ok(),
                "{stamp:?}"
            );
        }
    }
    let _ = amphi_geo_router::route_query::parse(Some(&text));
    let room = text.parse::<amphi_protocol::RoomId>().map(|r| r.0).ok();
    let hex = (text.len() == 16 && text.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u64::from_str_radix(&text, 16).ok())
        .flatten();
    assert_eq!(room, hex, "{text:?}");
    if let Ok(ids) = amphi_geo_router::select::parse_avoid(&text) {
        assert!(ids.len() <= amphi_geo_router::select::MAX_AVOID);
        assert!(ids
            .iter()
            .all(|id| (1..=128).contains(&id.len()) && !id.chars().any(char::is_control)));
    }
    // The replay cache takes any signature text without panicking.
    let mut replays = amphi_geo_router::auth::ReplayCache::new(4);
    let _ = replays.check(&sig, 1000);
    let _ = replays.check(&sig, 1000);
});
