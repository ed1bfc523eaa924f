//! The room over TLS: chat on smol (futures-rustls) and on tokio
//! (tokio-rustls and `Builder::build_tokio`), every failure (a plaintext
//! client on the TLS port, a TLS client on a plaintext one, a handshake
//! never finished, handshakes against the limits, shutdown during one), and
//! the built programs' TLS flags, exit codes and messages. Certificates and
//! keys are made here, at test time, by rcgen; none is committed.
//!
//! The binaries' tests need `cargo build --examples` first when run alone
//! (`cargo test` builds them).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chatpipe::chat::{Chat, ChatMessage, V0_5, V0_6};
use chatpipe::{Builder, Error};
use chatpipe_chat::tls::{self, rustls, Trust};
use chatpipe_chat::{Config, Disconnect, Event, Listener, Refusal, TlsFailure};
use futures::StreamExt;
use rustls::pki_types::{CertificateDer, ServerName};
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::net::{TcpListener, TcpStream};

mod chat_support;
use chat_support::{
    connect, example, hello, run, run_example as start, start_on, start_with, Client, Program,
    TestServer,
};

/// A hang guard only: generous, for a machine under full load.
const LIMIT: Duration = Duration::from_secs(30);

/// The room on a TLS listener with a certificate made now for localhost;
/// returns the certificate for clients to trust.
fn tls_room(config: Config) -> (TestServer, CertificateDer<'static>) {
    let made = tls::self_signed(&tls::LOCALHOST).unwrap();
    let listener = smol::block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = start_on(vec![Listener::tls(listener, made.config)], addr, config);
    (server, made.cert)
}

fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

fn trusting(cert: &CertificateDer<'static>) -> tls::TlsConnector {
    let config = tls::client_config(&Trust::Certs(vec![cert.clone()])).unwrap();
    tls::TlsConnector::from(config)
}

/// A chatpipe chat client over TLS (futures-rustls, on smol).
async fn tls_client(server: SocketAddr, cert: &CertificateDer<'static>) -> Client {
    let tcp = TcpStream::connect(server).await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let stream = trusting(cert).connect(localhost(), tcp).await.unwrap();
    let (sender, incoming, conn) = Builder::new().build(stream, Chat);
    Client {
        sender,
        incoming,
        driver: smol::spawn(conn),
        addr,
    }
}

/// Waits for the room to report a TLS failure from `addr` that `which`
/// picks.
async fn tls_failure<T>(
    server: &TestServer,
    addr: SocketAddr,
    which: impl Fn(&TlsFailure) -> Option<T>,
) -> T {
    server
        .wait_for(move |e| match e {
            Event::TlsFailed { addr: a, reason } if *a == addr => which(reason),
            _ => None,
        })
        .await
}

#[test]
fn chat_over_tls_on_smol() {
    run(LIMIT, async {
        let (server, cert) = tls_room(Config::default());
        let mut ana = tls_client(server.addr, &cert).await;
        let mut bo = tls_client(server.addr, &cert).await;
        assert!(matches!(ana.nick("ana").await, ChatMessage::Ack { .. }));
        assert!(matches!(bo.nick("bo").await, ChatMessage::Ack { .. }));
        ana.say("over TLS").await;
        assert_eq!(bo.next().await, ("ana".into(), "over TLS".into()));
        bo.say("and back").await;
        assert_eq!(ana.next().await, ("bo".into(), "and back".into()));

        // v0.6 over TLS too.
        let carol = tls_client(server.addr, &cert).await;
        let welcome = carol.ask(hello(&[V0_5, V0_6], &["ack"])).await;
        assert!(
            matches!(welcome, ChatMessage::Welcome { version: V0_6, .. }),
            "{welcome:?}"
        );

        // A clean close (close_notify, then FIN) is a clean close.
        let ana_addr = ana.addr;
        ana.close().await;
        assert!(matches!(
            server.disconnected(ana_addr).await,
            Disconnect::Closed
        ));
        bo.close().await;
        carol.close().await;
        let events = server.shutdown().await;
        let failed = events
            .iter()
            .filter(|e| matches!(e, Event::TlsFailed { .. }))
            .count();
        assert_eq!(failed, 0, "{events:#?}");
    });
}

