//! The chat room under abuse: connection churn, a flooding client, the
//! rate limit on a manual clock, and the connection caps. Over loopback,
//! with the room in-process.
//!
//! The tests here take a lock so they never overlap: one counts this
//! process's file descriptors.

mod chat_support;
use chat_support::*;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatpipe::chat::{Chat, ChatMessage};
use chatpipe::{Builder, Error};
use chatpipe_chat::{Config, Event, Rate, Refusal};
use futures::StreamExt;
use smol::future::FutureExt;
use smol::net::{TcpListener, TcpStream};
use smol::Timer;

static SERIAL: Mutex<()> = Mutex::new(());

/// `chat_support::run`, one test at a time.
fn run<T>(limit: Duration, body: impl std::future::Future<Output = T>) -> T {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    chat_support::run(limit, body)
}

async fn start(config: Config) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_with(listener, config)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

#[test]
fn a_thousand_connect_disconnect_cycles_leak_nothing() {
    run(Duration::from_secs(120), async {
        let server = start(Config::default()).await;
        let left = |e: &Event| matches!(e, Event::Disconnected { .. });
        // Warm up (reactor threads, lazily opened descriptors), then count.
        connect(server.addr).await.close().await;
        server.wait_count(left, 1).await;
        let fds = open_fds();

        for i in 0..1000 {
            let c = connect(server.addr).await;
            // A request each time: the client's table fills and empties.
            assert!(matches!(
                c.nick(&format!("n{i}")).await,
                ChatMessage::Ack { .. }
            ));
            c.close().await;
        }
        // Every server task has ended: each reports its disconnection last.
        server.wait_count(left, 1001).await;
        assert_eq!(server.count(|e| matches!(e, Event::Connected { .. })), 1001);
        // No more than before: the warm-up's own socket may still have been
        // closing when they were counted.
        let now = open_fds();
        assert!(
            now <= fds,
            "file descriptors leaked: {now} open, {fds} before"
        );
        // A nickname is free again once its holder left.
        let c = connect(server.addr).await;
        assert!(matches!(c.nick("n999").await, ChatMessage::Ack { .. }));
        c.close().await;
        server.shutdown().await;
    });
}

#[test]
fn a_flooding_client_is_rate_limited_while_everyone_else_gets_through() {
    const CLIENTS: usize = 200;
    const EACH: usize = 5;
    const FLOOD: usize = 2000;
    let rate = Rate {
        per_second: 10.0,
        burst: 20.0,
    };
    // The room's clock stands still: the bucket never refills, so exactly
    // what the burst allows gets through, however long the test takes.
    let frozen = Instant::now();
    run(Duration::from_secs(120), async {
        let server = start(Config {
            rate: Some(rate),
            max_per_ip: CLIENTS,
            clock: Arc::new(move || frozen),
            ..Config::default()
        })
        .await;
        let mut clients = connect_named(server.addr, CLIENTS).await;
        // c0 floods; everyone else says five things.
        let flooder = clients[0].sender.clone();
        let flood = smol::spawn(async move {
            for i in 0..FLOOD {
                let text = format!("flood {i}");
                flooder.send(ChatMessage::Chat { text }).await.unwrap();
            }
        });
        for (i, c) in clients.iter().enumerate().skip(1) {
            for k in 0..EACH {
                let text = format!("{i}:{k}");
                c.sender.send(ChatMessage::Chat { text }).await.unwrap();
            }
        }
        // Each of the others gets every message of the rest exactly once.
        let expected = (CLIENTS - 2) * EACH;
        let readers: Vec<_> = clients
            .iter_mut()
            .enumerate()
            .skip(1)
            .map(|(me, c)| async move {
                let mut seen: HashMap<String, usize> = HashMap::new();
                let mut from_flooder = 0;
                while seen.len() < expected {
                    match c.incoming.next().await {
                        Some(Ok(ChatMessage::Broadcast { from, text })) => {
                            if from == "c0" {
                                from_flooder += 1;
                                continue;
                            }
                            assert_ne!(from, format!("c{me}"), "own message echoed");
                            *seen.entry(text).or_default() += 1;
                        }
                        other => panic!("c{me}: {other:?}"),
                    }
                }
                assert!(seen.values().all(|&n| n == 1), "c{me}: duplicates");
                from_flooder
            })
            .collect();
        let from_flooder = futures::future::join_all(readers).await;
        flood.await;
        // The flood reached the room only as far as the burst allows (its
        // nickname took one token, the first 19 Chats the rest); the rest
        // waits to be read, paced, while everyone else gets through.
        let most = *from_flooder.iter().max().unwrap_or(&0);
        assert!(
            most <= 19,
            "{most} flood messages got through, at most 19 allowed"
        );
        // The server may still be reading the flood: wait for its report.
        let flooder = clients[0].addr;
        let reported = |e: &Event| match e {
            Event::Paced { addr, rate: r } => *addr == flooder && *r == rate,
            _ => false,
        };
        server.wait_count(reported, 1).await;
        for c in clients {
            c.close().await;
        }
        server.shutdown().await;
    });
}

