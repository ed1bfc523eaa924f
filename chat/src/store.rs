//! History on join: the room's last messages, kept in an SQLite file so
//! that they survive a restart.
//!
//! A [`Store`] holds the newest `keep` room messages in memory (the ring
//! that [`Store::recent`] reads, oldest first) and writes every message to
//! the database on a thread of its own. Opened on a file, it starts with
//! the newest `keep` messages found there, so a restarted server greets
//! joiners with what was said before it stopped. The same file will hold
//! the accounts of the security work: the schema has a version table, and
//! each later table is one more migration.
//!
//! # What is stored
//!
//! Room messages only: when (milliseconds since the Unix epoch), who, and
//! the text, as an [`Entry`]. Direct messages are not stored, nor handed to
//! a store: they are private between two members, the room keeps no mailbox
//! for them (a direct message to someone absent is refused, not kept), and
//! writing them to disk would keep for anyone who can read the file what
//! its sender meant for one person. Presence changes and notices are not
//! stored either.
//!
//! # Retention
//!
//! The ring keeps the newest `keep` messages (`keep` is what a joiner is
//! offered; 0 turns history off: nothing is kept and nothing written). The
//! file keeps the newest `max(keep, 10,000)` rows: older ones are deleted
//! when the store opens and then after every 1,000 rows written, so the file
//! stays bounded while a restart with a larger `keep` still finds history.
//!
//! # A slow disk slows history, not chat
//!
//! [`Store::append`] never waits for the disk: it updates the ring at once
//! and hands the message to the writer thread through a bounded queue (4,096
//! messages and 16 MiB at most). The writer commits whatever is queued in
//! one transaction. When the queue is full, the message is still in the
//! ring, so joiners get it while this process runs, but it is not written:
//! [`Store::unsaved`] counts it, for the room to report, and after a restart
//! it is missing from history. Messages lost to a failed write (a full or
//! failing disk) are counted there as well, and the failure in
//! [`Store::write_errors`] and [`Store::last_write_error`].
//!
//! # Blocking
//!
//! [`Store::append`], [`Store::recent`] and the counters touch memory only,
//! under a lock held for a few copies: call them from async tasks freely.
//! [`Store::open`], [`Store::flush`], [`Store::close`] and dropping a
//! `Store` read the disk or wait for the writer: call them before the
//! executor starts, at shutdown, or through `smol::unblock`.

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, TransactionBehavior};

/// How many messages a joiner is offered by default (`--history`).
pub const DEFAULT_HISTORY: usize = 50;

/// The database file when none is named (`--db`): in the working directory.
pub const DEFAULT_DB: &str = "chatpipe-chat.db";

/// The path that opens a database in memory, which a restart loses.
pub const IN_MEMORY: &str = ":memory:";

/// The file keeps at least this many rows, and `keep` if that is more.
const MIN_RETAIN: usize = 10_000;
/// Rows written between two trims of the file.
const TRIM_EVERY: u64 = 1_000;
/// Messages waiting for the writer, at most.
const QUEUE_CAPACITY: usize = 4_096;
/// Bytes of messages waiting for the writer, at most (see [`entry_size`]).
const QUEUE_BYTES: usize = 16 << 20;
/// Rows in one transaction, at most.
const MAX_BATCH: usize = 1_024;
/// How long the store waits for another process's lock on the file.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The ring never preallocates for more messages than this.
const MAX_PREALLOC: usize = 1_024;

/// The schema, one migration per version: version `n` is `MIGRATIONS[n -
/// 1]`. A migration is never edited once released; the next table is a new
/// entry.
const MIGRATIONS: &[&str] = &[
    // 1: room messages, for history on join.
    "CREATE TABLE messages (
         id INTEGER PRIMARY KEY,
         at_ms INTEGER NOT NULL,
         sender TEXT NOT NULL,
         text TEXT NOT NULL
     );",
    // 2: accounts (src/accounts.rs): a nickname, its owner's password as
    // an argon2 PHC string, and when it was registered.
    "CREATE TABLE accounts (
         nickname TEXT PRIMARY KEY,
         hash TEXT NOT NULL,
         created_ms INTEGER NOT NULL
     );",
];