#[test]
fn chat_over_tls_on_tokio() {
    let (server, cert) = tls_room(Config::default());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let body = async {
            // tokio-rustls with the room's certificate, then chatpipe on
            // tokio's own I/O and timer.
            let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
            let config = tls::client_config(&Trust::Certs(vec![cert.clone()])).unwrap();
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(localhost(), tcp)
                .await
                .unwrap();
            let (tok, mut tok_in, conn) = Builder::new().build_tokio(stream, Chat);
            let tok_driver = tokio::spawn(conn);
            let ack = tok.request(ChatMessage::set_nickname("tok")).await.unwrap();
            assert!(matches!(ack, ChatMessage::Ack { .. }), "{ack:?}");

            // A smol client (futures-rustls) in the same room.
            let mut ana = tls_client(server.addr, &cert).await;
            assert!(matches!(ana.nick("ana").await, ChatMessage::Ack { .. }));
            ana.say("from smol").await;
            match tok_in.next().await {
                Some(Ok(ChatMessage::Broadcast { from, text })) => {
                    assert_eq!((from.as_str(), text.as_str()), ("ana", "from smol"));
                }
                other => panic!("expected a broadcast, got {other:?}"),
            }
            let chat = ChatMessage::Chat {
                text: "from tokio".into(),
            };
            tok.send(chat).await.unwrap();
            assert_eq!(ana.next().await, ("tok".into(), "from tokio".into()));

            tok.close();
            tok_driver.await.unwrap().unwrap();
            ana.close().await;
        };
        tokio::time::timeout(LIMIT, body)
            .await
            .expect("test timed out");
    });
    smol::block_on(server.shutdown());
}

/// A plaintext client on the TLS port: the server logs what it sent (not
/// TLS) and closes it; the client reads the server's TLS alert as a huge
/// frame length, `15 03 03 ..`, and knows what that means.
#[test]
fn a_plaintext_client_on_the_tls_port_is_told_and_logged() {
    run(LIMIT, async {
        let (server, _cert) = tls_room(Config::default());
        let client = connect(server.addr).await;
        let addr = client.addr;
        let asked = client
            .sender
            .request(ChatMessage::set_nickname("ana"))
            .await;
        assert!(asked.is_err(), "{asked:?}");
        let error = client.driver.await.unwrap_err();
        match &error {
            Error::FrameTooLarge { len, .. } => {
                assert_eq!(
                    tls::tls_record(*len),
                    Some(tls::TlsRecord::Alert),
                    "{len:#x}"
                );
            }
            other => panic!("expected the alert as a frame too large, got {other:?}"),
        }
        let hint = tls::plaintext_hint(&error).unwrap();
        assert!(hint.contains("try --tls"), "{hint}");

        let first = tls_failure(&server, addr, |r| match r {
            TlsFailure::NotTls { first } => Some(first.clone()),
            _ => None,
        })
        .await;
        // A SetNickname frame's header: a small length.
        assert_eq!(first[..3], [0, 0, 0], "{first:02x?}");
        let logged = server
            .events
            .lock()
            .unwrap()
            .iter()
            .find(|e| matches!(e, Event::TlsFailed { .. }))
            .map(|e| e.to_string())
            .unwrap();
        assert!(
            logged.contains("plaintext client on the TLS port"),
            "{logged}"
        );
        server.shutdown().await;
    });
}

