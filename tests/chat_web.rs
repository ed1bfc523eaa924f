//! The browser client (chatpipe_chat::web): the room over WebSocket,
//! in-process with a Rust WebSocket client (the page, the upgrade, web and
//! TCP users in one room, wss, and what a malformed WebSocket message
//! gets), then the real page in headless Chromium (tests/web/driver.mjs,
//! playwright-core) next to a terminal `chat_client`.
//!
//! `cargo build --examples && cargo test --test chat_web`; the browser
//! test needs /usr/bin/chromium and `npm ci` in tests/web (`.ci/run` sets
//! both up).

mod chat_support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_support::*;
use chatpipe::chat::{Chat, ChatMessage, Credentials, V0_5, V0_6};
use chatpipe::{Builder, Error};
use chatpipe_chat::accounts::Accounts;
use chatpipe_chat::tls::{self, rustls::pki_types::ServerName, Trust};
use chatpipe_chat::web::async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use chatpipe_chat::web::async_tungstenite::tungstenite::{Bytes, Message};
use chatpipe_chat::web::async_tungstenite::{client_async, WebSocketStream};
use chatpipe_chat::web::{BadMessage, WsIo, MAX_MESSAGE};
use chatpipe_chat::{Config, Disconnect, Event, Listener, WebFailure};
use futures::StreamExt;
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::net::{TcpListener, TcpStream};

/// A hang guard only: generous, for a machine under full load.
const LIMIT: Duration = Duration::from_secs(30);

/// The room on a plaintext TCP listener (the server's `addr`) and a web
/// listener, over TLS with `tls`; returns the web listener's address.
fn web_room(
    config: Config,
    tls: Option<Arc<tls::rustls::ServerConfig>>,
) -> (TestServer, SocketAddr) {
    let bind = || smol::block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let (tcp, web) = (bind(), bind());
    let (addr, web_addr) = (tcp.local_addr().unwrap(), web.local_addr().unwrap());
    let listeners = vec![Listener::plain(tcp), Listener::web(web, tls)];
    (start_on(listeners, addr, config), web_addr)
}

/// A WebSocket to the room's endpoint; and its local address.
async fn websocket(web: SocketAddr) -> (WebSocketStream<TcpStream>, SocketAddr) {
    let tcp = TcpStream::connect(web).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let (ws, response) = client_async(format!("ws://{web}/ws"), tcp).await.unwrap();
    assert_eq!(response.status(), 101);
    (ws, local)
}

/// A chatpipe chat client over a WebSocket, as the page is.
async fn web_client(web: SocketAddr) -> Client {
    let (ws, addr) = websocket(web).await;
    let (sender, incoming, conn) = Builder::new().build(WsIo::new(ws), Chat);
    Client {
        sender,
        incoming,
        driver: smol::spawn(conn),
        addr,
    }
}

/// The next Broadcast, skipping presence news.
async fn broadcast(c: &mut Client) -> (String, String) {
    loop {
        match c.recv().await {
            ChatMessage::Broadcast { from, text } => return (from, text),
            ChatMessage::Presence { .. } => {}
            other => panic!("expected a broadcast, got {other:?}"),
        }
    }
}

#[test]
fn web_and_tcp_users_chat_in_one_room() {
    let (server, web) = web_room(Config::default(), None);
    run(LIMIT, async {
        let mut ana = web_client(web).await;
        let welcome = ana.ask(hello(&[V0_5, V0_6], &["ack", "presence"])).await;
        assert!(matches!(
            welcome,
            ChatMessage::Welcome { version: V0_6, .. }
        ));
        assert!(matches!(ana.nick("ana").await, ChatMessage::Ack { .. }));
        let mut bo = connect(server.addr).await;
        assert!(matches!(bo.nick("bo").await, ChatMessage::Ack { .. }));
        // Acked: in the room, so bo gets it.
        let say = ChatMessage::Say {
            request_id: chatpipe::chat::RequestId::random(),
            text: "hi from the web".into(),
        };
        assert!(matches!(ana.ask(say).await, ChatMessage::Ack { .. }));
        assert_eq!(bo.next().await, ("ana".into(), "hi from the web".into()));
        bo.say("hi from tcp").await;
        assert_eq!(
            broadcast(&mut ana).await,
            ("bo".into(), "hi from tcp".into())
        );
        // Large messages cross several WebSocket frames' worth intact.
        let long = "x".repeat(60_000);
        bo.say(&long).await;
        assert_eq!(broadcast(&mut ana).await, ("bo".into(), long));
        let ana_addr = ana.addr;
        ana.close().await;
        assert!(matches!(
            server.disconnected(ana_addr).await,
            Disconnect::Closed
        ));
        bo.close().await;
    });
    run(LIMIT, server.shutdown());
}

