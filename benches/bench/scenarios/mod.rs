//! The scenarios, one module each (chat and chat_scale share the chat
//! clients); `main` runs the ones asked for.

pub(crate) mod allocs;
pub(crate) mod chat;
pub(crate) mod chat_scale;
pub(crate) mod fanin;
pub(crate) mod loadgen;
pub(crate) mod memory;
pub(crate) mod oneway;
pub(crate) mod pipelined;
pub(crate) mod quic;
pub(crate) mod rtt;
pub(crate) mod tls;
pub(crate) mod ws;
