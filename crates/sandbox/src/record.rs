//! The record the Python harness writes (harness/forgeline_report.py), and how a run's exit
//! and its record become one [`Outcome`].

use std::time::Duration;

use serde::Deserialize;

use crate::limits::Limits;
use crate::outcome::{
    AssertionFailure, Clock, Comparison, DoctestFailure, Frame, Outcome, RaisedException,
    SyntaxErrorInfo, TestSummary,
};
use crate::{Error, Result};

/// The harness's JSON record, field for field.
#[derive(Debug, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub(crate) enum Record {
    Passed {},
    SyntaxError {
        file: String,
        line: Option<u32>,
        column: Option<u32>,
        message: String,
        text: Option<String>,
    },
    AssertionFailed {
        test: Option<String>,
        file: Option<String>,
        line: Option<u32>,
        #[serde(default)]
        expression: Option<String>,
        #[serde(default)]
        left: Option<String>,
        #[serde(default)]
        op: Option<String>,
        #[serde(default)]
        right: Option<String>,
        message: Option<String>,
        #[serde(default)]
        frames: Vec<Frame>,
        #[serde(default)]
        frames_omitted: u32,
    },
    Exception {
        test: Option<String>,
        #[serde(rename = "type")]
        exception_type: String,
        message: String,
        file: Option<String>,
        line: Option<u32>,
        #[serde(default)]
        frames: Vec<Frame>,
        #[serde(default)]
        frames_omitted: u32,
    },
    MemoryError {},
    Exit {
        code: Option<i64>,
        message: Option<String>,
    },
    DoctestFailed {
        name: String,
        file: String,
        line: Option<u32>,
        source: String,
        expected: String,
        got: String,
    },
    RunnerUnavailable {
        runner: String,
        message: String,
    },
    NoTests {
        message: String,
    },
    InternalError {
        message: String,
    },
}

/// A record with the test counts that may come with it.
#[derive(Debug)]
pub(crate) struct RecordFile {
    pub record: Record,
    pub tests: Option<TestSummary>,
}

impl RecordFile {
    pub(crate) fn parse(bytes: &[u8]) -> Result<RecordFile> {
        let mut value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::Harness(format!("unreadable result record: {e}")))?;
        let tests = value
            .as_object_mut()
            .and_then(|map| map.remove("tests"))
            .filter(|t| !t.is_null())
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| Error::Harness(format!("bad test counts in the record: {e}")))?;
        let record = serde_json::from_value(value)
            .map_err(|e| Error::Harness(format!("unexpected result record: {e}")))?;
        Ok(RecordFile { record, tests })
    }
}

/// How the sandboxed process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Termination {
    Exited(i32),
    Signaled(i32),
    /// Killed by the sandbox at the wall-clock limit.
    TimedOut,
}

/// Decides the outcome of a run from how the process ended and the harness's record.
///
/// The order matters: a timeout or a signal overrides any record (the process did not end
/// cleanly, whatever it wrote before), and without a record the exit code speaks. `program`
/// is true for [`Check::Run`](crate::Check::Run), where exiting with 0 is success.
pub(crate) fn decide(
    termination: Termination,
    record: Option<Record>,
    program: bool,
    limits: &Limits,
    stderr: &str,
) -> Result<Outcome> {
    let memory = Outcome::MemoryLimit {
        limit_bytes: limits.memory_bytes,
    };
    match termination {
        Termination::TimedOut => Ok(Outcome::Timeout {
            clock: Clock::Wall,
            limit: limits.wall_time,
        }),
        Termination::Signaled(signal) => {
            let name = signal_name(signal);
            if name == "SIGXCPU" {
                return Ok(Outcome::Timeout {
                    clock: Clock::Cpu,
                    limit: Duration::from_secs(limits.cpu_seconds()),
                });
            }
            Ok(Outcome::KilledBySignal { signal, name })
        }
        Termination::Exited(code) => {
            let Some(record) = record else {
                if code == 0 && program {
                    return Ok(Outcome::Passed);
                }
                if code != 0 && stderr.contains("MemoryError") {
                    return Ok(memory);
                }
                let message = (code == 0 || !program)
                    .then(|| "the process ended before the checks finished (os._exit?)".into());
                return Ok(Outcome::Exited { code, message });
            };
            if program && code != 0 && matches!(record, Record::Passed {}) {
                return Ok(Outcome::Exited {
                    code,
                    message: None,
                });
            }
            from_record(record, program, limits)
        }
    }
}