/// Reads until the WebSocket's close frame; returns its code.
async fn close_code(ws: &mut WebSocketStream<TcpStream>) -> Option<CloseCode> {
    while let Some(msg) = ws.next().await {
        if let Ok(Message::Close(frame)) = msg {
            return frame.map(|f| f.code);
        }
    }
    None
}

#[test]
fn a_malformed_websocket_message_closes_like_a_malformed_frame() {
    let (server, web) = web_room(Config::default(), None);
    run(LIMIT, async {
        // A text message.
        let (mut ws, addr) = websocket(web).await;
        ws.send(Message::text("hello")).await.unwrap();
        assert_eq!(close_code(&mut ws).await, Some(CloseCode::Unsupported));
        match server.disconnected(addr).await {
            Disconnect::Error(e @ Error::Malformed(_)) => {
                assert_eq!(BadMessage::of(&e), Some(&BadMessage::Text { len: 5 }));
            }
            other => panic!("{other:?}"),
        }

        // A message over one frame's size.
        let (mut ws, addr) = websocket(web).await;
        let big = Bytes::from(vec![0u8; MAX_MESSAGE + 1]);
        // The server may close before the whole message is written.
        let _ = ws.send(Message::Binary(big)).await;
        assert_eq!(close_code(&mut ws).await, Some(CloseCode::Size));
        match server.disconnected(addr).await {
            Disconnect::Error(e @ Error::Malformed(_)) => assert!(
                matches!(BadMessage::of(&e), Some(BadMessage::TooLarge { max, .. }) if *max == MAX_MESSAGE),
                "{e}"
            ),
            other => panic!("{other:?}"),
        }

        // Garbage in a binary message is chat bytes gone wrong: the same
        // errors as over TCP, a frame too large, or a malformed payload.
        let (mut ws, addr) = websocket(web).await;
        ws.send(Message::binary(vec![0xff; 8])).await.unwrap();
        close_code(&mut ws).await;
        assert!(matches!(
            server.disconnected(addr).await,
            Disconnect::Error(Error::FrameTooLarge {
                len: 0xffff_ffff,
                ..
            })
        ));
        let (mut ws, addr) = websocket(web).await;
        // A Broadcast whose nickname runs past the payload.
        ws.send(Message::binary(vec![0, 0, 0, 5, 0, 0, 0, 1, 9]))
            .await
            .unwrap();
        close_code(&mut ws).await;
        let tcp_like = server.disconnected(addr).await;
        assert!(
            matches!(tcp_like, Disconnect::Error(Error::Malformed(_))),
            "{tcp_like:?}"
        );
        let mut raw = TcpStream::connect(server.addr).await.unwrap();
        let raw_addr = raw.local_addr().unwrap();
        raw.write_all(&[0, 0, 0, 5, 0, 0, 0, 1, 9]).await.unwrap();
        let over_tcp = server.disconnected(raw_addr).await;
        assert_eq!(format!("{over_tcp}"), format!("{tcp_like}"));
    });
    run(LIMIT, server.shutdown());
}

