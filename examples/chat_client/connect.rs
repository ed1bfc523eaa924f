//! Opening the connection: TCP, and TLS over it when asked (`--tls`,
//! `--tls-ca`), or QUIC (`--quic`), with failures said in words a user can
//! act on.

use std::process::ExitCode;

use chatpipe::chat::Chat;
use chatpipe::Builder;
use chatpipe_chat::tls::{self, Trust};
use smol::io::{AsyncRead, AsyncWrite};
use smol::net::TcpStream;

use crate::{Args, Connection, SERVER_KEEPALIVE};

/// Connects as `args` say; on failure, the message is printed and the exit
/// code returned.
pub async fn open(args: &Args) -> Result<Connection, ExitCode> {
    let trust = match (&args.tls_ca, args.tls || args.quic) {
        (Some(ca), _) => Some(Trust::File(ca.clone())),
        (None, true) => Some(Trust::System),
        (None, false) => None,
    };
    // Checked before connecting: a bad file or name fails at once.
    let tls = match trust {
        Some(trust) => {
            let config = tls::client_config(&trust).map_err(|e| fail(format!("TLS: {e}")))?;
            let name = tls::server_name(&args.connect, args.tls_server_name.as_deref())
                .map_err(|e| fail(format!("TLS: {e}")))?;
            Some((config, name))
        }
        None => None,
    };
    if let (true, Some((config, name))) = (args.quic, &tls) {
        let idle = idle_timeout(args);
        let stream = chatpipe_chat::quic::connect(&args.connect, config, name, idle)
            .await
            .map_err(|e| fail(format!("QUIC connection to {} failed: {e}", args.connect)))?;
        eprintln!("connected to {} (QUIC, {})", args.connect, name.to_str());
        let endpoint = stream.endpoint().cloned();
        let mut conn = start(args, stream, true);
        if let Some(endpoint) = endpoint {
            // After the connection: the QUIC close goes out before we exit,
            // so the server sees a clean close, not a silence.
            let driver = conn.driver;
            conn.driver = smol::spawn(async move {
                let ended = driver.await;
                let idle = endpoint.wait_idle();
                let bound = async {
                    smol::Timer::after(CLOSE_WAIT).await;
                };
                smol::future::or(idle, bound).await;
                ended
            });
        }
        return Ok(conn);
    }
    let stream = TcpStream::connect(&args.connect)
        .await
        .map_err(|e| fail(format!("cannot connect to {}: {e}", args.connect)))?;
    let _ = stream.set_nodelay(true);
    let Some((config, name)) = tls else {
        eprintln!("connected to {}", args.connect);
        return Ok(start(args, stream, false));
    };
    let connector = tls::TlsConnector::from(config);
    // The server closes a handshake it does not finish within its own
    // timeout (10 s for chat_server); this bounds one that never answers.
    let handshake = async { Some(connector.connect(name.clone(), stream).await) };
    let timeout = async {
        smol::Timer::after(HANDSHAKE_TIMEOUT).await;
        None
    };
    match smol::future::or(handshake, timeout).await {
        Some(Ok(stream)) => {
            eprintln!("connected to {} (TLS, {})", args.connect, name.to_str());
            Ok(start(args, stream, true))
        }
        Some(Err(e)) => Err(fail(format!(
            "TLS handshake with {} failed: {}",
            args.connect,
            tls::explain_handshake(&e, &name)
        ))),
        None => Err(fail(format!(
            "TLS handshake with {} failed: no answer within {} s (does the server speak TLS?)",
            args.connect,
            HANDSHAKE_TIMEOUT.as_secs()
        ))),
    }
}

/// How long the client waits for its QUIC close to go out before exiting.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long the client waits for a TLS handshake to finish.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

fn fail(message: String) -> ExitCode {
    eprintln!("{message}");
    ExitCode::FAILURE
}

/// The connection's idle timeout (over QUIC, QUIC's too).
fn idle_timeout(args: &Args) -> std::time::Duration {
    3 * args.keepalive.max(SERVER_KEEPALIVE)
}

/// `secure`: over TLS or QUIC, so passwords may go over it.
fn start<S>(args: &Args, stream: S, secure: bool) -> Connection
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, incoming, conn) = Builder::new()
        .keepalive_interval(Some(args.keepalive))
        .idle_timeout(Some(idle_timeout(args)))
        .build(stream, Chat);
    Connection {
        sender,
        incoming,
        driver: smol::spawn(conn),
        secure,
    }
}
