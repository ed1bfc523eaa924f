//! The room's v0.6 (`docs/PROTOCOL.md`, "Version 0.6"), in-process over
//! loopback: chatpipe clients saying Hello, next to v0.5 clients that never
//! do. "Sees nothing" is checked by a marker broadcast sent afterwards
//! arriving first.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chatpipe::chat::{
    capability, Chat, ChatMessage, Limits, PresenceChange, RequestId, V0_5, V0_6,
};
use chatpipe::Protocol;
use chatpipe_chat::{
    Config, Disconnect, Event, HelloRefusal, NoticeFailure, Request, RequestRefusal,
};
use futures::StreamExt;
use smol::net::TcpListener;

mod chat_support;
use chat_support::*;

const LIMIT: Duration = Duration::from_secs(60);

const ALL: [&str; 4] = [
    capability::ACK,
    capability::DIRECT,
    capability::PRESENCE,
    capability::HISTORY,
];

async fn start_config(config: Config) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_with(listener, config)
}

fn say(text: &str) -> ChatMessage {
    ChatMessage::Say {
        request_id: RequestId::random(),
        text: text.into(),
    }
}

fn direct(to: &str, text: &str) -> ChatMessage {
    ChatMessage::Direct {
        request_id: RequestId::random(),
        to: to.into(),
        text: text.into(),
    }
}

fn who() -> ChatMessage {
    ChatMessage::Who {
        request_id: RequestId::random(),
    }
}

fn broadcast(from: &str, text: &str) -> ChatMessage {
    ChatMessage::Broadcast {
        from: from.into(),
        text: text.into(),
    }
}

fn presence(change: PresenceChange, nickname: &str, new_nickname: &str) -> ChatMessage {
    ChatMessage::Presence {
        change,
        nickname: nickname.into(),
        new_nickname: new_nickname.into(),
    }
}

/// The Nak's message, failing on anything else.
fn nak(answer: ChatMessage) -> String {
    match answer {
        ChatMessage::Nak { message, .. } => message,
        other => panic!("expected a Nak, got {other:?}"),
    }
}

fn is_ack(answer: &ChatMessage) -> bool {
    matches!(answer, ChatMessage::Ack { .. })
}

async fn named(c: &Client, nickname: &str) {
    assert!(is_ack(&c.nick(nickname).await));
}

#[test]
fn welcome_grants_known_capabilities_and_the_configured_limits() {
    run(LIMIT, async {
        let server = start().await;
        let (c, welcome) = connect_v06(
            server.addr,
            &["history", "bogus", "ack", "presence", "direct"],
        )
        .await;
        let ChatMessage::Welcome {
            version,
            capabilities,
            limits,
            ..
        } = welcome
        else {
            unreachable!()
        };
        assert_eq!(version, V0_6);
        assert_eq!(
            capabilities, ALL,
            "unknown names ignored, in protocol order"
        );
        assert_eq!(
            limits,
            Limits {
                max_frame: 65_813,
                rate_per_1000s: 10_000,
                burst: 20,
                keepalive_ms: 5_000,
            }
        );
        let granted = server
            .wait_for(|e| match e {
                Event::Welcomed { addr, capabilities } if *addr == c.addr => {
                    Some(capabilities.clone())
                }
                _ => None,
            })
            .await;
        assert_eq!(granted, ALL);
        c.close().await;
        server.shutdown().await;

        // No rate limit, no history, another keepalive: the Welcome says so.
        let server = start_config(Config {
            rate: None,
            history: 0,
            keepalive: Duration::from_secs(4),
            ..Config::default()
        })
        .await;
        let (c, welcome) = connect_v06(server.addr, &ALL).await;
        let ChatMessage::Welcome {
            capabilities,
            limits,
            ..
        } = welcome
        else {
            unreachable!()
        };
        assert_eq!(capabilities, ["ack", "direct", "presence"]);
        assert_eq!(
            limits,
            Limits {
                max_frame: 65_813,
                rate_per_1000s: 0,
                burst: 0,
                keepalive_ms: 4_000,
            }
        );
        // Asking for nothing is granted nothing, and is still 0.6.
        let (bare, welcome) = connect_v06(server.addr, &[]).await;
        assert!(
            matches!(&welcome, ChatMessage::Welcome { capabilities, .. } if capabilities.is_empty()),
            "{welcome:?}"
        );
        c.close().await;
        bare.close().await;
        server.shutdown().await;
    });
}

