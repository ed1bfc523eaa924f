//! Line mode: stdin in, stdout out, one line per message, for scripts,
//! pipes and tests. Without `--v06` it is the v0.5 client as it always
//! was, byte for byte on the wire and line for line on stdout.
//!
//! Each command is carried out before the next line is read: a line is
//! sent (over v0.6, acked) before the next one goes.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chatpipe::chat::{capability, Chat, ChatMessage, Credentials, Login, Nickname};
use chatpipe::{Error, Incoming, Sender};
use chatpipe_chat::client::{
    line_for, members_line, negotiate_as, one_line, Command, Direct, NegotiateError, Say, Who,
    DEFAULT_WAIT, WANTED,
};
use futures::StreamExt;
use smol::io::{AsyncBufReadExt, BufReader};

use crate::{describe, may_send_password, prompt_password, Args, Connection};

pub async fn run(args: Args, conn: Connection, credentials: Option<Credentials>) -> ExitCode {
    let Connection {
        sender,
        mut incoming,
        driver,
        secure,
    } = conn;
    let mut negotiated = None;
    // The nickname held, for /register.
    let mut nickname = None;
    if args.v06 || credentials.is_some() {
        let hello = negotiate_as(
            &sender,
            &mut incoming,
            WANTED,
            credentials.as_ref(),
            DEFAULT_WAIT,
        );
        match hello.await {
            Ok(mut n) => {
                eprintln!("{}", describe(&n));
                if let Some(c) = &credentials {
                    let done = match c {
                        Credentials::Register { .. } => "registered",
                        Credentials::Login { .. } => "logged in as",
                    };
                    println!("* {done} {}", one_line(c.nickname()));
                    nickname = Some(c.nickname().to_owned());
                }
                if let Some(first) = n.take_arrived() {
                    print_message(&first);
                }
                negotiated = Some(n);
            }
            Err(NegotiateError::Connection(e)) => lost(&e),
            Err(e) => {
                eprintln!("{e}{}", crate::tls_hint_for(&e));
                return ExitCode::FAILURE;
            }
        }
    }
    let grants = |cap: &str| negotiated.as_ref().is_some_and(|n| n.grants(cap));
    let quitting = Arc::new(AtomicBool::new(false));
    // Printing runs on its own task, so nothing waits on stdin to show
    // what arrives.
    let printer = smol::spawn(print_incoming(incoming, quitting.clone()));

    match args.nick {
        // Logged in: the account's nickname is ours already.
        Some(_) if credentials.is_some() => {}
        Some(nick) if set_nickname(&sender, nick.clone()).await => nickname = Some(nick),
        _ => {}
    }
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
        let text = text.trim_end_matches(['\n', '\r']);
        match Command::parse(text) {
            Command::Quit => break,
            Command::Empty => {}
            Command::Usage(usage) => eprintln!("{usage}"),
            Command::Nick(nick) => {
                if set_nickname(&sender, nick.to_owned()).await {
                    nickname = Some(nick.to_owned());
                }
            }
            Command::Register | Command::Login(_) if !grants(capability::ACCOUNT) => {
                eprintln!("! accounts need a v0.6 server that grants `account` (--v06)");
            }
            Command::Register if nickname.is_none() => {
                eprintln!("! /register: take a nickname first (/nick NAME)");
            }
            command @ (Command::Register | Command::Login(_)) => {
                let (what, nick) = match command {
                    Command::Login(nick) => ("/login", nick.to_owned()),
                    _ => ("/register", nickname.clone().unwrap_or_default()),
                };
                if let Err(e) = may_send_password(args.allow_plaintext_credentials, secure) {
                    eprintln!("! {what}: {e}");
                    continue;
                }
                let password = match prompt_password(&format!("password for {nick}: ")) {
                    Some(Ok(p)) => p,
                    Some(Err(e)) => {
                        eprintln!("! {what}: cannot read the password: {e}");
                        continue;
                    }
                    None => {
                        // Not a terminal: the next line is the password.
                        let mut line = Vec::new();
                        if stdin.read_until(b'\n', &mut line).await.is_err() {
                            break;
                        }
                        let line = String::from_utf8_lossy(&line);
                        line.trim_end_matches(['\n', '\r']).to_owned()
                    }
                };
                let (nickname_, password_) = (nick.clone(), password);
                let credentials = match command {
                    Command::Login(_) => Credentials::Login {
                        nickname: nickname_,
                        password: password_,
                    },
                    _ => Credentials::Register {
                        nickname: nickname_,
                        password: password_,
                    },
                };
                if let Err(e) = credentials.validate() {
                    eprintln!("! {what}: {e}");
                    continue;
                }
                match sender.call(Login(credentials)).await {
                    Ok(Ok(())) if what == "/login" => {
                        println!("* logged in as {}", one_line(&nick));
                        nickname = Some(nick);
                    }
                    Ok(Ok(())) => println!("* registered {}", one_line(&nick)),
                    Ok(Err(reason)) => println!("! {what}: {}", one_line(&reason)),
                    Err(e) if !e.is_fatal() => eprintln!("! {what} failed: {e}"),
                    Err(e) => lost(&e),
                }
            }
            Command::Say(text) if grants(capability::ACK) => {
                match sender.call(Say(text.into())).await {
                    Ok(Ok(())) => {}
                    Ok(Err(reason)) => println!("! not delivered: {}", one_line(&reason)),
                    Err(e) if !e.is_fatal() => eprintln!("! not sent: {e}"),
                    Err(e) => lost(&e),
                }
            }
            Command::Say(text) => {
                let msg = ChatMessage::Chat { text: text.into() };
                match sender.send(msg).await {
                    Ok(()) => {}
                    Err(e) if !e.is_fatal() => eprintln!("! not sent: {}", e.error),
                    Err(e) => lost(&e.error),
                }
            }
            Command::Msg { to, text } if grants(capability::DIRECT) => {
                let direct = Direct {
                    to: to.into(),
                    text: text.into(),
                };
                match sender.call(direct).await {
                    Ok(Ok(())) => {}
                    Ok(Err(reason)) => println!("! /msg {}: {}", one_line(to), one_line(&reason)),
                    Err(e) if !e.is_fatal() => eprintln!("! /msg {to} failed: {e}"),
                    Err(e) => lost(&e),
                }
            }
            Command::Who if grants(capability::PRESENCE) => match sender.call(Who).await {
                Ok(Ok((total, names))) => println!("{}", members_line(total, &names)),
                Ok(Err(reason)) => println!("! /who: {}", one_line(&reason)),
                Err(e) if !e.is_fatal() => eprintln!("! /who failed: {e}"),
                Err(e) => lost(&e),
            },
            Command::Msg { .. } => eprintln!("! /msg needs a v0.6 server that grants `direct`"),
            Command::Who => eprintln!("! /who needs a v0.6 server that grants `presence`"),
        }
    }

    // Everything queued is written before the connection closes.
    quitting.store(true, Ordering::SeqCst);
    sender.close();
    let closed = driver.await;
    printer.await;
    match closed {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("connection failed while closing: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_message(msg: &ChatMessage) {
    if let Some(line) = line_for(msg) {
        println!("{line}");
    }
}

/// Prints every message from the server as one line; when the connection
/// ends without our asking, says so and exits.
async fn print_incoming(mut incoming: Incoming<Chat>, quitting: Arc<AtomicBool>) {
    let end = loop {
        match incoming.next().await {
            Some(Ok(msg)) => print_message(&msg),
            Some(Err(e)) => break e,
            None => break Error::Closed,
        }
    };
    if !quitting.load(Ordering::SeqCst) {
        lost(&end);
    }
}

/// Asks for `nick`; true if the server granted it.
async fn set_nickname(sender: &Sender<Chat>, nick: String) -> bool {
    match sender.call(Nickname(nick.clone())).await {
        Ok(Ok(())) => {
            println!("* you are now {}", one_line(&nick));
            return true;
        }
        Ok(Err(reason)) => println!("! nickname refused: {}", one_line(&reason)),
        Err(e) if !e.is_fatal() => eprintln!("! /nick {nick} failed: {e}"),
        Err(e) => lost(&e),
    }
    false
}

fn lost(e: &Error) -> ! {
    match e {
        Error::Closed => eprintln!("connection closed by the server"),
        e => eprintln!("connection lost: {e}{}", crate::tls_hint(e)),
    }
    std::process::exit(1)
}
