//! What the sandboxed process does to itself before it execs Python: between `fork` and `exec`
//! in a child of the caller, or in the launcher (`launcher.rs`), which gets the same setup as
//! a [`SetupSpec`] and applies it the same way.
//!
//! In the forked case it runs in the child of a multi-threaded parent, so it only makes
//! async-signal-safe calls: no allocation, no locks. All it needs (paths as `CString`s, the
//! Landlock ruleset, the seccomp programs, the limits) was prepared before the fork.
//!
//! With a PID namespace the tree is:
//!
//! ```text
//! parent (forgeline)
//! └── waiter: session leader, outside the namespace; mirrors the program's exit status
//!     └── init: PID 1 of the namespace; reaps orphans, reports the program's status
//!         └── program: python3 (exec'd after limits, Landlock and seccomp are applied)
//! ```
//!
//! When init exits, the kernel kills every process left in the namespace, so a child that
//! ignores SIGTERM, changes its session or double-forks still dies with the program. The
//! program cannot be PID 1 itself: PID 1 ignores signals it has no handler for, which would
//! change how Python code that signals itself behaves.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;

use landlock::{RestrictionStatus, RulesetCreated, RulesetError};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::libc;
use nix::sched::CloneFlags;
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{signal, SigHandler, Signal};
use nix::unistd::{fork, setsid, ForkResult};
use seccompiler::BpfProgram;
use serde::{Deserialize, Serialize};

use crate::isolation::FsRules;
use crate::unveil::{Unveil, UnveilSpec};

/// The waiter's exit code when the program's status was lost (init died unexpectedly).
const STATUS_LOST: i32 = 255;

/// A resource limit a run sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Rlimit {
    Cpu,
    AddressSpace,
    FileSize,
    OpenFiles,
    Core,
    Processes,
}

impl Rlimit {
    fn resource(self) -> Resource {
        match self {
            Rlimit::Cpu => Resource::RLIMIT_CPU,
            Rlimit::AddressSpace => Resource::RLIMIT_AS,
            Rlimit::FileSize => Resource::RLIMIT_FSIZE,
            Rlimit::OpenFiles => Resource::RLIMIT_NOFILE,
            Rlimit::Core => Resource::RLIMIT_CORE,
            Rlimit::Processes => Resource::RLIMIT_NPROC,
        }
    }
}

/// A run's setup as data: what the parent decides, in a form that crosses exec (the
/// launcher's argument). [`SetupSpec::child_setup`] prepares it for applying.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SetupSpec {
    pub rlimits: Vec<(Rlimit, u64)>,
    /// `cgroup.procs` of the run's cgroups (one per hierarchy).
    #[serde(default)]
    pub cgroup_procs: Vec<PathBuf>,
    /// `CloneFlags` bits of the namespaces to enter.
    pub namespaces: i32,
    pub run_as: Option<u32>,
    /// Directories to cover and bind back in a private mount namespace (see `unveil.rs`).
    #[serde(default)]
    pub unveil: Option<UnveilSpec>,
    /// The run's Landlock rules (with `workdir` writable), when Landlock is used.
    pub fs_rules: Option<FsRules>,
    pub workdir: PathBuf,
    /// Whether the seccomp filter is applied.
    pub seccomp: bool,
}

impl SetupSpec {
    /// Everything prepared for [`ChildSetup::apply`]: the Landlock ruleset built, paths as C
    /// strings. `seccomp` is the compiled filter when `self.seccomp` is set.
    pub(crate) fn child_setup(
        &self,
        seccomp: Option<Arc<Vec<BpfProgram>>>,
    ) -> io::Result<ChildSetup> {
        let landlock = match &self.fs_rules {
            Some(rules) => Some(
                rules
                    .ruleset(&self.workdir)
                    .map_err(|e| io::Error::other(format!("build the Landlock ruleset: {e}")))?,
            ),
            None => None,
        };
        let cgroup_procs = self
            .cgroup_procs
            .iter()
            .map(|path| {
                CString::new(path.as_os_str().as_bytes())
                    .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
            })
            .collect::<io::Result<Vec<_>>>()?;
        let unveil = self.unveil.as_ref().map(UnveilSpec::prepare).transpose()?;
        let mut namespaces = CloneFlags::from_bits_truncate(self.namespaces);
        if unveil.is_some() {
            namespaces |= CloneFlags::CLONE_NEWNS;
        }
        Ok(ChildSetup {
            unveil,
            rlimits: self
                .rlimits
                .iter()
                .map(|&(limit, value)| (limit.resource(), value))
                .collect(),
            cgroup_procs,
            namespaces,
            run_as: self.run_as,
            landlock,
            seccomp: seccomp.filter(|_| self.seccomp),
        })
    }
}