/// One room message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Entry {
    /// When it was said: milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Who said it.
    pub from: String,
    /// What they said.
    pub text: String,
}

/// Why the store could not be opened, or a write failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite failed while doing `doing`.
    #[error("store {}: cannot {doing}: {source}", .path.display())]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// What the store was doing.
        doing: &'static str,
        /// What SQLite said.
        #[source]
        source: Arc<rusqlite::Error>,
    },
    /// The file cannot use a write-ahead log (some network file systems
    /// lack the shared memory it needs).
    #[error("store {}: journal mode is {mode:?}, not WAL", .path.display())]
    NotWal {
        /// The database file.
        path: PathBuf,
        /// The journal mode SQLite kept.
        mode: String,
    },
    /// The file was written by a newer build: this one leaves it alone.
    #[error(
        "store {}: schema version {found} is newer than this build knows ({known})",
        .path.display()
    )]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// The file's schema version.
        found: i64,
        /// The newest version this build knows.
        known: i64,
    },
    /// The writer thread could not be started.
    #[error("cannot start the store's writer thread: {0}")]
    Spawn(#[source] Arc<std::io::Error>),
    /// The writer thread panicked (a bug): what it had not committed is
    /// lost.
    #[error("the store's writer thread panicked")]
    WriterPanicked,
}

/// The room's recent messages, in memory and in an SQLite file. See the
/// [module documentation](self).
///
/// `Send` and `Sync`: share it with an `Arc`.
pub struct Store {
    keep: usize,
    max_bytes: usize,
    inner: Mutex<Inner>,
    /// `None` once closing.
    queue: Option<SyncSender<Entry>>,
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    unreadable: u64,
}

/// What `append` changes together, so that the ring and the file get
/// messages in the same order.
struct Inner {
    /// Oldest first, at most `keep`.
    ring: VecDeque<Entry>,
    /// Messages handed to the writer so far.
    sent: u64,
}

/// What the store and its writer thread share.
struct Shared {
    path: PathBuf,
    /// Bytes of messages in the queue or in the batch being written.
    queued_bytes: AtomicUsize,
    unsaved: AtomicU64,
    write_errors: AtomicU64,
    last_error: Mutex<Option<StoreError>>,
    progress: Mutex<Progress>,
    progressed: Condvar,
}

struct Progress {
    /// Messages the writer has finished with (committed, or counted as
    /// unsaved).
    done: u64,
    /// The writer thread has ended.
    stopped: bool,
}

/// Knobs that tests turn; [`Options::new`] gives the real ones.
struct Options {
    capacity: usize,
    max_bytes: usize,
    retain: usize,
    trim_every: u64,
    /// The writer takes and releases this lock before each batch: a test
    /// that holds it holds the writer (a disk that does not answer).
    gate: Option<Arc<Mutex<()>>>,
}

impl Options {
    fn new(keep: usize) -> Options {
        Options {
            capacity: QUEUE_CAPACITY,
            max_bytes: QUEUE_BYTES,
            retain: keep.max(MIN_RETAIN),
            trim_every: TRIM_EVERY,
            gate: None,
        }
    }
}

impl Store {
    /// Opens the database at `path`, creating it if need be (or an
    /// in-memory one for [`IN_MEMORY`]), brings its schema up to date,
    /// trims it, loads the newest `keep` messages and starts the writer
    /// thread. Blocks on the disk.
    ///
    /// Rows that cannot be read as an [`Entry`] (not text, not UTF-8) are
    /// skipped and counted in [`unreadable`](Store::unreadable).
    pub fn open(path: &Path, keep: usize) -> Result<Store, StoreError> {
        Store::open_with(path, keep, Options::new(keep))
    }

