//! Which OS-level isolation a run gets, how it is built, and how the sandbox finds out what
//! this machine allows. See the crate docs for the levels.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use landlock::{
    path_beneath_rules, Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetCreated,
    RulesetCreatedAttr, RulesetError, RulesetStatus, Scope, ABI,
};
use nix::libc;
use nix::sched::CloneFlags;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde::{Deserialize, Serialize};

use crate::cgroup::CgroupPool;
use crate::python::PythonInfo;

/// How isolated runs are, in one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IsolationLevel {
    /// Network, PID and user namespaces, Landlock fully enforced, seccomp and a process limit.
    Full,
    /// Some of those: see the [`IsolationReport`]'s `missing`.
    Partial,
    /// Resource limits, a fresh directory and an emptied environment only.
    None,
}

/// Whether Landlock confines the file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LandlockState {
    /// Every access right the sandbox asks for is enforced (kernel Landlock ABI 6 or newer).
    Full,
    /// Enforced, but an older kernel lacks some rights (such as signal scoping).
    Partial,
    Unavailable,
}

/// What caps the number of processes (fork bombs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessLimit {
    /// A pids cgroup per run (when running as root).
    Cgroup,
    /// `RLIMIT_NPROC`, counted per run in the run's own user namespace.
    Rlimit,
    None,
}

/// What caps the memory of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryLimit {
    /// A memory cgroup per run (when running as root): all processes and the files they
    /// write together, no swap ([`Limits::run_memory_bytes`](crate::Limits)).
    Cgroup,
    /// Only `RLIMIT_AS` for each process: many processes together can use more.
    PerProcess,
}

/// What caps the disk use of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskLimit {
    /// The run directory is a tmpfs of limited size and inodes (when running as root).
    Tmpfs,
    /// Only `RLIMIT_FSIZE` for each file: many files together can use more.
    PerFile,
}

/// The isolation in force, reported with every run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsolationReport {
    pub level: IsolationLevel,
    /// The program has no privileges over the host: it runs as an unprivileged user (when
    /// the caller is root) or as the caller in a user namespace (otherwise).
    pub unprivileged: bool,
    /// The user ID the program runs as, seen from the host.
    pub uid: u32,
    pub user_namespace: bool,
    pub network_namespace: bool,
    pub pid_namespace: bool,
    pub landlock: LandlockState,
    pub seccomp: bool,
    pub process_limit: ProcessLimit,
    #[serde(default = "per_process")]
    pub memory_limit: MemoryLimit,
    #[serde(default = "per_file")]
    pub disk_limit: DiskLimit,
    /// What full isolation would add, in words; empty when the level is full.
    pub missing: Vec<String>,
}

fn per_process() -> MemoryLimit {
    MemoryLimit::PerProcess
}

fn per_file() -> DiskLimit {
    DiskLimit::PerFile
}

/// What each run applies; decided once, when the sandbox is set up.
#[derive(Debug, Clone)]
pub(crate) struct IsolationPlan {
    pub namespaces: CloneFlags,
    /// When running as root: the unprivileged ID the program switches to.
    pub run_as: Option<u32>,
    /// With `run_as`: what to cover and bind back so that the run can read Python.
    pub unveil: Option<crate::unveil::UnveilSpec>,
    pub fs_rules: Option<FsRules>,
    pub seccomp: Option<Arc<Vec<BpfProgram>>>,
    pub cgroups: Option<Arc<CgroupPool>>,
    /// Whether `RLIMIT_NPROC` counts only the run's processes (own user namespace, not root).
    pub nproc_rlimit: bool,
    /// Whether run directories are tmpfs mounts of limited size (needs root).
    pub disk_quota: bool,
}

impl IsolationPlan {
    pub(crate) fn nothing() -> IsolationPlan {
        IsolationPlan {
            namespaces: CloneFlags::empty(),
            run_as: None,
            unveil: None,
            fs_rules: None,
            seccomp: None,
            cgroups: None,
            nproc_rlimit: false,
            disk_quota: false,
        }
    }
}

