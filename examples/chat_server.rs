//! A chat server: every message a client sends goes to every other client.
//!
//! ```text
//! cargo run --example chat_server -- [--listen ADDR] [--rate N] [--burst N]
//!     [--flood-unread N] [--flood-for SECS] [--history N] [--db PATH]
//!     [--max-connections N] [--max-per-ip N] [--max-memory BYTES]
//!     [--require-login] [--allow-plaintext-credentials]
//! ```
//!
//! It speaks the chat protocol of `docs/PROTOCOL.md`, so `chat_client` or
//! any other TcpChat v0.5 client can join; a client that says Hello gets
//! v0.6 too. The room itself is the `chatpipe-chat` crate, in `chat/`: this
//! binary parses arguments, catches signals and prints the address, then
//! calls its `serve`.

use std::process::ExitCode;

use async_signal::{Signal, Signals};
use chatpipe_chat::{serve, Config, Rate};
use clap::Parser;
use futures::StreamExt;
use smol::net::TcpListener;

/// A chat room over the TcpChat protocol, v0.5 and v0.6 (see
/// docs/PROTOCOL.md).
///
/// The first line on stdout is `listening on IP:PORT`, the address bound.
/// Connections, disconnections and errors are logged on stderr. Ctrl-C or
/// SIGTERM stops accepting, closes every connection cleanly and exits 0.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The address to listen on; port 0 picks a free port. Use
    /// 0.0.0.0:33333 to listen on every interface.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:33333")]
    listen: String,

    /// Messages per second each client may send on average (a token
    /// bucket). Over it, the client's messages are read more slowly: they
    /// arrive late, all of them, in order. 0 turns the limit off.
    #[arg(long, value_name = "N", default_value_t = 10.0)]
    rate: f64,

    /// Messages a client may send at once before the rate applies.
    #[arg(long, value_name = "N", default_value_t = 20.0)]
    burst: f64,

    /// A paced client with this many messages waiting to be read, for
    /// --flood-for seconds, is disconnected as an excess flood.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    flood_unread: usize,

    /// See --flood-unread.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    flood_for: u64,

    /// How many of the last room messages a v0.6 client that asks for
    /// history gets on joining. 0 turns history off.
    #[arg(long, value_name = "N", default_value_t = 50)]
    history: usize,

    /// The SQLite file the history and the accounts are kept in, so they
    /// survive a restart (created if missing); `:memory:` keeps them in
    /// memory only.
    #[arg(long, value_name = "PATH", default_value = chatpipe_chat::store::DEFAULT_DB)]
    db: std::path::PathBuf,

    /// Connections at once; more are closed as soon as they are accepted.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    max_connections: usize,

    /// Connections at once from one IP address; more are closed as soon as
    /// they are accepted.
    #[arg(long, value_name = "N", default_value_t = 64)]
    max_per_ip: usize,

    /// The memory for messages waiting on slow clients, all together, in
    /// bytes (K, M, G suffixes: 512M, 2G). When it is full, the client
    /// furthest behind is disconnected as a slow consumer (a v0.6 client is
    /// told why). Default: a quarter of the machine's memory, 1G if
    /// unknown.
    #[arg(long, value_name = "BYTES", value_parser = chatpipe_chat::memory::parse_size)]
    max_memory: Option<usize>,

    /// Refuse guests: every client must log in or register (v0.6, with a
    /// password). v0.5 clients, which cannot, are closed.
    #[arg(long)]
    require_login: bool,

    /// Take passwords over connections that are not encrypted. Anyone on
    /// the path can read them: for tests on loopback only. Without it,
    /// credentials are refused except over TLS, and the refusal says why.
    #[arg(long)]
    allow_plaintext_credentials: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Opened before serving: opening reads the disk, which no task of the
    // room may wait on.
    let store = match args.history {
        0 => None,
        keep => match chatpipe_chat::store::Store::open(&args.db, keep) {
            Ok(store) => Some(std::sync::Arc::new(store)),
            Err(e) => {
                eprintln!("cannot open the history store {}: {e}", args.db.display());
                return ExitCode::FAILURE;
            }
        },
    };
    let accounts = match chatpipe_chat::accounts::Accounts::open(&args.db) {
        Ok(accounts) => std::sync::Arc::new(accounts),
        Err(e) => {
            eprintln!("cannot open the accounts in {}: {e}", args.db.display());
            return ExitCode::FAILURE;
        }
    };
    let code = serve_until_signal(args, store.clone(), accounts);
    // Whatever history is still queued is written before exiting.
    if let Some(store) = store {
        store.flush();
        if store.unsaved() > 0 {
            eprintln!("history: {} message(s) could not be saved", store.unsaved());
        }
    }
    code
}

fn serve_until_signal(
    args: Args,
    store: Option<std::sync::Arc<chatpipe_chat::store::Store>>,
    accounts: std::sync::Arc<chatpipe_chat::accounts::Accounts>,
) -> ExitCode {
    smol::block_on(async {
        // Signals first: once the address is printed, a signal must stop
        // the server cleanly rather than kill it.
        let signals = if cfg!(windows) {
            Signals::new([Signal::Int])
        } else {
            Signals::new([Signal::Int, Signal::Term])
        };
        let mut signals = match signals {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cannot catch signals: {e}");
                return ExitCode::FAILURE;
            }
        };
        let listener = match TcpListener::bind(&args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("cannot listen on {}: {e}", args.listen);
                return ExitCode::FAILURE;
            }
        };
        match listener.local_addr() {
            Ok(addr) => println!("listening on {addr}"),
            Err(e) => {
                eprintln!("cannot read the bound address: {e}");
                return ExitCode::FAILURE;
            }
        }
        let shutdown = async move {
            if let Some(Ok(signal)) = signals.next().await {
                eprintln!("received {signal:?}");
            }
        };
        let rate = (args.rate > 0.0).then_some(Rate {
            per_second: args.rate,
            burst: args.burst.max(1.0),
        });
        let mut config = Config {
            rate,
            flood_unread: args.flood_unread.max(1),
            flood_for: std::time::Duration::from_secs(args.flood_for),
            history: args.history,
            store,
            max_connections: args.max_connections,
            max_per_ip: args.max_per_ip,
            accounts: Some(accounts),
            require_login: args.require_login,
            plaintext_credentials: args.allow_plaintext_credentials,
            ..Config::default()
        };
        if let Some(max_memory) = args.max_memory {
            config.max_memory = max_memory;
        }
        serve(listener, config, shutdown).await;
        ExitCode::SUCCESS
    })
}
