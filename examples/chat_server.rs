//! A chat server: every message a client sends goes to every other client.
//!
//! ```text
//! cargo run --example chat_server -- [--listen ADDR] [--rate N] [--burst N]
//!     [--flood-unread N] [--flood-for SECS] [--history N] [--db PATH]
//!     [--max-connections N] [--max-per-ip N] [--max-memory BYTES]
//!     [--require-login] [--allow-plaintext-credentials]
//!     [--tls-cert FILE --tls-key FILE | --tls-self-signed] [--tls-listen ADDR]
//!     [--tls-handshake-timeout SECS] [--quic ADDR] [--web ADDR]
//!     [--threads N]
//! ```
//!
//! It speaks the chat protocol of `docs/PROTOCOL.md`, so `chat_client` or
//! any other TcpChat v0.5 client can join; a client that says Hello gets
//! v0.6 too. The room itself is the `chatpipe-chat` crate, in `chat/`: this
//! binary parses arguments, catches signals and prints the address, then
//! calls its `serve`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use async_signal::{Signal, Signals};
use chatpipe_chat::tls::{self, rustls::ServerConfig};
use chatpipe_chat::{serve_on, Config, Listener, Rate};
use clap::Parser;
use futures::StreamExt;
use smol::net::TcpListener;

/// A chat room over the TcpChat protocol, v0.5 and v0.6 (see
/// docs/PROTOCOL.md).
///
/// The first line on stdout is `listening on IP:PORT`, the address bound.
/// Connections, disconnections and errors are logged on stderr. Ctrl-C or
/// SIGTERM stops accepting, closes every connection cleanly and exits 0.
///
/// TLS: with --tls-cert and --tls-key (or --tls-self-signed) the server
/// speaks TLS on --listen, and prints `TLS on IP:PORT`; with --tls-listen
/// too, it speaks TLS on that address and plaintext on --listen, side by
/// side. --tls-self-signed makes a certificate for localhost, 127.0.0.1
/// and ::1 at startup, writes the certificate (never the key, which stays
/// in memory) to a file and prints `certificate: PATH`; clients connect
/// with `chat_client --tls-ca PATH`.
///
/// QUIC: with --quic ADDR too, the server also takes QUIC connections on
/// the UDP address ADDR, with the same certificate, and prints `QUIC on
/// IP:PORT`; clients connect with `chat_client --quic`. QUIC and TCP
/// clients share the one room.
///
/// Browser: with --web ADDR the server also serves the browser client, a
/// page at http://ADDR/ whose WebSocket (/ws) joins the same room, and
/// prints `web on http://IP:PORT/`; with TLS, https:// and wss://.
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

    /// Threads that run the clients' connections (smol's global executor,
    /// which the room spawns its tasks on). Default: SMOL_THREADS if set,
    /// else one per core.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,

    /// Refuse guests: every client must log in or register (v0.6, with a
    /// password). v0.5 clients, which cannot, are closed.
    #[arg(long)]
    require_login: bool,

    /// Take passwords over connections that are not encrypted. Anyone on
    /// the path can read them: for tests on loopback only. Without it,
    /// credentials are refused except over TLS, and the refusal says why.
    #[arg(long)]
    allow_plaintext_credentials: bool,

    /// Serve TLS with this certificate chain (PEM, the server's certificate
    /// first). Needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Serve TLS with a certificate made at startup for localhost,
    /// 127.0.0.1 and ::1, for development. The certificate is written to a
    /// file whose path is printed; the key is never written.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
    tls_self_signed: bool,

    /// Where --tls-self-signed writes the certificate. Default: the
    /// temporary directory, chatpipe-localhost-PORT.pem.
    #[arg(long, value_name = "PATH", requires = "tls_self_signed")]
    tls_cert_out: Option<PathBuf>,

    /// Serve TLS on this address, and plaintext on --listen, side by side.
    /// Needs --tls-cert and --tls-key, or --tls-self-signed.
    #[arg(long, value_name = "ADDR")]
    tls_listen: Option<String>,

    /// Seconds a TLS connection has to finish its handshake before it is
    /// closed. It counts against --max-connections and --max-per-ip until
    /// then.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    tls_handshake_timeout: f64,

    /// Also serve QUIC on this UDP address (the same port as --listen is
    /// fine: UDP is not TCP), with the TLS certificate. Needs --tls-cert
    /// and --tls-key, or --tls-self-signed. Its handshakes have
    /// --tls-handshake-timeout too.
    #[arg(long, value_name = "ADDR")]
    quic: Option<String>,

    /// Serve the browser client on this address: the page at http://ADDR/
    /// and its WebSocket, in the same room (https:// and wss:// with the
    /// TLS flags). Its connections count against --max-connections and
    /// --max-per-ip, and have --tls-handshake-timeout for their request.
    #[arg(long, value_name = "ADDR")]
    web: Option<String>,
}

/// The TLS the server was asked for, with its certificate loaded or made.
struct Tls {
    config: Arc<ServerConfig>,
    /// A self-signed certificate's PEM, to write out once the port is known.
    self_signed: Option<String>,
}

