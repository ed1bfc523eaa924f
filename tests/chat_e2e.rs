//! The chat room (`chatpipe_chat`), run in-process over loopback TCP,
//! against chatpipe clients and raw sockets.

use std::net::SocketAddr;
use std::time::Duration;

use chatpipe::chat::ChatMessage;
use chatpipe::Error;
use chatpipe_chat::{Config, Disconnect, Event, NicknameRefusal};
use futures::StreamExt;
use smol::net::{TcpListener, TcpStream};

mod chat_support;
use chat_support::*;

fn pair(from: &str, text: &str) -> (String, String) {
    (from.to_owned(), text.to_owned())
}

#[test]
fn three_clients_nicknames_and_broadcasts() {
    run(Duration::from_secs(30), async {
        let server = start().await;
        let mut ana = connect(server.addr).await;
        let mut bo = connect(server.addr).await;
        let mut cy = connect(server.addr).await;

        assert!(matches!(ana.nick("ana").await, ChatMessage::Ack { .. }));
        assert!(matches!(bo.nick("bo").await, ChatMessage::Ack { .. }));
        // Taken by another client: refused, and the answer says why.
        let taken = NicknameRefusal::Taken {
            nickname: "ana".into(),
        };
        match cy.nick("ana").await {
            ChatMessage::Nak { message, .. } => assert_eq!(message, taken.to_string()),
            other => panic!("expected a Nak, got {other:?}"),
        }
        let refused = server
            .wait_for(|e| match e {
                Event::NicknameRefused { addr, reason, .. } if *addr == cy.addr => {
                    Some(reason.clone())
                }
                _ => None,
            })
            .await;
        assert_eq!(refused, taken);
        // Asking again for one's own nickname is fine.
        assert!(matches!(ana.nick("ana").await, ChatMessage::Ack { .. }));

        // Until it has a nickname, a client is known by its address.
        cy.say("hello from nowhere").await;
        let cy_addr = cy.addr.to_string();
        assert_eq!(ana.next().await, pair(&cy_addr, "hello from nowhere"));
        assert_eq!(bo.next().await, pair(&cy_addr, "hello from nowhere"));
        assert!(matches!(cy.nick("cy").await, ChatMessage::Ack { .. }));

        // A broadcast reaches every other client, and not its sender: the
        // sender's next message is the reply, not its own text.
        ana.say("hi all").await;
        assert_eq!(bo.next().await, pair("ana", "hi all"));
        assert_eq!(cy.next().await, pair("ana", "hi all"));
        bo.say("hi ana").await;
        assert_eq!(ana.next().await, pair("bo", "hi ana"));
        assert_eq!(cy.next().await, pair("bo", "hi ana"));

        // A nickname is free again once its holder has left.
        let ana_addr = ana.addr;
        ana.close().await;
        let reason = server.disconnected(ana_addr).await;
        assert!(matches!(reason, Disconnect::Closed), "{reason:?}");
        assert!(matches!(cy.nick("ana").await, ChatMessage::Ack { .. }));
        cy.say("I am ana now").await;
        assert_eq!(bo.next().await, pair("ana", "I am ana now"));

        bo.close().await;
        cy.close().await;
        let events = server.shutdown().await;
        let clean = events.iter().filter(|e| {
            matches!(
                e,
                Event::Disconnected {
                    nickname: Some(_),
                    reason: Disconnect::Closed,
                    ..
                }
            )
        });
        assert_eq!(clean.count(), 3, "{events:#?}");
        let discards: Vec<_> = events.iter().filter(|e| e.is_discard()).collect();
        assert!(
            discards.is_empty(),
            "nothing discarded in normal use: {discards:?}"
        );
    });
}

