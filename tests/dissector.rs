//! `tools/chatpipe.lua`, the Wireshark dissector, on a real capture.
//!
//! tshark captures a scripted session on the loopback interface: every
//! message type of v0.5 and v0.6, encoded by `chatpipe::chat::Chat`, plus
//! two frames in one write, frames split across writes (in the header and
//! in the body), unknown types, malformed payloads and the largest frame.
//! Then tshark reads the capture with the dissector and every message must
//! come out with the fields it was encoded with, in order, each direction
//! on its own; the Info column must name each one; and the dissector must
//! find the same messages by its heuristic and by its port preference as
//! by Decode As.
//!
//! Needs `tshark` (`.ci/run` installs it when missing) and the right to
//! capture on `lo` (root, as CI runs). Without them the test fails; it is
//! never skipped.

#![cfg(target_os = "linux")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use chatpipe::chat::{
    Chat, ChatMessage, Credentials, Limits, PresenceChange, RequestId, MAX_PAYLOAD_LEN, V0_5, V0_6,
};
use chatpipe::{frame, Protocol};

/// Hang guard for each step; far above what any needs.
const STEP: Duration = Duration::from_secs(30);

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/chatpipe.lua");

/// One field of a dissected message: its filter name and its value as
/// tshark shows it (`None`: any value).
type Field = (String, Option<String>);

/// What the dissector must make of one frame.
struct Expected {
    /// The Info column's label for it.
    info: String,
    /// Every `chatpipe.*` field, in tree order.
    fields: Vec<Field>,
}

#[derive(Clone, Copy)]
enum Dir {
    ToServer,
    ToClient,
}

/// The bytes of one `write` on one socket.
struct Chunk {
    dir: Dir,
    bytes: Vec<u8>,
}

/// The session: the writes in order, and each direction's frames as the
/// dissector must show them.
#[derive(Default)]
struct Script {
    writes: Vec<Chunk>,
    to_server: Vec<Expected>,
    to_client: Vec<Expected>,
}

impl Script {
    fn expect(&mut self, dir: Dir, e: Expected) {
        match dir {
            Dir::ToServer => self.to_server.push(e),
            Dir::ToClient => self.to_client.push(e),
        }
    }

    /// A message in a write of its own.
    fn send(&mut self, dir: Dir, msg: ChatMessage, info: &str) {
        let bytes = encode(&msg);
        self.expect(dir, expected(&msg, info));
        self.writes.push(Chunk { dir, bytes });
    }

    /// A frame of raw payload bytes, in a write of its own.
    fn send_raw(&mut self, dir: Dir, payload: &[u8], info: &str, fields: Vec<Field>) {
        self.expect(
            dir,
            Expected {
                info: info.into(),
                fields,
            },
        );
        self.writes.push(Chunk {
            dir,
            bytes: framed(payload),
        });
    }

    fn write(&mut self, dir: Dir, bytes: Vec<u8>) {
        self.writes.push(Chunk { dir, bytes });
    }
}

fn encode(msg: &ChatMessage) -> Vec<u8> {
    let mut payload = BytesMut::new();
    assert!(Chat.encode(msg, &mut payload).unwrap().is_none());
    framed(&payload)
}

fn framed(payload: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    frame::encode(payload, u32::MAX as usize, &mut out).unwrap();
    out.to_vec()
}

/// An ASCII string as the Info column shows it: at most 40 bytes.
fn clip(s: &str) -> String {
    match s.len() > 40 {
        true => format!("{}…", &s[..40]),
        false => s.to_string(),
    }
}

fn field(name: &str, show: impl ToString) -> Field {
    (name.into(), Some(show.to_string()))
}

fn any(name: &str) -> Field {
    (name.into(), None)
}

/// A string field and its length, as the dissector nests them.
fn string(out: &mut Vec<Field>, name: &str, s: &str) {
    out.push(field(name, s));
    out.push(field("chatpipe.string_len", s.len()));
}

/// Credentials as the dissector shows them: the scheme and the nickname,
/// never the password.
fn credentials_field(out: &mut Vec<Field>, credentials: &str) {
    let shown = match Credentials::parse(credentials) {
        Ok(Some(c)) => format!(
            "{} {}",
            credentials.split('\0').next().unwrap(),
            c.nickname()
        ),
        _ => String::new(),
    };
    out.push(field("chatpipe.credentials", shown));
    out.push(field("chatpipe.string_len", credentials.len()));
}

