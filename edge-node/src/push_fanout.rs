//! Push listeners' writers: one task per runtime worker owns a share of the push listeners'
//! sockets and writes each room message to all of its listeners of that room in one pass, the
//! same `Bytes` to every socket, as the kernel floor does — no task per listener, no wake per
//! listener per message.
//!
//! [`Outbox`] (sans-IO) is one listener's queue: the room header once, then messages; a
//! listener whose socket does not keep up loses its oldest queued messages (live audio: newer is
//! better), and one that lost more than [`MAX_SKIPPED`] in all, or whose socket took nothing for
//! [`WRITE_TIMEOUT`], is disconnected. Nobody waits for a slow listener.
//!
//! [`Writer`] is the driver: it takes [`Command`]s from its [`Inbox`] (joins, room messages, room
//! ends), offers every message to its listeners of the room, writes what each socket takes
//! without blocking, and reads what listeners send (pings, close) on a sweep every
//! [`SWEEP`] or when a socket wakes it.

use crate::metrics::Metrics;
use amphi_protocol::push::{opcode, parse_client_frame, ws_server_frame, MAX_CLIENT_FRAME};
use amphi_protocol::RoomId;
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Messages an outbox holds; beyond it the oldest unstarted one is skipped (about 2 s).
pub const OUTBOX_MESSAGES: usize = 32;
/// Messages a listener may skip in all before it is disconnected.
pub const MAX_SKIPPED: u64 = 64;
/// A listener whose socket takes no bytes for this long is dropped (a peer that vanished without
/// closing its connection would otherwise hold its place until TCP gives up).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a writer reads its listeners and looks for stalled sockets.
pub const SWEEP: Duration = Duration::from_millis(250);
/// Close code sent when the room ended (as on `/v1/ws`).
pub const CLOSE_ENDED: u16 = 4002;
/// Close code sent to a listener disconnected for being too slow.
pub const CLOSE_TOO_SLOW: u16 = 4009;
/// Reads of one listener per sweep at most (what is left waits for the next sweep).
const READS_PER_SWEEP: usize = 4;

/// A close frame with `code` and `reason`.
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    let mut out = Vec::with_capacity(payload.len() + 2);
    ws_server_frame(opcode::CLOSE, &payload, &mut out);
    Bytes::from(out)
}

/// What became of a message offered to an [`Outbox`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offered {
    /// Queued; nothing lost.
    Queued,
    /// Queued, and the oldest unstarted message was skipped to make room.
    SkippedOne,
    /// The listener has skipped more than [`MAX_SKIPPED`]: it is to be disconnected.
    TooSlow,
}

/// One push listener's bytes to write (sans-IO).
#[derive(Debug)]
pub struct Outbox {
    queue: VecDeque<Bytes>,
    /// Bytes of the front already written.
    written: usize,
    /// The room header was queued (every message after it is playable).
    header_queued: bool,
    /// The front is the header (never skipped).
    header_at_front: bool,
    skipped: u64,
    /// When a socket first refused bytes of the front.
    blocked_since: Option<Instant>,
    /// A close frame is queued: nothing more is.
    closing: bool,
}

impl Outbox {
    /// A listener resuming with `backlog` (messages it missed), preceded by the room `header`
    /// when there is one; a backlog without a header cannot be played and is left out.
    pub fn new(header: Option<Bytes>, backlog: impl IntoIterator<Item = Bytes>) -> Self {
        let mut queue = VecDeque::with_capacity(OUTBOX_MESSAGES + 2);
        let header_queued = header.is_some();
        if let Some(h) = header {
            queue.push_back(h);
            queue.extend(backlog);
            while queue.len() > OUTBOX_MESSAGES + 1 {
                queue.remove(1);
            }
        }
        Outbox {
            header_at_front: header_queued,
            queue,
            written: 0,
            header_queued,
            skipped: 0,
            blocked_since: None,
            closing: false,
        }
    }