#[test]
fn two_hundred_clients_get_every_message_exactly_once() {
    const CLIENTS: usize = 200;
    const EACH: usize = 5;
    run(Duration::from_secs(120), async {
        // All from 127.0.0.1: above the default cap of 64 per address.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = Config {
            max_per_ip: CLIENTS,
            ..Config::default()
        };
        let server = start_with(listener, config);
        let clients = connect_named(server.addr, CLIENTS).await;

        // Everyone talks at once; everyone reads at once.
        let tasks: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(i, mut c)| {
                smol::spawn(async move {
                    let me = format!("c{i}");
                    let (sender, incoming) = (&c.sender, &mut c.incoming);
                    let talk = async {
                        for k in 0..EACH {
                            let text = format!("{me} #{k}");
                            sender.send(ChatMessage::Chat { text }).await.unwrap();
                        }
                    };
                    let mut got = Vec::new();
                    let listen = async {
                        while got.len() < (CLIENTS - 1) * EACH {
                            got.push(next_broadcast(incoming).await);
                        }
                    };
                    smol::future::zip(talk, listen).await;
                    (i, c, got)
                })
            })
            .collect();
        let mut clients = Vec::new();
        for task in tasks {
            let (i, c, got) = task.await;
            // Exactly the other clients' messages, each once, and from one
            // sender in the order sent.
            let mut want = Vec::new();
            let mut next = vec![0; CLIENTS];
            for (from, text) in &got {
                let j: usize = from[1..].parse().unwrap();
                assert_ne!(i, j, "c{i} got its own message back");
                assert_eq!(text, &format!("{from} #{}", next[j]), "order from {from}");
                next[j] += 1;
            }
            for (j, n) in next.iter().enumerate() {
                want.push(if i == j { 0 } else { EACH });
                assert_eq!(*n, want[j], "c{i} got {n} messages from c{j}");
            }
            clients.push(c);
        }

        // Nothing more is on its way: the next message anyone sees is a
        // final one from c0.
        clients[0].say("the end").await;
        for c in &mut clients[1..] {
            assert_eq!(c.next().await, pair("c0", "the end"));
        }
        for c in clients {
            c.close().await;
        }
        let events = server.shutdown().await;
        let discards: Vec<_> = events.iter().filter(|e| e.is_discard()).collect();
        assert!(
            discards.is_empty(),
            "nothing discarded in normal use: {discards:?}"
        );
    });
}

#[test]
fn a_client_that_never_reads_does_not_stall_the_room() {
    // The stuck client's queue stays full for 2 s (5 s by default).
    // Clients here send 1,000 messages back to back: no rate limit.
    let config = Config {
        stall: Duration::from_secs(2),
        rate: None,
        ..Config::default()
    };
    let reason = run(Duration::from_secs(120), stuck_client(config));
    assert!(
        matches!(reason, Disconnect::Stalled { stall } if stall == Duration::from_secs(2)),
        "{reason:?}"
    );
}

#[test]
fn a_client_too_far_behind_is_disconnected() {
    // Room for 64 KiB of broadcasts beyond the connection's queue: they pile
    // up long before the queue has been full for the stall timeout. No
    // other client reads here, so none can be too slow by accident.
    let config = Config {
        backlog: 64 * 1024,
        stall: Duration::from_secs(600),
        rate: None,
        ..Config::default()
    };
    run(Duration::from_secs(60), async {
        let server = start_with(small_buffered_listener(), config);
        let (stuck, stuck_addr) = connect_stuck(server.addr);
        let ana = connect(server.addr).await;
        assert!(matches!(ana.nick("ana").await, ChatMessage::Ack { .. }));
        let text = "x".repeat(1024);
        for _ in 0..2000 {
            ana.say(&text).await;
        }
        let reason = server.disconnected(stuck_addr).await;
        assert!(
            matches!(reason, Disconnect::TooFarBehind { backlog: 65536 }),
            "{reason:?}"
        );
        assert_ends(stuck, 2000 * 1024).await;
        ana.close().await;
        server.shutdown().await;
    });
}

