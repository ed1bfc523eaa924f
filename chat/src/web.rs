//! The browser client: a web listener serves one page (`chat/web/`, built
//! into the binary) and a WebSocket endpoint, `/ws`, on the same address.
//! Each binary WebSocket message carries bytes of the chat protocol's
//! stream (frames may span messages, or share one), so [`WsIo`] turns the
//! WebSocket into an `AsyncRead + AsyncWrite` and the room runs its
//! ordinary connection over it: the same keepalives, frame limit, rate
//! pacing and memory budget as for a TCP client.
//!
//! A web connection counts against `max_connections` and `max_per_ip`
//! from the moment it is accepted; its TLS handshake (on a TLS listener)
//! and then its HTTP request head each have `handshake_timeout`. A
//! WebSocket message that is not chat bytes (a text message, one over a
//! frame's size, a broken WebSocket frame) closes the connection with a
//! WebSocket close frame and [`chatpipe::Error::Malformed`] holding a
//! [`BadMessage`], as a malformed frame does.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use async_tungstenite::tungstenite::{self as ws, Bytes, Message};
use async_tungstenite::WebSocketStream;
use chatpipe::chat::MAX_PAYLOAD_LEN;
use futures_sink::Sink;
use smol::channel;
use smol::future::FutureExt;
use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use smol::net::TcpStream;
use smol::stream::Stream;

use crate::{Event, Handshaking, Room, WebFailure};

pub use async_tungstenite;

/// The page, its script and its stylesheet, as served.
pub const INDEX_HTML: &str = include_str!("../web/index.html");
pub const CHAT_JS: &str = include_str!("../web/chat.js");
pub const CHAT_CSS: &str = include_str!("../web/chat.css");

/// The WebSocket endpoint's path.
pub const WS_PATH: &str = "/ws";

/// The largest WebSocket message taken: one whole frame of the chat
/// protocol, its 4-byte header and the largest payload. A browser sends
/// one frame per message; more in one message is refused, so what one
/// message makes the server hold is bounded like a frame.
pub const MAX_MESSAGE: usize = 4 + MAX_PAYLOAD_LEN;

/// The largest HTTP request head read before it is refused.
pub const MAX_HEAD: usize = 8 * 1024;

/// The WebSocket limits: messages and frames up to [`MAX_MESSAGE`], and
/// what waits to be written bounded (tungstenite's default is unbounded).
pub fn ws_config() -> WebSocketConfig {
    let write_buffer = 64 * 1024;
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
        .write_buffer_size(write_buffer)
        .max_write_buffer_size(write_buffer + 2 * MAX_MESSAGE)
}

/// Why a WebSocket message was refused: the connection closes with this,
/// as [`chatpipe::Error::Malformed`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadMessage {
    /// A text message: the chat protocol travels in binary messages.
    #[error(
        "a text WebSocket message ({len} bytes); the chat protocol travels in binary messages"
    )]
    Text { len: usize },
    /// A message (or WebSocket frame) over [`MAX_MESSAGE`].
    #[error("a WebSocket message of {size} bytes, over the maximum of {max}")]
    TooLarge { size: usize, max: usize },
    /// Not a valid WebSocket frame (unmasked, a reserved opcode, ...).
    #[error("a broken WebSocket frame: {0}")]
    Protocol(String),
}

impl BadMessage {
    fn close_code(&self) -> CloseCode {
        match self {
            BadMessage::Text { .. } => CloseCode::Unsupported,
            BadMessage::TooLarge { .. } => CloseCode::Size,
            BadMessage::Protocol(_) => CloseCode::Protocol,
        }
    }

    /// The `BadMessage` a connection's error carries, if any.
    pub fn of(error: &chatpipe::Error) -> Option<&BadMessage> {
        match error {
            chatpipe::Error::Io(e) => e.get_ref()?.downcast_ref(),
            chatpipe::Error::Malformed(e) => e.downcast_ref(),
            _ => None,
        }
    }
}

/// A WebSocket as a byte stream: reads give the bytes of binary messages
/// in order, each write goes out as one binary message. Pings are
/// answered (by tungstenite) and skipped; a close ends the stream.
pub struct WsIo<S> {
    ws: WebSocketStream<S>,
    /// What the last binary message still holds.
    unread: Bytes,
}