/// A TLS client on a plaintext port: the room reads its ClientHello as a
/// frame header (`16 03 01 ..`), says so, and closes it at once; the
/// client's handshake fails, with words saying why.
#[test]
fn a_tls_client_on_a_plaintext_port_is_told_and_logged() {
    run(LIMIT, async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = start_with(listener, Config::default());
        let cert = tls::self_signed(&tls::LOCALHOST).unwrap().cert;
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let error = trusting(&cert)
            .connect(localhost(), tcp)
            .await
            .map(|_| ())
            .unwrap_err();
        let said = tls::explain_handshake(&error, &localhost());
        assert!(
            said.contains("does it speak TLS? try without --tls"),
            "{said}"
        );
        assert!(matches!(
            server.disconnected(addr).await,
            Disconnect::TlsClientHello
        ));
        let events = server.shutdown().await;
        let logged = events
            .iter()
            .find(|e| matches!(e, Event::Disconnected { addr: a, .. } if *a == addr))
            .map(|e| e.to_string())
            .unwrap();
        assert!(
            logged.contains("TLS ClientHello on a plaintext port"),
            "{logged}"
        );
    });
}

/// Peers that open TCP and never finish a handshake (silent, or a
/// ClientHello begun and never ended) are closed once the handshake
/// timeout has passed, not before.
#[test]
fn a_handshake_never_finished_is_closed_after_the_timeout() {
    run(LIMIT, async {
        let timeout = Duration::from_millis(300);
        let (server, _cert) = tls_room(Config {
            handshake_timeout: timeout,
            ..Config::default()
        });
        let start = Instant::now();
        let mut silent = TcpStream::connect(server.addr).await.unwrap();
        let mut partial = TcpStream::connect(server.addr).await.unwrap();
        // A handshake record of 512 bytes announced, 2 sent.
        partial.write_all(&[0x16, 3, 1, 2, 0, 1, 0]).await.unwrap();
        for peer in [&mut silent, &mut partial] {
            let addr = peer.local_addr().unwrap();
            let mut buf = [0u8; 64];
            // Closed: EOF (or a reset), never data.
            match peer.read(&mut buf).await {
                Ok(n) => assert_eq!(n, 0, "{:02x?}", &buf[..n]),
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
            }
            assert!(start.elapsed() >= timeout, "closed before the timeout");
            let after = tls_failure(&server, addr, |r| match r {
                TlsFailure::Timeout { after } => Some(*after),
                _ => None,
            })
            .await;
            assert_eq!(after, timeout);
        }
        server.shutdown().await;
    });
}

/// Connections in a TLS handshake count against `max_per_ip`, so
/// handshakes cannot exhaust the server; one that ends frees its place.
#[test]
fn handshakes_count_against_the_per_ip_limit() {
    run(LIMIT, async {
        let (server, cert) = tls_room(Config {
            max_per_ip: 2,
            handshake_timeout: Duration::from_secs(120),
            ..Config::default()
        });
        let first = TcpStream::connect(server.addr).await.unwrap();
        let first_addr = first.local_addr().unwrap();
        let _second = TcpStream::connect(server.addr).await.unwrap();
        // Accepted in order: the third is over the limit.
        let third = TcpStream::connect(server.addr).await.unwrap();
        let third_addr = third.local_addr().unwrap();
        let reason = server
            .wait_for(|e| match e {
                Event::Refused { addr, reason } if *addr == third_addr => Some(reason.clone()),
                _ => None,
            })
            .await;
        assert!(
            matches!(reason, Refusal::TooManyFromIp { max: 2, .. }),
            "{reason:?}"
        );
        // The first gives up: its place is free, and a TLS client joins.
        drop(first);
        tls_failure(&server, first_addr, |r| {
            matches!(r, TlsFailure::Failed(_)).then_some(())
        })
        .await;
        let ana = tls_client(server.addr, &cert).await;
        assert!(matches!(ana.nick("ana").await, ChatMessage::Ack { .. }));
        ana.close().await;
        server.shutdown().await;
    });
}

/// Members and handshakes together count against `max_connections`.
#[test]
fn handshakes_count_against_max_connections() {
    run(LIMIT, async {
        let (server, cert) = tls_room(Config {
            max_connections: 2,
            handshake_timeout: Duration::from_secs(120),
            ..Config::default()
        });
        let ana = tls_client(server.addr, &cert).await;
        assert!(matches!(ana.nick("ana").await, ChatMessage::Ack { .. }));
        let _stalled = TcpStream::connect(server.addr).await.unwrap();
        let third = TcpStream::connect(server.addr).await.unwrap();
        let third_addr = third.local_addr().unwrap();
        let reason = server
            .wait_for(|e| match e {
                Event::Refused { addr, reason } if *addr == third_addr => Some(reason.clone()),
                _ => None,
            })
            .await;
        assert_eq!(reason, Refusal::ServerFull { max: 2 });
        ana.close().await;
        server.shutdown().await;
    });
}

