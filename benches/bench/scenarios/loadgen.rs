//! Scenario 4's load generator: the same room load against chatpipe's chat
//! server, nats-server and redis-server pub/sub, driven the same way.
//!
//! One thread (a `LocalExecutor`), one plain TCP connection per client, a
//! reader task per connection that parses what arrives in place (no
//! allocation per message), and senders that write each message as soon as
//! it is made, batched only as far as a write takes what a sender has made
//! since its last one (at most [`BATCH`] messages). Only the wire format
//! differs between the three:
//!
//! - **chatpipe**: 4-byte length prefix, then the Chat payload; each client
//!   takes a nickname (a request answered by an Ack) so the room has it;
//!   keepalive frames between runs, as a client's driver would send.
//! - **NATS**: `CONNECT {"echo":false,..}`, `SUB chat 1`, then `PUB chat 64`
//!   per message and `MSG chat 1 64` per delivery (no echo: a sender does
//!   not get its own, as in the room).
//! - **Redis**: `SUBSCRIBE chat` on one connection per client; a subscribed
//!   connection cannot publish, so each sender also has a second
//!   connection for `PUBLISH chat <text>` (its replies read and dropped). A
//!   sender's subscriber gets its own messages too: they are read, not
//!   counted as deliveries.
//! - **the fan-out floor** (`--serve-floor`, [`serve_floor`]): chatpipe's
//!   wire, served by the least a server of chatpipe's design does.

use std::cell::RefCell;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use chatpipe::chat::{Chat, ChatMessage};
use chatpipe::Protocol;
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::{Async, LocalExecutor};

use super::chat::{is_trouble, CHAT_TEXT};
use crate::stacks::{write_from, Handoff, Len4, HANDOFF_CAPACITY};
use futures::{SinkExt as _, StreamExt as _};

/// Most messages a sender writes at once in a saturated run.
pub(crate) const BATCH: usize = 32;

/// The servers driven.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Server {
    Chatpipe,
    Nats,
    Redis,
    /// The fan-out floor (`--serve-floor`), on chatpipe's wire.
    Floor,
    /// The fan-out floor on every executor thread (`--serve-floor-threads`).
    FloorThreads,
}

impl Server {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Server::Chatpipe => "chatpipe chat_server",
            Server::Nats => "nats-server",
            Server::Redis => "redis-server",
            Server::Floor => "fan-out floor",
            Server::FloorThreads => "fan-out floor, all threads",
        }
    }

    /// Whether the server speaks chatpipe's chat protocol.
    fn speaks_chat(self) -> bool {
        matches!(
            self,
            Server::Chatpipe | Server::Floor | Server::FloorThreads
        )
    }
}

/// A server in a process of its own, killed when dropped.
pub(crate) struct Running {
    pub(crate) addr: SocketAddr,
    child: Child,
    /// What the server says of itself (its version).
    pub(crate) version: String,
}

