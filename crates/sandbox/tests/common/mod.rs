//! Shared set-up of the integration tests: one sandbox per test binary.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use forgeline_sandbox::{Limits, Module, RunReport, Sandbox, SandboxConfig, TestSuite};
use tokio::sync::OnceCell;

static SANDBOX: OnceCell<Sandbox> = OnceCell::const_new();

/// Limits short enough for hostile tests to end quickly.
pub fn test_limits() -> Limits {
    Limits {
        wall_time: Duration::from_secs(5),
        cpu_time: Duration::from_secs(4),
        memory_bytes: 512 << 20,
        ..Limits::default()
    }
}

/// How this test binary's runs start: forked from the test process in test binaries named
/// `*_forked`, by the launcher (as forgeline starts them) in the others.
pub fn launcher() -> Option<PathBuf> {
    if env!("CARGO_CRATE_NAME").ends_with("_forked") {
        None
    } else {
        Some(env!("CARGO_BIN_EXE_forgeline-sandbox-launch").into())
    }
}

pub async fn sandbox() -> &'static Sandbox {
    SANDBOX
        .get_or_init(|| async {
            Sandbox::new(SandboxConfig {
                limits: test_limits(),
                launcher: launcher(),
                ..SandboxConfig::default()
            })
            .await
            .expect("the sandbox sets up")
        })
        .await
}

pub fn module(source: &str) -> Module {
    Module::new("solution", source).unwrap()
}

pub async fn run(source: &str) -> RunReport {
    sandbox().await.run_program(&module(source)).await.unwrap()
}

pub async fn test(source: &str, tests: &str) -> RunReport {
    let suite = TestSuite::new("test_solution.py", tests).unwrap();
    sandbox()
        .await
        .run_tests(&module(source), &suite)
        .await
        .unwrap()
}

/// The report as the test failure message.
pub fn show(report: &RunReport) -> String {
    format!(
        "outcome: {}\n{:#?}\nstdout: {}\nstderr: {}",
        report.outcome, report.outcome, report.stdout, report.stderr
    )
}
