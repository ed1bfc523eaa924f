//! Sans-IO connection state: deadlines and the outstanding-request table.
//!
//! It never reads the clock: every input carries `now`, and
//! [`State::poll_timeout`] says when it next wants to be woken. Tests drive
//! it on a virtual clock, so keepalive and timeout logic is checked
//! instantly and deterministically.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::time::{Duration, Instant};

use crate::Error;

/// The timing settings the state machine enforces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub keepalive_interval: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub request_timeout: Duration,
    pub frame_timeout: Option<Duration>,
    pub write_timeout: Option<Duration>,
}

/// Something the driver must act on.
#[derive(Debug)]
pub(crate) enum Event<R> {
    /// Nothing was sent for the keepalive interval: send a keepalive.
    SendKeepalive,
    /// The connection must close with this error.
    Close(Error),
    /// This request's time is up: fail it with [`Error::RequestTimeout`].
    RequestExpired(R),
}

/// What an incoming response matched.
#[derive(Debug, PartialEq)]
pub(crate) enum Matched<R> {
    /// An outstanding request: here is its reply slot.
    Pending(R),
    /// A request that timed out or was abandoned: ignore the response.
    Late,
    /// An id never issued (or already answered): a protocol violation.
    Unknown,
}

/// The request table's hasher: a multiply-rotate hash (FxHash's), not the
/// standard SipHash, which cost about 550 instructions per pipelined
/// request (callgrind), more than a tenth of the whole. Not rustc-hash's
/// `FxHasher` (2.x, in the tree through quinn): it puts 4,096 sequential
/// ids into 1,998 of 4,096 low-bit slots, which the table indexes by; this
/// one spreads them over more than 2,500 (the test below). Flooding is not
/// a concern: every key in the tables is an id we issued (a peer's response
/// ids are only looked up, and a lookup's probe stays among our own keys).
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl IdHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().unwrap_or_default()));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(last));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }

    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
}

type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;
type IdSet<K> = HashSet<K, BuildHasherDefault<IdHasher>>;

/// How many ids of timed-out or abandoned requests are remembered, so that
/// their late responses are ignored rather than treated as violations.
const RETIRED_CAP: usize = 4096;

pub(crate) struct State<Id, R> {
    t: Timeouts,
    last_sent: Instant,
    last_received: Instant,
    /// The application is not taking messages: the peer's silence is ours.
    read_paused: bool,
    frame_started: Option<Instant>,
    write_stalled_since: Option<Instant>,
    requests: IdMap<Id, (Instant, R)>,
    /// Request deadlines in issue order (all requests share one timeout, so
    /// this is sorted). Entries whose request is gone are skipped lazily.
    expiry: VecDeque<(Instant, Id)>,
    /// The table size at which abandoned requests are swept out next.
    sweep_at: usize,
    retired: IdSet<Id>,
    retired_order: VecDeque<Id>,
    /// No deadline falls before this (`None`: there is none), so
    /// `poll_event` finds nothing due before it without computing any.
    /// Traffic moves deadlines later (bytes sent or received) and leaves it
    /// where it is: the driver's timer is re-armed when it fires, not on
    /// every message. A deadline that may be earlier lowers it.
    check_at: Option<Instant>,
}

impl<Id: Eq + Hash + Clone, R> State<Id, R> {
    pub fn new(now: Instant, t: Timeouts) -> Self {
        let mut state = State {
            t,
            last_sent: now,
            last_received: now,
            read_paused: false,
            frame_started: None,
            write_stalled_since: None,
            requests: IdMap::default(),
            expiry: VecDeque::new(),
            sweep_at: 64,
            retired: IdSet::default(),
            retired_order: VecDeque::new(),
            check_at: None,
        };
        state.check_at = state.next_deadline();
        state
    }

    /// A deadline was set that may come before `check_at`.
    fn lower(&mut self, deadline: Option<Instant>) {
        if let Some(d) = deadline {
            self.check_at = Some(self.check_at.map_or(d, |c| c.min(d)));
        }
    }

    /// A frame was queued for sending.
    pub fn on_sent(&mut self, now: Instant) {
        self.last_sent = now;
    }

