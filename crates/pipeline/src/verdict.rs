//! A validation's verdict: the checks that ran (`CheckResult`, named by `CheckName`), the
//! LLM validator's `Judgement`, and how they add up to pass, score and feedback.

use serde::{Deserialize, Serialize};

use crate::workers::GeneratedFile;

/// What a check checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckName {
    /// The answer holds code at all.
    Code,
    Syntax,
    EntryPoint,
    /// A data-analysis script ran.
    Run,
    /// A program that parses options answered `--help`.
    Help,
    /// A program ran on the tests worker's input.
    SmokeRun,
    /// Independently written candidates, run on the same inputs, agree with this one (a
    /// clear majority), and it passes the generated tests that majority passes.
    Agreement,
    TaskExamples,
    /// Code that passed the task's examples, run on inputs they leave out (empty ones, and
    /// ordinary ones): it neither crashes nor returns an example's answer for everything.
    EdgeCases,
    SuppliedTests,
    GeneratedTests,
    Import,
    DocstringExamples,
    /// The code avoids what the task's words forbid (`Do not use eval()`).
    TaskConstraints,
    /// A tests worker's answer holds test code at all.
    Tests,
    TestFunctions,
    UsesTheCode,
    /// A prose answer is long enough.
    Answer,
    /// The LLM validator.
    Reviewer,
    /// forgeline failed, not the output.
    Internal,
}

impl CheckName {
    pub fn name(self) -> &'static str {
        match self {
            CheckName::Code => "code",
            CheckName::Syntax => "syntax",
            CheckName::EntryPoint => "entry_point",
            CheckName::Run => "run",
            CheckName::Help => "help",
            CheckName::SmokeRun => "smoke_run",
            CheckName::Agreement => "agreement",
            CheckName::TaskExamples => "task_examples",
            CheckName::EdgeCases => "edge_cases",
            CheckName::SuppliedTests => "supplied_tests",
            CheckName::GeneratedTests => "generated_tests",
            CheckName::Import => "import",
            CheckName::DocstringExamples => "docstring_examples",
            CheckName::TaskConstraints => "task_constraints",
            CheckName::Tests => "tests",
            CheckName::TestFunctions => "test_functions",
            CheckName::UsesTheCode => "uses_the_code",
            CheckName::Answer => "answer",
            CheckName::Reviewer => "reviewer",
            CheckName::Internal => "internal",
        }
    }
}

/// How far a check's result can be trusted about whether the code does what was asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trust {
    /// Checks that come from the user or the task: they can verify and they can fail.
    Trusted,
    /// The code ran (imported, ran as a program, ran its own examples): a crash fails it,
    /// a clean run proves only that it runs.
    Execution,
    /// Tests a model wrote: they may be wrong, so they only rank and never pass alone.
    Generated,
    /// Read, not run (it parses, it defines the entry point).
    Static,
    /// A model's opinion: it proves nothing.
    Opinion,
    /// forgeline itself failed: nothing about the code.
    Internal,
}

impl CheckName {
    pub fn trust(self) -> Trust {
        match self {
            CheckName::TaskExamples | CheckName::SuppliedTests => Trust::Trusted,
            CheckName::Run
            | CheckName::Help
            | CheckName::SmokeRun
            | CheckName::Agreement
            | CheckName::EdgeCases
            | CheckName::Import
            | CheckName::DocstringExamples => Trust::Execution,
            CheckName::GeneratedTests => Trust::Generated,
            CheckName::Code
            | CheckName::Syntax
            | CheckName::EntryPoint
            | CheckName::TaskConstraints
            | CheckName::Tests
            | CheckName::TestFunctions
            | CheckName::UsesTheCode
            | CheckName::Answer => Trust::Static,
            CheckName::Reviewer => Trust::Opinion,
            CheckName::Internal => Trust::Internal,
        }
    }

