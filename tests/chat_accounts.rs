//! Accounts (docs/PROTOCOL.md, "Accounts"): registering a nickname with a
//! password, logging in to it, and who may not take it; the rate limit on
//! attempts, the plaintext refusal and `require_login`. The room runs
//! in-process on loopback; the last tests drive the built examples.
//!
//! These run over plaintext with `plaintext_credentials` on, as the room
//! allows for tests; tests/chat_tls.rs covers credentials over TLS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chatpipe::chat::{Chat, ChatMessage, Credentials, Login, RequestId, V0_5, V0_6};
use chatpipe::Builder;
use chatpipe_chat::accounts::{Accounts, LoginRate};
use chatpipe_chat::{Config, Disconnect, Event, LoginRefusal, Rate};
use futures::StreamExt;
use smol::net::TcpStream;

mod chat_support;
use chat_support::{connect, run, start_with, Client, TestServer};

const LIMIT: Duration = Duration::from_secs(60);

/// A room with in-memory accounts that takes passwords over plaintext.
fn config() -> Config {
    Config {
        accounts: Some(Arc::new(Accounts::in_memory().unwrap())),
        plaintext_credentials: true,
        ..Config::default()
    }
}

async fn start(config: Config) -> TestServer {
    let listener = smol::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_with(listener, config)
}

fn register(nick: &str, password: &str) -> Credentials {
    Credentials::Register {
        nickname: nick.into(),
        password: password.into(),
    }
}

fn login(nick: &str, password: &str) -> Credentials {
    Credentials::Login {
        nickname: nick.into(),
        password: password.into(),
    }
}

fn hello_with(credentials: Option<&Credentials>) -> ChatMessage {
    ChatMessage::Hello {
        request_id: RequestId::random(),
        versions: vec![V0_5, V0_6],
        capabilities: vec!["ack".into(), "account".into()],
        credentials: credentials.map(Credentials::encode).unwrap_or_default(),
    }
}

/// Connects (from `local`, a loopback address, if given) and says Hello
/// with `credentials`; returns the client and the answer.
async fn hello_from(
    server: SocketAddr,
    local: Option<&str>,
    credentials: Option<&Credentials>,
) -> (Client, ChatMessage) {
    let c = match local {
        None => connect(server).await,
        Some(ip) => connect_from(server, ip).await,
    };
    let answer = c.ask(hello_with(credentials)).await;
    (c, answer)
}

async fn hello(server: SocketAddr, credentials: &Credentials) -> (Client, ChatMessage) {
    hello_from(server, None, Some(credentials)).await
}

/// A client whose end of the connection is bound to `ip` (127.0.0.0/8 is
/// all loopback): another address, as the per-IP limit sees it.
async fn connect_from(server: SocketAddr, ip: &str) -> Client {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::new(ip.parse().unwrap(), 0).into())
        .unwrap();
    s.connect(&server.into()).unwrap();
    let stream = TcpStream::try_from(std::net::TcpStream::from(s)).unwrap();
    let addr = stream.local_addr().unwrap();
    let (sender, incoming, conn) = Builder::new().build(stream, Chat);
    Client {
        sender,
        incoming,
        driver: smol::spawn(conn),
        addr,
    }
}

fn is_welcome(msg: &ChatMessage) -> bool {
    matches!(msg, ChatMessage::Welcome { version: V0_6, .. })
}

fn nak(msg: &ChatMessage) -> &str {
    match msg {
        ChatMessage::Nak { message, .. } => message,
        other => panic!("expected a Nak, got {other:?}"),
    }
}

/// The connection ends: the room closed it after its Nak.
async fn closed(mut c: Client) {
    loop {
        match c.incoming.next().await {
            None | Some(Err(_)) => break,
            Some(Ok(_)) => {}
        }
    }
    let _ = c.driver.await;
}

async fn say(c: &mut Client, text: &str) {
    let answer = c.ask(ChatMessage::Say {
        request_id: RequestId::random(),
        text: text.into(),
    });
    assert!(matches!(answer.await, ChatMessage::Ack { .. }));
}

