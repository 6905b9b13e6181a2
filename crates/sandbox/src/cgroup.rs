//! A cgroup per run when running as root: pids, to cap the number of processes, and memory
//! (where the controller is available), to cap the memory of the whole run.
//!
//! `RLIMIT_NPROC` is not enforced for root, and the sandbox keeps the caller's user ID (a user
//! namespace takes its capabilities away): without a cgroup a fork bomb run by root would only
//! be stopped by the timeout. The run's cgroup also finds every process left over, whatever
//! session or process group it moved to.

use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The directory under which each run gets its own pids cgroup, and the one for its memory
/// cgroup (the same one in cgroup v2, another hierarchy in v1).
#[derive(Debug)]
pub(crate) struct CgroupPool {
    base: PathBuf,
    memory: Option<MemoryBase>,
}

#[derive(Debug, Clone)]
struct MemoryBase {
    base: PathBuf,
    v2: bool,
}

/// The number of the next run cgroup this process creates.
static NEXT_RUN: AtomicU64 = AtomicU64::new(0);

/// One run's cgroup; removed (after killing what is left in it) when dropped.
#[derive(Debug)]
pub(crate) struct RunCgroup {
    dir: PathBuf,
    /// The run's memory cgroup: `dir` itself in v2, its twin in the memory hierarchy in v1.
    memory: Option<(PathBuf, bool)>,
}

impl CgroupPool {
    /// Finds a writable pids controller (cgroup v1 `pids` hierarchy, or cgroup v2 with `pids`
    /// enabled at its root) and creates `forgeline-sandbox` in it. None when there is none.
    pub(crate) fn detect() -> Option<CgroupPool> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
        let own = fs::read_to_string("/proc/self/cgroup").ok()?;
        let v1 = v1_base(&mountinfo, &own, "pids");
        let v2 = v1.is_none();
        let base = v1.or_else(|| v2_base(&mountinfo, "pids"))?;
        if fs::create_dir_all(&base).is_err() {
            return None;
        }
        // v2 needs the controller enabled for the children of our directory; v1 has no such file.
        let subtree = base.join("cgroup.subtree_control");
        if subtree.exists() && fs::write(&subtree, "+pids").is_err() {
            return None;
        }
        let memory = if v2 {
            let enabled =
                v2_base(&mountinfo, "memory").is_some() && fs::write(&subtree, "+memory").is_ok();
            enabled.then(|| MemoryBase {
                base: base.clone(),
                v2: true,
            })
        } else {
            v1_base(&mountinfo, &own, "memory")
                .filter(|base| fs::create_dir_all(base).is_ok())
                .map(|base| MemoryBase { base, v2: false })
        };
        sweep(&base);
        if let Some(memory) = memory.as_ref().filter(|m| !m.v2) {
            sweep(&memory.base);
        }
        let mut pool = CgroupPool { base, memory };
        if pool.create(1, Some(64 << 20)).is_err() {
            pool.memory = None;
            drop(pool.create(1, None).ok()?);
        }
        Some(pool)
    }

    /// Whether runs get a memory cgroup too.
    pub(crate) fn has_memory(&self) -> bool {
        self.memory.is_some()
    }

    /// A fresh cgroup allowing `max_pids` processes and, where there is a memory cgroup,
    /// `memory_bytes` of memory (no swap) for all of them together.
    pub(crate) fn create(&self, max_pids: u32, memory_bytes: Option<u64>) -> io::Result<RunCgroup> {
        // Numbered across the process (several sandboxes in one process share the base);
        // a name still taken (a run's cgroup that could not be removed in time) is skipped.
        let dir = loop {
            let n = NEXT_RUN.fetch_add(1, Ordering::Relaxed);
            let dir = self.base.join(format!("run-{}-{n}", std::process::id()));
            match fs::create_dir(&dir) {
                Ok(()) => break dir,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        };
        let mut cgroup = RunCgroup { dir, memory: None };
        fs::write(cgroup.dir.join("pids.max"), max_pids.to_string())?;
        if let (Some(memory), Some(bytes)) = (&self.memory, memory_bytes) {
            let bytes = bytes.to_string();
            if memory.v2 {
                cgroup.memory = Some((cgroup.dir.clone(), true));
                fs::write(cgroup.dir.join("memory.max"), &bytes)?;
                // Without swap accounting there is no such file, and nothing to limit.
                let _ = fs::write(cgroup.dir.join("memory.swap.max"), "0");
            } else {
                let twin = memory
                    .base
                    .join(cgroup.dir.file_name().expect("a named cgroup"));
                fs::create_dir(&twin)?;
                cgroup.memory = Some((twin.clone(), false));
                fs::write(twin.join("memory.limit_in_bytes"), &bytes)?;
                let _ = fs::write(twin.join("memory.memsw.limit_in_bytes"), &bytes);
            }
        }
        Ok(cgroup)
    }
}