    /// Offer a room `message`; `header` goes first if this listener has not had it.
    pub fn offer(&mut self, header: &Bytes, message: &Bytes) -> Offered {
        if self.closing {
            return Offered::Queued;
        }
        if !self.header_queued {
            self.header_queued = true;
            self.header_at_front = self.queue.is_empty();
            self.queue.push_back(header.clone());
        }
        let mut offered = Offered::Queued;
        if self.queue.len() > OUTBOX_MESSAGES {
            // The front is kept when it is started or is the header.
            let keep = usize::from(self.written > 0 || self.header_at_front);
            if self.queue.len() > keep {
                self.queue.remove(keep);
                self.skipped += 1;
                offered = if self.skipped > MAX_SKIPPED {
                    Offered::TooSlow
                } else {
                    Offered::SkippedOne
                };
            }
        }
        self.queue.push_back(message.clone());
        offered
    }

    /// Queue a control frame (a pong) after the messages queued so far.
    pub fn control(&mut self, frame: Bytes) {
        if !self.closing && self.queue.len() <= OUTBOX_MESSAGES {
            self.queue.push_back(frame);
        }
    }

    /// Drop what is not started and queue `close` as the last frame.
    pub fn close(&mut self, close: Bytes) {
        if self.closing {
            return;
        }
        self.closing = true;
        self.queue.truncate(usize::from(self.written > 0));
        self.queue.push_back(close);
    }

    /// Whether a close frame is queued.
    pub fn is_closing(&self) -> bool {
        self.closing
    }

    /// The bytes to write next, if any.
    pub fn pending(&self) -> Option<&[u8]> {
        self.queue.front().map(|b| &b[self.written..])
    }

    /// The socket took `n` bytes of [`Outbox::pending`].
    pub fn wrote(&mut self, n: usize) {
        self.blocked_since = None;
        self.written += n;
        if self
            .queue
            .front()
            .is_some_and(|front| self.written >= front.len())
        {
            self.queue.pop_front();
            self.written = 0;
            self.header_at_front = false;
        }
    }

    /// The socket took nothing at `now`.
    pub fn refused(&mut self, now: Instant) {
        self.blocked_since.get_or_insert(now);
    }

    /// Whether the socket has taken nothing for [`WRITE_TIMEOUT`] at `now`.
    pub fn is_stalled(&self, now: Instant) -> bool {
        self.blocked_since
            .is_some_and(|since| now.saturating_duration_since(since) >= WRITE_TIMEOUT)
    }
}

/// What a writer is told.
pub enum Command<S> {
    /// A listener of `room` on `io`, with its first bytes and what leaves the hub when it goes.
    Join {
        /// Its room.
        room: RoomId,
        /// Its socket (the upgraded connection).
        io: S,
        /// Header and backlog.
        outbox: Outbox,
        /// Dropped when the listener goes.
        guard: Box<dyn Send>,
    },
    /// A message of `room`, and the room's header for listeners that have not had it.
    Message {
        /// The room.
        room: RoomId,
        /// Its header.
        header: Bytes,
        /// The WebSocket frame.
        frame: Bytes,
    },
    /// `room` ended: its listeners are closed.
    Ended(RoomId),
}

/// Where a writer's commands wait (no allocation per command once its buffers have grown).
pub struct Inbox<S> {
    commands: Mutex<Vec<Command<S>>>,
    waker: AtomicWaker,
}

impl<S> Default for Inbox<S> {
    fn default() -> Self {
        Inbox {
            commands: Mutex::new(Vec::new()),
            waker: AtomicWaker::new(),
        }
    }
}

impl<S> Inbox<S> {
    /// Hand `command` to the writer.
    pub fn send(&self, command: Command<S>) {
        self.commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(command);
        self.waker.wake();
    }

