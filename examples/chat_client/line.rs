//! Line mode: stdin in, stdout out, one line per message, for scripts,
//! pipes and tests. Without `--v06` it is the v0.5 client as it always
//! was, byte for byte on the wire and line for line on stdout.
//!
//! Each command is carried out before the next line is taken: a line is
//! sent (over v0.6, acked) before the next one goes. While the server is
//! away, lines wait for the reconnect (a v0.5 chat in the session's
//! buffer, a v0.6 one as a request) and go out once it is back, in order;
//! `/quit` and the end of stdin are heard all the same.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chatpipe::chat::{capability, Chat, ChatMessage, Credentials, Login, Nickname};
use chatpipe::{Error, Session, SessionIncoming, SessionSendError};
use chatpipe_chat::client::{line_for, members_line, one_line, Command, Direct, Say, Shown, Who};
use futures::StreamExt;
use smol::channel;
use smol::future::FutureExt;
use smol::io::{AsyncBufReadExt, BufReader};

use crate::connect::{change, Change, Client, Me, Note};
use crate::{describe, may_send_password, prompt_password, Args};

pub async fn run(args: Args, client: Client) -> ExitCode {
    let Client {
        session,
        incoming,
        driver,
        notes,
        me,
        secure,
        connected_to,
    } = client;
    let quitting = Arc::new(AtomicBool::new(false));
    // Reports connections, losses and the setup step's news; says when the
    // first connection is ready.
    let (ready, first) = channel::bounded(1);
    let reporter = smol::spawn(report(
        session.clone(),
        notes,
        me.clone(),
        !args.no_reconnect,
        connected_to,
        ready,
        quitting.clone(),
    ));
    // Printing runs on its own task, so nothing waits on stdin to show
    // what arrives.
    let printer = smol::spawn(print_incoming(incoming));
    if first.recv().await.is_err() {
        // The reporter ended first: it said why, and exits.
        reporter.await;
        return ExitCode::FAILURE;
    }
    // The nickname, unless the login took it (the session claims it again
    // after a reconnect).
    if let Some(nick) = args.nick.as_deref().filter(|_| !me.has_credentials()) {
        match session.call(Nickname(nick.to_owned())).await {
            Ok(answer) => {
                if nick_answer(nick, answer) {
                    me.set_nick(nick);
                }
            }
            Err(e) => eprintln!("! /nick {nick} failed: {e}"),
        }
    }
    let (lines, quit) = read_stdin();
    // Lines not sent because the user quit while one waited for the server.
    let mut unsent = 0;

    while let Ok(line) = lines.recv().await {
        let ask = Ask {
            session: &session,
            quit: &quit,
        };
        match Command::parse(&line) {
            Command::Quit => break,
            Command::Empty => {}
            Command::Usage(usage) => eprintln!("{usage}"),
            Command::Nick(nick) => {
                if let Some(Ok(answer)) = ask.call(Nickname(nick.to_owned())).await {
                    if nick_answer(nick, answer) {
                        me.set_nick(nick);
                    }
                }
            }
            Command::Register | Command::Login(_) if !me.grants(capability::ACCOUNT) => {
                eprintln!("! accounts need a v0.6 server that grants `account` (--v06)");
            }
            Command::Register if me.nick().is_none() => {
                eprintln!("! /register: take a nickname first (/nick NAME)");
            }
            command @ (Command::Register | Command::Login(_)) => {
                let (what, nickname) = match command {
                    Command::Login(nick) => ("/login", nick.to_owned()),
                    _ => ("/register", me.nick().unwrap_or_default()),
                };
                if let Err(e) = may_send_password(args.allow_plaintext_credentials, secure) {
                    eprintln!("! {what}: {e}");
                    continue;
                }
                let password = match prompt_password(&format!("password for {nickname}: ")) {
                    Some(Ok(p)) => p,
                    Some(Err(e)) => {
                        eprintln!("! {what}: cannot read the password: {e}");
                        continue;
                    }
                    // Not a terminal: the next line is the password.
                    None => match lines.recv().await {
                        Ok(line) => line,
                        Err(_) => break,
                    },
                };
                let credentials = match command {
                    Command::Login(_) => Credentials::Login { nickname, password },
                    _ => Credentials::Register { nickname, password },
                };
                if let Err(e) = credentials.validate() {
                    eprintln!("! {what}: {e}");
                    continue;
                }
                match ask.call(Login(credentials.clone())).await {
                    Some(Ok(Ok(()))) => {
                        let nick = one_line(credentials.nickname());
                        match credentials {
                            Credentials::Login { .. } => println!("* logged in as {nick}"),
                            Credentials::Register { .. } => println!("* registered {nick}"),
                        }
                        // Logged in again after a reconnect.
                        me.logged_in(&credentials);
                    }
                    Some(Ok(Err(reason))) => println!("! {what}: {}", one_line(&reason)),
                    Some(Err(e)) => eprintln!("! {what} failed: {e}"),
                    None => {
                        unsent = 1;
                        break;
                    }
                }
            }
            Command::Say(text) if me.grants(capability::ACK) => {
                match ask.call(Say(text.into())).await {
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(reason))) => println!("! not delivered: {}", one_line(&reason)),
                    // Lost with the connection it went out on: said, not
                    // resent (at most once).
                    Some(Err(e)) => eprintln!("! not delivered: {e}"),
                    None => {
                        unsent = 1;
                        break;
                    }
                }
            }
            Command::Say(text) => {
                let msg = ChatMessage::Chat { text: text.into() };
                match session.send(msg).await {
                    Ok(()) => {}
                    Err(SessionSendError::Full(_)) => {
                        eprintln!("! not sent: the server is away and the buffer is full");
                    }
                    Err(e) => eprintln!("! not sent: {e}"),
                }
            }
            Command::Msg { to, text } if me.grants(capability::DIRECT) => {
                let direct = Direct {
                    to: to.into(),
                    text: text.into(),
                };
                match ask.call(direct).await {
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(reason))) => {
                        println!("! /msg {}: {}", one_line(to), one_line(&reason))
                    }
                    Some(Err(e)) => eprintln!("! /msg {to} failed: {e}"),
                    None => {
                        unsent = 1;
                        break;
                    }
                }
            }
            Command::Who if me.grants(capability::PRESENCE) => match ask.call(Who).await {
                Some(Ok(Ok((total, names)))) => println!("{}", members_line(total, &names)),
                Some(Ok(Err(reason))) => println!("! /who: {}", one_line(&reason)),
                Some(Err(e)) => eprintln!("! /who failed: {e}"),
                None => {
                    unsent = 1;
                    break;
                }
            },
            Command::Msg { .. } => eprintln!("! /msg needs a v0.6 server that grants `direct`"),
            Command::Who => eprintln!("! /who needs a v0.6 server that grants `presence`"),
        }
    }

    // Everything accepted is written before the connection closes; what
    // waited for a server that is away is said, not dropped silently.
    quitting.store(true, Ordering::SeqCst);
    session.disconnect();
    if unsent > 0 {
        // Typed after the one that waited, before the end.
        unsent += std::iter::from_fn(|| lines.try_recv().ok())
            .filter(|l| l != "/quit")
            .count();
    }
    unsent += session.take_buffered().len();
    if unsent > 0 {
        eprintln!("! {unsent} line(s) not sent: the server was away");
    }
    drop(session);
    driver.await;
    printer.await;
    reporter.await;
    ExitCode::SUCCESS
}

