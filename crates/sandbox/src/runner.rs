//! Starts one sandboxed Python process, feeds its stdin, captures its output within the
//! limit, enforces the wall-clock timeout, and takes the whole process tree down afterwards.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::cgroup::RunCgroup;
use crate::child::{Rlimit, SetupSpec};
use crate::isolation::IsolationPlan;
use crate::launcher;
use crate::limits::Limits;
use crate::outcome::CapturedOutput;
use crate::record::Termination;
use crate::{Error, Result};

/// The two processes between the parent and Python when there is a PID namespace (the
/// waiter and init, see `child.rs`): they count against the process limit.
const SUPERVISORS: u32 = 2;

/// How long output pipes may stay open after the process tree was killed.
const OUTPUT_GRACE: Duration = Duration::from_secs(1);

/// One process to start.
pub(crate) struct Launch {
    pub python: PathBuf,
    pub args: Vec<OsString>,
    pub workdir: PathBuf,
    pub limits: Limits,
    pub plan: Arc<IsolationPlan>,
    /// The program that starts the process (see `launcher.rs`); this process forks when None.
    pub launcher: Option<PathBuf>,
    /// What the process reads on stdin (a pipe, closed after it); `/dev/null` when None.
    pub stdin: Option<Vec<u8>>,
}

/// How the process ended, and what it printed.
#[derive(Debug)]
pub(crate) struct Finished {
    pub termination: Termination,
    /// The output as text for reports (see [`Captured::render`]).
    pub stdout: String,
    pub stderr: String,
    /// The output exactly as written, up to the limit.
    pub raw_stdout: CapturedOutput,
    pub raw_stderr: CapturedOutput,
    pub duration: Duration,
    /// Whether the run's memory cgroup killed one of its processes.
    pub oom_killed: bool,
}

/// The process tree of a run. Killing it is always safe while the waiter is not reaped: its
/// PID is then still its own and the group's ID. Dropping it kills whatever is left, so a
/// cancelled run leaves nothing behind.
struct ProcessTree {
    /// The process started (the program, or the waiter above it); None once reaped.
    leader: Option<Pid>,
    group: Option<Pid>,
    cgroup: Option<RunCgroup>,
    pid_namespace: bool,
}

impl ProcessTree {
    fn kill(&mut self) {
        // A launcher makes its group itself: killed before that, it is not yet in one.
        if let Some(leader) = self.leader {
            let _ = kill(leader, Signal::SIGKILL);
        }
        if let Some(group) = self.group {
            let _ = killpg(group, Signal::SIGKILL);
        }
        if let Some(cgroup) = &self.cgroup {
            cgroup.kill_all();
        }
    }

    /// After the waiter was reaped. With a PID namespace nothing can be left (init's exit
    /// killed the namespace). Without one, leftovers still hold the group ID, so killing the
    /// group reaches them.
    fn reaped(&mut self) {
        self.leader = None;
        if self.pid_namespace {
            self.group = None;
        }
        self.kill();
        self.group = None;
    }
}

