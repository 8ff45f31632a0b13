//! The outbound control queue of one mesh peer (edge, packager, router): bounded, never waited
//! on by its senders. A peer that stops reading its control stream while the origin keeps
//! producing for it overflows the queue; the overflow is counted and the peer is disconnected
//! (its edge reconnects and re-announces, as after any link loss) instead of the origin
//! buffering without bound.

use amphi_protocol::control::ControlMessage;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Control messages one peer may have waiting before it is disconnected as too slow.
pub const PEER_QUEUE: usize = 8192;

/// The sending side (cheap to clone): [`PeerSender::send`] never waits.
#[derive(Clone, Debug)]
pub struct PeerSender {
    tx: mpsc::Sender<ControlMessage>,
    overflow: CancellationToken,
    overflows: Counter,
}

/// The queue overflowed: the peer is being disconnected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooSlow;

impl PeerSender {
    /// Queue `msg`. On a full queue the message is dropped, the overflow counted once, and the
    /// receiving side told to disconnect the peer; on a closed one (peer gone) it is dropped.
    pub fn send(&self, msg: ControlMessage) -> Result<(), TooSlow> {
        match self.tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.overflow.is_cancelled() {
                    self.overflows.inc();
                    self.overflow.cancel();
                }
                Err(TooSlow)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
        }
    }
}

/// The receiving side, read by the peer's control loop.
#[derive(Debug)]
pub struct PeerReceiver {
    rx: mpsc::Receiver<ControlMessage>,
    overflow: CancellationToken,
}

impl PeerReceiver {
    /// The next message to write, `Ok(None)` once every sender is gone, or [`TooSlow`] once the
    /// queue has overflowed (the caller disconnects the peer).
    pub async fn recv(&mut self) -> Result<Option<ControlMessage>, TooSlow> {
        if self.overflow.is_cancelled() {
            return Err(TooSlow);
        }
        tokio::select! {
            biased;
            _ = self.overflow.cancelled() => Err(TooSlow),
            m = self.rx.recv() => Ok(m),
        }
    }
}

/// A queue of `capacity` messages whose overflows are counted in `overflows`.
pub fn peer_queue(capacity: usize, overflows: Counter) -> (PeerSender, PeerReceiver) {
    let (tx, rx) = mpsc::channel(capacity);
    let overflow = CancellationToken::new();
    (
        PeerSender {
            tx,
            overflow: overflow.clone(),
            overflows,
        },
        PeerReceiver { rx, overflow },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(i: u64) -> ControlMessage {
        ControlMessage::RoomEnded {
            room: amphi_protocol::RoomId(i),
        }
    }

    #[tokio::test]
    async fn a_peer_that_does_not_read_overflows_once_and_is_told_to_go() {
        let overflows = Counter::default();
        let (tx, mut rx) = peer_queue(4, overflows.clone());
        for i in 0..4 {
            assert_eq!(tx.send(msg(i)), Ok(()));
        }
        // A reading peer drains in order.
        assert_eq!(rx.recv().await, Ok(Some(msg(0))));
        assert_eq!(tx.send(msg(4)), Ok(()));
        // Full: dropped, counted once however many more come, and the reader is told.
        assert_eq!(tx.send(msg(5)), Err(TooSlow));
        assert_eq!(tx.clone().send(msg(6)), Err(TooSlow));
        assert_eq!(overflows.get(), 1);
        assert_eq!(rx.recv().await, Err(TooSlow));
        assert_eq!(rx.recv().await, Err(TooSlow));
    }

    #[tokio::test]
    async fn sending_to_a_gone_peer_is_not_an_overflow() {
        let overflows = Counter::default();
        let (tx, rx) = peer_queue(1, overflows.clone());
        drop(rx);
        assert_eq!(tx.send(msg(1)), Ok(()));
        assert_eq!(tx.send(msg(2)), Ok(()));
        assert_eq!(overflows.get(), 0);
    }
}