/// A client connected to `server` that never reads, with a small receive
/// buffer so that what it does not read backs up quickly, and its address.
/// It takes a nickname first, so it is in the room (a connection gets the
/// room's traffic from its first message on).
fn connect_stuck(server: SocketAddr) -> (socket2::Socket, SocketAddr) {
    use chatpipe::Protocol;
    use socket2::{Domain, Socket, Type};
    use std::io::{Read, Write};
    let stuck = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    stuck.set_recv_buffer_size(4096).unwrap();
    stuck.connect(&server.into()).unwrap();
    let addr = stuck.local_addr().unwrap().as_socket().unwrap();
    let mut payload = bytes::BytesMut::new();
    let nick = ChatMessage::set_nickname("stuck");
    chatpipe::chat::Chat.encode(&nick, &mut payload).unwrap();
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    let mut io = std::net::TcpStream::from(stuck.try_clone().unwrap());
    io.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    io.write_all(&frame).unwrap();
    // Its Ack: 4 + 4 + 16 bytes.
    let mut ack = [0u8; 24];
    io.read_exact(&mut ack).unwrap();
    assert_eq!(&ack[..8], &[0, 0, 0, 20, 0, 0, 0, 4], "an Ack");
    // Alive, though it never reads: a keepalive a second, so what ends it
    // is its not reading, never the server's idle timeout. Stops when the
    // server drops it (or after two minutes).
    std::thread::spawn(move || {
        for _ in 0..120 {
            if io.write_all(&[0, 0, 0, 4, 0, 0, 0, 2]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    (stuck, addr)
}

/// Checks that the server dropped `stuck`: reading it ends (at EOF, or with
/// a reset) within 10 s, before all of `sent` bytes were read.
async fn assert_ends(stuck: socket2::Socket, sent: usize) {
    let drained = smol::unblock(move || {
        stuck.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut stuck = std::net::TcpStream::from(stuck);
        let mut sink = Vec::new();
        std::io::Read::read_to_end(&mut stuck, &mut sink).map(|_| sink.len())
    })
    .await;
    match drained {
        Ok(n) => assert!(n < sent, "got everything ({n} bytes)?"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
}

/// A client that never reads, while three others exchange 3,000
/// broadcasts of 1 KiB: they get them all, and the stuck one is
/// disconnected; returns why.
async fn stuck_client(config: Config) -> Disconnect {
    // 3 MiB for the stuck client: more than its connection holds in all
    // (its queue and the batch its driver took, 2 x 1,024 messages, the
    // write buffer and the sockets), so its queue does fill and stay full.
    const EACH: usize = 1500;
    let text = "x".repeat(1024);
    // The server's sockets have small send buffers, so what the stuck
    // client does not read cannot all hide in the kernel.
    let server = start_with(small_buffered_listener(), config);
    let (stuck, stuck_addr) = connect_stuck(server.addr);

    let mut ana = connect(server.addr).await;
    let mut bo = connect(server.addr).await;
    let mut cy = connect(server.addr).await;
    // Accepted in order, so once these are answered the stuck client is in
    // the room too.
    for (c, n) in [(&ana, "ana"), (&bo, "bo"), (&cy, "cy")] {
        assert!(matches!(c.nick(n).await, ChatMessage::Ack { .. }));
    }

    // Ana and Bo each send 1,500 broadcasts of 1 KiB, while reading each
    // other's; Cy reads them all.
    let cy_reads = async {
        let (mut from_ana, mut from_bo) = (0, 0);
        while from_ana + from_bo < 2 * EACH {
            let (from, t) = cy.next().await;
            assert_eq!(t.len(), 1024);
            match from.as_str() {
                "ana" => from_ana += 1,
                "bo" => from_bo += 1,
                other => panic!("from {other}"),
            }
        }
        (from_ana, from_bo)
    };
    let ((), ((), counts)) = smol::future::zip(
        exchange("ana", "bo", &mut ana, &text, EACH),
        smol::future::zip(exchange("bo", "ana", &mut bo, &text, EACH), cy_reads),
    )
    .await;
    assert_eq!(counts, (EACH, EACH));

    // It was disconnected.
    let reason = server.disconnected(stuck_addr).await;
    assert_ends(stuck, 2 * EACH * 1024).await;

    for c in [ana, bo, cy] {
        c.close().await;
    }
    server.shutdown().await;
    reason
}

/// Sends `n` Chats of `text` while reading `n` broadcasts from `peer`.
async fn exchange(me: &str, peer: &str, c: &mut Client, text: &str, n: usize) {
    let (sender, incoming) = (&c.sender, &mut c.incoming);
    let talk = async {
        for _ in 0..n {
            let text = text.to_owned();
            sender.send(ChatMessage::Chat { text }).await.unwrap();
        }
    };
    let listen = async {
        for _ in 0..n {
            let (from, got) = next_broadcast(incoming).await;
            assert_eq!((from.as_str(), got.len()), (peer, text.len()), "{me}");
        }
    };
    smol::future::zip(talk, listen).await;
}

#[test]
fn half_a_frame_then_a_reset_leaves_the_room_serving() {
    run(Duration::from_secs(30), async {
        let server = start().await;
        let mut ana = connect(server.addr).await;
        let mut bo = connect(server.addr).await;
        assert!(matches!(ana.nick("ana").await, ChatMessage::Ack { .. }));
        assert!(matches!(bo.nick("bo").await, ChatMessage::Ack { .. }));

        // Half of a 54-byte Chat frame, then a reset (SO_LINGER 0), and
        // the same followed by a plain close.
        let frame_start = [&[0, 0, 0, 54, 0, 0, 0, 0, 0, 48][..], b"half"].concat();
        for reset in [true, false] {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.connect(&server.addr.into()).unwrap();
            let addr = s.local_addr().unwrap().as_socket().unwrap();
            let mut s = std::net::TcpStream::from(s);
            std::io::Write::write_all(&mut s, &frame_start).unwrap();
            if reset {
                socket2::SockRef::from(&s)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
            }
            drop(s);
            match server.disconnected(addr).await {
                Disconnect::Error(Error::Io(e)) if reset => {
                    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
                }
                Disconnect::Error(Error::UnexpectedEof { .. }) if !reset => {}
                other => panic!("reset: {reset}, {other:?}"),
            }
        }

        // The room carries on, for old clients and new.
        ana.say("still here?").await;
        assert_eq!(bo.next().await, pair("ana", "still here?"));
        let mut cy = connect(server.addr).await;
        assert!(matches!(cy.nick("cy").await, ChatMessage::Ack { .. }));
        bo.say("yes").await;
        assert_eq!(ana.next().await, pair("bo", "yes"));
        assert_eq!(cy.next().await, pair("bo", "yes"));

        for c in [ana, bo, cy] {
            c.close().await;
        }
        server.shutdown().await;
    });
}

#[test]
fn shutdown_closes_every_connection_cleanly() {
    run(Duration::from_secs(30), async {
        let server = start().await;
        let addr = server.addr;
        let mut ana = connect(addr).await;
        let bo = connect(addr).await;
        assert!(matches!(ana.nick("ana").await, ChatMessage::Ack { .. }));
        assert!(matches!(bo.nick("bo").await, ChatMessage::Ack { .. }));
        bo.say("last words").await;
        assert_eq!(ana.next().await, pair("bo", "last words"));

        let events = server.shutdown().await;
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::ShuttingDown { connections: 2 })),
            "{events:#?}"
        );
        assert!(!events.iter().any(Event::is_discard), "{events:#?}");
        // Both ends saw a clean close, not an error.
        assert!(ana.incoming.next().await.is_none());
        ana.driver.await.unwrap();
        bo.driver.await.unwrap();
        // And nothing is listening any more.
        assert!(TcpStream::connect(addr).await.is_err());
    });
}
