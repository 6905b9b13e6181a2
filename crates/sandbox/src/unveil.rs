//! Making a Python the sandbox user cannot reach readable to it, without any capability.
//!
//! Run by root, the program switches to `nobody` with no capabilities left, so file
//! permissions apply to it. A Python installed under a directory `nobody` cannot enter (pyenv
//! under `/root`, mode 0700) would then not start. Rather than keep a capability that reads
//! every file (`CAP_DAC_READ_SEARCH`), the run gets a private mount namespace in which each such
//! blocking directory is covered by an empty read-only tmpfs (mode 0755) holding only the path
//! down to the directories the run needs, each bind-mounted back from the real one. The rest of
//! the blocking directory stays out of sight, and what is bound keeps its own permissions (and
//! Landlock rules: a bind mount shows the same inodes).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::libc;
use serde::{Deserialize, Serialize};

/// What to cover and bind back, decided by the parent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct UnveilSpec {
    /// Directories the sandbox user cannot enter, each covered by a tmpfs.
    pub covers: Vec<PathBuf>,
    /// Directories to create in the covers, parents first (the bind mount points included).
    pub dirs: Vec<PathBuf>,
    /// Directories the run needs that lie under a cover, bound back from the real ones.
    pub binds: Vec<PathBuf>,
}

/// Whether user and group `id` (with no other groups) may do `bits` (r=4, w=2, x=1) on `meta`.
fn allows(meta: &std::fs::Metadata, id: u32, bits: u32) -> bool {
    let mode = meta.permissions().mode();
    let granted = if meta.uid() == id {
        mode >> 6
    } else if meta.gid() == id {
        mode >> 3
    } else {
        mode
    } & 7;
    granted & bits == bits
}

impl UnveilSpec {
    /// What makes `paths` reachable for user `id`; None when they all are already. A path
    /// that is itself unreadable to `id` cannot be helped (the trial run then fails).
    pub(crate) fn needed(paths: &[PathBuf], id: u32) -> Option<UnveilSpec> {
        let mut pairs: Vec<(PathBuf, PathBuf)> = Vec::new();
        for path in paths {
            let Ok(path) = std::fs::canonicalize(path) else {
                continue;
            };
            let mut ancestors: Vec<&Path> = path.ancestors().skip(1).collect();
            ancestors.reverse();
            let blocked = ancestors
                .into_iter()
                .find(|dir| std::fs::metadata(dir).is_ok_and(|meta| !allows(&meta, id, 1)));
            if let Some(blocked) = blocked {
                if blocked != Path::new("/") {
                    pairs.push((blocked.to_path_buf(), path.clone()));
                }
            }
        }
        if pairs.is_empty() {
            return None;
        }
        let mut covers: Vec<PathBuf> = pairs.iter().map(|(c, _)| c.clone()).collect();
        covers.sort();
        covers.dedup();
        let outer = covers.clone();
        covers.retain(|c| !outer.iter().any(|o| o != c && c.starts_with(o)));
        let mut binds: Vec<PathBuf> = pairs.into_iter().map(|(_, p)| p).collect();
        binds.sort();
        binds.dedup();
        let all = binds.clone();
        binds.retain(|b| !all.iter().any(|o| o != b && b.starts_with(o)));
        let mut dirs = Vec::new();
        for bind in &binds {
            let Some(cover) = covers.iter().find(|c| bind.starts_with(c)) else {
                continue;
            };
            let mut chain: Vec<&Path> = bind
                .ancestors()
                .take_while(|a| *a != cover.as_path())
                .collect();
            chain.reverse();
            dirs.extend(chain.into_iter().map(Path::to_path_buf));
        }
        dirs.sort_by_key(|d| (d.components().count(), d.clone()));
        dirs.dedup();
        Some(UnveilSpec {
            covers,
            dirs,
            binds,
        })
    }

    /// Prepared for the child: C strings and room for the bind descriptors.
    pub(crate) fn prepare(&self) -> io::Result<Unveil> {
        let c = |paths: &[PathBuf]| {
            paths
                .iter()
                .map(|p| {
                    CString::new(p.as_os_str().as_bytes())
                        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
                })
                .collect::<io::Result<Vec<_>>>()
        };
        Ok(Unveil {
            covers: c(&self.covers)?,
            dirs: c(&self.dirs)?,
            binds: c(&self.binds)?,
            fds: vec![-1; self.binds.len()],
        })
    }
}

/// An [`UnveilSpec`] ready to apply between fork and exec (no allocation there).
pub(crate) struct Unveil {
    covers: Vec<CString>,
    dirs: Vec<CString>,
    binds: Vec<CString>,
    fds: Vec<libc::c_int>,
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Unveil {
    /// Covers and binds, in the calling process's own (already unshared) mount namespace,
    /// whose mounts it first makes private so that nothing propagates to the host.
    ///
    /// # Safety
    /// Async-signal-safe: only system calls on prepared data.
    pub(crate) unsafe fn apply(&mut self) -> io::Result<()> {
        let null = std::ptr::null::<libc::c_char>();
        check(
            libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
            .into(),
        )?;
        // Detached copies of the real directories, taken before the covers hide them.
        for (bind, fd) in self.binds.iter().zip(self.fds.iter_mut()) {
            let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | AT_RECURSIVE;
            *fd = check(libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                bind.as_ptr(),
                flags,
            ))? as libc::c_int;
        }
        for cover in &self.covers {
            check(
                libc::mount(
                    c"forgeline-unveil".as_ptr(),
                    cover.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    c"mode=0755,size=64k,nr_inodes=1024".as_ptr().cast(),
                )
                .into(),
            )?;
        }
        for dir in &self.dirs {
            if libc::mkdir(dir.as_ptr(), 0o755) < 0 && *libc::__errno_location() != libc::EEXIST {
                return Err(io::Error::last_os_error());
            }
        }
        for (bind, fd) in self.binds.iter().zip(self.fds.iter()) {
            check(libc::syscall(
                libc::SYS_move_mount,
                *fd,
                c"".as_ptr(),
                libc::AT_FDCWD,
                bind.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            ))?;
            libc::close(*fd);
        }
        for cover in &self.covers {
            check(
                libc::mount(
                    null,
                    cover.as_ptr(),
                    null,
                    libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
                    std::ptr::null(),
                )
                .into(),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_the_first_blocking_directory_and_binds_the_needed_ones_back() {
        let root = tempfile::tempdir().unwrap();
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let home = root.path().join("home");
        let python = home.join(".pyenv/versions/3.11");
        std::fs::create_dir_all(python.join("lib/python3.11")).unwrap();
        std::fs::create_dir_all(root.path().join("open")).unwrap();
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
        let id = 65534;
        let paths = vec![
            python.clone(),
            python.join("lib/python3.11"),
            root.path().join("open"),
        ];
        let spec = UnveilSpec::needed(&paths, id).unwrap();
        let home = std::fs::canonicalize(&home).unwrap();
        let python = std::fs::canonicalize(&python).unwrap();
        assert_eq!(spec.covers, vec![home.clone()]);
        assert_eq!(spec.binds, vec![python.clone()]);
        assert_eq!(
            spec.dirs,
            vec![
                home.join(".pyenv"),
                home.join(".pyenv/versions"),
                python.clone()
            ]
        );
        assert_eq!(UnveilSpec::needed(&[root.path().join("open")], id), None);
    }
}
