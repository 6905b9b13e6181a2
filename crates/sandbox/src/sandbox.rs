//! [`Sandbox`]: set up once (interpreter, harness, isolation), then runs jobs in parallel up
//! to a limit.

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sched::CloneFlags;
use tokio::sync::Semaphore;

use crate::cgroup::CgroupPool;
use crate::checks::{Check, InputFile, Job};
use crate::harness::HarnessDir;
use crate::isolation::{
    namespace_candidates, seccomp_programs, FsRules, IsolationLevel, IsolationPlan,
    IsolationReport, LandlockState,
};
use crate::limits::Limits;
use crate::outcome::{Outcome, RunReport};
use crate::python::{self, PythonInfo};
use crate::record::{self, RecordFile};
use crate::rundir::{self, RunDir};
use crate::runner::{self, Launch};
use crate::unveil::UnveilSpec;
use crate::{Error, Result};

/// How the sandbox is set up.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// The interpreter; `python3` on PATH when None.
    pub python: Option<PathBuf>,
    /// Limits of each run, unless a [`Job`] brings its own.
    pub limits: Limits,
    /// Runs at once; 0 means one per CPU.
    pub max_parallel: usize,
    /// Refuse to run anything unless isolation is [`IsolationLevel::Full`].
    pub require_full_isolation: bool,
    /// Import `site` as Python normally does, running the `.pth` files of site-packages. Off
    /// by default: runs start with `-S` and add site-packages to `sys.path` themselves, so
    /// installed packages import the same, and start-up is much faster where a `.pth` file
    /// imports something.
    pub process_pth_files: bool,
    /// Where run directories are created; the system's temporary directory when None.
    pub work_root: Option<PathBuf>,
    /// The program that starts each run (see [`launcher`](crate::launcher)); each run forks
    /// this process when None. The default is this program when its `main` called
    /// [`launcher::run_if_requested`](crate::launcher::run_if_requested), else None. A
    /// launcher that cannot run Python is an error at set-up, except this default one, which
    /// falls back to forking with a warning.
    pub launcher: Option<PathBuf>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            python: None,
            limits: Limits::default(),
            max_parallel: 0,
            require_full_isolation: false,
            process_pth_files: false,
            work_root: None,
            launcher: crate::launcher::registered(),
        }
    }
}

/// Runs untrusted Python. Cheap to clone; clones share the parallelism limit.
#[derive(Debug, Clone)]
pub struct Sandbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: SandboxConfig,
    work_root: PathBuf,
    python: PythonInfo,
    harness: HarnessDir,
    plan: Arc<IsolationPlan>,
    isolation: IsolationReport,
    permits: Semaphore,
    max_parallel: usize,
}

