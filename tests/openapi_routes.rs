//! `docs/openapi.json` describes exactly the routes the geo-router serves: the document's
//! (method, path) pairs equal `amphi_geo_router::ROUTES`, and a live router answers every one of
//! them with its own handler (not the 404/405 of an unknown route).

use amphi_testkit::mesh as support;

use std::collections::BTreeSet;
use std::time::Duration;
use support::*;

fn documented() -> BTreeSet<(String, String)> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json"))
        .expect("docs/openapi.json");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().unwrap().keys() {
            assert!(
                ["get", "put", "post", "delete", "patch", "head", "options"]
                    .contains(&method.as_str()),
                "{path}: {method}"
            );
            let op = &item[method];
            assert!(op["responses"].is_object(), "{method} {path} has responses");
            out.insert((method.clone(), path.clone()));
        }
    }
    out
}

#[test]
fn openapi_document_lists_exactly_the_served_routes() {
    let served: BTreeSet<(String, String)> = amphi_geo_router::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let doc = documented();
    let missing: Vec<_> = served.difference(&doc).collect();
    let extra: Vec<_> = doc.difference(&served).collect();
    assert!(missing.is_empty(), "served but not documented: {missing:?}");
    assert!(extra.is_empty(), "documented but not served: {extra:?}");

    // Every listed route reaches a handler on a live router.
    let mesh = DevMesh::start(23_600, "openapi");
    for (method, path) in &served {
        let concrete = path
            .replace("/v1/rooms/{id}", "/v1/rooms/00000000000000ff")
            .replace("/v1/edges/{id}", "/v1/edges/edge-x")
            .replace("{path}", "00000000000000ff/index.m3u8");
        let url = format!("{}{concrete}", mesh.router());
        let resp = ureq::request(&method.to_uppercase(), &url)
            .timeout(Duration::from_secs(5))
            .call();
        let (status, body) = match resp {
            Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap_or_default()),
            Err(e) => panic!("{method} {url}: {e}"),
        };
        assert_ne!(status, 405, "{method} {path} is not routed: {body}");
        assert!(
            !body.contains("\"not_found\""),
            "{method} {path} fell through to the web client fallback: {body}"
        );
    }
    // And an undocumented API path is not served.
    assert_eq!(get_status(&format!("{}/v1/nope", mesh.router())), 404);
}
