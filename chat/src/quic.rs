//! QUIC for the room and its client, on smol: the room's QUIC listener
//! ([`Listener::quic`](crate::Listener::quic)), a client's
//! [`connect`], and what goes wrong in words. The byte stream under each
//! connection is `chatpipe::quic` (see its docs for the mapping and for
//! how QUIC's idle timeout and chatpipe's work together); the TLS
//! configurations are the very ones of [`tls`](crate::tls).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chatpipe::quic::{self as cq, quinn};
pub use chatpipe::quic::{QuicError, QuicStream};
use smol::channel;
use smol::future::FutureExt;

use crate::tls::rustls::{pki_types::ServerName, ClientConfig, ServerConfig};
use crate::{Event, QuicFailure, Room};

/// A quinn endpoint on `socket`, run by smol; a server's if `server` is
/// given.
fn endpoint(socket: UdpSocket, server: Option<quinn::ServerConfig>) -> io::Result<quinn::Endpoint> {
    let runtime = Arc::new(quinn::SmolRuntime);
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)
}

/// The room's QUIC endpoint on `socket`, presenting `tls`'s certificate.
/// Each connection gets the room's own idle timeout when it is accepted.
pub(crate) fn server_endpoint(
    socket: UdpSocket,
    tls: &ServerConfig,
) -> io::Result<quinn::Endpoint> {
    // Checked now, so that a configuration QUIC cannot use fails at once.
    let config = cq::server_config(tls, Duration::from_secs(15)).map_err(io::Error::other)?;
    endpoint(socket, Some(config))
}

/// Takes connections on `endpoint` until cancelled: each within the
/// limits joins the room, marked secure, once its handshake is over and
/// its stream open.
pub(crate) async fn accept(
    room: Arc<Room>,
    endpoint: quinn::Endpoint,
    tls: Arc<ServerConfig>,
    ids: Arc<AtomicU64>,
    alive: channel::Sender<()>,
    stopped: channel::Receiver<()>,
) {
    // QUIC's idle timeout is the connections' own: three keepalives.
    let idle = 3 * room.config.keepalive;
    let config = match cq::server_config(&tls, idle) {
        Ok(config) => Arc::new(config),
        Err(e) => {
            room.emit(Event::AcceptFailed(io::Error::other(e)));
            return;
        }
    };
    // `None` only once the endpoint is closed.
    while let Some(incoming) = endpoint.accept().await {
        let addr = incoming.remote_address();
        let handshaking = match room.admit_handshake(addr) {
            Ok(handshaking) => handshaking,
            Err(reason) => {
                // Refused before any state is kept for it.
                incoming.refuse();
                room.emit(Event::Refused { addr, reason });
                continue;
            }
        };
        let id = ids.fetch_add(1, Ordering::Relaxed) + 1;
        let (room, config, stopped, alive) =
            (room.clone(), config.clone(), stopped.clone(), alive.clone());
        smol::spawn(async move {
            match handshake(&room, incoming, config, &stopped).await {
                Ok(stream) => {
                    let task = room.join(id, stream, addr, true);
                    // A member now, counted as one.
                    drop(handshaking);
                    task.await;
                }
                Err(failure) => {
                    drop(handshaking);
                    if let Some(reason) = failure {
                        room.emit(Event::QuicFailed { addr, reason });
                    }
                }
            }
            drop(alive);
        })
        .detach();
    }
}

/// The server side of a QUIC handshake and the stream's preamble, within
/// `handshake_timeout`: why it failed, or `None` if the room is shutting
/// down.
async fn handshake(
    room: &Room,
    incoming: quinn::Incoming,
    config: Arc<quinn::ServerConfig>,
    stopped: &channel::Receiver<()>,
) -> Result<QuicStream, Option<QuicFailure>> {
    let after = room.config.handshake_timeout;
    let accepted = async {
        let conn = incoming.accept_with(config)?.await?;
        cq::accept(conn).await
    };
    let accepted = async { Some(Some(accepted.await)) };
    let timeout = async {
        smol::Timer::after(after).await;
        Some(None)
    };
    let stop = async {
        let _ = stopped.recv().await;
        None
    };
    match accepted.or(timeout).or(stop).await {
        Some(Some(Ok(stream))) => Ok(stream),
        Some(Some(Err(e))) => Err(Some(QuicFailure::Failed(e))),
        Some(None) => Err(Some(QuicFailure::Timeout { after })),
        None => Err(None),
    }
}

/// How long a client waits for the QUIC handshake and its stream.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Connects to `addr` (`host:port`) over QUIC, verifying the server with
/// `tls` for `name`, from a new endpoint of its own; `idle_timeout` is the
/// connection's own (QUIC's is set to it). Within [`CONNECT_TIMEOUT`].
/// The error is in words a user can act on. This is all a reconnecting
/// client needs: each call is a new byte stream.
pub async fn connect(
    addr: &str,
    tls: &ClientConfig,
    name: &ServerName<'_>,
    idle_timeout: Duration,
) -> Result<QuicStream, String> {
    let config = cq::client_config(tls, idle_timeout).map_err(|e| e.to_string())?;
    let remote = smol::net::resolve(addr)
        .await
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .into_iter()
        .next()
        .ok_or_else(|| format!("{addr} resolves to no address"))?;
    let local: SocketAddr = if remote.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let socket = UdpSocket::bind(local).map_err(|e| format!("cannot open a UDP socket: {e}"))?;
    let endpoint = endpoint(socket, None).map_err(|e| format!("cannot start QUIC: {e}"))?;
    let name = name.to_str();
    let connecting = async { Some(cq::connect(&endpoint, config, remote, &name).await) };
    let timeout = async {
        smol::Timer::after(CONNECT_TIMEOUT).await;
        None
    };
    match connecting.or(timeout).await {
        Some(Ok(stream)) => Ok(stream),
        Some(Err(e)) => {
            // Our refusal (a certificate we do not trust) reaches the
            // server before the caller exits, rather than its timeout.
            let idle = endpoint.wait_idle();
            let bound = async {
                smol::Timer::after(Duration::from_secs(1)).await;
            };
            idle.or(bound).await;
            Err(explain(&e, &name))
        }
        None => Err(format!(
            "no answer within {} s: is the server listening for QUIC on that UDP port (chat_server --quic)?",
            CONNECT_TIMEOUT.as_secs()
        )),
    }
}

/// Why a client's QUIC connection failed, in words a user can act on;
/// `name` is the name it checked the certificate against.
pub fn explain(error: &QuicError, name: &str) -> String {
    let QuicError::Connection(e) = error else {
        return error.to_string();
    };
    // quinn carries rustls' verdict as the reason of a TransportError.
    let reason = match e {
        quinn::ConnectionError::TransportError(t) => t.reason.clone(),
        _ => String::new(),
    };
    if reason.contains("UnknownIssuer") || reason.contains("BadSignature") {
        return format!(
            "the server's certificate is not trusted: it is not signed by a CA we trust \
             (wrong --tls-ca? a self-signed certificate must be given with --tls-ca) [{e}]"
        );
    }
    if reason.contains("NotValidForName") || reason.contains("not valid for name") {
        return format!(
            "the server's certificate is not valid for the name {name:?} \
             (give the name it is for with --tls-server-name) [{e}]"
        );
    }
    match e {
        quinn::ConnectionError::TimedOut => format!(
            "no answer (QUIC timed out): is the server listening for QUIC on that UDP port \
             (chat_server --quic)? [{e}]"
        ),
        quinn::ConnectionError::ConnectionClosed(_) => {
            format!("the server refused the QUIC handshake [{e}]")
        }
        _ => format!("{e}"),
    }
}
