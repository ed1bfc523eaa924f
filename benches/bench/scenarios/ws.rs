//! Scenario: ws, what WebSocket framing costs (the browser client's
//! transport, chatpipe_chat::web). chatpipe on smol over plain TCP and
//! over a WebSocket (async-tungstenite, each write one binary message, the
//! client's frames masked as a browser's are) through `web::WsIo`, measured
//! side by side in one run: oneway throughput of 1 KiB messages, and the
//! round trip of a 64 B request. The measuring and the table are the tls
//! scenario's (`tls::compare` with `Wrap::Ws`).

use crate::report::Report;
use crate::scenarios::tls::{compare, measures, Wrap};
use crate::Cfg;

pub(crate) fn scenario_ws(cfg: &Cfg, rep: &mut Report) {
    let heading = format!(
        "## ws: what WebSocket framing costs\n\n\
         chatpipe on smol (`send().await`, `request()`), over plain TCP and over a WebSocket \
         (async-tungstenite through `chatpipe_chat::web::WsIo`, the browser client's transport; \
         one binary message per write, client frames masked), in the same run. {}",
        measures(cfg)
    );
    compare(cfg, rep, "ws", "WebSocket", Wrap::Ws, &heading);
}
