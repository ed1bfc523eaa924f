//! The room at scale: 2,000 clients that read slowly or not at all share
//! it with two that broadcast as fast as they can and two that read
//! everything, under a small memory budget (`Config::max_memory`). What
//! waits on the slow ones stays within the budget, and so does the
//! process's memory; the slowest are disconnected as slow consumers, each
//! reported; everyone else gets every message exactly once.

use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatpipe::chat::{Chat, ChatMessage};
use chatpipe::Protocol;
use chatpipe_chat::memory::MESSAGE_OVERHEAD;
use chatpipe_chat::{Config, Disconnect, Event, Usage};
use futures::StreamExt;

mod chat_support;
use chat_support::*;

/// Clients that read slowly (one in four: 128 bytes every 20 ms) or not at
/// all, until the others are done.
const SLOW: usize = 2_000;
/// Clients that broadcast, each `EACH` messages of `TEXT` bytes, as fast as
/// their connections take them, while reading each other's.
const SENDERS: usize = 2;
const EACH: usize = 1_000;
const TEXT: usize = 1000;
/// Clients that read everything as it comes.
const READERS: usize = 2;
/// The room's budget for what waits on its members.
const BUDGET: usize = 32 << 20;
/// Broadcasts everyone gets first (the slow clients' sockets hold them),
/// to measure what a connection that carries traffic holds.
const WARM: usize = 8;
/// The whole test, at most.
const LIMIT: Duration = Duration::from_secs(120);

/// The `k`th text from sender `i`: its sequence number first, padded.
fn text(i: usize, k: usize) -> String {
    let mut s = format!("{k:06} from b{i} ");
    while s.len() < TEXT {
        s.push('.');
    }
    s
}

/// Which sender a broadcast is from, and its sequence number.
fn parse(from: &str, text: &str) -> (usize, usize) {
    let i = from
        .strip_prefix('b')
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("from {from:?}"));
    let k = text[..6].parse().unwrap_or_else(|_| panic!("{text:?}"));
    assert_eq!(text, self::text(i, k), "the text as sent");
    (i, k)
}

/// A slow client: a raw socket with a small receive buffer, read by the
/// sweeper thread, which checks every broadcast it gets.
struct Slow {
    stream: std::net::TcpStream,
    addr: SocketAddr,
    /// Whether it reads a little while the others talk.
    reads: bool,
    buf: Vec<u8>,
    /// The sequence number it expects next from each sender.
    next: [usize; SENDERS],
    /// How its connection ended, if it did.
    end: Option<String>,
}

impl Slow {
    fn connect(server: SocketAddr, reads: bool) -> Slow {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(2048).unwrap();
        s.connect(&server.into()).unwrap();
        s.set_nonblocking(true).unwrap();
        let stream = std::net::TcpStream::from(s);
        Slow {
            addr: stream.local_addr().unwrap(),
            stream,
            reads,
            buf: Vec::new(),
            next: [0; SENDERS],
            end: None,
        }
    }

    /// Reads what is there, up to `max` bytes, and checks each whole
    /// message; returns how many bytes it read.
    fn read(&mut self, max: usize, chunk: &mut [u8]) -> usize {
        match self.stream.read(&mut chunk[..max]) {
            Ok(0) => {
                self.end = Some("EOF".into());
                0
            }
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                self.take_messages();
                n
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
            Err(e) if e.kind() == ErrorKind::Interrupted => 0,
            Err(e) => {
                self.end = Some(e.to_string());
                0
            }
        }
    }

    /// Every broadcast, from each sender in order, exactly once.
    fn take_messages(&mut self) {
        let mut at = 0;
        while let Some(head) = self.buf.get(at..at + 4) {
            let len = u32::from_be_bytes(head.try_into().unwrap()) as usize;
            let Some(payload) = self.buf.get(at + 4..at + 4 + len) else {
                break;
            };
            match Chat.decode(Bytes::copy_from_slice(payload)) {
                Ok(Some(ChatMessage::Broadcast { from, text })) => {
                    let (i, k) = parse(&from, &text);
                    assert_eq!(k, self.next[i], "{}: from {from} in order", self.addr);
                    self.next[i] += 1;
                }
                Ok(Some(ChatMessage::Keepalive)) | Ok(None) => {}
                other => panic!("{}: expected a broadcast, got {other:?}", self.addr),
            }
            at += 4 + len;
        }
        self.buf.drain(..at);
    }

    fn complete(&self) -> bool {
        self.next == [EACH; SENDERS]
    }

    fn done(&self) -> bool {
        self.complete() || self.end.is_some()
    }
}

