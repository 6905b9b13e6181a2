//! The single-machine job store: plain files under `<data dir>/jobs/`, one directory a job.
//!
//! ```text
//! jobs/
//!   LOCK                 held (flock) by the server using the store: one server a store
//!   <id>/
//!     request.json       the task and format, as posted; written once
//!     job.json           the job's record (state, runs, result, output, error): rewritten
//!                        whole on each change of state, through job.json.tmp and a rename
//!     events.jsonl       its events, one JSON object a line, appended as they happen
//! ```
//!
//! A job exists once its `job.json` does: `request.json` is written first, and both are
//! synced (and the directory entries with them) before `create` returns. Events are appended
//! without a sync each; `update`, which every change of state goes through, syncs them
//! first. So a crash (SIGKILL, power loss) can lose at most the last events of a running
//! job, and only leaves behind a torn last line of `events.jsonl`, which `load` drops (and
//! cuts off, so that later appends start on a line of their own).
//!
//! Nothing unreadable stops a start: a directory whose `job.json` is missing, unreadable or
//! not a record, a corrupt event line, a request that does not parse, each is logged as a
//! warning and skipped (the files are left as they are, for whoever wants to look).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;
use serde_json::Value;

use super::store::{JobRecord, JobStore, Loaded, StoredJob, StoredRequest};
use super::MAX_EVENTS;

const RECORD: &str = "job.json";
const REQUEST: &str = "request.json";
const EVENTS: &str = "events.jsonl";
const LOCK: &str = "LOCK";

/// Jobs as files under one directory (`<data dir>/jobs`).
pub struct FileStore {
    dir: PathBuf,
    /// Bytes each job takes, kept as it grows.
    sizes: Mutex<HashMap<String, u64>>,
    /// Held for as long as the store is open: a second server on the same directory would
    /// run the first one's jobs again.
    _lock: nix::fcntl::Flock<File>,
}

