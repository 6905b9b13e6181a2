//! Runs untrusted, generated Python safely, and says exactly what happened.
//!
//! This crate is the only place in forgeline that starts Python. A [`Sandbox`] is set up once
//! (it finds the interpreter, installs a small harness, and probes which isolation the machine
//! allows); then each [`Job`] runs a [`Check`] on a [`Module`] in a fresh directory with
//! [`Limits`], and returns a [`RunReport`] whose [`Outcome`] is typed: passed, failed
//! assertion (with the values compared), raised exception (type, message, line, trimmed
//! traceback), syntax error, failed doctest, timeout, memory limit, killed by signal, exited.
//!
//! A program runs as a user runs it, `python solution.py ARGS < STDIN` beside its input files,
//! with [`Job::with_args`], [`Job::with_stdin`] and [`Job::with_input_file`]; the report keeps
//! what it printed byte for byte ([`RunReport::raw_stdout`]) besides the text to read.
//!
//! ```no_run
//! # async fn demo() -> forgeline_sandbox::Result<()> {
//! use forgeline_sandbox::{Module, Sandbox, SandboxConfig, TestSuite};
//!
//! let sandbox = Sandbox::new(SandboxConfig::default()).await?;
//! let code = Module::new("solution", "def add(a, b):\n    return a - b\n")?;
//! let tests = TestSuite::new("test_solution.py", "from solution import add\nassert add(2, 2) == 4\n")?;
//! let report = sandbox.run_tests(&code, &tests).await?;
//! println!("{}", report.outcome); // AssertionError at test_solution.py:2: add(2, 2) == 4 ...
//! # Ok(()) }
//! ```
//!
//! # Isolation
//!
//! Isolation is built at the OS level, never by restricting Python from inside. Each layer is
//! applied by the run's process to itself before it execs Python (in a fork of the caller, or
//! in the [`launcher`] the caller's `main` registered), and [`IsolationReport`] (in every report)
//! says which were in force:
//!
//! - **An unprivileged user with no capabilities**: run by root, the program switches to
//!   `nobody` (65534) with every capability set emptied (bounding, ambient, inheritable,
//!   permitted, effective), so file permissions apply to it as to any user: root-only files
//!   (`/etc/ssl/private`) stay unreadable even where Landlock allows the directory. A Python
//!   `nobody` cannot reach (pyenv under `/root`) is bound into a private mount namespace
//!   under a read-only tmpfs covering the blocking directory, which hides the rest of it. It
//!   owns nothing outside its run directory. Run by anyone else, it stays that user inside a
//!   user namespace, and drops the capabilities that namespace gave it.
//! - **Namespaces**: a network namespace with only a downed loopback (every connect fails,
//!   the host's 127.0.0.1 included), a PID namespace whose init takes every process of the
//!   run down with it, and an IPC namespace.
//! - **Landlock** (file system): read-only access to the system and Python directories (of
//!   `/etc` only what the loader and the standard library read) and a few devices, full access to the run's directory, nothing else: no home directories, no
//!   `/tmp`, no `/proc`. TCP bind and connect are denied too, and (Landlock ABI 6) signals and
//!   abstract sockets cannot leave the sandbox.
//! - **seccomp**: a deny list of system calls no checked program needs (mount, namespaces,
//!   ptrace, BPF, kernel modules, io_uring, keyrings...), and `socket(AF_UNIX, ...)`: Unix
//!   sockets by path would reach host services past Landlock (`socketpair` stays).
//! - **Process limit**: a pids cgroup per run when running as root (`RLIMIT_NPROC` does not
//!   apply to root), `RLIMIT_NPROC` in the run's own user namespace otherwise.
//! - **Memory limit for the whole run** ([`MemoryLimit::Cgroup`]): a memory cgroup per run when
//!   running as root (cgroup v2 `memory.max` with no swap, or v1 `memory.limit_in_bytes`),
//!   of [`Limits::run_memory_bytes`] (2 GiB by default) for all processes and the files they
//!   write together; a run the cgroup's OOM killer hit reports [`Outcome::MemoryLimit`].
//! - **Disk quota** ([`DiskLimit::Tmpfs`]): when running as root, the run directory is a
//!   tmpfs of [`Limits::disk_bytes`] (64 MiB) and [`Limits::disk_inodes`] (4096 files and
//!   directories); writing past it fails with `ENOSPC`. The harness reserves room for its
//!   record (a `.forgeline-result.json.tmp` in the run directory) before the checked code
//!   runs.
//! - Always: rlimits (CPU, address space per process, file size, open files, no core
//!   dumps), a new
//!   session killed as a group at the wall-clock timeout, an emptied environment, a fresh
//!   directory (also `HOME` and `TMPDIR`), Python in isolated mode (`-I -S -B`; the harness
//!   puts site-packages on `sys.path` itself, so installed packages import as usual while
//!   `.pth` files, slow to start on some machines, are skipped unless
//!   [`SandboxConfig::process_pth_files`]).
//!
//! [`IsolationLevel::Full`] means all of these; [`IsolationLevel::Partial`] some (the report
//! lists what is `missing`); [`IsolationLevel::None`] only the "always" row.
//! [`SandboxConfig::require_full_isolation`] refuses to run anything with less than full.
//!
//! After the run, its directory is read back as hostile: the record and kept files are opened
//! without following links or blocking, only if regular, up to a size cap (a FIFO or a link
//! to `/dev/zero` is no record), and the directory is removed without recursion (any depth,
//! locked modes, files handed to the sandbox user), after unmounting its tmpfs.
//!
//! Not isolated: when not run by root, memory summed over processes and disk usage summed
//! over files (only each process and each file is capped; the report lists both as
//! missing), and the mode and timestamps of the caller's own files that the program may
//! read (a Python installed in the caller's home); and the outcome itself against
//! deliberately forged results (the harness runs in the same interpreter as the code it
//! checks).
//!
//! # Layout
//!
//! - `sandbox`: [`Sandbox`] and [`SandboxConfig`]; set-up, the isolation probe, running a job.
//! - `checks`: [`Module`], [`TestSuite`], [`Check`], [`Job`] (with a program's arguments,
//!   stdin and [`InputFile`]s), and one method per check.
//! - `limits`: [`Limits`] and their defaults.
//! - `outcome`: [`Outcome`], [`RunReport`] and their parts, and their short text forms.
//! - `record`: the harness's JSON record, and how an exit and a record become an outcome.
//! - `isolation`: [`IsolationReport`], the Landlock rules and the seccomp filter.
//! - `child`: what the run's process does to itself before exec (async-signal-safe).
//! - `launcher`: starting runs from a fresh process rather than a fork of the caller.
//! - `cgroup`: a pids and memory cgroup per run.
//! - `rundir`: run directories: the tmpfs quota, capped reads, removal without recursion.
//! - `unveil`: the mount namespace that shows `nobody` a Python it could not reach.
//! - `runner`: spawning, output capture, timeout, killing the process tree.
//! - `python`: finding the interpreter and checking its version.
//! - `harness`: installs `harness/*.py`, the Python side that runs the checks and writes
//!   the record.
//! - `error`: [`Error`], and [`InputError`] for a program's refused arguments, stdin or files.

mod cgroup;
mod checks;
mod child;
mod error;
mod harness;
mod isolation;
pub mod launcher;
mod limits;
mod outcome;
mod python;
mod record;
mod rundir;
mod runner;
mod sandbox;
mod unveil;

pub use checks::{Check, InputFile, Job, Module, TestKind, TestSuite};
pub use error::{Error, FileNameProblem, InputError, Result};
pub use isolation::{
    DiskLimit, IsolationLevel, IsolationReport, LandlockState, MemoryLimit, ProcessLimit,
};
pub use limits::Limits;
pub use outcome::{
    AssertionFailure, CapturedOutput, Clock, Comparison, DoctestFailure, Frame, KeptFile, Outcome,
    RaisedException, RunReport, SyntaxErrorInfo, TestSummary,
};
pub use python::{PythonInfo, MIN_PYTHON};
pub use sandbox::{Sandbox, SandboxConfig};
