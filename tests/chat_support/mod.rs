//! What the chat tests share: the chat room (`chatpipe_chat`) run
//! in-process, recording its events, and a chatpipe chat client.
#![allow(dead_code)]

#[path = "../common/ports.rs"]
mod ports;
#[allow(unused_imports)] // Only the tests that restart a server use it.
pub use ports::restartable_port;

use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use chatpipe::chat::{Chat, ChatMessage, RequestId, V0_5, V0_6};
use chatpipe::{Builder, Error, Incoming, Sender};
use futures::StreamExt;
use smol::channel;
use smol::future::FutureExt;
use smol::net::{TcpListener, TcpStream};
use smol::{Task, Timer};

use chatpipe_chat::{Config, Disconnect, Event};

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
    pub events: Arc<Mutex<Vec<Event>>>,
}

/// Starts the room with its default settings on a free loopback port,
/// recording its events.
pub async fn start() -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_with(listener, Config::default())
}

pub fn start_with(listener: TcpListener, config: Config) -> TestServer {
    let addr = listener.local_addr().unwrap();
    start_on(vec![chatpipe_chat::Listener::plain(listener)], addr, config)
}

/// Starts the room on `listeners` (plaintext or TLS); `addr` is the one
/// the tests connect to.
pub fn start_on(
    listeners: Vec<chatpipe_chat::Listener>,
    addr: SocketAddr,
    config: Config,
) -> TestServer {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let config = Config {
        events: Arc::new(move |event| sink.lock().unwrap().push(event)),
        ..config
    };
    let (stop, stopped) = channel::bounded::<()>(1);
    let shutdown = async move {
        let _ = stopped.recv().await;
    };
    let done = smol::spawn(chatpipe_chat::serve_on(listeners, config, shutdown));
    TestServer {
        addr,
        stop,
        done,
        events,
    }
}

/// A loopback listener whose connections have a small, fixed send buffer
/// (accepted sockets inherit it), so that what a peer does not read backs
/// up into the server quickly instead of into megabytes of kernel buffer.
pub fn small_buffered_listener() -> TcpListener {
    listener_with(16 * 1024, 128)
}

/// A loopback listener whose accepted connections have a send buffer of
/// `send_buffer` bytes (the kernel doubles it), with room for `backlog`
/// connections not yet accepted.
pub fn listener_with(send_buffer: usize, backlog: i32) -> TcpListener {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_send_buffer_size(send_buffer).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    s.listen(backlog).unwrap();
    TcpListener::try_from(std::net::TcpListener::from(s)).unwrap()
}

/// This process's resident set size, in bytes (`/proc/self/statm`).
pub fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * usize::try_from(page).unwrap_or(4096)
}

/// Gives freed heap memory back to the system (glibc), so that RSS counts
/// what is in use.
pub fn malloc_trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own heap.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Raises the soft open-file limit to at least `want` if the hard limit
/// allows; returns the soft limit then in force.
pub fn raise_nofile(want: u64) -> u64 {
    // SAFETY: a zeroed rlimit is valid; the calls read or write just it.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < want {
            let raised = libc::rlimit {
                rlim_cur: want.min(lim.rlim_max),
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = raised.rlim_cur;
            }
        }
        lim.rlim_cur
    }
}

impl TestServer {
    /// Waits until an event gives `Some`, and returns what it gave.
    pub async fn wait_for<T>(&self, mut found: impl FnMut(&Event) -> Option<T>) -> T {
        // A hang guard only: generous, for a machine under full load.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(t) = self.events.lock().unwrap().iter().find_map(&mut found) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "not among the events: {:#?}",
                self.events.lock().unwrap()
            );
            Timer::after(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the client at `addr` has left, and returns why.
    pub async fn disconnected(&self, addr: SocketAddr) -> Disconnect {
        self.wait_for(|e| match e {
            Event::Disconnected {
                addr: a, reason, ..
            } if *a == addr => Some(reason.clone()),
            _ => None,
        })
        .await
    }

    /// How many events are `which`.
    pub fn count(&self, which: impl Fn(&Event) -> bool) -> usize {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| which(e))
            .count()
    }

