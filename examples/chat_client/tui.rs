//! The terminal UI (ratatui on crossterm), for a person at a terminal.
//!
//! ```text
//! ┌ messages ───────────────────────────────────┐┌ members (2) ──────┐
//! │12:00:01 * you are now ana                   ││ana                │
//! │12:00:04 bo: hi ana                          ││bo                 │
//! │12:00:09 ana: hello bo ✓                     ││                   │
//! │12:00:11 [private] bo: psst                  ││                   │
//! └─────────────────────────────────────────────┘└───────────────────┘
//!  ana │ v0.6 │ 127.0.0.1:33333
//! > half-typed text stays here
//! ```
//!
//! Three kinds of work feed one channel of events, which the UI task
//! handles one at a time, redrawing after each batch: a thread reads the
//! terminal's keys; a task does the handshake, then reads the connection;
//! a task sends what is typed, in order, and reports each answer (the ack
//! that turns `…` into `✓`). The screen is drawn from the state alone, so
//! what arrives never touches the input line.

use std::io;
use std::process::ExitCode;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chatpipe::chat::{capability, Chat, ChatMessage, Credentials, Login, Nickname, V0_6};
use chatpipe::{Error, Session, SessionIncoming, SessionStates};
use chatpipe_chat::client::{
    members_line, one_line, Command, Direct, EntryId, EntryKind, Mark, Negotiated, Say, Shown,
    View, Who,
};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Position};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, List, Paragraph, Wrap};
use ratatui::Frame;
use smol::channel;
use smol::future::FutureExt as _;

use crate::connect::{change, Change, Client, Me, Note};
use crate::{describe, may_send_password, Args};

/// What the UI task handles.
enum Ev {
    /// A key, a resize.
    Term(Event),
    /// The terminal cannot be read any more.
    TermGone(io::Error),
    /// News from the setup step of a (re)connection.
    Note(Note),
    /// Connected, lost, reconnecting, or the end.
    Change(Change),
    /// A message from the server.
    Arrived(ChatMessage),
    /// The answer to something sent.
    Done(Done),
    /// SIGTERM, SIGHUP or SIGINT: quit as /quit does.
    Signal,
}

/// What the sending task is asked to send.
enum Out {
    /// v0.5: a Chat, shown as this line.
    Chat(EntryId, String),
    /// v0.6: a Say, acked.
    Say(EntryId, String),
    /// v0.6: a Direct.
    Direct(EntryId, String, String),
    /// v0.6: a Who; `quiet` fills the member list without a line.
    Who {
        quiet: bool,
    },
    Nick(String),
    /// v0.6: a Login (or registration).
    Login(Credentials),
    /// Give up: the session stops trying.
    GiveUp,
}

/// How something sent turned out.
enum Done {
    /// A Chat that could not be sent (too long, or the buffer is full).
    ChatFailed(EntryId, String),
    /// A Say's or Direct's answer.
    Settled(EntryId, Result<Result<(), String>, Error>),
    Members {
        quiet: bool,
        answer: Result<Result<(u32, Vec<String>), String>, Error>,
    },
    Nick(String, Result<Result<(), String>, Error>),
    /// A Login's answer: registered (or logged in), the nickname.
    Login(Credentials, Result<Result<(), String>, Error>),
}

/// What the input line is asking for instead of a line to say.
enum Prompt {
    /// The password to register this nickname with.
    Register(String),
    /// The password of this nickname's account.
    Login(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    V06,
    Fallback,
    /// `--v05`: no Hello sent.
    V05,
    /// Lost; reconnecting.
    Reconnecting,
    Disconnected,
}

impl State {
    fn label(self) -> &'static str {
        match self {
            State::Connecting => "connecting…",
            State::V06 => "v0.6",
            State::Fallback => "v0.5 fallback",
            State::V05 => "v0.5",
            State::Reconnecting => "reconnecting…",
            State::Disconnected => "disconnected",
        }
    }
}

