//! Accounts: a nickname that belongs to someone.
//!
//! A client registers a nickname with a password, then logs in to it with
//! the same password (`docs/PROTOCOL.md`, "Accounts"). A registered
//! nickname is taken by no one else: the room refuses it to anyone not
//! logged in to its account.
//!
//! Passwords are stored as argon2id hashes (PHC strings: the parameters and
//! the salt travel with the hash), in the `accounts` table of the same
//! SQLite file as the history (`--db`), so accounts survive a restart. The
//! nicknames registered are also kept in memory, so checking one costs no
//! disk access.
//!
//! Hashing is deliberately slow and takes about 19 MiB: it runs on
//! `smol::unblock`'s threads, a few at a time ([`MAX_HASHING`]), so that
//! many logins at once neither stall the room nor take all its memory.
//! Login attempts are rate limited besides, per IP address and per account
//! ([`Attempts`]), before any hashing.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::Hash;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rusqlite::{Connection, ErrorCode, OptionalExtension};
use smol::lock::Semaphore;

use crate::bucket::{Bucket, Rate};
use crate::store::{self, lock, StoreError};

/// Passwords hashed or checked at once, at most: each hash takes about
/// 19 MiB and a core for some milliseconds.
pub const MAX_HASHING: usize = 4;

/// The registered nicknames and their passwords' hashes. See the
/// [module documentation](self).
pub struct Accounts {
    path: PathBuf,
    /// Used by one blocking call at a time.
    conn: Mutex<Connection>,
    /// Every registered nickname: what the file holds, kept in step.
    registered: Mutex<HashSet<String>>,
    hashing: Semaphore,
}

/// Why a registration or a login failed. Displayed, it is what the client
/// is told (so it never says which of nickname and password was wrong).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AccountError {
    /// Logging in: no such account, or the wrong password.
    #[error("wrong nickname or password")]
    WrongPassword,
    /// Registering: the nickname has an account already.
    #[error("{nickname} is registered already")]
    Taken { nickname: String },
    /// The store failed; the client is told only that the server did.
    #[error("the server cannot reach its accounts now")]
    Store(#[source] StoreError),
}

/// Errors are equal when they mean the same (store errors: when they say
/// the same).
impl PartialEq for AccountError {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (AccountError::WrongPassword, AccountError::WrongPassword) => true,
            (AccountError::Taken { nickname: a }, AccountError::Taken { nickname: b }) => a == b,
            (AccountError::Store(a), AccountError::Store(b)) => a.to_string() == b.to_string(),
            _ => false,
        }
    }
}

impl Accounts {
    /// Opens the accounts in the database at `path` (the history's file;
    /// [`store::IN_MEMORY`] for accounts lost at exit), creating the table
    /// if need be, and loads the registered nicknames. Blocks on the disk.
    pub fn open(path: &Path) -> Result<Accounts, StoreError> {
        let mut conn = store::connect(path)?;
        store::migrate(&mut conn, path)?;
        let registered = conn
            .prepare("SELECT nickname FROM accounts")
            .and_then(|mut stmt| {
                stmt.query_map([], |row| row.get::<_, String>(0))?
                    .collect::<rusqlite::Result<HashSet<_>>>()
            })
            .map_err(|e| store::sqlite_error(path, "read the accounts", e))?;
        Ok(Accounts {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
            registered: Mutex::new(registered),
            hashing: Semaphore::new(MAX_HASHING),
        })
    }

    /// Accounts in memory only, lost at exit.
    pub fn in_memory() -> Result<Accounts, StoreError> {
        Accounts::open(Path::new(store::IN_MEMORY))
    }

    /// Whether `nickname` has an account. Memory only: call it freely.
    pub fn is_registered(&self, nickname: &str) -> bool {
        lock(&self.registered).contains(nickname)
    }

