//! Stage prompts: one minijinja template per stage in `prompts/`, built into the binary and
//! overridable file by file from a directory (`--prompts DIR`). A stage template defines
//! the blocks `system` and `user`, and may define `assistant` (the start of the answer,
//! which the model continues).

use std::path::Path;

use forgeline_engine::chat::ChatMessage;
use minijinja::Environment;
use serde::Serialize;

use crate::stage::LlmStage;
use crate::workers::WorkerKind;
use crate::{Error, Result};

/// The report's template (`prompts/report.j2`), the one template that is not a stage's.
pub const REPORT: &str = "report";

/// A stage's built-in template.
fn built_in(stage: LlmStage) -> &'static str {
    match stage {
        LlmStage::Router => include_str!("../../../prompts/router.j2"),
        LlmStage::Orchestrator => include_str!("../../../prompts/orchestrator.j2"),
        LlmStage::Worker(WorkerKind::Code) => include_str!("../../../prompts/code.j2"),
        LlmStage::Worker(WorkerKind::Tests) => include_str!("../../../prompts/tests.j2"),
        LlmStage::Worker(WorkerKind::Reasoning) => include_str!("../../../prompts/reasoning.j2"),
        LlmStage::Worker(WorkerKind::Research) => include_str!("../../../prompts/research.j2"),
        LlmStage::Worker(WorkerKind::Docs) => include_str!("../../../prompts/docs.j2"),
        LlmStage::Worker(WorkerKind::DataAnalysis) => {
            include_str!("../../../prompts/data_analysis.j2")
        }
        LlmStage::Validator => include_str!("../../../prompts/validator.j2"),
        LlmStage::Synthesizer => include_str!("../../../prompts/synthesizer.j2"),
        LlmStage::FinalValidator => include_str!("../../../prompts/final_validator.j2"),
    }
}

/// Every built-in template, by name (file `prompts/<name>.j2`).
fn built_ins() -> impl Iterator<Item = (&'static str, &'static str)> {
    LlmStage::ALL
        .into_iter()
        .map(|s| (s.name(), built_in(s)))
        .chain([(REPORT, include_str!("../../../prompts/report.j2"))])
}

/// A rendered stage prompt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RenderedPrompt {
    pub system: String,
    pub user: String,
    /// The answer's first characters, written for the model.
    pub assistant: String,
}

impl RenderedPrompt {
    pub fn messages(&self) -> Vec<ChatMessage> {
        let mut m = Vec::with_capacity(2);
        if !self.system.trim().is_empty() {
            m.push(ChatMessage::system(self.system.trim()));
        }
        m.push(ChatMessage::user(self.user.trim()));
        m
    }
}

pub struct Prompts {
    env: Environment<'static>,
}

impl Prompts {
    /// The built-in templates.
    pub fn built_in() -> Self {
        Self::load(None).expect("the built-in prompt templates compile")
    }

    /// The built-in templates, with those in `dir` (files named `<stage>.j2`) instead.
    pub fn load(dir: Option<&Path>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        for (name, src) in built_ins() {
            env.add_template_owned(name.to_string(), src.to_string())
                .map_err(|source| Error::Template {
                    name: name.to_string(),
                    source,
                })?;
        }
        if let Some(dir) = dir {
            let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
            for entry in entries {
                let path = entry.map_err(|e| Error::io(dir, e))?.path();
                let Some(stem) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".j2"))
                else {
                    continue;
                };
                if !built_ins().any(|(n, _)| n == stem) {
                    return Err(Error::UnknownTemplate {
                        name: stem.to_string(),
                        path,
                    });
                }
                let src = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
                env.add_template_owned(stem.to_string(), src)
                    .map_err(|source| Error::Template {
                        name: path.display().to_string(),
                        source,
                    })?;
            }
        }
        Ok(Self { env })
    }

    /// Renders a stage's blocks with `ctx`.
    pub fn render<S: Serialize>(&self, stage: LlmStage, ctx: S) -> Result<RenderedPrompt> {
        let err = |source| Error::Template {
            name: stage.name().to_string(),
            source,
        };
        let tmpl = self.env.get_template(stage.name()).map_err(err)?;
        let mut captured = tmpl.render_captured(ctx).map_err(err)?;
        let mut block = |name: &str| -> Result<String> {
            captured.with_state_mut(|state| match state.render_block(name) {
                Err(e) if e.kind() == minijinja::ErrorKind::UnknownBlock => Ok(String::new()),
                r => r.map_err(err),
            })
        };
        let rendered = RenderedPrompt {
            system: block("system")?,
            user: block("user")?,
            assistant: block("assistant")?,
        };
        if rendered.user.trim().is_empty() {
            return Err(Error::EmptyPrompt {
                name: stage.name().to_string(),
            });
        }
        Ok(rendered)
    }

    /// Renders the markdown report.
    pub fn render_report<S: Serialize>(&self, ctx: S) -> Result<String> {
        let err = |source| Error::Template {
            name: REPORT.to_string(),
            source,
        };
        self.env
            .get_template(REPORT)
            .map_err(err)?
            .render(ctx)
            .map_err(err)
    }
}