    /// What the check runs or reads.
    pub fn ran(self) -> &'static str {
        match self {
            CheckName::Code => "looked for Python code in the answer",
            CheckName::Syntax => "compiled the code without running it",
            CheckName::EntryPoint => "read the top-level definitions for the entry point",
            CheckName::Run => "ran the code as a program",
            CheckName::Help => "ran the program with --help",
            CheckName::SmokeRun => "ran the program on a small input a model wrote",
            CheckName::Agreement => {
                "ran every candidate on the same inputs and compared their outputs"
            }
            CheckName::TaskExamples => "ran the task's own examples against the code",
            CheckName::EdgeCases => {
                "ran the code on inputs the examples leave out: each text, list or dict argument empty, and ordinary values of each type"
            }
            CheckName::SuppliedTests => "ran the user's tests against the code",
            CheckName::GeneratedTests => "ran tests a model wrote against the code",
            CheckName::Import => "imported the code (its top-level statements ran)",
            CheckName::DocstringExamples => "ran the examples in the code's own docstrings",
            CheckName::TaskConstraints => {
                "read the code for what the task says not to use (a name, a module)"
            }
            CheckName::Tests => "looked for test code in the answer",
            CheckName::TestFunctions => "counted the test functions",
            CheckName::UsesTheCode => "read whether the tests import and call the code",
            CheckName::Answer => "measured the answer's length",
            CheckName::Reviewer => "asked a model to review the output",
            CheckName::Internal => "nothing: forgeline failed",
        }
    }

    /// What a pass of the check proves.
    pub fn proves(self) -> &'static str {
        match self {
            CheckName::TaskExamples => "the code gives the outputs the task states",
            CheckName::EdgeCases => {
                "the code does not crash there and its answer depends on its input; not that the answers are right. A failure is evidence against it, so it is not called verified"
            }
            CheckName::SuppliedTests => "the code passes the user's tests",
            CheckName::Run => "the program runs to the end without an error",
            CheckName::Help => "the program's options parse and it documents them",
            CheckName::SmokeRun => "the program runs on an ordinary input without crashing",
            CheckName::Agreement => {
                "most independently written candidates compute the same outputs: consistent, not verified"
            }
            CheckName::Import => "the module loads without an error",
            CheckName::DocstringExamples => {
                "the code agrees with its own examples (which the model also wrote)"
            }
            CheckName::GeneratedTests => {
                "the code agrees with a model's tests, which may be wrong: no proof alone"
            }
            CheckName::TaskConstraints => {
                "the code keeps the task's rules on what not to use; nothing about its outputs"
            }
            CheckName::Reviewer => "nothing: a model's opinion",
            CheckName::Internal => "nothing",
            // The static checks (see `trust`).
            _ => "the output's form, not what it does",
        }
    }
}

impl std::fmt::Display for CheckName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What execution proved about an output, strongest first. Only `Verified` is a pass.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum VerdictStatus {
    /// Trusted checks ran and passed: the user's tests, the task's own examples (`>>>` or
    /// stated in its text as a call and its result); and on inputs they leave out the code
    /// neither crashes nor returns an example's answer for everything.
    Verified,
    /// No trusted check exists, but execution agrees: the code runs on generated inputs,
    /// the candidates that agree on those outputs form a clear majority, and it passes the
    /// generated tests that majority passes.
    Consistent,
    /// Nothing executable decided (syntax, import and an LLM review only).
    #[default]
    Unverified,
    /// A trusted check ran and failed, or the code crashed on its own smoke run.
    Failed,
}

impl VerdictStatus {
    pub const ALL: [VerdictStatus; 4] = [
        VerdictStatus::Verified,
        VerdictStatus::Consistent,
        VerdictStatus::Unverified,
        VerdictStatus::Failed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            VerdictStatus::Verified => "verified",
            VerdictStatus::Consistent => "consistent",
            VerdictStatus::Unverified => "unverified",
            VerdictStatus::Failed => "failed",
        }
    }
}

impl std::fmt::Display for VerdictStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One check's result: in JSON, one item of a verdict's `evidence` (the check, its trust,
/// what it ran, what it proves, whether it passed, the detail).
#[derive(Clone, Debug, PartialEq)]
pub struct CheckResult {
    pub name: CheckName,
    pub passed: bool,
    /// A failing hard check fails the output; a soft one only ranks it lower.
    pub hard: bool,
    pub detail: String,
    /// Tests passed and run, when tests ran.
    pub tests: Option<(u32, u32)>,
}

impl Serialize for CheckResult {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("check", &self.name)?;
        m.serialize_entry("trust", &self.name.trust())?;
        m.serialize_entry("ran", self.name.ran())?;
        m.serialize_entry("proves", self.name.proves())?;
        m.serialize_entry("passed", &self.passed)?;
        m.serialize_entry("hard", &self.hard)?;
        m.serialize_entry("detail", &self.detail)?;
        if let Some(t) = self.tests {
            m.serialize_entry("tests", &t)?;
        }
        m.end()
    }
}

/// The LLM validator's answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    pub pass: bool,
    #[serde(default)]
    pub problems: Vec<String>,
    #[serde(default)]
    pub feedback: String,
}