    /// Take every waiting command into `into` (emptied first), registering `cx` for the next.
    fn take(&self, cx: &Context<'_>, into: &mut Vec<Command<S>>) {
        self.waker.register(cx.waker());
        into.clear();
        std::mem::swap(
            &mut *self.commands.lock().unwrap_or_else(|e| e.into_inner()),
            into,
        );
    }
}

/// One listener held by a writer.
struct Slot<S> {
    room: RoomId,
    io: S,
    outbox: Outbox,
    /// An incomplete client frame carried to the next read.
    partial: Vec<u8>,
    /// Listed in `Writer::dirty`.
    dirty: bool,
    _guard: Box<dyn Send>,
}

/// What the client sent, as far as the stream cares.
enum FromClient {
    /// Nothing that needs an answer.
    Nothing,
    /// Answer this pong.
    Pong(Bytes),
    /// The client closed, broke the protocol or went away.
    Gone,
}

/// Parse the client frames in `buf`; the unparsed rest is left in `partial`.
fn client_frames(buf: &mut [u8], partial: &mut Vec<u8>) -> FromClient {
    let mut answer = FromClient::Nothing;
    let mut at = 0;
    loop {
        match parse_client_frame(&mut buf[at..]) {
            Ok(Some(f)) => {
                match f.opcode {
                    opcode::CLOSE => return FromClient::Gone,
                    opcode::PING => {
                        let mut out = Vec::with_capacity(f.payload.len() + 2);
                        ws_server_frame(opcode::PONG, &buf[at..][f.payload.clone()], &mut out);
                        answer = FromClient::Pong(Bytes::from(out));
                    }
                    // Text, binary and pongs carry nothing the stream uses.
                    _ => {}
                }
                at += f.consumed;
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, "push listener sent a bad frame");
                return FromClient::Gone;
            }
        }
    }
    partial.clear();
    partial.extend_from_slice(&buf[at..]);
    answer
}

