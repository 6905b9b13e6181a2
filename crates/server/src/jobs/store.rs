//! Where jobs outlive the process: the `JobStore` seam and what it keeps of a job, and the
//! retention policy that decides which finished jobs go.
//!
//! The job table (`Jobs`) keeps every job it serves in memory and writes through to a store:
//! a job's request and first record when it is accepted, each event as it happens, its
//! record again when its state changes, and its removal. On start it loads what the store
//! holds, keeps the finished jobs and runs the ones that were running again under the same
//! id. `FileStore` (plain files in a data directory) is the single-machine store; a cluster
//! backend implements the same trait over its own storage.

use std::io;
use std::time::Duration;

use forgeline_pipeline::{Format, TaskRequest};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::JobState;

/// A job as the store keeps it: everything `GET /v1/jobs/{id}` shows except its events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    /// Unix seconds when it was accepted.
    pub created: u64,
    /// The task's first 200 characters, as the API shows it.
    pub task: String,
    pub state: JobState,
    /// How many times it has been started: 1, and one more each time a restart runs it again.
    pub runs: u32,
    /// Unix seconds when it ended.
    #[serde(default)]
    pub finished: Option<u64>,
    #[serde(default)]
    pub result: Option<Value>,
    #[serde(default)]
    pub output: Option<String>,
    #[serde(default)]
    pub error: Option<Value>,
    /// Events past the per-job cap, counted but not kept.
    #[serde(default)]
    pub events_dropped: usize,
}

/// What was asked for: what a job needs to run again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredRequest {
    pub task: TaskRequest,
    pub format: Format,
}

/// One job read back from a store.
#[derive(Clone, Debug)]
pub struct StoredJob {
    pub record: JobRecord,
    /// None when it could not be read (a finished job is still shown; a running one cannot
    /// run again).
    pub request: Option<StoredRequest>,
    /// Its events in order, as the API streams them (JSON objects with `object`).
    pub events: Vec<Value>,
}

/// What a store holds, read back at start-up.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Oldest first.
    pub jobs: Vec<StoredJob>,
    /// Jobs that could not be read (each was logged with its reason) and were left as they are.
    pub skipped: usize,
}

/// Durable storage for jobs. Calls for one job come one at a time, in order (the table
/// serializes them); calls for different jobs may come at once from different threads.
/// Every call is quick, blocking I/O: small files, no network round trip longer than a write.
pub trait JobStore: Send + Sync + 'static {
    /// Everything the store holds, oldest first. What cannot be read is skipped with a
    /// warning, never an error; only a store that cannot be read at all is one.
    fn load(&self) -> io::Result<Loaded>;
    /// A new job. Once this returns Ok the job survives a crash; `AlreadyExists` when the
    /// id is taken.
    fn create(&self, record: &JobRecord, request: &StoredRequest) -> io::Result<()>;
    /// Replaces the job's record (its state changed), durably.
    fn update(&self, record: &JobRecord) -> io::Result<()>;
    /// Adds an event after the job's others. Not synced on its own: `update` syncs them.
    fn append_event(&self, id: &str, event: &Value) -> io::Result<()>;
    /// Forgets the job: record, request and events.
    fn remove(&self, id: &str) -> io::Result<()>;
    /// Bytes the job takes in the store (0 when the store does not count them).
    fn bytes(&self, id: &str) -> u64;
    /// Where the store keeps its jobs, for log lines.
    fn describe(&self) -> String;
}

/// How long finished jobs are kept and how much room the store may take, besides
/// `JobLimits::max_kept`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Finished jobs older than this (since they ended) go; None keeps them.
    pub keep_for: Option<Duration>,
    /// Finished jobs go, those that ended first first, while the store takes more; None: no
    /// bound.
    pub max_bytes: Option<u64>,
}

/// A job as retention sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kept {
    pub id: String,
    /// When it ended (unix seconds); None while it runs (a running job is never removed).
    pub finished: Option<u64>,
    pub bytes: u64,
}