/// Reads the slow clients until `drain` is set: those that read take 128
/// bytes every 20 ms, the others nothing. Then every one reads all there
/// is until it has every message or its connection has ended.
fn sweep(mut slow: Vec<Slow>, drain: Arc<AtomicBool>) -> Vec<Slow> {
    let deadline = Instant::now() + LIMIT;
    let mut chunk = vec![0u8; 64 * 1024];
    while !drain.load(Ordering::Relaxed) {
        for s in slow.iter_mut().filter(|s| s.reads && s.end.is_none()) {
            s.read(128, &mut chunk);
        }
        assert!(Instant::now() < deadline, "the others never finished");
        // The slow readers' pace, not a wait for anything.
        thread::sleep(Duration::from_millis(20));
    }
    loop {
        let mut read = 0;
        for s in slow.iter_mut().filter(|s| !s.done()) {
            read += s.read(chunk.len(), &mut chunk);
        }
        let open = slow.iter().filter(|s| !s.done()).count();
        if open == 0 {
            return slow;
        }
        if read == 0 {
            assert!(
                Instant::now() < deadline,
                "{open} slow clients neither got everything nor were disconnected"
            );
            thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Sender `i` sends its messages from the `from`th on, while reading the
/// others' until it has `want` of them.
async fn talk(i: usize, from: usize, c: &mut Client, tally: &mut Tally, want: [usize; SENDERS]) {
    let (sender, incoming) = (&c.sender, &mut c.incoming);
    let send = async {
        for k in from..EACH {
            let text = text(i, k);
            sender.send(ChatMessage::Chat { text }).await.unwrap();
        }
    };
    smol::future::zip(send, tally.read(incoming, want)).await;
}

/// What a chatpipe client got: the sequence number it expects next from
/// each sender.
#[derive(Default)]
struct Tally {
    next: [usize; SENDERS],
}

impl Tally {
    /// Reads broadcasts until it has `want` from each sender, checking
    /// that each comes once, in order.
    async fn read(&mut self, incoming: &mut chatpipe::Incoming<Chat>, want: [usize; SENDERS]) {
        while self.next != want {
            let (from, text) = next_broadcast(incoming).await;
            let (j, k) = parse(&from, &text);
            assert!(self.next[j] < want[j], "from {from}: more than {want:?}");
            assert_eq!(k, self.next[j], "from {from} in order");
            self.next[j] += 1;
        }
    }
}

#[test]
fn slow_clients_by_the_thousand_stay_within_the_memory_budget() {
    // Both ends of every connection are in this process.
    let fds = raise_nofile(4 * (SLOW as u64 + 100));
    assert!(
        fds >= 2 * SLOW as u64 + 100,
        "needs {} open files, the limit is {fds}",
        2 * SLOW + 100
    );
    let usage = Arc::new(Usage::default());
    let config = Config {
        max_memory: BUDGET,
        usage: usage.clone(),
        // Only the budget disconnects anyone here: no stall, a backlog
        // larger than everything sent, no idle timeout within the test.
        stall: Duration::from_secs(600),
        backlog: 2 * SENDERS * EACH * TEXT,
        keepalive: Duration::from_secs(120),
        rate: None,
        history: 0,
        join_window: Duration::ZERO,
        max_connections: SLOW + 100,
        max_per_ip: SLOW + 100,
        ..Config::default()
    };
    run(LIMIT, async {
        malloc_trim();
        let rss_start = rss_bytes();
        // Small send buffers, so what the slow clients do not read stays
        // in the room rather than in the kernel.
        let server = start_with(listener_with(4096, 1024), config);
        let connected = |e: &Event| matches!(e, Event::Connected { .. });
        let mut slow = Vec::new();
        for i in 0..SLOW {
            slow.push(Slow::connect(server.addr, i % 4 == 0));
            // Never far ahead of the accept loop.
            if i % 200 == 199 {
                server.wait_count(connected, i + 1).await;
            }
        }
        server.wait_count(connected, SLOW).await;
        let mut readers = Vec::new();
        for i in 0..READERS {
            let c = connect(server.addr).await;
            assert!(matches!(
                c.nick(&format!("r{i}")).await,
                ChatMessage::Ack { .. }
            ));
            readers.push(c);
        }
        let mut senders = Vec::new();
        for i in 0..SENDERS {
            let c = connect(server.addr).await;
            assert!(matches!(
                c.nick(&format!("b{i}")).await,
                ChatMessage::Ack { .. }
            ));
            senders.push(c);
        }
        let clients = SLOW + READERS + SENDERS;
        malloc_trim();
        let rss_joined = rss_bytes();
        let per_client = rss_joined.saturating_sub(rss_start) / clients;

        // First, a few broadcasts, which the slow clients' sockets take:
        // every connection has carried traffic, and keeps the buffers that
        // took (for a second after its last I/O). That, beyond what waits,
        // is the fixed overhead of an active connection. Tallies: what
        // each reader, then each sender, got.
        let mut tallies: Vec<Tally> = (0..READERS + SENDERS).map(|_| Tally::default()).collect();
        {
            let (first, others) = senders.split_first_mut().unwrap();
            let (reader_tallies, sender_tallies) = tallies.split_at_mut(READERS);
            let listeners = readers
                .iter_mut()
                .zip(reader_tallies)
                .chain(others.iter_mut().zip(&mut sender_tallies[1..]));
            let want = std::array::from_fn(|j| if j == 0 { WARM } else { 0 });
            let reads =
                futures::future::join_all(listeners.map(|(c, t)| t.read(&mut c.incoming, want)));
            let send = async {
                for k in 0..WARM {
                    first.say(&text(0, k)).await;
                }
            };
            smol::future::zip(send, reads).await;
        }
        malloc_trim();
        let rss_active = rss_bytes();
        let per_active = rss_active.saturating_sub(rss_joined) / clients;

        // The process's RSS from now on, sampled every 5 ms, once freed
        // heap memory is given back: what is in use.
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicUsize::new(0));
        let sampler = {
            let (stop, peak) = (stop.clone(), peak.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    malloc_trim();
                    peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                    thread::sleep(Duration::from_millis(5));
                }
            })
        };
        let slow_addrs: HashSet<SocketAddr> = slow.iter().map(|s| s.addr).collect();
        let drain = Arc::new(AtomicBool::new(false));
        let sweeper = {
            let drain = drain.clone();
            thread::spawn(move || sweep(slow, drain))
        };

        // Then both senders, as fast as they can, and the readers.
        let (reader_tallies, sender_tallies) = tallies.split_at_mut(READERS);
        let talking =
            futures::future::join_all(senders.iter_mut().zip(sender_tallies).enumerate().map(
                |(i, (c, t))| {
                    let want = std::array::from_fn(|j| if j == i { 0 } else { EACH });
                    let from = if i == 0 { WARM } else { 0 };
                    talk(i, from, c, t, want)
                },
            ));
        let reading = futures::future::join_all(
            readers
                .iter_mut()
                .zip(reader_tallies)
                .map(|(c, t)| t.read(&mut c.incoming, [EACH; SENDERS])),
        );
        smol::future::zip(talking, reading).await;
        drain.store(true, Ordering::Relaxed);
        let slow = smol::unblock(move || sweeper.join()).await.unwrap();
        stop.store(true, Ordering::Relaxed);
        sampler.join().unwrap();
        let rss_peak = peak.load(Ordering::Relaxed);

        // Each slow client got everything, or its connection ended early,
        // and the room said why: it was a slow consumer.
        let ended: Vec<&Slow> = slow.iter().filter(|s| !s.complete()).collect();
        let complete = slow.len() - ended.len();
        let slow_consumer = |e: &Event| {
            matches!(
                e,
                Event::Disconnected {
                    reason: Disconnect::SlowConsumer { .. },
                    ..
                }
            )
        };
        server.wait_count(slow_consumer, ended.len()).await;
        let evicted: HashMap<SocketAddr, usize> = server
            .events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                Event::Disconnected {
                    addr,
                    reason: Disconnect::SlowConsumer { budget, waiting },
                    ..
                } => {
                    assert_eq!(*budget, BUDGET);
                    assert!(*waiting > 0, "{addr} had nothing waiting");
                    Some((*addr, *waiting))
                }
                _ => None,
            })
            .collect();
        for s in &ended {
            assert!(
                evicted.contains_key(&s.addr),
                "{} ended ({:?}) after {:?} of {EACH} from each sender, unreported",
                s.addr,
                s.end,
                s.next
            );
        }
        for addr in evicted.keys() {
            assert!(
                slow_addrs.contains(addr),
                "{addr} keeps up, yet was evicted"
            );
        }
        let discards: Vec<String> = server
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.is_discard() && !slow_consumer(e))
            .map(|e| e.to_string())
            .collect();
        assert!(discards.is_empty(), "{discards:#?}");

        // What the slow clients were meant to get is far over the budget,
        // so some had to go; a few dozen of them fit, so some stayed.
        let cost = TEXT + 2 + MESSAGE_OVERHEAD;
        assert!(SLOW * SENDERS * EACH * cost > 10 * BUDGET);
        assert!(!evicted.is_empty(), "nobody was disconnected");
        assert!(complete > 0, "no slow client stayed");

        // The count never went over the budget, and reached it.
        let peak_waiting = usage.peak_waiting();
        assert!(peak_waiting <= BUDGET, "{peak_waiting} > {BUDGET}");
        assert!(peak_waiting + cost > BUDGET, "{peak_waiting}: never full");

        // Nor did memory. Past what the active connections held, the room
        // holds what waits, at most the budget as counted: one shared copy
        // of each message in the backlogs (less than its count), or the
        // frame a connection encoded (its count allows 32 bytes for the
        // frame's header and a queue slot), in buffers that grow by
        // doubling, so at most twice the count. Plus 16 MiB for the test's
        // own clients and the allocator's spare memory.
        let bound = rss_active + 2 * BUDGET + (16 << 20);
        eprintln!(
            "{clients} clients, budget {} MiB: RSS {:.1} MiB at start, {:.1} MiB joined \
             ({per_client} B per client, both ends), {:.1} MiB active ({per_active} B more per \
             client); peak {:.1} MiB, bound {:.1} MiB; peak waiting {:.1} MiB; {} slow \
             consumers disconnected, {complete} slow clients got everything",
            BUDGET >> 20,
            mib(rss_start),
            mib(rss_joined),
            mib(rss_active),
            mib(rss_peak),
            mib(bound),
            mib(peak_waiting),
            evicted.len(),
        );
        assert!(
            rss_peak <= bound,
            "RSS peaked at {:.1} MiB, over {:.1} MiB",
            mib(rss_peak),
            mib(bound)
        );

        drop(slow);
        for c in readers.into_iter().chain(senders) {
            c.close().await;
        }
        server.shutdown().await;
        // Everyone left: nothing is counted as waiting any more.
        assert_eq!(usage.waiting(), 0);
    });
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