    /// How many accounts there are.
    pub fn len(&self) -> usize {
        lock(&self.registered).len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes `nickname` an account with `password`. Of several registering
    /// one nickname at once, in this process or another on the same file,
    /// exactly one succeeds; the others get [`AccountError::Taken`].
    pub async fn register(
        self: &Arc<Self>,
        nickname: &str,
        password: &str,
    ) -> Result<(), AccountError> {
        if self.is_registered(nickname) {
            let nickname = nickname.to_owned();
            return Err(AccountError::Taken { nickname });
        }
        let (this, nickname, password) = (self.clone(), nickname.to_owned(), password.to_owned());
        let _permit = self.hashing.acquire().await;
        smol::unblock(move || this.register_blocking(nickname, &password)).await
    }

    fn register_blocking(&self, nickname: String, password: &str) -> Result<(), AccountError> {
        let salt = SaltString::generate(&mut OsRng);
        let hash = Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map_err(|_| AccountError::WrongPassword)?
            .to_string();
        let created_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let inserted = lock(&self.conn).execute(
            "INSERT INTO accounts (nickname, hash, created_ms) VALUES (?1, ?2, ?3)",
            (&nickname, &hash, created_ms),
        );
        match inserted {
            Ok(_) => {
                lock(&self.registered).insert(nickname);
                Ok(())
            }
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == ErrorCode::ConstraintViolation =>
            {
                // Registered by another process on the same file meanwhile.
                lock(&self.registered).insert(nickname.clone());
                Err(AccountError::Taken { nickname })
            }
            Err(e) => Err(self.failed("register an account", e)),
        }
    }

    /// Checks `password` against the account of `nickname`.
    pub async fn verify(
        self: &Arc<Self>,
        nickname: &str,
        password: &str,
    ) -> Result<(), AccountError> {
        let (this, nickname, password) = (self.clone(), nickname.to_owned(), password.to_owned());
        let _permit = self.hashing.acquire().await;
        smol::unblock(move || this.verify_blocking(&nickname, &password)).await
    }

    fn verify_blocking(&self, nickname: &str, password: &str) -> Result<(), AccountError> {
        let hash: Option<String> = lock(&self.conn)
            .query_row(
                "SELECT hash FROM accounts WHERE nickname = ?1",
                [nickname],
                |row| row.get(0),
            )
            .optional()
            .map_err(|e| self.failed("read an account", e))?;
        let Some(hash) = hash else {
            return Err(AccountError::WrongPassword);
        };
        let parsed = PasswordHash::new(&hash).map_err(|_| AccountError::WrongPassword)?;
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .map_err(|_| AccountError::WrongPassword)
    }

    fn failed(&self, doing: &'static str, e: rusqlite::Error) -> AccountError {
        AccountError::Store(store::sqlite_error(&self.path, doing, e))
    }
}

impl fmt::Debug for Accounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Accounts")
            .field("path", &self.path)
            .field("registered", &self.len())
            .finish_non_exhaustive()
    }
}

/// How many login and registration attempts are allowed, per IP address
/// and per account.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoginRate {
    /// Per remote IP address. Default: 5 at once, then one every 12 s.
    pub per_ip: Rate,
    /// Per nickname. Default: 10 at once, then one every 6 s.
    pub per_account: Rate,
}

impl Default for LoginRate {
    fn default() -> Self {
        LoginRate {
            per_ip: Rate {
                per_second: 1.0 / 12.0,
                burst: 5.0,
            },
            per_account: Rate {
                per_second: 1.0 / 6.0,
                burst: 10.0,
            },
        }
    }
}

/// Buckets kept per key, at most; past it, idle ones (full again) are
/// forgotten, and if none is idle, attempts from new keys wait.
const MAX_TRACKED: usize = 65_536;

/// The login rate limit: a token bucket per IP address and one per
/// account. Sans-IO: told the time. A successful attempt gives its tokens
/// back, so a client that reconnects and logs in again and again is never
/// held up; failures add up.
#[derive(Debug)]
pub struct Attempts {
    rate: LoginRate,
    by_ip: HashMap<IpAddr, Bucket>,
    by_account: HashMap<String, Bucket>,
}

impl Attempts {
    /// No attempts yet.
    pub fn new(rate: LoginRate) -> Attempts {
        Attempts {
            rate,
            by_ip: HashMap::new(),
            by_account: HashMap::new(),
        }
    }

    /// Takes an attempt for `ip` and `nickname` at `now`, or says how long
    /// until one is allowed (and takes nothing).
    pub fn take(&mut self, ip: IpAddr, nickname: &str, now: Instant) -> Result<(), Duration> {
        let by_ip = bucket(&mut self.by_ip, ip, self.rate.per_ip, now)?;
        let by_account = bucket(
            &mut self.by_account,
            nickname.to_owned(),
            self.rate.per_account,
            now,
        )?;
        let ready = by_ip.ready(now).max(by_account.ready(now));
        if ready > now {
            return Err(ready - now);
        }
        // Both have a token: neither take can fail.
        let _ = (by_ip.take(now), by_account.take(now));
        Ok(())
    }

    /// Gives back the tokens of an attempt that succeeded.
    pub fn succeeded(&mut self, ip: IpAddr, nickname: &str) {
        if let Some(b) = self.by_ip.get_mut(&ip) {
            b.give_back();
        }
        if let Some(b) = self.by_account.get_mut(nickname) {
            b.give_back();
        }
    }
}