/// The finished jobs to remove so that, with `room` more jobs to come, at most `max_kept`
/// are kept, none ended more than `keep_for` before `now`, and the store holds at most
/// `max_bytes`: those that ended first go first. Running jobs count against the bounds but
/// are never chosen, so the bounds may stay exceeded while they run.
pub fn expired(
    jobs: &[Kept],
    now: u64,
    max_kept: usize,
    room: usize,
    retention: &Retention,
) -> Vec<String> {
    let mut finished: Vec<&Kept> = jobs.iter().filter(|j| j.finished.is_some()).collect();
    finished.sort_by_key(|j| j.finished);
    let mut count = jobs.len() + room;
    let mut bytes: u64 = jobs.iter().map(|j| j.bytes).sum();
    let oldest = retention.keep_for.map(|d| now.saturating_sub(d.as_secs()));
    let mut out = Vec::new();
    for j in finished {
        let too_old = oldest.is_some_and(|o| j.finished.is_some_and(|f| f < o));
        let too_many = count > max_kept;
        let too_big = retention.max_bytes.is_some_and(|m| bytes > m);
        if !(too_old || too_many || too_big) {
            // Those after it ended later: younger, and removing them is not needed.
            break;
        }
        count -= 1;
        bytes = bytes.saturating_sub(j.bytes);
        out.push(j.id.clone());
    }
    out
}

/// `--keep-jobs-for`: seconds, or a number with a unit: `s`, `m`, `h`, `d` or `w`
/// (`90s`, `30m`, `12h`, `7d`, `2w`); `0` keeps finished jobs however old.
pub fn parse_age(s: &str) -> Result<Option<Duration>, String> {
    let t = s.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let per: u64 = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        other => {
            return Err(format!(
                "`{s}`: unknown unit `{other}` (seconds, or a number followed by s, m, h, d or w, as in 7d)"
            ))
        }
    };
    let n: u64 = digits.parse().map_err(|_| {
        format!("`{s}`: not a number of seconds, or a number with s, m, h, d or w (7d)")
    })?;
    let secs = n
        .checked_mul(per)
        .filter(|&s| s <= 100 * 365 * 86_400)
        .ok_or_else(|| format!("`{s}`: more than 100 years"))?;
    Ok((secs > 0).then(|| Duration::from_secs(secs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(id: &str, finished: Option<u64>, bytes: u64) -> Kept {
        Kept {
            id: id.into(),
            finished,
            bytes,
        }
    }

    #[test]
    fn retention_removes_the_jobs_that_ended_first_and_never_a_running_one() {
        let jobs = [
            kept("c", Some(300), 10),
            kept("run", None, 10),
            kept("a", Some(100), 10),
            kept("b", Some(200), 10),
        ];
        let none = Retention::default();
        assert!(expired(&jobs, 1000, 4, 0, &none).is_empty());
        // Count: one more to come makes five of four.
        assert_eq!(expired(&jobs, 1000, 4, 1, &none), ["a"]);
        assert_eq!(expired(&jobs, 1000, 2, 0, &none), ["a", "b"]);
        // The running job is never chosen, even past every bound.
        assert_eq!(expired(&jobs, 1000, 0, 0, &none), ["a", "b", "c"]);
        // Age: ended more than 750 s before 1000.
        let age = Retention {
            keep_for: Some(Duration::from_secs(750)),
            ..none
        };
        assert_eq!(expired(&jobs, 1000, 10, 0, &age), ["a", "b"]);
        // Size: 40 bytes held, 25 allowed.
        let size = Retention {
            max_bytes: Some(25),
            ..none
        };
        assert_eq!(expired(&jobs, 1000, 10, 0, &size), ["a", "b"]);
        let size = Retention {
            max_bytes: Some(5),
            ..none
        };
        assert_eq!(expired(&jobs, 1000, 10, 0, &size), ["a", "b", "c"]);
    }

    #[test]
    fn ages_take_seconds_or_a_unit() {
        let secs = |s: &str| parse_age(s).unwrap().map(|d| d.as_secs());
        assert_eq!(secs("3600"), Some(3600));
        assert_eq!(secs("90s"), Some(90));
        assert_eq!(secs("30m"), Some(1800));
        assert_eq!(secs("12h"), Some(43_200));
        assert_eq!(secs("7d"), Some(604_800));
        assert_eq!(secs("2w"), Some(1_209_600));
        assert_eq!(secs("0"), None);
        assert_eq!(secs("0d"), None);
        for bad in ["", "d", "7x", "-1", "1.5h", "7 days", "99999999999999d"] {
            assert!(parse_age(bad).is_err(), "{bad}");
        }
    }
}