/// A writer task's state: its listeners by slot, their rooms, and who has bytes to write.
pub struct Writer<S> {
    inbox: Arc<Inbox<S>>,
    metrics: Arc<Metrics>,
    slots: Vec<Option<Slot<S>>>,
    free: Vec<usize>,
    rooms: HashMap<RoomId, Vec<usize>>,
    /// Slots with queued bytes.
    dirty: Vec<usize>,
    /// Commands being handled (swapped with the inbox's buffer).
    commands: Vec<Command<S>>,
    /// Read buffer shared by every listener (partial frames carried in their slots).
    scratch: Vec<u8>,
    sweep: tokio::time::Interval,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Writer<S> {
    /// A writer fed through `inbox`.
    pub fn new(inbox: Arc<Inbox<S>>, metrics: Arc<Metrics>) -> Self {
        let mut sweep = tokio::time::interval(SWEEP);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Writer {
            inbox,
            metrics,
            slots: Vec::new(),
            free: Vec::new(),
            rooms: HashMap::new(),
            dirty: Vec::new(),
            commands: Vec::new(),
            scratch: vec![0; MAX_CLIENT_FRAME + 14],
            sweep,
        }
    }

    /// Serve until dropped (never returns on its own).
    pub async fn run(mut self) {
        std::future::poll_fn(|cx| self.poll(cx)).await
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut commands = std::mem::take(&mut self.commands);
        self.inbox.take(cx, &mut commands);
        let mut sweep = commands.is_empty() && self.dirty.is_empty();
        for command in commands.drain(..) {
            self.handle(command);
        }
        self.commands = commands;
        while self.sweep.poll_tick(cx).is_ready() {
            sweep = true;
        }
        let now = Instant::now();
        self.write(cx, now);
        if sweep {
            self.read(cx);
            self.drop_stalled(now);
            self.write(cx, now);
        }
        Poll::Pending
    }

    fn handle(&mut self, command: Command<S>) {
        match command {
            Command::Join {
                room,
                io,
                outbox,
                guard,
            } => {
                let slot = Slot {
                    room,
                    io,
                    outbox,
                    partial: Vec::new(),
                    dirty: false,
                    _guard: guard,
                };
                let at = match self.free.pop() {
                    Some(at) => {
                        self.slots[at] = Some(slot);
                        at
                    }
                    None => {
                        self.slots.push(Some(slot));
                        self.slots.len() - 1
                    }
                };
                self.rooms.entry(room).or_default().push(at);
                self.mark(at);
            }
            Command::Message {
                room,
                header,
                frame,
            } => {
                let Some(members) = self.rooms.get(&room) else {
                    return;
                };
                let mut too_slow = Vec::new();
                for &at in members {
                    let Some(slot) = self.slots[at].as_mut() else {
                        continue;
                    };
                    match slot.outbox.offer(&header, &frame) {
                        Offered::Queued => {}
                        Offered::SkippedOne => {
                            self.metrics.push_skipped.inc();
                        }
                        Offered::TooSlow => {
                            self.metrics.push_skipped.inc();
                            too_slow.push(at);
                        }
                    }
                    if !slot.dirty {
                        slot.dirty = true;
                        self.dirty.push(at);
                    }
                }
                for at in too_slow {
                    self.metrics.push_dropped.inc();
                    self.close(at, close_frame(CLOSE_TOO_SLOW, "too slow"));
                }
            }
            Command::Ended(room) => {
                for at in self.rooms.remove(&room).unwrap_or_default() {
                    if let Some(slot) = self.slots[at].as_mut() {
                        slot.outbox.close(close_frame(CLOSE_ENDED, "ended"));
                        self.mark(at);
                    }
                }
            }
        }
    }

    /// List slot `at` as having bytes to write.
    fn mark(&mut self, at: usize) {
        if let Some(slot) = self.slots[at].as_mut() {
            if !slot.dirty && slot.outbox.pending().is_some() {
                slot.dirty = true;
                self.dirty.push(at);
            }
        }
    }

    /// Queue `close` for slot `at` and take it out of its room (it goes once the frame is out).
    fn close(&mut self, at: usize, close: Bytes) {
        let Some(slot) = self.slots[at].as_mut() else {
            return;
        };
        slot.outbox.close(close);
        let room = slot.room;
        self.leave_room(room, at);
        self.mark(at);
    }

    fn leave_room(&mut self, room: RoomId, at: usize) {
        if let Some(members) = self.rooms.get_mut(&room) {
            if let Some(i) = members.iter().position(|&m| m == at) {
                members.swap_remove(i);
            }
            if members.is_empty() {
                self.rooms.remove(&room);
            }
        }
    }

    /// Forget slot `at` (its guard leaves the hub).
    fn remove(&mut self, at: usize) {
        let Some(slot) = self.slots[at].take() else {
            return;
        };
        if !slot.outbox.is_closing() {
            self.leave_room(slot.room, at);
        }
        self.free.push(at);
    }

    /// Write what every dirty slot's socket takes now.
    fn write(&mut self, cx: &mut Context<'_>, now: Instant) {
        let mut i = 0;
        while i < self.dirty.len() {
            let at = self.dirty[i];
            let Some(slot) = self.slots[at].as_mut() else {
                self.dirty.swap_remove(i);
                continue;
            };
            match flush(slot, cx, now) {
                Flushed::Blocked => i += 1,
                Flushed::Done => {
                    slot.dirty = false;
                    self.dirty.swap_remove(i);
                    if slot.outbox.is_closing() {
                        self.remove(at);
                    }
                }
                Flushed::Broken => {
                    self.dirty.swap_remove(i);
                    self.remove(at);
                }
            }
        }
    }

    /// Read what listeners sent: answer pings, let go of those that closed or broke the protocol.
    fn read(&mut self, cx: &mut Context<'_>) {
        for at in 0..self.slots.len() {
            let Some(slot) = self.slots[at].as_mut() else {
                continue;
            };
            match read_client(slot, cx, &mut self.scratch) {
                FromClient::Nothing => {}
                FromClient::Pong(pong) => {
                    slot.outbox.control(pong);
                    self.mark(at);
                }
                FromClient::Gone => self.close(at, close_frame(1000, "")),
            }
        }
    }

    /// Disconnect listeners whose socket took nothing for [`WRITE_TIMEOUT`].
    fn drop_stalled(&mut self, now: Instant) {
        let stalled: Vec<usize> = self
            .dirty
            .iter()
            .copied()
            .filter(|&at| {
                self.slots[at]
                    .as_ref()
                    .is_some_and(|s| s.outbox.is_stalled(now))
            })
            .collect();
        for at in stalled {
            self.metrics.push_dropped.inc();
            self.remove(at);
        }
        self.dirty.retain(|&at| self.slots[at].is_some());
    }
}

/// How far a slot's socket took its queue.
enum Flushed {
    /// Everything is written (and flushed).
    Done,
    /// The socket is full; the writer is woken when it drains.
    Blocked,
    /// The connection is gone.
    Broken,
}

fn flush<S: AsyncWrite + Unpin>(slot: &mut Slot<S>, cx: &mut Context<'_>, now: Instant) -> Flushed {
    while let Some(bytes) = slot.outbox.pending() {
        match Pin::new(&mut slot.io).poll_write(cx, bytes) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Flushed::Broken,
            Poll::Ready(Ok(n)) => slot.outbox.wrote(n),
            Poll::Pending => {
                slot.outbox.refused(now);
                return Flushed::Blocked;
            }
        }
    }
    // TLS keeps records it could not send yet; plain TCP has nothing to flush.
    match Pin::new(&mut slot.io).poll_flush(cx) {
        Poll::Ready(Ok(())) => Flushed::Done,
        Poll::Ready(Err(_)) => Flushed::Broken,
        Poll::Pending => {
            slot.outbox.refused(now);
            Flushed::Blocked
        }
    }
}