fn load_tls(args: &Args) -> Result<Option<Tls>, ExitCode> {
    let tls = match (&args.tls_cert, &args.tls_key, args.tls_self_signed) {
        (Some(cert), Some(key), _) => tls::server_config_from_files(cert, key).map(|config| Tls {
            config,
            self_signed: None,
        }),
        (_, _, true) => tls::self_signed(&tls::LOCALHOST).map(|made| Tls {
            config: made.config,
            self_signed: Some(made.cert_pem),
        }),
        _ if args.tls_listen.is_some() => {
            eprintln!("--tls-listen needs --tls-cert and --tls-key, or --tls-self-signed");
            return Err(ExitCode::FAILURE);
        }
        _ if args.quic.is_some() => {
            eprintln!("--quic needs --tls-cert and --tls-key, or --tls-self-signed");
            return Err(ExitCode::FAILURE);
        }
        _ => return Ok(None),
    };
    tls.map(Some).map_err(|e| {
        eprintln!("cannot set up TLS: {e}");
        ExitCode::FAILURE
    })
}

async fn bind(addr: &str) -> Result<TcpListener, ExitCode> {
    TcpListener::bind(addr).await.map_err(|e| {
        eprintln!("cannot listen on {addr}: {e}");
        ExitCode::FAILURE
    })
}

/// The QUIC listener on `addr` (UDP), presenting `config`'s certificate.
fn bind_quic(addr: &str, config: Arc<ServerConfig>) -> Result<Listener, ExitCode> {
    let failed = |e: std::io::Error| {
        eprintln!("cannot listen for QUIC on {addr}: {e}");
        ExitCode::FAILURE
    };
    let socket = std::net::UdpSocket::bind(addr).map_err(failed)?;
    let bound = socket.local_addr().map_err(failed)?;
    let listener = Listener::quic(socket, config).map_err(failed)?;
    println!("QUIC on {bound}");
    Ok(listener)
}

/// The listeners, bound: plaintext or TLS on --listen, TLS on --tls-listen,
/// QUIC on --quic.
/// Prints what is where, the --listen address first.
async fn listeners(args: &Args, tls: Option<Tls>) -> Result<Vec<Listener>, ExitCode> {
    let listener = bind(&args.listen).await?;
    let local = |l: &TcpListener| {
        l.local_addr().map_err(|e| {
            eprintln!("cannot read the bound address: {e}");
            ExitCode::FAILURE
        })
    };
    let addr = local(&listener)?;
    println!("listening on {addr}");
    let Some(tls) = tls else {
        return Ok(vec![Listener::plain(listener)]);
    };
    let (mut listeners, tls_addr) = match &args.tls_listen {
        Some(tls_listen) => {
            let tls_listener = bind(tls_listen).await?;
            let tls_addr = local(&tls_listener)?;
            let both = vec![
                Listener::plain(listener),
                Listener::tls(tls_listener, tls.config.clone()),
            ];
            (both, tls_addr)
        }
        None => (vec![Listener::tls(listener, tls.config.clone())], addr),
    };
    println!("TLS on {tls_addr}");
    if let Some(quic) = &args.quic {
        listeners.push(bind_quic(quic, tls.config.clone())?);
    }
    if let Some(pem) = tls.self_signed {
        let path = match &args.tls_cert_out {
            Some(path) => path.clone(),
            None => {
                std::env::temp_dir().join(format!("chatpipe-localhost-{}.pem", tls_addr.port()))
            }
        };
        if let Err(e) = std::fs::write(&path, pem) {
            eprintln!("cannot write the certificate to {}: {e}", path.display());
            return Err(ExitCode::FAILURE);
        }
        println!("certificate: {}", path.display());
        println!(
            "  (self-signed for localhost; connect with: chat_client --connect {tls_addr} --tls-ca {})",
            path.display()
        );
    }
    Ok(listeners)
}

/// The browser client's listener on `addr`, over TLS if `tls`; prints
/// its address.
async fn web_listener(addr: &str, tls: Option<Arc<ServerConfig>>) -> Result<Listener, ExitCode> {
    let listener = bind(addr).await?;
    let bound = listener.local_addr().map_err(|e| {
        eprintln!("cannot read the bound address: {e}");
        ExitCode::FAILURE
    })?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("web on {scheme}://{bound}/");
    Ok(Listener::web(listener, tls))
}

fn main() -> ExitCode {
    let args = Args::parse();
    // smol's global executor reads SMOL_THREADS when the first task is
    // spawned and runs one thread otherwise: set it before anything spawns
    // (and before this program starts any thread of its own), so the
    // room's connections run on every core.
    let threads = args
        .threads
        .map(usize::from)
        .or_else(|| std::env::var("SMOL_THREADS").ok()?.parse().ok());
    let threads = threads
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    std::env::set_var("SMOL_THREADS", threads.to_string());
    if !(args.tls_handshake_timeout > 0.0 && args.tls_handshake_timeout <= 86_400.0) {
        eprintln!("--tls-handshake-timeout: expected seconds, more than 0 and at most 86400");
        return ExitCode::FAILURE;
    }
    // Before the store and the sockets: a bad certificate fails at once.
    let tls = match load_tls(&args) {
        Ok(tls) => tls,
        Err(code) => return code,
    };
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
    let code = serve_until_signal(args, tls, store.clone(), accounts);
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
    tls: Option<Tls>,
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
        let web_tls = tls.as_ref().map(|t| t.config.clone());
        let mut listeners = match listeners(&args, tls).await {
            Ok(listeners) => listeners,
            Err(code) => return code,
        };
        if let Some(web) = &args.web {
            match web_listener(web, web_tls).await {
                Ok(listener) => listeners.push(listener),
                Err(code) => return code,
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
            handshake_timeout: std::time::Duration::from_secs_f64(args.tls_handshake_timeout),
            ..Config::default()
        };
        if let Some(max_memory) = args.max_memory {
            config.max_memory = max_memory;
        }
        serve_on(listeners, config, shutdown).await;
        ExitCode::SUCCESS
    })
}
