//! The chat room behind `examples/chat_server.rs`.
//!
//! It lives in its own file so the end-to-end tests run the very same
//! server in-process (`tests/chat_e2e.rs` includes it with `#[path]`).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatpipe::chat::{Chat, ChatMessage};
use chatpipe::{Builder, Error, Sender, TrySendError};
use futures::StreamExt;
use smol::channel;
use smol::future::FutureExt;
use smol::net::{TcpListener, TcpStream};

/// Where log lines go.
pub type Log = Arc<dyn Fn(String) + Send + Sync>;

/// How the server runs.
#[derive(Clone)]
pub struct Config {
    /// Keepalive interval of every connection. Silence for three of them
    /// disconnects a client.
    pub keepalive: Duration,
    /// How many broadcasts may wait for one client. A client whose queue is
    /// full when a broadcast comes is too slow and is disconnected: the
    /// room never waits for it, and never silently skips it either.
    pub queue: usize,
    /// How long shutdown waits for clients to close cleanly before
    /// dropping them.
    pub grace: Duration,
    /// Connections, disconnections and errors are reported here.
    pub log: Log,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            keepalive: Duration::from_secs(5),
            queue: 1024,
            grace: Duration::from_secs(5),
            log: Arc::new(|line| eprintln!("{line}")),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("keepalive", &self.keepalive)
            .field("queue", &self.queue)
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

/// Serves the chat room on `listener` until `shutdown` resolves; then stops
/// accepting, closes every connection gracefully and returns once they are
/// all gone (or `grace` has passed and the rest were dropped).
pub async fn serve(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) {
    let room = Arc::new(Room {
        config,
        members: Mutex::new(HashMap::new()),
    });
    // Every client task holds a clone, to tell when they have all ended.
    let (alive, all_gone) = channel::bounded::<()>(1);

    let accept = async {
        let mut next_id = 0;
        loop {
            match listener.accept().await {
                Ok((stream, addr)) => {
                    next_id += 1;
                    // Joined here, not in the task, so that shutdown sees
                    // every connection it must close.
                    let task = room.join(next_id, stream, addr);
                    let alive = alive.clone();
                    smol::spawn(async move {
                        task.await;
                        drop(alive);
                    })
                    .detach();
                }
                Err(e) => {
                    room.log(format_args!("accept failed: {e}"));
                    // Out of file descriptors, say: do not spin.
                    smol::Timer::after(Duration::from_millis(100)).await;
                }
            }
        }
    };
    accept.or(shutdown).await;
    drop(listener);
    drop(alive);

    let senders: Vec<_> = room.lock().values().map(|m| m.sender.clone()).collect();
    room.log(format_args!(
        "shutting down: closing {} connection(s)",
        senders.len()
    ));
    for s in &senders {
        s.close();
    }
    drop(senders);
    // Nothing is ever sent on `alive`: `recv` fails once every client task
    // has ended, or gives `Ok` here when the grace period is over first.
    let grace = async {
        smol::Timer::after(room.config.grace).await;
        Ok(())
    };
    if all_gone.recv().or(grace).await.is_ok() {
        // Still open after the grace period: drop them.
        for m in room.lock().values() {
            let _ = m.kick.try_send("did not close in time at shutdown".into());
        }
        let _ = all_gone.recv().await;
    }
    room.log(format_args!("stopped"));
}

struct Room {
    config: Config,
    members: Mutex<HashMap<u64, Member>>,
}

struct Member {
    addr: SocketAddr,
    nickname: Option<String>,
    sender: Sender<Chat>,
    /// Tells the member's task to drop its connection, and why.
    kick: channel::Sender<String>,
}

impl Member {
    /// The name others see: the nickname, or the address until one is set.
    fn name(&self) -> String {
        match &self.nickname {
            Some(nick) => nick.clone(),
            None => self.addr.to_string(),
        }
    }
}

impl Room {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Member>> {
        // The map stays consistent even if a holder panicked.
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn log(&self, args: fmt::Arguments<'_>) {
        (self.config.log)(args.to_string());
    }