/// Restores the terminal when dropped: on every way out of [`run`].
/// (ratatui's panic hook restores it on a panic too.)
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

pub async fn run(args: Args, client: Client) -> ExitCode {
    let Client {
        session,
        incoming,
        driver,
        notes,
        me,
        secure,
        connected_to: _,
    } = client;
    let mut terminal = match ratatui::try_init() {
        Ok(t) => t,
        Err(e) => {
            ratatui::restore();
            eprintln!("cannot open the terminal UI: {e} (--line runs without it)");
            return ExitCode::FAILURE;
        }
    };
    let restore = Restore;

    let (events, inbox) = channel::unbounded();
    let (out, outbox) = channel::unbounded();
    read_keys(events.clone());
    catch_signals(&events);
    let offer = !args.v05;
    let reconnect = !args.no_reconnect;
    smol::spawn(network(incoming, events.clone())).detach();
    let states = session.states();
    smol::spawn(watch(states, notes, me.clone(), reconnect, events.clone())).detach();
    smol::spawn(sending(session.clone(), outbox, events)).detach();

    let mut app = App {
        view: View::new(),
        input: Input::default(),
        state: State::Connecting,
        offer,
        nickname: None,
        addr: args.connect.clone(),
        wanted_nick: args.nick.clone().filter(|_| !me.has_credentials()),
        me,
        prompt: None,
        secure,
        allow_plaintext: args.allow_plaintext_credentials,
        waiting: Vec::new(),
        from_bottom: 0,
        pane: (0, 0),
        out,
        quit: false,
        lost: false,
    };
    let mut failed = None;
    while !app.quit {
        if let Err(e) = terminal.draw(|f| app.draw(f)) {
            failed = Some(e);
            break;
        }
        let Ok(ev) = inbox.recv().await else { break };
        app.handle(ev);
        // Whatever else is ready too, before drawing again.
        while let (false, Ok(ev)) = (app.quit, inbox.try_recv()) {
            app.handle(ev);
        }
    }
    drop(restore);
    if let Some(e) = failed {
        eprintln!("cannot draw: {e}");
    }

    // Everything accepted is written before the connection closes; a
    // server that does not close its side in time is not waited for. What
    // waited for a server that is away is said, not dropped silently.
    session.disconnect();
    // The sending task ends, and with it its handle on the session.
    app.out.close();
    let unsent = session.take_buffered().len();
    if unsent > 0 {
        eprintln!("! {unsent} line(s) not sent: the server was away");
    }
    drop(session);
    let closed = async {
        driver.await;
        true
    };
    let timeout = async {
        smol::Timer::after(Duration::from_secs(2)).await;
        false
    };
    let closed = closed.or(timeout).await;
    match (app.lost, closed) {
        (false, true) => ExitCode::SUCCESS,
        (false, false) => {
            eprintln!("the server did not close the connection in time");
            ExitCode::FAILURE
        }
        (true, _) => {
            if let Some(problem) = app
                .view
                .entries()
                .rev()
                .find(|e| e.kind == EntryKind::Problem)
            {
                eprintln!("{}", problem.text);
            }
            ExitCode::FAILURE
        }
    }
}

/// A thread that blocks on the terminal's keys.
fn read_keys(events: channel::Sender<Ev>) {
    std::thread::spawn(move || loop {
        let ev = match event::read() {
            Ok(e) => Ev::Term(e),
            Err(e) => {
                let _ = events.send_blocking(Ev::TermGone(e));
                return;
            }
        };
        if events.send_blocking(ev).is_err() {
            return;
        }
    });
}

#[cfg(unix)]
fn catch_signals(events: &channel::Sender<Ev>) {
    use async_signal::{Signal, Signals};
    if let Ok(mut signals) = Signals::new([Signal::Term, Signal::Hup, Signal::Int]) {
        let events = events.clone();
        smol::spawn(async move {
            while signals.next().await.is_some() {
                if events.send(Ev::Signal).await.is_err() {
                    break;
                }
            }
        })
        .detach();
    }
}

