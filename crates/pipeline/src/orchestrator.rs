//! Stage 2, the orchestrator: one LLM call that plans subtasks (id, specialisation,
//! description, dependencies, acceptance criteria). The answer is JSON constrained to a
//! schema at sampling time, so even a tiny model's plan parses. An answer cut off by the
//! token budget (a small model can loop inside a string until the budget runs out) keeps the
//! subtasks it finished; a plan that is still unusable becomes a one-subtask plan. The trace
//! says which.

use forgeline_engine::stop::StopReason;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::job::{JobContext, LlmCall};
use crate::router::{Route, RouteKind};
use crate::stage::{LlmStage, StageOutput};
use crate::task::TaskRequest;
use crate::trace::EventStatus;
use crate::workers::WorkerKind;
use crate::Result;

/// A subtask's kind as the plan gave it: a worker kind (aliases such as `creative` read as
/// theirs), or text that names none, which planning repairs and records. Written as the
/// kind's name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum PlannedKind {
    Known(WorkerKind),
    Unknown(String),
}

impl From<String> for PlannedKind {
    fn from(s: String) -> Self {
        WorkerKind::from_name(&s).map_or(PlannedKind::Unknown(s), PlannedKind::Known)
    }
}

impl From<&str> for PlannedKind {
    fn from(s: &str) -> Self {
        s.to_string().into()
    }
}

impl From<PlannedKind> for String {
    fn from(k: PlannedKind) -> String {
        k.to_string()
    }
}

impl std::fmt::Display for PlannedKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlannedKind::Known(k) => f.write_str(k.name()),
            PlannedKind::Unknown(s) => f.write_str(s),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlannedSubtask {
    pub id: String,
    pub kind: PlannedKind,
    pub description: String,
    #[serde(default)]
    pub depends_on: Vec<String>,
    #[serde(default)]
    pub acceptance: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub subtasks: Vec<PlannedSubtask>,
    /// Why the one-subtask plan was used instead of the model's, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// Why only the subtasks the model finished were kept, if the answer was cut off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut: Option<String>,
}

/// The schema the orchestrator's answer is held to while it is sampled.
pub fn plan_schema(max_subtasks: usize) -> Value {
    let kinds: Vec<&str> = WorkerKind::ALL.iter().map(|k| k.name()).collect();
    json!({
        "type": "object",
        "properties": {
            "subtasks": {
                "type": "array",
                "minItems": 1,
                "maxItems": max_subtasks,
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,23}$"},
                        "kind": {"enum": kinds},
                        "description": {"type": "string", "maxLength": 160},
                        "depends_on": {
                            "type": "array",
                            "maxItems": 4,
                            "items": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,23}$"}
                        },
                        "acceptance": {
                            "type": "array",
                            "maxItems": 2,
                            "items": {"type": "string", "maxLength": 80}
                        }
                    },
                    "required": ["id", "kind", "description", "depends_on", "acceptance"],
                    "additionalProperties": false
                }
            }
        },
        "required": ["subtasks"],
        "additionalProperties": false
    })
}

/// The plan used when the model's is unusable: one subtask of the route's main kind.
pub fn single_subtask_plan(task: &TaskRequest, route: &Route, reason: String) -> Plan {
    let kind = main_kind(route.kind);
    Plan {
        subtasks: vec![PlannedSubtask {
            id: kind.name().to_string(),
            kind: PlannedKind::Known(kind),
            description: first_line(&task.task),
            depends_on: Vec::new(),
            acceptance: Vec::new(),
        }],
        fallback: Some(reason),
        cut: None,
    }
}

/// The subtasks a cut-off answer finished: the text up to the last subtask object that
/// closed inside the `subtasks` array, with the array and the plan closed after it. `None`
/// when no subtask was finished.
pub(crate) fn finished_subtasks(text: &str) -> Option<Plan> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let mut last = None;
    for (i, c) in text.char_indices() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' | '[' => depth += 1,
            '}' | ']' => {
                depth = depth.checked_sub(1)?;
                // Depth 2 is inside the plan's object and its `subtasks` array.
                if c == '}' && depth == 2 {
                    last = Some(i);
                }
            }
            _ => {}
        }
    }
    let closed = format!("{}]}}", &text[..=last?]);
    serde_json::from_str::<Plan>(&closed)
        .ok()
        .filter(|p| !p.subtasks.is_empty())
}

/// The worker kind that produces a route's result.
pub fn main_kind(route: RouteKind) -> WorkerKind {
    match route {
        RouteKind::DataAnalysis => WorkerKind::DataAnalysis,
        RouteKind::ExplainOrResearch => WorkerKind::Reasoning,
        _ => WorkerKind::Code,
    }
}

fn first_line(text: &str) -> String {
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    line.chars().take(200).collect()
}

/// The orchestrator's output: the plan, and the model's answer it came from.
pub struct Planned {
    pub plan: Plan,
    pub answer: String,
}

impl StageOutput for Planned {
    fn trace_output(&self) -> Value {
        json!({"answer": self.answer, "plan": self.plan})
    }