/// The file-system view of a run: read-only system and Python directories, a few devices,
/// and full access to the run's own directory. Nothing else is reachable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct FsRules {
    read: Vec<PathBuf>,
    devices: Vec<PathBuf>,
}

/// The Landlock ABI whose rights the sandbox asks for; older kernels enforce a subset.
const LANDLOCK_ABI: ABI = ABI::V6;

/// System directories Python and its libraries read. /etc is reduced to what the dynamic
/// loader and the standard library open, so that host keys and password hashes stay out.
const SYSTEM_READ: &[&str] = &[
    "/usr",
    "/lib",
    "/lib64",
    "/lib32",
    "/libx32",
    "/bin",
    "/sbin",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/nsswitch.conf",
    "/etc/passwd",
    "/etc/group",
    "/etc/hosts",
    "/etc/mime.types",
    "/etc/os-release",
    "/etc/alternatives",
    "/etc/ssl/certs",
    "/etc/ssl/openssl.cnf",
];

const DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

impl FsRules {
    pub(crate) fn new(python: &PythonInfo, harness_dir: &Path) -> FsRules {
        let mut read: Vec<PathBuf> = SYSTEM_READ.iter().map(PathBuf::from).collect();
        read.extend(python.prefixes.iter().cloned());
        read.extend(python.path.iter().cloned());
        read.extend(python.site_packages.iter().cloned());
        if let Some(bin) = python.executable.parent() {
            read.push(bin.to_path_buf());
        }
        read.push(harness_dir.to_path_buf());
        read.retain(|p| p.exists());
        read.sort();
        read.dedup();
        FsRules {
            read,
            devices: DEVICES.iter().map(PathBuf::from).collect(),
        }
    }

    /// The ruleset of one run, built in the parent; the child only calls `restrict_self`.
    pub(crate) fn ruleset(&self, workdir: &Path) -> Result<RulesetCreated, RulesetError> {
        let abi = LANDLOCK_ABI;
        Ruleset::default()
            .handle_access(AccessFs::from_all(abi))?
            .handle_access(AccessNet::from_all(abi))?
            .scope(Scope::from_all(abi))?
            .create()?
            .add_rules(path_beneath_rules(&self.read, AccessFs::from_read(abi)))?
            .add_rules(path_beneath_rules(
                &self.devices,
                AccessFs::from_read(abi) | AccessFs::WriteFile,
            ))?
            .add_rules(path_beneath_rules([workdir], AccessFs::from_all(abi)))
    }

    /// How much of the ruleset this kernel enforces, found by restricting a throwaway thread
    /// (Landlock applies to the calling thread only).
    pub(crate) fn enforcement(&self) -> LandlockState {
        let rules = self.clone();
        std::thread::spawn(move || {
            let Ok(dir) = tempfile::tempdir() else {
                return LandlockState::Unavailable;
            };
            match rules.ruleset(dir.path()).and_then(|r| r.restrict_self()) {
                Ok(status) => match status.ruleset {
                    RulesetStatus::FullyEnforced => LandlockState::Full,
                    RulesetStatus::PartiallyEnforced => LandlockState::Partial,
                    RulesetStatus::NotEnforced => LandlockState::Unavailable,
                },
                Err(_) => LandlockState::Unavailable,
            }
        })
        .join()
        .unwrap_or(LandlockState::Unavailable)
    }
}