fn from_record(record: Record, program: bool, limits: &Limits) -> Result<Outcome> {
    Ok(match record {
        Record::Passed {} => Outcome::Passed,
        Record::SyntaxError {
            file,
            line,
            column,
            message,
            text,
        } => Outcome::SyntaxError(SyntaxErrorInfo {
            file,
            line,
            column,
            message,
            text,
        }),
        Record::AssertionFailed {
            test,
            file,
            line,
            expression,
            left,
            op,
            right,
            message,
            frames,
            frames_omitted,
        } => {
            let comparison = match (left, op, right) {
                (Some(left), Some(op), Some(right)) => Some(Comparison { left, op, right }),
                _ => None,
            };
            Outcome::AssertionFailed(AssertionFailure {
                test,
                file,
                line,
                expression,
                comparison,
                message,
                traceback: frames,
                frames_omitted,
            })
        }
        Record::Exception { exception_type, .. } if exception_type == "MemoryError" => {
            Outcome::MemoryLimit {
                limit_bytes: limits.memory_bytes,
            }
        }
        Record::Exception {
            test,
            exception_type,
            message,
            file,
            line,
            frames,
            frames_omitted,
        } => Outcome::Exception(RaisedException {
            test,
            exception_type,
            message,
            file,
            line,
            traceback: frames,
            frames_omitted,
        }),
        Record::MemoryError {} => Outcome::MemoryLimit {
            limit_bytes: limits.memory_bytes,
        },
        Record::Exit { code, message } => {
            // What the process would have returned: sys.exit("text") exits with 1, and exit
            // statuses are 8 bits (sys.exit(256) exits with 0, sys.exit(-1) with 255).
            let code = match (&message, code) {
                (Some(_), _) => 1,
                (None, Some(code)) => i32::try_from(code.rem_euclid(256)).unwrap_or(1),
                (None, None) => 0,
            };
            if program && code == 0 {
                Outcome::Passed
            } else {
                let message = message.or_else(|| {
                    (!program).then(|| "sys.exit() was called before the checks finished".into())
                });
                Outcome::Exited { code, message }
            }
        }
        Record::DoctestFailed {
            name,
            file,
            line,
            source,
            expected,
            got,
        } => Outcome::DoctestFailed(DoctestFailure {
            name,
            file,
            line,
            source,
            expected,
            got,
        }),
        Record::RunnerUnavailable { runner, message } => {
            Outcome::RunnerUnavailable { runner, message }
        }
        Record::NoTests { message } => Outcome::NoTests { message },
        Record::InternalError { message } => return Err(Error::Harness(message)),
    })
}

