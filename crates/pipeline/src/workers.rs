//! Stage 6, the workers: code, tests, reasoning, research (the task, the user's files and
//! the installed Python's own documentation, read with pydoc in the sandbox), docs and
//! data analysis; and stage 5's per-kind figures (`WorkerStats`: in flight, successes,
//! failures, latency), which the dispatcher keeps for the trace.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use std::future::Future;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::Semaphore;

use forgeline_sandbox::{Check, Job, Module};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::job::{JobContext, LlmCall};
use crate::planning::TaskSpec;
use crate::python;
use crate::retry::{Feedback, SubtaskResult};
use crate::router::Route;
use crate::stage::LlmStage;
use crate::Result;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerKind {
    Code,
    Tests,
    Reasoning,
    Research,
    /// Documentation and other prose (the design's creative worker).
    Docs,
    DataAnalysis,
}

impl WorkerKind {
    pub const ALL: [WorkerKind; 6] = [
        WorkerKind::Code,
        WorkerKind::Tests,
        WorkerKind::Reasoning,
        WorkerKind::Research,
        WorkerKind::Docs,
        WorkerKind::DataAnalysis,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WorkerKind::Code => "code",
            WorkerKind::Tests => "tests",
            WorkerKind::Reasoning => "reasoning",
            WorkerKind::Research => "research",
            WorkerKind::Docs => "docs",
            WorkerKind::DataAnalysis => "data_analysis",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        let s = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .or(match s.as_str() {
                "creative" | "documentation" => Some(WorkerKind::Docs),
                "test" | "testing" => Some(WorkerKind::Tests),
                "data" | "analysis" => Some(WorkerKind::DataAnalysis),
                _ => None,
            })
    }

    /// Kinds whose output is Python code.
    pub fn writes_code(self) -> bool {
        matches!(
            self,
            WorkerKind::Code | WorkerKind::Tests | WorkerKind::DataAnalysis
        )
    }
}

/// A file an output produced when it ran (a figure).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GeneratedFile {
    pub name: String,
    pub size: u64,
    #[serde(skip)]
    pub bytes: Vec<u8>,
}

/// One worker output (one candidate of one attempt).
#[derive(Clone, Debug, Serialize)]
pub struct Artifact {
    pub subtask: String,
    pub kind: WorkerKind,
    pub attempt: usize,
    pub candidate: usize,
    /// The model's answer as written (for code kinds, including the part given to it).
    pub text: String,
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<GeneratedFile>,
}

/// One attempt at a subtask, as handed to a worker.
#[derive(Clone, Copy)]
pub struct Assignment<'a> {
    pub route: &'a Route,
    pub spec: &'a TaskSpec,
    /// The finished subtasks it depends on.
    pub deps: &'a [SubtaskResult],
    /// What was wrong with the previous attempt.
    pub feedback: Option<&'a Feedback>,
    pub attempt: usize,
}

/// Figures of one worker kind.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KindStats {
    pub in_flight: usize,
    pub max_in_flight: usize,
    pub calls: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub total_ms: u64,
    pub mean_ms: u64,
}

/// Per-kind figures of one job's workers, for the dispatcher's trace (`workers` in the job
/// trace). This is all that is left of the design's worker manager: a kind's model, prompt
/// and sampling are its `LlmStage`'s, and calls are balanced over a stage's models per call
/// by `JobContext::llm`, so a registry of them could not change a result.
#[derive(Default)]
pub struct WorkerStats(Mutex<BTreeMap<WorkerKind, KindStats>>);

impl WorkerStats {
    /// Runs `produce` for one attempt of a `kind` worker, counting it.
    pub async fn attempt<T>(&self, kind: WorkerKind, produce: impl Future<Output = T>) -> T {
        self.update(kind, |s| {
            s.in_flight += 1;
            s.max_in_flight = s.max_in_flight.max(s.in_flight);
            s.calls += 1;
        });
        let started = Instant::now();
        // Counted out also when the attempt is dropped (its job cancelled).
        let _done = scopeguard(|| {
            let ms = started.elapsed().as_millis() as u64;
            self.update(kind, |s| {
                s.in_flight -= 1;
                s.total_ms += ms;
            });
        });
        produce.await
    }

