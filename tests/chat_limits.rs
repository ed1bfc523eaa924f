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
use chatpipe_chat::{Config, Event, NicknameRefusal, Rate, Refusal};
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
        assert_eq!(open_fds(), fds, "file descriptors leaked");
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
        // The flood reached the room only as far as the burst allows: its
        // nickname took one token, the first 19 Chats the rest.
        let most = *from_flooder.iter().max().unwrap_or(&0);
        assert!(
            most <= 19,
            "{most} flood messages got through, at most 19 allowed"
        );
        // The server may still be reading the flood: wait for its report.
        let flooder = clients[0].addr;
        let reported = |e: &Event| match e {
            Event::RateLimited { addr, rate: r, .. } => *addr == flooder && *r == rate,
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
fn over_the_rate_drops_until_the_clock_moves_on() {
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
        let c0 = &clients[0];
        // A Nak over the rate answers the request after everything c0 sent
        // before it: by then the room has handled all of it.
        let over_the_rate = || async {
            match c0.nick("x").await {
                ChatMessage::Nak { message, .. } => {
                    assert_eq!(message, NicknameRefusal::RateLimited.to_string());
                }
                other => panic!("expected a Nak, got {other:?}"),
            }
        };
        let reports = || -> Vec<u64> {
            let events = server.events.lock().unwrap();
            let dropped = events.iter().filter_map(|e| match e {
                Event::RateLimited { addr, dropped, .. } if *addr == c0.addr => Some(*dropped),
                _ => None,
            });
            dropped.collect()
        };

        for i in 0..5 {
            c0.say(&format!("m{i}")).await;
        }
        over_the_rate().await;
        // The first drop is reported at once; the next ones (m3, m4, the
        // nickname) wait for a second to pass.
        assert_eq!(reports(), [1]);

        // Two seconds refill two tokens.
        *now.lock().unwrap() += Duration::from_secs(2);
        c0.say("m5").await;
        c0.say("m6").await;
        c0.say("m7").await;
        over_the_rate().await;
        assert_eq!(reports(), [1, 4], "m3, m4, x and m7");
        // One more second, one more token.
        *now.lock().unwrap() += Duration::from_secs(1);
        c0.say("m8").await;

        // Only what was within the rate reached c1, in order.
        let c1 = &mut clients[1];
        for text in ["m0", "m1", "m5", "m6", "m8"] {
            assert_eq!(c1.next().await, ("c0".to_owned(), text.to_owned()));
        }
        for c in clients {
            c.close().await;
        }
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