impl Running {
    /// CPU seconds (user + system) the server's process has used.
    pub(crate) fn cpu_secs(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (ticks(11) + ticks(12)) / crate::harness::clock_ticks()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // The chat server ends cleanly once its stdin does (which a
        // profiler running it needs to write its profile).
        if self.child.stdin.take().is_some() {
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(60) {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first of `names` on `PATH`.
fn on_path(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits until `addr` takes connections.
fn wait_listening(addr: SocketAddr, what: &str) {
    let t0 = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what} did not listen on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The chat server's executor threads: one per core, or
/// `CHATPIPE_BENCH_CHAT_THREADS`.
pub(crate) fn chat_threads() -> usize {
    std::env::var("CHATPIPE_BENCH_CHAT_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Starts `server`, or says why not (not installed).
pub(crate) fn start(server: Server, threads: usize) -> Result<Running, String> {
    match server {
        Server::Chatpipe | Server::Floor | Server::FloorThreads => {
            // This very bench program, as the room's server (`--serve-chat`)
            // or the fan-out floor (`--serve-floor`).
            let mode = match server {
                Server::Floor => "--serve-floor",
                Server::FloorThreads => "--serve-floor-threads",
                _ => "--serve-chat",
            };
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            // For profiling the server alone: a command to run it under,
            // e.g. CHATPIPE_BENCH_SERVER_WRAP="valgrind --tool=callgrind".
            let wrap = std::env::var("CHATPIPE_BENCH_SERVER_WRAP").unwrap_or_default();
            let mut words = wrap.split_whitespace();
            let mut cmd = match words.next() {
                Some(first) => {
                    let mut cmd = Command::new(first);
                    cmd.args(words).arg(exe);
                    cmd
                }
                None => Command::new(exe),
            };
            let mut child = cmd
                .arg(mode)
                .env("SMOL_THREADS", threads.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| format!("{mode}: {e}"))?;
            let mut line = String::new();
            BufReader::new(child.stdout.take().expect("stdout"))
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            let addr = line
                .trim()
                .strip_prefix("LISTENING ")
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| format!("{mode} said {line:?}"))?;
            Ok(Running {
                addr,
                child,
                version: match server {
                    Server::Floor | Server::FloorThreads => {
                        format!("the bench's {mode} (this tree)")
                    }
                    _ => format!("chatpipe {} (this tree)", env!("CARGO_PKG_VERSION")),
                },
            })
        }
        Server::Nats | Server::Redis => {
            let bin = if server == Server::Nats {
                "nats-server"
            } else {
                "redis-server"
            };
            let path = on_path(bin).ok_or_else(|| {
                format!("{bin} not found on PATH (Debian: apt-get install {bin}); skipped")
            })?;
            let version = Command::new(&path)
                .arg("--version")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            let port = free_port();
            let mut cmd = Command::new(&path);
            if server == Server::Nats {
                cmd.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
            } else {
                cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .args(["--save", "", "--appendonly", "no", "--daemonize", "no"]);
            }
            let child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("{bin}: {e}"))?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let running = Running {
                addr,
                child,
                version,
            };
            wait_listening(addr, bin);
            Ok(running)
        }
    }
}

/// `--serve-chat`: the room in this process, as `examples/chat_server.rs`
/// serves it (its tasks on smol's global executor, `SMOL_THREADS` threads),
/// with no rate limit, room for the bench's clients, and log lines only
/// about trouble (on stderr). Says `LISTENING <addr>`; ends when stdin
/// does.
pub(crate) fn serve_chat() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let addr = listener.local_addr().unwrap();
    let config = chatpipe_chat::Config {
        rate: None,
        max_per_ip: 1_000,
        max_connections: 1_000,
        events: std::sync::Arc::new(|event| {
            if is_trouble(&event) {
                eprintln!("chat server: {event}");
            }
        }),
        ..chatpipe_chat::Config::default()
    };
    let stdin_closed = listening(addr);
    let listener = smol::net::TcpListener::try_from(listener).expect("async listener");
    smol::block_on(chatpipe_chat::serve(listener, config, stdin_closed));
}

/// Says `LISTENING <addr>` on stdout, and gives what ends when stdin does:
/// how a `--serve-*` server meets the bench that started it (`start`).
fn listening(addr: SocketAddr) -> impl std::future::Future<Output = ()> {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "LISTENING {addr}");
    let _ = out.flush();
    smol::unblock(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
    })
}

/// `--serve-floor`: the fan-out floor, the least a chat server of
/// chatpipe's design does for the paced target, on chatpipe's wire. One
/// smol thread; per connection a task that reads and decodes frames (the
/// Chat protocol) and one that writes whatever is queued for it as one
/// batch (the handoff floor's writer, as a connection's driver); a chat is
/// encoded once as a Broadcast and its bytes queued for every other
/// member, whatever is queued already. No room task, no limits, no
/// history, no locks, no timers.
/// Says `LISTENING <addr>`; ends when stdin does.
pub(crate) fn serve_floor() {
    let (listener, stdin_closed) = floor_listener();
    let ex = Rc::new(LocalExecutor::new());
    type Members = Rc<RefCell<Vec<(u64, Handoff<Bytes>)>>>;
    let members = Members::default();
    let accept = accept_all(listener, |id, s| {
        let out = Handoff::new(HANDOFF_CAPACITY);
        members.borrow_mut().push((id, out.clone()));
        let write = asynchronous_codec::FramedWrite::new(s.clone(), Len4);
        ex.spawn(write_from(out.clone(), write)).detach();
        let read = asynchronous_codec::FramedRead::new(s, Len4);
        let members = members.clone();
        ex.spawn(async move {
            let reply = |b| out.push_now(b);
            // Unbounded, as nothing here drops a slow member: the
            // load generator reads everything.
            let others = |b: &Bytes| {
                for (_, q) in members.borrow().iter().filter(|(m, _)| *m != id) {
                    q.push_now(b.clone());
                }
            };
            floor_member(id, read, reply, others).await;
            members.borrow_mut().retain(|(m, _)| *m != id);
            out.close();
        })
        .detach();
    });
    smol::block_on(ex.run(smol::future::or(accept, stdin_closed)));
}

/// The floors' listener on a free loopback port, said with `listening`,
/// and what ends when stdin does.
fn floor_listener() -> (Async<TcpListener>, impl std::future::Future<Output = ()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let addr = listener.local_addr().unwrap();
    let listener = Async::new(listener).expect("async listener");
    (listener, listening(addr))
}

/// The floors' accept loop: each connection, numbered and with Nagle's
/// algorithm off, to `serve`.
async fn accept_all(
    listener: Async<TcpListener>,
    mut serve: impl FnMut(u64, smol::net::TcpStream),
) {
    for id in 0u64.. {
        let Ok((s, _)) = listener.accept().await else {
            continue;
        };
        let s = smol::net::TcpStream::from(s);
        let _ = s.set_nodelay(true);
        serve(id, s);
    }
}

/// `--serve-floor-threads`: the fan-out floor on smol's global executor
/// with `SMOL_THREADS` threads, as the room runs: the same tasks as
/// [`serve_floor`]'s, each member's queue an `async-channel` (a lock-free
/// queue that any thread may push to) and the member list behind a
/// `RwLock`. What using every core costs a server of chatpipe's design
/// when the load generator shares the machine.
pub(crate) fn serve_floor_threads() {
    let (listener, stdin_closed) = floor_listener();
    type Members = std::sync::Arc<std::sync::RwLock<Vec<(u64, smol::channel::Sender<Bytes>)>>>;
    let members = Members::default();
    let accept = accept_all(listener, |id, s| {
        let (tx, rx) = smol::channel::unbounded::<Bytes>();
        members.write().unwrap().push((id, tx.clone()));
        let mut write = asynchronous_codec::FramedWrite::new(s.clone(), Len4);
        smol::spawn(async move {
            // Everything queued as one batch, as `write_from` does.
            while let Ok(first) = rx.recv().await {
                write.feed(first).await.unwrap();
                while let Ok(b) = rx.try_recv() {
                    write.feed(b).await.unwrap();
                }
                write.flush().await.unwrap();
            }
            let _ = write.close().await;
        })
        .detach();
        let read = asynchronous_codec::FramedRead::new(s, Len4);
        let members = members.clone();
        smol::spawn(async move {
            let reply = |b| {
                let _ = tx.try_send(b);
            };
            let others = |b: &Bytes| {
                for (_, q) in members.read().unwrap().iter().filter(|(m, _)| *m != id) {
                    let _ = q.try_send(b.clone());
                }
            };
            floor_member(id, read, reply, others).await;
            members.write().unwrap().retain(|(m, _)| *m != id);
        })
        .detach();
    });
    smol::block_on(smol::future::or(accept, stdin_closed));
}

/// One member of the fan-out floor: its frames read and answered (a
/// nickname with an Ack, through `reply`), each chat encoded once and
/// given to `others`.
async fn floor_member(
    id: u64,
    mut read: asynchronous_codec::FramedRead<smol::net::TcpStream, Len4>,
    reply: impl Fn(Bytes),
    others: impl Fn(&Bytes),
) {
    let encode = |msg: &ChatMessage| {
        let mut buf = BytesMut::new();
        if let Some(body) = Chat.encode(msg, &mut buf).expect("encodes") {
            buf.extend_from_slice(&body);
        }
        buf.freeze()
    };
    let mut name = format!("m{id}");
    while let Some(Ok(frame)) = read.next().await {
        match Chat.decode(frame.freeze()) {
            Ok(Some(ChatMessage::SetNickname {
                request_id,
                nickname,
            })) => {
                name = nickname;
                reply(encode(&ChatMessage::Ack { request_id }));
            }
            Ok(Some(ChatMessage::Chat { text })) => {
                let from = name.clone();
                others(&encode(&ChatMessage::Broadcast { from, text }));
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------
// The wire formats
// ---------------------------------------------------------------------------

/// A chatpipe frame: length prefix and the Chat payload.
fn chat_frame(msg: &ChatMessage, out: &mut Vec<u8>) {
    let mut buf = BytesMut::new();
    buf.put_u32(0);
    let body = Chat.encode(msg, &mut buf).expect("encodes");
    if let Some(body) = body {
        buf.extend_from_slice(&body);
    }
    let len = (buf.len() - 4) as u32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&buf);
}

/// Appends the message carrying `text` as `server` takes it.
fn put_message(server: Server, text: &[u8], out: &mut Vec<u8>) {
    match server {
        Server::Chatpipe | Server::Floor | Server::FloorThreads => {
            // Chat (type 0): the text as a long string.
            out.extend_from_slice(&(4 + 2 + text.len() as u32).to_be_bytes());
            out.extend_from_slice(&0u32.to_be_bytes());
            out.extend_from_slice(&(text.len() as u16).to_be_bytes());
            out.extend_from_slice(text);
        }
        Server::Nats => {
            let _ = write!(out, "PUB chat {}\r\n", text.len());
            out.extend_from_slice(text);
            out.extend_from_slice(b"\r\n");
        }
        Server::Redis => {
            let _ = write!(
                out,
                "*3\r\n$7\r\nPUBLISH\r\n$4\r\nchat\r\n${}\r\n",
                text.len()
            );
            out.extend_from_slice(text);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// What one parsed item was.
enum Item<'a> {
    /// A delivery, with its text.
    Text(&'a [u8]),
    /// The server's answer to our setup (Ack, PONG, subscribe).
    Ready,
    /// A PING to answer (NATS).
    Ping,
    /// Anything else (a keepalive, INFO, ...).
    Other,
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

fn num(b: &[u8]) -> Option<usize> {
    std::str::from_utf8(b).ok()?.trim().parse().ok()
}

/// Parses one item at the start of `buf`: the item and its length, or
/// `None` if it is not all there yet.
fn parse(server: Server, buf: &[u8]) -> Option<(Item<'_>, usize)> {
    match server {
        Server::Chatpipe | Server::Floor | Server::FloorThreads => {
            let len = u32::from_be_bytes(buf.get(..4)?.try_into().ok()?) as usize;
            let p = buf.get(4..4 + len)?;
            let ty = u32::from_be_bytes(p.get(..4)?.try_into().ok()?);
            let item = match ty {
                // Broadcast: from (short string), text (long string).
                1 => {
                    let fl = p[4] as usize;
                    let at = 5 + fl;
                    let tl = u16::from_be_bytes([p[at], p[at + 1]]) as usize;
                    Item::Text(&p[at + 2..at + 2 + tl])
                }
                // Ack.
                4 => Item::Ready,
                _ => Item::Other,
            };
            Some((item, 4 + len))
        }
        Server::Nats => {
            let end = find_crlf(buf)?;
            let line = &buf[..end];
            if let Some(rest) = line.strip_prefix(b"MSG ") {
                let n = num(rest.rsplit(|&b| b == b' ').next()?)?;
                let body = buf.get(end + 2..end + 2 + n + 2)?;
                Some((Item::Text(&body[..n]), end + 2 + n + 2))
            } else if line == b"PING" {
                Some((Item::Ping, end + 2))
            } else if line == b"PONG" {
                Some((Item::Ready, end + 2))
            } else if line.starts_with(b"-ERR") {
                panic!("nats-server: {}", String::from_utf8_lossy(line));
            } else {
                Some((Item::Other, end + 2))
            }
        }
        Server::Redis => {
            // A push: *3, then three bulk strings, or two and an integer.
            let end = find_crlf(buf)?;
            if buf[0] != b'*' {
                // An integer reply or an error, not expected here.
                assert!(
                    buf[0] != b'-',
                    "redis-server: {}",
                    String::from_utf8_lossy(&buf[..end])
                );
                return Some((Item::Other, end + 2));
            }
            let n = num(&buf[1..end])?;
            let mut at = end + 2;
            let mut last: &[u8] = &[];
            let mut first: &[u8] = &[];
            for i in 0..n {
                let e = at + find_crlf(buf.get(at..)?)?;
                let head = &buf[at..e];
                if head[0] == b'$' {
                    let l = num(&head[1..])?;
                    let s = buf.get(e + 2..e + 2 + l + 2)?;
                    last = &s[..l];
                    at = e + 2 + l + 2;
                } else {
                    last = head;
                    at = e + 2;
                }
                if i == 0 {
                    first = last;
                }
            }
            let item = match first {
                b"message" => Item::Text(last),
                b"subscribe" => Item::Ready,
                _ => Item::Other,
            };
            Some((item, at))
        }
    }
}

/// A Chat text carrying `sent`, nanoseconds since the run's base `Instant`.
fn text_into(sent: u64, sender: usize, seq: u64, out: &mut Vec<u8>) {
    let start = out.len();
    let _ = write!(out, "{sent:020} {sender:03} {seq:09} ");
    out.resize(start + CHAT_TEXT, b'.');
}

/// The send time and sender a text carries.
fn text_fields(text: &[u8]) -> (u64, usize) {
    let parse = |b: Option<&[u8]>| b.and_then(num);
    match (parse(text.get(..20)), parse(text.get(21..24))) {
        (Some(sent), Some(sender)) => (sent as u64, sender),
        _ => panic!("chat fan-out: no timestamp in {text:?}"),
    }
}

// ---------------------------------------------------------------------------
// Clients and runs
// ---------------------------------------------------------------------------

type Stream = Rc<Async<TcpStream>>;

/// One client: the connection it listens on (and, but for Redis, sends on)
/// and, for a Redis sender, the one it publishes on.
pub(crate) struct Client {
    listen: Stream,
    publish: Option<Stream>,
    /// Bytes read but not parsed yet, kept between runs.
    pending: Rc<RefCell<Vec<u8>>>,
}

async fn connect(addr: SocketAddr) -> Stream {
    let s = Async::<TcpStream>::connect(addr).await.expect("connect");
    s.get_ref().set_nodelay(true).ok();
    Rc::new(s)
}

/// Reads from `s` into `pending` and parses it, calling `on` for each item,
/// until `on` says stop. NATS PINGs are answered.
async fn read_items(
    server: Server,
    s: &Stream,
    pending: &RefCell<Vec<u8>>,
    mut on: impl FnMut(Item<'_>) -> bool,
) {
    let mut buf = std::mem::take(&mut *pending.borrow_mut());
    let mut chunk = vec![0u8; 64 * 1024];
    let mut done = false;
    loop {
        let mut at = 0;
        while !done {
            let Some((item, n)) = parse(server, &buf[at..]) else {
                break;
            };
            at += n;
            if let Item::Ping = item {
                (&**s).write_all(b"PONG\r\n").await.expect("PONG");
            } else if !on(item) {
                done = true;
            }
        }
        buf.drain(..at);
        if done {
            *pending.borrow_mut() = buf;
            return;
        }
        let n = (&**s).read(&mut chunk).await.expect("read");
        assert!(n > 0, "{}: connection closed", server.name());
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Connects `n` clients to `server`, the first `senders` of them able to
/// send; once this returns, each is in the room (subscribed).
pub(crate) async fn connect_all(
    server: Server,
    addr: SocketAddr,
    n: usize,
    senders: usize,
) -> Vec<Client> {
    let mut cs = Vec::with_capacity(n);
    for i in 0..n {
        let listen = connect(addr).await;
        let mut hello = Vec::new();
        match server {
            Server::Chatpipe | Server::Floor | Server::FloorThreads => {
                chat_frame(&ChatMessage::set_nickname(format!("c{i:03}")), &mut hello)
            }
            Server::Nats => hello.extend_from_slice(
                b"CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false,\"name\":\"bench\"}\r\n\
                  SUB chat 1\r\nPING\r\n",
            ),
            Server::Redis => hello.extend_from_slice(b"*2\r\n$9\r\nSUBSCRIBE\r\n$4\r\nchat\r\n"),
        }
        (&*listen).write_all(&hello).await.expect("hello");
        let pending = Rc::new(RefCell::new(Vec::new()));
        read_items(server, &listen, &pending, |item| {
            !matches!(item, Item::Ready)
        })
        .await;
        let publish = if server == Server::Redis && i < senders {
            Some(connect(addr).await)
        } else {
            None
        };
        cs.push(Client {
            listen,
            publish,
            pending,
        });
    }
    cs
}

/// Between runs: what a chatpipe client's driver sends when idle, so the
/// room's idle timeout does not end the clients that only listen.
pub(crate) async fn keep_alive(server: Server, cs: &[Client]) {
    if !server.speaks_chat() {
        return;
    }
    let mut ka = Vec::new();
    chat_frame(&ChatMessage::Keepalive, &mut ka);
    for c in cs {
        (&*c.listen).write_all(&ka).await.expect("keepalive");
    }
}

/// What one run measured.
pub(crate) struct Run {
    /// From the first send to the last delivery, seconds.
    pub(crate) secs: f64,
    pub(crate) deliveries: u64,
    /// Per delivery, receive time minus embedded send time, ns; sorted.
    pub(crate) latencies: Vec<u64>,
}

/// One run: the first `senders` clients each send `msgs` messages, as fast
/// as the connection takes them or, with `pace`, at that many messages/s
/// each (staggered); every client takes every message meant for it.
pub(crate) async fn run(
    ex: &Rc<LocalExecutor<'static>>,
    server: Server,
    cs: &[Client],
    senders: usize,
    msgs: u64,
    pace: Option<f64>,
) -> Run {
    let base = Instant::now();
    let receivers: Vec<_> = cs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let is_sender = i < senders;
            // Redis echoes a sender's own messages to its subscriber.
            let arrive =
                msgs * (senders - usize::from(is_sender && server != Server::Redis)) as u64;
            let expect = msgs * (senders - usize::from(is_sender)) as u64;
            let (s, pending) = (c.listen.clone(), c.pending.clone());
            ex.spawn(async move {
                let mut lat = Vec::with_capacity(expect as usize);
                let mut last = base;
                let mut seen = 0u64;
                if arrive > 0 {
                    read_items(server, &s, &pending, |item| {
                        if let Item::Text(text) = item {
                            seen += 1;
                            let (sent, from) = text_fields(text);
                            if from != i {
                                last = Instant::now();
                                let now = last.duration_since(base).as_nanos() as u64;
                                lat.push(now.saturating_sub(sent));
                            }
                        }
                        seen < arrive
                    })
                    .await;
                }
                assert_eq!(lat.len() as u64, expect, "{}: client {i}", server.name());
                (lat, last)
            })
        })
        .collect();
    // Redis: each PUBLISH is answered (how many got it): read and dropped.
    let replies: Vec<_> = cs[..senders]
        .iter()
        .filter_map(|c| c.publish.clone())
        .map(|s| {
            ex.spawn(async move {
                let mut chunk = vec![0u8; 16 * 1024];
                let mut lines = 0u64;
                while lines < msgs {
                    let n = (&*s).read(&mut chunk).await.expect("read replies");
                    assert!(n > 0, "redis-server: publisher closed");
                    lines += chunk[..n].iter().filter(|&&b| b == b'\n').count() as u64;
                }
            })
        })
        .collect();
    let sending: Vec<_> = cs[..senders]
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let s = c.publish.clone().unwrap_or_else(|| c.listen.clone());
            ex.spawn(async move {
                let start = base
                    + pace.map_or(Duration::ZERO, |r| {
                        Duration::from_secs_f64(i as f64 / (r * senders as f64))
                    });
                let (mut out, mut text) = (Vec::with_capacity(BATCH * 128), Vec::new());
                let mut seq = 0;
                while seq < msgs {
                    let batch = match pace {
                        Some(rate) => {
                            let due = start + Duration::from_secs_f64(seq as f64 / rate);
                            if Instant::now() < due {
                                smol::Timer::at(due).await;
                            }
                            1
                        }
                        None => BATCH as u64,
                    };
                    out.clear();
                    for _ in 0..batch.min(msgs - seq) {
                        text.clear();
                        text_into(base.elapsed().as_nanos() as u64, i, seq, &mut text);
                        put_message(server, &text, &mut out);
                        seq += 1;
                    }
                    (&*s).write_all(&out).await.expect("send");
                }
            })
        })
        .collect();
    for s in sending {
        s.await;
    }
    for r in replies {
        r.await;
    }
    let mut latencies = Vec::new();
    let mut end = base;
    for r in receivers {
        let (lat, last) = r.await;
        latencies.extend(lat);
        end = end.max(last);
    }
    latencies.sort_unstable();
    Run {
        secs: end.duration_since(base).as_secs_f64(),
        deliveries: latencies.len() as u64,
        latencies,
    }
}
