//! Stages 11 and 13, the synthesizer and its retry: the collected outputs integrated into
//! the final files (the module, its tests, a README section where asked, an analysis script
//! and its figures), with duplicate definitions and imports resolved, and the answer's
//! prose written by the LLM. On a failed final validation, `repair` re-synthesizes the
//! module with the final validator's feedback.

use std::collections::HashSet;

use serde::Serialize;
use serde_json::{json, Value};

use crate::collector::{target_of, Collected};
use crate::job::{JobContext, LlmCall, MODULE_NAME};
use crate::python::{self, StatementKind};
use crate::router::{Route, RouteKind};
use crate::stage::{LlmStage, StageOutput};
use crate::trace::EventStatus;
use crate::workers::{GeneratedFile, WorkerKind};
use crate::Result;

/// The integrated result.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Synthesis {
    /// The main module's source.
    pub module: Option<String>,
    pub tests: Option<String>,
    pub readme: Option<String>,
    pub analysis: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub figures: Vec<GeneratedFile>,
    /// The answer's prose: what was built, or the explanation asked for.
    pub answer: String,
    /// What integration changed (dropped duplicates, added imports).
    pub notes: Vec<String>,
    /// 0 for the first synthesis, then one per repair.
    pub revision: usize,
}

/// What a file of the result is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileRole {
    Module,
    Tests,
    Readme,
    Analysis,
    Figure,
}

/// A file of the result.
#[derive(Clone, Debug, Serialize)]
pub struct OutputFile {
    pub path: String,
    pub role: FileRole,
    /// Text content (empty for figures, which have `bytes`).
    pub content: String,
    #[serde(skip)]
    pub bytes: Vec<u8>,
}

impl Synthesis {
    pub fn files(&self, module: &str) -> Vec<OutputFile> {
        let mut out = Vec::new();
        let mut text = |path: String, role: FileRole, content: &Option<String>| {
            if let Some(c) = content {
                out.push(OutputFile {
                    path,
                    role,
                    content: c.clone(),
                    bytes: Vec::new(),
                });
            }
        };
        text(
            target_of(WorkerKind::Code, module),
            FileRole::Module,
            &self.module,
        );
        text(
            target_of(WorkerKind::Tests, module),
            FileRole::Tests,
            &self.tests,
        );
        text(
            target_of(WorkerKind::Docs, module),
            FileRole::Readme,
            &self.readme,
        );
        text(
            target_of(WorkerKind::DataAnalysis, module),
            FileRole::Analysis,
            &self.analysis,
        );
        for f in &self.figures {
            out.push(OutputFile {
                path: f.name.clone(),
                role: FileRole::Figure,
                content: String::new(),
                bytes: f.bytes.clone(),
            });
        }
        out
    }
}

fn push_import(imports: &mut Vec<String>, text: &str) {
    let t = text.trim().to_string();
    if !imports.contains(&t) {
        imports.push(t);
    }
}

/// Merges modules: imports once each, the first definition of each name (later ones are
/// dropped with a note), other statements once, one `__main__` block at the end.
pub fn merge_modules(parts: &[(&str, &str)], header: &str, notes: &mut Vec<String>) -> String {
    let mut imports: Vec<String> = Vec::new();
    let mut body: Vec<String> = Vec::new();
    let mut defined: HashSet<String> = HashSet::new();
    let mut seen_other: HashSet<String> = HashSet::new();
    let mut main_guard: Option<String> = None;
    for (from, code) in parts {
        for s in python::statements(code) {
            match &s.kind {
                StatementKind::Import => push_import(&mut imports, &s.text),
                StatementKind::Def(n) | StatementKind::Class(n) => {
                    if defined.insert(n.clone()) {
                        body.push(s.text.trim_end().to_string());
                    } else {
                        notes.push(format!(
                            "duplicate definition of `{n}` from `{from}` dropped"
                        ));
                    }
                }
                StatementKind::MainGuard => {
                    if main_guard.is_none() {
                        main_guard = Some(s.text.trim_end().to_string());
                    } else {
                        notes.push(format!("second `__main__` block from `{from}` dropped"));
                    }
                }
                StatementKind::Other => {
                    let t = s.text.trim_end().to_string();
                    if seen_other.insert(t.clone()) {
                        body.push(t);
                    }
                }
            }
        }
    }
    for i in python::imports(header) {
        if !imports.contains(&i) {
            notes.push(format!("`{i}` added from the task"));
            imports.insert(0, i);
        }
    }
    let mut out = String::new();
    if !imports.is_empty() {
        out.push_str(&imports.join("\n"));
        out.push_str("\n\n\n");
    }
    out.push_str(&body.join("\n\n\n"));
    if let Some(m) = main_guard {
        out.push_str("\n\n\n");
        out.push_str(&m);
    }
    out.push('\n');
    out
}