    /// A store in memory: history while the process runs, none after.
    pub fn in_memory(keep: usize) -> Result<Store, StoreError> {
        Store::open(Path::new(IN_MEMORY), keep)
    }

    fn open_with(path: &Path, keep: usize, options: Options) -> Result<Store, StoreError> {
        let path = path.to_path_buf();
        let fail = |doing| {
            let path = path.clone();
            move |e| sqlite_error(&path, doing, e)
        };
        let mut conn = connect(&path)?;
        migrate(&mut conn, &path)?;
        trim(&conn, options.retain).map_err(fail("trim old messages"))?;
        let (ring, unreadable) = load(&conn, keep).map_err(fail("read history"))?;

        let shared = Arc::new(Shared {
            path,
            queued_bytes: AtomicUsize::new(0),
            unsaved: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            last_error: Mutex::new(None),
            progress: Mutex::new(Progress {
                done: 0,
                stopped: false,
            }),
            progressed: Condvar::new(),
        });
        let (queue, rx) = mpsc::sync_channel(options.capacity);
        let writer = Writer {
            conn,
            rx,
            shared: Arc::clone(&shared),
            retain: options.retain,
            trim_every: options.trim_every,
            gate: options.gate,
        };
        let writer = thread::Builder::new()
            .name("chat-store".into())
            .spawn(move || writer.run())
            .map_err(|e| StoreError::Spawn(Arc::new(e)))?;
        Ok(Store {
            keep,
            max_bytes: options.max_bytes,
            inner: Mutex::new(Inner { ring, sent: 0 }),
            queue: Some(queue),
            shared,
            writer: Some(writer),
            unreadable,
        })
    }

    /// How many messages the ring keeps and a joiner is offered.
    pub fn keep(&self) -> usize {
        self.keep
    }

    /// Adds a room message: to the ring at once, and to the writer's queue
    /// without waiting. If the queue is full (the disk is slow), the message
    /// stays in the ring but is not written, and [`unsaved`](Store::unsaved)
    /// counts it. With `keep` 0, does nothing.
    pub fn append(&self, entry: Entry) {
        if self.keep == 0 {
            return;
        }
        let mut inner = lock(&self.inner);
        let mut handed = false;
        if let Some(queue) = &self.queue {
            let size = entry_size(&entry);
            if self.shared.reserve(size, self.max_bytes) {
                // Under the lock, so the file gets messages in ring order.
                if queue.try_send(entry.clone()).is_ok() {
                    inner.sent += 1;
                    handed = true;
                } else {
                    self.shared.release(size);
                }
            }
        }
        if !handed {
            self.shared.unsaved.fetch_add(1, Ordering::Relaxed);
        }
        if inner.ring.len() >= self.keep {
            inner.ring.pop_front();
        }
        inner.ring.push_back(entry);
    }

    /// The newest messages, at most `keep`, oldest first.
    pub fn recent(&self) -> Vec<Entry> {
        lock(&self.inner).ring.iter().cloned().collect()
    }

    /// Messages that are in the ring but will not be in the file: the
    /// queue was full, or their write failed.
    pub fn unsaved(&self) -> u64 {
        self.shared.unsaved.load(Ordering::Relaxed)
    }

    /// Writes that failed: a batch of messages (each one also counts in
    /// [`unsaved`](Store::unsaved)), a trim, or closing the database.
    pub fn write_errors(&self) -> u64 {
        self.shared.write_errors.load(Ordering::Relaxed)
    }

    /// Why the latest failed write failed.
    pub fn last_write_error(&self) -> Option<StoreError> {
        lock(&self.shared.last_error).clone()
    }

    /// Rows found at open that could not be read as messages, and were
    /// skipped.
    pub fn unreadable(&self) -> u64 {
        self.unreadable
    }

