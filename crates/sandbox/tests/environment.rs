//! The parent's environment does not reach the program, forked or launched. Alone in its test
//! binary: it sets an environment variable, which must not race with other tests' threads.

use forgeline_sandbox::{Module, Outcome, Sandbox, SandboxConfig};

#[test]
fn the_parents_environment_is_absent() {
    std::env::set_var("FORGELINE_TEST_SECRET", "hunter2");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let launchers = [
        None,
        Some(env!("CARGO_BIN_EXE_forgeline-sandbox-launch").into()),
    ];
    for launcher in launchers {
        runtime.block_on(the_environment_is_absent(launcher));
    }
}

async fn the_environment_is_absent(launcher: Option<std::path::PathBuf>) {
    let sandbox = Sandbox::new(SandboxConfig {
        launcher,
        ..SandboxConfig::default()
    })
    .await
    .unwrap();
    let code = format!(
        "import os\n\
         print(sorted(os.environ))\n\
         print(os.environ.get('FORGELINE_TEST_SECRET'))\n\
         try:\n\
         \x20   print('secret' if b'hunter2' in open('/proc/{pid}/environ', 'rb').read() else 'no secret')\n\
         except OSError:\n\
         \x20   print('denied')\n\
         print(os.environ['HOME'] == os.getcwd())\n",
        pid = std::process::id()
    );
    let module = Module::new("solution", code).unwrap();
    let report = sandbox.run_program(&module).await.unwrap();
    assert_eq!(report.outcome, Outcome::Passed, "{}", report.stderr);
    let lines: Vec<&str> = report.stdout.lines().collect();
    assert_eq!(
        lines[0], "['HOME', 'LANG', 'PATH', 'TMPDIR']",
        "{}",
        report.stdout
    );
    assert_eq!(lines[1], "None");
    assert_eq!(lines[2], "denied");
    assert_eq!(lines[3], "True");
}