#[test]
fn say_is_acked_and_reaches_v0_5_clients_as_a_broadcast() {
    run(LIMIT, async {
        let server = start().await;
        let (mut ana, _) = connect_v06(server.addr, &[capability::ACK]).await;
        let mut bo = connect(server.addr).await;
        named(&ana, "ana").await;
        named(&bo, "bo").await;

        assert!(is_ack(&ana.ask(say("hi bo")).await));
        assert_eq!(bo.recv().await, broadcast("ana", "hi bo"));
        // Not back to its sender: ana's next message is bo's.
        bo.say("hi ana").await;
        assert_eq!(ana.recv().await, broadcast("bo", "hi ana"));

        // Without `ack`, a Say is refused, and says why; so is one from a
        // client that never said Hello.
        let (cy, _) = connect_v06(server.addr, &[capability::PRESENCE]).await;
        let refusal = RequestRefusal::NotGranted {
            capability: capability::ACK,
        };
        assert_eq!(nak(cy.ask(say("psst")).await), refusal.to_string());
        assert_eq!(nak(bo.ask(say("psst")).await), refusal.to_string());
        let refused = server
            .wait_for(|e| match e {
                Event::RequestRefused {
                    addr,
                    request: Request::Say,
                    reason,
                } if *addr == cy.addr => Some(reason.clone()),
                _ => None,
            })
            .await;
        assert_eq!(refused, refusal);
        // Neither reached anyone: the next broadcast is a marker.
        ana.say("marker").await;
        assert_eq!(bo.recv().await, broadcast("ana", "marker"));

        for c in [ana, bo, cy] {
            c.close().await;
        }
        server.shutdown().await;
    });
}

#[test]
fn direct_reaches_only_its_recipient() {
    run(LIMIT, async {
        let server = start().await;
        let (mut ana, _) = connect_v06(server.addr, &[capability::DIRECT]).await;
        let (mut bo, _) = connect_v06(server.addr, &[capability::DIRECT]).await;
        let (mut dan, _) = connect_v06(server.addr, &[capability::DIRECT]).await;
        let mut cy = connect(server.addr).await;
        for (c, n) in [(&ana, "ana"), (&bo, "bo"), (&dan, "dan"), (&cy, "cy")] {
            named(c, n).await;
        }

        assert!(is_ack(&ana.ask(direct("bo", "psst")).await));
        assert_eq!(
            bo.recv().await,
            ChatMessage::Private {
                from: "ana".into(),
                text: "psst".into(),
            }
        );
        let to = server
            .wait_for(|e| match e {
                Event::DirectDelivered { addr, to } if *addr == ana.addr => Some(to.clone()),
                _ => None,
            })
            .await;
        assert_eq!(to, "bo");

        // Nobody by that name; a v0.5 client, which would skip a Private;
        // and a sender not granted `direct`.
        let refusals = [
            (
                &ana,
                direct("zed", "hello?"),
                "no member is called zed".to_owned(),
            ),
            (
                &ana,
                direct("cy", "psst"),
                RequestRefusal::CannotReceive {
                    nickname: "cy".into(),
                }
                .to_string(),
            ),
            (
                &cy,
                direct("bo", "psst"),
                RequestRefusal::NotGranted {
                    capability: capability::DIRECT,
                }
                .to_string(),
            ),
        ];
        for (c, request, why) in refusals {
            assert_eq!(nak(c.ask(request).await), why);
        }
        let unknown = RequestRefusal::NoSuchMember {
            nickname: "zed".into(),
        };
        server
            .wait_for(|e| match e {
                Event::RequestRefused {
                    request: Request::Direct,
                    reason,
                    ..
                } if *reason == unknown => Some(()),
                _ => None,
            })
            .await;

        // The others saw none of it: a marker sent after arrives first.
        ana.say("marker").await;
        for c in [&mut bo, &mut cy, &mut dan] {
            assert_eq!(c.recv().await, broadcast("ana", "marker"));
        }
        bo.say("marker 2").await;
        assert_eq!(ana.recv().await, broadcast("bo", "marker 2"));

        for c in [ana, bo, cy, dan] {
            c.close().await;
        }
        server.shutdown().await;
    });
}