/// The templates' names (files `<name>.j2`).
pub fn template_names() -> Vec<&'static str> {
    built_ins().map(|(n, _)| n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn built_in_templates_render() {
        let p = Prompts::built_in();
        let r = p
            .render(
                LlmStage::Worker(WorkerKind::Code),
                json!({"task": "Write add(a, b).", "subtask": {"description": "add", "acceptance": [], "primary": true},
                       "route": {"kind": "new_function", "entry_point": "add"}, "context": [],
                       "feedback": null, "stub": null, "files": []}),
            )
            .unwrap();
        assert!(r.user.contains("Write add(a, b)."), "{}", r.user);
        assert!(r.assistant.starts_with("```python"), "{:?}", r.assistant);
        assert_eq!(r.messages().len(), 2);
    }

    #[test]
    fn the_code_template_states_a_stub_as_a_spec() {
        let p = Prompts::built_in();
        let stub = "def double(x: int) -> int:\n    \"\"\"Return x twice.\n\n    >>> double(2)\n    4\n    \"\"\"\n";
        let ctx = |framing: &str| {
            json!({"task": stub, "stub": stub, "framing": framing,
                   "spec": {"signature": "double(x: int) -> int", "description": "Return x twice.",
                            "examples": [{"call": "double(2)", "expected": "4"}]},
                   "subtask": {"description": "double", "acceptance": [], "primary": true},
                   "route": {"kind": "new_function"}, "context": [], "feedback": null, "files": []})
        };
        let spec = p
            .render(LlmStage::Worker(WorkerKind::Code), ctx("spec"))
            .unwrap();
        assert!(
            spec.user.starts_with("Write a Python function `double(x: int) -> int`.\n\nReturn x twice.\n\nExamples:\ndouble(2) == 4\n"),
            "{}",
            spec.user
        );
        assert!(!spec.user.contains(">>>"), "{}", spec.user);
        let completion = p
            .render(LlmStage::Worker(WorkerKind::Code), ctx("stub"))
            .unwrap();
        assert!(
            completion
                .user
                .starts_with("Complete this Python function:\n```python\ndef double"),
            "{}",
            completion.user
        );
        assert_eq!(spec.assistant, "```python\n");
    }

    #[test]
    fn a_directory_overrides_one_stage() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("router.j2"),
            "{% block user %}Route: {{ task }}{% endblock %}",
        )
        .unwrap();
        let p = Prompts::load(Some(dir.path())).unwrap();
        let r = p.render(LlmStage::Router, json!({"task": "x"})).unwrap();
        assert_eq!(r.user, "Route: x");
        assert_eq!(r.system, "");

        std::fs::write(
            dir.path().join("rooter.j2"),
            "{% block user %}x{% endblock %}",
        )
        .unwrap();
        let e = Prompts::load(Some(dir.path())).err().unwrap().to_string();
        assert!(e.contains("no stage is called `rooter`"), "{e}");
    }

    #[test]
    fn a_template_error_names_the_stage() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("docs.j2"),
            "{% block user %}{{ nope.x }}{% endblock %}",
        )
        .unwrap();
        let p = Prompts::load(Some(dir.path())).unwrap();
        let e = p
            .render(LlmStage::Worker(WorkerKind::Docs), json!({}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("template `docs`"), "{e}");
    }
}