impl<S> WsIo<S> {
    pub fn new(ws: WebSocketStream<S>) -> Self {
        WsIo {
            ws,
            unread: Bytes::new(),
        }
    }
}

impl<S> std::fmt::Debug for WsIo<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsIo")
            .field("unread", &self.unread.len())
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsIo<S> {
    /// Refuses a message: a close frame saying why goes out if it can
    /// without waiting, and the error ends the connection.
    fn refuse(&mut self, cx: &mut Context<'_>, bad: BadMessage) -> io::Error {
        let mut ws = Pin::new(&mut self.ws);
        if let Poll::Ready(Ok(())) = ws.as_mut().poll_ready(cx) {
            let reason = bad.to_string();
            // Close reasons are at most 123 bytes.
            let cut = (0..=reason.len().min(120))
                .rev()
                .find(|&i| reason.is_char_boundary(i))
                .unwrap_or(0);
            let frame = CloseFrame {
                code: bad.close_code(),
                reason: reason[..cut].to_owned().into(),
            };
            if ws.as_mut().start_send(Message::Close(Some(frame))).is_ok() {
                let _ = ws.poll_flush(cx);
            }
        }
        io::Error::new(io::ErrorKind::InvalidData, bad)
    }
}

/// A tungstenite error as an I/O error; what the peer got wrong as a
/// [`BadMessage`].
fn ws_error(e: ws::Error) -> Result<io::Error, BadMessage> {
    use ws::error::CapacityError;
    match e {
        ws::Error::Io(e) => Ok(e),
        ws::Error::Capacity(CapacityError::MessageTooLong { size, max_size }) => {
            Err(BadMessage::TooLarge {
                size,
                max: max_size,
            })
        }
        ws::Error::Protocol(p) => Err(BadMessage::Protocol(p.to_string())),
        ws::Error::Utf8(e) => Err(BadMessage::Protocol(e)),
        ws::Error::ConnectionClosed | ws::Error::AlreadyClosed => {
            Ok(io::ErrorKind::BrokenPipe.into())
        }
        other => Ok(io::Error::other(other)),
    }
}

