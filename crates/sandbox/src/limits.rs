//! Resource limits of one sandboxed run, with defaults sized for checking generated code.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

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

    /// Checks that each limit leaves Python room to start.
    pub fn validate(&self) -> Result<()> {
        let fail = |msg: &str| Err(Error::InvalidLimits(msg.to_string()));
        if self.wall_time.is_zero() {
            return fail("wall_time must be more than 0");
        }
        if self.wall_time > Duration::from_secs(24 * 3600) {
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
        Ok(())
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
