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
    TaskExamples,
    SuppliedTests,
    GeneratedTests,
    Import,
    DocstringExamples,
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
            CheckName::TaskExamples => "task_examples",
            CheckName::SuppliedTests => "supplied_tests",
            CheckName::GeneratedTests => "generated_tests",
            CheckName::Import => "import",
            CheckName::DocstringExamples => "docstring_examples",
            CheckName::Tests => "tests",
            CheckName::TestFunctions => "test_functions",
            CheckName::UsesTheCode => "uses_the_code",
            CheckName::Answer => "answer",
            CheckName::Reviewer => "reviewer",
            CheckName::Internal => "internal",
        }
    }
}

impl std::fmt::Display for CheckName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One check's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: CheckName,
    pub passed: bool,
    /// A failing hard check fails the output; a soft one only ranks it lower.
    pub hard: bool,
    pub detail: String,
    /// Tests passed and run, when tests ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tests: Option<(u32, u32)>,
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
    pub passed: bool,
    /// Higher is better; compares attempts and candidates of one subtask.
    pub score: f64,
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
