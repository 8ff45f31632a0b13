//! The browser client (`web/`), embedded in the binary and served by the geo-router.

use amphi_geo_router::WebAsset;

/// Every file of the web client.
pub fn assets() -> Vec<WebAsset> {
    vec![
        WebAsset {
            path: "/",
            content_type: "text/html; charset=utf-8",
            body: include_bytes!("../web/index.html"),
        },
        WebAsset {
            path: "/app.js",
            content_type: "text/javascript; charset=utf-8",
            body: include_bytes!("../web/app.js"),
        },
        WebAsset {
            path: "/latency.js",
            content_type: "text/javascript; charset=utf-8",
            body: include_bytes!("../web/latency.js"),
        },
        WebAsset {
            path: "/push.js",
            content_type: "text/javascript; charset=utf-8",
            body: include_bytes!("../web/push.js"),
        },
        WebAsset {
            path: "/style.css",
            content_type: "text/css; charset=utf-8",
            body: include_bytes!("../web/style.css"),
        },
        // hls.js light build (Apache-2.0), for passive LL-HLS listening where the browser has no
        // native HLS; loaded on demand by app.js. See web/vendor/README.
        WebAsset {
            path: "/vendor/hls.light.min.js",
            content_type: "text/javascript; charset=utf-8",
            body: include_bytes!("../web/vendor/hls.light.min.js"),
        },
        WebAsset {
            path: "/vendor/hls.js.LICENSE",
            content_type: "text/plain; charset=utf-8",
            body: include_bytes!("../web/vendor/hls.js.LICENSE"),
        },
    ]
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    /// The live-latency keeper's decisions, run in node (the browser tests need it anyway).
    #[test]
    fn latency_keeper_catches_up_with_hysteresis_and_never_drains_the_buffer() {
        let script = r#"
            require(process.argv[1]);
            const assert = require("node:assert/strict");
            const r = (latency, target, forwardBuffer, rate) =>
                globalThis.AmphiLatency.rateFor({ latency, target, forwardBuffer, rate });
            assert.equal(r(null, 0.6, 0.5, 1), 1, "unknown latency");
            assert.equal(r(0.9, null, 0.5, 1), 1, "unknown target");
            assert.equal(r(0.65, 0.6, 0.5, 1), 1, "within the start margin");
            assert.equal(r(0.75, 0.6, 0.5, 1), 1.1, "behind: speed up");
            assert.equal(r(0.65, 0.6, 0.5, 1.1), 1.1, "keeps going until the stop margin");
            assert.equal(r(0.62, 0.6, 0.5, 1.1), 1, "back near target: normal speed");
            assert.equal(r(0.9, 0.6, 0.1, 1), 1, "too little buffer to gain time");
            assert.equal(r(0.9, 0.6, 0.1, 1.1), 1, "buffer running low: stop");
            assert.equal(r(0.5, 0.6, 0.5, 1), 1, "ahead of target: never slow down");
            console.log("ok");
        "#;
        let keeper = concat!(env!("CARGO_MANIFEST_DIR"), "/web/latency.js");
        let out = Command::new("node")
            .args(["-e", script, keeper])
            .output()
            .expect("node (installed by scripts/test.sh)");
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
