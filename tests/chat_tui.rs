//! chat_client's terminal UI as a person sees it: the built binary runs in
//! a detached tmux session, keys go in with `send-keys`, and the screen
//! comes back with `capture-pane`. Every check polls the screen until it
//! shows what is expected (20 s at most), so no sleep decides anything.
//!
//! Needs tmux (`.ci/run` installs it when missing). Like
//! tests/chat_examples.rs it runs the built examples: a plain `cargo test`
//! builds them, `cargo test --test chat_tui` alone does not.

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use chatpipe::chat::{Chat, ChatMessage, Limits, PresenceChange, V0_6};
use chatpipe::Builder;
use futures::StreamExt;
use smol::net::TcpListener;

mod chat_support;
use chat_support::example;

/// How long a screen may take to show what is expected.
const HANG_GUARD: Duration = Duration::from_secs(20);

/// A tmux server of its own (its own socket) running one program in a
/// 100x30 window; killed when dropped, also when a test fails.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    /// Runs `program args` in a new detached session. When the program
    /// ends, the pane shows `[exited N]` and stays.
    fn start(program: &Path, args: &[&str]) -> Tmux {
        static N: AtomicUsize = AtomicUsize::new(0);
        let socket = std::env::temp_dir().join(format!(
            "chatpipe-tui-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        let mut line = quote(program.to_str().unwrap());
        for arg in args {
            line.push(' ');
            line.push_str(&quote(arg));
        }
        line.push_str("; echo \"[exited $?]\"; sleep 3600");
        let tmux = Tmux { socket };
        let out = tmux.run(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            "chat",
            "-x",
            "100",
            "-y",
            "30",
            &line,
        ]);
        assert!(out.status.success(), "tmux new-session: {out:?}");
        tmux
    }

    fn run(&self, args: &[&str]) -> Output {
        match Command::new("tmux")
            .arg("-u")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "tmux is not installed, and the terminal UI tests need it \
                 (`apt-get install tmux`; .ci/run installs it when missing)"
            ),
            Err(e) => panic!("cannot run tmux: {e}"),
        }
    }

    /// Types `text` as it is, without Enter.
    fn type_text(&self, text: &str) {
        let out = self.run(&["send-keys", "-t", "chat", "-l", text]);
        assert!(out.status.success(), "tmux send-keys: {out:?}");
    }

    /// Presses keys by name (`Enter`, `C-c`, `PageUp`).
    fn press(&self, key: &str) {
        let out = self.run(&["send-keys", "-t", "chat", key]);
        assert!(out.status.success(), "tmux send-keys: {out:?}");
    }

    fn type_line(&self, text: &str) {
        self.type_text(text);
        self.press("Enter");
    }

    /// The screen, as text.
    fn screen(&self) -> String {
        let out = self.run(&["capture-pane", "-p", "-t", "chat"]);
        assert!(out.status.success(), "tmux capture-pane: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Polls the screen until `ok` holds, and returns that screen.
    fn wait_for(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            let screen = self.screen();
            if ok(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "the screen never showed {what}; it shows:\n{screen}"
            );
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// Polls until the screen has a line containing `part`.
    fn wait_for_text(&self, part: &str) -> String {
        self.wait_for(&format!("{part:?}"), |s| s.contains(part))
    }

    /// Polls until the screen shows all of `parts` at once (one frame can
    /// be caught half drawn, so what belongs together is awaited together).
    fn wait_for_all(&self, parts: &[&str]) -> String {
        self.wait_for(&format!("all of {parts:?}"), |s| {
            parts.iter().all(|p| s.contains(p))
        })
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        // Never panics: it may run while a failed test unwinds.
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .stdin(Stdio::null())
            .output();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The status line: the one that shows the server's address.
fn status_line<'s>(screen: &'s str, addr: &str) -> &'s str {
    screen
        .lines()
        .find(|l| l.contains(&format!("│ {addr}")))
        .unwrap_or_else(|| panic!("no status line in:\n{screen}"))
}

/// The input line, without the trailing blanks.
fn input_line(screen: &str) -> Option<&str> {
    screen
        .lines()
        .rfind(|l| l.starts_with('>'))
        .map(str::trim_end)
}

/// The names in the member list (the right-hand pane), top to bottom.
fn members(screen: &str) -> Vec<&str> {
    screen
        .lines()
        .filter_map(|l| l.rsplit("││").next()?.strip_suffix('│'))
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect()
}

/// The message pane's line containing `part`, checking that it starts
/// with an `HH:MM:SS` time.
fn pane_line<'s>(screen: &'s str, part: &str) -> &'s str {
    let line = screen
        .lines()
        .find(|l| l.contains(part))
        .unwrap_or_else(|| panic!("no {part:?} in:\n{screen}"));
    let time: Vec<char> = line.chars().skip(1).take(8).collect();
    let shape = time.iter().enumerate().all(|(i, c)| {
        if i % 3 == 2 {
            *c == ':'
        } else {
            c.is_ascii_digit()
        }
    });
    assert!(shape && time.len() == 8, "no HH:MM:SS time: {line:?}");
    line
}

