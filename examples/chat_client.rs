//! A chat client: lines typed go to the room, what others say is printed.
//!
//! ```text
//! cargo run --example chat_client -- [--connect ADDR] [--nick NAME] [--keepalive SECS]
//! ```
//!
//! It speaks the chat protocol of `docs/PROTOCOL.md`, to `chat_server` or
//! any other TcpChat v0.5 server.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chatpipe::chat::{Chat, ChatMessage, Nickname};
use chatpipe::{Builder, Error, Incoming, Sender};
use clap::Parser;
use futures::StreamExt;
use smol::io::{AsyncBufReadExt, BufReader};
use smol::net::TcpStream;

/// A chat client for the TcpChat v0.5 protocol (see docs/PROTOCOL.md).
///
/// Each line of stdin is sent to the room (empty lines are skipped), except
/// for two commands: `/nick NAME` asks for a nickname, and `/quit` (or the
/// end of stdin) sends what is queued, closes the connection and exits 0.
/// What others say is printed as `FROM: TEXT` as soon as it arrives. A lost
/// connection is reported on stderr and exits 1.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The server's address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:33333")]
    connect: String,
    /// Ask for this nickname right after connecting.
    #[arg(long, value_name = "NAME")]
    nick: Option<String>,
    /// Send a keepalive after this many seconds without sending anything.
    /// The server drops clients silent for three of its own intervals
    /// (15 s for chat_server), so keep this well below that.
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_secs)]
    keepalive: Duration,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(secs) if secs > 0.0 && secs <= 86_400.0 => Ok(Duration::from_secs_f64(secs)),
        _ => Err("expected a number of seconds, more than 0 and at most 86400".into()),
    }
}

/// The keepalive interval of a v0.5 server (ours and others), which we cannot know
/// better: the idle timeout allows for three of the slower of the two.
const SERVER_KEEPALIVE: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let args = Args::parse();
    smol::block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let stream = match TcpStream::connect(&args.connect).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot connect to {}: {e}", args.connect);
            return ExitCode::FAILURE;
        }
    };
    let _ = stream.set_nodelay(true);
    eprintln!("connected to {}", args.connect);
    let (sender, incoming, conn) = Builder::new()
        .keepalive_interval(Some(args.keepalive))
        .idle_timeout(Some(3 * args.keepalive.max(SERVER_KEEPALIVE)))
        .build(stream, Chat);
    let driver = smol::spawn(conn);
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
        if text == "/quit" {
            break;
        } else if text == "/nick" || text.starts_with("/nick ") {
            match text["/nick".len()..].trim() {
                "" => eprintln!("usage: /nick NAME"),
                nick => set_nickname(&sender, nick.to_owned()).await,
            }
        } else if !text.is_empty() {
            let msg = ChatMessage::Chat { text: text.into() };
            match sender.send(msg).await {
                Ok(()) => {}
                Err(e) if !e.is_fatal() => eprintln!("! not sent: {}", e.error),
                Err(e) => lost(&e.error),
            }
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

/// Prints every broadcast as one line; when the connection ends without
/// our asking, says so and exits.
async fn print_incoming(mut incoming: Incoming<Chat>, quitting: Arc<AtomicBool>) {
    let end = loop {
        match incoming.next().await {
            Some(Ok(ChatMessage::Broadcast { from, text })) => {
                println!("{}: {}", one_line(&from), one_line(&text));
            }
            // Client-to-server messages: nothing to show.
            Some(Ok(_)) => {}
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
        e => eprintln!("connection lost: {e}"),
    }
    std::process::exit(1)
}

/// Keeps a peer's text on one line: control characters are escaped.
fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}