#[test]
fn who_lists_everyone_in_join_order() {
    run(LIMIT, async {
        let server = start().await;
        let (ana, _) = connect_v06(server.addr, &[capability::PRESENCE]).await;
        let bo = connect(server.addr).await;
        let cy = connect(server.addr).await;
        let (dan, _) = connect_v06(server.addr, &[capability::ACK]).await;
        named(&ana, "ana").await;
        named(&bo, "bo").await;
        named(&dan, "dan").await;
        // cy has no nickname: listed by its address. Once it is known to be
        // in the room.
        server
            .wait_for(|e| matches!(e, Event::Connected { addr } if *addr == cy.addr).then_some(()))
            .await;

        match ana.ask(who()).await {
            ChatMessage::Members { total, names, .. } => {
                assert_eq!(total, 4);
                assert_eq!(names, ["ana", "bo", &cy.addr.to_string(), "dan"]);
            }
            other => panic!("expected Members, got {other:?}"),
        }
        // Who comes with `presence`.
        let refusal = RequestRefusal::NotGranted {
            capability: capability::PRESENCE,
        };
        assert_eq!(nak(dan.ask(who()).await), refusal.to_string());
        assert_eq!(nak(bo.ask(who()).await), refusal.to_string());

        // One has left: the list says so.
        let bo_addr = bo.addr;
        bo.close().await;
        server.disconnected(bo_addr).await;
        match ana.ask(who()).await {
            ChatMessage::Members { total, names, .. } => {
                assert_eq!(total, 3);
                assert_eq!(names, ["ana", &cy.addr.to_string(), "dan"]);
            }
            other => panic!("expected Members, got {other:?}"),
        }

        for c in [ana, cy, dan] {
            c.close().await;
        }
        server.shutdown().await;
    });
}

#[test]
fn presence_reaches_only_clients_that_asked_for_it() {
    run(LIMIT, async {
        let server = start().await;
        let (mut ana, _) = connect_v06(server.addr, &[capability::PRESENCE]).await;
        let (mut bo, _) = connect_v06(server.addr, &[capability::ACK]).await;
        let mut cy = connect(server.addr).await;
        named(&ana, "ana").await;
        named(&bo, "bo").await;
        named(&cy, "cy").await;
        assert_eq!(ana.recv().await, presence(PresenceChange::Joined, "bo", ""));
        assert_eq!(ana.recv().await, presence(PresenceChange::Joined, "cy", ""));

        let dan = connect(server.addr).await;
        named(&dan, "dan").await;
        assert_eq!(
            ana.recv().await,
            presence(PresenceChange::Joined, "dan", "")
        );
        // Asking again for one's own nickname changes nothing.
        named(&dan, "dan").await;
        named(&dan, "dan2").await;
        assert_eq!(
            ana.recv().await,
            presence(PresenceChange::Renamed, "dan", "dan2")
        );
        dan.close().await;
        assert_eq!(ana.recv().await, presence(PresenceChange::Left, "dan2", ""));

        // A client leaving without a nickname is not announced; nor is one
        // joining until it has one.
        let eve = connect(server.addr).await;
        let eve_addr = eve.addr;
        eve.close().await;
        server.disconnected(eve_addr).await;

        // bo (0.6, no `presence`) and cy (0.5) saw none of it.
        cy.say("marker").await;
        assert_eq!(bo.recv().await, broadcast("cy", "marker"));
        assert_eq!(ana.recv().await, broadcast("cy", "marker"));
        bo.say("marker 2").await;
        assert_eq!(cy.recv().await, broadcast("bo", "marker 2"));
        assert_eq!(ana.recv().await, broadcast("bo", "marker 2"));

        for c in [ana, bo, cy] {
            c.close().await;
        }
        server.shutdown().await;
    });
}