impl Drop for ProcessTree {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The run's setup as data (for the launcher, or to prepare in this process).
fn setup_spec(launch: &Launch, cgroup: Option<&RunCgroup>) -> SetupSpec {
    let limits = &launch.limits;
    let plan = &launch.plan;
    let mut rlimits = vec![
        (Rlimit::Cpu, limits.cpu_seconds()),
        (Rlimit::AddressSpace, limits.memory_bytes),
        (Rlimit::FileSize, limits.file_size_bytes),
        (Rlimit::OpenFiles, u64::from(limits.max_open_files)),
        (Rlimit::Core, 0),
    ];
    if plan.nproc_rlimit {
        rlimits.push((
            Rlimit::Processes,
            u64::from(limits.max_processes + SUPERVISORS),
        ));
    }
    SetupSpec {
        rlimits,
        cgroup_procs: cgroup.map(RunCgroup::procs_paths).unwrap_or_default(),
        namespaces: plan.namespaces.bits(),
        run_as: plan.run_as,
        unveil: plan.unveil.clone().filter(|_| plan.run_as.is_some()),
        fs_rules: plan.fs_rules.clone(),
        workdir: launch.workdir.clone(),
        seccomp: plan.seccomp.is_some(),
    }
}

/// Gives the run directory and what is in it to the user the program runs as.
fn hand_over(workdir: &Path, id: u32) -> std::io::Result<()> {
    std::os::unix::fs::chown(workdir, Some(id), Some(id))?;
    for entry in std::fs::read_dir(workdir)? {
        std::os::unix::fs::chown(entry?.path(), Some(id), Some(id))?;
    }
    Ok(())
}

/// Spawns the process (blocking: forks or spawns the launcher, and waits for exec), with a
/// pipe for its stdin when `piped_stdin`, `/dev/null` otherwise.
fn spawn(launch: &Launch, piped_stdin: bool) -> Result<(tokio::process::Child, ProcessTree)> {
    let cgroup = match &launch.plan.cgroups {
        Some(pool) => Some(
            pool.create(
                launch.limits.max_processes + SUPERVISORS,
                Some(launch.limits.run_memory_bytes),
            )
            .map_err(|e| Error::io("create the run's cgroup", e))?,
        ),
        None => None,
    };
    if let Some(id) = launch.plan.run_as {
        hand_over(&launch.workdir, id)
            .map_err(|e| Error::io("hand the run directory to the sandbox user", e))?;
    }
    let spec = setup_spec(launch, cgroup.as_ref());
    let tmp = launch.workdir.join("tmp");
    let mut command = match &launch.launcher {
        Some(launcher) => {
            let mut command = tokio::process::Command::new(launcher);
            command.args(launcher::arguments(&spec, &launch.python).map_err(|e| {
                Error::io(
                    "pass the run's setup to the launcher",
                    std::io::Error::other(e),
                )
            })?);
            command
        }
        None => {
            let mut setup = spec
                .child_setup(launch.plan.seccomp.clone())
                .map_err(|e| Error::io("prepare the run's isolation", e))?;
            let mut command = tokio::process::Command::new(&launch.python);
            // SAFETY: ChildSetup::apply only makes async-signal-safe calls (see child.rs).
            unsafe {
                command.pre_exec(move || setup.apply());
            }
            command
        }
    };
    command
        .args(&launch.args)
        .current_dir(&launch.workdir)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", &launch.workdir)
        .env("TMPDIR", &tmp)
        .env("LANG", "C.UTF-8")
        .stdin(if piped_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = command.spawn().map_err(Error::Spawn)?;
    let group = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    let tree = ProcessTree {
        leader: group,
        group,
        cgroup,
        pid_namespace: launch
            .plan
            .namespaces
            .contains(nix::sched::CloneFlags::CLONE_NEWPID),
    };
    Ok((child, tree))
}

/// Runs the process to its end or its timeout.
pub(crate) async fn execute(mut launch: Launch) -> Result<Finished> {
    let started = Instant::now();
    let wall_time = launch.limits.wall_time;
    let output_bytes = launch.limits.output_bytes;
    let workdir = launch.workdir.clone();
    let launched = launch.launcher.is_some();
    let stdin = launch.stdin.take();
    let piped = stdin.is_some();
    let (mut child, mut tree) = tokio::task::spawn_blocking(move || spawn(&launch, piped))
        .await
        .map_err(|e| Error::io("spawn the sandboxed process", std::io::Error::other(e)))??;
    // Fed from a task of its own: a program that does not read its stdin must not block the
    // run. The pipe is closed after the bytes (end of file), or when the process is gone.
    let feeder = match (child.stdin.take(), stdin) {
        (Some(mut pipe), Some(bytes)) => Some(tokio::spawn(async move {
            let _ = pipe.write_all(&bytes).await;
            let _ = pipe.shutdown().await;
        })),
        _ => None,
    };
    let (stop, stopped) = watch::channel(false);
    let stdout = child
        .stdout
        .take()
        .map(|out| tokio::spawn(capture(out, output_bytes, stopped.clone())));
    let stderr = child
        .stderr
        .take()
        .map(|err| tokio::spawn(capture(err, output_bytes, stopped.clone())));
    let termination = match tokio::time::timeout(wall_time, child.wait()).await {
        Ok(Ok(status)) => match (status.code(), status.signal()) {
            (Some(code), _) => Termination::Exited(code),
            (None, Some(signal)) => Termination::Signaled(signal),
            (None, None) => Termination::Exited(-1),
        },
        Ok(Err(e)) => return Err(Error::io("wait for the sandboxed process", e)),
        Err(_) => {
            tree.kill();
            let _ = child.wait().await;
            Termination::TimedOut
        }
    };
    let duration = started.elapsed();
    if let Some(feeder) = feeder {
        // A process outside our reach may still hold the pipe without reading it.
        feeder.abort();
    }
    let oom_killed = tokio::task::spawn_blocking(move || {
        tree.reaped();
        let oom_kills = tree.cgroup.as_ref().map_or(0, RunCgroup::oom_kills);
        drop(tree);
        oom_kills > 0
    })
    .await
    .map_err(|e| Error::io("clean up the process tree", std::io::Error::other(e)))?;
    let mut outputs = Vec::new();
    for task in [stdout, stderr] {
        let Some(mut task) = task else {
            outputs.push((String::new(), CapturedOutput::default()));
            continue;
        };
        let captured = match tokio::time::timeout(OUTPUT_GRACE, &mut task).await {
            Ok(joined) => joined,
            Err(_) => {
                // A process outside our reach still holds the pipe: keep what was read.
                let _ = stop.send(true);
                task.await
            }
        }
        .unwrap_or_default();
        outputs.push((captured.render(&workdir), captured.exact()));
    }
    let (stderr, raw_stderr) = outputs.pop().unwrap_or_default();
    let (stdout, raw_stdout) = outputs.pop().unwrap_or_default();
    if let (true, Termination::Exited(code)) = (launched, termination) {
        if let Some(why) = launcher::failure(code, &stderr) {
            return Err(Error::Spawn(std::io::Error::other(why.to_string())));
        }
    }
    Ok(Finished {
        termination,
        stdout,
        stderr,
        raw_stdout,
        raw_stderr,
        duration,
        oom_killed,
    })
}

/// The kept head of an output stream and its full length.
#[derive(Debug, Default)]
struct Captured {
    kept: Vec<u8>,
    total: u64,
}

impl Captured {
    /// Text for reports: lossy UTF-8, work-directory paths made relative, and a marker when
    /// the stream was cut.
    fn render(&self, workdir: &Path) -> String {
        let mut text = String::from_utf8_lossy(&self.kept).into_owned();
        let prefix = format!("{}/", workdir.display());
        if text.contains(&prefix) {
            text = text.replace(&prefix, "");
        }
        if self.total > self.kept.len() as u64 {
            if !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&format!(
                "[forgeline: output truncated: {} of {} bytes kept]\n",
                self.kept.len(),
                self.total
            ));
        }
        text
    }

    /// The kept bytes as they are, for comparing runs.
    fn exact(self) -> CapturedOutput {
        CapturedOutput {
            truncated: self.total > self.kept.len() as u64,
            total_bytes: self.total,
            bytes: self.kept,
        }
    }
}

/// Reads a stream to its end, keeping the first `limit` bytes and counting the rest, which
/// is drained so that the program never blocks on a full pipe.
async fn capture(
    mut reader: impl AsyncRead + Unpin,
    limit: usize,
    mut stop: watch::Receiver<bool>,
) -> Captured {
    let mut captured = Captured::default();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        tokio::select! {
            biased;
            read = reader.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    captured.total += n as u64;
                    let room = limit.saturating_sub(captured.kept.len());
                    captured.kept.extend_from_slice(&buf[..n.min(room)]);
                }
            },
            _ = stop.changed() => break,
        }
    }
    captured
}