/// The process that created a run cgroup, from its name `run-{pid}-{n}`.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix("run-")?.split('-').next()?.parse().ok()
}

impl RunCgroup {
    /// The files the child writes itself into (one per hierarchy).
    pub(crate) fn procs_paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.dir.join("cgroup.procs")];
        if let Some((dir, false)) = &self.memory {
            paths.push(dir.join("cgroup.procs"));
        }
        paths
    }

    /// How many processes the memory cgroup's OOM killer killed.
    pub(crate) fn oom_kills(&self) -> u64 {
        let Some((dir, v2)) = &self.memory else {
            return 0;
        };
        let file = if *v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|text| {
                text.lines().find_map(|line| {
                    line.strip_prefix("oom_kill ")
                        .and_then(|n| n.trim().parse().ok())
                })
            })
            .unwrap_or(0)
    }

    /// SIGKILLs every process in the cgroup until it is empty (or a short deadline passes).
    pub(crate) fn kill_all(&self) {
        for _ in 0..50 {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.dir.join("cgroup.procs"))
            .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }
}

impl Drop for RunCgroup {
    fn drop(&mut self) {
        self.kill_all();
        let twin = match &self.memory {
            Some((dir, false)) => Some(dir.clone()),
            _ => None,
        };
        for dir in std::iter::once(self.dir.clone()).chain(twin) {
            remove_cgroup(&dir);
        }
    }
}

/// Removes an emptied cgroup: killed processes leave it a moment after they are reaped.
fn remove_cgroup(dir: &std::path::Path) {
    for _ in 0..100 {
        match fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(2))
            }
            _ => return,
        }
    }
    tracing::warn!(dir = %dir.display(), "could not remove a sandbox cgroup");
}

/// Runs of a process that died leave empty cgroups behind. Only those are removed: a live
/// process's fresh cgroup is empty too until its child writes itself in.
fn sweep(base: &std::path::Path) {
    if let Ok(entries) = fs::read_dir(base) {
        for entry in entries.flatten() {
            let owner_alive = owner_pid(&entry.file_name().to_string_lossy())
                .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
            if entry.path().is_dir() && !owner_alive {
                let _ = fs::remove_dir(entry.path());
            }
        }
    }
}

/// cgroup v1: the mount of the `controller` hierarchy, plus our own path in it.
fn v1_base(mountinfo: &str, own: &str, controller: &str) -> Option<PathBuf> {
    let mount = mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut fields = right.split_whitespace();
        let fstype = fields.next()?;
        let _source = fields.next()?;
        let options = fields.next()?;
        (fstype == "cgroup" && options.split(',').any(|o| o == controller))
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })?;
    let path = own.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let _id = parts.next()?;
        let controllers = parts.next()?;
        let path = parts.next()?;
        controllers
            .split(',')
            .any(|c| c == controller)
            .then_some(path)
    })?;
    Some(
        mount
            .join(path.trim_start_matches('/'))
            .join("forgeline-sandbox"),
    )
}