/// The next Broadcast (skipping Presence and the like).
async fn heard(c: &mut Client) -> (String, String) {
    loop {
        if let ChatMessage::Broadcast { from, text } = c.recv().await {
            return (from, text);
        }
    }
}

#[test]
fn a_registered_nickname_is_refused_to_everyone_else() {
    run(LIMIT, async {
        let server = start(config()).await;
        let (ana, welcome) = hello(server.addr, &register("ana", "s3cret")).await;
        assert!(is_welcome(&welcome), "{welcome:?}");
        let ChatMessage::Welcome { capabilities, .. } = &welcome else {
            unreachable!()
        };
        assert!(
            capabilities.iter().any(|c| c == "account"),
            "{capabilities:?}"
        );
        server
            .wait_for(|e| match e {
                Event::Registered { addr, nickname } if *addr == ana.addr => Some(nickname.clone()),
                _ => None,
            })
            .await;

        // A v0.5 client, byte for byte as ever, gets a Nak saying why.
        let v05 = connect(server.addr).await;
        let answer = v05.nick("ana").await;
        assert!(nak(&answer).contains("registered"), "{answer:?}");
        // So does a v0.6 guest, with or without the account capability.
        let (guest, welcome) = hello_from(server.addr, None, None).await;
        assert!(is_welcome(&welcome));
        assert!(nak(&guest.nick("ana").await).contains("registered"));
        // Others still chat under unregistered nicknames.
        assert!(matches!(v05.nick("bo").await, ChatMessage::Ack { .. }));

        // Ana leaves; her nickname stays hers.
        let addr = ana.addr;
        ana.close().await;
        server.disconnected(addr).await;
        assert!(nak(&guest.nick("ana").await).contains("registered"));
        // Registering it again is refused too.
        let (again, answer) = hello(server.addr, &register("ana", "other")).await;
        assert!(nak(&answer).contains("registered already"), "{answer:?}");
        closed(again).await;

        // She comes back with her password and speaks as ana.
        let (mut ana, welcome) = hello(server.addr, &login("ana", "s3cret")).await;
        assert!(is_welcome(&welcome), "{welcome:?}");
        let mut guest = guest;
        say(&mut ana, "it is me").await;
        assert_eq!(heard(&mut guest).await, ("ana".into(), "it is me".into()));
        server.shutdown().await;
    });
}

#[test]
fn a_wrong_password_is_refused_logged_with_the_address_and_closed() {
    run(LIMIT, async {
        let server = start(config()).await;
        let (ana, welcome) = hello(server.addr, &register("ana", "right")).await;
        assert!(is_welcome(&welcome));
        ana.close().await;

        for credentials in [login("ana", "wrong"), login("nobody", "right")] {
            let (c, answer) = hello(server.addr, &credentials).await;
            // The same words either way: the Nak does not tell which.
            assert_eq!(nak(&answer), "wrong nickname or password");
            let addr = c.addr;
            closed(c).await;
            let reason = server
                .wait_for(|e| match e {
                    Event::LoginFailed {
                        addr: a, reason, ..
                    } if *a == addr => Some(reason.clone()),
                    _ => None,
                })
                .await;
            assert!(matches!(reason, LoginRefusal::Account(_)), "{reason:?}");
            let line = server
                .wait_for(|e| match e {
                    Event::LoginFailed { addr: a, .. } if *a == addr => Some(e.to_string()),
                    _ => None,
                })
                .await;
            assert!(line.contains(&addr.to_string()), "{line}");
        }
        server.shutdown().await;
    });
}

