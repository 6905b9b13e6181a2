// Programs given arguments, stdin and input files, included by `program_input.rs` (runs
// started by the launcher) and `program_input_forked.rs` (runs forked from the test process).

use common::*;
use forgeline_sandbox::{
    Check, Error, FileNameProblem, InputError, InputFile, Job, Limits, Outcome, RunReport,
};

fn job(source: &str) -> Job {
    Job::new(module(source), Check::Run)
}

async fn run_job(job: Job) -> RunReport {
    sandbox().await.run(job).await.unwrap()
}

/// Removes the duplicate rows of a CSV named on the command line, keeping the first of each,
/// and writes the rest to stdout.
const DEDUP: &str = r#"import csv
import sys

seen = set()
out = csv.writer(sys.stdout, lineterminator="\n")
with open(sys.argv[1], newline="") as f:
    for row in csv.reader(f):
        key = tuple(row)
        if key not in seen:
            seen.add(key)
            out.writerow(row)
"#;

#[tokio::test]
async fn arguments_reach_sys_argv_as_after_python_solution_py() {
    let code = "import json, sys\nprint(json.dumps(sys.argv))\n";
    let args = [
        "--name",
        "two words",
        "",
        "ünïcode",
        "-c",
        "--",
        "$HOME",
        "*",
    ];
    let report = run_job(job(code).with_args(args).unwrap()).await;
    assert_eq!(report.outcome, Outcome::Passed, "{}", show(&report));
    let argv: Vec<String> = serde_json::from_slice(&report.raw_stdout.bytes).unwrap();
    let mut expected = vec!["solution.py".to_string()];
    expected.extend(args.iter().map(|a| a.to_string()));
    assert_eq!(argv, expected);
    // Without arguments, only the program's name.
    let bare = run_job(job(code)).await;
    assert_eq!(bare.raw_stdout.as_str(), Some("[\"solution.py\"]\n"));
}

#[tokio::test]
async fn stdin_is_read_to_its_end() {
    let code =
        "import sys\ndata = sys.stdin.read()\nprint(len(data))\nprint(data.upper(), end='')\n";
    let report = run_job(job(code).with_stdin("hello\nworld\n").unwrap()).await;
    assert_eq!(report.outcome, Outcome::Passed, "{}", show(&report));
    assert_eq!(report.raw_stdout.as_str(), Some("12\nHELLO\nWORLD\n"));
    // Without stdin the program reads an empty one, at once.
    let empty = run_job(job(code)).await;
    assert_eq!(empty.raw_stdout.as_str(), Some("0\n"));
    // Binary stdin of the whole limit arrives whole, past any pipe buffer.
    let big: Vec<u8> = (0..Job::MAX_INPUT_BYTES as usize)
        .map(|i| (i % 251) as u8)
        .collect();
    let sum: u64 = big.iter().map(|&b| u64::from(b)).sum();
    let code = "import sys\ndata = sys.stdin.buffer.read()\nprint(len(data), sum(data))\n";
    let report = run_job(job(code).with_stdin(big).unwrap()).await;
    assert_eq!(report.outcome, Outcome::Passed, "{}", show(&report));
    assert_eq!(
        report.raw_stdout.as_str(),
        Some(format!("{} {sum}\n", Job::MAX_INPUT_BYTES).as_str())
    );
}

#[tokio::test]
async fn a_program_that_never_reads_its_stdin_still_ends() {
    let stdin = vec![b'x'; Job::MAX_INPUT_BYTES as usize];
    let report = run_job(job("print('done')\n").with_stdin(stdin).unwrap()).await;
    assert_eq!(report.outcome, Outcome::Passed, "{}", show(&report));
    assert_eq!(report.stdout, "done\n");
    assert!(report.duration.as_secs_f64() < 4.0, "{:?}", report.duration);
}

