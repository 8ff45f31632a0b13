//! `GET /v1/route`, which every listener and speaker of every room calls: the query checked,
//! where the client is (the precedence of [`client_address`]), then the edge, written as the
//! answer. `GET` is answered by [`Front`] below axum; `HEAD` and the in-process app go through
//! [`route`] with the same code.

use super::{
    error, lock, parse_room, real_client, Answer, AppState, Failure, Shared, X_FORWARDED_FOR,
};
use crate::answer::RouteAnswer;
use crate::answer_cache::{AnswerKey, AnswerMemo, MemoStamp};
use crate::client_ip::{client_ip, Source};
use crate::geoip::Place;
use crate::metrics::{RouteOutcome, NO_REGION};
use crate::route_query::{self, RouteQuery};
use crate::select::{
    parse_avoid, select_edge, without_avoided, ClientPlace, GeoPoint, SelectError, Tier,
};
use amphi_protocol::config::known_region;
use amphi_protocol::RoomId;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

/// A `/v1/route` request's checked parameters (everything refused before the room's liveness
/// is looked at).
struct RouteParams<'q> {
    query: RouteQuery<'q>,
    room: RoomId,
    listener: bool,
    /// The answer says why (`explain=1`).
    explain: bool,
}

/// Check a `/v1/route` query: 400 for a malformed one, 404 for a malformed room id, in the order
/// the API documents.
fn route_params(query: Option<&str>) -> Result<RouteParams<'_>, Failure> {
    let Ok(q) = route_query::parse(query) else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "malformed query string (room, role, and in dev mode region, ip)",
        ));
    };
    let Some(room) = q.room.as_deref() else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "room is required",
        ));
    };
    let room = parse_room(room)?;
    if let Some(avoid) = q.avoid.as_deref() {
        parse_avoid(avoid).map_err(|m| error(StatusCode::BAD_REQUEST, "bad_query", m))?;
    }
    let listener = match q.role.as_deref() {
        None | Some("speaker") | Some("host") => false,
        Some("listener") => true,
        Some(_) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "bad_query",
                "role must be listener, speaker or host",
            ))
        }
    };
    let explain = match q.explain.as_deref() {
        None | Some("0") | Some("false") => false,
        Some("1") | Some("true") => true,
        Some(_) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "bad_query",
                "explain must be 1, true, 0 or false",
            ))
        }
    };
    Ok(RouteParams {
        query: q,
        room,
        listener,
        explain,
    })
}

/// `GET /v1/route` through axum (HEAD, and the in-process app); `GET` requests on a
/// connection are answered by [`Front`] before axum, with the same code.
pub(super) async fn route(
    State(s): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    // The request itself (not a `HeaderMap` extractor, which copies every header).
    req: Request<Body>,
) -> Answer {
    let p = route_params(req.uri().query())?;
    if !s.route_live(p.room).await? {
        return Err(not_live());
    }
    let at = locate_client(&s, peer, req.headers(), &p)?;
    route_decide(&s, &p, &at, Instant::now(), None).map(|r| route_response(r.body))
}

fn not_live() -> Failure {
    error(StatusCode::NOT_FOUND, "room_not_found", "no such live room")
}

/// Where a `/v1/route` client is, and why: the `ip=` parameter (dev mode only; ignored in
/// production) > the address forwarded by a trusted proxy (`Forwarded`, `X-Forwarded-For`) >
/// the TCP peer. A malformed `ip=` or forwarding header from a trusted proxy is a 400.
fn client_address(
    ip_param: Option<&str>,
    dev_mode: bool,
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &[IpNet],
) -> Result<(IpAddr, &'static str), Failure> {
    if let (Some(text), true) = (ip_param, dev_mode) {
        let ip: IpAddr = text.parse().map_err(|_| {
            error(
                StatusCode::BAD_REQUEST,
                "bad_ip",
                "ip must be an IPv4 or IPv6 address",
            )
        })?;
        return Ok((ip, "ip parameter"));
    }
    let (ip, src) = client_ip(
        peer,
        headers
            .get_all(header::FORWARDED)
            .iter()
            .map(|v| v.as_bytes()),
        headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .map(|v| v.as_bytes()),
        trusted,
    )
    .map_err(|e| error(StatusCode::BAD_REQUEST, "bad_forwarded", e.to_string()))?;
    let src = match src {
        Source::Peer => "peer",
        Source::PeerHeadersIgnored => "peer (untrusted forwarding headers ignored)",
        Source::Forwarded => "forwarded by a trusted proxy",
    };
    Ok((ip, src))
}