/// Shutdown does not wait for a handshake under way (its timeout here is
/// far beyond the test's limit): it is dropped, and the room stops.
#[test]
fn shutdown_drops_handshakes_under_way() {
    run(LIMIT, async {
        let (server, _cert) = tls_room(Config {
            max_connections: 1,
            handshake_timeout: Duration::from_secs(600),
            ..Config::default()
        });
        let mut stalled = TcpStream::connect(server.addr).await.unwrap();
        // Refused as the server is full: so the first is in its handshake.
        let probe = TcpStream::connect(server.addr).await.unwrap();
        let probe_addr = probe.local_addr().unwrap();
        server
            .wait_for(|e| {
                matches!(e, Event::Refused { addr, .. } if *addr == probe_addr).then_some(())
            })
            .await;
        let events = server.shutdown().await;
        assert!(
            !events.iter().any(|e| matches!(e, Event::TlsFailed { .. })),
            "{events:#?}"
        );
        let mut buf = [0u8; 8];
        match stalled.read(&mut buf).await {
            Ok(n) => assert_eq!(n, 0),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }
    });
}

// ---------------------------------------------------------------------------
// The programs
// ---------------------------------------------------------------------------

/// A directory of this test's own, removed when dropped: certificates and
/// keys made at test time go there.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("chatpipe-tls-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The server's addresses and certificate, from what it printed.
struct Served {
    plain: Option<String>,
    tls: String,
    cert: String,
}

/// `chat_server --tls-self-signed` on free ports, its certificate written
/// into `dir`; with `side_by_side`, plaintext on --listen and TLS on
/// --tls-listen.
fn self_signed_server(dir: &TempDir, side_by_side: bool) -> (Program, Served) {
    let cert_out = dir.path("server.pem");
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--tls-self-signed",
        "--tls-cert-out",
        &cert_out,
    ];
    if side_by_side {
        args.extend(["--tls-listen", "127.0.0.1:0"]);
    }
    let server = start("chat_server", &args);
    let field = |prefix: &str| {
        let line = server.line();
        line.strip_prefix(prefix)
            .unwrap_or_else(|| panic!("expected {prefix:?}, got {line:?}"))
            .to_owned()
    };
    let listen = field("listening on ");
    let tls = field("TLS on ");
    let cert = field("certificate: ");
    assert_eq!(cert, cert_out);
    let hint = server.line();
    assert!(hint.contains(&format!("--tls-ca {cert}")), "{hint}");
    let pem = std::fs::read_to_string(&cert).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(!pem.contains("PRIVATE KEY"), "the key is never written");
    if side_by_side {
        assert_ne!(listen, tls);
    } else {
        assert_eq!(listen, tls);
    }
    let plain = side_by_side.then_some(listen);
    (server, Served { plain, tls, cert })
}

