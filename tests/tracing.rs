//! The `tracing` feature: a span per connection with the user's label, and
//! events for the close reason, timeouts and refused frames.
#![cfg(feature = "tracing")]

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatpipe::raw::Raw;
use chatpipe::test_util::{ManualClock, Mock};
use chatpipe::Builder;
use futures::executor::LocalPool;
use futures::task::LocalSpawnExt;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// Records every span's fields and every event as one line of text, with
/// the fields of the span it happened in.
#[derive(Default, Clone)]
struct Recorder {
    spans: Arc<Mutex<Vec<String>>>,
    current: Arc<Mutex<Vec<u64>>>,
    lines: Arc<Mutex<Vec<String>>>,
    next: Arc<AtomicU64>,
}

struct Text<'a>(&'a mut String);

impl Visit for Text<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={:?}", field.name(), value);
    }
}

impl Subscriber for Recorder {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let mut text = attrs.metadata().name().to_string();
        attrs.record(&mut Text(&mut text));
        self.spans.lock().unwrap().push(text);
        Id::from_u64(self.next.fetch_add(1, Ordering::Relaxed) + 1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut text = format!("{}", event.metadata().level());
        event.record(&mut Text(&mut text));
        if let Some(&id) = self.current.lock().unwrap().last() {
            let span = self.spans.lock().unwrap()[id as usize - 1].clone();
            text = format!("[{span}] {text}");
        }
        self.lines.lock().unwrap().push(text);
    }
    fn enter(&self, id: &Id) {
        self.current.lock().unwrap().push(id.into_u64());
    }
    fn exit(&self, _: &Id) {
        self.current.lock().unwrap().pop();
    }
}

fn run(recorder: &Recorder, mock: Mock, steps: &[Duration]) {
    let _guard = tracing::subscriber::set_default(recorder.clone());
    let clock = ManualClock::new();
    let (io, _peer) = mock.build();
    let (_tx, _rx, conn) = Builder::new()
        .label("peer 127.0.0.1:4000")
        .build_with_timer(io, Raw, clock.timer());
    let mut pool = LocalPool::new();
    let done = pool.spawner().spawn_local_with_handle(conn).unwrap();
    pool.run_until_stalled();
    for &step in steps {
        clock.advance(step);
        pool.run_until_stalled();
    }
    let _ = pool.run_until(done);
}

#[test]
fn a_refused_frame_is_an_event_in_the_labelled_span() {
    let recorder = Recorder::default();
    run(&recorder, Mock::new().read(&[0, 1, 0, 1]), &[]);
    let lines = recorder.lines.lock().unwrap().clone();
    let refused = lines
        .iter()
        .find(|l| l.contains("refused"))
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert!(
        refused.starts_with("[chatpipe label=\"peer 127.0.0.1:4000\"] WARN"),
        "{refused}"
    );
    assert!(refused.contains("65537 bytes"), "{refused}");
    let ended = lines.iter().find(|l| l.contains("connection ended"));
    assert!(
        ended.is_some_and(|l| l.contains("reason=the peer sent a frame of 65537 bytes")),
        "{lines:?}"
    );
}

#[test]
fn an_idle_timeout_and_the_keepalives_before_it_are_events() {
    let recorder = Recorder::default();
    // Nothing arrives: keepalives at 5 and 10 s, the idle timeout at 15 s.
    run(&recorder, Mock::new(), &[Duration::from_secs(5); 3]);
    let lines = recorder.lines.lock().unwrap().clone();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("timed out") && l.contains("idle timeout")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l.contains("keepalive")), "{lines:?}");
}