#[cfg(not(unix))]
fn catch_signals(_: &channel::Sender<Ev>) {}

/// Every message from the server, over every connection.
async fn network(mut incoming: SessionIncoming<Chat>, events: channel::Sender<Ev>) {
    // The history a reconnect brings again is shown once.
    let mut shown = Shown::default();
    while let Some(msg) = incoming.next().await {
        if !shown.fresh(&msg) {
            continue;
        }
        if events.send(Ev::Arrived(msg)).await.is_err() {
            return;
        }
    }
}

/// What the session goes through, and the setup step's news before it.
async fn watch(
    mut states: SessionStates,
    notes: channel::Receiver<Note>,
    me: Arc<Me>,
    reconnect: bool,
    events: channel::Sender<Ev>,
) {
    while let Some(state) = states.next().await {
        while let Ok(note) = notes.try_recv() {
            if events.send(Ev::Note(note)).await.is_err() {
                return;
            }
        }
        let change = change(&state, &me, reconnect);
        if events.send(Ev::Change(change)).await.is_err() {
            return;
        }
    }
}

/// Sends what is typed, in the order typed, and reports each answer as it
/// comes; requests wait for their answers side by side.
async fn sending(
    sender: Session<Chat>,
    outbox: channel::Receiver<Out>,
    events: channel::Sender<Ev>,
) {
    enum Step {
        Out(Option<Out>),
        Done(Done),
    }
    let mut waiting: FuturesUnordered<BoxFuture<'static, Done>> = FuturesUnordered::new();
    loop {
        let next_out = async { Step::Out(outbox.recv().await.ok()) };
        let next_done = async {
            match waiting.next().await {
                Some(done) => Step::Done(done),
                None => std::future::pending().await,
            }
        };
        let out = match next_out.or(next_done).await {
            Step::Out(Some(out)) => out,
            Step::Out(None) => return,
            Step::Done(done) => {
                let _ = events.send(Ev::Done(done)).await;
                continue;
            }
        };
        let mut request: BoxFuture<'static, Done> = match out {
            Out::Chat(id, text) => {
                if let Err(e) = sender.send(ChatMessage::Chat { text }).await {
                    let _ = events
                        .send(Ev::Done(Done::ChatFailed(id, e.to_string())))
                        .await;
                }
                continue;
            }
            Out::Say(id, text) => {
                let s = sender.clone();
                async move { Done::Settled(id, s.call(Say(text)).await) }.boxed()
            }
            Out::Direct(id, to, text) => {
                let s = sender.clone();
                async move { Done::Settled(id, s.call(Direct { to, text }).await) }.boxed()
            }
            Out::Who { quiet } => {
                let s = sender.clone();
                async move {
                    let answer = s.call(Who).await;
                    Done::Members { quiet, answer }
                }
                .boxed()
            }
            Out::Nick(nick) => {
                let s = sender.clone();
                async move {
                    let answer = s.call(Nickname(nick.clone())).await;
                    Done::Nick(nick, answer)
                }
                .boxed()
            }
            Out::GiveUp => {
                sender.disconnect();
                continue;
            }
            Out::Login(credentials) => {
                let s = sender.clone();
                async move {
                    let answer = s.call(Login(credentials.clone())).await;
                    Done::Login(credentials, answer)
                }
                .boxed()
            }
        };
        // The first poll queues it (on the connection, or in the buffer
        // while the server is away), so requests go out in the order typed.
        match futures::poll!(request.as_mut()) {
            Poll::Ready(done) => {
                let _ = events.send(Ev::Done(done)).await;
            }
            Poll::Pending => waiting.push(request),
        }
    }
}