impl Sandbox {
    /// Finds and checks the interpreter, installs the harness, and finds out which isolation
    /// this machine allows (a few trial runs).
    pub async fn new(mut config: SandboxConfig) -> Result<Sandbox> {
        config.limits.validate()?;
        let python = python::probe(config.python.as_deref()).await?;
        let work_root = config.work_root.clone().unwrap_or_else(std::env::temp_dir);
        let site_dirs = if config.process_pth_files {
            Vec::new()
        } else {
            python.site_packages.clone()
        };
        let harness = HarnessDir::install(&work_root, &python, &site_dirs).await?;
        if let Some(launcher) = &config.launcher {
            if let Err(e) = check_launcher(&python, launcher, &work_root).await {
                // This program registered itself but cannot be re-run (started through a
                // loader, say): fork instead. A launcher the caller chose is theirs to fix.
                if crate::launcher::registered().as_ref() != Some(launcher) {
                    return Err(e);
                }
                tracing::warn!(error = %e, "starting sandbox runs by forking instead");
                config.launcher = None;
            }
        }
        let (plan, isolation) = probe_isolation(
            &python,
            harness.path(),
            &work_root,
            config.launcher.as_deref(),
        )
        .await;
        check_required(&isolation, config.require_full_isolation)?;
        let max_parallel = if config.max_parallel == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            config.max_parallel
        };
        Ok(Sandbox {
            inner: Arc::new(Inner {
                config,
                work_root,
                python,
                harness,
                plan: Arc::new(plan),
                isolation,
                permits: Semaphore::new(max_parallel),
                max_parallel,
            }),
        })
    }

    /// The isolation every run gets.
    pub fn isolation(&self) -> &IsolationReport {
        &self.inner.isolation
    }

    pub fn python(&self) -> &PythonInfo {
        &self.inner.python
    }

    /// The default limits of a run.
    pub fn limits(&self) -> &Limits {
        &self.inner.config.limits
    }

    /// How many runs go at once.
    pub fn max_parallel(&self) -> usize {
        self.inner.max_parallel
    }

    /// Runs one job in a fresh directory, removed afterwards. Waits (asynchronously) while
    /// the parallelism limit is reached.
    pub async fn run(&self, job: Job) -> Result<RunReport> {
        job.validate()?;
        let limits = job
            .limits
            .clone()
            .unwrap_or_else(|| self.inner.config.limits.clone());
        limits.validate()?;
        let _permit = self
            .inner
            .permits
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let inner = &self.inner;
        let work_root = inner.work_root.clone();
        let prepared = job.clone();
        let quota = inner.plan.disk_quota.then(|| limits.disk_quota());
        let workdir = tokio::task::spawn_blocking(move || prepare(&work_root, &prepared, quota))
            .await
            .map_err(|e| Error::io("prepare the run directory", std::io::Error::other(e)))??;
        let launch = Launch {
            python: inner.python.executable.clone(),
            args: self.arguments(&job, workdir.path()),
            workdir: workdir.path().to_path_buf(),
            limits: limits.clone(),
            plan: inner.plan.clone(),
            launcher: inner.config.launcher.clone(),
            stdin: job.stdin.clone(),
        };
        let finished = runner::execute(launch).await;
        // Read the record and remove the directory off the async threads.
        let keep = job.keep.clone();
        let inputs = job.input_files.clone();
        let (bytes, files) = tokio::task::spawn_blocking(move || {
            let bytes = read_record(workdir.path());
            let files = kept_files(workdir.path(), &keep, &inputs);
            drop(workdir);
            (bytes, files)
        })
        .await
        .map_err(|e| Error::io("read the result record", std::io::Error::other(e)))?;
        let record = bytes.and_then(|bytes| match RecordFile::parse(&bytes) {
            Ok(file) => Some(file),
            // The code under test can write there too; an unreadable record is no record.
            Err(e) => {
                tracing::warn!(error = %e, "ignoring an unreadable result record");
                None
            }
        });
        let finished = finished?;
        let (record, tests) = match record {
            Some(file) => (Some(file.record), file.tests),
            None => (None, None),
        };
        let program = matches!(job.check, Check::Run);
        let mut outcome = record::decide(
            finished.termination,
            record,
            program,
            &limits,
            &finished.stderr,
        )?;
        // The memory cgroup killed a process: whatever followed (a SIGKILL, a broken pipe in
        // the parent) comes from the limit.
        if finished.oom_killed && outcome != Outcome::Passed {
            outcome = Outcome::MemoryLimit {
                limit_bytes: limits.run_memory_bytes,
            };
        }
        Ok(RunReport {
            outcome,
            tests,
            duration: finished.duration,
            stdout: finished.stdout,
            stderr: finished.stderr,
            raw_stdout: finished.raw_stdout,
            raw_stderr: finished.raw_stderr,
            isolation: inner.isolation.clone(),
            files,
        })
    }

    fn arguments(&self, job: &Job, workdir: &Path) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["-I".into(), "-B".into()];
        if !self.inner.config.process_pth_files {
            args.push("-S".into());
        }
        args.push(self.inner.harness.entry().into());
        args.push(job.check.harness_mode().into());
        args.push(workdir.into());
        args.push(job.module.name().into());
        match &job.check {
            Check::Tests(tests) => {
                args.push(tests.file_name().into());
                args.push(tests.kind().harness_name().into());
                args.push(tests.entry_point().unwrap_or("").into());
            }
            _ => args.extend(["".into(), "auto".into(), "".into()]),
        }
        // The program's own, after the harness's six: `sys.argv[1:]` as the program sees it.
        args.extend(job.args.iter().map(OsString::from));
        args
    }
}

/// Refuses less than full isolation when it is required; warns about it otherwise.
fn check_required(isolation: &IsolationReport, required: bool) -> Result<()> {
    if isolation.level == IsolationLevel::Full {
        return Ok(());
    }
    if required {
        return Err(Error::IsolationUnavailable {
            missing: isolation.missing.join("; "),
        });
    }
    tracing::warn!(missing = ?isolation.missing, "sandbox runs with partial isolation");
    Ok(())
}

/// A fresh run directory with the module, the tests, the input files, and `tmp/` (the run's
/// TMPDIR). Each file is created new, never through a link; the runner then hands them all
/// to the sandbox user.
fn prepare(work_root: &Path, job: &Job, quota: Option<rundir::DiskQuota>) -> Result<RunDir> {
    let dir = RunDir::create(work_root, quota).map_err(|e| {
        Error::io(
            format!("create a run directory in {}", work_root.display()),
            e,
        )
    })?;
    let write = |name: &str, source: &[u8]| {
        rundir::write_new(dir.path(), name, source)
            .map_err(|e| Error::io(format!("write {name}"), e))
    };
    write(&job.module.file_name(), job.module.source())?;
    if let Check::Tests(tests) = &job.check {
        write(tests.file_name(), tests.source())?;
    }
    for file in &job.input_files {
        write(&file.name, &file.bytes)?;
    }
    std::fs::create_dir(dir.path().join("tmp"))
        .map_err(|e| Error::io("create the run's tmp directory", e))?;
    Ok(dir)
}