    /// Waits (bounded by the test's limit) until `n` events are `which`.
    pub async fn wait_count(&self, which: impl Fn(&Event) -> bool, n: usize) {
        while self.count(&which) < n {
            Timer::after(Duration::from_millis(5)).await;
        }
    }

    /// Stops the server as a signal would, waits until it has closed every
    /// connection, and returns its events.
    pub async fn shutdown(self) -> Vec<Event> {
        drop(self.stop);
        self.done.await;
        std::mem::take(&mut self.events.lock().unwrap())
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

/// A Hello offering `versions` and asking for `capabilities`, without
/// credentials.
pub fn hello(versions: &[u16], capabilities: &[&str]) -> ChatMessage {
    ChatMessage::Hello {
        request_id: RequestId::random(),
        versions: versions.to_vec(),
        capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
        credentials: String::new(),
    }
}

/// Connects and says Hello (0.5 and 0.6) asking for `capabilities`;
/// returns the client and its Welcome.
pub async fn connect_v06(server: SocketAddr, capabilities: &[&str]) -> (Client, ChatMessage) {
    let c = connect(server).await;
    let welcome = c.ask(hello(&[V0_5, V0_6], capabilities)).await;
    assert!(
        matches!(welcome, ChatMessage::Welcome { version: V0_6, .. }),
        "{welcome:?}"
    );
    (c, welcome)
}

impl Client {
    /// Sends a request and returns its answer.
    pub async fn ask(&self, request: ChatMessage) -> ChatMessage {
        self.sender.request(request).await.unwrap()
    }

    /// The next message, whatever it is.
    pub async fn recv(&mut self) -> ChatMessage {
        match self.incoming.next().await {
            Some(Ok(msg)) => msg,
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

/// The path of a built example, next to this test's own binary.
pub fn example(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<this test> -> target/<profile>/examples/<name>
    let dir = exe.parent().unwrap().parent().unwrap().join("examples");
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --examples` (a plain `cargo test` does)",
        path.display()
    );
    path
}

// The built examples, run as programs.

/// A hang guard only: generous, for a machine under full load.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// A running example: its stdout and stderr lines arrive on channels, and
/// it is killed if the test ends first.
pub struct Program {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub stdout: mpsc::Receiver<String>,
    pub stderr: mpsc::Receiver<String>,
}

fn lines(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

pub fn run_example(name: &str, args: &[&str]) -> Program {
    let mut command = Command::new(example(name));
    if name == "chat_server" {
        // No history file left behind in the working directory.
        command.args(["--db", ":memory:"]);
    }
    command.args(args);
    spawn(command)
}

/// Runs `command` as a [`Program`]: its stdin, stdout and stderr piped.
pub fn spawn(mut command: Command) -> Program {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Program {
        stdin: child.stdin.take(),
        stdout: lines(child.stdout.take().unwrap()),
        stderr: lines(child.stderr.take().unwrap()),
        child,
    }
}

impl Program {
    /// The next line on stdout.
    pub fn line(&self) -> String {
        self.stdout
            .recv_timeout(TIMEOUT)
            .expect("a line on stdout in time")
    }

    /// Waits for a stderr line containing `part`.
    pub fn stderr_line(&self, part: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) if line.contains(part) => return line,
                Ok(_) => {}
                Err(e) => panic!("no stderr line with {part:?}: {e}"),
            }
        }
    }

    pub fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Closes stdin: the end of input.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the program did not exit");
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[cfg(unix)]
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(status.success());
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the server on a free port and returns it with its address.
pub fn server() -> (Program, String) {
    let server = run_example("chat_server", &["--listen", "127.0.0.1:0"]);
    let first = server.line();
    let addr = first
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("first line: {first:?}"))
        .to_owned();
    (server, addr)
}