#[tokio::test]
async fn an_input_csv_is_read_and_its_dedup_matches_exactly() {
    let csv = "id,name\n1,ada\n2,bob\n1,ada\n3,\"c, d\"\n2,bob\n3,\"c, d\"\n4,ünï\n";
    let expected = "id,name\n1,ada\n2,bob\n3,\"c, d\"\n4,ünï\n";
    let job = job(DEDUP)
        .with_args(["data.csv"])
        .unwrap()
        .with_input_file("data.csv", csv)
        .unwrap()
        .keep_files(&["csv"]);
    let report = run_job(job).await;
    assert_eq!(report.outcome, Outcome::Passed, "{}", show(&report));
    assert_eq!(report.raw_stdout.bytes, expected.as_bytes());
    assert_eq!(report.raw_stdout.total_bytes, expected.len() as u64);
    assert!(!report.raw_stdout.truncated);
    assert_eq!(report.stdout, expected);
    assert!(report.raw_stderr.bytes.is_empty(), "{}", report.stderr);
    // The input is no file the program wrote.
    assert!(report.files.is_empty(), "{:?}", report.files);
    // Two candidates' outputs compare equal byte for byte.
    let again = run_job(
        Job::new(module(DEDUP), Check::Run)
            .with_args(["rows.csv"])
            .unwrap()
            .with_input_file("rows.csv", csv)
            .unwrap(),
    )
    .await;
    assert_eq!(again.raw_stdout, report.raw_stdout);
}

#[tokio::test]
async fn input_files_belong_to_the_program_and_only_changed_ones_are_kept() {
    let code = "import os\n\
                for name in ['data.csv', 'notes.txt']:\n\
                \x20   print(name, os.access(name, os.R_OK | os.W_OK), os.path.islink(name))\n\
                print(sorted(n for n in os.listdir('.') if not n.startswith('.forgeline')))\n\
                open('notes.txt', 'a').write('more\\n')\n\
                open('out.csv', 'w').write('x\\n')\n";
    let job = job(code)
        .with_input_file("data.csv", "a\n")
        .unwrap()
        .with_input_file("notes.txt", "n\n")
        .unwrap()
        .keep_files(&["csv", "txt"]);
    let report = run_job(job).await;
    assert_eq!(report.outcome, Outcome::Passed, "{}", show(&report));
    assert_eq!(
        report.stdout,
        "data.csv True False\nnotes.txt True False\n['data.csv', 'notes.txt', 'solution.py', 'tmp']\n"
    );
    let mut kept: Vec<(&str, &[u8])> = report
        .files
        .iter()
        .map(|f| (f.name.as_str(), f.bytes.as_slice()))
        .collect();
    kept.sort();
    assert_eq!(
        kept,
        [("notes.txt", &b"n\nmore\n"[..]), ("out.csv", &b"x\n"[..])]
    );
}

#[tokio::test]
async fn argparse_help_passes_and_prints_usage() {
    let code = r#"import argparse

parser = argparse.ArgumentParser(description="Sums the numbers of a file.")
parser.add_argument("path", help="the file to read")
parser.add_argument("--scale", type=float, default=1.0, help="multiply the sum by this")
args = parser.parse_args()
with open(args.path) as f:
    print(sum(float(line) for line in f if line.strip()) * args.scale)
"#;
    let help = run_job(job(code).with_args(["--help"]).unwrap()).await;
    assert_eq!(help.outcome, Outcome::Passed, "{}", show(&help));
    let text = help.raw_stdout.as_str().unwrap();
    assert!(
        text.starts_with("usage: solution.py [-h] [--scale SCALE] path\n"),
        "{text}"
    );
    assert!(text.contains("Sums the numbers of a file."), "{text}");
    assert!(text.contains("--scale SCALE"), "{text}");

    let ran = run_job(
        job(code)
            .with_args(["numbers.txt", "--scale", "2"])
            .unwrap()
            .with_input_file("numbers.txt", "1\n2.5\n\n3\n")
            .unwrap(),
    )
    .await;
    assert_eq!(ran.outcome, Outcome::Passed, "{}", show(&ran));
    assert_eq!(ran.raw_stdout.as_str(), Some("13.0\n"));

    // A bad command line exits with argparse's 2, and says why on stderr.
    let bad = run_job(job(code).with_args(["--scale"]).unwrap()).await;
    assert!(
        matches!(bad.outcome, Outcome::Exited { code: 2, .. }),
        "{}",
        show(&bad)
    );
    assert!(!bad.passed());
    assert!(
        bad.stderr.starts_with("usage: solution.py"),
        "{}",
        bad.stderr
    );
    assert!(
        bad.stderr
            .contains("error: argument --scale: expected one argument"),
        "{}",
        bad.stderr
    );
}