/// Read what one listener sent without waiting.
fn read_client<S: AsyncRead + Unpin>(
    slot: &mut Slot<S>,
    cx: &mut Context<'_>,
    scratch: &mut [u8],
) -> FromClient {
    let mut answer = FromClient::Nothing;
    for _ in 0..READS_PER_SWEEP {
        let kept = slot.partial.len();
        scratch[..kept].copy_from_slice(&slot.partial);
        let mut buf = ReadBuf::new(&mut scratch[kept..]);
        match Pin::new(&mut slot.io).poll_read(cx, &mut buf) {
            Poll::Pending => return answer,
            Poll::Ready(Err(_)) => return FromClient::Gone,
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len();
                if n == 0 {
                    return FromClient::Gone;
                }
                match client_frames(&mut scratch[..kept + n], &mut slot.partial) {
                    FromClient::Nothing => {}
                    FromClient::Gone => return FromClient::Gone,
                    pong => answer = pong,
                }
                if slot.partial.len() == scratch.len() {
                    // A frame larger than the buffer: not a frame this stream accepts.
                    return FromClient::Gone;
                }
            }
        }
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(b: &[u8]) -> Bytes {
        Bytes::copy_from_slice(b)
    }

    fn drain(o: &mut Outbox) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(p) = o.pending() {
            out.push(p.to_vec());
            let n = p.len();
            o.wrote(n);
        }
        out
    }

    #[test]
    fn the_header_goes_first_once_and_a_backlog_follows_it() {
        let h = bytes(b"H");
        let mut o = Outbox::new(Some(h.clone()), [bytes(b"a"), bytes(b"b")]);
        o.offer(&h, &bytes(b"c"));
        assert_eq!(
            drain(&mut o),
            vec![b"H".to_vec(), b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
        );
        // A listener that joined before the room had a header gets it with its first message.
        let mut o = Outbox::new(None, [bytes(b"lost")]);
        assert_eq!(o.pending(), None);
        o.offer(&h, &bytes(b"x"));
        o.offer(&h, &bytes(b"y"));
        assert_eq!(
            drain(&mut o),
            vec![b"H".to_vec(), b"x".to_vec(), b"y".to_vec()]
        );
    }

    #[test]
    fn a_slow_listener_loses_its_oldest_messages_then_is_let_go() {
        let t0 = Instant::now();
        let h = bytes(b"H");
        let mut o = Outbox::new(None, []);
        // The socket took part of the header, then nothing.
        o.offer(&h, &bytes(b"m0"));
        let n = o.pending().unwrap().len();
        assert_eq!(n, 1);
        o.refused(t0);
        for i in 1..OUTBOX_MESSAGES {
            assert_eq!(
                o.offer(&h, &bytes(format!("m{i}").as_bytes())),
                Offered::Queued
            );
        }
        // Full: the next skips the oldest message, never the header.
        assert_eq!(o.offer(&h, &bytes(b"new")), Offered::SkippedOne);
        let rest = drain(&mut o);
        assert_eq!(rest[0], b"H".to_vec());
        assert_eq!(rest[1], b"m1".to_vec());
        assert_eq!(rest.last().unwrap(), &b"new".to_vec());
        assert_eq!(rest.len(), OUTBOX_MESSAGES + 1);
        // A started message is not skipped either.
        let mut o = Outbox::new(Some(h.clone()), []);
        o.wrote(1);
        o.offer(&h, &bytes(b"started"));
        o.wrote(3);
        for _ in 0..OUTBOX_MESSAGES {
            o.offer(&h, &bytes(b"z"));
        }
        assert_eq!(o.pending(), Some(&b"rted"[..]));
        let mut last = Offered::Queued;
        for _ in 0..=MAX_SKIPPED {
            last = o.offer(&h, &bytes(b"z"));
        }
        assert_eq!(last, Offered::TooSlow);
        assert_eq!(o.pending(), Some(&b"rted"[..]));
        // Stalled after the write timeout, not before.
        let mut o = Outbox::new(Some(h), []);
        o.refused(t0);
        o.refused(t0 + Duration::from_secs(5));
        assert!(!o.is_stalled(t0 + WRITE_TIMEOUT - Duration::from_millis(1)));
        assert!(o.is_stalled(t0 + WRITE_TIMEOUT));
        o.wrote(1);
        assert!(!o.is_stalled(t0 + WRITE_TIMEOUT * 2));
    }

    #[test]
    fn closing_drops_what_is_not_started_and_ends_with_the_close_frame() {
        let h = bytes(b"H");
        let mut o = Outbox::new(Some(h.clone()), [bytes(b"ab")]);
        o.wrote(1);
        o.wrote(1);
        assert_eq!(o.pending(), Some(&b"b"[..]));
        o.offer(&h, &bytes(b"c"));
        o.close(bytes(b"CLOSE"));
        o.offer(&h, &bytes(b"d"));
        o.control(bytes(b"pong"));
        assert!(o.is_closing());
        assert_eq!(drain(&mut o), vec![b"b".to_vec(), b"CLOSE".to_vec()]);
    }

    #[test]
    fn client_frames_are_consumed_a_ping_is_answered_and_a_partial_frame_is_kept() {
        // A masked ping "hi" and half of a close frame.
        let mut buf = vec![0x89, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2, 0x88, 0x80];
        let mut partial = Vec::new();
        match client_frames(&mut buf, &mut partial) {
            FromClient::Pong(p) => assert_eq!(&p[..], &[0x8a, 2, b'h', b'i']),
            _ => panic!("expected a pong"),
        }
        assert_eq!(partial, vec![0x88, 0x80]);
        let mut rest = partial.clone();
        rest.extend_from_slice(&[0, 0, 0, 0]);
        assert!(matches!(
            client_frames(&mut rest, &mut partial),
            FromClient::Gone
        ));
        // An unmasked frame breaks the protocol.
        assert!(matches!(
            client_frames(&mut [0x81, 0x01, b'a'], &mut partial),
            FromClient::Gone
        ));
    }

    /// Counts the listeners a writer still holds (their guards).
    struct Held(Arc<std::sync::atomic::AtomicUsize>);

    impl Drop for Held {
        fn drop(&mut self) {
            self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    async fn read_exact(io: &mut tokio::io::DuplexStream, n: usize) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0; n];
        tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut buf))
            .await
            .expect("bytes within 5 s")
            .unwrap();
        buf
    }

    #[tokio::test]
    async fn a_writer_serves_its_listeners_answers_pings_and_lets_the_slow_and_the_gone_go() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        use tokio::io::AsyncWriteExt;
        let inbox: Arc<Inbox<tokio::io::DuplexStream>> = Arc::new(Inbox::default());
        let metrics = Arc::new(Metrics::new("test"));
        let writer = Writer::new(inbox.clone(), metrics.clone());
        let task = tokio::spawn(writer.run());
        let held = Arc::new(AtomicUsize::new(0));
        let (room, other) = (RoomId(1), RoomId(2));
        let join = |room: RoomId, io, header: Option<Bytes>| {
            held.fetch_add(1, SeqCst);
            inbox.send(Command::Join {
                room,
                io,
                outbox: Outbox::new(header, []),
                guard: Box::new(Held(held.clone())),
            });
        };
        // A listener that reads, one whose socket takes 64 bytes and is never read, one of
        // another room.
        let (fast_srv, mut fast) = tokio::io::duplex(1 << 16);
        let (slow_srv, _slow) = tokio::io::duplex(64);
        let (other_srv, mut other_cli) = tokio::io::duplex(1 << 16);
        join(room, fast_srv, None);
        join(room, slow_srv, None);
        join(other, other_srv, None);
        let header = bytes(b"HDR");
        let message = Bytes::from(vec![7u8; 40]);
        for _ in 0..(OUTBOX_MESSAGES as u64 + MAX_SKIPPED + 4) {
            inbox.send(Command::Message {
                room,
                header: header.clone(),
                frame: message.clone(),
            });
            tokio::task::yield_now().await;
        }
        let total = 3 + 40 * (OUTBOX_MESSAGES + MAX_SKIPPED as usize + 4);
        let got = read_exact(&mut fast, total).await;
        assert_eq!(&got[..3], b"HDR");
        assert!(got[3..].iter().all(|&b| b == 7));
        // The slow one skipped more than it may: dropped (its close frame cannot even be
        // written, so it goes when its socket stalls; the drop is counted at once).
        assert_eq!(metrics.push_dropped.get(), 1);
        assert!(metrics.push_skipped.get() > MAX_SKIPPED);
        // The other room's listener got nothing; it pings and gets its pong.
        other_cli
            .write_all(&[0x89, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2])
            .await
            .unwrap();
        assert_eq!(
            read_exact(&mut other_cli, 4).await,
            vec![0x8a, 2, b'h', b'i']
        );
        // It closes: the writer answers with a close frame and lets it go.
        other_cli
            .write_all(&[0x88, 0x80, 0, 0, 0, 0])
            .await
            .unwrap();
        assert_eq!(
            read_exact(&mut other_cli, 4).await,
            vec![0x88, 2, 0x03, 0xe8]
        );
        // The room ends: the fast listener gets the close frame 4002 "ended".
        inbox.send(Command::Ended(room));
        let close = read_exact(&mut fast, 9).await;
        assert_eq!(&close[..4], &[0x88, 7, 0x0f, 0xa2]);
        assert_eq!(&close[4..], b"ended");
        // Every listener but the stalled one has been let go.
        for _ in 0..100 {
            if held.load(SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(held.load(SeqCst), 1);
        task.abort();
    }
}