/// System calls no checked program needs and a hostile one could use to reach past the
/// other layers: kernel modules, mounts, namespaces, tracing other processes, BPF, keyrings,
/// io_uring (whose operations bypass seccomp), clock and host settings.
fn denied_syscalls() -> Vec<i64> {
    let mut calls = vec![
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_reboot,
        libc::SYS_acct,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_sethostname,
        libc::SYS_setdomainname,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_quotactl,
        libc::SYS_setns,
        libc::SYS_unshare,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_syslog,
        libc::SYS_vhangup,
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([libc::SYS_iopl, libc::SYS_ioperm, libc::SYS_uselib]);
    calls
}

/// The seccomp programs of a run: a deny list answering EPERM, including `clone` with any
/// namespace flag and `socket(AF_UNIX, ...)`, and `clone3` answering ENOSYS (its flags sit behind a pointer, out of
/// seccomp's reach; libc then falls back to `clone`).
pub(crate) fn seccomp_programs() -> Result<Vec<BpfProgram>, String> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| e.to_string())?;
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> =
        denied_syscalls().into_iter().map(|s| (s, vec![])).collect();
    let namespace_flags = [
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWNS,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWNET,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWCGROUP,
    ];
    let clone_rules = namespace_flags
        .iter()
        .map(|&flag| {
            let flag = flag as u64;
            let condition = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )?;
            SeccompRule::new(vec![condition])
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    rules.insert(libc::SYS_clone, clone_rules);
    // Unix sockets by path reach past Landlock (it does not confine connect on them): a
    // program could talk to any listening host socket it can name. socketpair stays allowed
    // (multiprocessing uses it; a pair connects only to itself).
    let unix = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::AF_UNIX as u64,
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map_err(|e| e.to_string())?;
    rules.insert(libc::SYS_socket, vec![unix]);
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| e.to_string())?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(|e| e.to_string())?;
    Ok(vec![
        BpfProgram::try_from(deny).map_err(|e| e.to_string())?,
        BpfProgram::try_from(clone3).map_err(|e| e.to_string())?,
    ])
}

/// The user (and group) ID root runs programs as: `nobody`.
pub(crate) const SANDBOX_ID: u32 = 65534;

/// The namespace sets (and user switches) to try, best first. Root switches the program to
/// an unprivileged user and needs no user namespace; if that fails, a user namespace at least
/// takes its capabilities away. Others need a user namespace for the rest.
pub(crate) fn namespace_candidates(root: bool) -> Vec<(CloneFlags, Option<u32>)> {
    let user = CloneFlags::CLONE_NEWUSER;
    let rest = CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWIPC;
    if root {
        vec![
            (rest, Some(SANDBOX_ID)),
            (user | rest, None),
            (CloneFlags::CLONE_NEWNET, Some(SANDBOX_ID)),
            (CloneFlags::empty(), Some(SANDBOX_ID)),
            (CloneFlags::empty(), None),
        ]
    } else {
        vec![
            (user | rest, None),
            (user | CloneFlags::CLONE_NEWNET, None),
            (CloneFlags::empty(), None),
        ]
    }
}