#[tokio::test]
async fn a_crash_on_the_input_fails_with_the_traceback_last_line() {
    let code = "import sys\n\
                def parse(line, n):\n\
                \x20   if not line.strip().isdigit():\n\
                \x20       raise ValueError(f'bad row {n}: {line.strip()!r}')\n\
                \x20   return int(line)\n\
                total = 0\n\
                for n, line in enumerate(open(sys.argv[1]), 1):\n\
                \x20   total += parse(line, n)\n\
                print(total)\n";
    let report = run_job(
        job(code)
            .with_args(["in.txt"])
            .unwrap()
            .with_input_file("in.txt", "1\n2\nthree\n")
            .unwrap(),
    )
    .await;
    assert!(!report.passed());
    let Outcome::Exception(exc) = &report.outcome else {
        panic!("{}", show(&report))
    };
    assert_eq!(exc.exception_type, "ValueError");
    assert_eq!(
        (exc.file.as_deref(), exc.line),
        (Some("solution.py"), Some(4))
    );
    let detail = report.outcome.to_string();
    assert!(
        detail.starts_with("ValueError: bad row 3: 'three'"),
        "{detail}"
    );
    assert!(report.raw_stdout.bytes.is_empty());

    // A nonzero exit fails too, with its code.
    let exited = run_job(job("import sys\nprint('partial')\nsys.exit(3)\n")).await;
    assert_eq!(
        exited.outcome,
        Outcome::Exited {
            code: 3,
            message: None
        },
        "{}",
        show(&exited)
    );
    assert_eq!(exited.raw_stdout.as_str(), Some("partial\n"));
}

#[tokio::test]
async fn raw_output_is_exact_and_says_when_it_was_cut() {
    let limits = Limits {
        output_bytes: 1000,
        ..test_limits()
    };
    let code = "import os, sys\n\
                sys.stdout.buffer.write(b'\\xff\\xfe' + os.getcwd().encode() + b'/x\\n')\n\
                sys.stdout.flush()\n\
                sys.stderr.write('e' * 3000)\n";
    let report = run_job(job(code).with_limits(limits)).await;
    assert_eq!(report.outcome, Outcome::Passed, "{}", show(&report));
    let raw = &report.raw_stdout.bytes;
    assert_eq!(&raw[..2], b"\xff\xfe");
    assert!(raw.ends_with(b"/x\n") && raw.windows(14).any(|w| w == b"forgeline-run-"));
    assert!(!report.raw_stdout.truncated);
    assert_eq!(report.raw_stdout.total_bytes, raw.len() as u64);
    // The text is for reading: decoded lossily, the run directory left out.
    assert!(
        report.stdout.starts_with("\u{fffd}\u{fffd}") && report.stdout.ends_with("x\n"),
        "{:?}",
        report.stdout
    );
    let err = &report.raw_stderr;
    assert_eq!(err.bytes, vec![b'e'; 1000]);
    assert_eq!((err.total_bytes, err.truncated), (3000, true));
    assert!(report
        .stderr
        .contains("[forgeline: output truncated: 1000 of 3000 bytes kept]"));
}

#[tokio::test]
async fn bad_names_and_oversize_inputs_are_typed_errors_before_anything_runs() {
    let sandbox = sandbox().await;
    let code = "print('ran')\n";
    let mut escaping = job(code);
    escaping.input_files.push(InputFile {
        name: "../escape.csv".into(),
        bytes: b"x".to_vec(),
    });
    let err = sandbox.run(escaping).await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::ProgramInput(InputError::FileName {
                problem: FileNameProblem::Slash,
                name,
            }) if name == "../escape.csv"
        ),
        "{err}"
    );
    assert!(err.to_string().contains("../escape.csv"), "{err}");

    let mut oversize = job(code);
    oversize.stdin = Some(vec![0; Job::MAX_INPUT_BYTES as usize]);
    oversize.input_files.push(InputFile {
        name: "one.byte".into(),
        bytes: b"x".to_vec(),
    });
    assert!(matches!(
        sandbox.run(oversize).await,
        Err(Error::ProgramInput(InputError::TooLarge { .. }))
    ));
    assert!(matches!(
        job(code).with_input_file("solution.py", "print('replaced')"),
        Err(Error::ProgramInput(InputError::FileName {
            problem: FileNameProblem::ClashesWithModule,
            ..
        }))
    ));
}
