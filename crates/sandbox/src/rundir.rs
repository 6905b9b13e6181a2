//! A run's directory: created fresh, optionally backed by a size- and inode-limited tmpfs (the
//! run's disk quota), read back safely after the run, and removed without recursion.
//!
//! Everything in it was written by untrusted code, so nothing here trusts its shape: removal
//! walks any depth with a constant stack and never follows a link, and reads open only regular
//! files, without following links or blocking, up to a cap. The files placed there before
//! the run (the module, the tests, input files) are created new, never through a link.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use nix::libc;

/// A run directory; unmounted (when it is a tmpfs) and removed when dropped.
#[derive(Debug)]
pub(crate) struct RunDir {
    path: PathBuf,
    mounted: bool,
}

/// The size and inode limits of a run directory's tmpfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DiskQuota {
    pub bytes: u64,
    pub inodes: u64,
}

impl RunDir {
    /// A fresh directory `forgeline-run-{pid}-XXXXXX` in `work_root`, with a tmpfs of `quota`
    /// mounted on it when given (which needs root).
    pub(crate) fn create(work_root: &Path, quota: Option<DiskQuota>) -> io::Result<RunDir> {
        let path = tempfile::Builder::new()
            .prefix(&format!("forgeline-run-{}-", std::process::id()))
            .tempdir_in(work_root)?
            .keep();
        let mut dir = RunDir {
            path,
            mounted: false,
        };
        if let Some(quota) = quota {
            mount_tmpfs(&dir.path, quota)?;
            dir.mounted = true;
        }
        Ok(dir)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.mounted {
            // Detached: a process that still holds a file open there cannot keep it mounted.
            let unmounted = cstr(self.path.as_os_str()).and_then(|path| {
                // SAFETY: a valid C string.
                check(unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) })
            });
            if let Err(e) = unmounted {
                tracing::warn!(dir = %self.path.display(), error = %e, "could not unmount a run directory");
                return;
            }
        }
        if let Err(e) = remove_tree(&self.path) {
            tracing::warn!(dir = %self.path.display(), error = %e, "could not remove a run directory");
        }
    }
}

/// Mounts a private tmpfs limited to `quota` on `dir`, mode 0700 (the run's user gets it).
fn mount_tmpfs(dir: &Path, quota: DiskQuota) -> io::Result<()> {
    let options = CString::new(format!(
        "size={},nr_inodes={},mode=0700",
        quota.bytes.max(4096),
        quota.inodes.max(16)
    ))
    .expect("no NUL in numbers");
    let target = cstr(dir.as_os_str())?;
    // SAFETY: valid C strings.
    check(unsafe {
        libc::mount(
            c"forgeline-run".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            options.as_ptr().cast(),
        )
    })?;
    Ok(())
}

/// Creates the file `name` in the directory `dir` with `bytes`, mode 0644: the directory is
/// opened without following a link, and the file must not exist yet (`O_EXCL`), so nothing
/// already there, a link least of all, is written through. `name` is a plain file name.
pub(crate) fn write_new(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = open_dir_at(libc::AT_FDCWD, &cstr(dir.as_os_str())?)?;
    let name = cstr(OsStr::new(name))?;
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: a valid C string; the fd is owned from here on.
    let fd = check(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, 0o644) })?;
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.write_all(bytes)
}