#[test]
fn over_the_rate_is_paced_until_the_clock_moves_on() {
    // The room's clock stands still until the test moves it: no sleeps.
    let now = Arc::new(Mutex::new(Instant::now()));
    let clock = now.clone();
    let config = Config {
        rate: Some(Rate {
            per_second: 1.0,
            burst: 3.0,
        }),
        clock: Arc::new(move || *clock.lock().unwrap()),
        ..Config::default()
    };
    run(Duration::from_secs(60), async {
        let server = start(config).await;
        // Each nickname request takes a token: two are left for each.
        let mut clients = connect_named(server.addr, 2).await;
        for i in 0..5 {
            clients[0].say(&format!("m{i}")).await;
        }
        let c0 = clients[0].addr;
        server
            .wait_for(|e| matches!(e, Event::Paced { addr, .. } if *addr == c0).then_some(()))
            .await;
        // Within the rate: m0 and m1 at once.
        let c1 = &mut clients[1];
        for text in ["m0", "m1"] {
            assert_eq!(c1.next().await, ("c0".to_owned(), text.to_owned()));
        }
        // Paced, not dropped: each second of the room's clock lets one
        // more through, in order. A request waits its turn too.
        let nick = {
            let c0 = &clients[0];
            let advance = async {
                for _ in 0..4 {
                    *now.lock().unwrap() += Duration::from_secs(1);
                    Timer::after(Duration::from_millis(20)).await;
                }
                std::future::pending::<ChatMessage>().await
            };
            c0.nick("x").or(advance).await
        };
        assert!(matches!(nick, ChatMessage::Ack { .. }), "{nick:?}");
        let c1 = &mut clients[1];
        for text in ["m2", "m3", "m4"] {
            assert_eq!(c1.next().await, ("c0".to_owned(), text.to_owned()));
        }
        for c in clients {
            c.close().await;
        }
        let events = server.shutdown().await;
        assert!(!events
            .iter()
            .any(|e| matches!(e, Event::Disconnected { reason, .. }
            if !matches!(reason, chatpipe_chat::Disconnect::Closed))));
    });
}

