//! QUIC: chatpipe over a QUIC stream (`chatpipe::quic`, quinn) on smol
//! and on tokio, requests and keepalives over it, a black-holed peer seen
//! by the earlier of chatpipe's idle timeout and QUIC's, and the room's
//! QUIC listener: QUIC and TCP clients in one room, 100 QUIC clients, a
//! wrong certificate, a peer that is not chatpipe, and the built programs'
//! `--quic` flags. Certificates are made here, at test time; none is
//! committed. Loopback only.
//!
//! The binaries' tests need `cargo build --examples` first when run alone
//! (`cargo test` builds them).

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatpipe::chat::{Chat, ChatMessage};
use chatpipe::quic::{self, quinn, QuicError};
use chatpipe::raw::{Raw, RawMessage};
use chatpipe::{Builder, Error};
use chatpipe_chat::tls::{self, rustls, Trust};
use chatpipe_chat::{Config, Disconnect, Event, Listener, QuicFailure};
use futures::StreamExt;
use rustls::pki_types::{CertificateDer, ServerName};
use smol::net::TcpListener;

mod chat_support;
use chat_support::{connect, restartable_port, run, run_example, start_on, Client, TestServer};

/// A hang guard only: generous, for a machine under full load.
const LIMIT: Duration = Duration::from_secs(60);

fn udp() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").unwrap()
}

/// A quinn endpoint on smol, a server's if `server` is given.
fn smol_endpoint(server: Option<quinn::ServerConfig>) -> quinn::Endpoint {
    let runtime = Arc::new(quinn::SmolRuntime);
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, udp(), runtime).unwrap()
}

/// A client configuration trusting `cert`, QUIC's idle timeout `idle`.
fn client_config(cert: &CertificateDer<'static>, idle: Duration) -> quinn::ClientConfig {
    let tls = tls::client_config(&Trust::Certs(vec![cert.clone()])).unwrap();
    quic::client_config(&tls, idle).unwrap()
}

/// The room on a plaintext TCP listener and a QUIC one (a certificate made
/// now for localhost); returns it, the QUIC address and the certificate.
fn quic_room(config: Config) -> (TestServer, SocketAddr, CertificateDer<'static>) {
    let made = tls::self_signed(&tls::LOCALHOST).unwrap();
    let tcp = smol::block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    let socket = udp();
    let quic_addr = socket.local_addr().unwrap();
    let listeners = vec![
        Listener::plain(tcp),
        Listener::quic(socket, made.config).unwrap(),
    ];
    (start_on(listeners, tcp_addr, config), quic_addr, made.cert)
}

/// A chat client over QUIC from `endpoint` (shared by many clients).
async fn connect_quic(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    server: SocketAddr,
) -> Client {
    let stream = quic::connect(endpoint, config.clone(), server, "localhost")
        .await
        .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let (sender, incoming, conn) = Builder::new().build(stream, Chat);
    Client {
        sender,
        incoming,
        driver: smol::spawn(conn),
        addr,
    }
}

#[test]
fn quic_and_tcp_clients_chat_in_one_room() {
    run(LIMIT, async {
        let (server, quic_addr, cert) = quic_room(Config::default());
        let endpoint = smol_endpoint(None);
        let config = client_config(&cert, Duration::from_secs(15));
        let mut q = connect_quic(&endpoint, &config, quic_addr).await;
        let mut t = connect(server.addr).await;
        assert!(matches!(q.nick("quic").await, ChatMessage::Ack { .. }));
        assert!(matches!(t.nick("tcp").await, ChatMessage::Ack { .. }));
        q.say("over UDP").await;
        assert_eq!(t.next().await, ("quic".into(), "over UDP".into()));
        t.say("over TCP").await;
        assert_eq!(q.next().await, ("tcp".into(), "over TCP".into()));
        // The room saw a QUIC member join from the endpoint's address.
        let q_addr = q.addr;
        server
            .wait_for(|e| matches!(e, Event::Connected { addr } if *addr == q_addr).then_some(()))
            .await;
        // Both close cleanly; the QUIC one's FIN is the end of its stream.
        q.close().await;
        t.close().await;
        let reason = server.disconnected(q_addr).await;
        assert_eq!(reason.to_string(), "closed cleanly");
        // One still connected at shutdown is closed cleanly by the room.
        let stays = connect_quic(&endpoint, &config, quic_addr).await;
        assert!(matches!(stays.nick("stays").await, ChatMessage::Ack { .. }));
        let events = server.shutdown().await;
        stays.driver.await.unwrap();
        assert!(!events.iter().any(|e| matches!(e, Event::QuicFailed { .. })));
    });
}