/// A route answer as sent and remembered: the body, and what counting it needs.
#[derive(Clone, Debug)]
pub(super) struct Routed {
    body: Bytes,
    /// The `route_decisions` series of its region and outcome.
    decision: amphi_common::metrics::HotCounter,
    located: bool,
    tier: Tier,
}

/// The content type of a route answer.
const ROUTE_CONTENT_TYPE: &str = "application/json";

impl Routed {
    /// Count the answer as sent.
    fn count(&self, s: &AppState) {
        self.decision.inc();
        s.metrics.routes.inc();
        if self.located {
            s.metrics.routes_located.inc();
        }
        if self.tier == Tier::Hls {
            s.metrics.routes_hls.inc();
        }
    }
}

/// A route answer's body as a response.
fn route_response(body: Bytes) -> Response {
    let mut resp = Response::new(Body::from(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(ROUTE_CONTENT_TYPE),
    );
    resp
}

/// A route answer's body as the fast path's HTTP/1.1 bytes.
fn route_wire(body: &[u8], close: bool) -> Bytes {
    amphi_protocol::h1::response_bytes_with(
        StatusCode::OK,
        [(header::CONTENT_TYPE.as_str(), ROUTE_CONTENT_TYPE.as_bytes())],
        body,
        close,
    )
}

/// Where a `/v1/route` client is, and the key its answer is remembered under.
struct Located {
    /// How its address was learnt.
    source: &'static str,
    place: Place,
    /// `None`: the answer is not remembered (`avoid`, a dev `region`, or the routing log on,
    /// which tells why each answer is what it is).
    key: Option<AnswerKey>,
}

/// Where the client of `p` is ([`client_address`], then GeoIP).
fn locate_client(
    s: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    p: &RouteParams<'_>,
) -> Result<Located, Failure> {
    let q = &p.query;
    let (addr, source) = client_address(
        q.ip.as_deref(),
        s.config.dev_mode,
        peer.ip(),
        headers,
        &s.trusted,
    )?;
    let place = s.geoip.locate(addr);
    let remembered = q.avoid.as_deref().is_none_or(str::is_empty)
        && dev_region(s, p).is_none()
        && !tracing::enabled!(tracing::Level::DEBUG);
    Ok(Located {
        source,
        place,
        key: remembered.then(|| AnswerKey::new(p.room, p.listener, p.explain, source, place)),
    })
}

/// The region a dev-mode client asked to be placed in (ignored in production).
fn dev_region<'q>(s: &AppState, p: &'q RouteParams<'_>) -> Option<&'q str> {
    p.query.region.as_deref().filter(|_| s.config.dev_mode)
}

thread_local! {
    /// This worker thread's route answers ([`AnswerMemo`]), served without a lock.
    static THREAD_ANSWERS: std::cell::RefCell<AnswerMemo<Routed>> =
        std::cell::RefCell::default();
}

/// The body of the answer this thread remembers for `key`, counted as sent, if it still holds
/// under `stamp` at `now` (the body only: the rest holds shared counters, whose reference
/// counts every thread would touch).
fn send_remembered(s: &AppState, key: &AnswerKey, stamp: MemoStamp, now: Instant) -> Option<Bytes> {
    THREAD_ANSWERS.with(|m| {
        let memo = m.borrow();
        let routed = memo.get(key, stamp, now)?;
        routed.count(s);
        Some(routed.body.clone())
    })
}

/// Remember `routed` in this thread for `key`, made under `stamp`, until the first of the
/// registry's `stable_until` and the end of the room's trusted liveness.
fn remember_in_thread(
    s: &AppState,
    room: RoomId,
    key: AnswerKey,
    stamp: MemoStamp,
    stable_until: Option<Instant>,
    routed: &Routed,
) {
    let Some(live_until) = lock(&s.live).live_until(room) else {
        return;
    };
    let until = stable_until.map_or(live_until, |u| u.min(live_until));
    // The thread's own copy of the body: its reference count stays on this thread's core.
    let own = Routed {
        body: Bytes::copy_from_slice(&routed.body),
        ..routed.clone()
    };
    THREAD_ANSWERS.with(|m| m.borrow_mut().put(key, stamp, until, own));
}

/// Route a request whose room is live from a client located as `at`: the edge, written as the
/// answer, or the answer made for a client placed alike while the registry has not changed
/// ([`crate::answer_cache`]). With `memo` (the stamp read before the room's liveness was
/// checked), the answer is also remembered in this thread. The answer is counted as sent.
fn route_decide(
    s: &AppState,
    p: &RouteParams<'_>,
    at: &Located,
    now: Instant,
    memo: Option<MemoStamp>,
) -> Result<Routed, Failure> {
    let (q, room) = (&p.query, p.room);
    if let Some(key) = &at.key {
        let generation = s.generation.get();
        let remembered = lock(&s.answers).get_with_until(key, generation, now);
        if let Some((routed, until)) = remembered {
            if let Some(stamp) = memo {
                let stamp = MemoStamp {
                    generation,
                    ..stamp
                };
                remember_in_thread(s, room, *key, stamp, until, &routed);
            }
            routed.count(s);
            return Ok(routed);
        }
    }
    // Checked by `route_params`.
    let avoid = match q.avoid.as_deref() {
        Some(a) if !a.is_empty() => parse_avoid(a).unwrap_or_default(),
        _ => Vec::new(),
    };
    let region_override = dev_region(s, p);
    let client_place = match (region_override, at.place) {
        (Some(r), _) => ClientPlace::Region(r),
        (None, Place::Located { point, .. }) => ClientPlace::Located(point),
        (None, _) => ClientPlace::Unknown,
    };
    let anchor = match region_override {
        Some(r) => known_region(r).map(|r| GeoPoint {
            latitude: r.latitude,
            longitude: r.longitude,
        }),
        None => s.anchor,
    };
    let policy = s.policy.for_room(lock(&s.live).tiers(room));
    let reg = s.registry();
    let candidates = without_avoided(reg.candidates(room, now), &avoid);
    let choice = select_edge(
        client_place,
        anchor,
        &s.config.default_region,
        &candidates,
        policy,
        p.listener,
    );
    let choice = match choice {
        Ok(c) => c,
        Err(e) => {
            drop(reg);
            s.metrics.route_decision(NO_REGION, RouteOutcome::NoEdge);
            return Err(match e {
                SelectError::UnknownRegion(_) => {
                    error(StatusCode::BAD_REQUEST, "unknown_region", e.to_string())
                }
                SelectError::NoEdge => {
                    error(StatusCode::SERVICE_UNAVAILABLE, "no_edge", e.to_string())
                }
            });
        }
    };
    let tier = choice.tier;
    let answer = RouteAnswer {
        room,
        edge: choice.edge.id,
        region: choice.edge.region,
        public_url: choice.edge.public_url,
        webtransport: choice.edge.webtransport,
        hls_base: s.hls_base(),
        tier,
        source: at.source,
        place: at.place,
        choice: &choice.why,
        explain: p.explain,
    };
    // Written under the registry lock: the edge's strings are borrowed, not copied.
    let body = answer.to_json();
    tracing::debug!(%room, edge = %answer.edge, why = %answer.why(), "routed");
    let outcome = match tier {
        Tier::Interactive => RouteOutcome::WebRtc,
        Tier::Push => RouteOutcome::Push,
        Tier::Hls => RouteOutcome::Hls,
    };
    let routed = Routed {
        body: Bytes::from(body),
        decision: s.metrics.route_series(answer.region, outcome),
        located: matches!(at.place, Place::Located { .. }),
        tier,
    };
    if let Some(key) = at.key {
        let (generation, until) = (reg.generation(), reg.stable_until(now));
        drop(reg);
        lock(&s.answers).put(key, generation, now, until, routed.clone());
        if let Some(stamp) = memo {
            let stamp = MemoStamp {
                generation,
                ..stamp
            };
            remember_in_thread(s, room, key, stamp, until, &routed);
        }
    }
    routed.count(s);
    Ok(routed)
}

/// The router's service on one connection: `GET /v1/route`, which every listener and speaker
/// of every room calls, is answered here below axum (the per-address request budget and the
/// request log done inline, as the middleware does them); everything else goes to the app.
#[derive(Clone)]
pub(super) struct Front<A> {
    /// The router's state.
    pub(super) state: Shared,
    /// The axum app for this connection ([`amphi_protocol::https::app_service`]).
    pub(super) app: A,
    /// The connection's TCP peer.
    pub(super) peer: SocketAddr,
}

/// The answer of [`Front`]: at once, or later.
pub(super) enum FrontFuture {
    Ready(Option<Response>),
    Later(std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>>),
}

impl std::future::Future for FrontFuture {
    type Output = Result<Response, std::convert::Infallible>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.get_mut() {
            // Polled again after it answered (hyper never does): an empty 500.
            FrontFuture::Ready(r) => std::task::Poll::Ready(Ok(r
                .take()
                .unwrap_or_else(|| StatusCode::INTERNAL_SERVER_ERROR.into_response()))),
            FrontFuture::Later(f) => f.as_mut().poll(cx).map(Ok),
        }
    }
}