/// Finds the strongest isolation that works here, one layer at a time, each confirmed by a
/// trial run.
/// A launcher that does not start Python even without isolation is an error of its own: the
/// probe would otherwise find every plan failing and report no isolation.
async fn check_launcher(python: &PythonInfo, launcher: &Path, work_root: &Path) -> Result<()> {
    let plan = Arc::new(IsolationPlan::nothing());
    runner::trial(&python.executable, plan, work_root, Some(launcher))
        .await
        .map_err(|why| {
            Error::Spawn(std::io::Error::other(format!(
                "the sandbox launcher {} did not run Python ({why}); a launcher calls \
                 forgeline_sandbox::launcher::run_if_requested first in main",
                launcher.display()
            )))
        })
}

async fn probe_isolation(
    python: &PythonInfo,
    harness_dir: &Path,
    work_root: &Path,
    launcher: Option<&Path>,
) -> (IsolationPlan, IsolationReport) {
    let exe = python.executable.as_path();
    let root = nix::unistd::geteuid().is_root();
    let works = |plan: &IsolationPlan| {
        let trial = runner::trial(exe, Arc::new(plan.clone()), work_root, launcher);
        async move {
            trial
                .await
                .inspect_err(|why| {
                    tracing::debug!(%why, "an isolation trial failed");
                })
                .is_ok()
        }
    };

    let mut plan = IsolationPlan::nothing();
    if root {
        // The program keeps no capability: what it needs must be readable to the sandbox
        // user as it is, or be made so in its own mount namespace.
        let mut needed: Vec<PathBuf> = python.prefixes.clone();
        needed.extend(python.path.iter().cloned());
        needed.extend(python.site_packages.iter().cloned());
        needed.extend(python.executable.parent().map(Path::to_path_buf));
        needed.push(harness_dir.to_path_buf());
        needed.push(work_root.to_path_buf());
        needed.retain(|p| p.is_dir());
        plan.unveil = UnveilSpec::needed(&needed, crate::isolation::SANDBOX_ID);
    }
    for (namespaces, run_as) in namespace_candidates(root) {
        plan.namespaces = namespaces;
        plan.run_as = run_as;
        if (namespaces.is_empty() && run_as.is_none()) || works(&plan).await {
            break;
        }
    }

    let rules = FsRules::new(python, harness_dir);
    let landlock = {
        let rules = rules.clone();
        tokio::task::spawn_blocking(move || rules.enforcement())
            .await
            .unwrap_or(LandlockState::Unavailable)
    };
    if landlock != LandlockState::Unavailable {
        plan.fs_rules = Some(rules);
        if !works(&plan).await {
            tracing::warn!("Landlock is available but a run under it failed; not using it");
            plan.fs_rules = None;
        }
    }

    match seccomp_programs() {
        Ok(programs) => {
            plan.seccomp = Some(Arc::new(programs));
            if !works(&plan).await {
                plan.seccomp = None;
            }
        }
        Err(e) => tracing::warn!(error = %e, "no seccomp filter for this architecture"),
    }

    if root {
        let root_dir = work_root.to_path_buf();
        if tokio::task::spawn_blocking(move || rundir::quota_works(&root_dir))
            .await
            .unwrap_or(false)
        {
            plan.disk_quota = true;
            if !works(&plan).await {
                plan.disk_quota = false;
            }
        }
        if let Ok(Some(pool)) = tokio::task::spawn_blocking(CgroupPool::detect).await {
            plan.cgroups = Some(Arc::new(pool));
            if !works(&plan).await {
                plan.cgroups = None;
            }
        }
    } else if plan.namespaces.contains(CloneFlags::CLONE_NEWUSER) {
        plan.nproc_rlimit = true;
        if !works(&plan).await {
            plan.nproc_rlimit = false;
        }
    }
    let report = IsolationReport::of(&plan, landlock);
    (plan, report)
}

/// The largest result record read; a bigger one is a broken record.
const MAX_RECORD_BYTES: u64 = 16 << 20;

/// The harness's record, when the run left a readable one. The program can write there too:
/// a FIFO, a link (to /dev/zero, say) or an oversized file is no record.
fn read_record(dir: &Path) -> Option<Vec<u8>> {
    match rundir::read_capped(&dir.join(".forgeline-result.json"), MAX_RECORD_BYTES) {
        Ok(bytes) => Some(bytes),
        Err(rundir::ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring an unreadable result record");
            None
        }
    }
}

