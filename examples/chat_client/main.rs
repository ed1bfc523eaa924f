//! A chat client: lines typed go to the room, what others say is shown.
//!
//! ```text
//! cargo run --example chat_client -- [--connect ADDR] [--nick NAME] [--keepalive SECS] [--v05 | --v06] [--line]
//!     [--no-reconnect] [--buffer N]
//!     [--tls | --tls-ca FILE] [--tls-server-name NAME] [--quic]
//! ```
//!
//! It speaks the chat protocol of `docs/PROTOCOL.md`, to `chat_server` or
//! any other TcpChat server, v0.5 or v0.6. Two modes:
//!
//! - **Terminal UI** ([`tui`]), when stdin and stdout are both a terminal:
//!   a scrolling message pane with timestamps, a member list, a status
//!   line (connection state and nickname) and an input line that arriving
//!   messages never disturb. It negotiates v0.6 unless `--v05`.
//! - **Line mode** ([`line`]), otherwise (scripts, tests, pipes) or with
//!   `--line`: one line of stdin is one line said, one line of stdout is
//!   one message; exactly today's v0.5 client unless `--v06`.
//!
//! The protocol logic both modes share (the handshake and its fallback,
//! commands, how messages read) is `chatpipe_chat::client`.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use chatpipe::chat::Credentials;
use chatpipe_chat::client::{Negotiated, DEFAULT_WAIT};
use clap::Parser;

mod connect;
mod line;
mod tui;

/// A chat client for the TcpChat protocol, v0.5 and v0.6 (see
/// docs/PROTOCOL.md).
///
/// When stdin and stdout are both a terminal, it opens a terminal UI:
/// messages with their time, a member list, a status line with the
/// connection state and your nickname, and an input line. Your own lines
/// are marked `…` until the server acks them, then `✓` (or `✗ REASON` if
/// refused). Enter sends, PageUp/PageDown scroll, Ctrl-C or /quit quits.
///
/// Otherwise (a pipe, a script) it runs in line mode: each line of stdin is
/// sent to the room (empty lines are skipped), what others say is printed
/// as `FROM: TEXT` as soon as it arrives, and the end of stdin or /quit
/// sends what is queued, closes the connection and exits 0.
///
/// A lost connection is reported on stderr (`* connection closed by the
/// server; reconnecting in 1.2 s`) and the client reconnects with backoff
/// (`* reconnected`), claiming its nickname and logging in again. Lines
/// typed meanwhile are sent once it is back, in order; past --buffer they
/// are refused with a `!` line. --no-reconnect exits 1 on a loss instead.
/// The first connection failing, or the server refusing the Hello, exits 1.
///
/// Commands: `/nick NAME` asks for a nickname (`* you are now NAME`, or
/// `! nickname refused: REASON`); `/msg NICK TEXT` tells NICK alone (v0.6);
/// `/who` lists who is in the room (v0.6): `* in the room (N): a, b, c`;
/// `/register` makes your current nickname an account with a password,
/// and `/login NAME` logs in to one (v0.6; the password is read without
/// echo on a terminal, else as the next line of stdin): `* registered
/// NAME`, `* logged in as NAME`, or `! /login: REASON`. A registered
/// nickname is refused to anyone not logged in to it; `--nick NAME
/// --password-file FILE` logs in on connecting. Passwords go only over
/// TLS unless --allow-plaintext-credentials.
/// `/quit`. Over v0.5, /msg and /who send nothing (said to the room, a
/// /msg would not be private).
///
/// v0.6: the client first sends a Hello and waits for the server's
/// Welcome. A v0.5 server skips the Hello: the client falls back to v0.5
/// as soon as a v0.5 message arrives, or after 2 s without a Welcome. A
/// Nak to the Hello exits 1 with the server's reason. The terminal UI
/// negotiates unless --v05; line mode speaks plain v0.5, byte for byte as
/// before v0.6, unless --v06. Over v0.6 line mode also prints:
/// `[private] FROM: TEXT` (a /msg to you), `[history] FROM: TEXT` (said
/// before you came), `* ana joined`, `* ana left`, `* ana is now anna`,
/// `! server: TEXT` (the server's notice), `! not delivered: REASON` (a
/// line the server refused) and `! /msg NICK: REASON`.
///
/// TLS: --tls verifies the server against the system's trusted roots,
/// --tls-ca FILE against that CA or self-signed certificate (for
/// `chat_server --tls-self-signed`). The name checked is the host of
/// --connect unless --tls-server-name says otherwise. A certificate that
/// is not trusted, or not for that name, exits 1 saying which.
///
/// QUIC: --quic connects over QUIC (UDP) to --connect instead of TCP
/// (`chat_server --quic ADDR`), always encrypted, verified as with --tls:
/// the system's roots, or --tls-ca FILE, for --tls-server-name NAME.
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
    /// Speak v0.5 only: never send a Hello (also in the terminal UI).
    #[arg(long, conflicts_with = "v06")]
    v05: bool,
    /// In line mode too, offer v0.6: a Hello first, then the Welcome's
    /// capabilities (or v0.5 after the fallback).
    #[arg(long)]
    v06: bool,
    /// Line mode even on a terminal.
    #[arg(long)]
    line: bool,
    /// Exit (status 1) when the connection is lost, instead of
    /// reconnecting.
    #[arg(long)]
    no_reconnect: bool,
    /// While reconnecting, keep at most this many lines typed, to send
    /// once the server is back; more are refused (a `!` line says so).
    #[arg(long, value_name = "N", default_value_t = 100)]
    buffer: usize,
    /// Connect over TLS, verifying the server against the system's trusted
    /// roots.
    #[arg(long)]
    tls: bool,
    /// Connect over TLS, verifying the server against this CA or
    /// self-signed certificate (PEM) instead of the system's roots.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
    /// The name the server's certificate must be for, when it is not the
    /// host of --connect.
    #[arg(long, value_name = "NAME")]
    tls_server_name: Option<String>,
    /// Connect over QUIC (UDP) instead of TCP. Always encrypted: the
    /// server is verified as with --tls (--tls-ca, --tls-server-name).
    #[arg(long)]
    quic: bool,
    /// Log in as --nick with the password in FILE (its first line), in the
    /// v0.6 Hello (in line mode too). A wrong password exits 1.
    #[arg(long, value_name = "FILE", requires = "nick", conflicts_with = "v05")]
    password_file: Option<std::path::PathBuf>,
    /// With --password-file: register --nick with that password instead
    /// of logging in.
    #[arg(long, requires = "password_file")]
    register: bool,
    /// Send passwords over a connection that is not encrypted. Anyone on
    /// the path can read them: for tests on loopback only.
    #[arg(long)]
    allow_plaintext_credentials: bool,
}