/// A line typed before the handshake ended, carried out once it has; with
/// its entry if it is already on screen.
struct Waiting(String, Option<EntryId>);

struct App {
    view: View,
    input: Input,
    state: State,
    /// Saying Hello (not `--v05`).
    offer: bool,
    nickname: Option<String>,
    addr: String,
    /// Who we are, for the next reconnect; what the server granted.
    me: Arc<Me>,
    /// `--nick`, asked for once connected (the session claims it again
    /// after a reconnect).
    wanted_nick: Option<String>,
    /// Asking for a password (/register, /login).
    prompt: Option<Prompt>,
    /// The connection is encrypted: passwords may go over it.
    secure: bool,
    /// `--allow-plaintext-credentials`.
    allow_plaintext: bool,
    waiting: Vec<Waiting>,
    /// How many lines the pane is scrolled back from the newest.
    from_bottom: usize,
    /// The message pane's inner width and height, as last drawn.
    pane: (u16, u16),
    out: channel::Sender<Out>,
    quit: bool,
    /// The connection ended without our asking (exit status 1).
    lost: bool,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl App {
    fn grants(&self, capability: &str) -> bool {
        self.me.grants(capability)
    }

    fn me(&self) -> String {
        match &self.nickname {
            Some(nick) => one_line(nick),
            None => "you".to_owned(),
        }
    }

    fn send(&mut self, out: Out) {
        // Fails only once the sending task is gone, with the connection.
        let _ = self.out.try_send(out);
    }

    fn problem(&mut self, text: impl Into<String>) {
        self.show(|view, now| view.info(EntryKind::Problem, text, now));
    }

    fn info(&mut self, text: impl Into<String>) {
        self.show(|view, now| view.info(EntryKind::Info, text, now));
    }

    /// Adds to the view; a pane scrolled back stays where it is.
    fn show<T>(&mut self, add: impl FnOnce(&mut View, u64) -> T) -> T {
        let t = add(&mut self.view, now_ms());
        if self.from_bottom > 0 {
            if let Some(entry) = self.view.entries().last() {
                self.from_bottom += entry_height(entry, self.pane.0);
            }
        }
        t
    }

    /// The handshake is over (or was never started): ask for the
    /// nickname and the members, then send what was typed meanwhile.
    fn connected(&mut self) {
        if let Some(nick) = self.wanted_nick.take() {
            self.send(Out::Nick(nick));
        }
        if self.grants(capability::PRESENCE) {
            self.send(Out::Who { quiet: true });
        }
        for Waiting(line, id) in std::mem::take(&mut self.waiting) {
            self.submit(line, id);
        }
    }

    /// Carries out a line typed; `shown` is the line's entry if it is
    /// already on screen (typed while connecting).
    fn submit(&mut self, line: String, shown: Option<EntryId>) {
        let connecting = self.state == State::Connecting;
        let disconnected = self.state == State::Disconnected;
        match Command::parse(&line) {
            Command::Quit => self.quit = true,
            Command::Empty => {}
            Command::Usage(usage) => self.problem(usage),
            _ if disconnected => self.problem("! not connected: /quit to leave"),
            Command::Nick(_) | Command::Who if connecting => {
                self.waiting.push(Waiting(line, None));
            }
            Command::Nick(nick) => self.send(Out::Nick(nick.to_owned())),
            Command::Say(text) => {
                let acked = self.grants(capability::ACK);
                let mark = if connecting || acked {
                    Mark::Pending
                } else {
                    Mark::None
                };
                let id = match shown {
                    Some(id) => {
                        self.view.mark(id, mark);
                        id
                    }
                    None => {
                        let text = format!("{}: {}", self.me(), one_line(text));
                        self.show(|view, now| view.own(text, mark, now))
                    }
                };
                if connecting {
                    self.waiting.push(Waiting(line, Some(id)));
                } else if acked {
                    self.send(Out::Say(id, text.to_owned()));
                } else {
                    self.send(Out::Chat(id, text.to_owned()));
                }
            }
            Command::Msg { .. } if !connecting && !self.grants(capability::DIRECT) => {
                if let Some(id) = shown {
                    self.view.mark(id, Mark::Refused("not sent".into()));
                }
                self.problem("! /msg needs a v0.6 server that grants `direct`");
            }
            Command::Msg { to, text } => {
                let id = match shown {
                    Some(id) => id,
                    None => {
                        let text = format!(
                            "[private] {} → {}: {}",
                            self.me(),
                            one_line(to),
                            one_line(text)
                        );
                        self.show(|view, now| view.own(text, Mark::Pending, now))
                    }
                };
                if connecting {
                    self.waiting.push(Waiting(line, Some(id)));
                } else {
                    self.send(Out::Direct(id, to.to_owned(), text.to_owned()));
                }
            }
            Command::Who if !self.grants(capability::PRESENCE) => {
                self.problem("! /who needs a v0.6 server that grants `presence`");
            }
            Command::Who => self.send(Out::Who { quiet: false }),
            Command::Register | Command::Login(_) if !self.grants(capability::ACCOUNT) => {
                self.problem("! accounts need a v0.6 server that grants `account`");
            }
            Command::Register => match self.nickname.clone() {
                None => self.problem("! /register: take a nickname first (/nick NAME)"),
                Some(nick) => self.ask_password(Prompt::Register(nick)),
            },
            Command::Login(nick) => self.ask_password(Prompt::Login(nick.to_owned())),
        }
    }

    /// The input line asks for a password next (shown as `*`s; Esc gives
    /// up), unless passwords may not go over this connection.
    fn ask_password(&mut self, prompt: Prompt) {
        match may_send_password(self.allow_plaintext, self.secure) {
            Ok(()) => {
                self.info("* type the password, then Enter (Esc to cancel)");
                self.prompt = Some(prompt);
            }
            Err(e) => self.problem(format!("! {e}")),
        }
    }

    /// The password typed at the prompt.
    fn password(&mut self, prompt: Prompt, password: String) {
        let credentials = match prompt {
            Prompt::Register(nickname) => Credentials::Register { nickname, password },
            Prompt::Login(nickname) => Credentials::Login { nickname, password },
        };
        match credentials.validate() {
            Ok(()) => self.send(Out::Login(credentials)),
            Err(e) => self.problem(format!("! {e}")),
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Term(Event::Key(key)) => self.key(key),
            Ev::Term(_) => {} // a resize: redrawn anyway
            Ev::TermGone(e) => {
                self.problem(format!("! cannot read the terminal: {e}"));
                self.quit = true;
            }
            Ev::Signal => self.quit = true,
            Ev::Note(note) => self.note(note),
            Ev::Change(change) => self.change(change),
            Ev::Arrived(msg) => self.show(|view, now| view.receive(&msg, now)),
            Ev::Done(done) => self.done(done),
        }
    }

    /// News from the setup step of a (re)connection.
    fn note(&mut self, note: Note) {
        match note {
            Note::Negotiated(negotiated) => {
                self.info(format!("* {}", describe(&negotiated)));
                self.state = match &negotiated {
                    Negotiated::Welcomed { version, .. } if *version >= V0_6 => State::V06,
                    _ => State::Fallback,
                };
            }
            Note::LoggedIn { nick, registered } => {
                let done = if registered {
                    "registered"
                } else {
                    "logged in as"
                };
                self.info(format!("* {done} {}", one_line(&nick)));
                self.nickname = Some(nick);
            }
            Note::Nick {
                nick,
                answer: Ok(()),
            } => self.nickname = Some(nick),
            Note::Nick {
                answer: Err(reason),
                ..
            } => self.problem(format!("! nickname refused: {}", one_line(&reason))),
        }
    }

    /// Connected, lost, reconnecting, or the end.
    fn change(&mut self, change: Change) {
        match change {
            Change::Connected { again } => {
                if !self.offer {
                    self.state = State::V05;
                }
                if again {
                    self.info("* reconnected");
                    if self.state == State::Reconnecting {
                        self.state = State::V05;
                    }
                }
                self.connected();
            }
            Change::Lost {
                reason,
                retry_in,
                undelivered,
            } => {
                self.state = State::Reconnecting;
                if undelivered > 0 {
                    self.problem(format!(
                        "! {undelivered} message(s) lost with the connection"
                    ));
                }
                self.problem(format!(
                    "* {reason}; reconnecting in {:.1} s",
                    retry_in.as_secs_f64()
                ));
            }
            Change::Fatal(why) => {
                self.state = State::Disconnected;
                self.lost = true;
                self.send(Out::GiveUp);
                self.problem(format!("! {why}"));
                for Waiting(_, id) in std::mem::take(&mut self.waiting) {
                    if let Some(id) = id {
                        self.view.mark(id, Mark::Refused("not sent".into()));
                    }
                }
            }
            Change::Quiet => {}
        }
    }

    fn done(&mut self, done: Done) {
        match done {
            Done::ChatFailed(id, e) => self.view.mark(id, Mark::Refused(e.to_string())),
            Done::Settled(id, answer) => self.view.settle(
                id,
                match answer {
                    Ok(outcome) => outcome,
                    Err(e) => Err(e.to_string()),
                },
            ),
            Done::Members { quiet, answer } => match answer {
                Ok(Ok((total, names))) => {
                    if !quiet {
                        self.info(members_line(total, &names));
                    }
                    self.view.set_members(names);
                }
                Ok(Err(reason)) => self.problem(format!("! /who: {}", one_line(&reason))),
                Err(e) => self.problem(format!("! /who failed: {e}")),
            },
            Done::Nick(nick, answer) => match answer {
                Ok(Ok(())) => {
                    if self.grants(capability::PRESENCE) {
                        self.view.renamed(self.nickname.as_deref(), &nick);
                    }
                    self.info(format!("* you are now {}", one_line(&nick)));
                    self.me.set_nick(&nick);
                    self.nickname = Some(nick);
                }
                Ok(Err(reason)) => {
                    self.problem(format!("! nickname refused: {}", one_line(&reason)));
                }
                Err(e) => self.problem(format!("! /nick {} failed: {e}", one_line(&nick))),
            },
            Done::Login(credentials, answer) => {
                let register = matches!(credentials, Credentials::Register { .. });
                let what = if register { "/register" } else { "/login" };
                let nick = credentials.nickname().to_owned();
                if let Ok(Ok(())) = answer {
                    // Logged in again after a reconnect.
                    self.me.logged_in(&credentials);
                }
                match answer {
                    Ok(Ok(())) if register => {
                        self.info(format!("* registered {}", one_line(&nick)))
                    }
                    Ok(Ok(())) => {
                        if self.grants(capability::PRESENCE) {
                            self.view.renamed(self.nickname.as_deref(), &nick);
                        }
                        self.info(format!("* logged in as {}", one_line(&nick)));
                        self.nickname = Some(nick);
                    }
                    Ok(Err(reason)) => self.problem(format!("! {what}: {}", one_line(&reason))),
                    Err(e) => self.problem(format!("! {what} failed: {e}")),
                }
            }
        }
    }

    fn key(&mut self, key: KeyEvent) {
        if key.kind == KeyEventKind::Release {
            return;
        }
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let page = usize::from(self.pane.1.saturating_sub(1)).max(1);
        match key.code {
            KeyCode::Char('c') if ctrl => self.quit = true,
            KeyCode::Char('u') if ctrl => self.input.clear(),
            KeyCode::Char(_) if ctrl || key.modifiers.contains(KeyModifiers::ALT) => {}
            KeyCode::Char(c) => self.input.insert(c),
            KeyCode::Esc if self.prompt.is_some() => {
                self.prompt = None;
                self.input.clear();
                self.info("* cancelled");
            }
            KeyCode::Enter => {
                let line = self.input.take();
                self.from_bottom = 0;
                match self.prompt.take() {
                    Some(prompt) => self.password(prompt, line),
                    None => self.submit(line, None),
                }
            }
            KeyCode::Backspace => self.input.backspace(),
            KeyCode::Delete => self.input.delete(),
            KeyCode::Left => self.input.left(),
            KeyCode::Right => self.input.right(),
            KeyCode::Home => self.input.home(),
            KeyCode::End => self.input.end(),
            KeyCode::PageUp => self.from_bottom += page,
            KeyCode::PageDown => self.from_bottom = self.from_bottom.saturating_sub(page),
            _ => {}
        }
    }

    fn draw(&mut self, f: &mut Frame) {
        let [main, status, input] = Layout::vertical([
            Constraint::Min(3),
            Constraint::Length(1),
            Constraint::Length(1),
        ])
        .areas(f.area());
        let [pane, members] =
            Layout::horizontal([Constraint::Min(20), Constraint::Length(24)]).areas(main);

        // Messages: only the entries on screen are laid out, newest last.
        let block = Block::bordered().title(" messages ");
        let inner = block.inner(pane);
        self.pane = (inner.width, inner.height);
        let height = usize::from(inner.height);
        let mut shown = Vec::new();
        let mut lines = 0;
        for entry in self.view.entries().rev() {
            if lines >= height + self.from_bottom {
                break;
            }
            lines += entry_height(entry, inner.width);
            shown.push(entry);
        }
        // Not further back than the oldest line.
        self.from_bottom = self.from_bottom.min(lines.saturating_sub(height));
        let top = lines.saturating_sub(height + self.from_bottom);
        let text: Vec<Line> = shown.into_iter().rev().map(entry_line).collect();
        let messages = Paragraph::new(text)
            .wrap(Wrap { trim: false })
            .scroll((u16::try_from(top).unwrap_or(u16::MAX), 0))
            .block(block);
        f.render_widget(messages, pane);

        // Members: from Who at the start, then Presence.
        if self.grants(capability::PRESENCE) {
            let names: Vec<&str> = self.view.members().collect();
            let title = format!(" members ({}) ", names.len());
            f.render_widget(
                List::new(names).block(Block::bordered().title(title)),
                members,
            );
        } else {
            let note = match self.state {
                State::Connecting => "",
                _ => "(needs v0.6)",
            };
            let note = Paragraph::new(note)
                .style(Style::new().fg(Color::DarkGray))
                .block(Block::bordered().title(" members "));
            f.render_widget(note, members);
        }

        // Status: who and how connected.
        let nick = match &self.nickname {
            Some(nick) => one_line(nick),
            None => "(no nickname)".to_owned(),
        };
        let mut line = format!(" {nick} │ {} │ {}", self.state.label(), self.addr);
        if self.from_bottom > 0 {
            line.push_str(" │ scrolled back: PageDown");
        }
        let style = match self.state {
            State::Disconnected => Style::new().bg(Color::Red).fg(Color::White),
            _ => Style::new().add_modifier(Modifier::REVERSED),
        };
        f.render_widget(Paragraph::new(line).style(style), status);

        // Input: "> " and as much of the text as fits, the cursor in view;
        // a password as `*`s.
        let label = match &self.prompt {
            None => "> ".to_owned(),
            Some(Prompt::Register(nick) | Prompt::Login(nick)) => {
                format!("password for {}: ", one_line(nick))
            }
        };
        let label_width = u16::try_from(label.chars().count()).unwrap_or(u16::MAX);
        let width = usize::from(input.width.saturating_sub(label_width)).max(1);
        let start = (self.input.cursor + 1).saturating_sub(width);
        let visible: String = match self.prompt {
            None => self.input.chars[start..].iter().take(width).collect(),
            Some(_) => "*".repeat((self.input.chars.len() - start).min(width)),
        };
        f.render_widget(Paragraph::new(format!("{label}{visible}")), input);
        let x = input.x + label_width + u16::try_from(self.input.cursor - start).unwrap_or(0);
        f.set_cursor_position(Position::new(x, input.y));
    }
}

/// An entry as one line (wrapped by the pane): time, text, mark.
fn entry_line(entry: &chatpipe_chat::client::Entry) -> Line<'_> {
    let style = match entry.kind {
        EntryKind::Said => Style::new(),
        EntryKind::Own => Style::new().fg(Color::LightBlue),
        EntryKind::Private => Style::new().fg(Color::Magenta),
        EntryKind::History => Style::new().fg(Color::Gray).add_modifier(Modifier::ITALIC),
        EntryKind::Presence | EntryKind::Info => Style::new().fg(Color::Cyan),
        EntryKind::Notice => Style::new().fg(Color::Yellow),
        EntryKind::Problem => Style::new().fg(Color::Red),
    };
    let mut spans = vec![
        Span::styled(hhmmss(entry.at_ms), Style::new().fg(Color::DarkGray)),
        Span::raw(" "),
        Span::styled(entry.text.as_str(), style),
    ];
    match &entry.mark {
        Mark::None => {}
        Mark::Pending => spans.push(Span::styled(" …", Style::new().fg(Color::Yellow))),
        Mark::Acked => spans.push(Span::styled(" ✓", Style::new().fg(Color::Green))),
        Mark::Refused(reason) => spans.push(Span::styled(
            format!(" ✗ {}", one_line(reason)),
            Style::new().fg(Color::Red),
        )),
    }
    Line::from(spans)
}