#[test]
fn a_hundred_quic_clients_share_the_room() {
    run(LIMIT, async {
        let config = Config {
            // All of them come from one address here.
            max_per_ip: 200,
            rate: None,
            ..Config::default()
        };
        let (server, quic_addr, cert) = quic_room(config);
        let endpoint = smol_endpoint(None);
        let config = client_config(&cert, Duration::from_secs(15));
        let mut clients = Vec::new();
        for i in 0..100 {
            let c = connect_quic(&endpoint, &config, quic_addr).await;
            // The Ack proves it is in the room.
            assert!(matches!(
                c.nick(&format!("q{i}")).await,
                ChatMessage::Ack { .. }
            ));
            clients.push(c);
        }
        let mut tcp = connect(server.addr).await;
        assert!(matches!(tcp.nick("tcp").await, ChatMessage::Ack { .. }));
        tcp.say("hello all").await;
        for c in &mut clients {
            assert_eq!(c.next().await, ("tcp".into(), "hello all".into()));
        }
        // And each of them is heard.
        for (i, c) in clients.iter().enumerate() {
            c.say(&format!("from {i}")).await;
        }
        // Each in its order; across connections, in any.
        let mut heard = std::collections::BTreeSet::new();
        for _ in 0..100 {
            let (from, text) = tcp.next().await;
            assert_eq!(text, format!("from {}", &from[1..]));
            assert!(heard.insert(from), "twice");
        }
        assert_eq!(heard.len(), 100);
        for c in clients {
            c.close().await;
        }
        tcp.close().await;
        let events = server.shutdown().await;
        let joined = events
            .iter()
            .filter(|e| matches!(e, Event::Connected { .. }))
            .count();
        assert_eq!(joined, 101);
        assert!(!events.iter().any(|e| matches!(e, Event::QuicFailed { .. })));
    });
}

#[test]
fn a_wrong_certificate_is_refused_clearly() {
    run(LIMIT, async {
        let (server, quic_addr, cert) = quic_room(Config::default());
        let other = tls::self_signed(&tls::LOCALHOST).unwrap().cert;
        // Signed by nobody we trust.
        let untrusting = tls::client_config(&Trust::Certs(vec![other])).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let idle = Duration::from_secs(15);
        let err = chatpipe_chat::quic::connect(&quic_addr.to_string(), &untrusting, &name, idle)
            .await
            .unwrap_err();
        assert!(err.contains("certificate is not trusted"), "{err}");
        // Trusted, but for another name.
        let trusting = tls::client_config(&Trust::Certs(vec![cert])).unwrap();
        let other_name = ServerName::try_from("chat.example.org").unwrap();
        let err =
            chatpipe_chat::quic::connect(&quic_addr.to_string(), &trusting, &other_name, idle)
                .await
                .unwrap_err();
        assert!(
            err.contains("not valid for the name \"chat.example.org\""),
            "{err}"
        );
        // The server logged both, and nobody joined.
        server
            .wait_count(|e| matches!(e, Event::QuicFailed { .. }), 2)
            .await;
        let events = server.shutdown().await;
        assert!(!events.iter().any(|e| matches!(e, Event::Connected { .. })));
        let failed: Vec<String> = events
            .iter()
            .filter(|e| matches!(e, Event::QuicFailed { .. }))
            .map(|e| e.to_string())
            .collect();
        assert!(failed[0].contains("QUIC handshake failed"), "{failed:?}");
    });
}