#[test]
fn fifty_clients_registering_one_nickname_at_once_exactly_one_wins() {
    run(LIMIT, async {
        let loose = Rate {
            per_second: 100.0,
            burst: 100.0,
        };
        let server = start(Config {
            login_rate: LoginRate {
                per_ip: loose,
                per_account: loose,
            },
            ..config()
        })
        .await;
        let addr = server.addr;
        let tries: Vec<_> = (0..50)
            .map(|i| {
                let password = format!("password {i}");
                smol::spawn(async move { hello(addr, &register("ana", &password)).await })
            })
            .collect();
        let mut winners = Vec::new();
        for (i, t) in tries.into_iter().enumerate() {
            let (c, answer) = t.await;
            if is_welcome(&answer) {
                winners.push((i, c));
            } else {
                // A loser is told why, whichever stage the winner had
                // reached: hashing, stored, or holding the nickname.
                let reason = nak(&answer);
                assert!(
                    reason == "ana is registered already"
                        || reason == "ana is being registered by another client"
                        || reason == "ana is in use by another client",
                    "{reason}"
                );
            }
        }
        assert_eq!(winners.len(), 1);
        // The winner's password is the one that works.
        let (i, _c) = winners.pop().unwrap();
        let (_ok, answer) = hello(addr, &login("ana", &format!("password {i}"))).await;
        assert!(is_welcome(&answer), "{answer:?}");
        server.shutdown().await;
    });
}

#[test]
fn login_attempts_are_limited_per_address_and_per_account() {
    run(LIMIT, async {
        let server = start(Config {
            login_rate: LoginRate {
                per_ip: Rate {
                    per_second: 0.001,
                    burst: 3.0,
                },
                per_account: Rate {
                    per_second: 0.001,
                    burst: 5.0,
                },
            },
            ..config()
        })
        .await;
        let (ana, _) = hello(server.addr, &register("ana", "right")).await;
        ana.close().await;
        // Per address: the registration gave its attempt back; three
        // wrong guesses, then even the right password waits.
        for _ in 0..3 {
            let (c, answer) = hello(server.addr, &login("ana", "guess")).await;
            assert_eq!(nak(&answer), "wrong nickname or password");
            closed(c).await;
        }
        let (c, answer) = hello(server.addr, &login("ana", "right")).await;
        assert!(
            nak(&answer).starts_with("too many login attempts"),
            "{answer:?}"
        );
        closed(c).await;
        // Per account: from other addresses, two more guesses at ana...
        for ip in ["127.0.0.2", "127.0.0.3"] {
            let (c, answer) = hello_from(server.addr, Some(ip), Some(&login("ana", "x"))).await;
            assert_eq!(nak(&answer), "wrong nickname or password");
            closed(c).await;
        }
        // ...and ana's account waits, from anywhere...
        let (c, answer) =
            hello_from(server.addr, Some("127.0.0.4"), Some(&login("ana", "right"))).await;
        assert!(
            nak(&answer).starts_with("too many login attempts"),
            "{answer:?}"
        );
        closed(c).await;
        // ...while another account is not held up.
        let (bo, answer) =
            hello_from(server.addr, Some("127.0.0.4"), Some(&register("bo", "pw"))).await;
        assert!(is_welcome(&answer), "{answer:?}");
        bo.close().await;
        let limited = server.count(|e| {
            matches!(
                e,
                Event::LoginFailed {
                    reason: LoginRefusal::RateLimited { .. },
                    ..
                }
            )
        });
        assert_eq!(limited, 2);
        server.shutdown().await;
    });
}

#[test]
fn credentials_over_plaintext_are_refused_saying_why() {
    run(LIMIT, async {
        let server = start(Config {
            plaintext_credentials: false,
            ..config()
        })
        .await;
        let (c, answer) = hello(server.addr, &register("ana", "pw")).await;
        let reason = nak(&answer).to_owned();
        assert!(
            reason.contains("not encrypted") && reason.contains("TLS"),
            "{reason}"
        );
        closed(c).await;
        // After the handshake too: a Login gets the same Nak.
        let (guest, welcome) = hello_from(server.addr, None, None).await;
        assert!(is_welcome(&welcome));
        let answer = guest
            .sender
            .call(Login(register("ana", "pw")))
            .await
            .unwrap();
        assert_eq!(answer, Err(reason));
        // Nothing was registered.
        assert!(matches!(guest.nick("ana").await, ChatMessage::Ack { .. }));
        server.shutdown().await;
    });
}

