//! Stage 8, the validators. Deterministic checks first, all run in the sandbox: syntax,
//! entry point and signature, the task's own docstring examples, supplied tests, generated
//! tests, docstring examples of the output. Then, only where nothing ran that decides, an
//! LLM validator answering JSON `{pass, problems, feedback}`: its rejection sends the output
//! back for a retry; its approval is never a pass (see `Verdict::status`).

use forgeline_engine::stop::StopReason;
use forgeline_sandbox::{Check, Job, Module, RunReport, TestKind, TestSuite};
use serde_json::json;

use crate::constraints;
use crate::edge_cases;
use crate::job::{JobContext, LlmCall};
use crate::planning::TaskSpec;
use crate::python;
use crate::router::Route;
use crate::selection;
use crate::smoke::{self, SmokeInput};
use crate::stage::LlmStage;
use crate::task::ContextFile;
pub use crate::verdict::{CheckName, CheckResult, Judgement, Trust, Verdict, VerdictStatus};
use crate::workers::{Artifact, GeneratedFile, WorkerKind};

/// What the checks have to go on besides the output itself.
#[derive(Clone, Debug, Default)]
pub struct Evidence {
    /// The module name code is saved and imported as.
    pub module: String,
    /// Tests written from the task's `>>>` examples.
    pub examples: Option<String>,
    /// Tests the user supplied.
    pub supplied: Option<ContextFile>,
    /// Tests a tests worker wrote (a weaker signal: they may be wrong).
    pub generated: Vec<String>,
    /// The output is a program a user runs: it is smoke-run, not only imported.
    pub program: bool,
    /// An input the tests worker wrote to smoke-run the program on.
    pub smoke: Option<SmokeInput>,
    /// For the final check: how far the primary code's candidates agreed when they were
    /// run on the same inputs (from selection), while the result is still that code.
    pub agreement: Option<CheckResult>,
}