#[test]
fn history_on_joining_comes_before_live_traffic() {
    run(LIMIT, async {
        let server = start().await;
        let ana = connect(server.addr).await;
        let mut bo = connect(server.addr).await;
        named(&ana, "ana").await;
        named(&bo, "bo").await;
        let before = now_ms();
        for text in ["one", "two", "three"] {
            ana.say(text).await;
        }
        // In the room once bo has them.
        for text in ["one", "two", "three"] {
            assert_eq!(bo.recv().await, broadcast("ana", text));
        }

        let (mut zed, _) = connect_v06(server.addr, &[capability::HISTORY]).await;
        let (mut yan, _) = connect_v06(server.addr, &[capability::ACK]).await;
        ana.say("live").await;
        for text in ["one", "two", "three"] {
            match zed.recv().await {
                ChatMessage::History {
                    at_ms,
                    from,
                    text: t,
                } => {
                    assert_eq!((from.as_str(), t.as_str()), ("ana", text));
                    assert!((before..=now_ms()).contains(&at_ms), "{at_ms}");
                }
                other => panic!("expected History of {text:?}, got {other:?}"),
            }
        }
        assert_eq!(zed.recv().await, broadcast("ana", "live"));
        // Without `history`: live traffic only.
        assert_eq!(yan.recv().await, broadcast("ana", "live"));
        let (sent, skipped) = server
            .wait_for(|e| match e {
                Event::HistorySent {
                    addr,
                    sent,
                    skipped,
                } if *addr == zed.addr => Some((*sent, *skipped)),
                _ => None,
            })
            .await;
        assert_eq!((sent, skipped), (3, 0));

        // What reached a client live, before its Hello, is not repeated as
        // history.
        let mut xi = connect(server.addr).await;
        server
            .wait_for(|e| matches!(e, Event::Connected { addr } if *addr == xi.addr).then_some(()))
            .await;
        ana.say("while you were here").await;
        assert_eq!(xi.recv().await, broadcast("ana", "while you were here"));
        let welcome = xi.ask(hello(&[V0_6], &[capability::HISTORY])).await;
        assert!(
            matches!(welcome, ChatMessage::Welcome { .. }),
            "{welcome:?}"
        );
        ana.say("after").await;
        let mut got = Vec::new();
        for _ in 0..5 {
            got.push(match xi.recv().await {
                ChatMessage::History { text, .. } => format!("history {text}"),
                ChatMessage::Broadcast { text, .. } => format!("live {text}"),
                other => panic!("{other:?}"),
            });
        }
        assert_eq!(
            got,
            [
                "history one",
                "history two",
                "history three",
                "history live",
                "live after"
            ]
        );

        for c in [ana, bo, zed, yan, xi] {
            c.close().await;
        }
        server.shutdown().await;
    });
}

#[test]
fn history_keeps_the_configured_number_of_messages() {
    run(LIMIT, async {
        let server = start_config(Config {
            history: 2,
            ..Config::default()
        })
        .await;
        let ana = connect(server.addr).await;
        let mut bo = connect(server.addr).await;
        // Both in the room once answered.
        named(&ana, "ana").await;
        named(&bo, "bo").await;
        for text in ["one", "two", "three"] {
            ana.say(text).await;
        }
        for text in ["one", "two", "three"] {
            assert_eq!(bo.recv().await, broadcast("ana", text));
        }
        let (mut zed, _) = connect_v06(server.addr, &[capability::HISTORY]).await;
        bo.say("live").await;
        for text in ["two", "three"] {
            match zed.recv().await {
                ChatMessage::History { from, text: t, .. } => {
                    assert_eq!((from.as_str(), t.as_str()), ("ana", text))
                }
                other => panic!("expected History of {text:?}, got {other:?}"),
            }
        }
        assert_eq!(zed.recv().await, broadcast("bo", "live"));
        for c in [ana, bo, zed] {
            c.close().await;
        }
        server.shutdown().await;
    });
}