    /// Waits until every message appended so far is committed (or counted
    /// as unsaved). Blocks: for shutdown and tests.
    pub fn flush(&self) {
        let target = lock(&self.inner).sent;
        let mut progress = lock(&self.shared.progress);
        while progress.done < target && !progress.stopped {
            progress = self
                .shared
                .progressed
                .wait(progress)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Commits what is queued and ends the writer thread. Blocks. Dropping
    /// the store does the same, without the error.
    pub fn close(mut self) -> Result<(), StoreError> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> Result<(), StoreError> {
        // The writer drains the queue, then sees it disconnected.
        self.queue = None;
        match self.writer.take() {
            Some(writer) => writer.join().map_err(|_| StoreError::WriterPanicked),
            None => Ok(()),
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.shut_down();
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.shared.path)
            .field("keep", &self.keep)
            .field("unsaved", &self.unsaved())
            .field("write_errors", &self.write_errors())
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Counts `size` bytes into the queue if they fit under `max`.
    fn reserve(&self, size: usize, max: usize) -> bool {
        self.queued_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                queued.checked_add(size).filter(|&total| total <= max)
            })
            .is_ok()
    }

    fn release(&self, size: usize) {
        self.queued_bytes.fetch_sub(size, Ordering::AcqRel);
    }

    fn failed(&self, doing: &'static str, error: rusqlite::Error) {
        self.write_errors.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_error) = Some(sqlite_error(&self.path, doing, error));
    }

    fn finished(&self, messages: u64) {
        lock(&self.progress).done += messages;
        self.progressed.notify_all();
    }
}

/// The writer thread: it alone writes to the connection.
struct Writer {
    conn: Connection,
    rx: Receiver<Entry>,
    shared: Arc<Shared>,
    retain: usize,
    trim_every: u64,
    gate: Option<Arc<Mutex<()>>>,
}

impl Writer {
    fn run(mut self) {
        // However the thread ends, `flush` stops waiting for it.
        let _stopped = Stopped(Arc::clone(&self.shared));
        let mut since_trim = 0;
        loop {
            if let Some(gate) = &self.gate {
                drop(lock(gate));
            }
            let Ok(first) = self.rx.recv() else {
                break; // The store is closing and the queue is empty.
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(entry) => batch.push(entry),
                    Err(_) => break,
                }
            }
            let count = batch.len() as u64;
            let bytes: usize = batch.iter().map(entry_size).sum();
            match insert(&mut self.conn, &batch) {
                Ok(()) => since_trim += count,
                Err(e) => {
                    self.shared.unsaved.fetch_add(count, Ordering::Relaxed);
                    self.shared.failed("write messages", e);
                }
            }
            drop(batch);
            self.shared.release(bytes);
            if since_trim >= self.trim_every {
                since_trim = 0;
                if let Err(e) = trim(&self.conn, self.retain) {
                    self.shared.failed("trim old messages", e);
                }
            }
            self.shared.finished(count);
        }
        if let Err((_, e)) = self.conn.close() {
            self.shared.failed("close the database", e);
        }
    }
}

/// Marks the writer stopped when dropped, even by a panic.
struct Stopped(Arc<Shared>);

impl Drop for Stopped {
    fn drop(&mut self) {
        lock(&self.0.progress).stopped = true;
        self.0.progressed.notify_all();
    }
}

/// Opens the database at `path` (or in memory, for [`IN_MEMORY`]) as the
/// store and the accounts both use it: waiting for other writers, with a
/// write-ahead log. The schema is `migrate`'s business.
pub(crate) fn connect(path: &Path) -> Result<Connection, StoreError> {
    let fail = |doing| move |e| sqlite_error(path, doing, e);
    let in_memory = path.as_os_str() == IN_MEMORY;
    let conn = if in_memory {
        Connection::open_in_memory()
    } else {
        Connection::open(path)
    }
    .map_err(fail("open the database"))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(fail("set the busy timeout"))?;
    if !in_memory {
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(fail("set the journal mode"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NotWal {
                path: path.to_path_buf(),
                mode,
            });
        }
        // With a write-ahead log, NORMAL loses at most the last
        // commits on a power cut, never the file's consistency.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(fail("set synchronous mode"))?;
    }
    Ok(conn)
}