/// Whether a plan works here: `python -I -S -c pass` under it exits with 0. Says why not.
pub(crate) async fn trial(
    python: &Path,
    plan: Arc<IsolationPlan>,
    work_root: &Path,
    launcher: Option<&Path>,
) -> std::result::Result<(), String> {
    let quota = plan.disk_quota.then(|| Limits::default().disk_quota());
    let dir = crate::rundir::RunDir::create(work_root, quota)
        .map_err(|e| format!("create a run directory: {e}"))?;
    std::fs::create_dir(dir.path().join("tmp"))
        .map_err(|e| format!("create a run directory: {e}"))?;
    let launch = Launch {
        python: python.to_path_buf(),
        args: ["-I", "-S", "-c", "pass"].map(OsString::from).to_vec(),
        workdir: dir.path().to_path_buf(),
        limits: Limits::default(),
        plan,
        launcher: launcher.map(Path::to_path_buf),
        stdin: None,
    };
    let finished = execute(launch).await.map_err(|e| e.to_string())?;
    if finished.termination == Termination::Exited(0) {
        return Ok(());
    }
    let said = finished.stderr.lines().next().unwrap_or_default();
    Err(format!("{:?}: {said}", finished.termination))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn capture_keeps_the_head_and_counts_the_rest() {
        let data = vec![b'x'; 100_000];
        let (_stop, stopped) = watch::channel(false);
        let captured = capture(&data[..], 1000, stopped).await;
        assert_eq!(captured.kept.len(), 1000);
        assert_eq!(captured.total, 100_000);
        let text = captured.render(Path::new("/tmp/run"));
        assert!(text.ends_with("[forgeline: output truncated: 1000 of 100000 bytes kept]\n"));
        let exact = captured.exact();
        assert_eq!(exact.bytes, vec![b'x'; 1000]);
        assert_eq!((exact.total_bytes, exact.truncated), (100_000, true));
    }

    #[test]
    fn render_makes_work_directory_paths_relative() {
        let captured = Captured {
            kept: b"File \"/tmp/run-1/solution.py\", line 3\n".to_vec(),
            total: 38,
        };
        assert_eq!(
            captured.render(Path::new("/tmp/run-1")),
            "File \"solution.py\", line 3\n"
        );
        // The exact bytes keep the path, and were not cut.
        let exact = captured.exact();
        assert_eq!(exact.bytes, b"File \"/tmp/run-1/solution.py\", line 3\n");
        assert!(!exact.truncated);
    }
}