    /// Counts a subtask's end.
    pub fn finished(&self, kind: WorkerKind, passed: bool) {
        self.update(kind, |s| {
            if passed {
                s.succeeded += 1
            } else {
                s.failed += 1
            }
        });
    }

    fn update(&self, kind: WorkerKind, f: impl FnOnce(&mut KindStats)) {
        if let Ok(mut m) = self.0.lock() {
            f(m.entry(kind).or_default());
        }
    }

    /// The figures by kind name.
    pub fn snapshot(&self) -> BTreeMap<String, KindStats> {
        self.0
            .lock()
            .map(|m| {
                m.iter()
                    .map(|(k, s)| {
                        let mut s = s.clone();
                        s.mean_ms = s.total_ms / s.calls.max(1) as u64;
                        (k.name().to_string(), s)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f()
            }
        }
    }
    Guard(Some(f))
}

/// Runs a worker for one attempt. Each candidate is sent to `out` as soon as it is
/// written, so that its validation starts while the others are still being written;
/// returns how many were sent. Dropping the future cancels the candidates not written.
pub async fn produce(
    ctx: &JobContext,
    a: Assignment<'_>,
    out: &UnboundedSender<Artifact>,
) -> Result<usize> {
    let spec = a.spec;
    let input = WorkerInput {
        ctx,
        route: a.route,
        spec,
        deps: a.deps,
        feedback: a.feedback,
        attempt: a.attempt,
        stage: LlmStage::Worker(spec.kind),
    };
    let one = |r: Result<Artifact>| {
        r.map(|a| {
            let _ = out.send(a);
            1
        })
    };
    match spec.kind {
        WorkerKind::Code | WorkerKind::DataAnalysis => input.code(out).await,
        WorkerKind::Tests => one(input.tests().await),
        WorkerKind::Research => one(input.research().await),
        WorkerKind::Reasoning | WorkerKind::Docs => one(input.prose(None).await),
    }
}

struct WorkerInput<'a> {
    ctx: &'a JobContext,
    route: &'a Route,
    spec: &'a TaskSpec,
    deps: &'a [SubtaskResult],
    feedback: Option<&'a Feedback>,
    attempt: usize,
    /// Its model, prompt and sampling.
    stage: LlmStage,
}

impl WorkerInput<'_> {
    /// What every worker template gets.
    fn context(&self, extra: serde_json::Value) -> serde_json::Value {
        let deps: Vec<_> = self
            .deps
            .iter()
            .filter_map(|d| {
                let a = d.artifact.as_ref()?;
                Some(json!({"id": d.spec.id, "kind": a.kind.name(),
                            "text": a.code.as_deref().unwrap_or(&a.text)}))
            })
            .collect();
        let files: Vec<_> = self
            .ctx
            .task
            .files
            .iter()
            .map(|f| json!({"name": f.name, "content": f.content}))
            .collect();
        let mut v = json!({
            "task": self.ctx.task.task,
            "subtask": self.spec,
            "route": self.route,
            "context": deps,
            "files": files,
            "feedback": self.feedback,
            "stub": self.route.stub,
            "module": self.ctx.module_name(),
            "attempt": self.attempt,
        });
        if let (Some(m), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
            m.extend(e);
        }
        v
    }

    fn artifact(&self, candidate: usize, text: String, code: Option<String>) -> Artifact {
        Artifact {
            subtask: self.spec.id.clone(),
            kind: self.spec.kind,
            attempt: self.attempt,
            candidate,
            text,
            code,
            files: Vec::new(),
        }
    }