#[test]
fn a_hello_without_0_6_gets_a_nak_then_the_connection_closes() {
    run(LIMIT, async {
        let server = start().await;
        let mut c = connect(server.addr).await;
        let answer = c.ask(hello(&[V0_5, 0x0100], &[capability::ACK])).await;
        assert_eq!(
            nak(answer),
            "no common protocol version (this server speaks 0.5 and 0.6)"
        );
        // Closed cleanly by the server.
        assert!(c.incoming.next().await.is_none());
        c.driver.await.unwrap();
        let reason = server
            .wait_for(|e| match e {
                Event::HelloRefused { addr, reason } if *addr == c.addr => Some(reason.clone()),
                _ => None,
            })
            .await;
        assert_eq!(
            reason,
            HelloRefusal::NoCommonVersion {
                offered: vec![V0_5, 0x0100]
            }
        );
        let left = server.disconnected(c.addr).await;
        assert!(matches!(left, Disconnect::Closed), "{left:?}");
        server.shutdown().await;
    });
}

#[test]
fn a_late_hello_gets_a_nak_and_the_connection_stays() {
    run(LIMIT, async {
        let server = start().await;
        let not_first = HelloRefusal::NotFirst.to_string();

        // A second Hello: refused, still 0.6 with what it had.
        let (ana, _) = connect_v06(server.addr, &[capability::ACK]).await;
        assert_eq!(nak(ana.ask(hello(&[V0_6], &ALL)).await), not_first);
        assert!(is_ack(&ana.ask(say("still here")).await));

        // A Hello after a v0.5 message: refused, still 0.5.
        let mut bo = connect(server.addr).await;
        named(&bo, "bo").await;
        assert_eq!(nak(bo.ask(hello(&[V0_6], &ALL)).await), not_first);
        let no_ack = RequestRefusal::NotGranted {
            capability: capability::ACK,
        };
        assert_eq!(nak(bo.ask(say("x")).await), no_ack.to_string());
        ana.say("marker").await;
        assert_eq!(bo.recv().await, broadcast(&ana.addr.to_string(), "marker"));

        let refusals = server.count(|e| {
            matches!(
                e,
                Event::HelloRefused {
                    reason: HelloRefusal::NotFirst,
                    ..
                }
            )
        });
        assert_eq!(refusals, 2);
        ana.close().await;
        bo.close().await;
        let events = server.shutdown().await;
        let closed = events.iter().filter(|e| {
            matches!(
                e,
                Event::Disconnected {
                    reason: Disconnect::Closed,
                    ..
                }
            )
        });
        assert_eq!(closed.count(), 2, "{events:#?}");
    });
}