    /// Bytes arrived from the peer.
    pub fn on_received(&mut self, now: Instant) {
        self.last_received = now;
    }

    /// The application stopped (or resumed) taking messages. While paused we
    /// do not read, so the peer's silence must not count against it.
    pub fn set_read_paused(&mut self, now: Instant, paused: bool) {
        let resumed = self.read_paused && !paused;
        if resumed {
            self.last_received = now;
            if self.frame_started.is_some() {
                self.frame_started = Some(now);
            }
        }
        self.read_paused = paused;
        if resumed {
            // The idle and frame deadlines are back.
            self.lower(self.idle_deadline());
            self.lower(self.frame_deadline());
        }
    }

    /// Whether a frame is partly received.
    pub fn set_mid_frame(&mut self, now: Instant, mid_frame: bool) {
        match (mid_frame, self.frame_started) {
            (true, None) => {
                self.frame_started = Some(now);
                self.lower(self.frame_deadline());
            }
            (false, _) => self.frame_started = None,
            (true, Some(_)) => {}
        }
    }

    /// The state of the write side: `pending` if bytes wait to be written,
    /// `progressed` if some were written just now.
    pub fn set_write_state(&mut self, now: Instant, pending: bool, progressed: bool) {
        let was = self.write_stalled_since;
        self.write_stalled_since = match (pending, was) {
            (false, _) => None,
            (true, None) => Some(now),
            (true, Some(_)) if progressed => Some(now),
            (true, since) => since,
        };
        if was.is_none() {
            self.lower(self.write_deadline());
        }
    }

    /// Registers an outstanding request. Gives `reply` back if `id` is
    /// already outstanding. `abandoned` tells a reply slot whose requester
    /// has gone away; such entries are swept out as the table grows.
    pub fn insert_request(
        &mut self,
        now: Instant,
        id: Id,
        reply: R,
        abandoned: impl Fn(&R) -> bool,
    ) -> Result<(), R> {
        if self.requests.len() >= self.sweep_at {
            self.sweep(abandoned);
        }
        let deadline = now + self.t.request_timeout;
        match self.requests.entry(id.clone()) {
            Entry::Occupied(_) => return Err(reply),
            Entry::Vacant(v) => v.insert((deadline, reply)),
        };
        // A reused id is no longer a late one (no lookup while none is).
        if !self.retired.is_empty() {
            self.retired.remove(&id);
        }
        self.expiry.push_back((deadline, id));
        self.compact_expiry();
        self.lower(Some(deadline));
        Ok(())
    }

    /// Takes the reply slot of the request a response answers.
    pub fn take_response(&mut self, id: &Id) -> Matched<R> {
        if let Some((_, reply)) = self.requests.remove(id) {
            return Matched::Pending(reply);
        }
        if self.retired.remove(id) {
            return Matched::Late;
        }
        Matched::Unknown
    }

    /// Takes an abandoned request out of the table, if its reply slot says
    /// it was (`abandoned`); its late response will be ignored.
    pub fn abandon(&mut self, id: &Id, abandoned: impl Fn(&R) -> bool) {
        if self.requests.get(id).is_some_and(|(_, r)| abandoned(r)) {
            self.requests.remove(id);
            self.retire(id.clone());
        }
    }

    /// Number of outstanding requests.
    pub fn outstanding(&self) -> usize {
        self.requests.len()
    }