/// Merges test files: imports once, test functions renamed when two share a name.
pub fn merge_tests(parts: &[&str]) -> String {
    let mut imports: Vec<String> = Vec::new();
    let mut body = Vec::new();
    let mut names: HashSet<String> = HashSet::new();
    for code in parts {
        for s in python::statements(code) {
            match &s.kind {
                StatementKind::Import => push_import(&mut imports, &s.text),
                StatementKind::Def(n) | StatementKind::Class(n) => {
                    let mut text = s.text.trim_end().to_string();
                    if !names.insert(n.clone()) {
                        let new = (2..)
                            .map(|k| format!("{n}_{k}"))
                            .find(|c| !names.contains(c))
                            .unwrap_or_default();
                        text = text.replacen(&format!("def {n}("), &format!("def {new}("), 1);
                        names.insert(new);
                    }
                    body.push(text);
                }
                _ => body.push(s.text.trim_end().to_string()),
            }
        }
    }
    format!("{}\n\n\n{}\n", imports.join("\n"), body.join("\n\n\n"))
}

/// Integrates the outputs and, with `prose`, asks the LLM for the answer's prose (without
/// it, where there is code, the answer is a fixed note and no model is asked).
pub async fn synthesize(
    ctx: &JobContext,
    route: &Route,
    collected: &Collected,
    prose: bool,
) -> Result<Synthesis> {
    let mut s = Synthesis::default();
    let header = route.stub.clone().unwrap_or_default();
    let mut code: Vec<_> = collected.of_kind(WorkerKind::Code).collect();
    code.sort_by_key(|o| !o.primary);
    let parts: Vec<(&str, &str)> = code
        .iter()
        .filter_map(|o| Some((o.subtask.as_str(), o.artifact.code.as_deref()?)))
        .collect();
    if !parts.is_empty() {
        s.module = Some(merge_modules(&parts, &header, &mut s.notes));
    }
    let tests: Vec<&str> = collected
        .of_kind(WorkerKind::Tests)
        .filter_map(|o| o.artifact.code.as_deref())
        .collect();
    if !tests.is_empty() && s.module.is_some() {
        s.tests = Some(merge_tests(&tests));
    }
    if let Some(d) = collected.of_kind(WorkerKind::DataAnalysis).next() {
        s.analysis = d.artifact.code.clone();
        s.figures = d.artifact.files.clone();
    }
    let wants_readme = ctx.task.task.to_lowercase().contains("readme");
    let docs: Vec<&str> = collected
        .of_kind(WorkerKind::Docs)
        .map(|o| o.artifact.text.as_str())
        .collect();
    if !docs.is_empty() || wants_readme {
        let title = route
            .entry_point
            .clone()
            .unwrap_or_else(|| ctx.module_name());
        s.readme = Some(format!("## {title}\n\n{}\n", docs.join("\n\n").trim()));
    }
    let notes: Vec<_> = collected
        .outputs
        .iter()
        .filter(|o| {
            matches!(
                o.kind,
                WorkerKind::Reasoning | WorkerKind::Research | WorkerKind::Docs
            )
        })
        .map(|o| json!({"id": o.subtask, "kind": o.kind.name(), "text": o.artifact.text}))
        .collect();
    if !prose && (s.module.is_some() || s.analysis.is_some()) {
        // Only the code was asked for (`--format code`, which prints the module alone):
        // a summary nobody reads would cost a model call.
        s.answer = "(no summary: only the code was asked for)".into();
        return Ok(s);
    }
    let mode = if route.kind == RouteKind::ExplainOrResearch {
        "answer"
    } else {
        "summary"
    };
    let prompt = ctx.prompts().render(
        LlmStage::Synthesizer,
        json!({"mode": mode, "task": ctx.task.task, "route": route, "module": s.module,
               "analysis": s.analysis, "notes": notes, "feedback": null}),
    )?;
    // The prose is short; the token budget of the stage is for repairs.
    let out = ctx
        .llm(
            LlmCall::new(LlmStage::Synthesizer, prompt).max_tokens(if mode == "answer" {
                320
            } else {
                96
            }),
        )
        .await?;
    s.answer = out.text.trim().to_string();
    if s.answer.is_empty() {
        // The prose is a courtesy; the files stand on their own.
        s.answer = notes
            .iter()
            .filter_map(|n| n["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n\n");
    }
    Ok(s)
}

impl StageOutput for Synthesis {
    fn trace_output(&self) -> Value {
        json!({"synthesis": self})
    }

    fn outcome(&self) -> (EventStatus, String) {
        let notes = if self.notes.is_empty() {
            String::new()
        } else {
            format!("; {}", self.notes.join("; "))
        };
        (
            EventStatus::Finished,
            format!("{} file(s){notes}", self.files(MODULE_NAME).len()),
        )
    }
}

/// Re-synthesizes the module with the final validator's feedback. None when the model
/// answered with no code.
pub async fn repair(
    ctx: &JobContext,
    route: &Route,
    s: &Synthesis,
    feedback: &str,
) -> Result<Option<Synthesis>> {
    let Some(module) = &s.module else {
        return Ok(None);
    };
    let prompt = ctx.prompts().render(
        LlmStage::Synthesizer,
        json!({"mode": "repair", "task": ctx.task.task, "route": route, "module": module,
               "analysis": s.analysis, "notes": [], "feedback": feedback}),
    )?;
    let prefix = prompt.assistant.clone();
    let call = LlmCall::new(LlmStage::Synthesizer, prompt)
        .stop("```")
        .seed(s.revision as u64 + 1)
        .temperature(0.2);
    let out = ctx.llm(call).await?;
    let Some(code) = python::extract_code(&format!("{prefix}{}", out.text)) else {
        return Ok(None);
    };
    let mut notes = Vec::new();
    let header = route.stub.clone().unwrap_or_default();
    let mut next = s.clone();
    next.module = Some(merge_modules(&[("repair", &code)], &header, &mut notes));
    next.notes.extend(notes);
    next.revision += 1;
    Ok(Some(next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_merge_without_duplicates() {
        let mut notes = Vec::new();
        let a = "import math\n\ndef area(r):\n    return math.pi * r * r\n\nif __name__ == \"__main__\":\n    print(area(1))\n";
        let b = "import math\nfrom typing import List\n\nPI = 3\n\ndef area(r):\n    return 3 * r * r\n\ndef areas(rs: List[float]):\n    return [area(r) for r in rs]\n";
        let merged = merge_modules(
            &[("main", a), ("helpers", b)],
            "import math\nimport os\n",
            &mut notes,
        );
        assert_eq!(merged.matches("import math").count(), 1);
        assert_eq!(merged.matches("def area(").count(), 1);
        assert!(merged.contains("math.pi"), "the first definition wins");
        assert!(merged.contains("def areas("));
        assert!(
            merged.starts_with("import os\nimport math\nfrom typing import List\n"),
            "{merged}"
        );
        assert!(merged.trim_end().ends_with("print(area(1))"), "{merged}");
        assert!(
            notes
                .iter()
                .any(|n| n.contains("duplicate definition of `area` from `helpers`")),
            "{notes:?}"
        );
        assert!(
            notes.iter().any(|n| n.contains("`import os` added")),
            "{notes:?}"
        );
    }

    #[test]
    fn tests_merge_with_renamed_collisions() {
        let t = merge_tests(&[
            "from solution import *\n\ndef test_a():\n    assert f(1) == 1\n",
            "from solution import *\nimport pytest\n\ndef test_a():\n    assert f(2) == 2\n",
        ]);
        assert_eq!(t.matches("from solution import *").count(), 1);
        assert!(
            t.contains("def test_a():") && t.contains("def test_a_2():"),
            "{t}"
        );
    }
}
