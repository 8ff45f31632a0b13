//! The router's background tasks: what the origins report, housekeeping (scheduled starts,
//! reminders, idle rooms, gone edges), and the shared store's registry mirror.

use super::*;

/// Apply what the origins report (room ends from elsewhere) to the directory.
pub(super) async fn apply_origin_events(s: Shared, mut rx: mpsc::UnboundedReceiver<OriginEvent>) {
    while let Some(ev) = rx.recv().await {
        match ev {
            OriginEvent::LinkUp { origin } => {
                // The origin may have restarted (it forgets), or missed revocations made while
                // the link was down and queued on another replica: send every live one.
                match s.store.revoked_tokens(now_unix()).await {
                    Ok(list) => {
                        for (jti, until) in &list {
                            s.links.revoke_token_at(&origin, jti, *until);
                        }
                        if !list.is_empty() {
                            tracing::info!(%origin, count = list.len(), "token revocations re-sent");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%origin, error = %e, "cannot list token revocations")
                    }
                }
            }
            OriginEvent::Revoked { room, user } => {
                let now = now_unix();
                let mut revoked = s.revoked.lock().unwrap_or_else(|e| e.into_inner());
                revoked.prune(now);
                revoked.revoke_user(
                    room,
                    &user,
                    now.saturating_add(s.config.max_token_lifetime_secs),
                    now,
                );
                tracing::info!(%room, "origin revoked a user's tokens");
            }
            OriginEvent::Reported { report } => {
                // Every router linked to the origin hears it; the one that stores it first
                // emits the webhook. Without the store (Redis unreachable) the webhook still
                // goes out: receivers deduplicate by the report's id.
                let report = *report;
                let new = match s.store.add_report(report.clone()).await {
                    Ok(new) => new,
                    Err(e) => {
                        tracing::warn!(room = %report.room, id = %report.id, error = %e, "cannot store a report");
                        true
                    }
                };
                if new {
                    tracing::info!(room = %report.room, id = %report.id, reason = report.reason.as_str(), "report stored");
                    let at = report.at_ms / 1000;
                    match serde_json::to_value(&report) {
                        Ok(data) => s.webhooks.emit(EventKind::ReportCreated, at, data),
                        Err(e) => tracing::warn!(error = %e, "report not serialisable"),
                    }
                }
            }
            OriginEvent::RoomEnded { room, origin } => {
                let now = now_unix();
                // Every router linked to the origin hears this; the store lets one of them win.
                let ended = match s.store.end_room(room, now).await {
                    Ok(outcome) => outcome == EndOutcome::Ended,
                    Err(e) => {
                        tracing::warn!(%room, error = %e, "cannot record a room end");
                        false
                    }
                };
                s.ended(room);
                if ended {
                    s.metrics.rooms_ended.inc();
                    tokio::spawn(watch_recording(s.clone(), room));
                    tracing::info!(%room, %origin, "room ended (reported by origin)");
                    s.webhooks.emit(
                        EventKind::RoomEnded,
                        now,
                        serde_json::json!({ "room": room, "by": "origin", "origin": origin }),
                    );
                }
            }
        }
    }
}

/// Fire `room_started` for scheduled rooms whose time has come (once over every replica sharing
/// the store) and `starting_soon` reminders, and forget long-gone edges.
pub(super) async fn housekeeping(s: Shared, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    let mut last = now_unix();
    let mut soon = SoonWindow::new(s.config.reminder_lead_secs);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = now_unix();
        match s.store.scheduled_between(last, now).await {
            Ok(started) => {
                last = now;
                for room in started {
                    match s.store.claim_once("room_started", room).await {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(e) => {
                            tracing::warn!(%room, error = %e, "store unavailable");
                            continue;
                        }
                    }
                    tracing::info!(%room, "scheduled room started");
                    s.webhooks.emit(
                        EventKind::RoomStarted,
                        now,
                        serde_json::json!({ "room": room }),
                    );
                }
            }
            // `last` stays: the rooms are looked at again on the next tick.
            Err(e) => tracing::warn!(error = %e, "store unavailable for scheduled rooms"),
        }
        reminders::remind_starting_soon(&s, &mut soon, now).await;
        for id in crate::store::write(s.store.registry()).expire(Instant::now()) {
            tracing::info!(edge = %id, "edge forgotten after a long silence");
        }
        expire_idle_rooms(&s, now).await;
    }
}

/// End the live rooms no edge kept alive for `room_idle_timeout_secs` (one bounded pass).
pub(super) async fn expire_idle_rooms(s: &Shared, now: u64) {
    let expiry = Expiry {
        idle_secs: s.config.room_idle_timeout_secs,
    };
    let idle = match s.store.idle_rooms(expiry, now, MAX_EXPIRED_PER_PASS).await {
        Ok(idle) => idle,
        Err(e) => {
            tracing::warn!(error = %e, "store unavailable for idle rooms");
            return;
        }
    };
    for room in idle {
        let outcome = s.store.end_room(room, now).await;
        s.ended(room);
        match outcome {
            Ok(EndOutcome::Ended) => {
                s.metrics.rooms_ended.inc();
                s.metrics.rooms_expired.inc();
                let origin = s.links.end_room(room);
                tracing::info!(%room, origin = ?origin, "idle room ended");
                s.webhooks.emit(
                    EventKind::RoomEnded,
                    now,
                    serde_json::json!({ "room": room, "by": "idle" }),
                );
                tokio::spawn(watch_recording(s.clone(), room));
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(%room, error = %e, "cannot end an idle room"),
        }
    }
}

/// Mirror a shared store's edge registry into the local view every [`SYNC_INTERVAL`].
pub(super) async fn sync_store(store: Arc<dyn Store>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store.sync(Now::read()).await {
            Ok(()) if failing => {
                tracing::info!("store reachable again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                tracing::warn!(error = %e, "store sync failed; routing on the last known edges");
                failing = true;
            }
            Err(_) => {}
        }
    }
}