#[test]
fn a_guest_registers_its_nickname_then_logs_in_on_another_connection() {
    run(LIMIT, async {
        let server = start(config()).await;
        let (bo, welcome) = hello_from(server.addr, None, None).await;
        assert!(is_welcome(&welcome));
        // Only a nickname it holds (or a free one) can be registered.
        let (holder, _) = hello_from(server.addr, None, None).await;
        assert!(matches!(holder.nick("cy").await, ChatMessage::Ack { .. }));
        let taken = bo.sender.call(Login(register("cy", "pw"))).await.unwrap();
        assert_eq!(taken, Err("cy is in use by another client".to_owned()));

        assert!(matches!(bo.nick("bo").await, ChatMessage::Ack { .. }));
        let registered = bo.sender.call(Login(register("bo", "pw"))).await.unwrap();
        assert_eq!(registered, Ok(()));
        // Logged in to bo, it may rename away and back.
        assert!(matches!(bo.nick("bob").await, ChatMessage::Ack { .. }));
        assert!(matches!(bo.nick("bo").await, ChatMessage::Ack { .. }));
        // A guest logs in mid-session and takes the nickname: the first
        // connection is told, and dropped.
        let (mut other, _) = hello_from(server.addr, None, None).await;
        let wrong = other.sender.call(Login(login("bo", "nope"))).await.unwrap();
        assert_eq!(wrong, Err("wrong nickname or password".to_owned()));
        let right = other.sender.call(Login(login("bo", "pw"))).await.unwrap();
        assert_eq!(right, Ok(()));
        assert!(matches!(
            server.disconnected(bo.addr).await,
            Disconnect::LoggedInElsewhere
        ));
        let mut holder = holder;
        say(&mut other, "still bo").await;
        assert_eq!(heard(&mut holder).await, ("bo".into(), "still bo".into()));
        server.shutdown().await;
    });
}

#[test]
fn logging_in_again_takes_the_nickname_from_the_old_connection() {
    run(LIMIT, async {
        let server = start(config()).await;
        let (mut first, welcome) = hello(server.addr, &register("ana", "pw")).await;
        assert!(is_welcome(&welcome));
        // Reconnecting before the old connection timed out.
        let (mut second, welcome) = hello(server.addr, &login("ana", "pw")).await;
        assert!(is_welcome(&welcome));
        // The old one is told why, then dropped.
        let notice = loop {
            match first.incoming.next().await {
                Some(Ok(ChatMessage::Notice { text })) => break text,
                Some(Ok(_)) => {}
                other => panic!("no notice: {other:?}"),
            }
        };
        assert!(
            notice.contains("logged in on another connection"),
            "{notice}"
        );
        assert!(matches!(
            server.disconnected(first.addr).await,
            Disconnect::LoggedInElsewhere
        ));
        let (mut bo, _) = hello_from(server.addr, None, None).await;
        say(&mut second, "back").await;
        assert_eq!(heard(&mut bo).await, ("ana".into(), "back".into()));
        server.shutdown().await;
    });
}

#[test]
fn require_login_refuses_guests_and_v0_5_clients() {
    run(LIMIT, async {
        let server = start(Config {
            require_login: true,
            join_window: Duration::from_millis(200),
            ..config()
        })
        .await;
        let (mut ana, welcome) = hello(server.addr, &register("ana", "pw")).await;
        assert!(is_welcome(&welcome));

        // A v0.6 guest: a Nak saying why, then closed.
        let (guest, answer) = hello_from(server.addr, None, None).await;
        assert!(nak(&answer).contains("requires a login"), "{answer:?}");
        closed(guest).await;
        // A v0.5 client: its nickname request gets the same reason, then it
        // is closed, with that reason in the log.
        let v05 = connect(server.addr).await;
        let addr = v05.addr;
        assert!(nak(&v05.nick("bo").await).contains("requires a login"));
        closed(v05).await;
        assert!(matches!(
            server.disconnected(addr).await,
            Disconnect::LoginRequired
        ));
        // A v0.5 client that only chats: closed, its chat not in the room.
        let v05 = connect(server.addr).await;
        let addr = v05.addr;
        v05.say("let me in").await;
        closed(v05).await;
        assert!(matches!(
            server.disconnected(addr).await,
            Disconnect::LoginRequired
        ));
        // One that says nothing is closed at the end of the join window.
        let silent = connect(server.addr).await;
        let addr = silent.addr;
        closed(silent).await;
        assert!(matches!(
            server.disconnected(addr).await,
            Disconnect::LoginRequired
        ));
        // Ana heard none of them, and still chats.
        let (mut bo, welcome) = hello(server.addr, &register("bo", "pw")).await;
        assert!(is_welcome(&welcome));
        say(&mut bo, "hi ana").await;
        assert_eq!(heard(&mut ana).await, ("bo".into(), "hi ana".into()));
        server.shutdown().await;
    });
}

