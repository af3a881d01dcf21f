//! berth's state store: one SQLite database (`<state_dir>/berth.db`).
//!
//! It records what berth was asked for and what it did, so the daemon can be
//! restarted, re-adopt running guests, and recover from a crash mid-apply:
//!
//! - `specs`: every desired spec, as a numbered *generation*, and which
//!   generation was last applied in full;
//! - `host` / `guests`: the applied host and guest config (opaque JSON), each
//!   guest's desired [`RunState`] and its [`Phase`];
//! - `resources`: every kernel/file-system object berth created (links, nft
//!   tables, cgroups, directories, processes), so `destroy` and recovery remove
//!   exactly what berth made;
//! - `journal`: the saga log of an apply, one row per step event
//!   ([`StepStatus`]), written before and after each step.
//!
//! All JSON payloads are opaque strings: the store does not depend on the spec
//! crate. The schema is versioned with `PRAGMA user_version` and migrated
//! forward on open; a database written by a newer berth is refused.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

/// File name of the database inside the state directory.
pub const DB_FILE: &str = "berth.db";

/// How long a writer waits for another connection's lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Ordered schema migrations: entry `i` takes the schema from version `i` to
/// `i + 1`. Never edit an entry that has shipped; append a new one.
const MIGRATIONS: &[&str] = &[
    // v1: initial schema.
    r#"
    CREATE TABLE specs (
        generation  INTEGER PRIMARY KEY AUTOINCREMENT,
        source      TEXT    NOT NULL,
        spec_json   TEXT    NOT NULL,
        created_at  INTEGER NOT NULL
    );
    CREATE TABLE applied (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        generation  INTEGER NOT NULL REFERENCES specs(generation),
        at          INTEGER NOT NULL
    );
    CREATE TABLE host (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        config_json TEXT    NOT NULL,
        updated_at  INTEGER NOT NULL
    );
    CREATE TABLE guests (
        name        TEXT    PRIMARY KEY,
        kind        TEXT    NOT NULL,
        idx         INTEGER NOT NULL,
        config_json TEXT    NOT NULL,
        run         TEXT    NOT NULL CHECK (run IN ('running', 'stopped')),
        phase       TEXT    NOT NULL CHECK (phase IN ('creating', 'ready', 'removing')),
        generation  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL
    );
    CREATE TABLE resources (
        kind        TEXT    NOT NULL,
        name        TEXT    NOT NULL,
        guest       TEXT,
        detail      TEXT    NOT NULL,
        created_at  INTEGER NOT NULL,
        PRIMARY KEY (kind, name)
    );
    CREATE INDEX resources_by_guest ON resources(guest);
    CREATE TABLE plans (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at  INTEGER NOT NULL
    );
    CREATE TABLE journal (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        plan_id     INTEGER NOT NULL,
        guest       TEXT,
        step        TEXT    NOT NULL,
        status      TEXT    NOT NULL CHECK (status IN
                        ('started', 'done', 'failed', 'undo_started', 'undo_done')),
        detail      TEXT    NOT NULL,
        at          INTEGER NOT NULL
    );
    CREATE INDEX journal_by_plan ON journal(plan_id, id);
    "#,
    // v2: small named facts the daemon keeps across restarts (an apply in
    // progress, drained guests, the host drain flag).
    r#"
    CREATE TABLE kv (
        key         TEXT    PRIMARY KEY,
        value       TEXT    NOT NULL,
        updated_at  INTEGER NOT NULL
    );
    "#,
];

