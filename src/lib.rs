//! A correct message connection over any async byte stream.
//!
//! chatpipe turns an `AsyncRead + AsyncWrite` (TCP, Unix socket, TLS,
//! in-memory pipe) into a connection that exchanges *messages* of your own
//! [`Protocol`], with everything a real TCP application needs:
//!
//! - **framing**: a 4-byte big-endian length prefix, refused from the header
//!   alone when over the maximum, never allocating on a peer's say-so;
//! - **always reading**, so EOF and errors are seen at once, with a bounded
//!   buffer so a slow consumer applies backpressure;
//! - **write coalescing**: `send` queues, the driver writes everything queued
//!   in as few (vectored) writes as it can;
//! - **closing both directions together**, with the one reason reported to
//!   every handle;
//! - **keepalives** and an **idle timeout**, to detect half-open connections;
//! - **request/response**: `request(msg).await` resolves with the response
//!   that carries the same id, with a timeout.
//!
//! The library spawns nothing and depends on no executor: [`Builder::build`]
//! returns a [`Sender`], an [`Incoming`] stream and a [`Connection`] driver
//! future that you spawn on smol, tokio or anything else.
//!
//! # Example
//!
//! A request/response round trip over loopback TCP with the ready-made
//! [`raw`] protocol; see [`Protocol`] to put your own messages on the wire.
//!
//! ```
//! use chatpipe::raw::{Raw, RawMessage};
//! use chatpipe::Builder;
//! use futures::StreamExt;
//! use smol::net::{TcpListener, TcpStream};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! smol::block_on(async {
//!     let listener = TcpListener::bind("127.0.0.1:0").await?;
//!     let client_io = TcpStream::connect(listener.local_addr()?).await?;
//!     let (server_io, _) = listener.accept().await?;
//!
//!     // Server: answer every request with its body reversed.
//!     let (server, mut requests, conn) = Builder::new().build(server_io, Raw);
//!     smol::spawn(conn).detach();
//!     smol::spawn(async move {
//!         while let Some(Ok(RawMessage::Request { id, body })) = requests.next().await {
//!             let body = body.iter().rev().copied().collect::<Vec<u8>>().into();
//!             let _ = server.send(RawMessage::Response { id, body }).await;
//!         }
//!     })
//!     .detach();
//!
//!     // Client: the driver future runs on any executor; here, smol's.
//!     let (client, _incoming, conn) = Builder::new().build(client_io, Raw);
//!     let driver = smol::spawn(conn);
//!     let answer = client
//!         .request(RawMessage::Request { id: 1, body: "abc".into() })
//!         .await?;
//!     assert_eq!(answer, RawMessage::Response { id: 1, body: "cba".into() });
//!
//!     client.close(); // write what is queued, then shut down; the peer follows
//!     driver.await?;
//!     Ok(())
//! })
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

mod builder;
pub mod chat;
mod connection;
mod error;
pub mod frame;
mod incoming;
mod outbox;
mod pipe;
mod protocol;
mod queue;
pub mod raw;
mod sender;
mod state;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
mod timer;
#[cfg(feature = "tokio")]
mod tokio;

pub use builder::Builder;
pub use connection::Connection;
pub use error::{BoxError, Error, SendError, TrySendError};
pub use incoming::Incoming;
pub use protocol::{Call, Kind, Protocol};
pub use sender::{Permit, Sender, Stats};
#[cfg(feature = "async-io")]
pub use timer::AsyncIoTimer;
pub use timer::Timer;
#[cfg(feature = "tokio")]
pub use tokio::{TokioIo, TokioTimer};