/// `SIGSEGV` for 11, and so on; `signal N` for numbers without a name.
pub(crate) fn signal_name(signal: i32) -> String {
    nix::sys::signal::Signal::try_from(signal)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {signal}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> RecordFile {
        RecordFile::parse(json.as_bytes()).unwrap()
    }

    fn decide_json(json: &str, program: bool) -> Outcome {
        let file = parse(json);
        decide(
            Termination::Exited(0),
            Some(file.record),
            program,
            &Limits::default(),
            "",
        )
        .unwrap()
    }

    #[test]
    fn parses_an_assertion_with_values_and_counts() {
        let json = r#"{"test":null,"file":"test_solution.py","line":3,"frames":[{"file":"test_solution.py","line":3,"function":"<module>","code":"assert add(2, 2) == 5"}],"frames_omitted":0,"status":"assertion_failed","message":null,"expression":"add(2, 2) == 5","left":"4","op":"==","right":"5","tests":{"runner":"script","total":1,"passed":0,"failed":1,"skipped":0}}"#;
        let file = parse(json);
        assert_eq!(file.tests.as_ref().unwrap().runner, "script");
        let outcome = decide(
            Termination::Exited(0),
            Some(file.record),
            false,
            &Limits::default(),
            "",
        )
        .unwrap();
        let Outcome::AssertionFailed(a) = outcome else {
            panic!("{outcome:?}")
        };
        assert_eq!(a.expression.as_deref(), Some("add(2, 2) == 5"));
        let c = a.comparison.unwrap();
        assert_eq!((c.left.as_str(), c.right.as_str()), ("4", "5"));
        assert_eq!(a.traceback.len(), 1);
    }

    #[test]
    fn timeout_and_signals_override_the_record() {
        let limits = Limits::default();
        let record = || Some(parse(r#"{"status":"passed"}"#).record);
        let timeout = decide(Termination::TimedOut, record(), true, &limits, "").unwrap();
        assert!(matches!(
            timeout,
            Outcome::Timeout {
                clock: Clock::Wall,
                ..
            }
        ));
        let cpu = decide(Termination::Signaled(24), record(), true, &limits, "").unwrap();
        assert!(matches!(
            cpu,
            Outcome::Timeout {
                clock: Clock::Cpu,
                ..
            }
        ));
        let segv = decide(Termination::Signaled(11), record(), true, &limits, "").unwrap();
        assert_eq!(
            segv,
            Outcome::KilledBySignal {
                signal: 11,
                name: "SIGSEGV".into()
            }
        );
    }

    #[test]
    fn exit_codes_depend_on_the_check() {
        let limits = Limits::default();
        // A program that ends with os._exit(0) succeeded; tests that did were cut short.
        let program = decide(Termination::Exited(0), None, true, &limits, "").unwrap();
        assert_eq!(program, Outcome::Passed);
        let tests = decide(Termination::Exited(0), None, false, &limits, "").unwrap();
        assert!(matches!(tests, Outcome::Exited { code: 0, .. }));
        let failed = decide(Termination::Exited(3), None, true, &limits, "").unwrap();
        assert_eq!(
            failed,
            Outcome::Exited {
                code: 3,
                message: None
            }
        );
        // sys.exit(0) in a program is success, and so is sys.exit(256): its status is 0.
        assert_eq!(
            decide_json(r#"{"status":"exit","code":0,"message":null}"#, true),
            Outcome::Passed
        );
        assert_eq!(
            decide_json(r#"{"status":"exit","code":256,"message":null}"#, true),
            Outcome::Passed
        );
        assert!(matches!(
            decide_json(r#"{"status":"exit","code":0,"message":null}"#, false),
            Outcome::Exited {
                code: 0,
                message: Some(_)
            }
        ));
        assert!(matches!(
            decide_json(r#"{"status":"exit","code":-1,"message":null}"#, true),
            Outcome::Exited { code: 255, .. }
        ));
        assert!(matches!(
            decide_json(r#"{"status":"exit","code":1,"message":"bye"}"#, true),
            Outcome::Exited { code: 1, message: Some(m) } if m == "bye"
        ));
    }

    #[test]
    fn memory_errors_become_the_memory_limit() {
        let outcome = decide_json(r#"{"status":"memory_error","test":null}"#, true);
        assert_eq!(
            outcome,
            Outcome::MemoryLimit {
                limit_bytes: Limits::default().memory_bytes
            }
        );
        let crashed = decide(
            Termination::Exited(1),
            None,
            true,
            &Limits::default(),
            "MemoryError\n",
        )
        .unwrap();
        assert!(matches!(crashed, Outcome::MemoryLimit { .. }));
    }

    #[test]
    fn internal_errors_are_errors() {
        let file = parse(r#"{"status":"internal_error","message":"boom"}"#);
        let err = decide(
            Termination::Exited(0),
            Some(file.record),
            true,
            &Limits::default(),
            "",
        )
        .unwrap_err();
        assert!(err.to_string().contains("boom"));
    }

    #[test]
    fn garbage_is_a_harness_error() {
        assert!(RecordFile::parse(b"{\"status\":").is_err());
        assert!(RecordFile::parse(b"{\"status\":\"nonsense\"}").is_err());
    }
}