#[test]
fn shutdown_sends_v0_6_clients_a_notice() {
    run(LIMIT, async {
        let server = start().await;
        let (mut ana, _) = connect_v06(server.addr, &[]).await;
        let mut bo = connect(server.addr).await;
        named(&bo, "bo").await;
        bo.say("last words").await;
        assert_eq!(ana.recv().await, broadcast("bo", "last words"));

        let events = server.shutdown().await;
        let text = events
            .iter()
            .find_map(|e| match e {
                Event::NoticeSent { addr, text } if *addr == ana.addr => Some(text.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no notice: {events:#?}"));
        assert_eq!(text, "the server is shutting down");
        assert_eq!(ana.recv().await, ChatMessage::Notice { text });
        assert!(ana.incoming.next().await.is_none());
        // The v0.5 client gets nothing new: just the close.
        assert!(bo.incoming.next().await.is_none());
        ana.driver.await.unwrap();
        bo.driver.await.unwrap();
        let notices = events
            .iter()
            .filter(|e| matches!(e, Event::NoticeSent { .. } | Event::NoticeNotSent { .. }));
        assert_eq!(notices.count(), 1, "{events:#?}");
    });
}

#[test]
fn a_v0_6_client_too_far_behind_is_told_why() {
    run(LIMIT, async {
        // One broadcast is over the backlog: whoever it is for is
        // disconnected at once, with room in its queue for the Notice.
        let server = start_config(Config {
            backlog: 1024,
            ..Config::default()
        })
        .await;
        let (mut ana, _) = connect_v06(server.addr, &[]).await;
        let mut bo = connect(server.addr).await;
        let cy = connect(server.addr).await;
        named(&cy, "cy").await;
        cy.say(&"x".repeat(2000)).await;

        let reason = Disconnect::TooFarBehind { backlog: 1024 };
        let text = reason.notice().unwrap();
        assert_eq!(ana.recv().await, ChatMessage::Notice { text: text.clone() });
        assert!(ana.incoming.next().await.is_none());
        let left = server.disconnected(ana.addr).await;
        assert!(
            matches!(left, Disconnect::TooFarBehind { backlog: 1024 }),
            "{left:?}"
        );
        let told = server
            .wait_for(|e| match e {
                Event::NoticeSent { addr, text } if *addr == ana.addr => Some(text.clone()),
                _ => None,
            })
            .await;
        assert_eq!(told, text);

        // The v0.5 client is dropped as before, without a Notice.
        let left = server.disconnected(bo.addr).await;
        assert!(matches!(left, Disconnect::TooFarBehind { .. }), "{left:?}");
        assert!(matches!(bo.incoming.next().await, None | Some(Err(_))));
        assert_eq!(
            server.count(|e| matches!(e, Event::NoticeSent { addr, .. } if *addr == bo.addr)),
            0
        );
        cy.close().await;
        server.shutdown().await;
    });
}

#[test]
fn a_stuck_v0_6_client_whose_queue_is_full_is_reported_untold() {
    let config = Config {
        backlog: 64 * 1024,
        stall: Duration::from_secs(600),
        rate: None,
        grace: Duration::from_secs(1),
        ..Config::default()
    };
    run(LIMIT, async {
        let server = start_with(small_buffered_listener(), config);
        // A raw client: Hello, then it never reads.
        let stuck = connect_stuck_v06(server.addr);
        let stuck_addr = stuck.local_addr().unwrap();
        server
            .wait_for(|e| {
                matches!(e, Event::Welcomed { addr, .. } if *addr == stuck_addr).then_some(())
            })
            .await;
        let ana = connect(server.addr).await;
        named(&ana, "ana").await;
        let text = "x".repeat(1024);
        for _ in 0..2000 {
            ana.say(&text).await;
        }
        let left = server.disconnected(stuck_addr).await;
        assert!(
            matches!(left, Disconnect::TooFarBehind { backlog: 65536 }),
            "{left:?}"
        );
        let why = server
            .wait_for(|e| match e {
                Event::NoticeNotSent { addr, reason, .. } if *addr == stuck_addr => {
                    Some(reason.clone())
                }
                _ => None,
            })
            .await;
        assert!(matches!(why, NoticeFailure::QueueFull), "{why:?}");
        drop(stuck);
        ana.close().await;
        server.shutdown().await;
    });
}

/// A client that says Hello for 0.6 and then never reads, with a small
/// receive buffer.
fn connect_stuck_v06(server: SocketAddr) -> std::net::TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect(&server.into()).unwrap();
    let mut s = std::net::TcpStream::from(s);
    let mut payload = bytes::BytesMut::new();
    Chat.encode(&hello(&[V0_6], &[]), &mut payload).unwrap();
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    std::io::Write::write_all(&mut s, &frame).unwrap();
    s
}

fn now_ms() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    since.as_millis() as u64
}