#[test]
fn a_quic_peer_that_is_not_chatpipe_is_refused() {
    run(LIMIT, async {
        let (server, quic_addr, cert) = quic_room(Config::default());
        let endpoint = smol_endpoint(None);
        let config = client_config(&cert, Duration::from_secs(15));
        let conn = endpoint
            .connect_with(config, quic_addr, "localhost")
            .unwrap()
            .await
            .unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        // A frame straight away, without the preamble.
        send.write_all(&[0, 0, 0, 1, 7]).await.unwrap();
        let reason = server
            .wait_for(|e| match e {
                Event::QuicFailed {
                    reason: QuicFailure::Failed(QuicError::NotChatpipe(first)),
                    ..
                } => Some(first.clone()),
                _ => None,
            })
            .await;
        assert_eq!(reason, vec![0, 0, 0, 1]);
        // Closed: the stream ends without a byte.
        assert!(recv.read_to_end(1024).await.map_or(true, |b| b.is_empty()));
        server.shutdown().await;
    });
}

// The library: chatpipe::quic under a raw connection, on both runtimes.

/// An echo server for `Raw` over QUIC on smol: answers every request,
/// until its connection ends. Its chatpipe keepalive: `keepalive`.
fn raw_server_smol(
    quic_idle: Duration,
    keepalive: Option<Duration>,
) -> (SocketAddr, CertificateDer<'static>, smol::Task<()>) {
    let made = tls::self_signed(&["localhost"]).unwrap();
    let endpoint = smol_endpoint(Some(quic::server_config(&made.config, quic_idle).unwrap()));
    let addr = endpoint.local_addr().unwrap();
    let task = smol::spawn(async move {
        let incoming = endpoint.accept().await.unwrap();
        let stream = quic::accept(incoming.await.unwrap()).await.unwrap();
        let (tx, mut rx, conn) = Builder::new()
            .keepalive_interval(keepalive)
            .idle_timeout(Some(Duration::from_secs(30)))
            .build(stream, Raw);
        let driver = smol::spawn(conn);
        while let Some(Ok(msg)) = rx.next().await {
            if let RawMessage::Request { id, body } = msg {
                if tx.send(RawMessage::Response { id, body }).await.is_err() {
                    break;
                }
            }
        }
        drop(tx);
        let _ = driver.await;
    });
    (addr, made.cert, task)
}

#[test]
fn requests_and_keepalives_over_quic_on_smol() {
    run(LIMIT, async {
        // QUIC's idle timeout as short as chatpipe's: only keepalives keep
        // either from firing while no message goes either way.
        // Wide margins: a loaded machine must not make them fire.
        let idle = Duration::from_secs(1);
        let keepalive = Some(Duration::from_millis(100));
        let (addr, cert, server) = raw_server_smol(idle, keepalive);
        let endpoint = smol_endpoint(None);
        let stream = quic::connect(&endpoint, client_config(&cert, idle), addr, "localhost")
            .await
            .unwrap();
        let (tx, _rx, conn) = Builder::new()
            .keepalive_interval(keepalive)
            .idle_timeout(Some(idle))
            .build(stream, Raw);
        let driver = smol::spawn(conn);
        let calls = (0..20).map(|i| tx.call(Bytes::from(format!("call {i}"))));
        let answers = futures::future::join_all(calls).await;
        for (i, answer) in answers.into_iter().enumerate() {
            assert_eq!(answer.unwrap(), Bytes::from(format!("call {i}")));
        }
        // Three idle timeouts of silence but for keepalives (the passage of
        // time is what is tested; nothing waits on it for an event).
        let (messages, bytes) = (tx.stats().messages_in, tx.stats().bytes_in);
        smol::Timer::after(3 * idle).await;
        let stats = tx.stats();
        // At least one keepalive per idle timeout came in (each one is a
        // 4-byte header and its payload).
        assert!(stats.messages_in >= messages + 3, "keepalives: {stats:?}");
        assert!(stats.bytes_in >= bytes + 3 * 4, "keepalives: {stats:?}");
        assert_eq!(
            tx.call(Bytes::from("still here")).await.unwrap(),
            "still here"
        );
        tx.close();
        if let Err(e) = driver.await {
            panic!("the client's connection did not close cleanly: {e:?}");
        }
        server.await;
    });
}