fn outcome_check(name: CheckName, hard: bool, r: &RunReport) -> CheckResult {
    let tests = r.tests.as_ref().map(|t| (t.passed, t.total));
    CheckResult {
        name,
        passed: r.passed(),
        hard,
        detail: if r.passed() {
            // Only trusted tests "pass"; a model's own tests or examples merely agree.
            tests
                .map(|(p, t)| match name.trust() {
                    Trust::Trusted => format!("{p}/{t} passed"),
                    _ => format!("{p}/{t} agree"),
                })
                .unwrap_or_else(|| "ok".into())
        } else {
            clip(&r.outcome.to_string(), 700)
        },
        tests,
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A check the sandbox could not run: forgeline's failure (or a name it refuses), which
/// says nothing about the code. Hard, so that nothing is accepted on it, but `Internal`:
/// the status does not call the code failed.
pub(crate) fn sandbox_failure(name: CheckName, e: forgeline_sandbox::Error) -> CheckResult {
    CheckResult {
        name: CheckName::Internal,
        passed: false,
        hard: true,
        detail: format!("the sandbox could not run the {name} check: {e}"),
        tests: None,
    }
}

impl JobContext {
    pub(crate) async fn sandboxed(&self, job: Job) -> forgeline_sandbox::Result<RunReport> {
        let limits = self
            .sandbox()
            .limits()
            .clone()
            .with_timeout(self.config().limits.sandbox_timeout());
        self.sandbox().run(job.with_limits(limits)).await
    }

    async fn run_suite(
        &self,
        module: &Module,
        file: &str,
        source: &str,
        kind: TestKind,
    ) -> forgeline_sandbox::Result<RunReport> {
        let suite = TestSuite::new(file, source.as_bytes().to_vec())?.with_kind(kind);
        self.sandboxed(Job::new(module.clone(), Check::Tests(suite)))
            .await
    }
}

/// Runs the checks that fit the output's kind, with the per-output LLM validator.
pub async fn validate(
    ctx: &JobContext,
    route: &Route,
    spec: &TaskSpec,
    artifact: &Artifact,
    evidence: &Evidence,
) -> Verdict {
    validate_with(ctx, route, spec, artifact, evidence, LlmStage::Validator).await
}

/// As `validate`, with the LLM verdict asked of `judge_stage`'s prompt.
pub async fn validate_with(
    ctx: &JobContext,
    route: &Route,
    spec: &TaskSpec,
    artifact: &Artifact,
    evidence: &Evidence,
    judge_stage: LlmStage,
) -> Verdict {
    let mut v = Verdict::default();
    match artifact.kind {
        WorkerKind::Code | WorkerKind::DataAnalysis => {
            code_checks(ctx, route, spec, artifact, evidence, &mut v).await
        }
        WorkerKind::Tests => tests_checks(ctx, route, artifact, evidence, &mut v).await,
        WorkerKind::Reasoning | WorkerKind::Research | WorkerKind::Docs => {
            let long_enough = artifact.text.trim().chars().count() >= 20;
            v.add(CheckResult {
                name: CheckName::Answer,
                passed: long_enough,
                hard: true,
                detail: if long_enough {
                    "ok".into()
                } else {
                    "the answer is empty or too short".into()
                },
                tests: None,
            });
        }
    }
    // The reviewer runs only where it can change a decision: where nothing ran that decides
    // (a prose answer, code with nothing to test it or to compare it with), its rejection
    // sends the output back to the worker. Where code ran, it could only change a score.
    // Its approval is never a pass: the verdict's status rests on execution alone.
    // Where the candidates are chosen by running them (`retry::needs_selection`), execution
    // decides among them: a review of each would be pure cost.
    let selection_decides = (judge_stage == LlmStage::Validator
        && crate::retry::needs_selection(spec, route, evidence))
        || evidence.agreement.as_ref().is_some_and(|a| a.passed);
    if ctx.config().limits.llm_judge
        && v.hard_failure().is_none()
        && !v.executed
        && !selection_decides
        && artifact.kind != WorkerKind::Tests
    {
        if let Some(judgement) = judge(ctx, judge_stage, spec, artifact, &v).await {
            v.add(CheckResult {
                name: CheckName::Reviewer,
                passed: judgement.pass,
                hard: true,
                detail: if judgement.pass {
                    "approved (an opinion, not a test)".into()
                } else {
                    clip(&judgement.problems.join("; "), 300)
                },
                tests: None,
            });
            v.judge = Some(judgement);
        }
    }
    v.finish()
}

/// Checks code: it parses, defines the entry point with the task's signature, then runs
/// (a data-analysis script) or passes the tests there are, or at least imports cleanly and
/// passes its own docstring examples.
async fn code_checks(
    ctx: &JobContext,
    route: &Route,
    spec: &TaskSpec,
    artifact: &Artifact,
    evidence: &Evidence,
    v: &mut Verdict,
) {
    let Some(code) = artifact.code.as_deref().filter(|c| !c.trim().is_empty()) else {
        v.add(CheckResult {
            name: CheckName::Code,
            passed: false,
            hard: true,
            detail: "the answer contains no Python code".into(),
            tests: None,
        });
        return;
    };
    let Some(module) = syntax_check(ctx, &evidence.module, code, v).await else {
        return;
    };
    if spec.primary && artifact.kind == WorkerKind::Code {
        let forbidden = constraints::forbidden(&ctx.task.task);
        if !forbidden.is_empty() {
            let used = constraints::violations(code, &forbidden);
            let list = |f: &[constraints::Forbidden]| {
                f.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            v.add(CheckResult {
                name: CheckName::TaskConstraints,
                passed: used.is_empty(),
                hard: true,
                detail: if used.is_empty() {
                    format!("does not use {}", list(&forbidden))
                } else {
                    format!("uses {}, which the task forbids", list(&used))
                },
                tests: None,
            });
            if !used.is_empty() {
                return;
            }
        }
        if let Some(entry) = &route.entry_point {
            let c = entry_point_check(code, entry, route.signature.as_ref());
            let passed = c.passed;
            v.add(c);
            if !passed {
                return;
            }
        }
    }
    if artifact.kind == WorkerKind::DataAnalysis {
        return run_script(ctx, module, v).await;
    }
    let mut executed = false;
    let mut trusted_ran = false;
    if spec.primary {
        (executed, trusted_ran) = run_tests(ctx, &module, evidence, v).await;
    }
    let trusted_passed = v
        .checks
        .iter()
        .all(|c| c.passed || c.name.trust() != Trust::Trusted);
    // The user's own tests say what the user needs; a task's few examples leave out most
    // inputs, so only those are looked past.
    let examples_only = evidence.examples.is_some() && evidence.supplied.is_none();
    if trusted_ran && trusted_passed && examples_only && artifact.kind == WorkerKind::Code {
        edge_case_check(ctx, route, &evidence.module, code, v).await;
    }
    if !trusted_ran || evidence.program {
        // Nothing trusted tested it: at least it must import cleanly.
        executed |= import_and_doctest(ctx, module.clone(), code, v).await;
    }
    if evidence.program && spec.primary && v.hard_failure().is_none() {
        // A program is run as a user would run it, not only imported.
        executed |= smoke::check_program(ctx, &module, code, evidence.smoke.as_ref(), v).await;
    }
    v.executed = executed;
}

/// Code that passed the task's examples (where the user gave no tests), run on the
/// inputs they leave out (`edge_cases`): a crash there, or an example's answer for every
/// input, keeps it from being verified. Nothing is added where the signature gives no
/// such inputs.
async fn edge_case_check(
    ctx: &JobContext,
    route: &Route,
    module: &str,
    code: &str,
    v: &mut Verdict,
) {
    let (Some(entry), Some(sig)) = (route.entry_point.as_deref(), route.signature.as_ref()) else {
        return;
    };
    if sig.name != entry {
        return;
    }
    let Some(plan) = edge_cases::plan(entry, sig, &route.examples) else {
        return;
    };
    let probes = selection::ProbePlan {
        probes: plan.probes.clone(),
        ..selection::ProbePlan::default()
    };
    let run = selection::run_candidate(ctx, module, code, &probes).await;
    // The code passed its examples, so it imports: a run that reports nothing is the
    // sandbox's failure or a cut-short run, which proves nothing either way.
    let Some(outputs) = run.outputs else {
        return;
    };
    let (passed, detail) = match edge_cases::assess(&plan, &outputs) {
        Ok(d) => (true, d),
        Err(d) => (false, d),
    };
    v.add(CheckResult {
        name: CheckName::EdgeCases,
        passed,
        hard: false,
        detail: clip(&detail, 700),
        tests: None,
    });
}

/// The module, if its code parses.
async fn syntax_check(ctx: &JobContext, name: &str, code: &str, v: &mut Verdict) -> Option<Module> {
    let module = match Module::new(name, code.as_bytes().to_vec()) {
        Ok(m) => m,
        Err(e) => {
            v.add(sandbox_failure(CheckName::Syntax, e));
            return None;
        }
    };
    match ctx.sandboxed(Job::new(module.clone(), Check::Syntax)).await {
        Ok(r) => {
            let c = outcome_check(CheckName::Syntax, true, &r);
            let ok = c.passed;
            v.add(c);
            ok.then_some(module)
        }
        Err(e) => {
            v.add(sandbox_failure(CheckName::Syntax, e));
            None
        }
    }
}

/// The code defines `entry` at the top level, with the task's parameters when known.
fn entry_point_check(code: &str, entry: &str, want: Option<&python::Signature>) -> CheckResult {
    let found = python::signatures(code)
        .into_iter()
        .find(|s| s.name == entry);
    let (passed, detail) = match (&found, want) {
        (None, _) if python::defines(code, entry) => (true, format!("`{entry}` defined")),
        (None, _) => (
            false,
            format!("the code does not define `{entry}` at the top level"),
        ),
        (Some(f), Some(want)) if f.params.len() != want.params.len() => (
            false,
            format!(
                "`{entry}` takes ({}) but the task's signature is ({})",
                f.params.join(", "),
                want.params.join(", ")
            ),
        ),
        (Some(_), Some(_)) => (true, format!("`{entry}` defined with the task's signature")),
        (Some(_), None) => (true, format!("`{entry}` defined")),
    };
    CheckResult {
        name: CheckName::EntryPoint,
        passed,
        hard: true,
        detail,
        tests: None,
    }
}

/// Runs a data-analysis script, keeping the figures and data files it writes.
async fn run_script(ctx: &JobContext, module: Module, v: &mut Verdict) {
    let job = Job::new(module, Check::Run).keep_files(&["png", "svg", "jpg", "pdf", "csv"]);
    match ctx.sandboxed(job).await {
        Ok(r) => {
            v.executed = true;
            v.files = r
                .files
                .iter()
                .map(|f| GeneratedFile {
                    name: f.name.clone(),
                    size: f.size,
                    bytes: f.bytes.clone(),
                })
                .collect();
            let mut c = outcome_check(CheckName::Run, true, &r);
            if c.passed && !v.files.is_empty() {
                c.detail = format!(
                    "ran; wrote {}",
                    v.files
                        .iter()
                        .map(|f| f.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            v.add(c);
        }
        Err(e) => v.add(sandbox_failure(CheckName::Run, e)),
    }
}

/// Runs the task's examples, the supplied tests and the generated tests (these only rank);
/// whether any ran, and whether a trusted one did.
async fn run_tests(
    ctx: &JobContext,
    module: &Module,
    evidence: &Evidence,
    v: &mut Verdict,
) -> (bool, bool) {
    let mut ran = false;
    if let Some(ex) = &evidence.examples {
        match ctx
            .run_suite(module, "test_task_examples.py", ex, TestKind::Functions)
            .await
        {
            Ok(r) => {
                ran = true;
                v.add(outcome_check(CheckName::TaskExamples, true, &r));
            }
            Err(e) => v.add(sandbox_failure(CheckName::TaskExamples, e)),
        }
    }
    if let Some(t) = &evidence.supplied {
        match ctx
            .run_suite(module, &t.name, &t.content, TestKind::Auto)
            .await
        {
            Ok(r) => {
                ran = true;
                v.add(outcome_check(CheckName::SuppliedTests, true, &r));
            }
            Err(e) => v.add(sandbox_failure(CheckName::SuppliedTests, e)),
        }
    }
    let trusted_ran = ran;
    for (i, g) in evidence.generated.iter().enumerate() {
        let file = format!("test_generated_{}.py", i + 1);
        if let Ok(r) = ctx.run_suite(module, &file, g, TestKind::Functions).await {
            ran = true;
            v.add(outcome_check(CheckName::GeneratedTests, false, &r));
        }
    }
    (ran, trusted_ran)
}

/// The module imports; its own docstring examples pass, if it has any. Whether examples ran.
async fn import_and_doctest(ctx: &JobContext, module: Module, code: &str, v: &mut Verdict) -> bool {
    match ctx.sandboxed(Job::new(module.clone(), Check::Import)).await {
        Ok(r) => v.add(outcome_check(CheckName::Import, true, &r)),
        Err(e) => v.add(sandbox_failure(CheckName::Import, e)),
    }
    if !code.contains(">>>") {
        return false;
    }
    match ctx.sandboxed(Job::new(module, Check::Doctest)).await {
        Ok(r) => {
            v.add(outcome_check(CheckName::DocstringExamples, true, &r));
            r.tests.as_ref().is_some_and(|t| t.total > 0)
        }
        Err(e) => {
            v.add(sandbox_failure(CheckName::DocstringExamples, e));
            false
        }
    }
}

async fn tests_checks(
    ctx: &JobContext,
    route: &Route,
    artifact: &Artifact,
    evidence: &Evidence,
    v: &mut Verdict,
) {
    let code = artifact.code.as_deref().unwrap_or("");
    let Ok(module) = Module::new("test_generated", code.as_bytes().to_vec()) else {
        return v.add(CheckResult {
            name: CheckName::Tests,
            passed: false,
            hard: true,
            detail: "no test code".into(),
            tests: None,
        });
    };
    match ctx.sandboxed(Job::new(module, Check::Syntax)).await {
        Ok(r) => v.add(outcome_check(CheckName::Syntax, true, &r)),
        Err(e) => return v.add(sandbox_failure(CheckName::Syntax, e)),
    }
    let n = python::statements(code)
        .iter()
        .filter(|s| matches!(&s.kind, python::StatementKind::Def(n) if n.starts_with("test")))
        .count();
    v.add(CheckResult {
        name: CheckName::TestFunctions,
        passed: n > 0,
        hard: true,
        detail: format!("{n} test functions"),
        tests: None,
    });
    let imports_module = code.contains(&format!("from {} import", evidence.module))
        || code.contains(&format!("import {}", evidence.module));
    let uses_entry = route
        .entry_point
        .as_ref()
        .is_none_or(|e| code.contains(e.as_str()));
    v.add(CheckResult {
        name: CheckName::UsesTheCode,
        passed: imports_module && uses_entry,
        hard: true,
        detail: if imports_module && uses_entry {
            "imports and calls the code under test".into()
        } else {
            format!(
                "the tests must import from `{}` and call the function under test",
                evidence.module
            )
        },
        tests: None,
    });
}

/// Asks the LLM validator for a verdict. None when there is no usable answer (the prompt
/// does not render, the call fails, the answer does not parse): no review decides nothing,
/// and is never counted as an approval.
async fn judge(
    ctx: &JobContext,
    stage: LlmStage,
    spec: &TaskSpec,
    artifact: &Artifact,
    v: &Verdict,
) -> Option<Judgement> {
    let schema = json!({
        "type": "object",
        "properties": {
            "pass": {"type": "boolean"},
            "problems": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 160}},
            "feedback": {"type": "string", "maxLength": 240}
        },
        "required": ["pass", "problems", "feedback"],
        "additionalProperties": false
    });
    let output = artifact.code.as_deref().unwrap_or(&artifact.text);
    let prompt = ctx
        .prompts()
        .render(
            stage,
            json!({"task": ctx.task.task, "subtask": spec, "kind": artifact.kind.name(),
                   "output": clip(output, 6000), "checks": v.checks}),
        )
        .inspect_err(|e| tracing::warn!("no review of {}: {e}", spec.id))
        .ok()?;
    let call = LlmCall::new(stage, prompt).schema(schema).subtask(&spec.id);
    let out = ctx
        .llm(call)
        .await
        .inspect_err(|e| tracing::warn!("no review of {}: {e}", spec.id))
        .ok()?;
    match serde_json::from_str(&out.text) {
        Ok(j) => Some(j),
        Err(e) => {
            let cut = (out.stop_reason == StopReason::MaxTokens)
                .then(|| cut_judgement(&out.text))
                .flatten();
            if cut.is_none() {
                tracing::debug!(
                    "the review of {} did not parse ({e}); none counted",
                    spec.id
                );
            }
            cut
        }
    }
}

/// What a review cut off by its token budget had already said. The schema puts `pass` first,
/// so a cut answer still holds the verdict, and the problems it finished listing.
pub(crate) fn cut_judgement(text: &str) -> Option<Judgement> {
    fn after<'a>(s: &'a str, token: &str) -> Option<&'a str> {
        s.trim_start().strip_prefix(token)
    }
    let rest = after(after(after(text, "{")?, "\"pass\"")?, ":")?.trim_start();
    let (pass, mut rest) = if let Some(r) = rest.strip_prefix("true") {
        (true, r)
    } else {
        (false, rest.strip_prefix("false")?)
    };
    let mut problems = Vec::new();
    if let Some(r) = after(rest, ",").and_then(|r| after(r, "\"problems\"")) {
        rest = after(r, ":").and_then(|r| after(r, "[")).unwrap_or("");
        // Each finished string, up to the one the budget cut.
        loop {
            let r = rest.trim_start();
            if !r.starts_with('"') {
                break;
            }
            let mut strings = serde_json::Deserializer::from_str(r).into_iter::<String>();
            let Some(Ok(problem)) = strings.next() else {
                break;
            };
            problems.push(problem);
            rest = after(&r[strings.byte_offset()..], ",").unwrap_or("");
        }
    }
    Some(Judgement {
        pass,
        problems,
        feedback: "(the review was cut off by its token budget)".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_review_keeps_its_verdict_and_finished_problems() {
        let j =
            cut_judgement(r#"{"pass": false, "problems": ["returns \"x\", not y", "loops for ev"#)
                .unwrap();
        assert!(!j.pass);
        assert_eq!(j.problems, [r#"returns "x", not y"#]);
        assert!(j.feedback.contains("cut off"));
        let j = cut_judgement(r#" { "pass" : true, "prob"#).unwrap();
        assert!(j.pass && j.problems.is_empty());
        let j = cut_judgement(r#"{"pass": false, "problems": ["a", "b"], "feedback": "the loo"#);
        assert_eq!(j.unwrap().problems, ["a", "b"]);
        // No verdict yet: nothing to keep.
        assert_eq!(cut_judgement(r#"{"pass": "#), None);
        assert_eq!(cut_judgement(r#"{"problems": []"#), None);
        assert_eq!(cut_judgement(""), None);
    }

    #[tokio::test]
    async fn a_review_cut_by_its_budget_still_rejects() {
        use crate::testing::{ScriptedModel, TestBed};
        let rambling = format!(
            r#"{{"pass": false, "problems": ["it never says why"], "feedback": "{}"#,
            "and so on ".repeat(200)
        );
        let bed = TestBed::new(ScriptedModel::new().on("validator", &rambling)).await;
        let ctx = bed.ctx();
        let route = crate::router::route_by_rules(&ctx.task);
        let spec = TaskSpec {
            id: "why".into(),
            kind: WorkerKind::Reasoning,
            description: "explain".into(),
            depends_on: vec![],
            acceptance: vec![],
            primary: true,
            critical: true,
        };
        let artifact = Artifact {
            subtask: "why".into(),
            kind: WorkerKind::Reasoning,
            attempt: 1,
            candidate: 1,
            text: "Adding two numbers gives their sum, as arithmetic says.".into(),
            code: None,
            files: vec![],
        };
        let v = validate(&ctx, &route, &spec, &artifact, &Evidence::default()).await;
        assert!(!v.passed, "{v:?}");
        let judge = v.judge.unwrap();
        assert_eq!(judge.problems, ["it never says why"]);
        assert!(judge.feedback.contains("cut off"), "{}", judge.feedback);
    }
}