/// The bucket for `key`, made full if new. Past [`MAX_TRACKED`] keys, the
/// idle ones are forgotten first; `Err` if none is.
fn bucket<K: Hash + Eq>(
    map: &mut HashMap<K, Bucket>,
    key: K,
    rate: Rate,
    now: Instant,
) -> Result<&mut Bucket, Duration> {
    if !map.contains_key(&key) && map.len() >= MAX_TRACKED {
        map.retain(|_, b| !b.is_full(now));
        if map.len() >= MAX_TRACKED {
            return Err(Duration::from_secs_f64(1.0 / rate.per_second.max(0.001)));
        }
    }
    Ok(map.entry(key).or_insert_with(|| Bucket::new(rate, now)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_db(name: &str) -> (PathBuf, impl Drop) {
        struct Dir(PathBuf);
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let dir =
            std::env::temp_dir().join(format!("chatpipe-accounts-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        (dir.join("chat.db"), Dir(dir))
    }

    #[test]
    fn register_then_verify_and_survive_a_restart() {
        let (db, _dir) = temp_db("restart");
        smol::block_on(async {
            let accounts = Arc::new(Accounts::open(&db).unwrap());
            assert!(!accounts.is_registered("ana"));
            accounts.register("ana", "correct horse").await.unwrap();
            assert!(accounts.is_registered("ana"));
            accounts.verify("ana", "correct horse").await.unwrap();
            assert!(matches!(
                accounts.verify("ana", "wrong").await,
                Err(AccountError::WrongPassword)
            ));
            assert!(matches!(
                accounts.verify("nobody", "correct horse").await,
                Err(AccountError::WrongPassword)
            ));
            assert!(matches!(
                accounts.register("ana", "other").await,
                Err(AccountError::Taken { .. })
            ));
        });
        // Another process opening the file later.
        smol::block_on(async {
            let accounts = Arc::new(Accounts::open(&db).unwrap());
            assert!(accounts.is_registered("ana"));
            assert_eq!(accounts.len(), 1);
            accounts.verify("ana", "correct horse").await.unwrap();
        });
        // Stored hashed, never as given.
        let conn = Connection::open(&db).unwrap();
        let hash: String = conn
            .query_row("SELECT hash FROM accounts", [], |r| r.get(0))
            .unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(!hash.contains("correct horse"));
    }

    #[test]
    fn of_two_stores_on_one_file_registering_one_nickname_exactly_one_wins() {
        let (db, _dir) = temp_db("two");
        let a = Arc::new(Accounts::open(&db).unwrap());
        let b = Arc::new(Accounts::open(&db).unwrap());
        let (ra, rb) = smol::block_on(async {
            smol::future::zip(a.register("bo", "one"), b.register("bo", "two")).await
        });
        assert!(ra.is_ok() != rb.is_ok(), "{ra:?} {rb:?}");
        assert!(a.is_registered("bo") && b.is_registered("bo"));
    }

    #[test]
    fn attempts_are_limited_per_ip_and_per_account_and_successes_give_back() {
        let rate = LoginRate {
            per_ip: Rate {
                per_second: 1.0,
                burst: 3.0,
            },
            per_account: Rate {
                per_second: 0.5,
                burst: 2.0,
            },
        };
        let t0 = Instant::now();
        let mut attempts = Attempts::new(rate);
        let (ip1, ip2): (IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        // Per account: two at once, from any address.
        assert_eq!(attempts.take(ip1, "ana", t0), Ok(()));
        assert_eq!(attempts.take(ip2, "ana", t0), Ok(()));
        assert_eq!(attempts.take(ip2, "ana", t0), Err(Duration::from_secs(2)));
        // The refused attempt took nothing from ip2: two more elsewhere.
        assert_eq!(attempts.take(ip2, "bo", t0), Ok(()));
        assert_eq!(attempts.take(ip2, "cy", t0), Ok(()));
        // Per address: three at once.
        assert_eq!(attempts.take(ip2, "di", t0), Err(Duration::from_secs(1)));
        // Refilled with time.
        assert_eq!(
            attempts.take(ip2, "ana", t0 + Duration::from_secs(2)),
            Ok(())
        );
        // A success gives its tokens back.
        let t1 = t0 + Duration::from_secs(2);
        assert!(attempts.take(ip1, "ana", t1).is_err());
        attempts.succeeded(ip2, "ana");
        assert_eq!(attempts.take(ip1, "ana", t1), Ok(()));
    }
}