/// A validation verdict.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Verdict {
    /// What execution proved.
    pub status: VerdictStatus,
    /// No hard check failed: the output is acceptable for its subtask (the retry manager's
    /// test). Not a claim that it works: that is `status`.
    pub passed: bool,
    /// Higher is better; compares attempts and candidates of one subtask.
    pub score: f64,
    /// The checks that ran, in order: the evidence the status rests on.
    #[serde(rename = "evidence")]
    pub checks: Vec<CheckResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judge: Option<Judgement>,
    /// What to tell the worker on a retry.
    pub feedback: String,
    /// Whether any check executed the output (beyond parsing it).
    pub executed: bool,
    /// Files the output wrote when it ran (figures).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<GeneratedFile>,
}

impl Verdict {
    /// A check that could not finish because forgeline itself failed (a panic): a hard
    /// failure that claims nothing about the output.
    pub fn internal_failure(why: &str) -> Self {
        let detail = format!("internal error in forgeline, not in the code: {why}");
        Self {
            status: VerdictStatus::Unverified,
            passed: false,
            score: 0.0,
            checks: vec![CheckResult {
                name: CheckName::Internal,
                passed: false,
                hard: true,
                detail: detail.clone(),
                tests: None,
            }],
            judge: None,
            feedback: detail,
            executed: false,
            files: Vec::new(),
        }
    }

    pub(crate) fn add(&mut self, c: CheckResult) {
        self.checks.push(c);
    }

    /// What the checks prove: `Failed` when a trusted check failed or the code could not
    /// run (it does not parse or load, lacks the entry point, crashes, or contradicts its
    /// own examples); `Verified` when trusted checks ran and all passed and the edge-case
    /// check (where it ran) found nothing against the code; `Consistent` when
    /// none exists but the candidates' agreement (from selection) holds; else `Unverified`.
    /// Generated tests and the reviewer never decide it.
    pub fn status_from_checks(&self) -> VerdictStatus {
        let failed = self.checks.iter().any(|c| {
            !c.passed
                && match c.name.trust() {
                    Trust::Trusted => true,
                    Trust::Execution | Trust::Static => c.hard,
                    Trust::Generated | Trust::Opinion | Trust::Internal => false,
                }
        });
        let trusted_ran = self
            .checks
            .iter()
            .any(|c| c.name.trust() == Trust::Trusted && c.tests.is_none_or(|(_, n)| n > 0));
        let agreed = self
            .checks
            .iter()
            .any(|c| c.name == CheckName::Agreement && c.passed);
        // Execution found what the trusted checks leave out: a crash on an empty input, or
        // an example's answer returned for everything.
        let contradicted = self
            .checks
            .iter()
            .any(|c| c.name == CheckName::EdgeCases && !c.passed);
        if failed {
            VerdictStatus::Failed
        } else if trusted_ran && !contradicted {
            VerdictStatus::Verified
        } else if agreed {
            VerdictStatus::Consistent
        } else {
            VerdictStatus::Unverified
        }
    }

    pub(crate) fn hard_failure(&self) -> Option<&CheckResult> {
        self.checks.iter().find(|c| c.hard && !c.passed)
    }

    /// Decides pass, score and feedback from the checks.
    pub(crate) fn finish(mut self) -> Self {
        let mut score = 0.0;
        for c in &self.checks {
            let weight = if c.hard { 1.0 } else { 0.5 };
            score += weight
                * match c.tests {
                    // Tests count by the share that passed (and more weight: they run code).
                    Some((passed, total)) if total > 0 => 3.0 * passed as f64 / total as f64,
                    _ => f64::from(u8::from(c.passed)),
                };
        }
        if let Some(j) = &self.judge {
            score += if j.pass { 0.5 } else { 0.0 };
        }
        self.score = score;
        self.passed = self.hard_failure().is_none();
        self.status = self.status_from_checks();
        let mut feedback = Vec::new();
        if let Some(c) = self.hard_failure() {
            feedback.push(format!("{}: {}", c.name, c.detail));
        }
        if let Some(c) = self.checks.iter().find(|c| !c.hard && !c.passed) {
            feedback.push(format!("{} (may be wrong): {}", c.name, c.detail));
        }
        if let Some(j) = self.judge.as_ref().filter(|j| !j.pass) {
            let mut s = j.problems.join("; ");
            if !j.feedback.is_empty() {
                s = format!("{s} {}", j.feedback);
            }
            feedback.push(format!("reviewer: {}", s.trim()));
        }
        self.feedback = feedback.join("\n");
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: CheckName, passed: bool, hard: bool, tests: Option<(u32, u32)>) -> CheckResult {
        CheckResult {
            name,
            passed,
            hard,
            detail: format!("{name} detail"),
            tests,
        }
    }

