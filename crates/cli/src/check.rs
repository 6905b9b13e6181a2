//! `forgeline check FILE.py [--tests T] [--doctest] [--timeout S] [--json]`: runs a Python file
//! through the sandbox's checks and says what happened.
//!
//! Exit codes: 0 when every check passed, 1 when the code failed one, and an error (which the
//! caller turns into 2) when the input is unusable: a missing file, a bad option.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use forgeline_sandbox::{
    Check, IsolationLevel, Job, Module, Outcome, RunReport, Sandbox, SandboxConfig, TestKind,
    TestSuite,
};

/// How `--tests` is run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestKindArg {
    /// Decided from the test file.
    Auto,
    /// Top-level asserts.
    Script,
    Unittest,
    Pytest,
    /// HumanEval style: check(candidate), with --entry-point.
    Check,
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// The Python file to check. Without --tests or --doctest it is run as a program.
    pub file: PathBuf,
    /// A test file to run against FILE, which it imports by FILE's module name
    /// (`from solution import add` for solution.py).
    #[arg(long, value_name = "TESTS.py")]
    pub tests: Option<PathBuf>,
    /// Run the examples in FILE's docstrings (`>>> f(1)` followed by `2`).
    #[arg(long)]
    pub doctest: bool,
    /// Only check that FILE parses; run nothing.
    #[arg(long, conflicts_with_all = ["tests", "doctest"])]
    pub syntax_only: bool,
    /// Wall-clock limit of each run, in seconds.
    #[arg(long, value_name = "S", default_value_t = 10.0)]
    pub timeout: f64,
    /// Print the typed outcome as JSON.
    #[arg(long)]
    pub json: bool,
    /// Refuse to run anything unless full OS-level isolation is available.
    #[arg(long)]
    pub require_isolation: bool,
    /// The function that check(candidate) tests receive (HumanEval style).
    #[arg(long, value_name = "NAME")]
    pub entry_point: Option<String>,
    /// How to run --tests.
    #[arg(long, value_enum, default_value_t = TestKindArg::Auto)]
    pub test_kind: TestKindArg,
    /// The Python interpreter to use (default: python3 on PATH).
    #[arg(long, value_name = "PATH")]
    pub python: Option<PathBuf>,
}

pub async fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let timeout = forgeline_sandbox::Limits::timeout_from_secs(args.timeout)
        .map_err(|e| crate::usage(format!("--timeout: {e}")))?;
    let source = read(&args.file)?;
    let module_file = file_name(&args.file)?;
    let tests = match &args.tests {
        Some(path) => {
            let suite = TestSuite::new(&file_name(path)?, read(path)?)
                .with_context(|| format!("{}", path.display()))?
                .with_kind(test_kind(args.test_kind));
            Some(match &args.entry_point {
                Some(name) => suite.with_entry_point(name)?,
                None => suite,
            })
        }
        None => None,
    };
    let module = match Module::from_file_name(&module_file, source.clone()) {
        Ok(module) => module,
        // A file that nothing imports may have any name.
        Err(_) if tests.is_none() => Module::new("solution", source)?,
        Err(e) => return Err(e).with_context(|| format!("{}", args.file.display())),
    };

    let mut checks = Vec::new();
    if args.syntax_only {
        checks.push(Check::Syntax);
    }
    if let Some(tests) = tests {
        checks.push(Check::Tests(tests));
    }
    if args.doctest {
        checks.push(Check::Doctest);
    }
    if checks.is_empty() {
        checks.push(Check::Run);
    }

    let config = SandboxConfig {
        python: args.python.clone(),
        require_full_isolation: args.require_isolation,
        ..SandboxConfig::default()
    };
    let sandbox = Sandbox::new(config).await?;
    let limits = sandbox.limits().clone().with_timeout(timeout);
    if !args.json && sandbox.isolation().level != IsolationLevel::Full {
        eprintln!(
            "warning: partial isolation, missing: {}",
            sandbox.isolation().missing.join("; ")
        );
    }

    let mut reports = Vec::new();
    for check in checks {
        let name = check_name(&check);
        let job = Job::new(module.clone(), check).with_limits(limits.clone());
        let report = sandbox.run(job).await?;
        let failed = !report.passed();
        reports.push((name, report));
        if failed {
            break;
        }
    }
    let passed = reports.iter().all(|(_, r)| r.passed());

    if args.json {
        println!("{}", json(&args.file, passed, &reports)?);
    } else {
        for (name, report) in &reports {
            print_human(&args, name, report);
        }
    }
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn file_name(path: &Path) -> anyhow::Result<String> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| crate::usage(format!("{} is not a file name", path.display())))?;
    if !name.ends_with(".py") {
        return Err(crate::usage(format!(
            "{} is not a Python file (NAME.py)",
            path.display()
        )));
    }
    Ok(name.to_string())
}

fn test_kind(kind: TestKindArg) -> TestKind {
    match kind {
        TestKindArg::Auto => TestKind::Auto,
        TestKindArg::Script => TestKind::Script,
        TestKindArg::Unittest => TestKind::Unittest,
        TestKindArg::Pytest => TestKind::Pytest,
        TestKindArg::Check => TestKind::Check,
    }
}

fn check_name(check: &Check) -> &'static str {
    match check {
        Check::Syntax => "syntax",
        Check::Import => "import",
        Check::Run => "run",
        Check::Doctest => "doctest",
        Check::Tests(_) => "tests",
    }
}

/// `{"file", "passed", "outcome", "checks": [{"check", ...report}]}`: `outcome` is the first
/// failing check's (or the last one's when all passed).
fn json(file: &Path, passed: bool, reports: &[(&str, RunReport)]) -> anyhow::Result<String> {
    let mut checks = Vec::new();
    for (name, report) in reports {
        let mut value = serde_json::to_value(report)?;
        if let Some(map) = value.as_object_mut() {
            map.insert("check".into(), (*name).into());
        }
        checks.push(value);
    }
    let deciding: Option<&Outcome> = reports
        .iter()
        .map(|(_, r)| &r.outcome)
        .find(|o| !o.is_passed())
        .or_else(|| reports.last().map(|(_, r)| &r.outcome));
    let value = serde_json::json!({
        "file": file.display().to_string(),
        "passed": passed,
        "outcome": deciding,
        "checks": checks,
    });
    Ok(serde_json::to_string_pretty(&value)?)
}

fn print_human(args: &CheckArgs, name: &str, report: &RunReport) {
    let subject = match (&args.tests, name) {
        (Some(tests), "tests") => format!("{} against {}", tests.display(), args.file.display()),
        _ => args.file.display().to_string(),
    };
    let verdict = if report.passed() { "passed" } else { "FAILED" };
    let counts = report
        .tests
        .as_ref()
        .map(|t| {
            format!(
                " ({}: {} of {} passed{})",
                t.runner,
                t.passed,
                t.total,
                if t.skipped > 0 {
                    format!(", {} skipped", t.skipped)
                } else {
                    String::new()
                }
            )
        })
        .unwrap_or_default();
    println!(
        "{name} {subject}: {verdict}{counts} in {:.2} s",
        report.duration.as_secs_f64()
    );
    if !report.passed() {
        println!("{}", report.outcome);
        for (label, text) in [("stdout", &report.stdout), ("stderr", &report.stderr)] {
            if !text.trim().is_empty() {
                println!("--- {label} ---\n{}", text.trim_end());
            }
        }
    }
}