/// Schema version this build writes and understands.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Errors from the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state directory cannot be created or written.
    #[error(
        "state dir {} is not writable: {source}; run as root or pass --state-dir / BERTH_STATE_DIR",
        path.display()
    )]
    NotWritable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The database was written by a newer berth.
    #[error("state store schema v{found} is newer than this berth (v{supported}); upgrade berth")]
    SchemaTooNew { found: u32, supported: u32 },
    /// Applying one migration failed; the database stays at `from`.
    #[error("state store: migrating schema v{from} -> v{to} failed: {source}")]
    Migration {
        from: u32,
        to: u32,
        #[source]
        source: rusqlite::Error,
    },
    /// A stored value is not one this berth knows (hand-edited or corrupt DB).
    #[error("state store: column `{column}` holds unknown value `{value}`")]
    BadValue { column: &'static str, value: String },
    #[error("state store: no guest `{0}`")]
    NoSuchGuest(String),
    #[error("state store: no spec generation {0}")]
    NoSuchGeneration(i64),
    #[error("state store: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// Error parsing one of the store's enums from its text form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{value}`")]
pub struct ParseEnumError {
    pub what: &'static str,
    pub value: String,
}

macro_rules! text_enum {
    ($(#[$m:meta])* $name:ident, $what:literal { $($(#[$vm:meta])* $var:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vm])* $var),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$var),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$var => $s),+ }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $name {
            type Err = ParseEnumError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($s => Ok($name::$var),)+
                    _ => Err(ParseEnumError { what: $what, value: s.to_owned() }),
                }
            }
        }
    };
}

text_enum!(
    /// The run state the operator asked for (not what is observed).
    RunState, "run state" {
        Running => "running",
        Stopped => "stopped",
    }
);

text_enum!(
    /// Where a guest is in its life as berth manages it. `Creating` or
    /// `Removing` found at start means an apply died mid-way.
    ///
    /// ```text
    /// (absent) -> Creating -> Ready -> Removing -> (row deleted)
    ///                 \________________/^
    /// ```
    Phase, "phase" {
        Creating => "creating",
        Ready => "ready",
        Removing => "removing",
    }
);

text_enum!(
    /// One event of an apply step in the journal (saga log).
    StepStatus, "step status" {
        Started => "started",
        Done => "done",
        Failed => "failed",
        UndoStarted => "undo_started",
        UndoDone => "undo_done",
    }
);

/// One stored desired spec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecRecord {
    pub generation: i64,
    /// Where it came from (file path, "api", ...).
    pub source: String,
    pub spec_json: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// A guest as last applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRecord {
    pub name: String,
    /// "vm", "container", ... (opaque to the store).
    pub kind: String,
    pub index: u32,
    pub config_json: String,
    pub run: RunState,
    pub phase: Phase,
    /// Spec generation this config came from.
    pub generation: i64,
    /// Unix seconds; set by the store on every write.
    pub updated_at: i64,
}

/// Something berth created and must be able to remove.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    /// "link", "nft_table", "cgroup", "dir", "process", ...
    pub kind: String,
    pub name: String,
    /// Owning guest, or `None` for host-level resources.
    pub guest: Option<String>,
    /// Opaque detail (JSON or text) needed to remove it.
    pub detail: String,
}

/// One journal row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub id: i64,
    pub plan_id: i64,
    pub guest: Option<String>,
    pub step: String,
    pub status: StepStatus,
    pub detail: String,
    /// Unix seconds.
    pub at: i64,
}

/// The state store. Cheap to share: `Send + Sync`, one connection behind a mutex.
pub struct Store {
    conn: Mutex<Connection>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn parse_col<T: FromStr>(column: &'static str, value: String) -> Result<T, StoreError> {
    value
        .parse()
        .map_err(|_| StoreError::BadValue { column, value })
}

/// Creates `dir` (mode 0700) if missing and proves it is writable by creating
/// and removing a probe file.
fn ensure_writable_dir(dir: &Path) -> Result<(), StoreError> {
    let not_writable = |source| StoreError::NotWritable {
        path: dir.to_path_buf(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(not_writable)?;
    let probe = dir.join(format!(".berth-probe-{}", std::process::id()));
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe)
        .map_err(not_writable)?;
    fs::remove_file(&probe).map_err(not_writable)?;
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the store in `state_dir`, migrating the
    /// schema forward.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        ensure_writable_dir(state_dir)?;
        let db = state_dir.join(DB_FILE);
        // Create the file ourselves so it is 0600 from the start; SQLite
        // gives the -wal/-shm files the same mode.
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&db)
            .map_err(|source| StoreError::NotWritable {
                path: state_dir.to_path_buf(),
                source,
            })?;
        let conn = Connection::open(&db)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // Returns the resulting mode as a row; we do not need it.
        let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        Self::init(conn)
    }