impl<A: amphi_protocol::https::ConnectionService> hyper::service::Service<Request<Incoming>>
    for Front<A>
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = FrontFuture;

    fn call(&self, req: Request<Incoming>) -> FrontFuture {
        if req.method() == Method::GET && req.uri().path() == "/v1/route" {
            let (parts, _) = req.into_parts();
            return match route_front(&self.state, self.peer, parts.uri, parts.headers) {
                RouteFuture::Ready(reply) => FrontFuture::Ready(Some(reply.into_response())),
                RouteFuture::Later(f) => {
                    FrontFuture::Later(Box::pin(async move { f.await.into_response() }))
                }
            };
        }
        let fut = self.app.call(req);
        FrontFuture::Later(Box::pin(async move {
            match fut.await {
                Ok(resp) => resp,
                Err(never) => match never {},
            }
        }))
    }
}

/// What `GET /v1/route` answers on the fronts: a route answer's body (counted as sent), or any
/// other response (a refusal, an error).
pub(super) enum Reply {
    Routed(Bytes),
    Other(Response),
}

impl Reply {
    fn status(&self) -> StatusCode {
        match self {
            Reply::Routed(_) => StatusCode::OK,
            Reply::Other(resp) => resp.status(),
        }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        match self {
            Reply::Routed(body) => route_response(body),
            Reply::Other(resp) => resp,
        }
    }
}

