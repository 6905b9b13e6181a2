//! Resource limits of one sandboxed run, with defaults sized for checking generated code.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The longest wall-clock limit a run may have.
const MAX_WALL_TIME: Duration = Duration::from_secs(24 * 3600);

/// What one run may use. Every limit applies to the program and all its children.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Wall-clock time, after which the whole process tree is killed.
    #[serde(with = "secs")]
    pub wall_time: Duration,
    /// CPU time of each process (`RLIMIT_CPU`), rounded up to whole seconds.
    #[serde(with = "secs")]
    pub cpu_time: Duration,
    /// Address space of each process (`RLIMIT_AS`), in bytes.
    pub memory_bytes: u64,
    /// Largest file a process may write (`RLIMIT_FSIZE`), in bytes.
    pub file_size_bytes: u64,
    /// Processes (and threads) the program may have at once, itself included.
    pub max_processes: u32,
    /// Open file descriptors per process (`RLIMIT_NOFILE`).
    pub max_open_files: u32,
    /// Bytes of stdout, and separately of stderr, kept; the rest is counted and dropped.
    pub output_bytes: usize,
    /// Memory of the whole run, all its processes and the files it writes together (a memory
    /// cgroup, where the sandbox runs as root; otherwise only `memory_bytes` per process).
    #[serde(default = "defaults::run_memory_bytes")]
    pub run_memory_bytes: u64,
    /// Bytes the run directory may hold, all files together (a tmpfs of this size, where the
    /// sandbox runs as root; otherwise only `file_size_bytes` per file).
    #[serde(default = "defaults::disk_bytes")]
    pub disk_bytes: u64,
    /// Files and directories the run directory may hold (the tmpfs's inode limit).
    #[serde(default = "defaults::disk_inodes")]
    pub disk_inodes: u64,
}

/// Defaults of the limits added later, also for limits serialized without them.
mod defaults {
    pub fn run_memory_bytes() -> u64 {
        2 << 30
    }
    pub fn disk_bytes() -> u64 {
        64 << 20
    }
    pub fn disk_inodes() -> u64 {
        4096
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            wall_time: Duration::from_secs(10),
            cpu_time: Duration::from_secs(10),
            memory_bytes: 1 << 30,
            file_size_bytes: 16 << 20,
            max_processes: 32,
            max_open_files: 256,
            output_bytes: 64 << 10,
            run_memory_bytes: defaults::run_memory_bytes(),
            disk_bytes: defaults::disk_bytes(),
            disk_inodes: defaults::disk_inodes(),
        }
    }
}

impl Limits {
    /// The same limits with another wall-clock timeout; the CPU limit follows it when it was
    /// not raised above the default.
    pub fn with_timeout(mut self, wall_time: Duration) -> Self {
        if self.cpu_time == Limits::default().cpu_time {
            self.cpu_time = wall_time;
        }
        self.wall_time = wall_time;
        self
    }

    /// A wall-clock timeout from seconds as a user gives them (a flag, a config file): an
    /// error naming the problem, instead of `Duration::from_secs_f64`'s panic, for a number
    /// that is not finite, not positive, or more than 24 hours.
    pub fn timeout_from_secs(secs: f64) -> Result<Duration> {
        if !secs.is_finite() || secs <= 0.0 {
            return Err(Error::InvalidLimits(format!(
                "the timeout must be a positive number of seconds, not {secs}"
            )));
        }
        if secs > MAX_WALL_TIME.as_secs_f64() {
            return Err(Error::InvalidLimits(format!(
                "the timeout must be at most 24 hours ({} s), not {secs}",
                MAX_WALL_TIME.as_secs()
            )));
        }
        Duration::try_from_secs_f64(secs)
            .map_err(|e| Error::InvalidLimits(format!("timeout {secs}: {e}")))
    }