impl IsolationReport {
    /// Describes a plan that probing found to work.
    pub(crate) fn of(plan: &IsolationPlan, landlock: LandlockState) -> IsolationReport {
        let ns = plan.namespaces;
        let caller = nix::unistd::geteuid().as_raw();
        let uid = plan.run_as.unwrap_or(caller);
        let user_namespace = ns.contains(CloneFlags::CLONE_NEWUSER);
        let process_limit = if plan.cgroups.is_some() {
            ProcessLimit::Cgroup
        } else if plan.nproc_rlimit {
            ProcessLimit::Rlimit
        } else {
            ProcessLimit::None
        };
        let landlock = if plan.fs_rules.is_some() {
            landlock
        } else {
            LandlockState::Unavailable
        };
        let mut report = IsolationReport {
            level: IsolationLevel::None,
            unprivileged: uid != 0 && (plan.run_as.is_some() || user_namespace),
            uid,
            user_namespace,
            network_namespace: ns.contains(CloneFlags::CLONE_NEWNET),
            pid_namespace: ns.contains(CloneFlags::CLONE_NEWPID),
            landlock,
            seccomp: plan.seccomp.is_some(),
            process_limit,
            memory_limit: if plan.cgroups.as_ref().is_some_and(|c| c.has_memory()) {
                MemoryLimit::Cgroup
            } else {
                MemoryLimit::PerProcess
            },
            disk_limit: if plan.disk_quota {
                DiskLimit::Tmpfs
            } else {
                DiskLimit::PerFile
            },
            missing: Vec::new(),
        };
        let missing = &mut report.missing;
        if !report.unprivileged {
            missing.push("an unprivileged user (the program could change files root owns)".into());
        }
        if !report.network_namespace {
            missing.push("network namespace (sockets would reach the host)".into());
        }
        if !report.pid_namespace {
            missing.push("PID namespace (processes could outlive the run)".into());
        }
        match landlock {
            LandlockState::Full => {}
            LandlockState::Partial => {
                missing.push("Landlock ABI 6 (the kernel lacks signal and socket scoping)".into())
            }
            LandlockState::Unavailable => {
                missing.push("Landlock (file-system access is not confined)".into())
            }
        }
        if !report.seccomp {
            missing.push("seccomp filter".into());
        }
        if process_limit == ProcessLimit::None {
            missing.push(
                "process limit (needs a pids cgroup as root, a user namespace otherwise)".into(),
            );
        }
        if report.memory_limit == MemoryLimit::PerProcess {
            missing.push(
                "memory limit for the whole run (needs a memory cgroup as root; each process \
                 is limited, not their sum)"
                    .into(),
            );
        }
        if report.disk_limit == DiskLimit::PerFile {
            missing.push(
                "disk quota for the run directory (needs root to mount a tmpfs; each file is \
                 limited, not their sum or count)"
                    .into(),
            );
        }
        let confined = report.network_namespace || landlock != LandlockState::Unavailable;
        let confined = confined || report.unprivileged;
        report.level = if report.missing.is_empty() {
            IsolationLevel::Full
        } else if confined || report.pid_namespace || report.seccomp {
            IsolationLevel::Partial
        } else {
            IsolationLevel::None
        };
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seccomp_programs_build_for_this_machine() {
        let programs = seccomp_programs().unwrap();
        assert_eq!(programs.len(), 2);
        assert!(programs.iter().all(|p| !p.is_empty()));
    }

    #[test]
    fn report_levels_follow_what_is_missing() {
        let none = IsolationReport::of(&IsolationPlan::nothing(), LandlockState::Full);
        assert_eq!(none.level, IsolationLevel::None);
        assert_eq!(none.landlock, LandlockState::Unavailable);
        let root = nix::unistd::geteuid().is_root();
        assert_eq!(none.missing.len(), if root { 8 } else { 7 });

        let net_only = IsolationPlan {
            namespaces: CloneFlags::CLONE_NEWNET,
            ..IsolationPlan::nothing()
        };
        let report = IsolationReport::of(&net_only, LandlockState::Full);
        assert_eq!(report.level, IsolationLevel::Partial);
        assert!(report.network_namespace && !report.pid_namespace);

        let full = IsolationPlan {
            namespaces: namespace_candidates(false)[0].0,
            run_as: Some(SANDBOX_ID),
            unveil: None,
            fs_rules: Some(FsRules {
                read: vec![],
                devices: vec![],
            }),
            seccomp: Some(Arc::new(seccomp_programs().unwrap())),
            cgroups: None,
            nproc_rlimit: true,
            disk_quota: true,
        };
        // Without a memory cgroup, only the memory limit is missing.
        let report = IsolationReport::of(&full, LandlockState::Full);
        assert_eq!(report.level, IsolationLevel::Partial);
        assert_eq!(report.missing.len(), 1, "{:?}", report.missing);
        assert!(report.missing[0].contains("memory"), "{:?}", report.missing);
        assert_eq!(report.disk_limit, DiskLimit::Tmpfs);
        let partial = IsolationReport::of(&full, LandlockState::Partial);
        assert_eq!(partial.level, IsolationLevel::Partial);
    }

    #[test]
    fn namespace_candidates_end_with_none() {
        for root in [true, false] {
            let candidates = namespace_candidates(root);
            assert!(candidates[0].0.contains(CloneFlags::CLONE_NEWPID));
            assert_eq!(candidates[0].1.is_some(), root);
            assert_eq!(*candidates.last().unwrap(), (CloneFlags::empty(), None));
        }
    }
}