/// Requests that give way to `/quit` or the end of stdin: `None` then.
struct Ask<'a> {
    session: &'a Session<Chat>,
    quit: &'a channel::Receiver<()>,
}

impl Ask<'_> {
    async fn call<C: chatpipe::Call<Chat>>(&self, call: C) -> Option<Result<C::Output, Error>> {
        let answer = async { Some(self.session.call(call).await) };
        let quit = async {
            let _ = self.quit.recv().await;
            None
        };
        answer.or(quit).await
    }
}

/// Prints the answer to a nickname request; true if granted.
fn nick_answer(nick: &str, answer: Result<(), String>) -> bool {
    match answer {
        Ok(()) => {
            println!("* you are now {}", one_line(nick));
            true
        }
        Err(reason) => {
            println!("! nickname refused: {}", one_line(&reason));
            false
        }
    }
}

/// Stdin's lines, read on their own task so that `/quit` and the end of
/// input are heard while a line waits for the server; the second channel
/// closes when either comes.
fn read_stdin() -> (channel::Receiver<String>, channel::Receiver<()>) {
    let (lines_tx, lines) = channel::bounded(64);
    let (quit_tx, quit) = channel::bounded::<()>(1);
    smol::spawn(async move {
        let mut stdin = BufReader::new(smol::Unblock::new(std::io::stdin()));
        let mut line = Vec::new();
        loop {
            line.clear();
            match stdin.read_until(b'\n', &mut line).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    eprintln!("cannot read stdin: {e}");
                    break;
                }
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\n', '\r']).to_owned();
            let quit = text == "/quit";
            if lines_tx.send(text).await.is_err() || quit {
                break;
            }
        }
        drop(quit_tx);
    })
    .detach();
    (lines, quit)
}

