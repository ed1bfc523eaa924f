//! chat_client stays connected: the server stops and comes back on the same
//! address, and the clients come back on their own, with their nicknames;
//! lines typed meanwhile go out once it is back, in order, once. Past the
//! buffer they are refused, visibly; quitting while the server is away
//! exits 0 and says what was not sent.
//!
//! Runs the built examples (`cargo build --examples` first when run alone).

use std::time::Instant;

mod chat_support;
use chat_support::{restartable_port, run_example, Program};

/// `chat_server` on `addr` (port 0: a free one); returns it and the
/// address it bound.
fn server_on(addr: &str) -> (Program, String) {
    let server = run_example("chat_server", &["--listen", addr]);
    let first = server.line();
    let bound = first.strip_prefix("listening on ").unwrap().to_owned();
    (server, bound)
}

fn client(addr: &str, extra: &[&str]) -> Program {
    let mut args = vec!["--connect", addr, "--line"];
    args.extend_from_slice(extra);
    run_example("chat_client", &args)
}

/// The next line someone said, past presence news (`* bo joined`) and
/// the server's notices (`! server: the server is shutting down`).
fn said(c: &Program) -> String {
    for _ in 0..10 {
        let line = c.line();
        if !line.starts_with("* ") && !line.starts_with("! server: ") {
            return line;
        }
    }
    panic!("only presence news");
}

/// Stops the server as an operator would, and waits until it has exited.
fn stop(mut server: Program) {
    server.signal("-TERM");
    assert!(server.wait().success());
}

#[test]
fn clients_come_back_after_a_restart_and_send_what_was_typed_meanwhile() {
    let (server, addr) = server_on(&format!("127.0.0.1:{}", restartable_port()));
    let mut ana = client(&addr, &["--v06", "--nick", "ana"]);
    assert_eq!(ana.line(), "* you are now ana");
    // Bo speaks v0.6 too, with history: whether bo is back before ana's
    // lines go out (live) or after (history on joining), each reaches bo
    // once, in order.
    let mut bo = client(&addr, &["--v06", "--nick", "bo"]);
    assert_eq!(bo.line(), "* you are now bo");
    ana.type_line("before");
    assert_eq!(said(&bo), "ana: before");

    stop(server);
    for c in [&ana, &bo] {
        let lost = c.stderr_line("reconnecting in");
        assert!(
            lost.starts_with("* connection closed by the server; "),
            "{lost}"
        );
    }
    // Typed while the server is away.
    ana.type_line("while away 1");
    ana.type_line("while away 2");

    let (_server, again) = server_on(&addr);
    assert_eq!(again, addr);
    let back = Instant::now();
    ana.stderr_line("* reconnected");
    bo.stderr_line("* reconnected");
    eprintln!("both clients back {:?} after the restart", back.elapsed());
    // Once each, in order, under the nickname claimed again.
    assert_eq!(said(&bo).replace("[history] ", ""), "ana: while away 1");
    assert_eq!(said(&bo).replace("[history] ", ""), "ana: while away 2");
    bo.type_line("welcome back");
    assert_eq!(said(&ana).replace("[history] ", ""), "bo: welcome back");
    ana.type_line("after");
    assert_eq!(said(&bo), "ana: after");
    for mut c in [ana, bo] {
        c.close_stdin();
        assert!(c.wait().success());
    }
}

#[test]
fn past_the_buffer_lines_are_refused_and_quitting_while_away_exits_0() {
    let (server, addr) = server_on("127.0.0.1:0");
    let mut bo = client(&addr, &["--nick", "bo", "--buffer", "2"]);
    assert_eq!(bo.line(), "* you are now bo");
    stop(server);
    bo.stderr_line("reconnecting in");
    bo.type_line("one");
    bo.type_line("two");
    bo.type_line("three");
    bo.stderr_line("! not sent: the server is away and the buffer is full");
    // The end of input, during the reconnect wait: a clean exit, and what
    // was never sent is said.
    bo.close_stdin();
    bo.stderr_line("! 2 line(s) not sent: the server was away");
    assert!(bo.wait().success());
}

#[test]
fn quit_while_a_line_waits_for_the_server_exits_0() {
    let (server, addr) = server_on("127.0.0.1:0");
    let mut ana = client(&addr, &["--v06", "--nick", "ana"]);
    assert_eq!(ana.line(), "* you are now ana");
    stop(server);
    ana.stderr_line("reconnecting in");
    // Over v0.6 a line is a request, acked: it waits for the server.
    ana.type_line("waiting");
    ana.type_line("also waiting");
    ana.type_line("/quit");
    ana.stderr_line("! 2 line(s) not sent: the server was away");
    assert!(ana.wait().success());
}