    /// Every outstanding request's reply slot, for failing them all.
    pub fn drain_requests(&mut self) -> impl Iterator<Item = R> + '_ {
        self.expiry.clear();
        self.requests.drain().map(|(_, (_, r))| r)
    }

    /// When the driver must next call [`State::poll_event`], if ever: at
    /// the earliest deadline or before it. Deadlines that traffic moved
    /// later since the last look do not move it; then `poll_event` finds
    /// nothing due yet, and this says when to look next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.check_at
    }

    /// The earliest deadline, if any.
    fn next_deadline(&self) -> Option<Instant> {
        [
            self.keepalive_deadline(),
            self.idle_deadline(),
            self.frame_deadline(),
            self.write_deadline(),
            self.expiry.front().map(|(d, _)| *d),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The next thing due at `now`, if any. Call until it returns `None`.
    pub fn poll_event(&mut self, now: Instant) -> Option<Event<R>> {
        if self.check_at.is_none_or(|c| now < c) {
            return None;
        }
        let due = |d: Option<Instant>| d.is_some_and(|d| d <= now);
        if due(self.idle_deadline()) {
            let d = self.t.idle_timeout.unwrap_or_default();
            return Some(Event::Close(Error::IdleTimeout(d)));
        }
        if due(self.frame_deadline()) {
            let d = self.t.frame_timeout.unwrap_or_default();
            return Some(Event::Close(Error::FrameTimeout(d)));
        }
        if due(self.write_deadline()) {
            let d = self.t.write_timeout.unwrap_or_default();
            return Some(Event::Close(Error::WriteTimeout(d)));
        }
        while let Some((deadline, _)) = self.expiry.front() {
            if *deadline > now {
                break;
            }
            let Some((deadline, id)) = self.expiry.pop_front() else {
                break;
            };
            // Skip entries answered since, or whose id was reissued later.
            if self.requests.get(&id).is_some_and(|(d, _)| *d == deadline) {
                if let Some((_, reply)) = self.requests.remove(&id) {
                    self.retire(id);
                    return Some(Event::RequestExpired(reply));
                }
            }
        }
        if due(self.keepalive_deadline()) {
            self.last_sent = now;
            return Some(Event::SendKeepalive);
        }
        self.check_at = self.next_deadline();
        None
    }

    fn keepalive_deadline(&self) -> Option<Instant> {
        self.t.keepalive_interval.map(|i| self.last_sent + i)
    }

    fn idle_deadline(&self) -> Option<Instant> {
        if self.read_paused {
            return None;
        }
        self.t.idle_timeout.map(|i| self.last_received + i)
    }

    fn frame_deadline(&self) -> Option<Instant> {
        if self.read_paused {
            return None;
        }
        Some(self.frame_started? + self.t.frame_timeout?)
    }

    fn write_deadline(&self) -> Option<Instant> {
        Some(self.write_stalled_since? + self.t.write_timeout?)
    }

    /// Moves abandoned requests out of the table, remembering their ids.
    fn sweep(&mut self, abandoned: impl Fn(&R) -> bool) {
        let gone: Vec<Id> = self
            .requests
            .iter()
            .filter(|(_, (_, r))| abandoned(r))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.requests.remove(&id);
            self.retire(id);
        }
        self.sweep_at = (self.requests.len() * 2).max(64);
        self.compact_expiry();
    }

    /// Keeps the expiry queue within a constant factor of the live table.
    fn compact_expiry(&mut self) {
        if self.expiry.len() > 2 * self.requests.len() + 64 {
            let requests = &self.requests;
            self.expiry
                .retain(|(d, id)| requests.get(id).is_some_and(|(rd, _)| rd == d));
        }
    }

    fn retire(&mut self, id: Id) {
        if self.retired.insert(id.clone()) {
            self.retired_order.push_back(id);
        }
        while self.retired_order.len() > RETIRED_CAP {
            if let Some(old) = self.retired_order.pop_front() {
                self.retired.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_hasher_spreads_sequential_ids() {
        use std::hash::BuildHasher;
        let build = BuildHasherDefault::<IdHasher>::default();
        let hashes: Vec<u64> = (0u64..4096).map(|id| build.hash_one(id)).collect();
        // The table uses the top 7 bits as tags and the low bits as slots.
        let tags: HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        let slots: HashSet<u64> = hashes.iter().map(|h| h & 4095).collect();
        assert_eq!(tags.len(), 128);
        assert!(slots.len() > 2500, "{} slots of 4096", slots.len());
        // Byte strings too (GUID-like ids), tails included.
        let a = build.hash_one("request-000000001");
        let b = build.hash_one("request-000000002");
        assert_ne!(a, b);
    }

    const MS: Duration = Duration::from_millis(1);

    fn timeouts() -> Timeouts {
        Timeouts {
            keepalive_interval: Some(100 * MS),
            idle_timeout: Some(300 * MS),
            request_timeout: 1000 * MS,
            frame_timeout: Some(500 * MS),
            write_timeout: Some(400 * MS),
        }
    }

    fn never(_: &u32) -> bool {
        false
    }

    fn drain(s: &mut State<u32, u32>, now: Instant) -> Vec<String> {
        // `Close` is terminal (the driver stops there), so stop after it.
        let mut out = Vec::new();
        while let Some(e) = s.poll_event(now) {
            out.push(match e {
                Event::SendKeepalive => "keepalive".to_string(),
                Event::Close(e) => {
                    out.push(format!("close: {e}"));
                    break;
                }
                Event::RequestExpired(r) => format!("expired {r}"),
            });
            assert!(out.len() < 100, "events never stop: {out:?}");
        }
        out
    }

    #[test]
    fn keepalive_after_silence_and_not_while_sending() {
        let t0 = Instant::now();
        let mut s = State::<u32, u32>::new(t0, timeouts());
        assert_eq!(s.poll_timeout(), Some(t0 + 100 * MS));
        assert!(drain(&mut s, t0 + 99 * MS).is_empty());
        // Traffic every 50 ms: no keepalive.
        for i in 1..=10 {
            let now = t0 + 50 * i * MS;
            s.on_sent(now);
            s.on_received(now);
            assert!(drain(&mut s, now).is_empty(), "at {i}");
        }
        let last = t0 + 500 * MS;
        assert_eq!(drain(&mut s, last + 100 * MS), ["keepalive"]);
        // Re-armed from when it went out.
        assert_eq!(s.poll_timeout(), Some(last + 200 * MS));
    }

    #[test]
    fn traffic_moves_deadlines_without_moving_the_wake_up() {
        let t0 = Instant::now();
        let mut s = State::<u32, u32>::new(t0, timeouts());
        // Traffic pushes keepalive and idle out; the wake-up stays, so a
        // driver's timer is not re-armed per message.
        for i in 1..=9 {
            s.on_sent(t0 + i * 10 * MS);
            s.on_received(t0 + i * 10 * MS);
            assert_eq!(s.poll_timeout(), Some(t0 + 100 * MS));
        }
        // At the wake-up nothing is due yet, and the next one is exact.
        assert!(drain(&mut s, t0 + 100 * MS).is_empty());
        assert_eq!(s.poll_timeout(), Some(t0 + 190 * MS));
        // A deadline that comes sooner brings the wake-up forward at once.
        let mut t = timeouts();
        t.request_timeout = 20 * MS;
        let mut s = State::<u32, u32>::new(t0, t);
        s.insert_request(t0 + 10 * MS, 1, 10, never).unwrap();
        assert_eq!(s.poll_timeout(), Some(t0 + 30 * MS));
        assert_eq!(drain(&mut s, t0 + 30 * MS), ["expired 10"]);
        // So do a reader resumed, a frame begun, a write stalled.
        let mut t = timeouts();
        t.keepalive_interval = None;
        let mut s = State::<u32, u32>::new(t0, t);
        s.set_read_paused(t0, true);
        assert!(drain(&mut s, t0 + 300 * MS).is_empty());
        assert_eq!(s.poll_timeout(), None);
        s.set_read_paused(t0 + 1000 * MS, false);
        assert_eq!(s.poll_timeout(), Some(t0 + 1300 * MS));
        let mut t = timeouts();
        t.keepalive_interval = None;
        t.idle_timeout = None;
        let mut s = State::<u32, u32>::new(t0, t);
        assert_eq!(s.poll_timeout(), None);
        s.set_mid_frame(t0 + 50 * MS, true);
        assert_eq!(s.poll_timeout(), Some(t0 + 550 * MS));
        s.set_write_state(t0 + 60 * MS, true, false);
        assert_eq!(s.poll_timeout(), Some(t0 + 460 * MS));
    }

    #[test]
    fn idle_timeout_measured_from_last_byte() {
        let t0 = Instant::now();
        let mut s = State::<u32, u32>::new(t0, timeouts());
        s.on_received(t0 + 200 * MS);
        let evs = drain(&mut s, t0 + 499 * MS);
        assert!(!evs.iter().any(|e| e.contains("idle")), "{evs:?}");
        assert_eq!(
            drain(&mut s, t0 + 500 * MS).last().map(String::as_str),
            Some("close: idle timeout: nothing received for 300ms")
        );
    }

    #[test]
    fn paused_reader_is_not_a_silent_peer() {
        let t0 = Instant::now();
        let mut s = State::<u32, u32>::new(t0, timeouts());
        s.set_read_paused(t0, true);
        s.set_mid_frame(t0, true);
        let evs = drain(&mut s, t0 + 10_000 * MS);
        assert!(evs.iter().all(|e| e == "keepalive"), "{evs:?}");
        // Resuming restarts the clock rather than firing at once.
        let t1 = t0 + 10_000 * MS;
        s.set_read_paused(t1, false);
        assert!(drain(&mut s, t1 + 299 * MS)
            .iter()
            .all(|e| e == "keepalive"));
        assert!(drain(&mut s, t1 + 300 * MS)
            .iter()
            .any(|e| e.contains("idle")));
    }

    #[test]
    fn frame_and_write_timeouts() {
        let t0 = Instant::now();
        let mut t = timeouts();
        t.idle_timeout = None;
        let mut s = State::<u32, u32>::new(t0, t);
        s.set_mid_frame(t0, true);
        s.set_mid_frame(t0 + 400 * MS, true); // still the same frame
        assert!(drain(&mut s, t0 + 499 * MS)
            .iter()
            .all(|e| e == "keepalive"));
        assert!(drain(&mut s, t0 + 500 * MS)[0].contains("frame timeout"));

        let mut s = State::<u32, u32>::new(t0, t);
        s.set_write_state(t0, true, false);
        s.set_write_state(t0 + 300 * MS, true, true); // progress resets
        s.set_write_state(t0 + 600 * MS, true, false);
        assert!(drain(&mut s, t0 + 699 * MS)
            .iter()
            .all(|e| e == "keepalive"));
        assert!(drain(&mut s, t0 + 700 * MS)[0].contains("write timeout"));
    }

    #[test]
    fn requests_match_expire_and_retire() {
        let t0 = Instant::now();
        let mut t = timeouts();
        t.keepalive_interval = None;
        t.idle_timeout = None;
        let mut s = State::<u32, u32>::new(t0, t);
        s.insert_request(t0, 1, 10, never).unwrap();
        s.insert_request(t0 + 10 * MS, 2, 20, never).unwrap();
        assert_eq!(s.insert_request(t0, 2, 99, never), Err(99));
        assert_eq!(s.take_response(&1), Matched::Pending(10));
        assert_eq!(s.take_response(&1), Matched::Unknown, "answered twice");
        assert_eq!(s.take_response(&7), Matched::Unknown);
        assert_eq!(s.poll_timeout(), Some(t0 + 1000 * MS));
        assert!(drain(&mut s, t0 + 1009 * MS).is_empty());
        assert_eq!(drain(&mut s, t0 + 1010 * MS), ["expired 20"]);
        assert_eq!(s.outstanding(), 0);
        assert_eq!(s.take_response(&2), Matched::Late);
        assert_eq!(s.take_response(&2), Matched::Unknown, "late only once");
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn abandoned_requests_are_swept_and_late() {
        let t0 = Instant::now();
        let mut s = State::<u32, u32>::new(t0, timeouts());
        let odd = |r: &u32| r % 2 == 1;
        for i in 0..64 {
            s.insert_request(t0, i, i, odd).unwrap();
        }
        assert_eq!(s.outstanding(), 64);
        s.insert_request(t0, 1000, 1000, odd).unwrap();
        assert_eq!(s.outstanding(), 33);
        assert_eq!(s.take_response(&3), Matched::Late);
        assert_eq!(s.take_response(&4), Matched::Pending(4));
        s.abandon(&6, |_| true);
        assert_eq!(s.outstanding(), 31);
        assert_eq!(s.take_response(&6), Matched::Late);
    }

    #[test]
    fn expiry_queue_stays_bounded() {
        let t0 = Instant::now();
        let mut s = State::<u32, u32>::new(t0, timeouts());
        for i in 0..100_000 {
            s.insert_request(t0, i, i, never).unwrap();
            assert_eq!(s.take_response(&i), Matched::Pending(i));
        }
        assert!(s.expiry.len() <= 2 * s.requests.len() + 65);
        assert!(s.retired.len() <= RETIRED_CAP);
    }
}