    /// Checks that each limit leaves Python room to start.
    pub fn validate(&self) -> Result<()> {
        let fail = |msg: &str| Err(Error::InvalidLimits(msg.to_string()));
        if self.wall_time.is_zero() {
            return fail("wall_time must be more than 0");
        }
        if self.wall_time > MAX_WALL_TIME {
            return fail("wall_time must be at most 24 hours");
        }
        if self.cpu_time.is_zero() {
            return fail("cpu_time must be more than 0");
        }
        if self.memory_bytes < 64 << 20 {
            return fail("memory_bytes must be at least 64 MiB for Python to start");
        }
        if self.file_size_bytes < 64 << 10 {
            return fail("file_size_bytes must be at least 64 KiB");
        }
        if self.max_processes == 0 {
            return fail("max_processes must be at least 1");
        }
        if self.max_open_files < 16 {
            return fail("max_open_files must be at least 16 for Python to start");
        }
        if self.output_bytes == 0 {
            return fail("output_bytes must be more than 0");
        }
        if self.run_memory_bytes < 64 << 20 {
            return fail("run_memory_bytes must be at least 64 MiB for Python to start");
        }
        if self.disk_bytes < 1 << 20 {
            return fail("disk_bytes must be at least 1 MiB");
        }
        if self.disk_inodes < 64 {
            return fail("disk_inodes must be at least 64");
        }
        Ok(())
    }

    /// The run directory's tmpfs size and inodes.
    pub(crate) fn disk_quota(&self) -> crate::rundir::DiskQuota {
        crate::rundir::DiskQuota {
            bytes: self.disk_bytes,
            inodes: self.disk_inodes,
        }
    }

    /// CPU seconds for `RLIMIT_CPU`: whole seconds, rounded up.
    pub(crate) fn cpu_seconds(&self) -> u64 {
        let secs = self.cpu_time.as_secs();
        if self.cpu_time.subsec_nanos() > 0 {
            secs + 1
        } else {
            secs
        }
    }
}

/// Durations as fractional seconds in JSON.
pub(crate) mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Limits::default().validate().unwrap();
    }

    #[test]
    fn rejects_limits_python_cannot_start_under() {
        let tiny_memory = Limits {
            memory_bytes: 1 << 20,
            ..Limits::default()
        };
        let err = tiny_memory.validate().unwrap_err().to_string();
        assert!(err.contains("memory_bytes"), "{err}");
        let no_time = Limits {
            wall_time: Duration::ZERO,
            ..Limits::default()
        };
        assert!(no_time.validate().is_err());
    }

    #[test]
    fn timeouts_from_any_number_are_checked_not_panicking() {
        assert_eq!(
            Limits::timeout_from_secs(2.5).unwrap(),
            Duration::from_millis(2500)
        );
        for bad in [1e20, f64::NAN, f64::INFINITY, -1.0, 0.0, 86_401.0] {
            let err = Limits::timeout_from_secs(bad).unwrap_err().to_string();
            assert!(err.contains("timeout"), "{bad}: {err}");
        }
    }

    #[test]
    fn limits_without_the_newer_fields_get_their_defaults() {
        let mut json = serde_json::to_value(Limits::default()).unwrap();
        for field in ["run_memory_bytes", "disk_bytes", "disk_inodes"] {
            json.as_object_mut().unwrap().remove(field);
        }
        let back: Limits = serde_json::from_value(json).unwrap();
        assert_eq!(back, Limits::default());
    }

    #[test]
    fn cpu_seconds_round_up() {
        let limits = Limits {
            cpu_time: Duration::from_millis(1500),
            ..Limits::default()
        };
        assert_eq!(limits.cpu_seconds(), 2);
        assert_eq!(Limits::default().cpu_seconds(), 10);
    }

    #[test]
    fn timeout_moves_the_default_cpu_limit_along() {
        let limits = Limits::default().with_timeout(Duration::from_secs(3));
        assert_eq!(limits.wall_time, Duration::from_secs(3));
        assert_eq!(limits.cpu_time, Duration::from_secs(3));
        let raised = Limits {
            cpu_time: Duration::from_secs(60),
            ..Limits::default()
        }
        .with_timeout(Duration::from_secs(3));
        assert_eq!(raised.cpu_time, Duration::from_secs(60));
    }

    #[test]
    fn serializes_durations_as_seconds() {
        let json = serde_json::to_value(Limits::default()).unwrap();
        assert_eq!(json["wall_time"], 10.0);
        let back: Limits = serde_json::from_value(json).unwrap();
        assert_eq!(back, Limits::default());
    }
}