/// A tungstenite error on the writing side, as an I/O error.
fn write_error(e: ws::Error) -> io::Error {
    ws_error(e).unwrap_or_else(io::Error::other)
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        loop {
            if !this.unread.is_empty() || buf.is_empty() {
                let n = buf.len().min(this.unread.len());
                let taken = this.unread.split_to(n);
                buf[..n].copy_from_slice(&taken);
                return Poll::Ready(Ok(n));
            }
            // Each turn takes one message that has arrived: pings and empty
            // messages are skipped, and Pending comes once none is left.
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                None => return Poll::Ready(Ok(0)),
                Some(Ok(Message::Binary(bytes))) => this.unread = bytes,
                Some(Ok(Message::Text(text))) => {
                    let bad = BadMessage::Text { len: text.len() };
                    return Poll::Ready(Err(this.refuse(cx, bad)));
                }
                // A Close is answered by tungstenite; the stream ends next.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_))) => {}
                Some(Ok(Message::Frame(_))) => {}
                Some(Err(e)) => {
                    return Poll::Ready(Err(match ws_error(e) {
                        Ok(e) => e,
                        Err(bad) => this.refuse(cx, bad),
                    }))
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut ws = Pin::new(&mut self.ws);
        ready!(ws.as_mut().poll_ready(cx)).map_err(write_error)?;
        // One message of at most a frame: what the browser takes is bounded
        // like what we take.
        let n = buf.len().min(MAX_MESSAGE);
        ws.start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
            .map_err(write_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(write_error)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_close(cx).map_err(write_error)
    }
}

/// What an HTTP request asked for.
enum Asked {
    /// A WebSocket upgrade: the accept key, and bytes read past the head.
    Upgrade { accept: String, rest: Vec<u8> },
    /// Anything else: the path, and the response.
    Page { path: String, response: Vec<u8> },
}

/// Takes a connection accepted on a web listener: counted against the
/// limits now, it is served in a task of its own (`alive` held until it
/// ends).
pub(crate) fn accept(
    room: &Arc<Room>,
    tls: Option<crate::tls::TlsAcceptor>,
    stream: TcpStream,
    addr: SocketAddr,
    id: u64,
    alive: channel::Sender<()>,
    stopped: &channel::Receiver<()>,
) {
    let handshaking = match room.admit_handshake(addr) {
        Ok(handshaking) => handshaking,
        Err(reason) => {
            room.emit(Event::Refused { addr, reason });
            return;
        }
    };
    let (room, stopped) = (room.clone(), stopped.clone());
    smol::spawn(async move {
        match tls {
            None => serve(&room, stream, addr, id, false, handshaking, &stopped).await,
            Some(acceptor) => match crate::handshake(&room, &acceptor, stream, &stopped).await {
                Ok(stream) => serve(&room, stream, addr, id, true, handshaking, &stopped).await,
                Err(failure) => {
                    drop(handshaking);
                    if let Some(reason) = failure {
                        room.emit(Event::TlsFailed { addr, reason });
                    }
                }
            },
        }
        drop(alive);
    })
    .detach();
}

/// Reads the request, within `handshake_timeout`, and answers it: a page,
/// or the upgrade after which the connection joins the room.
async fn serve<S>(
    room: &Arc<Room>,
    mut stream: S,
    addr: SocketAddr,
    id: u64,
    secure: bool,
    handshaking: Handshaking,
    stopped: &channel::Receiver<()>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let after = room.config.handshake_timeout;
    let plaintext = room.config.plaintext_credentials;
    let read = async { Some(read_request(&mut stream, plaintext).await) };
    let timeout = async {
        smol::Timer::after(after).await;
        Some(Err(WebFailure::Timeout { after }))
    };
    let stop = async {
        let _ = stopped.recv().await;
        None
    };
    let asked = match read.or(timeout).or(stop).await {
        Some(Ok(asked)) => asked,
        Some(Err(reason)) => {
            drop(handshaking);
            room.emit(Event::WebFailed { addr, reason });
            return;
        }
        None => return,
    };
    match asked {
        Asked::Page { path, response } => {
            // Bounded like the head: a peer that does not read the page
            // does not hold the connection.
            let status = status_of(&response);
            let write = async {
                stream.write_all(&response).await?;
                stream.flush().await?;
                stream.close().await
            };
            let timeout = async {
                smol::Timer::after(after).await;
                Err(io::ErrorKind::TimedOut.into())
            };
            let written = write.or(timeout).await;
            drop(handshaking);
            match written {
                Ok(()) => room.emit(Event::WebRequest { addr, path, status }),
                Err(e) => room.emit(Event::WebFailed {
                    addr,
                    reason: WebFailure::Io(e),
                }),
            }
        }
        Asked::Upgrade { accept, rest } => {
            let response = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            if let Err(e) = stream.write_all(response.as_bytes()).await {
                drop(handshaking);
                room.emit(Event::WebFailed {
                    addr,
                    reason: WebFailure::Io(e),
                });
                return;
            }
            let ws =
                WebSocketStream::from_partially_read(stream, rest, Role::Server, Some(ws_config()))
                    .await;
            let task = room.join(id, WsIo::new(ws), addr, secure);
            // A member now, counted as one.
            drop(handshaking);
            task.await;
        }
    }
}

fn status_of(response: &[u8]) -> u16 {
    let code = response.get(9..12).unwrap_or_default();
    std::str::from_utf8(code)
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Reads an HTTP request head (at most [`MAX_HEAD`] bytes) and decides
/// the answer.
/// `plaintext`: the room takes passwords over plaintext, so the page
/// offers them over http too.
async fn read_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    plaintext: bool,
) -> Result<Asked, WebFailure> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut len = 0;
    loop {
        let n = stream.read(&mut buf[len..]).await.map_err(WebFailure::Io)?;
        if n == 0 {
            return Err(WebFailure::ClosedEarly { read: len });
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(head)) => {
                return Ok(answer(&request, buf[head..len].to_vec(), plaintext))
            }
            Ok(httparse::Status::Partial) if len < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(WebFailure::HeadTooLarge { max: MAX_HEAD })
            }
            Err(e) => {
                return Err(WebFailure::NotHttp {
                    error: e.to_string(),
                    first: buf[..len.min(8)].to_vec(),
                })
            }
        }
    }
}