#[test]
fn a_v0_6_client_disconnected_for_the_budget_is_told_why() {
    // The smallest budget: one largest message. One broadcast of 40,000
    // bytes fits it once, not twice: whichever of the two v0.6 clients it
    // reaches first is the one with something waiting when it comes to the
    // second, so it goes, with a Notice saying why, and the other gets it.
    let config = Config {
        max_memory: 0,
        join_window: Duration::ZERO,
        ..Config::default()
    };
    run(Duration::from_secs(60), async {
        let listener = smol::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = start_with(listener, config);
        let (mut ana, _) = connect_v06(server.addr, &[]).await;
        let (mut bo, _) = connect_v06(server.addr, &[]).await;
        let cy = connect(server.addr).await;
        assert!(matches!(cy.nick("cy").await, ChatMessage::Ack { .. }));
        let text = "x".repeat(40_000);
        cy.say(&text).await;

        let (gone, stayed) = match server
            .wait_for(|e| match e {
                Event::Disconnected {
                    addr,
                    reason: reason @ Disconnect::SlowConsumer { .. },
                    ..
                } => Some((*addr, reason.clone())),
                _ => None,
            })
            .await
        {
            (addr, reason) if addr == ana.addr => ((&mut ana, reason), &mut bo),
            (addr, reason) if addr == bo.addr => ((&mut bo, reason), &mut ana),
            other => panic!("{other:?}"),
        };
        let (gone, reason) = gone;
        let budget = chatpipe::chat::MAX_PAYLOAD_LEN + MESSAGE_OVERHEAD;
        let waiting = 40_000 + "cy".len() + MESSAGE_OVERHEAD;
        assert!(
            matches!(reason, Disconnect::SlowConsumer { budget: b, waiting: w } if b == budget && w == waiting),
            "{reason:?}"
        );
        let notice = reason.notice().unwrap();
        assert!(notice.contains("too slow"), "{notice}");
        // What waited for it was dropped: the Notice, then the close.
        assert_eq!(gone.recv().await, ChatMessage::Notice { text: notice });
        assert!(matches!(gone.incoming.next().await, None | Some(Err(_))));
        assert_eq!(
            stayed.recv().await,
            ChatMessage::Broadcast {
                from: "cy".into(),
                text
            }
        );
        let events = server.shutdown().await;
        let discards: Vec<_> = events.iter().filter(|e| e.is_discard()).collect();
        assert_eq!(discards.len(), 1, "{discards:?}");
        let told = events
            .iter()
            .filter(|e| matches!(e, Event::NoticeSent { text, .. } if text.contains("too slow")));
        assert_eq!(told.count(), 1, "{events:#?}");
    });
}