impl Args {
    /// `--password-file` read, as the Hello's credentials.
    fn credentials(&self) -> Result<Option<Credentials>, String> {
        let (Some(nick), Some(path)) = (&self.nick, &self.password_file) else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let password = text.lines().next().unwrap_or("").to_owned();
        let (nickname, password) = (nick.clone(), password);
        let credentials = if self.register {
            Credentials::Register { nickname, password }
        } else {
            Credentials::Login { nickname, password }
        };
        credentials
            .validate()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Some(credentials))
    }
}

/// Whether a password may go over `conn`; if not, why not.
fn may_send_password(allow_plaintext: bool, secure: bool) -> Result<(), &'static str> {
    if secure || allow_plaintext {
        Ok(())
    } else {
        Err(
            "not sending a password over a connection that is not encrypted: \
             connect with TLS (or, on loopback for tests, --allow-plaintext-credentials)",
        )
    }
}

/// Reads a password: from the terminal without echo when stdin is one,
/// else `None` (the caller reads the next line of stdin).
fn prompt_password(prompt: &str) -> Option<std::io::Result<String>> {
    std::io::stdin()
        .is_terminal()
        .then(|| rpassword::prompt_password(prompt))
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
    // Before connecting: a bad file is found at once.
    let credentials = match args.credentials() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let terminal = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let tui = terminal && !args.line;
    // The terminal UI says Hello unless --v05; line mode with --v06, or
    // to log in.
    let offer = !args.v05 && (tui || args.v06 || credentials.is_some());
    // Before connecting: a password never leaves in plaintext unasked.
    let secure = args.tls || args.tls_ca.is_some();
    if credentials.is_some() {
        if let Err(e) = may_send_password(args.allow_plaintext_credentials, secure) {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    }
    smol::block_on(async {
        let client = match connect::start(&args, credentials, offer) {
            Ok(client) => client,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        };
        if tui {
            tui::run(args, client).await
        } else {
            line::run(args, client).await
        }
    })
}

/// How the handshake went, in a few words (stderr in line mode, the pane
/// in the terminal UI).
fn describe(negotiated: &Negotiated) -> String {
    match negotiated {
        Negotiated::Welcomed {
            version,
            capabilities,
            ..
        } => format!(
            "speaking v{}.{} (granted: {})",
            version >> 8,
            version & 0xff,
            if capabilities.is_empty() {
                "nothing".to_owned()
            } else {
                capabilities.join(", ")
            }
        ),
        Negotiated::Fallback(chatpipe_chat::client::Fallback::Waited) => format!(
            "no Welcome within {} s: speaking v0.5",
            DEFAULT_WAIT.as_secs()
        ),
        Negotiated::Fallback(_) => "the server speaks v0.5: speaking v0.5".to_owned(),
    }
}
