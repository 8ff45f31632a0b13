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
    ]
}