/// cgroup v2: `forgeline-sandbox` at the root, when the root delegates `controller`.
/// Processes cannot stay in a v2 cgroup whose controllers are enabled for children, so our
/// own cgroup is no place for it.
fn v2_base(mountinfo: &str, controller: &str) -> Option<PathBuf> {
    let mount = mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })?;
    let enabled = fs::read_to_string(mount.join("cgroup.subtree_control")).ok()?;
    enabled
        .split_whitespace()
        .any(|c| c == controller)
        .then(|| mount.join("forgeline-sandbox"))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const MOUNTINFO: &str = "\
29 23 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
37 29 0:34 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
38 29 0:35 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_the_v1_pids_hierarchy_and_our_place_in_it() {
        let own = "8:pids:/jobs/forty-two\n4:memory:/x\n0::/\n";
        let base = v1_base(MOUNTINFO, own, "pids").unwrap();
        assert_eq!(
            base,
            Path::new("/sys/fs/cgroup/pids/jobs/forty-two/forgeline-sandbox")
        );
    }

    #[test]
    fn no_v1_base_without_a_pids_hierarchy() {
        let mountinfo = "37 29 0:34 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(v1_base(mountinfo, "4:memory:/\n", "pids"), None);
    }

    #[test]
    fn run_cgroups_name_their_owner() {
        assert_eq!(owner_pid("run-4242-7"), Some(4242));
        assert_eq!(owner_pid("other"), None);
    }

    #[test]
    fn a_live_process_keeps_its_fresh_empty_cgroup_when_another_starts() {
        let Some(pool) = CgroupPool::detect() else {
            eprintln!("no writable pids cgroup here (not root?): nothing to exercise");
            return;
        };
        let mine = pool.create(4, None).unwrap();
        // Another forgeline starting now sweeps leftover cgroups; ours is empty but alive.
        let _other = CgroupPool::detect().unwrap();
        assert!(
            mine.dir.exists(),
            "a concurrent start removed a live run's cgroup"
        );
    }

    #[test]
    fn two_sandboxes_in_one_process_never_share_a_run_cgroup() {
        let Some(a) = CgroupPool::detect() else {
            eprintln!("no writable pids cgroup here (not root?): nothing to exercise");
            return;
        };
        let b = CgroupPool::detect().unwrap();
        let runs: Vec<RunCgroup> = (0..4)
            .flat_map(|_| [a.create(4, None).unwrap(), b.create(4, None).unwrap()])
            .collect();
        let dirs: std::collections::HashSet<_> = runs.iter().map(|r| &r.dir).collect();
        assert_eq!(dirs.len(), runs.len());
    }

    #[test]
    fn a_run_cgroup_caps_memory_and_counts_oom_kills() {
        let Some(pool) = CgroupPool::detect().filter(CgroupPool::has_memory) else {
            eprintln!("no writable memory cgroup here (not root?): nothing to exercise");
            return;
        };
        let cgroup = pool.create(4, Some(64 << 20)).unwrap();
        let procs = cgroup.procs_paths();
        let held = std::process::Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import os\nfor p in {:?}:\n    open(p, 'w').write(str(os.getpid()))\nx = bytearray(300 << 20)\n",
                procs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>()
            ))
            .status()
            .unwrap();
        assert!(!held.success());
        assert!(cgroup.oom_kills() >= 1);
    }

    #[test]
    fn a_run_cgroup_caps_processes_and_is_removed() {
        let Some(pool) = CgroupPool::detect() else {
            eprintln!("no writable pids cgroup here (not root?): nothing to exercise");
            return;
        };
        let cgroup = pool.create(7, None).unwrap();
        let dir = cgroup.dir.clone();
        assert_eq!(
            fs::read_to_string(dir.join("pids.max")).unwrap().trim(),
            "7"
        );
        assert!(cgroup.pids().is_empty());
        drop(cgroup);
        assert!(!dir.exists());
    }
}
