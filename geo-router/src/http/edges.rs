//! The edge registry over HTTP: heartbeats, the list of edges, draining one.

use super::*;

/// Whether an edge's heartbeat is authorized: open in dev mode, API key in production.
pub(super) async fn edge_heartbeat(
    State(s): State<Shared>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Answer {
    let bytes = s
        .signed_body(
            &method,
            &uri,
            &headers,
            body,
            MAX_HEARTBEAT_BODY,
            ApiScope::Edge,
        )
        .await?;
    let hb: EdgeHeartbeat = parse_json(&bytes)?;
    if hb.id != id {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "bad_field",
            "the body's id must match the path",
        ));
    }
    let draining = hb.draining;
    let rooms: Vec<(RoomId, u32)> = hb.rooms.iter().map(|r| (r.room, r.sessions)).collect();
    let beat = s.store.heartbeat(hb, Now::read()).await?;
    let mut changes = Vec::new();
    for (room, sessions) in &rooms {
        let was = beat.previous.get(room).copied().unwrap_or(0);
        if *sessions != was {
            changes.push((*room, was, *sessions));
        }
    }
    for (room, was) in &beat.previous {
        if !rooms.iter().any(|(r, _)| r == room) {
            changes.push((*room, *was, 0));
        }
    }
    if draining {
        tracing::debug!(edge = %id, "edge reports draining");
    }
    let (new, drain) = (beat.new, beat.drain);
    s.metrics.heartbeats.inc();
    if new {
        tracing::info!(edge = %id, "edge registered");
    }
    let at = now_unix();
    for (room, was, now_n) in changes {
        if was == 0 && now_n > 0 {
            tokio::spawn(reminders::on_first_participant(s.clone(), room));
        }
        let kind = if now_n > was {
            EventKind::ParticipantJoined
        } else {
            EventKind::ParticipantLeft
        };
        s.webhooks.emit(
            kind,
            at,
            serde_json::json!({ "room": room, "edge": id, "sessions": now_n, "previous": was }),
        );
    }
    let relay_parent = relay_parent(&s, &id, at);
    let room_ids: Vec<RoomId> = rooms.iter().map(|(room, _)| *room).collect();
    let tiers = room_tiers(&s, &room_ids).await;
    Ok(Json(HeartbeatAnswer {
        drain,
        interval_ms: HEARTBEAT_INTERVAL.as_millis() as u64,
        relay_parent,
        tiers,
    })
    .into_response())
}

/// The tier thresholds of a heartbeat's rooms as `/v1/route` applies them. A room this router
/// has not seen live since it started is read from the store once (as a route would); one it
/// cannot read, or that is not live, is left out, and its edge moves nobody in it.
async fn room_tiers(s: &AppState, rooms: &[RoomId]) -> Vec<RoomTiers> {
    let mut out = Vec::with_capacity(rooms.len());
    for &room in rooms {
        let known = lock(&s.live).known_tiers(room);
        let tiers = match known {
            Some(tiers) => tiers,
            None => match s.route_live(room).await {
                Ok(true) => lock(&s.live).tiers(room),
                _ => continue,
            },
        };
        let policy = s.policy.for_room(tiers);
        out.push(RoomTiers {
            room,
            interactive: policy.interactive_capacity,
            push: policy.push_capacity,
        });
    }
    out
}

/// How long a relay grant in a heartbeat answer is valid (every answer carries a new one; an
/// edge needs it only to open a feed).
const RELAY_GRANT_SECS: u64 = 600;

/// Edge `id`'s parent in its region's relay tree, with a relay grant signed for it at `now_unix`.
fn relay_parent(s: &AppState, id: &str, now_unix: u64) -> Option<RelayParent> {
    let (parent, url) = {
        let reg = s.registry();
        let p = reg.relay_parent(id, s.config.relay_fanout, Instant::now())?;
        (p.beat.id.clone(), p.beat.relay_url.clone()?)
    };
    let grant = s.signer.sign_relay_grant(&RelayGrant {
        sub: id.to_string(),
        iat: now_unix,
        exp: now_unix + RELAY_GRANT_SECS,
    });
    Some(RelayParent {
        id: parent,
        url,
        grant,
    })
}

pub(super) async fn list_edges(
    State(s): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Answer {
    s.require_api_key(&method, &uri, &headers, b"", ApiScope::Admin)?;
    let now = Instant::now();
    let reg = s.registry();
    let edges: Vec<_> = reg
        .list(now)
        .into_iter()
        .map(|(e, healthy, available)| {
            serde_json::json!({
                "id": e.beat.id,
                "region": e.beat.region,
                "public_url": e.beat.public_url,
                "participants": e.beat.participants,
                "capacity": e.beat.capacity,
                "cpu_load": e.beat.cpu_load,
                "load": e.load(),
                "draining": e.beat.draining || reg.drain_requested(&e.beat.id),
                "healthy": healthy,
                "available": available,
                "last_seen_ms_ago": e.last_seen.map(|t| now.saturating_duration_since(t).as_millis() as u64),
            })
        })
        .collect();
    Ok(Json(serde_json::json!({ "edges": edges })).into_response())
}

pub(super) async fn drain_edge(
    State(s): State<Shared>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Answer {
    s.require_api_key(&method, &uri, &headers, b"", ApiScope::Admin)?;
    if !s.store.request_drain(id.clone()).await? {
        return Err(error(
            StatusCode::NOT_FOUND,
            "edge_not_found",
            "no such edge",
        ));
    }
    tracing::info!(edge = %id, "drain requested by an operator");
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "edge": id, "draining": true })),
    )
        .into_response())
}
