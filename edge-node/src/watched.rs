//! Publishing on `tokio::sync::watch` channels without waking receivers for nothing.

use tokio::sync::watch;

/// Make `value` the channel's value and wake its receivers, only if it differs from the current
/// one (heartbeat answers repeat the same parent and thresholds every beat).
pub(crate) fn publish_if_changed<T: PartialEq>(tx: &watch::Sender<T>, value: T) {
    tx.send_if_modified(|current| {
        let changed = *current != value;
        if changed {
            *current = value;
        }
        changed
    });
}