/// A client that floods far over its rate, for long, is disconnected as
/// an excess flood, and told why by the close; everyone else is served.
#[test]
fn an_excess_flood_is_disconnected_with_its_reason() {
    let now = Arc::new(Mutex::new(Instant::now()));
    let clock = now.clone();
    let config = Config {
        rate: Some(Rate {
            per_second: 1.0,
            burst: 5.0,
        }),
        flood_unread: 50,
        flood_for: Duration::from_secs(10),
        clock: Arc::new(move || *clock.lock().unwrap()),
        ..Config::default()
    };
    run(Duration::from_secs(60), async {
        let server = start(config).await;
        let flooder = connect(server.addr).await;
        for i in 0..500 {
            flooder.say(&format!("flood {i}")).await;
        }
        let addr = flooder.addr;
        server
            .wait_for(|e| matches!(e, Event::Paced { addr: a, .. } if *a == addr).then_some(()))
            .await;
        // The room's clock moves a second at a time until the flooder is
        // gone: it is disconnected once 50 of its messages have waited for
        // 10 s (the first second of waiting may start late on a busy
        // machine, never early).
        let mut waited = Duration::ZERO;
        let reason = loop {
            let gone =
                server.count(|e| matches!(e, Event::Disconnected { addr: a, .. } if *a == addr));
            if gone > 0 {
                break server.disconnected(addr).await;
            }
            assert!(waited < Duration::from_secs(600), "never disconnected");
            waited += Duration::from_secs(1);
            *now.lock().unwrap() += Duration::from_secs(1);
            Timer::after(Duration::from_millis(100)).await;
        };
        assert!(waited >= Duration::from_secs(10), "after {waited:?} only");
        assert!(
            matches!(reason, chatpipe_chat::Disconnect::ExcessFlood { unread: 50, lasting }
                if lasting == Duration::from_secs(10)),
            "{reason:?}"
        );
        server.shutdown().await;
    });
}

/// Connects and reports how the connection ends without sending anything.
async fn refused(server: SocketAddr) -> bool {
    let c = connect(server).await;
    let ended = c.driver.or(async {
        Timer::after(Duration::from_secs(2)).await;
        Err(Error::Closed)
    });
    // Closed by the server at once: a clean end, well before 2 s.
    ended.await.is_ok()
}

#[test]
fn connections_over_the_caps_are_refused_and_logged() {
    run(Duration::from_secs(60), async {
        let server = start(Config {
            max_connections: 3,
            max_per_ip: 2,
            ..Config::default()
        })
        .await;
        let refused_for = |want: Refusal| move |e: &Event| matches!(e, Event::Refused { reason, .. } if *reason == want);
        let a = connect(server.addr).await;
        let b = connect(server.addr).await;
        assert!(matches!(a.nick("a").await, ChatMessage::Ack { .. }));
        assert!(matches!(b.nick("b").await, ChatMessage::Ack { .. }));
        // A third from the same address is over the per-IP cap.
        assert!(refused(server.addr).await);
        let ip = IpAddr::from([127, 0, 0, 1]);
        let over_per_ip = refused_for(Refusal::TooManyFromIp { ip, max: 2 });
        server.wait_count(over_per_ip, 1).await;
        // Once one leaves, there is room again.
        let a_addr = a.addr;
        a.close().await;
        server.disconnected(a_addr).await;
        let c = connect(server.addr).await;
        assert!(matches!(c.nick("c").await, ChatMessage::Ack { .. }));
        b.close().await;
        c.close().await;

        // The overall cap, from three addresses on loopback.
        let mut held = Vec::new();
        for ip in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
            let s = bind_from(ip, server.addr).await;
            let addr = s.local_addr().unwrap();
            let (sender, incoming, conn) = Builder::new().build(s, Chat);
            let driver = smol::spawn(conn);
            let c = Client {
                sender,
                incoming,
                driver,
                addr,
            };
            assert!(matches!(c.nick(ip).await, ChatMessage::Ack { .. }));
            held.push(c);
        }
        assert!(refused(server.addr).await);
        let full = refused_for(Refusal::ServerFull { max: 3 });
        server.wait_count(full, 1).await;
        for c in held {
            c.close().await;
        }
        server.shutdown().await;
    });
}

/// A connection to `server` from the loopback address `ip`.
async fn bind_from(ip: &str, server: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{ip}:0").parse().unwrap();
    socket.bind(&local.into()).unwrap();
    socket.connect(&server.into()).unwrap();
    TcpStream::try_from(std::net::TcpStream::from(socket)).unwrap()
}