/// A line-mode chat_client (stdin a pipe).
struct LineClient {
    child: Child,
    stdin: ChildStdin,
    stdout: mpsc::Receiver<String>,
}

impl LineClient {
    fn start(addr: &str, nick: &str) -> LineClient {
        let mut child = Command::new(example("chat_client"))
            .args(["--connect", addr, "--nick", nick])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, stdout) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        LineClient {
            stdin: child.stdin.take().unwrap(),
            child,
            stdout,
        }
    }

    fn line(&self) -> String {
        self.stdout
            .recv_timeout(HANG_GUARD)
            .expect("a line on stdout in time")
    }

    fn type_line(&mut self, line: &str) {
        use std::io::Write;
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }
}

impl Drop for LineClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The room itself (tests/chat_support, in-process), a person in the UI
/// and another client in line mode.
#[test]
fn the_ui_in_the_room() {
    let server = smol::block_on(chat_support::start());
    let addr = server.addr.to_string();
    let mut bo = LineClient::start(&addr, "bo");
    assert_eq!(bo.line(), "* you are now bo");

    let ui = Tmux::start(
        &example("chat_client"),
        &["--connect", &addr, "--nick", "ana"],
    );
    // The room speaks v0.6: the status line shows it with the nickname,
    // and the member list comes from Who.
    let screen = ui.wait_for("v0.6, the nickname, both members", |s| {
        s.contains(" ana │ v0.6 │ ")
            && s.contains("* you are now ana")
            && members(s) == ["ana", "bo"]
    });
    assert!(status_line(&screen, &addr).starts_with(" ana │ v0.6 │ "));
    pane_line(&screen, "* you are now ana");

    // A line is acked by the room (a line-mode v0.5 client gets it as a
    // Broadcast).
    ui.type_line("hello room");
    assert_eq!(bo.line(), "ana: hello room");
    let screen = ui.wait_for_text("ana: hello room ✓");
    pane_line(&screen, "ana: hello room ✓");

    // Someone joins: announced, and in the member list.
    let cy = LineClient::start(&addr, "cy");
    assert_eq!(cy.line(), "* you are now cy");
    ui.wait_for("cy among the members", |s| {
        s.contains("* cy joined") && members(s) == ["ana", "bo", "cy"]
    });
    drop(cy);
    ui.wait_for("cy gone", |s| {
        s.contains("* cy left") && members(s) == ["ana", "bo"]
    });

    // Half a line typed; what arrives meanwhile leaves it alone.
    ui.type_text("half typed");
    ui.wait_for("the half-typed line", |s| {
        input_line(s) == Some("> half typed")
    });
    bo.type_line("hi ana");
    let screen = ui.wait_for_text("bo: hi ana");
    pane_line(&screen, "bo: hi ana");
    // Rows are drawn top to bottom: the input row below is as it stands.
    assert_eq!(input_line(&screen), Some("> half typed"));
    // And it is sent whole.
    ui.type_text(", now sent");
    ui.press("Enter");
    assert_eq!(bo.line(), "ana: half typed, now sent");
    ui.wait_for("the line sent, the input line empty", |s| {
        s.contains("ana: half typed, now sent") && input_line(s) == Some(">")
    });

    // Ctrl-C quits cleanly, with the terminal given back.
    ui.press("C-c");
    let screen = ui.wait_for_text("[exited 0]");
    assert!(!screen.contains("┌ messages"), "the UI is gone:\n{screen}");
}

