//! Servers for the `serve_*` tests: in process on 127.0.0.1:0 over the real default model
//! (`scripts/fetch-default-model` puts it in models/), or the real binary.

#![allow(dead_code)] // each test crate that includes this module uses part of it

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use forgeline_engine::device::DeviceChoice;
use forgeline_engine::loader::LoadedModel;
use forgeline_engine::registry::{Registry, DEFAULT_MODEL};
use forgeline_engine::scheduler::{LlmClient, SchedulerConfig};
use forgeline_server::client::HttpClient;
use forgeline_server::{ModelCard, Server, ServerConfig, Stopped};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Short answers and no retries: the whole job in well under a minute on two cores.
pub const FAST_JOB: &str = r#"
[limits]
max_subtasks = 1
candidates = 1
max_retries = 0
max_synthesis_retries = 0
llm_judge = false

[stages.router]
max_tokens = 32
[stages.orchestrator]
max_tokens = 96
[stages.code]
max_tokens = 96
[stages.tests]
max_tokens = 64
[stages.synthesizer]
max_tokens = 96
"#;

pub fn models_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models");
    assert!(
        dir.join("SmolLM2-135M-Instruct.Q4_1.gguf").exists(),
        "{}/SmolLM2-135M-Instruct.Q4_1.gguf is missing: run scripts/fetch-default-model",
        dir.display()
    );
    dir
}

pub fn load_default_model() -> LoadedModel {
    let loc = Registry::new(models_dir()).resolve(DEFAULT_MODEL).unwrap();
    let device = DeviceChoice::Cpu.open().unwrap();
    forgeline_engine::loader::load(&loc, &device).unwrap()
}

/// A client over the default model with these scheduler settings, and its card.
pub fn start_client(cfg: SchedulerConfig) -> (LlmClient, ModelCard) {
    let m = load_default_model();
    let card = ModelCard::of(&m);
    (LlmClient::start(vec![m], cfg).unwrap(), card)
}

/// One default-settings client shared by the tests of a test binary.
pub fn shared_client() -> (LlmClient, ModelCard) {
    static CLIENT: OnceLock<(LlmClient, ModelCard)> = OnceLock::new();
    CLIENT
        .get_or_init(|| start_client(SchedulerConfig::default()))
        .clone()
}

/// A server running in this process until `stop`.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<Stopped>>>,
}

impl TestServer {
    pub async fn start(client: LlmClient, card: ModelCard, config: ServerConfig) -> Self {
        Self::serve(Server::new(client, vec![card], config)).await
    }

    /// Runs a server built by the test (with jobs, say).
    pub async fn serve(server: Server) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(listener, async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn http(&self) -> HttpClient {
        HttpClient::new(self.addr)
    }

    /// Signals shutdown and waits for the server to end.
    pub async fn stop(self) -> Stopped {
        self.stop_within(Duration::from_secs(60)).await
    }

    /// Signals shutdown and waits up to `limit` for the server to end.
    pub async fn stop_within(mut self, limit: Duration) -> Stopped {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let t = self.task.take().expect("not stopped yet");
        tokio::time::timeout(limit, t)
            .await
            .expect("the server stops in time")
            .unwrap()
            .unwrap()
    }
}

/// `forgeline serve` as a child process, once it has said where it listens.
pub struct ServeProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// What it printed to stderr up to the address line.
    pub banner: String,
    stderr: Option<BufReader<ChildStderr>>,
    /// Its data directory, unless the test gave one (`--data-dir`).
    _data: Option<tempfile::TempDir>,
}

impl ServeProcess {
    /// Started with `args`, and a data directory of its own unless they give `--data-dir`.
    pub fn start(args: &[&str]) -> Self {
        let data = (!args.contains(&"--data-dir")).then(|| tempfile::tempdir().unwrap());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_forgeline"));
        // A test's server takes its settings from its flags alone.
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("FORGELINE_")) {
            cmd.env_remove(k);
        }
        let mut child = cmd
            .arg("serve")
            .args(["--port", "0", "--models-dir"])
            .arg(models_dir())
            .args(
                data.iter()
                    .flat_map(|d| [std::ffi::OsStr::new("--data-dir"), d.path().as_os_str()]),
            )
            .args(args)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run forgeline serve");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut banner = String::new();
        let addr = loop {
            let mut line = String::new();
            let n = stderr.read_line(&mut line).unwrap();
            banner.push_str(&line);
            if n == 0 {
                let status = child.wait().unwrap();
                panic!("forgeline serve {args:?} exited ({status}) before listening:\n{banner}");
            }
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let addr = rest.split_whitespace().next().unwrap();
                break addr.parse().unwrap();
            }
        };
        // Keep reading the rest of the banner (the auth notice) without blocking the test.
        let mut more = String::new();
        stderr.read_line(&mut more).unwrap();
        banner.push_str(&more);
        Self {
            child,
            addr,
            banner,
            stderr: Some(stderr),
            _data: data,
        }
    }

    /// SIGKILL: no grace period, no last writes.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends SIGTERM and returns the exit code and the rest of stderr.
    pub fn terminate(mut self) -> (Option<i32>, String) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let mut rest = String::new();
        if let Some(mut s) = self.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut s, &mut rest);
        }
        let status = self.child.wait().unwrap();
        (status.code(), rest)
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of a Prometheus sample line `name{labels} value` (the first that matches).
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}