    /// How the code candidates put the task to the model. A small model's answer depends
    /// more on the wording than on sampling: on the default model, candidates asked to
    /// complete the stub and candidates given the same function as a spec (signature,
    /// prose, examples as equalities) solve different tasks, where more samples of one
    /// wording mostly repeat its answers. With a stub, candidates alternate between the
    /// two; the examples check then picks whichever passes.
    fn framings(&self) -> Vec<(&'static str, serde_json::Value)> {
        let stub = self.route.stub.as_deref().filter(|_| self.spec.primary);
        let spec = stub.and_then(|stub| {
            let sig = self.route.signature.as_ref()?;
            let signature = sig.text.trim().strip_prefix("def ")?.trim_end_matches(':');
            let examples: Vec<_> = self
                .route
                .examples
                .iter()
                .filter(|e| !e.call.contains('\n') && !e.expected.contains('\n'))
                .collect();
            Some(json!({
                "signature": signature.trim(),
                "description": python::docstring_prose(stub)?,
                "examples": examples,
            }))
        });
        match spec {
            Some(spec) => vec![("stub", serde_json::Value::Null), ("spec", spec)],
            None => vec![("task", serde_json::Value::Null)],
        }
    }

    /// Several candidates at once (their calls batch in the scheduler), across the
    /// framings above, as many at a time as `JobContext::candidate_permit` allows: all of
    /// them on an idle engine, a few per job under load, so that the candidates not yet
    /// started when one passes cost nothing. Each writes the whole function: the default
    /// model, given a stub to continue, mostly closed the code block at once.
    async fn code(&self, out: &UnboundedSender<Artifact>) -> Result<usize> {
        let limits = &self.ctx.config().limits;
        let n = if self.attempt == 0 {
            limits.candidates
        } else {
            limits.candidates.div_ceil(2)
        };
        let header = self.route.stub.clone().unwrap_or_default();
        // One prompt per framing; candidates of a framing differ only in seed.
        let prompts = self
            .framings()
            .into_iter()
            .map(|(framing, spec)| {
                let mut extra = json!({"framing": framing, "spec": spec});
                // On a retry, the spec framing's candidates are fresh samples: the default
                // model rarely mends code from feedback, and a new sample of a different
                // wording sometimes lands where the mend does not.
                if self.attempt > 0 && framing == "spec" {
                    extra["feedback"] = serde_json::Value::Null;
                }
                self.ctx.prompts().render(self.stage, self.context(extra))
            })
            .collect::<Result<Vec<_>>>()?;
        let seen = Mutex::new(HashSet::new());
        let own = Semaphore::new(limits.job_candidates_in_flight);
        let mut calls = Vec::with_capacity(n);
        for i in 0..n {
            let prompt = prompts[i % prompts.len()].clone();
            // The first candidate of each framing is greedy, the others sampled.
            let greedy = self.attempt == 0 && i < prompts.len();
            let mut call = LlmCall::new(self.stage, prompt)
                .subtask(&self.spec.id)
                .seed((self.attempt * 1000 + i) as u64)
                .stop("```");
            if !greedy {
                call = call.temperature(limits.candidate_temperature);
            }
            if self.spec.critical {
                call = call.raise_priority();
            }
            let (header, seen, own) = (&header, &seen, &own);
            calls.push(async move {
                let prefix = call.prompt.assistant.clone();
                let permit = self.ctx.candidate_permit(own).await;
                let completion = self.ctx.llm(call).await?;
                drop(permit);
                // A model that opens its own code block ignored the start it was given.
                let text = if completion.text.trim_start().starts_with("```") {
                    completion.text
                } else {
                    format!("{prefix}{}", completion.text)
                };
                let code = python::extract_code(&text).map(|c| python::ensure_imports(&c, header));
                // Identical candidates would get identical verdicts: check each once.
                let key: String = code.as_deref().unwrap_or("").split_whitespace().collect();
                let fresh = seen.lock().map(|mut s| s.insert(key)).unwrap_or(true);
                if fresh {
                    let _ = out.send(self.artifact(i, text, code));
                }
                Ok::<usize, crate::Error>(usize::from(fresh))
            });
        }
        let mut sent = 0;
        let mut first_error = None;
        // Awaited together, so that their LLM calls batch in the scheduler.
        for r in futures_util::future::join_all(calls).await {
            match r {
                Ok(n) => sent += n,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) if sent == 0 => Err(e),
            _ => Ok(sent),
        }
    }