/// Brings the schema up to date, in one transaction that holds the write
/// lock, so two processes opening the file at once do not both migrate.
pub(crate) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let fail = |e| sqlite_error(path, "update the schema", e);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(fail)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version INTEGER PRIMARY KEY,
             applied_ms INTEGER NOT NULL
         );",
    )
    .map_err(fail)?;
    let found: i64 = tx
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_version",
            [],
            |row| row.get(0),
        )
        .map_err(fail)?;
    let known = MIGRATIONS.len() as i64;
    if found > known {
        return Err(StoreError::NewerSchema {
            path: path.to_path_buf(),
            found,
            known,
        });
    }
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    for (version, sql) in (1..).zip(MIGRATIONS).skip(found.max(0) as usize) {
        tx.execute_batch(sql).map_err(fail)?;
        tx.execute(
            "INSERT INTO schema_version (version, applied_ms) VALUES (?1, ?2)",
            (version, now_ms),
        )
        .map_err(fail)?;
    }
    tx.commit().map_err(fail)
}

/// The newest `keep` rows, oldest first, and how many rows among them could
/// not be read.
fn load(conn: &Connection, keep: usize) -> rusqlite::Result<(VecDeque<Entry>, u64)> {
    let mut ring = VecDeque::with_capacity(keep.min(MAX_PREALLOC));
    let mut unreadable = 0;
    let mut stmt =
        conn.prepare("SELECT at_ms, sender, text FROM messages ORDER BY id DESC LIMIT ?1")?;
    let mut rows = stmt.query([i64::try_from(keep).unwrap_or(i64::MAX)])?;
    while let Some(row) = rows.next()? {
        match (row.get::<_, i64>(0), row.get(1), row.get(2)) {
            (Ok(at_ms), Ok(from), Ok(text)) => ring.push_front(Entry {
                at_ms: from_sql_time(at_ms),
                from,
                text,
            }),
            _ => unreadable += 1,
        }
    }
    Ok((ring, unreadable))
}

/// Writes a batch in one transaction: all of it, or none.
fn insert(conn: &mut Connection, batch: &[Entry]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut stmt =
            tx.prepare("INSERT INTO messages (at_ms, sender, text) VALUES (?1, ?2, ?3)")?;
        for entry in batch {
            stmt.execute((to_sql_time(entry.at_ms), &entry.from, &entry.text))?;
        }
    }
    tx.commit()
}

/// Deletes all but the newest `retain` rows.
fn trim(conn: &Connection, retain: usize) -> rusqlite::Result<()> {
    conn.execute(
        "DELETE FROM messages WHERE id <= (
             SELECT id FROM messages ORDER BY id DESC LIMIT 1 OFFSET ?1
         )",
        [i64::try_from(retain).unwrap_or(i64::MAX)],
    )?;
    Ok(())
}

/// SQLite integers are signed: a time is stored with the same 64 bits, so
/// every `u64` comes back as it went in (those past `i64::MAX`, which no
/// clock gives, read as negative in the file).
fn to_sql_time(at_ms: u64) -> i64 {
    at_ms as i64
}

fn from_sql_time(at_ms: i64) -> u64 {
    at_ms as u64
}

/// What a queued message costs in memory, as the queue's byte bound counts.
fn entry_size(entry: &Entry) -> usize {
    std::mem::size_of::<Entry>() + entry.from.len() + entry.text.len()
}

pub(crate) fn sqlite_error(
    path: &Path,
    doing: &'static str,
    source: rusqlite::Error,
) -> StoreError {
    StoreError::Sqlite {
        path: path.to_path_buf(),
        doing,
        source: Arc::new(source),
    }
}