/// Whether this process can give run directories a tmpfs quota (it needs to mount).
pub(crate) fn quota_works(work_root: &Path) -> bool {
    let quota = DiskQuota {
        bytes: 1 << 20,
        inodes: 64,
    };
    RunDir::create(work_root, Some(quota)).is_ok()
}

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Opens `name` in `dir` as a directory, never following a link.
fn open_dir_at(dir: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: a valid C string; the fd is owned from here on.
    let fd = check(unsafe { libc::openat(dir, name.as_ptr(), flags) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The entries of a directory (without `.` and `..`), each with whether it is a directory
/// (not following links).
fn entries(dir: &OwnedFd) -> io::Result<Vec<(CString, bool)>> {
    // fdopendir takes the descriptor it is given: give it a copy.
    let copy = check(unsafe { libc::fcntl(dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: `copy` is a fresh directory descriptor; closedir closes it.
    let stream = unsafe { libc::fdopendir(copy) };
    if stream.is_null() {
        let err = io::Error::last_os_error();
        unsafe { libc::close(copy) };
        return Err(err);
    }
    unsafe { libc::rewinddir(stream) };
    let mut out = Vec::new();
    loop {
        // SAFETY: the stream is open; the entry lives until the next readdir.
        let entry = unsafe { libc::readdir(stream) };
        if entry.is_null() {
            break;
        }
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        if name == c"." || name == c".." {
            continue;
        }
        let kind = unsafe { (*entry).d_type };
        let is_dir = match kind {
            libc::DT_DIR => true,
            libc::DT_UNKNOWN => {
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                let r = unsafe {
                    libc::fstatat(
                        dir.as_raw_fd(),
                        name.as_ptr(),
                        &mut st,
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                };
                r == 0 && st.st_mode & libc::S_IFMT == libc::S_IFDIR
            }
            _ => false,
        };
        out.push((name.to_owned(), is_dir));
    }
    unsafe { libc::closedir(stream) };
    Ok(out)
}

/// Removes `path` and everything under it, at any depth, with a constant stack and two open
/// descriptors at most. Links are removed, never followed. Directories the run made
/// unreadable or unwritable (mode 000) are made accessible first. The tree must not change
/// meanwhile (the run's processes are gone).
pub(crate) fn remove_tree(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return std::fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    let _ = std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o700));
    let mut current = open_dir_at(libc::AT_FDCWD, &cstr(path.as_os_str())?)?;
    // The names from `path` down to `current`.
    let mut trail: Vec<CString> = Vec::new();
    loop {
        let mut subdir = None;
        for (name, is_dir) in entries(&current)? {
            if is_dir {
                subdir = Some(name);
                break;
            }
            // SAFETY: a valid C string relative to an open directory.
            check(unsafe { libc::unlinkat(current.as_raw_fd(), name.as_ptr(), 0) })?;
        }
        match subdir {
            Some(name) => {
                // A run may have left it mode 000; root passes anyway, others need the bits.
                unsafe { libc::fchmodat(current.as_raw_fd(), name.as_ptr(), 0o700, 0) };
                let child = open_dir_at(current.as_raw_fd(), &name)?;
                current = child;
                trail.push(name);
            }
            None => {
                let Some(name) = trail.pop() else { break };
                let parent = open_dir_at(current.as_raw_fd(), c"..")?;
                current = parent;
                check(unsafe {
                    libc::unlinkat(current.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR)
                })?;
            }
        }
    }
    drop(current);
    std::fs::remove_dir(path)
}

/// Why a file of the run directory was not read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a regular file")]
    NotRegular,
    #[error("larger than {0} bytes")]
    TooLarge(u64),
}

/// Reads `name` in the open directory `dir` if it is a regular file of at most `cap` bytes:
/// opened without following a link and without blocking (a FIFO never hangs), checked with
/// fstat, and read only up to `cap + 1` bytes whatever it claims.
pub(crate) fn read_capped_at(dir: RawFd, name: &OsStr, cap: u64) -> Result<Vec<u8>, ReadError> {
    let name = cstr(name)?;
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
    // SAFETY: a valid C string; the fd is owned from here on.
    let fd = check(unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_NOCTTY) })?;
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(ReadError::NotRegular);
    }
    if meta.len() > cap {
        return Err(ReadError::TooLarge(cap));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(ReadError::TooLarge(cap));
    }
    Ok(bytes)
}

/// [`read_capped_at`] for a path: its directory is opened without following a link too.
pub(crate) fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, ReadError> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().ok_or(ReadError::NotRegular)?;
    let dir = open_dir_at(libc::AT_FDCWD, &cstr(parent.as_os_str())?)?;
    read_capped_at(dir.as_raw_fd(), name, cap)
}