/// The files with one of these extensions in `dir` and its subdirectories (one level),
/// regular files only (a link could point anywhere; a FIFO would block), within the count
/// and size caps, leaving out the job's input files that the program left as they were.
/// Nothing is followed: directories and files are opened relative to their parent's
/// descriptor with O_NOFOLLOW.
fn kept_files(
    dir: &Path,
    extensions: &[String],
    inputs: &[InputFile],
) -> Vec<crate::outcome::KeptFile> {
    const MAX_FILES: usize = 32;
    const MAX_BYTES: u64 = 16 << 20;
    let mut out = Vec::new();
    if extensions.is_empty() {
        return out;
    }
    let mut total = 0u64;
    let mut dirs = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = dirs.pop() {
        let Ok((fd, entries)) = rundir::list(&d) else {
            continue;
        };
        for (name, is_dir) in entries {
            let path = d.join(&name);
            if is_dir {
                if depth == 0 && name != "tmp" {
                    dirs.push((path, 1));
                }
                continue;
            }
            let wanted = path
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| extensions.iter().any(|k| k.eq_ignore_ascii_case(x)));
            if !wanted || out.len() == MAX_FILES {
                continue;
            }
            let room = MAX_BYTES - total;
            let Ok(bytes) = rundir::read_capped_at(fd.as_raw_fd(), &name, room) else {
                continue;
            };
            let unchanged_input = depth == 0
                && inputs
                    .iter()
                    .any(|f| name.as_encoded_bytes() == f.name.as_bytes() && f.bytes == bytes);
            if unchanged_input {
                continue;
            }
            total += bytes.len() as u64;
            out.push(crate::outcome::KeptFile {
                name: path
                    .strip_prefix(dir)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .into_owned(),
                size: bytes.len() as u64,
                bytes,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_isolation_is_refused_only_when_full_is_required() {
        let partial = IsolationReport::of(
            &IsolationPlan {
                namespaces: CloneFlags::CLONE_NEWNET,
                ..IsolationPlan::nothing()
            },
            LandlockState::Unavailable,
        );
        assert_eq!(partial.level, IsolationLevel::Partial);
        assert!(check_required(&partial, false).is_ok());
        let err = check_required(&partial, true).unwrap_err();
        assert!(matches!(err, Error::IsolationUnavailable { .. }));
        assert!(err.to_string().contains("Landlock"), "{err}");
    }

    #[tokio::test]
    async fn full_isolation_can_be_required_where_it_is_available() {
        let sandbox = Sandbox::new(SandboxConfig::default()).await.unwrap();
        let required = Sandbox::new(SandboxConfig {
            require_full_isolation: true,
            ..SandboxConfig::default()
        })
        .await;
        match sandbox.isolation().level {
            IsolationLevel::Full => assert!(required.is_ok()),
            _ => assert!(matches!(required, Err(Error::IsolationUnavailable { .. }))),
        }
    }

    #[test]
    fn input_files_are_kept_only_when_the_program_changed_them() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let input = |name: &str, bytes: &[u8]| InputFile {
            name: name.into(),
            bytes: bytes.to_vec(),
        };
        std::fs::write(d.join("data.csv"), b"a\n1\n").unwrap();
        std::fs::write(d.join("edited.csv"), b"a\n2\n").unwrap();
        std::fs::write(d.join("out.csv"), b"a\n").unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/data.csv"), b"a\n1\n").unwrap();
        let inputs = [input("data.csv", b"a\n1\n"), input("edited.csv", b"a\n1\n")];
        let mut names: Vec<String> = kept_files(d, &["csv".into()], &inputs)
            .into_iter()
            .map(|f| f.name)
            .collect();
        names.sort();
        assert_eq!(names, vec!["edited.csv", "out.csv", "sub/data.csv"]);
    }

    #[test]
    fn kept_files_are_the_asked_extensions_one_level_deep() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("plot.png"), b"png").unwrap();
        std::fs::write(d.join("solution.py"), b"x = 1").unwrap();
        std::fs::create_dir_all(d.join("figures/deeper")).unwrap();
        std::fs::write(d.join("figures/hist.PNG"), b"png2").unwrap();
        std::fs::write(d.join("figures/deeper/too_deep.png"), b"no").unwrap();
        std::fs::create_dir(d.join("tmp")).unwrap();
        std::fs::write(d.join("tmp/scratch.png"), b"no").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.join("link.png")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", d.join("zero.png")).unwrap();
        std::os::unix::fs::symlink(d.join("figures"), d.join("linked")).unwrap();
        nix::unistd::mkfifo(&d.join("fifo.png"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let mut names: Vec<String> = kept_files(d, &["png".into()], &[])
            .into_iter()
            .map(|f| f.name)
            .collect();
        names.sort();
        assert_eq!(names, vec!["figures/hist.PNG", "plot.png"]);
        assert!(kept_files(d, &[], &[]).is_empty());
    }
}