#[test]
fn a_server_without_accounts_refuses_credentials() {
    run(LIMIT, async {
        let server = start(Config {
            accounts: None,
            ..config()
        })
        .await;
        let (c, answer) = hello(server.addr, &register("ana", "pw")).await;
        assert_eq!(nak(&answer), "this server keeps no accounts");
        closed(c).await;
        let (guest, welcome) = hello_from(server.addr, None, None).await;
        let ChatMessage::Welcome { capabilities, .. } = welcome else {
            panic!("{welcome:?}")
        };
        assert!(!capabilities.iter().any(|c| c == "account"));
        let answer = guest
            .sender
            .call(Login(register("ana", "pw")))
            .await
            .unwrap();
        assert!(answer.unwrap_err().contains("account"));
        server.shutdown().await;
    });
}

#[test]
fn accounts_survive_a_restart() {
    let dir = std::env::temp_dir().join(format!("chatpipe-accounts-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("chat.db");
    run(LIMIT, async {
        let with_file = || Config {
            accounts: Some(Arc::new(Accounts::open(&db).unwrap())),
            ..config()
        };
        let server = start(with_file()).await;
        let (ana, welcome) = hello(server.addr, &register("ana", "pw")).await;
        assert!(is_welcome(&welcome));
        ana.close().await;
        server.shutdown().await;

        let server = start(with_file()).await;
        let guest = connect(server.addr).await;
        assert!(nak(&guest.nick("ana").await).contains("registered"));
        let (_ana, welcome) = hello(server.addr, &login("ana", "pw")).await;
        assert!(is_welcome(&welcome), "{welcome:?}");
        server.shutdown().await;
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// The built chat_server, taking passwords over plaintext (loopback).
fn server_program() -> (chat_support::Program, String) {
    let server = chat_support::run_example(
        "chat_server",
        &["--listen", "127.0.0.1:0", "--allow-plaintext-credentials"],
    );
    let first = server.line();
    let addr = first.strip_prefix("listening on ").unwrap().to_owned();
    (server, addr)
}

/// A file holding `password`, removed when dropped.
struct PasswordFile(std::path::PathBuf);

impl PasswordFile {
    fn new(name: &str, password: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("chatpipe-password-{name}-{}", std::process::id()));
        std::fs::write(&path, format!("{password}\n")).unwrap();
        PasswordFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for PasswordFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn chat_client_registers_and_logs_in_with_a_password_file() {
    let (_server, addr) = server_program();
    let right = PasswordFile::new("right", "correct horse");
    let wrong = PasswordFile::new("wrong", "battery staple");
    let client = |extra: &[&str]| {
        let mut args = vec!["--connect", &addr, "--line"];
        args.extend_from_slice(extra);
        chat_support::run_example("chat_client", &args)
    };
    let plain = "--allow-plaintext-credentials";

    let mut ana = client(&[
        "--nick",
        "ana",
        "--password-file",
        right.path(),
        "--register",
        plain,
    ]);
    assert_eq!(ana.line(), "* registered ana");
    // Someone else asking for it is refused, saying why.
    let mut other = client(&["--v06", "--nick", "ana"]);
    assert_eq!(
        other.line(),
        "! nickname refused: nickname \"ana\" is registered: log in to use it"
    );
    // Ana's lines come from ana.
    ana.type_line("it is me");
    assert_eq!(other.line(), "ana: it is me");
    ana.close_stdin();
    assert!(ana.wait().success());

    // A wrong password: exit 1, saying so.
    let mut bad = client(&["--nick", "ana", "--password-file", wrong.path(), plain]);
    bad.stderr_line("wrong nickname or password");
    assert_eq!(bad.wait().code(), Some(1));
    // No password over plaintext without the flag: nothing is sent.
    let mut careful = client(&["--nick", "ana", "--password-file", right.path()]);
    careful.stderr_line("not encrypted");
    assert_eq!(careful.wait().code(), Some(1));
    // The right one.
    let mut ana = client(&["--nick", "ana", "--password-file", right.path(), plain]);
    assert_eq!(ana.line(), "* logged in as ana");
    ana.type_line("back");
    // After `* ana left` and `* ana joined`.
    let said = (0..3)
        .map(|_| other.line())
        .find(|l| !l.starts_with("* ana "));
    assert_eq!(said.as_deref(), Some("ana: back"));
    ana.close_stdin();
    assert!(ana.wait().success());
    other.close_stdin();
    assert!(other.wait().success());
}

#[test]
fn chat_client_register_and_login_commands_read_the_password_next() {
    let (_server, addr) = server_program();
    let client = |extra: &[&str]| {
        let mut args = vec!["--connect", &addr, "--line", "--v06"];
        args.extend_from_slice(extra);
        chat_support::run_example("chat_client", &args)
    };
    let mut bo = client(&["--allow-plaintext-credentials"]);
    bo.type_line("/register");
    bo.stderr_line("/register: take a nickname first");
    bo.type_line("/nick bo");
    assert_eq!(bo.line(), "* you are now bo");
    // stdin is not a terminal: the next line is the password.
    bo.type_line("/register");
    bo.type_line("pw of bo");
    assert_eq!(bo.line(), "* registered bo");
    bo.close_stdin();
    assert!(bo.wait().success());

    let mut again = client(&["--allow-plaintext-credentials"]);
    again.type_line("/login bo");
    again.type_line("not it");
    assert_eq!(again.line(), "! /login: wrong nickname or password");
    again.type_line("/login bo");
    again.type_line("pw of bo");
    assert_eq!(again.line(), "* logged in as bo");
    // Without the flag, the password is not even asked for.
    let mut careful = client(&[]);
    careful.type_line("/login bo");
    careful.stderr_line("not encrypted");
    careful.type_line("/who");
    assert!(careful.line().starts_with("* in the room (2): "));
    for mut c in [again, careful] {
        c.close_stdin();
        assert!(c.wait().success());
    }
}

#[test]
fn protocol_md_words_the_refusals_as_the_room_does() {
    use chatpipe_chat::accounts::AccountError;
    use chatpipe_chat::{HelloRefusal, NicknameRefusal};
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md")).unwrap();
    // docs/PROTOCOL.md writes the variable parts as NICK and N.
    let nick = || "NICK".to_owned();
    let refusals = [
        LoginRefusal::Account(AccountError::WrongPassword).to_string(),
        LoginRefusal::Plaintext.to_string(),
        LoginRefusal::NoAccounts.to_string(),
        LoginRefusal::Account(AccountError::Taken { nickname: nick() }).to_string(),
        LoginRefusal::InUse { nickname: nick() }.to_string(),
        NicknameRefusal::Registered { nickname: nick() }.to_string(),
        HelloRefusal::LoginRequired.to_string(),
        NicknameRefusal::LoginRequired.to_string(),
        LoginRefusal::RateLimited {
            retry_in: Duration::from_secs(7),
        }
        .to_string()
        .replace('7', "N"),
    ];
    for refusal in refusals {
        assert!(
            doc.contains(&format!("`{refusal}`")),
            "not in PROTOCOL.md: {refusal}"
        );
    }
}