#[test]
fn requests_and_keepalives_over_quic_on_tokio() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(LIMIT, async {
            let idle = Duration::from_secs(1);
            let keepalive = Some(Duration::from_millis(100));
            let made = tls::self_signed(&["localhost"]).unwrap();
            let runtime = Arc::new(quinn::TokioRuntime);
            let server_config = quic::server_config(&made.config, idle).unwrap();
            let server = quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                Some(server_config),
                udp(),
                runtime.clone(),
            )
            .unwrap();
            let addr = server.local_addr().unwrap();
            let serving = tokio::spawn(async move {
                let incoming = server.accept().await.unwrap();
                let stream = quic::accept(incoming.await.unwrap()).await.unwrap();
                let (tx, mut rx, conn) = Builder::new()
                    .keepalive_interval(keepalive)
                    .build_with_timer(stream, Raw, chatpipe::TokioTimer::default());
                let driver = tokio::spawn(conn);
                while let Some(Ok(msg)) = rx.next().await {
                    if let RawMessage::Request { id, body } = msg {
                        let _ = tx.send(RawMessage::Response { id, body }).await;
                    }
                }
                drop(tx);
                driver.await.unwrap()
            });
            let client =
                quinn::Endpoint::new(quinn::EndpointConfig::default(), None, udp(), runtime)
                    .unwrap();
            let config = client_config(&made.cert, idle);
            let stream = quic::connect(&client, config, addr, "localhost")
                .await
                .unwrap();
            let (tx, _rx, conn) = Builder::new()
                .keepalive_interval(keepalive)
                .idle_timeout(Some(idle))
                .build_with_timer(stream, Raw, chatpipe::TokioTimer::default());
            let driver = tokio::spawn(conn);
            let (a, b) = tokio::join!(tx.call(Bytes::from("one")), tx.call(Bytes::from("two")));
            assert_eq!(
                (a.unwrap(), b.unwrap()),
                (Bytes::from("one"), Bytes::from("two"))
            );
            let bytes = tx.stats().bytes_in;
            tokio::time::sleep(3 * idle).await;
            assert!(tx.stats().bytes_in > bytes, "keepalives arrived");
            assert_eq!(tx.call(Bytes::from("three")).await.unwrap(), "three");
            tx.close();
            driver.await.unwrap().unwrap();
            serving.await.unwrap().unwrap();
        })
        .await
        .expect("test timed out");
    });
}

// A black hole: a UDP relay between client and server that can be told to
// drop everything, both ways.

struct Relay {
    addr: SocketAddr,
    drop_all: Arc<AtomicBool>,
    _tasks: (smol::Task<()>, smol::Task<()>),
}

/// A relay to `server`; one client at a time.
fn relay(server: SocketAddr) -> Relay {
    let front = Arc::new(smol::net::UdpSocket::try_from(udp()).unwrap());
    let back = Arc::new(smol::net::UdpSocket::try_from(udp()).unwrap());
    smol::block_on(back.connect(server)).unwrap();
    let addr = front.local_addr().unwrap();
    let drop_all = Arc::new(AtomicBool::new(false));
    let client = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
    // Both loops run until the test drops the relay's tasks.
    let forth = {
        let (front, back, drop_all, client) = (
            front.clone(),
            back.clone(),
            drop_all.clone(),
            client.clone(),
        );
        smol::spawn(async move {
            let mut buf = vec![0; 65536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                *client.lock().unwrap() = Some(from);
                if !drop_all.load(Ordering::Relaxed) {
                    let _ = back.send(&buf[..n]).await;
                }
            }
        })
    };
    let back_again = {
        let drop_all = drop_all.clone();
        smol::spawn(async move {
            let mut buf = vec![0; 65536];
            while let Ok(n) = back.recv(&mut buf).await {
                let to = *client.lock().unwrap();
                if let (Some(to), false) = (to, drop_all.load(Ordering::Relaxed)) {
                    let _ = front.send_to(&buf[..n], to).await;
                }
            }
        })
    };
    Relay {
        addr,
        drop_all,
        _tasks: (forth, back_again),
    }
}

