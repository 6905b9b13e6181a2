//! A pids cgroup per run, to cap the number of processes when running as root.
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

/// The directory under which each run gets its own pids cgroup.
#[derive(Debug)]
pub(crate) struct CgroupPool {
    base: PathBuf,
}

/// The number of the next run cgroup this process creates.
static NEXT_RUN: AtomicU64 = AtomicU64::new(0);

/// One run's cgroup; removed (after killing what is left in it) when dropped.
#[derive(Debug)]
pub(crate) struct RunCgroup {
    dir: PathBuf,
}

impl CgroupPool {
    /// Finds a writable pids controller (cgroup v1 `pids` hierarchy, or cgroup v2 with `pids`
    /// enabled at its root) and creates `forgeline-sandbox` in it. None when there is none.
    pub(crate) fn detect() -> Option<CgroupPool> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
        let own = fs::read_to_string("/proc/self/cgroup").ok()?;
        let base = v1_base(&mountinfo, &own).or_else(|| v2_base(&mountinfo))?;
        if fs::create_dir_all(&base).is_err() {
            return None;
        }
        // v2 needs the controller enabled for the children of our directory; v1 has no such file.
        let subtree = base.join("cgroup.subtree_control");
        if subtree.exists() && fs::write(&subtree, "+pids").is_err() {
            return None;
        }
        // Runs of a process that died leave empty cgroups behind. Only those are removed: a
        // live process's fresh cgroup is empty too until its child writes itself in.
        if let Ok(entries) = fs::read_dir(&base) {
            for entry in entries.flatten() {
                let owner_alive = owner_pid(&entry.file_name().to_string_lossy())
                    .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
                if entry.path().is_dir() && !owner_alive {
                    let _ = fs::remove_dir(entry.path());
                }
            }
        }
        let pool = CgroupPool { base };
        drop(pool.create(1).ok()?);
        Some(pool)
    }

    /// A fresh cgroup allowing `max_pids` processes.
    pub(crate) fn create(&self, max_pids: u32) -> io::Result<RunCgroup> {
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
        let cgroup = RunCgroup { dir };
        fs::write(cgroup.dir.join("pids.max"), max_pids.to_string())?;
        Ok(cgroup)
    }
}

/// The process that created a run cgroup, from its name `run-{pid}-{n}`.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix("run-")?.split('-').next()?.parse().ok()
}

impl RunCgroup {
    /// The file the child writes itself into.
    pub(crate) fn procs_path(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
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
        // Killed processes leave the cgroup a moment after they are reaped.
        for _ in 0..100 {
            match fs::remove_dir(&self.dir) {
                Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                _ => return,
            }
        }
        tracing::warn!(dir = %self.dir.display(), "could not remove a sandbox cgroup");
    }
}

/// cgroup v1: the mount of the `pids` hierarchy, plus our own path in it.
fn v1_base(mountinfo: &str, own: &str) -> Option<PathBuf> {
    let mount = mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut fields = right.split_whitespace();
        let fstype = fields.next()?;
        let _source = fields.next()?;
        let options = fields.next()?;
        (fstype == "cgroup" && options.split(',').any(|o| o == "pids"))
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })?;
    let path = own.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let _id = parts.next()?;
        let controllers = parts.next()?;
        let path = parts.next()?;
        controllers.split(',').any(|c| c == "pids").then_some(path)
    })?;
    Some(
        mount
            .join(path.trim_start_matches('/'))
            .join("forgeline-sandbox"),
    )
}

/// cgroup v2: `forgeline-sandbox` at the root, when the root delegates `pids`. Processes
/// cannot stay in a v2 cgroup whose controllers are enabled for children, so our own cgroup
/// is no place for it.
fn v2_base(mountinfo: &str) -> Option<PathBuf> {
    let mount = mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })?;
    let enabled = fs::read_to_string(mount.join("cgroup.subtree_control")).ok()?;
    enabled
        .split_whitespace()
        .any(|c| c == "pids")
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
        let base = v1_base(MOUNTINFO, own).unwrap();
        assert_eq!(
            base,
            Path::new("/sys/fs/cgroup/pids/jobs/forty-two/forgeline-sandbox")
        );
    }

    #[test]
    fn no_v1_base_without_a_pids_hierarchy() {
        let mountinfo = "37 29 0:34 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(v1_base(mountinfo, "4:memory:/\n"), None);
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
        let mine = pool.create(4).unwrap();
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
            .flat_map(|_| [a.create(4).unwrap(), b.create(4).unwrap()])
            .collect();
        let dirs: std::collections::HashSet<_> = runs.iter().map(|r| &r.dir).collect();
        assert_eq!(dirs.len(), runs.len());
    }

    #[test]
    fn a_run_cgroup_caps_processes_and_is_removed() {
        let Some(pool) = CgroupPool::detect() else {
            eprintln!("no writable pids cgroup here (not root?): nothing to exercise");
            return;
        };
        let cgroup = pool.create(7).unwrap();
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