/// A scripted v0.6 server, driven by the test: what the client sends comes
/// out of `requests`, what the test sends goes to the client.
struct Script {
    addr: String,
    requests: mpsc::Receiver<ChatMessage>,
    replies: smol::channel::Sender<ChatMessage>,
}

impl Script {
    fn start() -> Script {
        let listener = smol::block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (to_test, requests) = mpsc::channel();
        let (replies, to_client) = smol::channel::unbounded::<ChatMessage>();
        smol::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (sender, mut incoming, conn) = Builder::new().build(stream, Chat);
            let driver = smol::spawn(conn);
            let writer = {
                let sender = sender.clone();
                smol::spawn(async move {
                    while let Ok(msg) = to_client.recv().await {
                        if sender.send(msg).await.is_err() {
                            break;
                        }
                    }
                })
            };
            while let Some(Ok(msg)) = incoming.next().await {
                if to_test.send(msg).is_err() {
                    break;
                }
            }
            // The client closed: close too.
            drop(writer);
            sender.close();
            let _ = driver.await;
        })
        .detach();
        Script {
            addr,
            requests,
            replies,
        }
    }

    fn next(&self) -> ChatMessage {
        self.requests
            .recv_timeout(HANG_GUARD)
            .expect("a message from the client in time")
    }

    fn send(&self, msg: ChatMessage) {
        self.replies.send_blocking(msg).unwrap();
    }
}

#[test]
fn the_ui_over_v0_6() {
    let server = Script::start();
    let addr = server.addr.clone();
    let ui = Tmux::start(
        &example("chat_client"),
        &["--connect", &addr, "--nick", "ana"],
    );
    let screen = ui.wait_for_text("connecting…");
    assert!(status_line(&screen, &addr).contains("(no nickname) │ connecting…"));

    // The handshake, the nickname, the member list.
    let ChatMessage::Hello { request_id, .. } = server.next() else {
        panic!("expected a Hello");
    };
    server.send(ChatMessage::Welcome {
        request_id,
        version: V0_6,
        capabilities: ["ack", "direct", "presence", "history"]
            .map(Into::into)
            .to_vec(),
        limits: Limits::default(),
    });
    server.send(ChatMessage::History {
        at_ms: 1_700_000_000_000,
        from: "bo".into(),
        text: "from before".into(),
    });
    let ChatMessage::SetNickname { request_id, .. } = server.next() else {
        panic!("expected a nickname request");
    };
    server.send(ChatMessage::Ack { request_id });
    let ChatMessage::Who { request_id } = server.next() else {
        panic!("expected a Who");
    };
    server.send(ChatMessage::Members {
        request_id,
        total: 2,
        names: vec!["ana".into(), "bo".into()],
    });
    let screen = ui.wait_for("v0.6, the nickname, the member list", |s| {
        s.contains(" ana │ v0.6 │ ")
            && s.contains("[history] bo: from before")
            && s.contains("* you are now ana")
            && members(s) == ["ana", "bo"]
    });
    assert!(status_line(&screen, &addr).contains(" ana │ v0.6 │ "));
    assert!(screen.contains(" members (2) "), "{screen}");
    pane_line(&screen, "[history] bo: from before");
    pane_line(&screen, "* you are now ana");

    // A line is pending until the server acks it.
    ui.type_line("hello");
    let ChatMessage::Say { request_id, text } = server.next() else {
        panic!("expected a Say");
    };
    assert_eq!(text, "hello");
    let screen = ui.wait_for_text("ana: hello …");
    pane_line(&screen, "ana: hello …");
    server.send(ChatMessage::Ack { request_id });
    ui.wait_for_text("ana: hello ✓");
    // Or refused, with the reason.
    ui.type_line("too fast");
    let ChatMessage::Say { request_id, .. } = server.next() else {
        panic!("expected a Say");
    };
    let message = "rate limited".to_owned();
    server.send(ChatMessage::Nak {
        request_id,
        message,
    });
    ui.wait_for_text("ana: too fast ✗ rate limited");

    // Presence updates the member list; /msg is private, both ways.
    server.send(ChatMessage::Presence {
        change: PresenceChange::Joined,
        nickname: "cy".into(),
        new_nickname: String::new(),
    });
    let screen = ui.wait_for("cy among the members", |s| {
        s.contains("* cy joined") && members(s) == ["ana", "bo", "cy"]
    });
    assert!(screen.contains(" members (3) "), "{screen}");
    pane_line(&screen, "* cy joined");
    ui.type_line("/msg cy psst");
    let ChatMessage::Direct { request_id, to, .. } = server.next() else {
        panic!("expected a Direct");
    };
    assert_eq!(to, "cy");
    server.send(ChatMessage::Ack { request_id });
    ui.wait_for_text("[private] ana → cy: psst ✓");
    server.send(ChatMessage::Private {
        from: "cy".into(),
        text: "hi ana".into(),
    });
    ui.wait_for_text("[private] cy: hi ana");

    // Half a line typed; a broadcast and a notice leave it alone.
    ui.type_text("draft");
    ui.wait_for("the draft", |s| input_line(s) == Some("> draft"));
    server.send(ChatMessage::Broadcast {
        from: "bo".into(),
        text: "news".into(),
    });
    server.send(ChatMessage::Notice {
        text: "maintenance at noon".into(),
    });
    let screen = ui.wait_for_all(&["bo: news", "! server: maintenance at noon"]);
    pane_line(&screen, "bo: news");
    pane_line(&screen, "! server: maintenance at noon");
    assert_eq!(input_line(&screen), Some("> draft"));

    // PageUp scrolls back, PageDown returns.
    for i in 0..40 {
        server.send(ChatMessage::Broadcast {
            from: "bo".into(),
            text: format!("line {i}"),
        });
    }
    let screen = ui.wait_for_text("bo: line 39");
    assert!(!screen.contains("ana: hello ✓"), "{screen}");
    ui.press("PageUp");
    let screen = ui.wait_for("the pane scrolled back", |s| {
        s.contains("scrolled back") && !s.contains("bo: line 39")
    });
    assert_eq!(input_line(&screen), Some("> draft"));
    ui.press("PageDown");
    ui.wait_for("the newest line again", |s| {
        s.contains("bo: line 39") && !s.contains("scrolled back")
    });

    // /quit, once the draft is cleared.
    ui.press("C-u");
    ui.type_line("/quit");
    let screen = ui.wait_for_text("[exited 0]");
    assert!(!screen.contains("┌ messages"), "the UI is gone:\n{screen}");
}