/// How tshark shows a request id (a byte field).
fn id(r: &RequestId) -> String {
    r.0.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The fields the dissector must show for `msg`, from its own values: the
/// layout of docs/PROTOCOL.md, written out a second time.
fn expected(msg: &ChatMessage, info: &str) -> Expected {
    let mut payload = BytesMut::new();
    Chat.encode(msg, &mut payload).unwrap();
    let mut f = vec![
        field("chatpipe.len", payload.len()),
        field(
            "chatpipe.type",
            u32::from_be_bytes(payload[..4].try_into().unwrap()),
        ),
    ];
    let list = |f: &mut Vec<Field>, count: &str, name: &str, items: &[String]| {
        f.push(field(count, items.len()));
        items.iter().for_each(|s| string(f, name, s));
    };
    match msg {
        ChatMessage::Chat { text } | ChatMessage::Notice { text } => {
            string(&mut f, "chatpipe.text", text)
        }
        ChatMessage::Broadcast { from, text } | ChatMessage::Private { from, text } => {
            string(&mut f, "chatpipe.from", from);
            string(&mut f, "chatpipe.text", text);
        }
        ChatMessage::Keepalive => {}
        ChatMessage::SetNickname {
            request_id,
            nickname,
        } => {
            f.push(field("chatpipe.request_id", id(request_id)));
            string(&mut f, "chatpipe.nickname", nickname);
        }
        ChatMessage::Ack { request_id } | ChatMessage::Who { request_id } => {
            f.push(field("chatpipe.request_id", id(request_id)))
        }
        ChatMessage::Nak {
            request_id,
            message,
        } => {
            f.push(field("chatpipe.request_id", id(request_id)));
            string(&mut f, "chatpipe.message", message);
        }
        ChatMessage::Hello {
            request_id,
            versions,
            capabilities,
            credentials,
        } => {
            f.push(field("chatpipe.request_id", id(request_id)));
            f.push(field("chatpipe.versions.count", versions.len()));
            for v in versions {
                f.push(field("chatpipe.versions", format!("0x{v:04x}")));
            }
            list(
                &mut f,
                "chatpipe.capabilities.count",
                "chatpipe.capability",
                capabilities,
            );
            credentials_field(&mut f, credentials);
        }
        ChatMessage::Login {
            request_id,
            credentials,
        } => {
            f.push(field("chatpipe.request_id", id(request_id)));
            credentials_field(&mut f, credentials);
        }
        ChatMessage::Welcome {
            request_id,
            version,
            capabilities,
            limits,
        } => {
            f.push(field("chatpipe.request_id", id(request_id)));
            f.push(field("chatpipe.version", format!("0x{version:04x}")));
            list(
                &mut f,
                "chatpipe.capabilities.count",
                "chatpipe.capability",
                capabilities,
            );
            f.push(field("chatpipe.max_frame", limits.max_frame));
            f.push(field("chatpipe.rate", limits.rate_per_1000s));
            f.push(field("chatpipe.burst", limits.burst));
            f.push(field("chatpipe.keepalive_ms", limits.keepalive_ms));
        }
        ChatMessage::Say { request_id, text } => {
            f.push(field("chatpipe.request_id", id(request_id)));
            string(&mut f, "chatpipe.text", text);
        }
        ChatMessage::Direct {
            request_id,
            to,
            text,
        } => {
            f.push(field("chatpipe.request_id", id(request_id)));
            string(&mut f, "chatpipe.to", to);
            string(&mut f, "chatpipe.text", text);
        }
        ChatMessage::Members {
            request_id,
            total,
            names,
        } => {
            f.push(field("chatpipe.request_id", id(request_id)));
            f.push(field("chatpipe.total", total));
            list(&mut f, "chatpipe.names.count", "chatpipe.name", names);
        }
        ChatMessage::Presence {
            change,
            nickname,
            new_nickname,
        } => {
            let change = match change {
                PresenceChange::Joined => 0,
                PresenceChange::Left => 1,
                PresenceChange::Renamed => 2,
            };
            f.push(field("chatpipe.change", change));
            string(&mut f, "chatpipe.nickname", nickname);
            string(&mut f, "chatpipe.new_nickname", new_nickname);
        }
        ChatMessage::History { at_ms, from, text } => {
            f.push(field("chatpipe.at_ms", at_ms));
            string(&mut f, "chatpipe.from", from);
            string(&mut f, "chatpipe.text", text);
        }
    }
    Expected {
        info: info.into(),
        fields: f,
    }
}

/// The scripted session: every message type both ways, the awkward
/// framings, and what a dissector must not choke on.
fn script() -> Script {
    use Dir::{ToClient as S, ToServer as C};
    let mut s = Script::default();
    let caps: Vec<String> = ["ack", "direct", "presence", "history"]
        .map(String::from)
        .to_vec();
    let hello_id = RequestId(*b"\x00\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\xcc\xdd\xee\xff");
    let short = |r: &RequestId| format!("Ack id {}…", &r.to_string()[..8]);

    // The handshake, then what a v0.6 client is granted. The Hello goes
    // first: the heuristic run finds the conversation by it.
    s.send(
        C,
        ChatMessage::Hello {
            request_id: hello_id,
            versions: vec![V0_5, V0_6],
            capabilities: caps.clone(),
            credentials: String::new(),
        },
        "Hello versions 0.5, 0.6 [ack, direct, presence, history]",
    );
    s.send(
        S,
        ChatMessage::Welcome {
            request_id: hello_id,
            version: V0_6,
            capabilities: caps,
            limits: Limits {
                max_frame: MAX_PAYLOAD_LEN as u32,
                rate_per_1000s: 10_000,
                burst: 20,
                keepalive_ms: 5_000,
            },
        },
        "Welcome 0.6 [ack, direct, presence, history] max_frame 65813",
    );
    // Two frames in one write.
    let h1 = ChatMessage::History {
        at_ms: 1_700_000_000_000,
        from: "ana".into(),
        text: "Hi".into(),
    };
    let h2 = ChatMessage::History {
        at_ms: 1_700_000_001_500,
        from: "bo".into(),
        text: "ça va? ✓".into(),
    };
    s.expect(S, expected(&h1, "History ana: \"Hi\""));
    s.expect(S, expected(&h2, "History bo: \"ça va? ✓\""));
    s.write(S, [encode(&h1), encode(&h2)].concat());
    s.send(
        S,
        ChatMessage::Presence {
            change: PresenceChange::Joined,
            nickname: "bo".into(),
            new_nickname: String::new(),
        },
        "Presence bo joined",
    );

    // A login after the handshake: the password is never shown.
    let login_id = RequestId::random();
    s.send(
        C,
        ChatMessage::Login {
            request_id: login_id,
            credentials: Credentials::Login {
                nickname: "ana".into(),
                password: "hunter2".into(),
            }
            .encode(),
        },
        "Login login ana",
    );
    s.send(
        S,
        ChatMessage::Ack {
            request_id: login_id,
        },
        &short(&login_id),
    );

    // v0.5 requests and their answers.
    let (id2, id3) = (RequestId::random(), RequestId::random());
    s.send(
        C,
        ChatMessage::SetNickname {
            request_id: id2,
            nickname: "ana".into(),
        },
        "Set nickname \"ana\"",
    );
    s.send(S, ChatMessage::Ack { request_id: id2 }, &short(&id2));
    s.send(
        C,
        ChatMessage::SetNickname {
            request_id: id3,
            nickname: "bo".into(),
        },
        "Set nickname \"bo\"",
    );
    s.send(
        S,
        ChatMessage::Nak {
            request_id: id3,
            message: "nickname taken: bo".into(),
        },
        "Nak \"nickname taken: bo\"",
    );
    s.send(
        C,
        ChatMessage::Chat {
            text: "hello, room".into(),
        },
        "Chat \"hello, room\"",
    );
    s.send(
        S,
        ChatMessage::Broadcast {
            from: "bo".into(),
            text: "yo".into(),
        },
        "Broadcast bo: \"yo\"",
    );

    // v0.6 requests and their answers.
    let (id4, id5, id6) = (
        RequestId::random(),
        RequestId::random(),
        RequestId::random(),
    );
    s.send(
        C,
        ChatMessage::Say {
            request_id: id4,
            text: "Hi".into(),
        },
        "Say \"Hi\"",
    );
    s.send(S, ChatMessage::Ack { request_id: id4 }, &short(&id4));
    s.send(
        C,
        ChatMessage::Direct {
            request_id: id5,
            to: "bo".into(),
            text: "psst".into(),
        },
        "Direct to bo: \"psst\"",
    );
    s.send(
        S,
        ChatMessage::Private {
            from: "bo".into(),
            text: "psst back".into(),
        },
        "Private from bo: \"psst back\"",
    );
    s.send(C, ChatMessage::Who { request_id: id6 }, "Who");
    s.send(
        S,
        ChatMessage::Members {
            request_id: id6,
            total: 2,
            names: vec!["ana".into(), "bo".into()],
        },
        "Members 2: ana, bo",
    );

    // A frame split in its body, across two writes.
    let notice = ChatMessage::Notice {
        text: "server restarting in 5 minutes".into(),
    };
    s.expect(
        S,
        expected(&notice, "Notice \"server restarting in 5 minutes\""),
    );
    let bytes = encode(&notice);
    s.write(S, bytes[..12].to_vec());
    s.write(S, bytes[12..].to_vec());

    // A frame split in its header; the write that ends it carries two
    // more frames, the last of them cut short, ended by a third write.
    let keepalive = encode(&ChatMessage::Keepalive);
    let chat = ChatMessage::Chat {
        text: "after the split".into(),
    };
    let unknown = framed(&[0, 0, 0, 9, 0xde, 0xad, 0xbe, 0xef]);
    s.expect(C, expected(&ChatMessage::Keepalive, "Keepalive"));
    s.expect(C, expected(&chat, "Chat \"after the split\""));
    s.expect(
        C,
        Expected {
            info: "Unknown (9)".into(),
            fields: vec![
                field("chatpipe.len", 8),
                field("chatpipe.type", 9),
                field("chatpipe.data", "de:ad:be:ef"),
                any("chatpipe.unknown_type"),
            ],
        },
    );
    s.write(C, keepalive[..2].to_vec());
    s.write(C, [&keepalive[2..], &encode(&chat), &unknown[..6]].concat());
    s.write(C, unknown[6..].to_vec());

    // A whole frame and the start of the next one's header.
    let renamed = ChatMessage::Presence {
        change: PresenceChange::Renamed,
        nickname: "ana".into(),
        new_nickname: "anna".into(),
    };
    s.expect(S, expected(&ChatMessage::Keepalive, "Keepalive"));
    s.expect(S, expected(&renamed, "Presence ana renamed to anna"));
    let renamed = encode(&renamed);
    s.write(S, [&keepalive[..], &renamed[..2]].concat());
    s.write(S, renamed[2..].to_vec());
    s.send(
        S,
        ChatMessage::Presence {
            change: PresenceChange::Left,
            nickname: "bo".into(),
            new_nickname: String::new(),
        },
        "Presence bo left",
    );

    // What peers skip or refuse: the dissector flags it and goes on.
    s.send_raw(
        C,
        &[0xff; 4],
        "Unknown (4294967295)",
        vec![
            field("chatpipe.len", 4),
            field("chatpipe.type", u32::MAX),
            any("chatpipe.unknown_type"),
        ],
    );
    s.send_raw(
        S,
        &[0, 0, 0, 24, 7, 3, b'a', b'n', b'a', 0],
        "Presence unknown change 7",
        vec![
            field("chatpipe.len", 10),
            field("chatpipe.type", 24),
            field("chatpipe.change", 7),
            field("chatpipe.data", "03:61:6e:61:00"),
            any("chatpipe.unknown_change"),
        ],
    );
    // A set-nickname request whose id is cut short.
    s.send_raw(
        C,
        &[0, 0, 0, 3, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        "Set nickname [malformed]",
        vec![
            field("chatpipe.len", 14),
            field("chatpipe.type", 3),
            any("chatpipe.truncated"),
        ],
    );
    // A chat whose text is not UTF-8.
    s.send_raw(
        C,
        &[0, 0, 0, 0, 0, 2, 0xc3, 0x28],
        "Chat [malformed]",
        vec![
            field("chatpipe.len", 8),
            field("chatpipe.type", 0),
            any("chatpipe.text"),
            field("chatpipe.string_len", 2),
            any("chatpipe.invalid_utf8"),
        ],
    );
    // A keepalive with bytes after its (no) fields: ignored, noted.
    s.send_raw(
        C,
        &[0, 0, 0, 2, 0x42, 0x42],
        "Keepalive",
        vec![
            field("chatpipe.len", 6),
            field("chatpipe.type", 2),
            field("chatpipe.trailing", "42:42"),
            any("chatpipe.trailing_bytes"),
        ],
    );

    // The largest frame the protocol makes, which TCP segments itself.
    let to = "n".repeat(255);
    let text: String = (0..65_535u32)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let info = format!("Direct to {}: \"{}\"", clip(&to), clip(&text));
    let direct = ChatMessage::Direct {
        request_id: RequestId::random(),
        to,
        text,
    };
    assert_eq!(encode(&direct).len(), 4 + MAX_PAYLOAD_LEN);
    s.send(C, direct, &info);

    // The last the server sends: a header over the limit, which a peer
    // closes the connection for.
    let over = (MAX_PAYLOAD_LEN as u32 + 1).to_be_bytes();
    s.expect(
        S,
        Expected {
            info: format!("Frame too large ({} bytes)", MAX_PAYLOAD_LEN + 1),
            fields: vec![
                field("chatpipe.len", MAX_PAYLOAD_LEN + 1),
                any("chatpipe.too_large"),
            ],
        },
    );
    s.write(S, over.to_vec());
    s
}

/// Lines of a pipe, on a channel.
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

/// A directory of our own under the system's temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path =
            std::env::temp_dir().join(format!("chatpipe-dissector-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn interrupt(child: &Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
}

/// Waits for `child` until `deadline`; kills it and fails after that.
fn wait_until(child: &mut Child, deadline: Instant, what: &str) -> ExitStatus {
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit in time");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The capturing tshark: stopped (SIGINT, then SIGKILL) if the test ends
/// while it runs.
struct Capture {
    child: Child,
    stderr: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Capture {
    fn start(home: &Path, pcap: &Path, port: u16) -> Capture {
        let mut child = tshark(home)
            .args(["-i", "lo", "-f"])
            .arg(format!("tcp port {port}"))
            .arg("-w")
            .arg(pcap)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tshark");
        let stderr = lines(child.stderr.take().unwrap());
        let mut capture = Capture {
            child,
            stderr,
            log: Vec::new(),
        };
        // tshark says it is capturing (see `wait_until_live` for when it
        // really is).
        let deadline = Instant::now() + STEP;
        while !capture.log.iter().any(|l| l.contains("Capturing on")) {
            let left = deadline.saturating_duration_since(Instant::now());
            match capture
                .stderr
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(line) => capture.log.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                    "tshark ended before capturing on lo (capturing needs root, \
                     or CAP_NET_RAW and CAP_NET_ADMIN on dumpcap):\n{}",
                    capture.log.join("\n")
                ),
                Err(mpsc::RecvTimeoutError::Timeout) => assert!(
                    Instant::now() < deadline,
                    "tshark did not start capturing in time:\n{}",
                    capture.log.join("\n")
                ),
            }
        }
        capture
    }

    /// Stops the capture cleanly: tshark closes the file and exits.
    fn stop(mut self) {
        interrupt(&self.child);
        let status = wait_until(&mut self.child, Instant::now() + STEP, "the capture");
        self.log.extend(self.stderr.try_iter());
        assert!(
            status.success() || status.code().is_none(),
            "tshark failed capturing: {status}\n{}",
            self.log.join("\n")
        );
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            interrupt(&self.child);
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// tshark with its personal configuration (preferences, plugins) in
/// `home`, so what a user installed cannot change what the test sees.
fn tshark(home: &Path) -> Command {
    let mut cmd = Command::new("tshark");
    cmd.env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"));
    cmd
}

/// Runs tshark to completion (bounded), returning its stdout; fails on a
/// non-zero exit or on anything unexpected on stderr (a Lua error, say).
fn run(home: &Path, args: &[String]) -> String {
    let mut child = tshark(home)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tshark");
    let mut stdout = child.stdout.take().unwrap();
    let out = thread::spawn(move || {
        let mut v = Vec::new();
        stdout.read_to_end(&mut v).map(|_| v)
    });
    let err = lines(child.stderr.take().unwrap());
    let status = wait_until(&mut child, Instant::now() + STEP, "tshark -r");
    // Not always UTF-8: PDML shows a string with a replacement character
    // cut to the field's byte length.
    let stdout = String::from_utf8_lossy(&out.join().unwrap().unwrap()).into_owned();
    let stderr: Vec<String> = err
        .iter()
        .filter(|l| !l.contains("Running as user \"root\""))
        .collect();
    assert!(
        status.success() && stderr.is_empty(),
        "tshark {args:?}: {status}\n{}",
        stderr.join("\n")
    );
    stdout
}

/// A dissected chatpipe message: the TCP source port of its packet, whether
/// that packet finished a reassembly, and its `chatpipe.*` fields.
#[derive(Debug)]
struct Dissected {
    src_port: u16,
    packet: u32,
    reassembled: bool,
    fields: Vec<(String, String)>,
}

/// The value of `attr="..."` in a PDML line, unescaped.
fn attr(line: &str, attr: &str) -> Option<String> {
    let key = format!(" {attr}=\"");
    let start = line.find(&key)? + key.len();
    let end = start + line[start..].find('"')?;
    let raw = &line[start..end];
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let semi = amp + rest[amp..].find(';').expect("an XML entity ends");
        let entity = &rest[amp + 1..semi];
        let c = match entity {
            "quot" => '"',
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "apos" => '\'',
            _ => {
                let hex = entity.strip_prefix("#x").expect("a known XML entity");
                char::from_u32(u32::from_str_radix(hex, 16).unwrap()).unwrap()
            }
        };
        out.push(c);
        rest = &rest[semi + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// The chatpipe messages of a PDML document, in capture order.
fn parse_pdml(pdml: &str) -> Vec<Dissected> {
    let mut out = Vec::new();
    let (mut src_port, mut packet, mut reassembled) = (0, 0, false);
    let mut current: Option<Dissected> = None;
    for line in pdml.lines() {
        let line = line.trim_start();
        if line.starts_with("<packet>") {
            reassembled = false;
        } else if line.starts_with("<proto name=\"chatpipe\"") {
            current = Some(Dissected {
                src_port,
                packet,
                reassembled,
                fields: Vec::new(),
            });
        } else if line.starts_with("</proto>") {
            out.extend(current.take());
        } else if line.starts_with("<field ") {
            let name = attr(line, "name").unwrap_or_default();
            let show = || attr(line, "show").unwrap_or_default();
            match name.as_str() {
                "num" => packet = show().parse().unwrap(),
                "tcp.srcport" => src_port = show().parse().unwrap(),
                "tcp.reassembled.length" => reassembled = true,
                _ => {
                    if let (Some(msg), true) = (&mut current, name.starts_with("chatpipe.")) {
                        msg.fields.push((name, show()));
                    }
                }
            }
        }
    }
    out
}

/// Checks one direction's messages against the script, in order.
fn check_direction(what: &str, got: &[&Dissected], want: &[Expected]) {
    for (i, (got, want)) in got.iter().zip(want).enumerate() {
        let matches =
            got.fields.len() == want.fields.len()
                && got.fields.iter().zip(&want.fields).all(
                    |((name, show), (want_name, want_show))| {
                        name == want_name && want_show.as_ref().is_none_or(|w| w == show)
                    },
                );
        let show = |fields: Vec<String>| fields.join("\n  ");
        assert!(
            matches,
            "{what}, message {i} (packet {}, {}): dissected as\n  {}\nexpected\n  {}",
            got.packet,
            want.info,
            show(
                got.fields
                    .iter()
                    .map(|(n, v)| format!("{n} = {v:?}"))
                    .collect()
            ),
            show(
                want.fields
                    .iter()
                    .map(|(n, v)| format!("{n} = {v:?}"))
                    .collect()
            ),
        );
    }
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: {} messages dissected, {} sent",
        got.len(),
        want.len()
    );
}

/// Reads everything the peer sends until EOF, counting it as it arrives.
fn drain(mut sock: TcpStream, count: Arc<AtomicUsize>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0; 64 * 1024];
        loop {
            match sock.read(&mut buf) {
                Ok(0) => return all,
                Ok(n) => {
                    all.extend_from_slice(&buf[..n]);
                    count.store(all.len(), Ordering::SeqCst);
                }
                Err(e) => panic!("reading the session: {e}"),
            }
        }
    })
}

/// The first of `dir` with a field showing `what`.
fn with<'a>(dir: &[&'a Dissected], what: &str) -> &'a Dissected {
    dir.iter()
        .find(|d| d.fields.iter().any(|(_, v)| v == what))
        .unwrap_or_else(|| panic!("no message with {what:?}"))
}