/// Locks, ignoring poisoning: no code here panics under a lock, and the
/// data stays consistent if some did.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::sync::atomic::AtomicUsize;

    /// A directory of its own under the system's temporary one, removed
    /// when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "chatpipe-store-{name}-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn db(&self) -> PathBuf {
            self.0.join("chat.db")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn entry(i: u64) -> Entry {
        Entry {
            at_ms: 1_700_000_000_000 + i,
            from: format!("user{}", i % 3),
            text: format!("message {i}"),
        }
    }

    fn entries(range: std::ops::Range<u64>) -> Vec<Entry> {
        range.map(entry).collect()
    }

    fn rows(path: &Path) -> i64 {
        let conn = Connection::open(path).unwrap();
        conn.query_row("SELECT COUNT(*) FROM messages", [], |row| row.get(0))
            .unwrap()
    }

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Store>();
    }

    #[test]
    fn append_then_recent_in_order() {
        let store = Store::in_memory(10).unwrap();
        assert_eq!(store.recent(), vec![]);
        for e in entries(0..4) {
            store.append(e);
        }
        assert_eq!(store.recent(), entries(0..4));
        store.flush();
        assert_eq!(store.unsaved(), 0);
        assert_eq!(store.write_errors(), 0);
        store.close().unwrap();
    }

    #[test]
    fn ring_is_bounded_at_keep_and_the_file_keeps_more() {
        let dir = TempDir::new("bounded");
        let store = Store::open(&dir.db(), 3).unwrap();
        for e in entries(0..10) {
            store.append(e);
        }
        assert_eq!(store.recent(), entries(7..10));
        store.close().unwrap();
        let store = Store::open(&dir.db(), 50).unwrap();
        assert_eq!(store.recent(), entries(0..10));
    }

    #[test]
    fn history_survives_a_restart() {
        let dir = TempDir::new("restart");
        let store = Store::open(&dir.db(), 50).unwrap();
        for e in entries(0..5) {
            store.append(e);
        }
        store.flush();
        drop(store);
        let store = Store::open(&dir.db(), 3).unwrap();
        assert_eq!(store.recent(), entries(2..5));
        // New messages follow the loaded ones, and persist after them.
        store.append(entry(5));
        assert_eq!(store.recent(), entries(3..6));
        store.close().unwrap();
        let store = Store::open(&dir.db(), 100).unwrap();
        assert_eq!(store.recent(), entries(0..6));
        assert_eq!(store.unreadable(), 0);
    }

    #[test]
    fn keep_zero_stores_nothing() {
        let dir = TempDir::new("off");
        let store = Store::open(&dir.db(), 0).unwrap();
        for e in entries(0..5) {
            store.append(e);
        }
        assert_eq!(store.recent(), vec![]);
        store.flush();
        assert_eq!(store.unsaved(), 0);
        store.close().unwrap();
        assert_eq!(rows(&dir.db()), 0);
        let store = Store::open(&dir.db(), 10).unwrap();
        assert_eq!(store.recent(), vec![]);
    }

    #[test]
    fn a_full_queue_counts_unsaved_instead_of_blocking() {
        let dir = TempDir::new("full");
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap(); // The disk does not answer.
        let options = Options {
            capacity: 4,
            gate: Some(Arc::clone(&gate)),
            ..Options::new(100)
        };
        let store = Arc::new(Store::open_with(&dir.db(), 100, options).unwrap());
        // Appends return although the writer is held. (The timeout only
        // ends the test if they do block; nothing waits on it otherwise.)
        let (done, appended) = mpsc::channel();
        let appender = Arc::clone(&store);
        thread::spawn(move || {
            for e in entries(0..10) {
                appender.append(e);
            }
            drop(appender); // Before telling: the test takes the store back.
            done.send(()).unwrap();
        });
        appended
            .recv_timeout(Duration::from_secs(60))
            .expect("append blocked on a held writer");
        assert_eq!(store.unsaved(), 6);
        // Joiners still get every message while the process runs.
        assert_eq!(store.recent(), entries(0..10));
        drop(held);
        store.flush();
        assert_eq!(store.unsaved(), 6);
        assert_eq!(store.write_errors(), 0);
        Arc::into_inner(store).unwrap().close().unwrap();
        let store = Store::open(&dir.db(), 100).unwrap();
        assert_eq!(store.recent(), entries(0..4));
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_too() {
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let big = |i| Entry {
            at_ms: i,
            from: "big".into(),
            text: "x".repeat(1_000),
        };
        let options = Options {
            max_bytes: 2 * entry_size(&big(0)),
            gate: Some(Arc::clone(&gate)),
            ..Options::new(10)
        };
        let store = Store::open_with(Path::new(IN_MEMORY), 10, options).unwrap();
        for i in 0..5 {
            store.append(big(i));
        }
        assert_eq!(store.unsaved(), 3);
        drop(held);
        store.flush();
        // Written messages free their bytes: the queue takes more again.
        store.append(big(5));
        store.flush();
        assert_eq!(store.unsaved(), 3);
        assert_eq!(store.shared.queued_bytes.load(Ordering::Acquire), 0);
        store.close().unwrap();
    }

    #[test]
    fn a_failed_write_is_counted() {
        let dir = TempDir::new("failed");
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let options = Options {
            gate: Some(Arc::clone(&gate)),
            ..Options::new(10)
        };
        let store = Store::open_with(&dir.db(), 10, options).unwrap();
        store.append(entry(0));
        store.append(entry(1));
        // The table vanishes under the writer: its next batch fails.
        Connection::open(dir.db())
            .unwrap()
            .execute_batch("DROP TABLE messages")
            .unwrap();
        drop(held);
        store.flush();
        assert_eq!(store.write_errors(), 1);
        assert_eq!(store.unsaved(), 2);
        assert_eq!(store.recent(), entries(0..2));
        let error = store.last_write_error().unwrap();
        assert!(
            matches!(
                &error,
                StoreError::Sqlite {
                    doing: "write messages",
                    ..
                }
            ),
            "{error}"
        );
        assert!(error.to_string().contains("no such table"), "{error}");
        store.close().unwrap();
    }

    #[test]
    fn unicode_round_trips() {
        let dir = TempDir::new("unicode");
        let texts = [
            "héllo wörld",
            "日本語のテキスト",
            "emoji 👩‍👩‍👧‍👦🎉 and combining e\u{301}",
            "עברית and العربية",
            "a NUL \0 inside, and \u{FFFF}",
            "",
        ];
        let sent: Vec<Entry> = (0..)
            .zip(texts)
            .map(|(i, text)| Entry {
                at_ms: i,
                from: format!("ñick-{i}-名前"),
                text: text.into(),
            })
            .collect();
        let store = Store::open(&dir.db(), 10).unwrap();
        for e in &sent {
            store.append(e.clone());
        }
        store.close().unwrap();
        let store = Store::open(&dir.db(), 10).unwrap();
        assert_eq!(store.recent(), sent);
    }

    #[test]
    fn every_time_round_trips() {
        let dir = TempDir::new("times");
        let sent: Vec<Entry> = [0, 1, i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX]
            .into_iter()
            .map(|at_ms| Entry {
                at_ms,
                from: "clock".into(),
                text: at_ms.to_string(),
            })
            .collect();
        let store = Store::open(&dir.db(), 10).unwrap();
        for e in &sent {
            store.append(e.clone());
        }
        store.close().unwrap();
        assert_eq!(Store::open(&dir.db(), 10).unwrap().recent(), sent);
    }

    #[test]
    fn concurrent_appends_reach_the_file_in_ring_order() {
        let dir = TempDir::new("concurrent");
        let store = Arc::new(Store::open(&dir.db(), 1_000).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let store = Arc::clone(&store);
                thread::spawn(move || {
                    for i in 0..200 {
                        store.append(entry(t * 1_000 + i));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let seen = store.recent();
        assert_eq!(seen.len(), 800);
        assert_eq!(store.unsaved(), 0);
        Arc::into_inner(store).unwrap().close().unwrap();
        assert_eq!(Store::open(&dir.db(), 1_000).unwrap().recent(), seen);
    }

    #[test]
    fn the_file_is_trimmed_to_the_retention() {
        let dir = TempDir::new("trim");
        let options = Options {
            retain: 3,
            trim_every: 4,
            ..Options::new(2)
        };
        let store = Store::open_with(&dir.db(), 2, options).unwrap();
        for e in entries(0..4) {
            store.append(e);
        }
        store.flush(); // Four rows written: the writer trims to three.
        assert_eq!(rows(&dir.db()), 3);
        for e in entries(4..7) {
            store.append(e);
        }
        store.close().unwrap(); // Three more: no trim yet.
        assert_eq!(rows(&dir.db()), 6);
        // Opening trims as well, to the newest max(keep, retain).
        let options = Options {
            retain: 3,
            ..Options::new(2)
        };
        let store = Store::open_with(&dir.db(), 2, options).unwrap();
        assert_eq!(store.recent(), entries(5..7));
        store.close().unwrap();
        assert_eq!(rows(&dir.db()), 3);
        let store = Store::open(&dir.db(), 10).unwrap();
        assert_eq!(store.recent(), entries(4..7));
    }

    #[test]
    fn unreadable_rows_are_skipped_and_counted() {
        let dir = TempDir::new("unreadable");
        let store = Store::open(&dir.db(), 10).unwrap();
        store.append(entry(0));
        store.close().unwrap();
        Connection::open(dir.db())
            .unwrap()
            .execute_batch(
                "INSERT INTO messages (at_ms, sender, text) VALUES (1, 'bad', CAST(x'ff00fe' AS TEXT));
                 INSERT INTO messages (at_ms, sender, text) VALUES (2, x'00', 'blob sender');
                 INSERT INTO messages (at_ms, sender, text) VALUES ('soon', 'x', 'text time');",
            )
            .unwrap();
        let store = Store::open(&dir.db(), 10).unwrap();
        assert_eq!(store.recent(), entries(0..1));
        assert_eq!(store.unreadable(), 3);
    }

    #[test]
    fn a_file_that_is_not_a_database_is_an_error() {
        let dir = TempDir::new("garbage");
        fs::write(
            dir.db(),
            b"this is not an SQLite database, not at all".repeat(100),
        )
        .unwrap();
        let error = Store::open(&dir.db(), 10).unwrap_err();
        assert!(matches!(error, StoreError::Sqlite { .. }), "{error}");
        assert!(error.to_string().contains("chat.db"), "{error}");
    }

    #[test]
    fn a_newer_schema_is_left_alone() {
        let dir = TempDir::new("newer");
        Store::open(&dir.db(), 10).unwrap().close().unwrap();
        Connection::open(dir.db())
            .unwrap()
            .execute_batch("INSERT INTO schema_version (version, applied_ms) VALUES (99, 0)")
            .unwrap();
        let error = Store::open(&dir.db(), 10).unwrap_err();
        assert!(
            matches!(error, StoreError::NewerSchema { found: 99, .. }),
            "{error}"
        );
    }

    #[test]
    fn the_file_uses_a_write_ahead_log_and_a_versioned_schema() {
        let dir = TempDir::new("schema");
        let store = Store::open(&dir.db(), 10).unwrap();
        let conn = Connection::open(dir.db()).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |row| row.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let version: i64 = conn
            .query_row("SELECT MAX(version) FROM schema_version", [], |row| {
                row.get(0)
            })
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        store.close().unwrap();
        // Opening again applies nothing twice.
        Store::open(&dir.db(), 10).unwrap().close().unwrap();
        let versions: i64 = conn
            .query_row("SELECT COUNT(*) FROM schema_version", [], |row| row.get(0))
            .unwrap();
        assert_eq!(versions, MIGRATIONS.len() as i64);
    }
}