/// A v0.5 server (scripted) skips the Hello; its first message, here a
/// Broadcast, turns the UI to v0.5 at once.
#[test]
fn the_ui_falls_back_to_v0_5() {
    let server = Script::start();
    let addr = server.addr.clone();
    let ui = Tmux::start(
        &example("chat_client"),
        &["--connect", &addr, "--nick", "ana"],
    );
    let ChatMessage::Hello { .. } = server.next() else {
        panic!("expected a Hello");
    };
    server.send(ChatMessage::Broadcast {
        from: "bo".into(),
        text: "v0.5 here".into(),
    });
    let ChatMessage::SetNickname { request_id, .. } = server.next() else {
        panic!("expected a nickname request");
    };
    server.send(ChatMessage::Ack { request_id });
    let screen = ui.wait_for("the v0.5 fallback", |s| {
        s.contains(" ana │ v0.5 fallback │ ")
            && s.contains("bo: v0.5 here")
            && s.contains("(needs v0.6)")
    });
    pane_line(&screen, "bo: v0.5 here");

    // A line is a plain Chat, shown without a mark: v0.5 acks nothing.
    ui.type_line("hi");
    assert_eq!(server.next(), ChatMessage::Chat { text: "hi".into() });
    let screen = ui.wait_for_text("ana: hi");
    let line = pane_line(&screen, "ana: hi");
    assert!(!line.contains('…') && !line.contains('✓'), "{line:?}");
    // /who needs v0.6; nothing is sent.
    ui.type_line("/who");
    ui.wait_for_text("! /who needs a v0.6 server");
    ui.press("C-c");
    ui.wait_for_text("[exited 0]");
}

