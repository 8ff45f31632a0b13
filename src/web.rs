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
