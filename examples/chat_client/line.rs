//! Line mode: stdin in, stdout out, one line per message, for scripts,
//! pipes and tests. Without `--v06` it is the v0.5 client as it always
//! was, byte for byte on the wire and line for line on stdout.
//!
//! Each command is carried out before the next line is read: a line is
//! sent (over v0.6, acked) before the next one goes.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chatpipe::chat::{capability, Chat, ChatMessage, Nickname};
use chatpipe::{Error, Incoming, Sender};
use chatpipe_chat::client::{
    line_for, members_line, negotiate, one_line, Command, Direct, NegotiateError, Say, Who,
    DEFAULT_WAIT, WANTED,
};
use futures::StreamExt;
use smol::io::{AsyncBufReadExt, BufReader};

use crate::{describe, Args, Connection};

pub async fn run(args: Args, conn: Connection) -> ExitCode {
    let Connection {
        sender,
        mut incoming,
        driver,
    } = conn;
    let mut negotiated = None;
    if args.v06 {
        match negotiate(&sender, &mut incoming, WANTED, DEFAULT_WAIT).await {
            Ok(mut n) => {
                eprintln!("{}", describe(&n));
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

    if let Some(nick) = args.nick {
        set_nickname(&sender, nick).await;
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
            Command::Nick(nick) => set_nickname(&sender, nick.to_owned()).await,
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

async fn set_nickname(sender: &Sender<Chat>, nick: String) {
    match sender.call(Nickname(nick.clone())).await {
        Ok(Ok(())) => println!("* you are now {}", one_line(&nick)),
        Ok(Err(reason)) => println!("! nickname refused: {}", one_line(&reason)),
        Err(e) if !e.is_fatal() => eprintln!("! /nick {nick} failed: {e}"),
        Err(e) => lost(&e),
    }
}

fn lost(e: &Error) -> ! {
    match e {
        Error::Closed => eprintln!("connection closed by the server"),
        e => eprintln!("connection lost: {e}{}", crate::tls_hint(e)),
    }
    std::process::exit(1)
}