#[test]
fn programs_have_the_tls_flags() {
    let out = Command::new(example("chat_server"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--tls-cert",
        "--tls-key",
        "--tls-self-signed",
        "--tls-listen",
        "--tls-handshake-timeout",
    ] {
        assert!(help.contains(flag), "chat_server --help lacks {flag}");
    }
    let out = Command::new(example("chat_client"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--tls ", "--tls-ca", "--tls-server-name"] {
        assert!(help.contains(flag), "chat_client --help lacks {flag}");
    }
}

/// The two-command path: a self-signed server, and a client trusting its
/// certificate; plaintext and TLS side by side in one room.
#[test]
fn programs_chat_over_tls_with_a_self_signed_certificate() {
    let dir = TempDir::new("chat");
    let (server, served) = self_signed_server(&dir, true);
    let plain = served.plain.unwrap();
    let mut ana = start(
        "chat_client",
        &[
            "--connect",
            &served.tls,
            "--tls-ca",
            &served.cert,
            "--nick",
            "ana",
        ],
    );
    ana.stderr_line("(TLS, 127.0.0.1)");
    assert_eq!(ana.line(), "* you are now ana");
    let mut bo = start("chat_client", &["--connect", &plain, "--nick", "bo"]);
    assert_eq!(bo.line(), "* you are now bo");
    ana.type_line("encrypted hello");
    assert_eq!(bo.line(), "ana: encrypted hello");
    bo.type_line("plain hello");
    assert_eq!(ana.line(), "bo: plain hello");
    ana.type_line("/quit");
    assert!(ana.wait().success());
    bo.type_line("/quit");
    assert!(bo.wait().success());
    server.stderr_line("(ana) disconnected: closed cleanly");
}

#[test]
fn program_client_refuses_a_certificate_from_another_ca() {
    let dir = TempDir::new("ca");
    let (server, served) = self_signed_server(&dir, false);
    let other = dir.path("other.pem");
    std::fs::write(&other, tls::self_signed(&tls::LOCALHOST).unwrap().cert_pem).unwrap();
    let mut client = start(
        "chat_client",
        &["--connect", &served.tls, "--tls-ca", &other],
    );
    let said = client.stderr_line("TLS handshake");
    assert!(said.contains("not trusted"), "{said}");
    assert_eq!(client.wait().code(), Some(1));
    server.stderr_line("TLS handshake failed");
}

#[test]
fn program_client_refuses_a_certificate_for_another_name() {
    let dir = TempDir::new("name");
    let (server, served) = self_signed_server(&dir, false);
    let mut client = start(
        "chat_client",
        &[
            "--connect",
            &served.tls,
            "--tls-ca",
            &served.cert,
            "--tls-server-name",
            "chat.example",
        ],
    );
    let said = client.stderr_line("TLS handshake");
    assert!(
        said.contains("not valid for the name \"chat.example\""),
        "{said}"
    );
    assert_eq!(client.wait().code(), Some(1));
    server.stderr_line("TLS handshake failed");
}

#[test]
fn program_plaintext_client_on_the_tls_port() {
    let dir = TempDir::new("plain");
    let (server, served) = self_signed_server(&dir, false);
    let mut client = start("chat_client", &["--connect", &served.tls, "--nick", "bo"]);
    let said = client.stderr_line("connection lost");
    assert!(said.contains("the server speaks TLS? try --tls"), "{said}");
    assert_eq!(client.wait().code(), Some(1));
    server.stderr_line("(a plaintext client on the TLS port)");
}

#[test]
fn program_tls_client_on_a_plaintext_port() {
    let dir = TempDir::new("tlsonplain");
    let (server, served) = self_signed_server(&dir, true);
    let plain = served.plain.unwrap();
    let mut client = start(
        "chat_client",
        &["--connect", &plain, "--tls-ca", &served.cert],
    );
    let said = client.stderr_line("TLS handshake");
    assert!(
        said.contains("does it speak TLS? try without --tls"),
        "{said}"
    );
    assert_eq!(client.wait().code(), Some(1));
    server.stderr_line("TLS ClientHello on a plaintext port");
}

/// A certificate and key from files (made here, removed after): what a
/// real deployment gives.
#[test]
fn program_server_serves_tls_from_certificate_and_key_files() {
    let dir = TempDir::new("files");
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (dir.path("cert.pem"), dir.path("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    let server = start(
        "chat_server",
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
    );
    let addr = server.line();
    let addr = addr.strip_prefix("listening on ").unwrap().to_owned();
    assert_eq!(server.line(), format!("TLS on {addr}"));
    // The certificate is for localhost only: the name is given.
    let mut ana = start(
        "chat_client",
        &[
            "--connect",
            &addr,
            "--tls-ca",
            &cert,
            "--tls-server-name",
            "localhost",
            "--nick",
            "ana",
        ],
    );
    assert_eq!(ana.line(), "* you are now ana");
    ana.type_line("/quit");
    assert!(ana.wait().success());

    // Files that cannot be read: exit 1 at once, saying which.
    let missing = dir.path("missing.pem");
    let mut bad = start(
        "chat_server",
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            &missing,
            "--tls-key",
            &key,
        ],
    );
    let said = bad.stderr_line("cannot set up TLS");
    assert!(said.contains(&missing), "{said}");
    assert_eq!(bad.wait().code(), Some(1));
    assert!(Path::new(&key).exists());
}

/// Credentials go over TLS, and only there: the same room refuses them on
/// its plaintext listener, saying why.
#[test]
fn credentials_are_taken_over_tls_and_refused_over_plaintext() {
    use chatpipe::chat::{Credentials, Login, RequestId};
    run(LIMIT, async {
        let made = tls::self_signed(&tls::LOCALHOST).unwrap();
        let tls_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let plain_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tls_addr, plain_addr) = (
            tls_listener.local_addr().unwrap(),
            plain_listener.local_addr().unwrap(),
        );
        let config = Config {
            accounts: Some(std::sync::Arc::new(
                chatpipe_chat::accounts::Accounts::in_memory().unwrap(),
            )),
            ..Config::default()
        };
        assert!(!config.plaintext_credentials, "the default refuses them");
        let listeners = vec![
            Listener::tls(tls_listener, made.config),
            Listener::plain(plain_listener),
        ];
        let server = start_on(listeners, tls_addr, config);
        let register = Credentials::Register {
            nickname: "ana".into(),
            password: "over tls".into(),
        };
        let hello_as = |c: &Credentials| ChatMessage::Hello {
            request_id: RequestId::random(),
            versions: vec![V0_5, V0_6],
            capabilities: vec!["account".into()],
            credentials: c.encode(),
        };
        let plain = connect(plain_addr).await;
        let refused = plain.ask(hello_as(&register)).await;
        assert!(
            matches!(&refused, ChatMessage::Nak { message, .. } if message.contains("not encrypted")),
            "{refused:?}"
        );
        let ana = tls_client(tls_addr, &made.cert).await;
        let welcome = ana.ask(hello_as(&register)).await;
        assert!(
            matches!(welcome, ChatMessage::Welcome { .. }),
            "{welcome:?}"
        );
        // A guest over TLS logs in after the handshake; one over plaintext
        // cannot.
        let guest = connect(plain_addr).await;
        let welcome = guest.ask(hello(&[V0_5, V0_6], &["account"])).await;
        assert!(matches!(welcome, ChatMessage::Welcome { .. }));
        let login = Credentials::Login {
            nickname: "ana".into(),
            password: "over tls".into(),
        };
        let answer = guest.sender.call(Login(login.clone())).await.unwrap();
        assert!(answer.unwrap_err().contains("not encrypted"));
        let again = tls_client(tls_addr, &made.cert).await;
        let welcome = again.ask(hello(&[V0_5, V0_6], &["account"])).await;
        assert!(matches!(welcome, ChatMessage::Welcome { .. }));
        assert_eq!(again.sender.call(Login(login)).await.unwrap(), Ok(()));
        server.shutdown().await;
    });
}

/// `chat_client --tls-ca` sends a password file without any plaintext
/// flag, and logs in with it later.
#[test]
fn program_client_registers_over_tls() {
    let dir = TempDir::new("accounts");
    let (_server, served) = self_signed_server(&dir, false);
    let password = dir.path("password");
    std::fs::write(&password, "over tls\n").unwrap();
    let client = |register: bool| {
        let mut args = vec![
            "--connect",
            &served.tls,
            "--tls-ca",
            &served.cert,
            "--line",
            "--nick",
            "ana",
            "--password-file",
            &password,
        ];
        if register {
            args.push("--register");
        }
        start("chat_client", &args)
    };
    let mut ana = client(true);
    assert_eq!(ana.line(), "* registered ana");
    ana.close_stdin();
    assert!(ana.wait().success());
    let mut ana = client(false);
    assert_eq!(ana.line(), "* logged in as ana");
    ana.close_stdin();
    assert!(ana.wait().success());
}