fn header<'a>(request: &'a httparse::Request<'_, '_>, name: &str) -> Option<&'a str> {
    let h = request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))?;
    std::str::from_utf8(h.value).ok().map(str::trim)
}

fn has_token(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

fn answer(request: &httparse::Request<'_, '_>, rest: Vec<u8>, plaintext: bool) -> Asked {
    let path = request.path.unwrap_or("").to_owned();
    let plain = |status: &str, body: &str| response(status, "text/plain; charset=utf-8", body);
    // No query strings or fragments: the page takes none.
    let response = match (request.method, path.as_str()) {
        (Some("GET"), WS_PATH) => {
            let key = header(request, "Sec-WebSocket-Key");
            let upgrade = has_token(header(request, "Upgrade"), "websocket")
                && has_token(header(request, "Connection"), "upgrade")
                && header(request, "Sec-WebSocket-Version") == Some("13");
            match key {
                Some(key) if upgrade => {
                    let accept = ws::handshake::derive_accept_key(key.as_bytes());
                    return Asked::Upgrade { accept, rest };
                }
                _ => plain(
                    "400 Bad Request",
                    "a WebSocket endpoint: connect with a WebSocket (version 13)\n",
                ),
            }
        }
        (Some("GET"), "/" | "/index.html") => {
            let yes = if plaintext { "yes" } else { "no" };
            let page = INDEX_HTML.replace("PLAINTEXT_CREDENTIALS", yes);
            response("200 OK", "text/html; charset=utf-8", &page)
        }
        (Some("GET"), "/chat.js") => response("200 OK", "text/javascript; charset=utf-8", CHAT_JS),
        (Some("GET"), "/chat.css") => response("200 OK", "text/css; charset=utf-8", CHAT_CSS),
        (Some("GET"), _) => plain("404 Not Found", "not found\n"),
        _ => plain("405 Method Not Allowed", "only GET\n"),
    };
    Asked::Page { path, response }
}

/// A whole HTTP response; the connection closes after it.
fn response(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    // The page loads only its own script and style, and talks only to its
    // own server.
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-cache\r\nX-Content-Type-Options: nosniff\r\n\
         Content-Security-Policy: default-src 'self'; connect-src 'self'; frame-ancestors 'none'\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(head: &str) -> Asked {
        smol::block_on(read_request(&mut head.as_bytes(), false)).unwrap()
    }

    #[test]
    fn pages_and_the_upgrade() {
        match ask("GET / HTTP/1.1\r\nHost: x\r\n\r\n") {
            Asked::Page { path, response } => {
                assert_eq!(path, "/");
                assert_eq!(status_of(&response), 200);
                let page = String::from_utf8(response).unwrap();
                assert!(page.contains("<script src=\"chat.js\""));
                assert!(page.contains("data-plaintext-credentials=\"no\""));
            }
            Asked::Upgrade { .. } => panic!("not an upgrade"),
        }
        // RFC 6455's example key.
        let head = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
                    Connection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n\x01";
        match ask(head) {
            Asked::Upgrade { accept, rest } => {
                assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
                assert_eq!(rest, b"\x01");
            }
            Asked::Page { .. } => panic!("an upgrade"),
        }
        for (head, status) in [
            ("GET /ws HTTP/1.1\r\n\r\n", 400),
            ("GET /nope HTTP/1.1\r\n\r\n", 404),
            ("POST / HTTP/1.1\r\n\r\n", 405),
        ] {
            match ask(head) {
                Asked::Page { response, .. } => assert_eq!(status_of(&response), status),
                Asked::Upgrade { .. } => panic!("{head:?}"),
            }
        }
    }

    #[test]
    fn what_is_not_http_is_refused() {
        let read = |bytes: &[u8]| smol::block_on(read_request(&mut &bytes[..], false));
        assert!(matches!(
            read(b"\0\0\0\x08\0\0\0\0\0\x02Hi"),
            Err(WebFailure::NotHttp { .. })
        ));
        assert!(matches!(
            read(b"GET / HTTP/1.1\r\n"),
            Err(WebFailure::ClosedEarly { .. })
        ));
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        assert!(matches!(
            read(long.as_bytes()),
            Err(WebFailure::HeadTooLarge { .. })
        ));
    }
}