/// What the default pacing does to a paste and to a flood, on the room's
/// clock, which the test moves by `step` once the messages it expects by
/// then (`expected(k)` after `k` steps) have arrived, in order, and (with
/// `flood`) once the room reported the flood: no real time is measured.
/// Returns the events.
async fn paced_run(
    lines: usize,
    step: Duration,
    steps: usize,
    flood: bool,
    expected: impl Fn(usize) -> usize,
) -> Vec<Event> {
    let start_at = Instant::now();
    let now = Arc::new(Mutex::new(start_at));
    let clock = now.clone();
    let server = start(Config {
        clock: Arc::new(move || *clock.lock().unwrap()),
        ..Config::default()
    })
    .await;
    let mut clients = connect_named(server.addr, 2).await;
    let typist = clients[0].sender.clone();
    let paste = smol::spawn(async move {
        for i in 0..lines {
            let text = format!("line {i}");
            if typist.send(ChatMessage::Chat { text }).await.is_err() {
                break;
            }
        }
    });
    let mut delivered = 0;
    for k in 0..=steps {
        if k == 1 && flood {
            // The flood's 30 s count from when the room saw it, on its
            // clock: not before the typist's messages have come in.
            server
                .wait_for(|e| matches!(e, Event::Flooding { .. }).then_some(()))
                .await;
        }
        if k > 0 {
            *now.lock().unwrap() = start_at + step * k as u32;
        }
        while delivered < expected(k) {
            let (from, text) = clients[1].next().await;
            assert_eq!((from.as_str(), text), ("c0", format!("line {delivered}")));
            delivered += 1;
        }
    }
    paste.cancel().await;
    // The typist may have been disconnected: drop it without judging.
    let mut clients = clients.into_iter();
    drop(clients.next());
    for c in clients {
        c.close().await;
    }
    server.shutdown().await
}

/// A paste of 50 lines at the default rate (10/s, bursts of 20): every
/// line arrives, in order: 19 at once (the nickname took a token), then one
/// every 100 ms, the last 3.1 s after the paste.
#[test]
fn a_pasted_50_lines_all_arrive_in_order() {
    run(Duration::from_secs(60), async {
        let step = Duration::from_millis(100);
        let events = paced_run(50, step, 31, false, |k| (19 + k).min(50)).await;
        assert!(!events.iter().any(Event::is_discard), "{events:#?}");
    });
}

/// A flood of 20,000 at the defaults: paced at 10/s, then disconnected as
/// an excess flood once 1,000 have waited to be read for 30 s: 319
/// delivered (19 at once, 10 a second for 30 s), the rest never read.
#[test]
fn a_flood_of_20000_is_paced_then_disconnected() {
    run(Duration::from_secs(120), async {
        let step = Duration::from_secs(1);
        let events = paced_run(20_000, step, 30, true, |k| 19 + 10 * k).await;
        let flood = events.iter().find_map(|e| match e {
            Event::Disconnected { reason, .. } if e.is_discard() => Some(reason.clone()),
            _ => None,
        });
        assert!(
            matches!(flood, Some(chatpipe_chat::Disconnect::ExcessFlood { unread: 1000, lasting })
                if lasting == Duration::from_secs(30)),
            "{flood:?}"
        );
        let unread = events.iter().find_map(|e| match e {
            Event::UnreadDiscarded { unread, .. } => Some(*unread),
            _ => None,
        });
        assert!(unread.is_some_and(|n| n >= 1000), "{unread:?}");
        let warned = events.iter().filter(|e| {
            matches!(e, Event::Flooding { unread: 1000, lasting, .. }
                if *lasting == Duration::from_secs(30))
        });
        assert_eq!(warned.count(), 1, "reported once, before: {events:#?}");
    });
}