impl From<Result<Routed, Failure>> for Reply {
    fn from(decided: Result<Routed, Failure>) -> Reply {
        match decided {
            Ok(routed) => Reply::Routed(routed.body),
            Err(f) => Reply::Other(f.into_response()),
        }
    }
}

/// The answer of [`route_front`]: at once, or after asking the store whether the room is live.
pub(super) enum RouteFuture {
    Ready(Reply),
    Later(std::pin::Pin<Box<dyn std::future::Future<Output = Reply> + Send>>),
}

/// `GET /v1/route` on the fronts ([`Front`], [`RouteFront`]): the budget of the real client,
/// then the answer, at once when the room is known live (else after asking the store).
fn route_front(s: &Shared, peer: SocketAddr, uri: Uri, headers: HeaderMap) -> RouteFuture {
    let log = tracing::enabled!(
        target: amphi_common::redact::REQUEST_LOG_TARGET,
        tracing::Level::DEBUG
    )
    .then(Instant::now);
    let ready = |reply: Reply| {
        log_route(log, &uri, reply.status());
        RouteFuture::Ready(reply)
    };
    // One reading of the clock for the budget, the liveness and the registry.
    let now = Instant::now();
    let client = real_client(s, peer.ip(), &headers);
    if let Err(r) = s.limiter.request_at(client, now) {
        return ready(Reply::Other(amphi_protocol::https::refusal_response(&r)));
    }
    let p = match route_params(uri.query()) {
        Ok(p) => p,
        Err(f) => return ready(Reply::Other(f.into_response())),
    };
    // Read before the liveness: an end through this router after it voids what is made now.
    let stamp = s.memo_stamp();
    let at = locate_client(s, peer, &headers, &p);
    if let Ok(Located { key: Some(key), .. }) = &at {
        if let Some(body) = send_remembered(s, key, stamp, now) {
            return ready(Reply::Routed(body));
        }
    }
    if lock(&s.live).is_live(p.room, now) {
        return ready(
            at.and_then(|at| route_decide(s, &p, &at, now, Some(stamp)))
                .into(),
        );
    }
    let room = p.room;
    let s = s.clone();
    RouteFuture::Later(Box::pin(async move {
        let reply: Reply = match s.route_live(room).await {
            Ok(true) => route_params(uri.query()).and_then(|p| {
                let at = locate_client(&s, peer, &headers, &p)?;
                route_decide(&s, &p, &at, Instant::now(), None)
            }),
            Ok(false) => Err(not_live()),
            Err(f) => Err(f),
        }
        .into();
        log_route(log, &uri, reply.status());
        reply
    }))
}