    /// A store that lives only as long as the value (tests, dry runs).
    pub fn open_in_memory() -> Result<Store, StoreError> {
        let conn = Connection::open_in_memory()?;
        Self::init(conn)
    }

    fn init(mut conn: Connection) -> Result<Store, StoreError> {
        conn.pragma_update(None, "foreign_keys", true)?;
        // WAL + NORMAL: a commit survives a crash of berth (kill -9); only a
        // power loss can drop the last commits, never corrupt the database.
        // Every resource is named from its guest, so recovery re-derives it.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        migrate(&mut conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-done SQL
        // transaction behind (rusqlite rolls back on drop), so carry on.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        Ok(user_version(&self.conn())?)
    }

    // ---- desired spec generations ----

    /// Records a new desired spec and returns its generation (increasing,
    /// never reused).
    pub fn save_spec(&self, source: &str, spec_json: &str) -> Result<i64, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO specs (source, spec_json, created_at) VALUES (?1, ?2, ?3)",
            params![source, spec_json, now()],
        )?;
        Ok(conn.last_insert_rowid())
    }

    /// The newest saved spec.
    pub fn latest_spec(&self) -> Result<Option<SpecRecord>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT generation, source, spec_json, created_at FROM specs
                 ORDER BY generation DESC LIMIT 1",
                [],
                spec_from_row,
            )
            .optional()?)
    }

    /// One saved spec by generation.
    pub fn spec(&self, generation: i64) -> Result<Option<SpecRecord>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT generation, source, spec_json, created_at FROM specs
                 WHERE generation = ?1",
                [generation],
                spec_from_row,
            )
            .optional()?)
    }

    /// Records that `generation` has been applied in full.
    pub fn mark_applied(&self, generation: i64) -> Result<(), StoreError> {
        let conn = self.conn();
        let exists: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM specs WHERE generation = ?1)",
            [generation],
            |r| r.get(0),
        )?;
        if !exists {
            return Err(StoreError::NoSuchGeneration(generation));
        }
        conn.execute(
            "INSERT INTO applied (id, generation, at) VALUES (1, ?1, ?2)
             ON CONFLICT (id) DO UPDATE SET generation = excluded.generation, at = excluded.at",
            params![generation, now()],
        )?;
        Ok(())
    }

    /// The generation last passed to [`Store::mark_applied`].
    pub fn applied_generation(&self) -> Result<Option<i64>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT generation FROM applied WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()?)
    }

    // ---- host ----

    /// Stores the applied host config.
    pub fn put_host(&self, json: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO host (id, config_json, updated_at) VALUES (1, ?1, ?2)
             ON CONFLICT (id) DO UPDATE SET config_json = excluded.config_json,
                                            updated_at = excluded.updated_at",
            params![json, now()],
        )?;
        Ok(())
    }

    /// The applied host config, if any.
    pub fn host(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT config_json FROM host WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Forgets the host config (idempotent).
    pub fn delete_host(&self) -> Result<(), StoreError> {
        self.conn().execute("DELETE FROM host", [])?;
        Ok(())
    }

    // ---- guests ----

    /// Inserts or replaces a guest. `updated_at` is set by the store.
    pub fn put_guest(&self, g: &GuestRecord) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO guests (name, kind, idx, config_json, run, phase, generation, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (name) DO UPDATE SET
                kind = excluded.kind, idx = excluded.idx, config_json = excluded.config_json,
                run = excluded.run, phase = excluded.phase, generation = excluded.generation,
                updated_at = excluded.updated_at",
            params![
                g.name,
                g.kind,
                g.index,
                g.config_json,
                g.run.as_str(),
                g.phase.as_str(),
                g.generation,
                now()
            ],
        )?;
        Ok(())
    }

    /// One guest by name.
    pub fn guest(&self, name: &str) -> Result<Option<GuestRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT name, kind, idx, config_json, run, phase, generation, updated_at
             FROM guests WHERE name = ?1",
        )?;
        let mut rows = stmt.query([name])?;
        match rows.next()? {
            Some(row) => Ok(Some(guest_from_row(row)?)),
            None => Ok(None),
        }
    }

    /// All guests, sorted by name.
    pub fn guests(&self) -> Result<Vec<GuestRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT name, kind, idx, config_json, run, phase, generation, updated_at
             FROM guests ORDER BY name",
        )?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(guest_from_row(row)?);
        }
        Ok(out)
    }

    /// Sets a guest's phase; [`StoreError::NoSuchGuest`] if it is not stored.
    pub fn set_phase(&self, name: &str, phase: Phase) -> Result<(), StoreError> {
        self.update_guest_column(name, "phase", phase.as_str())
    }

    /// Sets a guest's desired run state; [`StoreError::NoSuchGuest`] if it is
    /// not stored.
    pub fn set_run_state(&self, name: &str, run: RunState) -> Result<(), StoreError> {
        self.update_guest_column(name, "run", run.as_str())
    }

    fn update_guest_column(
        &self,
        name: &str,
        column: &'static str,
        value: &str,
    ) -> Result<(), StoreError> {
        // `column` is one of two literals above, never user input.
        let sql = format!("UPDATE guests SET {column} = ?1, updated_at = ?2 WHERE name = ?3");
        let n = self.conn().execute(&sql, params![value, now(), name])?;
        if n == 0 {
            return Err(StoreError::NoSuchGuest(name.to_owned()));
        }
        Ok(())
    }

    /// Deletes a guest and its resource rows, in one transaction
    /// (idempotent).
    pub fn delete_guest(&self, name: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM resources WHERE guest = ?1", [name])?;
        tx.execute("DELETE FROM guests WHERE name = ?1", [name])?;
        tx.commit()?;
        Ok(())
    }

    // ---- resources ----

    /// Records a resource; adding the same `(kind, name)` again updates its
    /// owner and detail.
    pub fn add_resource(&self, r: &Resource) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO resources (kind, name, guest, detail, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (kind, name) DO UPDATE SET
                guest = excluded.guest, detail = excluded.detail",
            params![r.kind, r.name, r.guest, r.detail, now()],
        )?;
        Ok(())
    }

    /// Forgets a resource (idempotent).
    pub fn remove_resource(&self, kind: &str, name: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "DELETE FROM resources WHERE kind = ?1 AND name = ?2",
            params![kind, name],
        )?;
        Ok(())
    }

    /// Resources of one guest, or all of them (`None`), in creation order.
    /// Remove them in reverse.
    pub fn resources(&self, guest: Option<&str>) -> Result<Vec<Resource>, StoreError> {
        let conn = self.conn();
        let map = |r: &Row<'_>| {
            Ok(Resource {
                kind: r.get(0)?,
                name: r.get(1)?,
                guest: r.get(2)?,
                detail: r.get(3)?,
            })
        };
        let out = match guest {
            Some(g) => conn
                .prepare_cached(
                    "SELECT kind, name, guest, detail FROM resources
                     WHERE guest = ?1 ORDER BY rowid",
                )?
                .query_map([g], map)?
                .collect::<Result<Vec<_>, _>>()?,
            None => conn
                .prepare_cached("SELECT kind, name, guest, detail FROM resources ORDER BY rowid")?
                .query_map([], map)?
                .collect::<Result<Vec<_>, _>>()?,
        };
        Ok(out)
    }

    // ---- apply journal ----

    /// Appends one step event to the journal of `plan_id`.
    pub fn journal(
        &self,
        plan_id: i64,
        guest: Option<&str>,
        step: &str,
        status: StepStatus,
        detail: &str,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO journal (plan_id, guest, step, status, detail, at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![plan_id, guest, step, status.as_str(), detail, now()],
        )?;
        Ok(())
    }

    /// All events of one plan, oldest first.
    pub fn journal_entries(&self, plan_id: i64) -> Result<Vec<JournalEntry>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, plan_id, guest, step, status, detail, at FROM journal
             WHERE plan_id = ?1 ORDER BY id",
        )?;
        collect_journal(stmt.query([plan_id])?)
    }

    /// Steps, across all plans, whose last event is `Started` or
    /// `UndoStarted`: berth died while running them, so their effect is
    /// unknown. A step is identified by `(plan_id, guest, step)` (NULL guests
    /// group together). Returns that
    /// last event of each, oldest first.
    pub fn unfinished_steps(&self) -> Result<Vec<JournalEntry>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT j.id, j.plan_id, j.guest, j.step, j.status, j.detail, j.at
             FROM journal j
             JOIN (SELECT MAX(id) AS id FROM journal
                   GROUP BY plan_id, guest, step) last
               ON last.id = j.id
             WHERE j.status IN ('started', 'undo_started')
             ORDER BY j.id",
        )?;
        collect_journal(stmt.query([])?)
    }

    // ---- named facts ----

    /// Sets `key` to `value`.
    pub fn set_kv(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO kv (key, value, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            params![key, value, now()],
        )?;
        Ok(())
    }

    /// The value of `key`, if set.
    pub fn kv(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT value FROM kv WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    /// Removes `key` (no error if it was not set).
    pub fn delete_kv(&self, key: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM kv WHERE key = ?1", [key])?;
        Ok(())
    }

    /// Every `(key, value)` whose key starts with `prefix`, by key.
    pub fn kv_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT key, value FROM kv WHERE substr(key, 1, ?2) = ?1 ORDER BY key")?;
        let rows = stmt.query_map(params![prefix, prefix.len() as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Allocates a new plan id (increasing, never reused, also across
    /// processes sharing the database).
    pub fn next_plan_id(&self) -> Result<i64, StoreError> {
        let conn = self.conn();
        conn.execute("INSERT INTO plans (created_at) VALUES (?1)", [now()])?;
        Ok(conn.last_insert_rowid())
    }
}

fn user_version(conn: &Connection) -> rusqlite::Result<u32> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// Brings the schema up to [`SCHEMA_VERSION`], one transaction per migration.
/// Each transaction takes the write lock first and re-reads the version, so
/// two processes opening the same new database do not both migrate it.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let found = user_version(conn)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let from = user_version(&tx)?;
        if from > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found: from,
                supported: SCHEMA_VERSION,
            });
        }
        let Some(sql) = MIGRATIONS.get(from as usize) else {
            return Ok(()); // up to date; `tx` rolls back, nothing was written
        };
        let to = from + 1;
        let step = || -> rusqlite::Result<()> {
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", to)?;
            Ok(())
        };
        step().map_err(|source| StoreError::Migration { from, to, source })?;
        tx.commit()
            .map_err(|source| StoreError::Migration { from, to, source })?;
    }
}

fn spec_from_row(r: &Row<'_>) -> rusqlite::Result<SpecRecord> {
    Ok(SpecRecord {
        generation: r.get(0)?,
        source: r.get(1)?,
        spec_json: r.get(2)?,
        created_at: r.get(3)?,
    })
}

fn guest_from_row(r: &Row<'_>) -> Result<GuestRecord, StoreError> {
    Ok(GuestRecord {
        name: r.get(0)?,
        kind: r.get(1)?,
        index: r.get(2)?,
        config_json: r.get(3)?,
        run: parse_col("guests.run", r.get(4)?)?,
        phase: parse_col("guests.phase", r.get(5)?)?,
        generation: r.get(6)?,
        updated_at: r.get(7)?,
    })
}

fn collect_journal(mut rows: rusqlite::Rows<'_>) -> Result<Vec<JournalEntry>, StoreError> {
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(JournalEntry {
            id: r.get(0)?,
            plan_id: r.get(1)?,
            guest: r.get(2)?,
            step: r.get(3)?,
            status: parse_col("journal.status", r.get(4)?)?,
            detail: r.get(5)?,
            at: r.get(6)?,
        });
    }
    Ok(out)
}