/// One HTTP request on a fresh connection; the whole response.
async fn http(web: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(web).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[test]
fn the_page_and_what_is_not_a_request() {
    let config = Config {
        handshake_timeout: Duration::from_millis(300),
        max_per_ip: 2,
        ..Config::default()
    };
    let (server, web) = web_room(config, None);
    run(LIMIT, async {
        let page = http(web, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
        assert!(page.contains("Content-Type: text/html"));
        assert!(page.contains("<script src=\"chat.js\""));
        let js = http(web, "GET /chat.js HTTP/1.1\r\n\r\n").await;
        assert!(js.contains("new WebSocket("), "{js}");
        let css = http(web, "GET /chat.css HTTP/1.1\r\n\r\n").await;
        assert!(css.starts_with("HTTP/1.1 200") && css.contains("text/css"));
        let missing = http(web, "GET /etc/passwd HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"));
        let plain_get = http(web, "GET /ws HTTP/1.1\r\n\r\n").await;
        assert!(plain_get.starts_with("HTTP/1.1 400"));
        server
            .wait_for(|e| match e {
                Event::WebRequest { path, status, .. } if path == "/ws" => Some(*status),
                _ => None,
            })
            .await;

        // A chat client on the web port.
        let mut chat = TcpStream::connect(web).await.unwrap();
        chat.write_all(&[0, 0, 0, 8, 0, 0, 0, 0, 0, 2, b'H', b'i'])
            .await
            .unwrap();
        let first = server
            .wait_for(|e| match e {
                Event::WebFailed {
                    reason: WebFailure::NotHttp { first, .. },
                    ..
                } => Some(first.clone()),
                _ => None,
            })
            .await;
        assert_eq!(first, [0, 0, 0, 8, 0, 0, 0, 0]);

        // Silent connections count against the limits until they time out.
        // The clock starts before they connect: the server's starts when it
        // accepts, which a busy machine may let happen before this task
        // runs again.
        let started = Instant::now();
        let _silent = [
            TcpStream::connect(web).await.unwrap(),
            TcpStream::connect(web).await.unwrap(),
        ];
        let _third = TcpStream::connect(web).await.unwrap();
        let refused = server
            .wait_for(|e| match e {
                Event::Refused { reason, .. } => Some(reason.clone()),
                _ => None,
            })
            .await;
        assert!(
            matches!(
                refused,
                chatpipe_chat::Refusal::TooManyFromIp { max: 2, .. }
            ),
            "{refused:?}"
        );
        let after = server
            .wait_for(|e| match e {
                Event::WebFailed {
                    reason: WebFailure::Timeout { after },
                    ..
                } => Some(*after),
                _ => None,
            })
            .await;
        assert_eq!(after, Duration::from_millis(300));
        assert!(started.elapsed() >= after);
    });
    run(LIMIT, server.shutdown());
}

#[test]
fn over_tls_the_page_is_https_and_the_websocket_wss() {
    let made = tls::self_signed(&tls::LOCALHOST).unwrap();
    let config = Config {
        accounts: Some(Arc::new(Accounts::in_memory().unwrap())),
        ..Config::default()
    };
    let (server, web) = web_room(config, Some(made.config));
    let connector =
        tls::TlsConnector::from(tls::client_config(&Trust::Certs(vec![made.cert])).unwrap());
    let name = ServerName::try_from("localhost").unwrap();
    let register = ChatMessage::Hello {
        request_id: chatpipe::chat::RequestId::random(),
        versions: vec![V0_6],
        capabilities: vec!["ack".into(), "account".into()],
        credentials: Credentials::Register {
            nickname: "ana".into(),
            password: "correct horse".into(),
        }
        .encode(),
    };
    run(LIMIT, async {
        let tcp = TcpStream::connect(web).await.unwrap();
        let mut s = connector.connect(name.clone(), tcp).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut page = String::new();
        s.read_to_string(&mut page).await.unwrap();
        assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");

        // wss: secure, so a password may travel: registering works.
        let tcp = TcpStream::connect(web).await.unwrap();
        let s = connector.connect(name, tcp).await.unwrap();
        let (ws, _) = client_async("wss://localhost/ws", s).await.unwrap();
        let (sender, incoming, conn) = Builder::new().build(WsIo::new(ws), Chat);
        let _driver = smol::spawn(conn);
        let welcome = sender.request(register.clone()).await.unwrap();
        assert!(
            matches!(welcome, ChatMessage::Welcome { .. }),
            "{welcome:?}"
        );
        drop(incoming);
        server
            .wait_for(|e| matches!(e, Event::Registered { .. }).then_some(()))
            .await;

        // A plaintext client on the TLS web port.
        let mut plain = TcpStream::connect(web).await.unwrap();
        plain.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        server
            .wait_for(|e| matches!(e, Event::TlsFailed { .. }).then_some(()))
            .await;
    });
    run(LIMIT, server.shutdown());
}

#[test]
fn over_plain_ws_passwords_are_refused() {
    let config = Config {
        accounts: Some(Arc::new(Accounts::in_memory().unwrap())),
        ..Config::default()
    };
    let (server, web) = web_room(config, None);
    run(LIMIT, async {
        let c = web_client(web).await;
        let hello = ChatMessage::Hello {
            request_id: chatpipe::chat::RequestId::random(),
            versions: vec![V0_6],
            capabilities: vec!["account".into()],
            credentials: Credentials::Login {
                nickname: "ana".into(),
                password: "pw".into(),
            }
            .encode(),
        };
        match c.ask(hello).await {
            ChatMessage::Nak { message, .. } => {
                assert!(message.contains("not encrypted"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    });
    run(LIMIT, server.shutdown());
}

// The real page, in headless Chromium.

/// The driver's directory, with playwright-core installed.
fn driver_dir() -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/web");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `npm ci` in {} (.ci/run does)",
        dir.display()
    );
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "no /usr/bin/chromium: apt-get install chromium (.ci/run does)"
    );
    dir
}

/// Starts chat_server with a web listener; returns it, its TCP address
/// and its web address (`IP:PORT`).
fn web_server(listen: &str, web: &str) -> (Program, String, String) {
    let server = run_example("chat_server", &["--listen", listen, "--web", web]);
    let first = server.line();
    let tcp = first
        .strip_prefix("listening on ")
        .expect(&first)
        .to_owned();
    let second = server.line();
    let web = second
        .strip_prefix("web on http://")
        .and_then(|s| s.strip_suffix('/'))
        .expect(&second)
        .to_owned();
    (server, tcp, web)
}

#[test]
fn browser_users_and_a_terminal_user_share_the_room() {
    let dir = driver_dir();
    // Ports the restarted server finds free again.
    let tcp = format!("127.0.0.1:{}", chat_support::restartable_port());
    let web = format!("127.0.0.1:{}", chat_support::restartable_port());
    let (mut server, tcp, web) = web_server(&tcp, &web);
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("chat_web-room.png");
    let _ = std::fs::remove_file(&shot);
    let mut node = Command::new("node");
    node.arg(dir.join("driver.mjs"))
        .current_dir(&dir)
        .env("WEB_URL", format!("http://{web}/"))
        .env("TCP_ADDR", &tcp)
        .env("CHAT_CLIENT", example("chat_client"))
        .env("SHOT", &shot);
    let mut driver = spawn(node);
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match driver.stdout.recv_timeout(left) {
            Ok(line) => line,
            Err(e) => {
                let errors: Vec<String> = driver.stderr.try_iter().collect();
                panic!(
                    "the driver stopped or hung ({e}); it said:\n{}\nstderr:\n{}",
                    seen.join("\n"),
                    errors.join("\n")
                )
            }
        };
        eprintln!("driver: {line}");
        seen.push(line.clone());
        match line.as_str() {
            "RESTART" => {
                server.signal("-TERM");
                assert!(server.wait().success());
            }
            "DOWN" => {
                // Back on the very same addresses.
                (server, _, _) = web_server(&tcp, &web);
                driver.type_line("UP");
            }
            "OK" => break,
            _ if line.starts_with("FAIL") => {
                panic!("the browser test failed:\n{}", seen.join("\n"))
            }
            _ => {}
        }
    }
    assert!(driver.wait().success());
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    eprintln!("screenshot: {}", shot.display());
}

#[test]
fn chat_server_serves_https_with_the_tls_flags() {
    let help = Command::new(example("chat_server"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("--web <ADDR>"));
    let cert = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chat_web-https.pem");
    let cert_arg = cert.to_str().unwrap();
    let server = run_example(
        "chat_server",
        &[
            "--listen",
            "127.0.0.1:0",
            "--web",
            "127.0.0.1:0",
            "--tls-self-signed",
            "--tls-cert-out",
            cert_arg,
        ],
    );
    // The TLS lines first, then the web address.
    let web = (0..6)
        .map(|_| server.line())
        .find_map(|l| l.strip_prefix("web on https://").map(str::to_owned))
        .expect("a `web on https://` line");
    let web: SocketAddr = web.trim_end_matches('/').parse().unwrap();
    let connector =
        tls::TlsConnector::from(tls::client_config(&Trust::File(cert.clone())).unwrap());
    run(LIMIT, async {
        let tcp = TcpStream::connect(web).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut s = connector.connect(name, tcp).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut page = String::new();
        s.read_to_string(&mut page).await.unwrap();
        assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
        assert!(page.contains("<script src=\"chat.js\""));
    });
    let _ = std::fs::remove_file(&cert);
}