/// Everything the child applies to itself, prepared by the parent.
pub(crate) struct ChildSetup {
    pub rlimits: Vec<(Resource, u64)>,
    /// `cgroup.procs` of the run's cgroups, to move the process tree into.
    pub cgroup_procs: Vec<CString>,
    pub namespaces: CloneFlags,
    /// The unprivileged user (and group) ID to switch to; only when running as root.
    pub run_as: Option<u32>,
    pub unveil: Option<Unveil>,
    pub landlock: Option<RulesetCreated>,
    pub seccomp: Option<Arc<Vec<BpfProgram>>>,
}

impl ChildSetup {
    /// Applies the setup. Returns only in the process that is to exec Python.
    ///
    /// # Safety
    /// Must only be called in a freshly forked child, before exec (`CommandExt::pre_exec`).
    pub(crate) unsafe fn apply(&mut self) -> io::Result<()> {
        // Handlers inherited from the parent (tokio's SIGCHLD, ctrl-c) must not run here.
        for sig in Signal::iterator() {
            if sig != Signal::SIGKILL && sig != Signal::SIGSTOP {
                let _ = signal(sig, SigHandler::SigDfl);
            }
        }
        // A new session and process group: the timeout kills the group.
        setsid()?;
        for procs in &self.cgroup_procs {
            join_cgroup(procs)?;
        }
        if !self.namespaces.is_empty() {
            nix::sched::unshare(self.namespaces)?;
        }
        if let Some(unveil) = &mut self.unveil {
            unveil.apply()?;
        }
        if self.namespaces.contains(CloneFlags::CLONE_NEWPID) {
            supervise()?;
        }
        drop_capabilities(self.run_as)?;
        for &(resource, limit) in &self.rlimits {
            let hard = if resource == Resource::RLIMIT_CPU {
                // SIGXCPU at the soft limit, SIGKILL a second later if it is caught.
                limit.saturating_add(1)
            } else {
                limit
            };
            setrlimit(resource, limit, hard)?;
        }
        if let Some(ruleset) = self.landlock.take() {
            restrict(ruleset)?;
        }
        if let Some(programs) = &self.seccomp {
            for program in programs.iter() {
                seccompiler::apply_filter(program).map_err(|e| match e {
                    seccompiler::Error::Prctl(e) | seccompiler::Error::Seccomp(e) => e,
                    _ => io::Error::from_raw_os_error(libc::EINVAL),
                })?;
            }
        }
        Ok(())
    }
}

/// Leaves the program no capability at all, in any set: the bounding set emptied first (so
/// that no exec can regain one, not even as root), then, when running as root, the switch to
/// user and group `run_as` (which clears the permitted and effective sets), then the ambient
/// and inheritable sets and whatever is left of the others. File permissions then apply to
/// the program as to any unprivileged user; see `unveil.rs` for a Python it could not read.
fn drop_capabilities(run_as: Option<u32>) -> io::Result<()> {
    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let check = |r: libc::c_long| {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: plain system calls with valid arguments; nix has no capset.
    unsafe {
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 {
                // EINVAL: past the last capability. EPERM: no CAP_SETPCAP, so no capability
                // to drop either (a caller that is neither root nor in its own namespace).
                break;
            }
        }
        if let Some(id) = run_as {
            check(libc::setgroups(0, std::ptr::null()).into())?;
            check(libc::setresgid(id, id, id).into())?;
            check(libc::setresuid(id, id, id).into())?;
        }
        // EINVAL on kernels without ambient capabilities, which then have none to clear.
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        let header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let none = [
            CapData {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            },
            CapData {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            },
        ];
        check(libc::syscall(libc::SYS_capset, &header, none.as_ptr()))?;
    }
    Ok(())
}

fn restrict(ruleset: RulesetCreated) -> io::Result<RestrictionStatus> {
    ruleset.restrict_self().map_err(|e: RulesetError| {
        // Walk to the OS error without formatting anything (no allocation here).
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(err) = source {
            if let Some(io) = err.downcast_ref::<io::Error>() {
                if let Some(code) = io.raw_os_error() {
                    return io::Error::from_raw_os_error(code);
                }
            }
            source = err.source();
        }
        io::Error::from_raw_os_error(libc::EPERM)
    })
}