    /// Sends `text` from member `id` to every other member, without ever
    /// waiting: a member whose queue is full is disconnected.
    fn broadcast(&self, id: u64, text: String) {
        let members = self.lock();
        let Some(from) = members.get(&id).map(Member::name) else {
            return;
        };
        let msg = ChatMessage::Broadcast { from, text };
        for (_, m) in members.iter().filter(|(&other, _)| other != id) {
            match m.sender.try_send(msg.clone()) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    // Its task drops the connection and leaves the room;
                    // until then, further kicks are no-ops.
                    let reason = format!(
                        "too slow: its queue of {} messages stayed full",
                        self.config.queue
                    );
                    let _ = m.kick.try_send(reason);
                }
                // The message itself cannot go out (too large for a
                // frame): it cannot go to anyone.
                Err(TrySendError::Failed(e))
                    if matches!(e.error, Error::FrameTooLarge { .. } | Error::Encode(_)) =>
                {
                    drop(members);
                    self.log(format_args!("broadcast not sent: {}", e.error));
                    return;
                }
                // That member's connection is ending; its task cleans up.
                Err(TrySendError::Failed(_)) => {}
            }
        }
    }

    /// Gives member `id` the nickname unless another member holds it.
    fn set_nickname(&self, id: u64, nickname: &str) -> Result<(), String> {
        let mut members = self.lock();
        if members
            .iter()
            .any(|(&other, m)| other != id && m.nickname.as_deref() == Some(nickname))
        {
            return Err(format!(
                "nickname {nickname:?} is already taken by another client"
            ));
        }
        match members.get_mut(&id) {
            Some(m) => {
                m.nickname = Some(nickname.to_owned());
                Ok(())
            }
            None => Err("you are being disconnected".into()),
        }
    }

    /// Adds a connection to the room; the returned future serves it until
    /// it ends, then takes it out.
    fn join(
        self: &Arc<Self>,
        id: u64,
        stream: TcpStream,
        addr: SocketAddr,
    ) -> impl Future<Output = ()> + Send + 'static {
        // Chat lines are small and latency matters more than packet count;
        // the connection coalesces writes anyway.
        let _ = stream.set_nodelay(true);
        let (sender, incoming, conn) = Builder::new()
            .keepalive_interval(Some(self.config.keepalive))
            .send_capacity(self.config.queue)
            .build(stream, Chat);
        let (kick, kicked) = channel::bounded(1);
        let member = Member {
            addr,
            nickname: None,
            sender: sender.clone(),
            kick,
        };
        self.lock().insert(id, member);
        self.log(format_args!("{addr} connected"));
        let room = self.clone();

        async move {
            // The driver, unless the room drops the connection first
            // (dropping the driver closes it at once).
            let driver = async {
                match conn.await {
                    Ok(()) => "closed cleanly".to_owned(),
                    Err(e) => format!("error: {e}"),
                }
            };
            let kicked = async {
                match kicked.recv().await {
                    Ok(reason) => format!("disconnected by the server: {reason}"),
                    Err(_) => std::future::pending().await,
                }
            };
            let mut incoming = incoming;
            let reading = async {
                while let Some(Ok(msg)) = incoming.next().await {
                    handle(&room, id, addr, &sender, msg).await;
                }
            };
            let (reason, ()) = smol::future::zip(driver.or(kicked), reading).await;

            let nickname = room.lock().remove(&id).and_then(|m| m.nickname);
            let name = match nickname {
                Some(n) => format!("{addr} ({n})"),
                None => addr.to_string(),
            };
            room.log(format_args!("{name} disconnected: {reason}"));
        }
    }
}

async fn handle(room: &Room, id: u64, addr: SocketAddr, sender: &Sender<Chat>, msg: ChatMessage) {
    match msg {
        ChatMessage::Chat { text } => room.broadcast(id, text),
        ChatMessage::SetNickname {
            request_id,
            nickname,
        } => {
            let reply = match room.set_nickname(id, &nickname) {
                Ok(()) => {
                    room.log(format_args!("{addr} is now known as {nickname:?}"));
                    ChatMessage::Ack { request_id }
                }
                Err(message) => {
                    room.log(format_args!("{addr} refused {nickname:?}: {message}"));
                    ChatMessage::Nak {
                        request_id,
                        message,
                    }
                }
            };
            // Waiting here slows only this client's own reading.
            let _ = sender.send(reply).await;
        }
        // A server-to-client message: meaningless here.
        ChatMessage::Broadcast { .. } => {
            room.log(format_args!("{addr} sent a Broadcast; ignored"));
        }
        // Keepalives and responses never reach the application.
        ChatMessage::Keepalive | ChatMessage::Ack { .. } | ChatMessage::Nak { .. } => {}
    }
}