/// Connects a raw client through a relay with these idle timeouts, checks
/// a call goes through, then black-holes the relay; returns the error that
/// ended the client's connection and how long after the black hole.
async fn black_holed(chatpipe_idle: Duration, quic_idle: Duration) -> (Error, Duration) {
    // The server's QUIC idle timeout is long: the client's decides.
    let (server, cert, _serving) = raw_server_smol(Duration::from_secs(30), None);
    let relay = relay(server);
    let endpoint = smol_endpoint(None);
    let config = client_config(&cert, quic_idle);
    let stream = quic::connect(&endpoint, config, relay.addr, "localhost")
        .await
        .unwrap();
    let (tx, _rx, conn) = Builder::new()
        .keepalive_interval(Some(chatpipe_idle / 3))
        .idle_timeout(Some(chatpipe_idle))
        .build(stream, Raw);
    let driver = smol::spawn(conn);
    assert_eq!(tx.call(Bytes::from("hi")).await.unwrap(), "hi");
    relay.drop_all.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    let error = driver.await.unwrap_err();
    (error, t0.elapsed())
}

#[test]
fn a_black_holed_peer_is_seen_by_chatpipe_when_its_idle_timeout_is_earlier() {
    run(LIMIT, async {
        let (error, after) = black_holed(Duration::from_millis(300), Duration::from_secs(20)).await;
        assert!(matches!(error, Error::IdleTimeout(_)), "{error:?}");
        assert!(!quic::timed_out(&error));
        // Long before QUIC's 20 s.
        assert!(after < Duration::from_secs(10), "{after:?}");
    });
}

#[test]
fn a_black_holed_peer_is_seen_by_quic_when_its_idle_timeout_is_earlier() {
    run(LIMIT, async {
        let (error, after) = black_holed(Duration::from_secs(20), Duration::from_millis(300)).await;
        assert!(quic::timed_out(&error), "{error:?}");
        assert!(after < Duration::from_secs(10), "{after:?}");
    });
}

#[test]
fn the_room_drops_a_quic_client_that_stops_answering() {
    run(LIMIT, async {
        let config = Config {
            keepalive: Duration::from_millis(100),
            ..Config::default()
        };
        let (server, quic_addr, cert) = quic_room(config);
        let relay = relay(quic_addr);
        let endpoint = smol_endpoint(None);
        // The client's own timeouts are long: the room must see it.
        let config = client_config(&cert, Duration::from_secs(30));
        let c = connect_quic(&endpoint, &config, relay.addr).await;
        assert!(matches!(c.nick("gone").await, ChatMessage::Ack { .. }));
        // The room sees the relay's address.
        let addr = server
            .wait_for(|e| match e {
                Event::Connected { addr } => Some(*addr),
                _ => None,
            })
            .await;
        relay.drop_all.store(true, Ordering::Relaxed);
        let reason = server.disconnected(addr).await;
        // The room's idle timeout (3 x 100 ms) or QUIC's (the same), the
        // earlier: under load QUIC's can win, and then the stream's read
        // fails with `ConnectionLost(TimedOut)`, whose message says only
        // "connection lost".
        assert!(
            matches!(&reason, Disconnect::Error(e)
                if matches!(e, Error::IdleTimeout(_)) || quic::timed_out(e)),
            "{reason}"
        );
        server.shutdown().await;
    });
}

// The programs.