fn join_cgroup(procs: &CString) -> io::Result<()> {
    // SAFETY: a valid C string; the fd is closed below.
    let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // Writing 0 moves the writing process.
    let written = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
    let err = io::Error::last_os_error();
    unsafe { libc::close(fd) };
    if written != 1 {
        return Err(err);
    }
    Ok(())
}

/// Forks init and the program; returns only in the program. The waiter and init end with
/// `_exit`, never returning into std's exec path.
unsafe fn supervise() -> io::Result<()> {
    let (status_read, status_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    match fork()? {
        ForkResult::Parent { child } => {
            drop(status_write);
            close_all_except(status_read.as_raw_fd());
            let status = read_status(&status_read);
            let _ = wait_raw(child.as_raw());
            mirror(status)
        }
        ForkResult::Child => {
            drop(status_read);
            // If the waiter is killed (timeout), init goes too, and the namespace with it.
            let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
            match fork()? {
                ForkResult::Parent { child } => {
                    close_all_except(status_write.as_raw_fd());
                    let status = reap_until(child.as_raw());
                    write_status(&status_write, status);
                    libc::_exit(0)
                }
                ForkResult::Child => {
                    drop(status_write);
                    Ok(())
                }
            }
        }
    }
}

/// Closes every descriptor but `keep`: the waiter and init never exec, and must not hold
/// std's exec-error pipe (or the output pipes) open.
fn close_all_except(keep: RawFd) {
    let keep = keep as libc::c_uint;
    // SAFETY: close_range only closes descriptors.
    unsafe {
        if keep > 0 {
            libc::syscall(libc::SYS_close_range, 0 as libc::c_uint, keep - 1, 0);
        }
        libc::syscall(libc::SYS_close_range, keep + 1, libc::c_uint::MAX, 0);
    }
}

/// waitpid for one process; the raw status, or None.
fn wait_raw(pid: libc::pid_t) -> Option<i32> {
    let mut status = 0;
    loop {
        // SAFETY: plain syscall with a valid pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Some(status);
        }
        if r < 0 && Errno::last() != Errno::EINTR {
            return None;
        }
    }
}

/// As init: reaps every child until the program ends; its raw wait status.
fn reap_until(program: libc::pid_t) -> Option<i32> {
    let mut status = 0;
    loop {
        // SAFETY: plain syscall with a valid pointer.
        let r = unsafe { libc::waitpid(-1, &mut status, 0) };
        if r == program {
            return Some(status);
        }
        if r < 0 && Errno::last() != Errno::EINTR {
            return None;
        }
    }
}

fn write_status(fd: &OwnedFd, status: Option<i32>) {
    if let Some(status) = status {
        let bytes = status.to_ne_bytes();
        // SAFETY: writes 4 bytes from a live buffer.
        unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    }
}

fn read_status(fd: &OwnedFd) -> Option<i32> {
    let mut bytes = [0u8; 4];
    let mut got = 0;
    while got < bytes.len() {
        // SAFETY: reads into the live buffer's remaining part.
        let r = unsafe {
            libc::read(
                fd.as_raw_fd(),
                bytes[got..].as_mut_ptr().cast(),
                bytes.len() - got,
            )
        };
        if r > 0 {
            got += r as usize;
        } else if r == 0 || Errno::last() != Errno::EINTR {
            return None;
        }
    }
    Some(i32::from_ne_bytes(bytes))
}

/// Ends the waiter the way the program ended, so the parent sees the program's status.
fn mirror(status: Option<i32>) -> ! {
    // SAFETY: only async-signal-safe calls; never returns.
    unsafe {
        if let Some(status) = status {
            if libc::WIFEXITED(status) {
                libc::_exit(libc::WEXITSTATUS(status));
            }
            if libc::WIFSIGNALED(status) {
                let sig = libc::WTERMSIG(status);
                // This process is a copy of the parent: it must not dump core.
                libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
                let none = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &none);
                libc::signal(sig, libc::SIG_DFL);
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, sig);
                libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                libc::kill(libc::getpid(), sig);
                libc::_exit(128 + sig);
            }
        }
        libc::_exit(STATUS_LOST)
    }
}
