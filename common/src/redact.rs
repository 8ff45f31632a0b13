//! Keeping secrets out of logs: query strings and URLs are redacted before they are logged.
//! Tokens travel in `?token=` (WebSocket signaling), API signatures and keys in headers, and
//! webhook receivers may carry a secret in their URL path.

/// Query parameters whose values are secrets (compared case-insensitively).
const SECRET_PARAMS: [&str; 11] = [
    "token",
    "relay",
    "access_token",
    "jwt",
    "key",
    "api_key",
    "secret",
    "signature",
    "sig",
    "password",
    "x-amz-signature",
];

/// What a secret value is replaced with.
pub const REDACTED: &str = "<redacted>";

/// `query` (without `?`) with the value of every secret parameter replaced by [`REDACTED`].
pub fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if is_secret(name) => format!("{name}={REDACTED}"),
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The scheme and authority of `url` (`https://host:port`), without path, query or userinfo;
/// for logging URLs whose path or query may hold a secret.
pub fn url_origin(url: &str) -> &str {
    let (scheme_len, rest) = match url.find("://") {
        Some(i) => (i + 3, &url[i + 3..]),
        None => (0, url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        // Userinfo is a secret too: keep only the scheme when there is one.
        Some(_) => &url[..scheme_len],
        None => &url[..scheme_len + authority_end],
    }
}

fn is_secret(name: &str) -> bool {
    SECRET_PARAMS.iter().any(|s| s.eq_ignore_ascii_case(name))
}

/// Tracing target of the request log, whichever role writes it: enable it with
/// `RUST_LOG=info,amphi::request=debug`.
#[cfg(feature = "http-log")]
pub const REQUEST_LOG_TARGET: &str = "amphi::request";

/// Axum middleware: log every request at debug level (method, path, status, duration), with
/// secret query parameters such as `token=` redacted. Shared by the edge and the geo-router.
#[cfg(feature = "http-log")]
pub async fn log_request(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if !tracing::enabled!(target: REQUEST_LOG_TARGET, tracing::Level::DEBUG) {
        return next.run(req).await;
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(redact_query).unwrap_or_default();
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    tracing::debug!(
        target: REQUEST_LOG_TARGET,
        %method,
        path,
        query,
        status = resp.status().as_u16(),
        elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        "request"
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_parameters_are_redacted_and_others_kept() {
        assert_eq!(
            redact_query("token=eyJhbGciOi.x.y&room=00ab"),
            "token=<redacted>&room=00ab"
        );
        assert_eq!(
            redact_query("room=1&Token=abc&_HLS_msn=3&sig=zz"),
            "room=1&Token=<redacted>&_HLS_msn=3&sig=<redacted>"
        );
        assert_eq!(
            redact_query("relay=eyJ.a.b&after=960"),
            "relay=<redacted>&after=960"
        );
        assert_eq!(redact_query("tokens=1&flag"), "tokens=1&flag");
        assert_eq!(redact_query(""), "");
    }

    #[test]
    fn url_origin_drops_path_query_and_userinfo() {
        assert_eq!(
            url_origin("https://hooks.example.com/services/T0/B0/secret?x=1"),
            "https://hooks.example.com"
        );
        assert_eq!(url_origin("http://127.0.0.1:9000"), "http://127.0.0.1:9000");
        assert_eq!(url_origin("https://user:pw@host/x"), "https://");
        assert_eq!(url_origin("host:80/path"), "host:80");
    }
}