/// /register and /login in the UI: the password is typed into the input
/// line as `*`s and never shown, then the nickname belongs to its account.
#[test]
fn the_ui_registers_and_logs_in_without_showing_the_password() {
    use std::sync::Arc;
    let server = smol::block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = chatpipe_chat::Config {
            accounts: Some(Arc::new(
                chatpipe_chat::accounts::Accounts::in_memory().unwrap(),
            )),
            plaintext_credentials: true,
            ..Default::default()
        };
        chat_support::start_with(listener, config)
    });
    let addr = server.addr.to_string();
    let plain = "--allow-plaintext-credentials";
    let ui = Tmux::start(
        &example("chat_client"),
        &["--connect", &addr, "--nick", "ana", plain],
    );
    ui.wait_for_all(&[" ana │ v0.6 │ ", "* you are now ana"]);
    ui.type_line("/register");
    ui.wait_for_text("type the password");
    ui.type_text("hunter2");
    let screen = ui.wait_for("the masked password", |s| {
        input_line_of(s, "password for ana: ") == Some("password for ana: *******")
    });
    assert!(!screen.contains("hunter2"), "{screen}");
    ui.press("Enter");
    let screen = ui.wait_for_text("* registered ana");
    assert!(!screen.contains("hunter2"), "{screen}");
    ui.press("C-c");
    ui.wait_for_text("[exited 0]");

    // Another client cannot take the name; logging in with Esc first
    // (cancelled), then for real.
    let ui = Tmux::start(&example("chat_client"), &["--connect", &addr, plain]);
    ui.wait_for_text(" │ v0.6 │ ");
    ui.type_line("/nick ana");
    ui.wait_for_text("\"ana\" is registered: log in");
    ui.type_line("/login ana");
    ui.wait_for_text("type the password");
    ui.type_text("oops");
    ui.press("Escape");
    ui.wait_for_all(&["* cancelled"]);
    ui.type_line("/login ana");
    ui.type_text("wrong");
    ui.press("Enter");
    ui.wait_for_text("! /login: wrong nickname or password");
    ui.type_line("/login ana");
    ui.type_text("hunter2");
    ui.press("Enter");
    let screen = ui.wait_for_all(&["* logged in as ana", " ana │ v0.6 │ "]);
    assert!(
        !screen.contains("hunter2") && !screen.contains("oops"),
        "{screen}"
    );
    ui.press("C-c");
    ui.wait_for_text("[exited 0]");
    smol::block_on(server.shutdown());
}

/// The input line when it starts with `label` (a prompt), trimmed.
fn input_line_of<'s>(screen: &'s str, label: &str) -> Option<&'s str> {
    screen
        .lines()
        .rfind(|l| l.starts_with(label))
        .map(str::trim_end)
}

/// The room goes away and comes back on the same address: the status line
/// says `reconnecting…`, a line typed meanwhile waits (`…`), and once the
/// UI is back (`* reconnected`, its nickname claimed again) the line is
/// delivered and acked.
#[test]
fn the_ui_reconnects_after_the_server_restarts() {
    let addr = format!("127.0.0.1:{}", chat_support::restartable_port());
    let listener = smol::block_on(TcpListener::bind(&addr)).unwrap();
    let server = chat_support::start_with(listener, Default::default());
    let ui = Tmux::start(
        &example("chat_client"),
        &["--connect", &addr, "--nick", "ana"],
    );
    ui.wait_for_all(&[" ana │ v0.6 │ ", "* you are now ana"]);
    smol::block_on(server.shutdown());
    ui.wait_for_all(&[" ana │ reconnecting… │ ", "reconnecting in"]);
    ui.type_line("typed while away");
    ui.wait_for_text("ana: typed while away …");

    let listener = smol::block_on(TcpListener::bind(&addr)).unwrap();
    let server = chat_support::start_with(listener, Default::default());
    let mut bo = LineClient::start(&addr, "bo");
    let screen = ui.wait_for_all(&["* reconnected", " ana │ v0.6 │ ", "ana: typed while away ✓"]);
    assert!(members(&screen).contains(&"ana"), "{screen}");
    // Bo joined before or after the line went out; either way it is ana's.
    ui.type_line("hello bo");
    let heard = (0..3)
        .map(|_| bo.line())
        .find(|l| l.starts_with("ana: hello"));
    assert_eq!(heard.as_deref(), Some("ana: hello bo"));
    bo.type_line("/quit");
    ui.press("C-c");
    ui.wait_for_text("[exited 0]");
    smol::block_on(server.shutdown());
}
