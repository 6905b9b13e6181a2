//! The Python harness that runs inside the sandbox (the `harness/*.py` files), installed once
//! per [`Sandbox`](crate::Sandbox) into a read-only directory with pre-compiled bytecode.
//!
//! Every run compiles its entry script, but imports the harness modules from `__pycache__`:
//! compiling them on each run would cost more than Python's start-up.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tempfile::TempDir;

use crate::python::PythonInfo;
use crate::{Error, Result};

/// The harness files, by name.
const FILES: &[(&str, &str)] = &[
    ("run.py", include_str!("harness/run.py")),
    (
        "forgeline_harness.py",
        include_str!("harness/forgeline_harness.py"),
    ),
    (
        "forgeline_report.py",
        include_str!("harness/forgeline_report.py"),
    ),
    (
        "forgeline_asserts.py",
        include_str!("harness/forgeline_asserts.py"),
    ),
    (
        "forgeline_runners.py",
        include_str!("harness/forgeline_runners.py"),
    ),
];

/// The installed harness; removed when dropped.
#[derive(Debug)]
pub(crate) struct HarnessDir {
    dir: TempDir,
}

impl HarnessDir {
    /// Writes the harness and its configuration (the directories runs add to `sys.path`), and
    /// compiles it with the interpreter the runs use.
    pub(crate) async fn install(
        work_root: &Path,
        python: &PythonInfo,
        site_dirs: &[PathBuf],
    ) -> Result<HarnessDir> {
        remove_stale(work_root);
        let dir = tempfile::Builder::new()
            .prefix(&format!("forgeline-harness-{}-", std::process::id()))
            .tempdir_in(work_root)
            .map_err(|e| Error::io("create the harness directory", e))?;
        // Runs read it as an unprivileged user with no capabilities.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .map_err(|e| Error::io("open the harness directory to runs", e))?;
        for (name, text) in FILES {
            std::fs::write(dir.path().join(name), text)
                .map_err(|e| Error::io(format!("write the harness file {name}"), e))?;
        }
        std::fs::write(dir.path().join("forgeline_config.py"), config(site_dirs))
            .map_err(|e| Error::io("write the harness configuration", e))?;
        let status = tokio::process::Command::new(&python.executable)
            .args(["-I", "-S", "-c"])
            .arg("import compileall, sys; sys.exit(not compileall.compile_dir(sys.argv[1], quiet=2))")
            .arg(dir.path())
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .await
            .map_err(|e| Error::io("compile the harness", e))?;
        if !status.status.success() {
            return Err(Error::Harness(format!(
                "compiling the harness failed: {}",
                String::from_utf8_lossy(&status.stderr).trim()
            )));
        }
        Ok(HarnessDir { dir })
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn entry(&self) -> PathBuf {
        self.dir.path().join("run.py")
    }
}

/// Removes the harness and run directories of processes that are gone (killed before they
/// could clean up, or holding a sandbox in a static until exit). Their names carry the PID.
/// Only real directories (never a link, which could point out of the work root) owned by us
/// or, when we are root, by the sandbox user (a run's directory is handed to it) are touched;
/// a run directory that is still a tmpfs mount is unmounted first.
fn remove_stale(work_root: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(work_root) else {
        return;
    };
    let me = nix::unistd::geteuid();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name
            .strip_prefix("forgeline-harness-")
            .or_else(|| name.strip_prefix("forgeline-run-"))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        // DirEntry::metadata does not follow a link.
        let Ok(meta) = entry.metadata() else { continue };
        let owner = meta.uid();
        let ours = owner == me.as_raw() || (me.is_root() && owner == crate::isolation::SANDBOX_ID);
        if !meta.is_dir() || !ours || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = entry.path();
        if let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid C string; fails harmlessly when it is no mount point.
            unsafe { nix::libc::umount2(c_path.as_ptr(), nix::libc::MNT_DETACH) };
        }
        if let Err(e) = crate::rundir::remove_tree(&path) {
            tracing::debug!(dir = %path.display(), error = %e, "could not remove a stale directory");
        }
    }
}

/// `forgeline_config.py`: JSON strings are Python string literals.
fn config(site_dirs: &[PathBuf]) -> String {
    let dirs: Vec<String> = site_dirs
        .iter()
        .filter_map(|d| d.to_str().map(str::to_string))
        .collect();
    format!(
        "# Written by forgeline-sandbox for this sandbox.\nSITE_DIRS = {}\n",
        serde_json::to_string(&dirs).expect("strings serialize")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_directories_of_dead_processes_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let dead = root.path().join("forgeline-run-999999999-abc");
        let alive = root
            .path()
            .join(format!("forgeline-harness-{}-abc", std::process::id()));
        let other = root.path().join("forgeline-run-notapid");
        for dir in [&dead, &alive, &other] {
            std::fs::create_dir(dir).unwrap();
        }
        // A dead run's directory the sandbox user owns, deep and with a locked subdirectory.
        let handed = root.path().join("forgeline-run-999999998-xyz");
        let mut deep = handed.clone();
        for _ in 0..200 {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::set_permissions(
            handed.join("d"),
            std::os::unix::fs::PermissionsExt::from_mode(0o000),
        )
        .unwrap();
        // A link named like a dead run's directory, pointing out of the work root.
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"keep").unwrap();
        let link = root.path().join("forgeline-run-999999997-lnk");
        std::os::unix::fs::symlink(outside.path(), &link).unwrap();
        if nix::unistd::geteuid().is_root() {
            let id = crate::isolation::SANDBOX_ID;
            std::os::unix::fs::chown(&handed, Some(id), Some(id)).unwrap();
        }
        remove_stale(root.path());
        assert!(!dead.exists());
        assert!(!handed.exists());
        assert!(alive.exists() && other.exists());
        assert!(outside.path().join("keep").exists());
    }

    #[test]
    fn config_is_a_python_list_of_strings() {
        let text = config(&[PathBuf::from("/a b/site-packages"), PathBuf::from("/c\"d")]);
        assert!(
            text.contains(r#"SITE_DIRS = ["/a b/site-packages","/c\"d"]"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn installs_compiled_modules() {
        let python = crate::python::probe(None).await.unwrap();
        let root = tempfile::tempdir().unwrap();
        let harness = HarnessDir::install(root.path(), &python, &[])
            .await
            .unwrap();
        assert!(harness.entry().exists());
        let cache = std::fs::read_dir(harness.path().join("__pycache__"))
            .unwrap()
            .count();
        assert!(cache >= FILES.len() - 1, "only {cache} compiled modules");
    }
}