/// The router's plain HTTP/1.1 front ([`amphi_protocol::h1`]): `GET /v1/route` answered with
/// one write, as [`Front`] answers it; the rest of a connection goes to [`Front`].
pub(super) struct RouteFront {
    /// The router's state.
    pub(super) state: Shared,
    /// The axum app behind [`Front`].
    pub(super) routes: axum::Router,
}

/// The request headers a route answer reads: where a trusted proxy says the client is.
static ROUTE_HEADERS: [header::HeaderName; 2] = [header::FORWARDED, X_FORWARDED_FOR];

/// Whether a request target (path and query) is `/v1/route`.
fn is_route_target(target: &str) -> bool {
    target
        .strip_prefix("/v1/route")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('?'))
}

impl amphi_protocol::h1::FastFront for RouteFront {
    fn accepts(&self, target: &str) -> bool {
        is_route_target(target)
    }

    fn kept_headers(&self) -> &[header::HeaderName] {
        &ROUTE_HEADERS
    }

    fn answer(
        self: &std::sync::Arc<Self>,
        conn: &std::sync::Arc<amphi_protocol::h1::FastConn>,
        peer: SocketAddr,
        req: amphi_protocol::h1::FastRequest,
    ) -> impl std::future::Future<Output = std::io::Result<amphi_protocol::h1::Answer>> + Send {
        let answer = route_front(&self.state, peer, req.uri, req.headers);
        let (conn, close) = (conn.clone(), req.close);
        async move {
            let reply = match answer {
                RouteFuture::Ready(reply) => reply,
                RouteFuture::Later(f) => f.await,
            };
            let bytes = match reply {
                Reply::Routed(body) => route_wire(&body, close),
                Reply::Other(resp) => amphi_protocol::h1::response_bytes(resp, close).await,
            };
            amphi_protocol::h1::write_all(conn.stream(), &bytes).await?;
            Ok(amphi_protocol::h1::Answer::Sent)
        }
    }