/// The entries of `dir` (a path, not followed if a link), sorted, with whether each is a
/// directory; for walking a run directory after the run.
pub(crate) fn list(dir: &Path) -> io::Result<(OwnedFd, Vec<(OsString, bool)>)> {
    let fd = open_dir_at(libc::AT_FDCWD, &cstr(dir.as_os_str())?)?;
    let mut found: Vec<(OsString, bool)> = entries(&fd)?
        .into_iter()
        .map(|(name, is_dir)| (OsString::from_vec(name.into_bytes()), is_dir))
        .collect();
    found.sort();
    Ok((fd, found))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A chain of `depth` directories under `root`, made by mkdir + rename so that no path
    /// ever gets long (as a hostile program would).
    fn deep_chain(root: &Path, depth: usize) {
        let mut current = open_dir_at(libc::AT_FDCWD, &cstr(root.as_os_str()).unwrap()).unwrap();
        for _ in 0..depth {
            let fd = current.as_raw_fd();
            unsafe {
                assert_eq!(libc::mkdirat(fd, c"d".as_ptr(), 0o755), 0);
                let file = libc::openat(fd, c"f".as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644);
                assert!(file >= 0);
                libc::close(file);
            }
            current = open_dir_at(fd, c"d").unwrap();
        }
    }

    #[test]
    fn removes_a_tree_deeper_than_any_stack_on_a_small_stack() {
        let root = tempfile::tempdir().unwrap();
        let top = root.path().join("run");
        std::fs::create_dir(&top).unwrap();
        deep_chain(&top, 15_000);
        // std::fs::remove_dir_all recurses; 64 KiB of stack would not last 15,000 levels.
        let target = top.clone();
        std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(move || remove_tree(&target))
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        assert!(!top.exists());
    }

    #[test]
    fn removes_unreadable_directories_and_never_follows_links() {
        let root = tempfile::tempdir().unwrap();
        let outside = root.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"keep").unwrap();
        let top = root.path().join("run");
        std::fs::create_dir_all(top.join("a/locked/inner")).unwrap();
        std::fs::write(top.join("a/locked/inner/f"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, top.join("a/link")).unwrap();
        std::os::unix::fs::symlink(&outside, top.join("a/locked/link")).unwrap();
        for dir in ["a/locked/inner", "a/locked", "a"] {
            std::fs::set_permissions(top.join(dir), std::fs::Permissions::from_mode(0o000))
                .unwrap();
        }
        remove_tree(&top).unwrap();
        assert!(!top.exists());
        assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"keep");
    }

    #[test]
    fn new_files_are_never_written_through_what_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_new(d, "data.csv", b"a,b\n").unwrap();
        assert_eq!(std::fs::read(d.join("data.csv")).unwrap(), b"a,b\n");
        let mode = std::fs::metadata(d.join("data.csv"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
        // An existing file is not replaced, and a link (even a dangling one) not followed.
        assert!(write_new(d, "data.csv", b"other").is_err());
        assert_eq!(std::fs::read(d.join("data.csv")).unwrap(), b"a,b\n");
        let target = d.join("target");
        std::os::unix::fs::symlink(&target, d.join("link")).unwrap();
        assert!(write_new(d, "link", b"x").is_err());
        assert!(!target.exists());
        // Nor is a directory reached through a link.
        let real = d.join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, d.join("linked")).unwrap();
        assert!(write_new(&d.join("linked"), "f", b"x").is_err());
        assert!(!real.join("f").exists());
    }

    #[test]
    fn capped_reads_refuse_fifos_links_and_large_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("small"), b"hello").unwrap();
        assert_eq!(read_capped(&d.join("small"), 5).unwrap(), b"hello");
        assert!(matches!(
            read_capped(&d.join("small"), 4),
            Err(ReadError::TooLarge(4))
        ));
        nix::unistd::mkfifo(&d.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(matches!(
            read_capped(&d.join("fifo"), 100),
            Err(ReadError::NotRegular)
        ));
        std::os::unix::fs::symlink("/dev/zero", d.join("zero")).unwrap();
        assert!(read_capped(&d.join("zero"), 100).is_err());
        std::os::unix::fs::symlink(d.join("small"), d.join("link")).unwrap();
        assert!(read_capped(&d.join("link"), 100).is_err());
    }
}