    #[test]
    fn hard_failures_fail_and_lead_the_feedback() {
        let mut v = Verdict::default();
        v.add(check(CheckName::Syntax, true, true, None));
        v.add(check(CheckName::TaskExamples, false, true, Some((1, 3))));
        v.add(check(CheckName::GeneratedTests, false, false, Some((0, 2))));
        v.judge = Some(Judgement {
            pass: true,
            problems: vec![],
            feedback: String::new(),
        });
        let v = v.finish();
        assert!(!v.passed);
        assert!(
            v.feedback
                .starts_with("task_examples: task_examples detail"),
            "{}",
            v.feedback
        );
        assert!(v.feedback.contains("generated_tests (may be wrong)"));
        assert!((v.score - (1.0 + 1.0 + 0.5)).abs() < 1e-9, "{}", v.score);
    }

    #[test]
    fn only_trusted_checks_verify_and_an_opinion_never_passes() {
        let status = |checks: &[CheckResult]| {
            let mut v = Verdict::default();
            for c in checks {
                v.add(c.clone());
            }
            v.finish().status
        };
        let syntax = check(CheckName::Syntax, true, true, None);
        let import = check(CheckName::Import, true, true, None);
        let approved = check(CheckName::Reviewer, true, true, None);
        let generated = check(CheckName::GeneratedTests, true, false, Some((4, 4)));
        let examples = check(CheckName::TaskExamples, true, true, Some((2, 2)));
        assert_eq!(
            status(&[syntax.clone(), import.clone(), approved.clone()]),
            VerdictStatus::Unverified
        );
        // Generated tests never pass a result on their own.
        assert_eq!(
            status(&[syntax.clone(), import.clone(), generated.clone()]),
            VerdictStatus::Unverified
        );
        assert_eq!(
            status(&[syntax.clone(), examples.clone(), generated.clone()]),
            VerdictStatus::Verified
        );
        // A trusted check that ran no test proves nothing.
        let empty = check(CheckName::SuppliedTests, true, true, Some((0, 0)));
        assert_eq!(status(&[syntax.clone(), empty]), VerdictStatus::Unverified);
        // A trusted failure, or code that cannot run, fails whatever else passed.
        let mut failing = examples.clone();
        failing.passed = false;
        assert_eq!(
            status(&[syntax.clone(), failing, approved.clone()]),
            VerdictStatus::Failed
        );
        let crash = check(CheckName::SmokeRun, false, true, None);
        assert_eq!(
            status(&[syntax.clone(), import.clone(), crash]),
            VerdictStatus::Failed
        );
        let bad_syntax = check(CheckName::Syntax, false, true, None);
        assert_eq!(status(&[bad_syntax]), VerdictStatus::Failed);
        // A reviewer's rejection is not a proven failure, nor is forgeline's own.
        let mut rejected = approved.clone();
        rejected.passed = false;
        assert_eq!(
            status(&[syntax.clone(), rejected]),
            VerdictStatus::Unverified
        );
        assert_eq!(
            Verdict::internal_failure("boom").status,
            VerdictStatus::Unverified
        );
    }

    #[test]
    fn evidence_says_what_each_check_ran_and_proves() {
        let mut v = Verdict::default();
        v.add(check(CheckName::Reviewer, true, true, None));
        v.add(check(CheckName::TaskExamples, true, true, Some((1, 1))));
        let json = serde_json::to_value(v.finish()).unwrap();
        assert_eq!(json["status"], "verified");
        let e = &json["evidence"];
        assert_eq!(e[0]["check"], "reviewer");
        assert_eq!(e[0]["trust"], "opinion");
        assert!(e[0]["proves"].as_str().unwrap().starts_with("nothing"));
        assert_eq!(e[1]["trust"], "trusted");
        assert_eq!(e[1]["tests"], serde_json::json!([1, 1]));
        assert!(e[1]["ran"]
            .as_str()
            .unwrap()
            .contains("task's own examples"));
    }

    #[test]
    fn check_names_are_written_as_before() {
        for (c, n) in [
            (CheckName::TaskExamples, "task_examples"),
            (CheckName::UsesTheCode, "uses_the_code"),
            (CheckName::DocstringExamples, "docstring_examples"),
        ] {
            assert_eq!(serde_json::to_value(c).unwrap(), n);
            assert_eq!(c.name(), n);
        }
    }

    #[test]
    fn more_passing_tests_score_higher() {
        let score = |p| {
            let mut v = Verdict::default();
            v.add(check(CheckName::TaskExamples, p == 3, true, Some((p, 3))));
            v.finish().score
        };
        assert!(score(3) > score(2) && score(2) > score(0));
    }
}