    fn hand_off(
        self: &std::sync::Arc<Self>,
        io: amphi_protocol::h1::Prefixed,
        peer: SocketAddr,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send {
        let front = Front {
            state: self.state.clone(),
            app: amphi_protocol::https::app_service(self.routes.clone(), peer),
            peer,
        };
        let shutdown = shutdown.clone();
        async move {
            amphi_protocol::https::serve_connection_with(io, front, peer, &shutdown).await;
        }
    }
}

/// The request log line of a `/v1/route` answered by a front (what
/// [`amphi_common::redact::log_request`] writes for the others); `started` is `None` when
/// the log is off.
fn log_route(started: Option<Instant>, uri: &Uri, status: StatusCode) {
    let Some(started) = started else {
        return;
    };
    tracing::debug!(
        target: amphi_common::redact::REQUEST_LOG_TARGET,
        method = "GET",
        path = uri.path(),
        query = uri.query().map(amphi_common::redact::redact_query).unwrap_or_default(),
        status = status.as_u16(),
        elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        "request"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: &str = "10.0.0.2";

    #[test]
    fn only_route_targets_take_the_fast_path() {
        for yes in ["/v1/route", "/v1/route?room=1", "/v1/route?"] {
            assert!(is_route_target(yes), "{yes}");
        }
        for no in [
            "/v1/routes",
            "/v1/route/",
            "/v1/route#x",
            "/v1/rooms",
            "/",
            "v1/route",
        ] {
            assert!(!is_route_target(no), "{no}");
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn trusted() -> Vec<IpNet> {
        vec!["10.0.0.0/8".parse().expect("a network")]
    }

    fn locate(ip: Option<&str>, dev: bool, h: &HeaderMap) -> Option<(IpAddr, &'static str)> {
        client_address(ip, dev, PEER.parse().expect("an address"), h, &trusted()).ok()
    }

    fn addr(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn in_dev_mode_the_ip_parameter_wins_over_forwarding_headers() {
        let h = headers(&[("x-forwarded-for", "203.0.113.9")]);
        assert_eq!(
            locate(Some("198.51.100.1"), true, &h),
            Some((addr("198.51.100.1"), "ip parameter"))
        );
    }

    #[test]
    fn in_production_the_ip_parameter_is_ignored() {
        let h = headers(&[("x-forwarded-for", "203.0.113.9")]);
        assert_eq!(
            locate(Some("198.51.100.1"), false, &h),
            Some((addr("203.0.113.9"), "forwarded by a trusted proxy"))
        );
        assert_eq!(
            locate(Some("198.51.100.1"), false, &HeaderMap::new()),
            Some((addr(PEER), "peer"))
        );
    }

    #[test]
    fn a_trusted_proxy_forwards_and_an_untrusted_one_is_ignored() {
        let h = headers(&[("forwarded", "for=203.0.113.9")]);
        assert_eq!(
            locate(None, false, &h),
            Some((addr("203.0.113.9"), "forwarded by a trusted proxy"))
        );
        let outside = client_address(None, false, addr("192.0.2.7"), &h, &trusted()).ok();
        assert_eq!(
            outside,
            Some((
                addr("192.0.2.7"),
                "peer (untrusted forwarding headers ignored)"
            ))
        );
    }

    #[test]
    fn a_malformed_ip_parameter_or_forwarded_header_is_a_400() {
        let bad_ip = client_address(
            Some("not-an-ip"),
            true,
            addr(PEER),
            &HeaderMap::new(),
            &trusted(),
        )
        .err()
        .map(|f| (f.status, f.code));
        assert_eq!(bad_ip, Some((StatusCode::BAD_REQUEST, "bad_ip")));
        let h = headers(&[("x-forwarded-for", "garbage")]);
        let bad_fwd = client_address(None, false, addr(PEER), &h, &trusted())
            .err()
            .map(|f| (f.status, f.code));
        assert_eq!(bad_fwd, Some((StatusCode::BAD_REQUEST, "bad_forwarded")));
    }

    #[test]
    fn route_params_refuse_in_the_documented_order() {
        let code = |q: Option<&str>| route_params(q).err().map(|f| (f.status, f.code));
        assert_eq!(code(None), Some((StatusCode::BAD_REQUEST, "bad_query")));
        assert_eq!(
            code(Some("room=zz&role=ghost")).map(|(s, _)| s),
            Some(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            code(Some("room=00000000000000ab&role=ghost")),
            Some((StatusCode::BAD_REQUEST, "bad_query"))
        );
        let p = route_params(Some("room=00000000000000ab&role=listener")).ok();
        assert_eq!(p.map(|p| (p.room, p.listener)), Some((RoomId(0xab), true)));
        let explained = |q: &str| route_params(Some(q)).map(|p| p.explain).ok();
        assert_eq!(explained("room=00000000000000ab&explain=1"), Some(true));
        assert_eq!(explained("room=00000000000000ab&explain=true"), Some(true));
        assert_eq!(explained("room=00000000000000ab&explain=0"), Some(false));
        assert_eq!(explained("room=00000000000000ab"), Some(false));
        assert_eq!(
            code(Some("room=00000000000000ab&explain=yes")),
            Some((StatusCode::BAD_REQUEST, "bad_query"))
        );
    }
}