/// Prints every message from the server as one line, over every
/// connection, until the session ends.
async fn print_incoming(mut incoming: SessionIncoming<Chat>) {
    // The history a reconnect brings again is shown once.
    let mut shown = Shown::default();
    while let Some(msg) = incoming.next().await {
        if !shown.fresh(&msg) {
            continue;
        }
        if let Some(line) = line_for(&msg) {
            println!("{line}");
        }
    }
}

/// Reports what the session goes through on stderr (and the setup step's
/// news on stdout, as ever): `ready` once the first connection is up; on
/// the end (see [`Change::Fatal`]), says why and exits 1.
async fn report(
    session: Session<Chat>,
    notes: channel::Receiver<Note>,
    me: Arc<Me>,
    reconnect: bool,
    connected_to: String,
    ready: channel::Sender<()>,
    quitting: Arc<AtomicBool>,
) {
    let mut states = session.states();
    // Only the states: holding the session would keep it alive.
    drop(session);
    while let Some(state) = states.next().await {
        // What the setup step said comes before the state it led to.
        while let Ok(note) = notes.try_recv() {
            print_note(note);
        }
        match change(&state, &me, reconnect) {
            Change::Connected { again: false } => {
                eprintln!("{connected_to}");
                let _ = ready.try_send(());
            }
            Change::Connected { again: true } => eprintln!("* reconnected"),
            Change::Lost {
                reason,
                retry_in,
                undelivered,
            } => {
                if undelivered > 0 {
                    eprintln!("! {undelivered} message(s) lost with the connection");
                }
                eprintln!(
                    "* {reason}; reconnecting in {:.1} s",
                    retry_in.as_secs_f64()
                );
            }
            Change::Fatal(_) if quitting.load(Ordering::SeqCst) => {}
            Change::Fatal(why) => {
                eprintln!("{why}");
                std::process::exit(1);
            }
            Change::Quiet => {}
        }
    }
}

fn print_note(note: Note) {
    match note {
        Note::Negotiated(n) => eprintln!("{}", describe(&n)),
        Note::LoggedIn {
            nick,
            registered: true,
        } => println!("* registered {}", one_line(&nick)),
        Note::LoggedIn { nick, .. } => println!("* logged in as {}", one_line(&nick)),
        // Claimed again after a reconnect: news only if refused.
        Note::Nick { answer: Ok(()), .. } => {}
        Note::Nick { nick, answer } => {
            nick_answer(&nick, answer);
        }
    }
}
