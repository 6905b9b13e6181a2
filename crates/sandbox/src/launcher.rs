//! Starting runs from a fresh process instead of a fork of the caller.
//!
//! Without a launcher, each run forks the calling process and applies its setup between fork
//! and exec. When the caller is large (forgeline with a model loaded and its scheduler busy),
//! that fork copies the page tables of every page it has touched, and until the child has
//! exec'd, each page the caller writes takes a copy-on-write fault. A program that calls
//! [`run_if_requested`] first in its `main` becomes its own launcher: runs then start it
//! again, without a fork of the caller's memory (`posix_spawn`), as
//!
//! ```text
//! PROGRAM __forgeline-sandbox-launch SPEC PYTHON ARGS...
//! ```
//!
//! where SPEC is the run's setup as JSON (limits, cgroup, namespaces, user, Landlock rules,
//! whether to filter system calls). The launcher applies it to itself, exactly as a forked
//! child does (`child.rs`), and execs Python; with a PID namespace it becomes the waiter
//! above init. The process tree, its session and its exit status are those of the fork path.
//!
//! When the launcher cannot apply the setup or exec Python, it says why on standard error
//! after [`FAILED_PREFIX`] and exits with [`FAILED`]; the runner turns that into
//! [`Error::Spawn`](crate::Error::Spawn), as a failed fork path spawn is.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::child::SetupSpec;
use crate::isolation::seccomp_programs;

/// The first argument that makes a program the launcher.
pub(crate) const ARG: &str = "__forgeline-sandbox-launch";

/// The launcher's exit code when it could not start Python.
pub(crate) const FAILED: i32 = 125;

/// How the launcher's own error message starts on standard error.
pub(crate) const FAILED_PREFIX: &str = "forgeline sandbox launcher: ";

static REGISTERED: AtomicBool = AtomicBool::new(false);

/// Makes this program the sandbox's launcher. Call it first in `main`, before any thread,
/// runtime or logger starts: when the program was started as a launcher this applies the
/// run's setup and execs Python (never returning); otherwise it returns at once, and
/// [`SandboxConfig::default`](crate::SandboxConfig) then starts runs through this program.
pub fn run_if_requested() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(ARG.as_ref()) {
        REGISTERED.store(true, Ordering::Relaxed);
        return;
    }
    let message = match launch(args) {
        Ok(never) => match never {},
        Err(message) => message,
    };
    let _ = writeln!(std::io::stderr(), "{FAILED_PREFIX}{message}");
    std::process::exit(FAILED);
}

/// This program, when it called [`run_if_requested`].
pub(crate) fn registered() -> Option<PathBuf> {
    // /proc/self/exe is this program even after its file was replaced or deleted.
    let program = PathBuf::from("/proc/self/exe");
    (REGISTERED.load(Ordering::Relaxed) && program.exists()).then_some(program)
}

/// The arguments that make `PROGRAM` launch `python ARGS...` under `spec`. Fails on a path
/// that is not UTF-8 (JSON cannot carry it).
pub(crate) fn arguments(
    spec: &SetupSpec,
    python: &std::path::Path,
) -> serde_json::Result<Vec<OsString>> {
    let spec = serde_json::to_string(spec)?;
    Ok(vec![ARG.into(), spec.into(), python.into()])
}

/// The launcher's own error, when a run's exit and standard error are one.
pub(crate) fn failure(code: i32, stderr: &str) -> Option<&str> {
    if code != FAILED {
        return None;
    }
    stderr
        .strip_prefix(FAILED_PREFIX)
        .map(|rest| rest.lines().next().unwrap_or_default())
}

fn launch(mut args: impl Iterator<Item = OsString>) -> Result<std::convert::Infallible, String> {
    // Started as /proc/self/exe, it would show as "exe" in ps and top while it waits on the
    // run (as the PID namespace's waiter and init).
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { nix::libc::prctl(nix::libc::PR_SET_NAME, c"forgeline-run".as_ptr(), 0, 0, 0) };
    let spec = args.next().ok_or("no setup given")?;
    let spec = spec.to_str().ok_or("the setup is not UTF-8")?;
    let spec: SetupSpec =
        serde_json::from_str(spec).map_err(|e| format!("unreadable setup: {e}"))?;
    let python = args.next().ok_or("no program given")?;
    let seccomp = if spec.seccomp {
        Some(Arc::new(seccomp_programs()?))
    } else {
        None
    };
    let mut setup = spec
        .child_setup(seccomp)
        .map_err(|e| format!("prepare the setup: {e}"))?;
    // SAFETY: this process has one thread and exec follows; `apply` was written for the
    // stricter case of a forked child of a multi-threaded process.
    unsafe { setup.apply() }.map_err(|e| format!("set up the sandbox: {e}"))?;
    let err = std::process::Command::new(&python).args(args).exec();
    Err(format!("start {}: {err}", PathBuf::from(python).display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::child::Rlimit;

    #[test]
    fn a_setup_crosses_exec_unchanged() {
        let spec = SetupSpec {
            rlimits: vec![(Rlimit::Cpu, 11), (Rlimit::Processes, 66)],
            cgroup_procs: vec!["/sys/fs/cgroup/forgeline-sandbox/run-1-2/cgroup.procs".into()],
            namespaces: libc_flags(),
            run_as: Some(65534),
            unveil: Some(crate::unveil::UnveilSpec {
                covers: vec!["/root".into()],
                dirs: vec!["/root/py".into()],
                binds: vec!["/root/py".into()],
            }),
            fs_rules: None,
            workdir: "/tmp/forgeline-run-1".into(),
            seccomp: true,
        };
        let args = arguments(&spec, "/usr/bin/python3".as_ref()).unwrap();
        assert_eq!(args[0], ARG);
        assert_eq!(args[2], "/usr/bin/python3");
        let back: SetupSpec = serde_json::from_str(args[1].to_str().unwrap()).unwrap();
        assert_eq!(back, spec);
    }

    fn libc_flags() -> i32 {
        (nix::sched::CloneFlags::CLONE_NEWNET | nix::sched::CloneFlags::CLONE_NEWPID).bits()
    }

    #[test]
    fn only_its_own_message_with_its_code_is_a_launcher_failure() {
        let said = format!("{FAILED_PREFIX}set up the sandbox: EPERM\nmore\n");
        assert_eq!(failure(FAILED, &said), Some("set up the sandbox: EPERM"));
        assert_eq!(failure(1, &said), None);
        assert_eq!(
            failure(FAILED, "Traceback (most recent call last):\n"),
            None
        );
    }
}