/// "Capturing on" can come before dumpcap sees packets: sends probes to
/// the listener until one is in the capture file (which dumpcap writes
/// some time after the packet, so any probe sent so far counts).
fn wait_until_live(listener: &TcpListener, pcap: &Path) {
    let addr = listener.local_addr().unwrap();
    let probe = format!("probe of the capture on port {}", addr.port());
    let deadline = Instant::now() + STEP;
    loop {
        let mut conn = TcpStream::connect(addr).unwrap();
        drop(listener.accept().unwrap());
        conn.write_all(probe.as_bytes()).unwrap();
        drop(conn);
        let next = Instant::now() + Duration::from_millis(250);
        while Instant::now() < next {
            if file_has(pcap, &probe) {
                return;
            }
            assert!(Instant::now() < deadline, "the capture never saw a probe");
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Whether the file holds `text`'s bytes.
fn file_has(path: &Path, text: &str) -> bool {
    let file = std::fs::read(path).unwrap_or_default();
    file.windows(text.len()).any(|w| w == text.as_bytes())
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

/// Plays `script` between a client and a server socket of the test, each
/// write read whole by the peer before the next; then a last Chat, a
/// marker: once the capture file holds it, it holds everything before it.
/// Returns the client's port.
fn play(listener: &TcpListener, script: &mut Script, pcap: &Path) -> u16 {
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    let client_port = client.local_addr().unwrap().port();
    for sock in [&client, &server] {
        sock.set_nodelay(true).unwrap();
        sock.set_read_timeout(Some(STEP)).unwrap();
        sock.set_write_timeout(Some(STEP)).unwrap();
    }
    let (at_server, at_client) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let server_reads = drain(server.try_clone().unwrap(), at_server.clone());
    let client_reads = drain(client.try_clone().unwrap(), at_client.clone());
    let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
    for w in &script.writes {
        let (mut sock, sent, received) = match w.dir {
            Dir::ToServer => (&client, &mut to_server, &at_server),
            Dir::ToClient => (&server, &mut to_client, &at_client),
        };
        sock.write_all(&w.bytes).unwrap();
        sent.extend_from_slice(&w.bytes);
        // Each write its own segment: wait until the peer has it.
        let len = sent.len();
        wait_for("the peer to read a write", || {
            received.load(Ordering::SeqCst) == len
        });
    }
    // Last, the marker.
    let marker = format!("end of the scripted session from port {client_port}");
    let last = ChatMessage::Chat {
        text: marker.clone(),
    };
    script.expect(
        Dir::ToServer,
        expected(&last, &format!("Chat \"{}\"", clip(&marker))),
    );
    let bytes = encode(&last);
    (&client).write_all(&bytes).unwrap();
    to_server.extend_from_slice(&bytes);
    client.shutdown(Shutdown::Write).unwrap();
    server.shutdown(Shutdown::Write).unwrap();
    assert_eq!(
        server_reads.join().unwrap(),
        to_server,
        "the server read all"
    );
    assert_eq!(
        client_reads.join().unwrap(),
        to_client,
        "the client read all"
    );
    wait_for("the capture file to hold the session", || {
        file_has(pcap, &marker)
    });
    client_port
}

#[test]
fn dissector_decodes_every_message_type() {
    let started = Instant::now();
    match Command::new("tshark").arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!("`tshark --version` failed: {}", out.status),
        Err(e) => panic!(
            "tshark is needed to test tools/chatpipe.lua and is not available ({e}); \
             .ci/run installs it (apt-get install tshark)"
        ),
    }
    let tmp = TempDir::new();
    let pcap = tmp.0.join("session.pcapng");

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let capture = Capture::start(&tmp.0, &pcap, port);
    wait_until_live(&listener, &pcap);

    let mut script = script();
    let client_port = play(&listener, &mut script, &pcap);
    capture.stop();
    let session_done = started.elapsed();

    let read = |extra: &[&str], format: &[&str]| -> String {
        let mut args: Vec<String> = vec!["-r".into(), pcap.display().to_string()];
        args.push(format!("-Xlua_script:{SCRIPT}"));
        args.extend(extra.iter().map(|s| s.to_string()));
        // The session's connection only (not the probes); retransmitted
        // segments (rare on lo) carry nothing new.
        args.push("-Y".into());
        args.push(format!(
            "chatpipe && tcp.port == {client_port} && !tcp.analysis.retransmission"
        ));
        args.extend(format.iter().map(|s| s.to_string()));
        run(&tmp.0, &args)
    };
    // Decode As, the way a capture on another port is read.
    let decode_as = format!("tcp.port=={port},chatpipe");
    let dissected = parse_pdml(&read(&["-d", &decode_as], &["-T", "pdml"]));
    let from_server = |yes: bool| -> Vec<&Dissected> {
        dissected
            .iter()
            .filter(|d| (d.src_port == port) == yes)
            .collect()
    };
    let (to_server_msgs, to_client_msgs) = (from_server(false), from_server(true));
    check_direction("client to server", &to_server_msgs, &script.to_server);
    check_direction("server to client", &to_client_msgs, &script.to_client);

    // Every message type of v0.5 and v0.6, decoded with no expert info.
    let clean_types: std::collections::BTreeSet<u32> = dissected
        .iter()
        .filter(|d| {
            !d.fields.iter().any(|(n, _)| {
                matches!(
                    n.as_str(),
                    "chatpipe.truncated"
                        | "chatpipe.invalid_utf8"
                        | "chatpipe.unknown_type"
                        | "chatpipe.unknown_change"
                        | "chatpipe.trailing_bytes"
                        | "chatpipe.too_large"
                )
            })
        })
        .filter_map(|d| d.fields.iter().find(|(n, _)| n == "chatpipe.type"))
        .map(|(_, v)| v.parse().unwrap())
        .collect();
    let all_types: std::collections::BTreeSet<u32> = (0..=5).chain(16..=26).collect();
    assert_eq!(clean_types, all_types, "every message type decoded cleanly");

    // The frames split across writes (and the largest, across segments)
    // were reassembled, not seen whole in one segment; the two frames of
    // one write came in one packet.
    for (dir, what) in [
        (&to_client_msgs, "server restarting in 5 minutes"),
        (&to_server_msgs, "after the split"),
        (&to_client_msgs, "anna"),
        (&to_server_msgs, &"n".repeat(255)),
    ] {
        let d = with(dir, what);
        assert!(d.reassembled, "{what:?} was not reassembled: {d:?}");
    }
    assert_eq!(
        with(&to_client_msgs, "ana").packet,
        with(&to_client_msgs, "ça va? ✓").packet,
        "the two History frames of one write in one packet"
    );

    // The Info column: each message's label, in order, per direction.
    let info_of = |extra: &[&str]| -> (String, String) {
        let out = read(
            extra,
            &["-T", "fields", "-e", "tcp.srcport", "-e", "_ws.col.Info"],
        );
        let (mut c, mut s) = (Vec::new(), Vec::new());
        for line in out.lines() {
            let (src, info) = line.split_once('\t').expect("two columns");
            match src.parse::<u16>().unwrap() == port {
                true => s.push(info.to_string()),
                false => c.push(info.to_string()),
            }
        }
        (c.join(", "), s.join(", "))
    };
    let labels = |e: &[Expected]| {
        e.iter()
            .map(|e| e.info.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let info = info_of(&["-d", &decode_as]);
    assert_eq!(info.0, labels(&script.to_server), "Info, client to server");
    assert_eq!(info.1, labels(&script.to_client), "Info, server to client");

    // The same messages found by the port preference and by the heuristic.
    let pref = format!("chatpipe.tcp_port:{port}");
    assert_eq!(info_of(&["-o", &pref]), info, "with -o {pref}");
    assert_eq!(info_of(&[]), info, "by the heuristic alone");
    assert_eq!(
        info_of(&["-o", "chatpipe.heuristic:FALSE"]),
        (String::new(), String::new()),
        "nothing without the port, Decode As or the heuristic"
    );

    eprintln!(
        "dissector test: {} + {} messages; session and capture {:?}, all {:?}",
        script.to_server.len(),
        script.to_client.len(),
        session_done,
        started.elapsed()
    );
}