#[test]
fn the_programs_chat_over_quic_and_tcp() {
    let dir = std::env::temp_dir().join(format!("chatpipe-quic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = dir.join("cert.pem");
    let cert_arg = cert.to_str().unwrap();
    let server = run_example(
        "chat_server",
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-self-signed",
            "--tls-cert-out",
            cert_arg,
            "--quic",
            "127.0.0.1:0",
        ],
    );
    let tcp = server
        .line()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    assert!(server.line().starts_with("TLS on "));
    let quic_line = server.line();
    let quic_addr = quic_line.strip_prefix("QUIC on ").unwrap().to_owned();
    assert!(server.line().starts_with("certificate: "));
    let mut q = run_example(
        "chat_client",
        &[
            "--quic",
            "--connect",
            &quic_addr,
            "--tls-ca",
            cert_arg,
            "--nick",
            "ana",
        ],
    );
    q.stderr_line("(QUIC, 127.0.0.1)");
    assert_eq!(q.line(), "* you are now ana");
    let mut t = run_example(
        "chat_client",
        &["--connect", &tcp, "--tls-ca", cert_arg, "--nick", "bo"],
    );
    assert_eq!(t.line(), "* you are now bo");
    q.type_line("hello over QUIC");
    assert_eq!(t.line(), "ana: hello over QUIC");
    t.type_line("hello over TCP");
    assert_eq!(q.line(), "bo: hello over TCP");
    q.close_stdin();
    assert!(q.wait().success());
    t.close_stdin();
    assert!(t.wait().success());
    server.stderr_line("(ana) disconnected: closed cleanly");

    // Trusting another certificate: refused, clearly.
    let other = dir.join("other.pem");
    let other_pem = tls::self_signed(&tls::LOCALHOST).unwrap().cert_pem;
    std::fs::write(&other, other_pem).unwrap();
    let other_arg = other.to_str().unwrap();
    let mut wrong = run_example(
        "chat_client",
        &["--quic", "--connect", &quic_addr, "--tls-ca", other_arg],
    );
    let line = wrong.stderr_line("QUIC connection to");
    assert!(line.contains("certificate is not trusted"), "{line}");
    assert_eq!(wrong.wait().code(), Some(1));
    server.stderr_line("QUIC handshake failed");
    // --quic needs a certificate.
    let mut bare = run_example(
        "chat_server",
        &["--listen", "127.0.0.1:0", "--quic", "127.0.0.1:0"],
    );
    bare.stderr_line("--quic needs --tls-cert and --tls-key, or --tls-self-signed");
    assert_eq!(bare.wait().code(), Some(1));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The reconnecting session over QUIC: the server stops and comes back on
/// the same UDP port with the same certificate; the QUIC client comes
/// back on its own, with its nickname, and sends what was typed meanwhile.
#[test]
fn the_client_reconnects_over_quic_after_a_restart() {
    let dir = std::env::temp_dir().join(format!("chatpipe-quic-re-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    let (cert_arg, key_arg) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let serve = |tcp: &str, quic: &str| {
        let server = run_example(
            "chat_server",
            &[
                "--listen",
                tcp,
                "--tls-cert",
                cert_arg,
                "--tls-key",
                key_arg,
                "--quic",
                quic,
            ],
        );
        let tcp = server
            .line()
            .strip_prefix("listening on ")
            .unwrap()
            .to_owned();
        assert!(server.line().starts_with("TLS on "));
        let quic = server.line().strip_prefix("QUIC on ").unwrap().to_owned();
        (server, tcp, quic)
    };
    let port = format!("127.0.0.1:{}", restartable_port());
    let (mut server, tcp, quic) = serve(&port, &port);
    let client = |addr: &str, nick: &str, quic: bool| {
        let mut args = vec!["--connect", addr, "--tls-ca", cert_arg, "--tls-server-name"];
        args.extend(["localhost", "--line", "--v06", "--nick", nick]);
        if quic {
            args.push("--quic");
        }
        run_example("chat_client", &args)
    };
    let mut ana = client(&quic, "ana", true);
    assert_eq!(ana.line(), "* you are now ana");

    server.signal("-TERM");
    assert!(server.wait().success());
    ana.stderr_line("reconnecting in");
    ana.type_line("typed while away");
    let (_server, tcp_again, quic_again) = serve(&tcp, &quic);
    assert_eq!(
        (tcp_again.as_str(), quic_again.as_str()),
        (tcp.as_str(), quic.as_str())
    );
    ana.stderr_line("* reconnected");
    // A TCP client joining now gets the line live or as history: once,
    // in order.
    let bo = client(&tcp, "bo", false);
    ana.type_line("and after");
    let heard: Vec<String> = std::iter::from_fn(|| Some(bo.line()))
        .filter(|l| !l.starts_with("* "))
        .take(2)
        .map(|l| l.replace("[history] ", ""))
        .collect();
    assert_eq!(heard, ["ana: typed while away", "ana: and after"]);
    for mut c in [ana, bo] {
        c.close_stdin();
        assert!(c.wait().success());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