    async fn tests(&self) -> Result<Artifact> {
        let prompt = self
            .ctx
            .prompts()
            .render(self.stage, self.context(json!({})))?;
        let prefix = prompt.assistant.clone();
        let call = LlmCall::new(self.stage, prompt)
            .subtask(&self.spec.id)
            .stop("```");
        let c = self.ctx.llm(call).await?;
        let text = format!("{prefix}{}", c.text);
        let code = python::extract_code(&text);
        Ok(self.artifact(0, text, code))
    }

    async fn prose(&self, docs: Option<String>) -> Result<Artifact> {
        let prompt = self
            .ctx
            .prompts()
            .render(self.stage, self.context(json!({"pydoc": docs})))?;
        let call = LlmCall::new(self.stage, prompt)
            .subtask(&self.spec.id)
            .seed(self.attempt as u64);
        let c = self.ctx.llm(call).await?;
        Ok(self.artifact(0, c.text.trim().to_string(), None))
    }

    /// Reads the installed Python's documentation of what the task names, then writes notes.
    async fn research(&self) -> Result<Artifact> {
        let names = doc_targets(&self.ctx.task.task, self.route);
        let docs = if names.is_empty() {
            None
        } else {
            let program = format!(
                "import pydoc\nfor name in {names:?}:\n    try:\n        obj = pydoc.locate(name)\n        if obj is None:\n            continue\n        text = pydoc.render_doc(obj, renderer=pydoc.plaintext)\n        print('=== ' + name)\n        print(text[:1200])\n    except Exception as exc:\n        print('=== ' + name + ': ' + type(exc).__name__)\n"
            );
            let module = Module::new("research_docs", program.into_bytes())
                .map_err(crate::Error::Sandbox)?;
            match self.ctx.sandbox().run(Job::new(module, Check::Run)).await {
                Ok(r) if !r.stdout.trim().is_empty() => Some(r.stdout.chars().take(4000).collect()),
                Ok(_) => None,
                Err(e) => Some(format!("(pydoc could not run: {e})")),
            }
        };
        let looked_up = docs.is_some();
        let mut a = self.prose(docs).await?;
        if looked_up {
            a.text = format!("{}\n\nSources (pydoc): {}", a.text, names.join(", "));
        }
        Ok(a)
    }
}

/// Dotted names worth looking up with pydoc: libraries the router found, and `module.attr`
/// names in the task. At most six.
fn doc_targets(task: &str, route: &Route) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |s: String| {
        if out.len() < 6 && !out.contains(&s) {
            out.push(s);
        }
    };
    for token in task.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.')) {
        let token = token.trim_matches('.');
        let parts: Vec<&str> = token.split('.').collect();
        if parts.len() == 2
            && route.libraries.iter().any(|l| l == parts[0])
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_alphanumeric() || c == '_'))
        {
            push(token.to_string());
        }
    }
    for l in &route.libraries {
        if l.chars().all(|c| c.is_alphanumeric() || c == '_') {
            push(l.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_with_aliases() {
        assert_eq!(WorkerKind::from_name("Creative"), Some(WorkerKind::Docs));
        assert_eq!(
            WorkerKind::from_name("data_analysis"),
            Some(WorkerKind::DataAnalysis)
        );
        assert_eq!(WorkerKind::from_name("poetry"), None);
    }

    #[test]
    fn doc_targets_are_named_modules_and_attributes() {
        let task = crate::task::TaskRequest::new(
            "Use re.sub and itertools.groupby to clean text; see foo.bar",
        );
        let mut route = crate::router::route_by_rules(&task);
        route.libraries = vec!["re".into(), "itertools".into()];
        assert_eq!(
            doc_targets(&task.task, &route),
            vec!["re.sub", "itertools.groupby", "re", "itertools"]
        );
    }
}
