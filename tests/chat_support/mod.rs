//! What the chat tests share: the example's server run in-process, and a
//! chatpipe chat client.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatpipe::chat::{Chat, ChatMessage};
use chatpipe::{Builder, Error, Incoming, Sender};
use futures::StreamExt;
use smol::channel;
use smol::future::FutureExt;
use smol::net::{TcpListener, TcpStream};
use smol::{Task, Timer};

#[path = "../../examples/chat/server.rs"]
pub mod server;

/// Runs a test body, failing it if it takes longer than `limit`.
pub fn run<T>(limit: Duration, body: impl Future<Output = T>) -> T {
    smol::block_on(body.or(async move {
        Timer::after(limit).await;
        panic!("test timed out after {limit:?}")
    }))
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub stop: channel::Sender<()>,
    pub done: Task<()>,
    pub log: Arc<Mutex<Vec<String>>>,
}

/// Starts the example's server with its default settings on a free
/// loopback port, logging into memory.
pub async fn start() -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_with(listener, server::Config::default())
}

pub fn start_with(listener: TcpListener, config: server::Config) -> TestServer {
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    let config = server::Config {
        log: Arc::new(move |line| sink.lock().unwrap().push(line)),
        ..config
    };
    let (stop, stopped) = channel::bounded::<()>(1);
    let shutdown = async move {
        let _ = stopped.recv().await;
    };
    let done = smol::spawn(server::serve(listener, config, shutdown));
    TestServer {
        addr,
        stop,
        done,
        log,
    }
}

/// A loopback listener whose connections have a small, fixed send buffer
/// (accepted sockets inherit it), so that what a peer does not read backs
/// up into the server quickly instead of into megabytes of kernel buffer.
pub fn small_buffered_listener() -> TcpListener {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_send_buffer_size(16 * 1024).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    s.listen(128).unwrap();
    TcpListener::try_from(std::net::TcpListener::from(s)).unwrap()
}

impl TestServer {
    /// Waits until a log line contains every one of `parts`, and returns it.
    pub async fn wait_for_log(&self, parts: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log.lock().unwrap().clone();
            if let Some(line) = log.iter().find(|l| parts.iter().all(|p| l.contains(p))) {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {parts:?} in {log:#?}"
            );
            Timer::after(Duration::from_millis(10)).await;
        }
    }

    /// Stops the server as a signal would, waits until it has closed every
    /// connection, and returns its log.
    pub async fn shutdown(self) -> Vec<String> {
        drop(self.stop);
        self.done.await;
        let log = self.log.lock().unwrap();
        log.clone()
    }
}

pub struct Client {
    pub sender: Sender<Chat>,
    pub incoming: Incoming<Chat>,
    pub driver: Task<Result<(), Error>>,
    pub addr: SocketAddr,
}

pub async fn connect(server: SocketAddr) -> Client {
    let stream = TcpStream::connect(server).await.unwrap();
    let addr = stream.local_addr().unwrap();
    let (sender, incoming, conn) = Builder::new().build(stream, Chat);
    Client {
        sender,
        incoming,
        driver: smol::spawn(conn),
        addr,
    }
}

impl Client {
    pub async fn nick(&self, name: &str) -> ChatMessage {
        let request = ChatMessage::set_nickname(name);
        self.sender.request(request).await.unwrap()
    }

    pub async fn say(&self, text: &str) {
        let msg = ChatMessage::Chat { text: text.into() };
        self.sender.send(msg).await.unwrap();
    }

    /// The next broadcast, as `(from, text)`.
    pub async fn next(&mut self) -> (String, String) {
        next_broadcast(&mut self.incoming).await
    }

    /// Closes cleanly, and checks that the connection ended cleanly.
    pub async fn close(self) {
        self.sender.close();
        self.driver.await.unwrap();
    }
}

pub async fn next_broadcast(incoming: &mut Incoming<Chat>) -> (String, String) {
    match incoming.next().await {
        Some(Ok(ChatMessage::Broadcast { from, text })) => (from, text),
        other => panic!("expected a broadcast, got {other:?}"),
    }
}

/// Connects `n` clients named `c0`, `c1`, ... one after another; each
/// Ack also proves the server has that client in the room.
pub async fn connect_named(server: SocketAddr, n: usize) -> Vec<Client> {
    let mut clients = Vec::new();
    for i in 0..n {
        let c = connect(server).await;
        assert!(matches!(
            c.nick(&format!("c{i}")).await,
            ChatMessage::Ack { .. }
        ));
        clients.push(c);
    }
    clients
}

impl TestServer {
    /// How many log lines contain `part`.
    pub fn count(&self, part: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(part))
            .count()
    }

    /// Waits (bounded by the test's limit) until `n` log lines contain
    /// `part`.
    pub async fn wait_count(&self, part: &str, n: usize) {
        while self.count(part) < n {
            Timer::after(Duration::from_millis(5)).await;
        }
    }
}
