//! The six scenarios, one module each; `main` runs the ones asked for.

pub(crate) mod allocs;
pub(crate) mod chat;
pub(crate) mod fanin;
pub(crate) mod memory;
pub(crate) mod oneway;
pub(crate) mod rtt;
