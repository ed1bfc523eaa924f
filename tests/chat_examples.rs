//! The built `chat_server` and `chat_client` examples, driven by their
//! command-line contract (flags, stdout lines, exit status) over loopback.
//!
//! A plain `cargo test` builds the examples before running any test;
//! `cargo test --test chat_examples` alone does not, so run
//! `cargo build --examples` first in that case.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use chatpipe::chat::{Chat, ChatMessage};
use chatpipe::Protocol;

mod chat_support;
use chat_support::{example, run_example as start, server, Program, TIMEOUT};

#[test]
fn both_programs_have_help() {
    let out = Command::new(example("chat_server"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("--listen <ADDR>"), "{help}");
    assert!(help.contains("127.0.0.1:33333"), "{help}");

    let out = Command::new(example("chat_client"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in ["--connect <ADDR>", "--nick <NAME>", "--keepalive <SECS>"] {
        assert!(help.contains(flag), "{help}");
    }
}

#[test]
fn server_prints_the_bound_address_first() {
    let (_server, addr) = server();
    let (ip, port) = addr.rsplit_once(':').unwrap();
    assert_eq!(ip, "127.0.0.1");
    assert_ne!(port.parse::<u16>().unwrap(), 0, "the port actually bound");
    TcpStream::connect(&addr).expect("it listens there");
}

#[test]
fn server_refuses_an_address_it_cannot_bind() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut server = start("chat_server", &["--listen", &addr]);
    assert!(!server.wait().success());
    server.stderr_line("cannot listen");
}

#[test]
fn clients_chat_through_the_server() {
    let (mut server, addr) = server();
    let mut ana = start("chat_client", &["--connect", &addr, "--nick", "ana"]);
    assert_eq!(ana.line(), "* you are now ana");
    let mut bo = start("chat_client", &["--connect", &addr, "--nick", "ana"]);
    let refused = bo.line();
    assert!(
        refused.starts_with("! nickname refused: ") && refused.contains("taken"),
        "{refused}"
    );
    bo.type_line("/nick bo");
    assert_eq!(bo.line(), "* you are now bo");

    // Ana's stdin is idle: what Bo says is printed at once all the same,
    // and Ana's own line never comes back to her.
    ana.type_line("hello bo");
    assert_eq!(bo.line(), "ana: hello bo");
    bo.type_line("hi ana");
    bo.type_line("");
    bo.type_line("how are you?");
    assert_eq!(ana.line(), "bo: hi ana");
    assert_eq!(ana.line(), "bo: how are you?");

    // The end of stdin and /quit both send what is queued, then close
    // cleanly with status 0.
    ana.type_line("bye");
    ana.close_stdin();
    assert!(ana.wait().success());
    assert_eq!(bo.line(), "ana: bye");
    bo.type_line("/quit");
    assert!(bo.wait().success());
    server.stderr_line("(bo) disconnected: closed cleanly");

    #[cfg(unix)]
    {
        server.signal("-TERM");
        assert!(server.wait().success(), "SIGTERM exits 0");
    }
}

/// Ctrl-C and SIGTERM: stop accepting, close every connection cleanly,
/// exit 0; the client (`--no-reconnect`) sees the server go and exits
/// non-zero.
#[cfg(unix)]
#[test]
fn signals_stop_the_server_cleanly() {
    for sig in ["-INT", "-TERM"] {
        let (mut server, addr) = server();
        let args = ["--connect", &addr, "--nick", "ana", "--no-reconnect"];
        let mut ana = start("chat_client", &args);
        assert_eq!(ana.line(), "* you are now ana");
        server.signal(sig);
        server.stderr_line("closing 1 connection(s)");
        server.stderr_line("(ana) disconnected: closed cleanly");
        assert!(server.wait().success(), "{sig} exits 0");
        assert!(TcpStream::connect(&addr).is_err(), "no longer accepting");
        ana.stderr_line("connection closed by the server");
        assert_eq!(ana.wait().code(), Some(1));
    }
}

/// A scripted server checks the client's bytes on the wire.
#[test]
fn client_speaks_the_protocol() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut client = start(
        "chat_client",
        &[
            "--connect",
            &addr,
            "--nick",
            "ana",
            "--keepalive",
            "0.2",
            "--no-reconnect",
        ],
    );
    let (mut peer, _) = listener.accept().unwrap();
    peer.set_read_timeout(Some(TIMEOUT)).unwrap();

    // With --nick, the request goes out right after connecting.
    let ChatMessage::SetNickname {
        request_id,
        nickname,
    } = read_message(&mut peer)
    else {
        panic!("expected a set-nickname request");
    };
    assert_eq!(nickname, "ana");
    write_message(&mut peer, &ChatMessage::Ack { request_id });
    assert_eq!(client.line(), "* you are now ana");

    // Nothing typed: keepalives at the interval. The one real-time bound
    // in the suite, and a loose one: it only tells that `--keepalive 0.2`
    // took effect (three would take 15 s at the default interval of 5 s).
    let start = Instant::now();
    let keepalive = [0, 0, 0, 4, 0, 0, 0, 2];
    for _ in 0..3 {
        assert_eq!(read_frame(&mut peer), keepalive);
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );

    // A line typed is one Chat; a broadcast is one printed line, control
    // characters escaped.
    client.type_line("Hi");
    let frame = loop {
        let frame = read_frame(&mut peer);
        if frame != keepalive {
            break frame;
        }
    };
    assert_eq!(frame, [0, 0, 0, 8, 0, 0, 0, 0, 0, 2, 0x48, 0x69]);
    let broadcast = ChatMessage::Broadcast {
        from: "bo".into(),
        text: "two\nlines".into(),
    };
    write_message(&mut peer, &broadcast);
    assert_eq!(client.line(), r"bo: two\nlines");

    // The server goes away: with --no-reconnect, a message on stderr and
    // exit status 1.
    drop(peer);
    client.stderr_line("connection closed by the server");
    assert_eq!(client.wait().code(), Some(1));
}

#[test]
fn client_without_a_server_fails() {
    // A port that was free a moment ago.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut client = start("chat_client", &["--connect", &addr]);
    assert!(!client.wait().success());
    client.stderr_line("cannot connect");
}

/// Reads one whole frame, length prefix included.
fn read_frame(s: &mut TcpStream) -> Vec<u8> {
    let mut len = [0; 4];
    s.read_exact(&mut len).unwrap();
    let mut frame = vec![0; 4 + u32::from_be_bytes(len) as usize];
    frame[..4].copy_from_slice(&len);
    s.read_exact(&mut frame[4..]).unwrap();
    frame
}

/// Reads one frame and decodes it, skipping keepalives.
fn read_message(s: &mut TcpStream) -> ChatMessage {
    loop {
        let frame = read_frame(s);
        match Chat.decode(BytesMut::from(&frame[4..]).freeze()).unwrap() {
            Some(ChatMessage::Keepalive) => {}
            Some(msg) => return msg,
            None => panic!("unknown message type"),
        }
    }
}

fn write_message(s: &mut TcpStream, msg: &ChatMessage) {
    let mut payload = BytesMut::new();
    Chat.encode(msg, &mut payload).unwrap();
    let mut frame = BytesMut::new();
    chatpipe::frame::encode(&payload, 1 << 16, &mut frame).unwrap();
    s.write_all(&frame).unwrap();
}

// v0.6 in line mode (`--v06`), against scripted servers: one that speaks
// v0.6, and v0.5 ones that skip the Hello.

use chatpipe::chat::{Limits, PresenceChange, V0_5, V0_6};

#[test]
fn client_help_has_the_v0_6_flags() {
    let out = Command::new(example("chat_client"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for part in [
        "--v05",
        "--v06",
        "--line",
        "[private] FROM: TEXT",
        "after 2 s",
    ] {
        assert!(help.contains(part), "{part}: {help}");
    }
}

/// Starts `chat_client ARGS` against a scripted server, which it returns
/// connected.
fn scripted(args: &[&str]) -> (Program, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let client = start("chat_client", &[&["--connect", &addr][..], args].concat());
    let (peer, _) = listener.accept().unwrap();
    peer.set_read_timeout(Some(TIMEOUT)).unwrap();
    (client, peer)
}

/// Reads the Hello every v0.6 client starts with; returns its id.
fn read_hello(peer: &mut TcpStream) -> chatpipe::chat::RequestId {
    let ChatMessage::Hello {
        request_id,
        versions,
        capabilities,
        credentials,
    } = read_message(peer)
    else {
        panic!("expected a Hello first");
    };
    assert_eq!(versions, [V0_5, V0_6]);
    assert_eq!(
        capabilities,
        ["ack", "direct", "presence", "history", "account"]
    );
    assert_eq!(credentials, "");
    request_id
}

/// Reads until the client closes its side, then closes ours.
fn wait_for_close(mut peer: TcpStream) {
    let mut buf = [0; 256];
    while peer.read(&mut buf).unwrap() > 0 {}
}

#[test]
fn line_client_over_v0_6() {
    let (mut client, mut peer) = scripted(&["--nick", "ana", "--v06"]);
    let request_id = read_hello(&mut peer);
    let welcome = ChatMessage::Welcome {
        request_id,
        version: V0_6,
        capabilities: ["ack", "direct", "presence", "history"]
            .map(Into::into)
            .to_vec(),
        limits: Limits {
            max_frame: 65_813,
            rate_per_1000s: 10_000,
            burst: 20,
            keepalive_ms: 5_000,
        },
    };
    write_message(&mut peer, &welcome);
    let history = ChatMessage::History {
        at_ms: 1_700_000_000_000,
        from: "bo".into(),
        text: "earlier".into(),
    };
    write_message(&mut peer, &history);
    client.stderr_line("speaking v0.6 (granted: ack, direct, presence, history)");
    assert_eq!(client.line(), "[history] bo: earlier");

    // The nickname as in v0.5.
    let ChatMessage::SetNickname { request_id, .. } = read_message(&mut peer) else {
        panic!("expected a set-nickname request");
    };
    write_message(&mut peer, &ChatMessage::Ack { request_id });
    assert_eq!(client.line(), "* you are now ana");

    // A line is a Say: an Ack prints nothing, a Nak says why.
    client.type_line("hello");
    let ChatMessage::Say { request_id, text } = read_message(&mut peer) else {
        panic!("expected a Say");
    };
    assert_eq!(text, "hello");
    write_message(&mut peer, &ChatMessage::Ack { request_id });
    client.type_line("again");
    let ChatMessage::Say { request_id, text } = read_message(&mut peer) else {
        panic!("expected a Say");
    };
    assert_eq!(text, "again");
    let message = "rate limited".to_owned();
    write_message(
        &mut peer,
        &ChatMessage::Nak {
            request_id,
            message,
        },
    );
    assert_eq!(client.line(), "! not delivered: rate limited");

    // /msg is a Direct.
    client.type_line("/msg bo psst");
    let ChatMessage::Direct {
        request_id,
        to,
        text,
    } = read_message(&mut peer)
    else {
        panic!("expected a Direct");
    };
    assert_eq!((to.as_str(), text.as_str()), ("bo", "psst"));
    write_message(&mut peer, &ChatMessage::Ack { request_id });
    client.type_line("/msg zed hi");
    let ChatMessage::Direct { request_id, to, .. } = read_message(&mut peer) else {
        panic!("expected a Direct");
    };
    assert_eq!(to, "zed");
    let message = "nobody is called zed".to_owned();
    write_message(
        &mut peer,
        &ChatMessage::Nak {
            request_id,
            message,
        },
    );
    assert_eq!(client.line(), "! /msg zed: nobody is called zed");

    // /who asks, Members answers.
    client.type_line("/who");
    let ChatMessage::Who { request_id } = read_message(&mut peer) else {
        panic!("expected a Who");
    };
    let members = ChatMessage::Members {
        request_id,
        total: 2,
        names: vec!["ana".into(), "bo".into()],
    };
    write_message(&mut peer, &members);
    assert_eq!(client.line(), "* in the room (2): ana, bo");

    // What the server sends, one line each.
    let presence = |change, nickname: &str, new_nickname: &str| ChatMessage::Presence {
        change,
        nickname: nickname.into(),
        new_nickname: new_nickname.into(),
    };
    let sent = [
        ChatMessage::Private {
            from: "bo".into(),
            text: "psst back".into(),
        },
        presence(PresenceChange::Joined, "cy", ""),
        presence(PresenceChange::Renamed, "cy", "cyd"),
        presence(PresenceChange::Left, "cyd", ""),
        ChatMessage::Notice {
            text: "closing soon".into(),
        },
        ChatMessage::Broadcast {
            from: "bo".into(),
            text: "hi".into(),
        },
    ];
    for msg in &sent {
        write_message(&mut peer, msg);
    }
    for line in [
        "[private] bo: psst back",
        "* cy joined",
        "* cy is now cyd",
        "* cyd left",
        "! server: closing soon",
        "bo: hi",
    ] {
        assert_eq!(client.line(), line);
    }

    // The end of stdin closes cleanly.
    client.close_stdin();
    wait_for_close(peer);
    assert!(client.wait().success());
}

/// A v0.5 server skips the Hello and says nothing: after its wait (2 s)
/// the client speaks v0.5, and a line is a Chat again.
#[test]
fn line_client_falls_back_when_no_welcome_comes() {
    let (mut client, mut peer) = scripted(&["--nick", "ana", "--v06"]);
    read_hello(&mut peer);
    let ChatMessage::SetNickname {
        request_id,
        nickname,
    } = read_message(&mut peer)
    else {
        panic!("expected a set-nickname request after the Hello");
    };
    assert_eq!(nickname, "ana");
    client.stderr_line("no Welcome within 2 s: speaking v0.5");
    write_message(&mut peer, &ChatMessage::Ack { request_id });
    assert_eq!(client.line(), "* you are now ana");
    // Over v0.5 /who and /msg send nothing (a /msg said to the room would
    // not be private); a line is a plain Chat.
    client.type_line("/who");
    client.stderr_line("! /who needs a v0.6 server");
    client.type_line("/msg bo psst");
    client.stderr_line("! /msg needs a v0.6 server");
    client.type_line("Hi");
    assert_eq!(
        read_message(&mut peer),
        ChatMessage::Chat { text: "Hi".into() }
    );
    client.type_line("/quit");
    wait_for_close(peer);
    assert!(client.wait().success());
}

/// A v0.5 server's Broadcast before any Welcome: the client falls back at
/// once, and prints that Broadcast.
#[test]
fn line_client_falls_back_at_a_v0_5_message() {
    let (mut client, mut peer) = scripted(&["--nick", "ana", "--v06"]);
    read_hello(&mut peer);
    let broadcast = ChatMessage::Broadcast {
        from: "bo".into(),
        text: "first".into(),
    };
    write_message(&mut peer, &broadcast);
    assert_eq!(client.line(), "bo: first");
    client.stderr_line("the server speaks v0.5: speaking v0.5");
    let ChatMessage::SetNickname { request_id, .. } = read_message(&mut peer) else {
        panic!("expected a set-nickname request");
    };
    write_message(&mut peer, &ChatMessage::Ack { request_id });
    assert_eq!(client.line(), "* you are now ana");
    client.close_stdin();
    wait_for_close(peer);
    assert!(client.wait().success());
}

/// A Nak to the Hello: the reason on stderr, exit status 1.
#[test]
fn line_client_refused_at_the_hello_exits_1() {
    let (mut client, mut peer) = scripted(&["--v06"]);
    let request_id = read_hello(&mut peer);
    let message = "server full".to_owned();
    write_message(
        &mut peer,
        &ChatMessage::Nak {
            request_id,
            message,
        },
    );
    drop(peer);
    client.stderr_line("refused by the server: server full");
    assert_eq!(client.wait().code(), Some(1));
}

/// `--v05` (and line mode by default): no Hello, the nickname request is
/// the first frame.
#[test]
fn line_client_v05_sends_no_hello() {
    let (mut client, mut peer) = scripted(&["--nick", "ana", "--v05"]);
    let ChatMessage::SetNickname { request_id, .. } = read_message(&mut peer) else {
        panic!("expected a set-nickname request first");
    };
    write_message(&mut peer, &ChatMessage::Ack { request_id });
    assert_eq!(client.line(), "* you are now ana");
    client.close_stdin();
    wait_for_close(peer);
    assert!(client.wait().success());
}