    fn outcome(&self) -> (EventStatus, String) {
        let plan = &self.plan;
        let msg = match (&plan.fallback, &plan.cut) {
            (Some(r), _) => format!("one-subtask plan: {r}"),
            (None, cut) => format!(
                "{} subtasks{}: {}",
                plan.subtasks.len(),
                if cut.is_some() {
                    " (those finished before the token budget cut the plan off)"
                } else {
                    ""
                },
                plan.subtasks
                    .iter()
                    .map(|s| format!("{} ({})", s.id, s.kind))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        (EventStatus::Finished, msg)
    }
}

/// Asks the model for a plan.
pub async fn plan(ctx: &JobContext, task: &TaskRequest, route: &Route) -> Result<Planned> {
    let max = ctx.config().limits.max_subtasks;
    let kinds: Vec<&str> = WorkerKind::ALL.iter().map(|k| k.name()).collect();
    let prompt = ctx.prompts().render(
        LlmStage::Orchestrator,
        json!({"task": task.task, "route": route, "kinds": kinds, "max_subtasks": max,
               "files": task.file_names(), "tests_supplied": task.tests.is_some()}),
    )?;
    let out = ctx
        .llm(LlmCall::new(LlmStage::Orchestrator, prompt).schema(plan_schema(max)))
        .await?;
    let plan = match serde_json::from_str::<Plan>(&out.text) {
        Ok(p) if !p.subtasks.is_empty() => p,
        Ok(_) => single_subtask_plan(task, route, "the plan had no subtasks".into()),
        Err(e) => {
            let why = format!(
                "the plan did not parse ({e}; stopped by {:?} after {} tokens)",
                out.stop_reason, out.usage.completion_tokens
            );
            match finished_subtasks(&out.text) {
                Some(mut p) if out.stop_reason == StopReason::MaxTokens => {
                    p.cut = Some(why);
                    p
                }
                _ => single_subtask_plan(task, route, why),
            }
        }
    };
    Ok(Planned {
        plan,
        answer: out.text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ScriptedModel, TestBed};

    async fn plan_with(answer: &str) -> Plan {
        let bed = TestBed::new(ScriptedModel::new().on("orchestrator", answer)).await;
        let task = TaskRequest::new("Write a function add(a, b) that returns a + b.");
        let route = crate::router::route_by_rules(&task);
        plan(&bed.ctx(), &task, &route).await.unwrap().plan
    }

    #[tokio::test]
    async fn a_good_plan_is_kept() {
        let p = plan_with(
            r#"{"subtasks": [{"id": "impl", "kind": "code", "description": "add", "depends_on": [], "acceptance": ["adds"]}]}"#,
        )
        .await;
        assert_eq!(p.fallback, None);
        assert_eq!(p.subtasks[0].id, "impl");
    }

    #[tokio::test]
    async fn malformed_or_empty_plans_fall_back_with_a_reason() {
        let p = plan_with(r#"{"subtasks": [{"id": "impl", "kind": "#).await;
        assert!(
            p.fallback.as_deref().unwrap().contains("did not parse"),
            "{p:?}"
        );
        assert_eq!(p.subtasks.len(), 1);
        assert_eq!(p.subtasks[0].kind, PlannedKind::Known(WorkerKind::Code));

        let p = plan_with("").await;
        assert!(p.fallback.is_some());
        let p = plan_with(r#"{"subtasks": []}"#).await;
        assert_eq!(p.fallback.as_deref(), Some("the plan had no subtasks"));
    }

    /// Two finished subtasks, then a third that loops until the budget cuts it.
    const LOOPING: &str = r#"{"subtasks": [{"id": "implement", "kind": "code", "description": "Write add(a, b) {not a brace}", "depends_on": [], "acceptance": ["add(1, 2) is 3"]}, {"id": "tests", "kind": "tests", "description": "Test \"add\" }]", "depends_on": ["implement"], "acceptance": []}, {"id": "research", "kind": "research", "description": "add is add and add is add and add is add and add is add and add is add and add is add"#;

    #[test]
    fn a_cut_answer_keeps_the_subtasks_it_finished() {
        let p = finished_subtasks(LOOPING).unwrap();
        let ids: Vec<_> = p.subtasks.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["implement", "tests"]);
        assert_eq!(p.subtasks[1].description, r#"Test "add" }]"#);
        assert_eq!(p.subtasks[1].depends_on, ["implement"]);
        // Nothing finished, or not a plan at all: nothing to keep.
        assert_eq!(
            finished_subtasks(r#"{"subtasks": [{"id": "impl", "kind": "#),
            None
        );
        assert_eq!(finished_subtasks("}}] not json {"), None);
        assert_eq!(finished_subtasks(""), None);
    }

    #[tokio::test]
    async fn a_plan_cut_by_the_budget_keeps_its_finished_subtasks() {
        let mut config = crate::config::PipelineConfig::default();
        let budget = LOOPING.split_whitespace().count() - 5;
        config
            .stages
            .get_mut(&LlmStage::Orchestrator)
            .unwrap()
            .max_tokens = budget;
        let bed =
            TestBed::with_config(ScriptedModel::new().on("orchestrator", LOOPING), config).await;
        let task = TaskRequest::new("Write a function add(a, b) that returns a + b.");
        let route = crate::router::route_by_rules(&task);
        let p = plan(&bed.ctx(), &task, &route).await.unwrap().plan;
        assert_eq!(p.fallback, None);
        assert_eq!(p.subtasks.len(), 2, "{p:?}");
        let cut = p.cut.as_deref().unwrap();
        assert!(cut.contains("MaxTokens"), "{cut}");

        // An answer that ends by itself is never salvaged, even if it does not parse.
        let p = plan_with(&LOOPING[..LOOPING.len() / 2]).await;
        assert!(p.fallback.is_some(), "{p:?}");
        assert_eq!(p.cut, None);
    }

    #[test]
    fn the_schema_lists_every_worker_kind() {
        let s = plan_schema(4).to_string();
        for k in WorkerKind::ALL {
            assert!(s.contains(k.name()));
        }
    }
}