fn entry_height(entry: &chatpipe_chat::client::Entry, width: u16) -> usize {
    Paragraph::new(entry_line(entry))
        .wrap(Wrap { trim: false })
        .line_count(width)
        .max(1)
}

/// `HH:MM:SS` in local time (UTC where the C library cannot tell).
fn hhmmss(at_ms: u64) -> String {
    let secs = at_ms / 1000;
    #[cfg(unix)]
    {
        if let Ok(t) = libc::time_t::try_from(secs) {
            // SAFETY: localtime_r only writes the `tm` it is given, which
            // is plain old data; a null return means it did not.
            let mut tm: libc::tm = unsafe { std::mem::zeroed() };
            if !unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
                return format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec);
            }
        }
    }
    let s = secs % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// The input line's text and cursor (a char index).
#[derive(Default)]
struct Input {
    chars: Vec<char>,
    cursor: usize,
}

impl Input {
    fn insert(&mut self, c: char) {
        // Control characters would not be seen; a tab reads as a space.
        let c = if c == '\t' { ' ' } else { c };
        if !c.is_control() {
            self.chars.insert(self.cursor, c);
            self.cursor += 1;
        }
    }

    fn backspace(&mut self) {
        if self.cursor > 0 {
            self.cursor -= 1;
            self.chars.remove(self.cursor);
        }
    }

    fn delete(&mut self) {
        if self.cursor < self.chars.len() {
            self.chars.remove(self.cursor);
        }
    }

    fn left(&mut self) {
        self.cursor = self.cursor.saturating_sub(1);
    }

    fn right(&mut self) {
        self.cursor = (self.cursor + 1).min(self.chars.len());
    }

    fn home(&mut self) {
        self.cursor = 0;
    }

    fn end(&mut self) {
        self.cursor = self.chars.len();
    }

    fn clear(&mut self) {
        self.chars.clear();
        self.cursor = 0;
    }

    fn take(&mut self) -> String {
        self.cursor = 0;
        std::mem::take(&mut self.chars).into_iter().collect()
    }
}