impl FileStore {
    /// Opens (creating it if need be) the store in `dir`, and takes its lock; an error if
    /// the directory cannot be made or another process holds the lock.
    pub fn open(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|e| with_path(e, "cannot create", &dir))?;
        let lock_path = dir.join(LOCK);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| with_path(e, "cannot open", &lock_path))?;
        use nix::fcntl::{Flock, FlockArg};
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "{} is in use by another forgeline serve (its {LOCK} is locked); \
                         give each server a --data-dir of its own",
                        dir.display()
                    ),
                ))
            }
            Err((_, e)) => return Err(with_path(e.into(), "cannot lock", &lock_path)),
        };
        Ok(Self {
            dir,
            sizes: Mutex::default(),
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn job_dir(&self, id: &str) -> io::Result<PathBuf> {
        if valid_id(id) {
            Ok(self.dir.join(id))
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{id}` is not a job id"),
            ))
        }
    }

    fn sizes(&self) -> MutexGuard<'_, HashMap<String, u64>> {
        self.sizes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts the job's files again.
    fn measure(&self, id: &str, dir: &Path) {
        let bytes = dir_bytes(dir);
        self.sizes().insert(id.to_string(), bytes);
    }

    /// One job's directory read back; Err says why it is skipped.
    fn load_job(&self, name: &str, dir: &Path) -> Result<StoredJob, String> {
        let text = match fs::read(dir.join(RECORD)) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(format!(
                    "it has no {RECORD} (the server stopped while accepting the job, which was never acknowledged)"
                ))
            }
            Err(e) => return Err(format!("cannot read its {RECORD}: {e}")),
        };
        let record: JobRecord = serde_json::from_slice(&text)
            .map_err(|e| format!("its {RECORD} is not a job record: {e}"))?;
        if record.id != name {
            return Err(format!(
                "its {RECORD} is for job `{}`, not `{name}`",
                record.id
            ));
        }
        let request = match fs::read(dir.join(REQUEST)) {
            Ok(t) => match serde_json::from_slice::<StoredRequest>(&t) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(job = name, "the job's {REQUEST} does not parse: {e}");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(job = name, "cannot read the job's {REQUEST}: {e}");
                None
            }
        };
        let events = read_events(name, &dir.join(EVENTS));
        Ok(StoredJob {
            record,
            request,
            events,
        })
    }
}

impl JobStore for FileStore {
    fn load(&self) -> io::Result<Loaded> {
        let mut loaded = Loaded::default();
        let entries =
            fs::read_dir(&self.dir).map_err(|e| with_path(e, "cannot read", &self.dir))?;
        for entry in entries {
            let entry = entry.map_err(|e| with_path(e, "cannot read", &self.dir))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == LOCK || !path.is_dir() {
                continue;
            }
            if !valid_id(&name) {
                tracing::warn!(
                    "job store: skipping {}: not a job's directory",
                    path.display()
                );
                loaded.skipped += 1;
                continue;
            }
            // A rename that did not happen: the record it was to replace is still there.
            let _ = fs::remove_file(path.join(format!("{RECORD}.tmp")));
            match self.load_job(&name, &path) {
                Ok(job) => {
                    self.measure(&name, &path);
                    loaded.jobs.push(job);
                }
                Err(why) => {
                    tracing::warn!("job store: skipping {}: {why}", path.display());
                    loaded.skipped += 1;
                }
            }
        }
        loaded.jobs.sort_by(|a, b| {
            (a.record.created, &a.record.id).cmp(&(b.record.created, &b.record.id))
        });
        Ok(loaded)
    }

    fn create(&self, record: &JobRecord, request: &StoredRequest) -> io::Result<()> {
        let dir = self.job_dir(&record.id)?;
        fs::create_dir(&dir)?;
        let written = (|| {
            write_whole(&dir, REQUEST, request)?;
            write_whole(&dir, RECORD, record)?;
            sync_dir(&self.dir)
        })();
        if let Err(e) = written {
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
        self.measure(&record.id, &dir);
        Ok(())
    }

    fn update(&self, record: &JobRecord) -> io::Result<()> {
        let dir = self.job_dir(&record.id)?;
        // The events first: a record that says the job ended comes with all its events.
        match File::open(dir.join(EVENTS)) {
            Ok(f) => f.sync_all()?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        write_whole(&dir, RECORD, record)?;
        self.measure(&record.id, &dir);
        Ok(())
    }

    fn append_event(&self, id: &str, event: &Value) -> io::Result<()> {
        let dir = self.job_dir(id)?;
        let mut line = serde_json::to_vec(event).map_err(io::Error::other)?;
        line.push(b'\n');
        // Only a job that exists gets events: no `create_dir`, so a removed job stays gone.
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .open(dir.join(EVENTS))?;
        // One write: a line is whole, or torn only by a crash mid-write.
        f.write_all(&line)?;
        *self.sizes().entry(id.to_string()).or_default() += line.len() as u64;
        Ok(())
    }

    fn remove(&self, id: &str) -> io::Result<()> {
        let dir = self.job_dir(id)?;
        self.sizes().remove(id);
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn bytes(&self, id: &str) -> u64 {
        self.sizes().get(id).copied().unwrap_or(0)
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}

/// Job ids as the table makes them (`job-` and hex digits); anything else under the store's
/// directory is not a job's, and a path made from one cannot leave the directory.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// Writes `name` in `dir` whole or not at all: to a temporary file, synced, renamed over it.
fn write_whole(dir: &Path, name: &str, value: &impl Serialize) -> io::Result<()> {
    let text = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(&text)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// Makes a directory's new or renamed entries durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// A job's events. A last line with no newline was torn by a crash mid-write: it is dropped
/// and cut off the file. Any other line that is not a JSON object is skipped with a warning.
/// Past `MAX_EVENTS` lines the rest are not read.
fn read_events(id: &str, path: &Path) -> Vec<Value> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(
                job = id,
                "cannot read the job's events ({}): {e}",
                path.display()
            );
            return Vec::new();
        }
    };
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if whole < bytes.len() {
        tracing::warn!(
            job = id,
            "dropping a torn last event line ({} bytes) of {}",
            bytes.len() - whole,
            path.display()
        );
        let cut = OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(whole as u64).and_then(|()| f.sync_all()));
        if let Err(e) = cut {
            tracing::warn!(
                job = id,
                "cannot cut the torn line off {}: {e}",
                path.display()
            );
        }
    }
    let mut events = Vec::new();
    let mut bad = 0usize;
    for line in bytes[..whole].split(|&b| b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Value>(line) {
            Ok(v @ Value::Object(_)) if events.len() < MAX_EVENTS => events.push(v),
            Ok(Value::Object(_)) => break,
            _ => bad += 1,
        }
    }
    if bad > 0 {
        tracing::warn!(
            job = id,
            "skipped {bad} corrupt event lines of {}",
            path.display()
        );
    }
    events
}

#[cfg(test)]
mod tests;
