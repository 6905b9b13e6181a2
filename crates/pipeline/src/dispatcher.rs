//! Stage 4, the worker dispatcher: a queue of ready subtasks (all their dependencies done),
//! run concurrently up to the job's limit so that their LLM calls batch in the scheduler.
//! Each subtask gets its dependencies' outputs as context; models are balanced per call
//! (see `JobContext::llm`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::collector::covering_tests;
use crate::job::JobContext;
use crate::planning::{Dag, TaskSpec};
use crate::retry::{self, SubtaskResult};
use crate::router::Route;
use crate::stage::{Stage, StageOutput};
use crate::trace::EventStatus;
use crate::validators::Evidence;
use crate::workers::{KindStats, WorkerStats};

/// What the dispatcher hands on.
pub struct Dispatched {
    /// Every subtask's result, in DAG order.
    pub results: Vec<SubtaskResult>,
    /// The workers' figures by kind name.
    pub workers: BTreeMap<String, KindStats>,
    /// Subtask ids in the order they were dispatched.
    pub order: Vec<String>,
    /// The most subtasks that ran at once.
    pub max_running: usize,
}

/// The dispatcher's input as the trace shows it.
pub fn trace_input(dag: &Dag, max_concurrent: usize) -> Value {
    json!({"tasks": dag.specs.iter().map(|s| &s.id).collect::<Vec<_>>(), "max_concurrent": max_concurrent})
}

impl StageOutput for Dispatched {
    fn trace_output(&self) -> Value {
        json!({"dispatch_order": self.order, "max_running": self.max_running,
               "workers": self.workers})
    }

    fn outcome(&self) -> (EventStatus, String) {
        let passed = self.results.iter().filter(|r| r.passed).count();
        (
            EventStatus::Finished,
            format!(
                "{} subtask(s) run, {passed} passed their checks, at most {} at once",
                self.results.len(),
                self.max_running
            ),
        )
    }
}

/// Runs every subtask of the DAG.
pub async fn dispatch(
    ctx: &JobContext,
    route: &Route,
    dag: &Dag,
    evidence: &Evidence,
) -> Dispatched {
    let workers = Arc::new(WorkerStats::default());
    let limit = ctx.config().limits.max_concurrent_workers;
    let mut pending: Vec<TaskSpec> = dag.specs.clone();
    let mut done: HashMap<String, SubtaskResult> = HashMap::new();
    let mut running: JoinSet<SubtaskResult> = JoinSet::new();
    let mut names: HashMap<tokio::task::Id, TaskSpec> = HashMap::new();
    let mut max_running = 0;
    let mut order = Vec::new();
    loop {
        while running.len() < limit {
            let Some(pos) = pending
                .iter()
                .position(|s| s.depends_on.iter().all(|d| done.contains_key(d)))
            else {
                break;
            };
            let spec = pending.remove(pos);
            let deps: Vec<SubtaskResult> = spec
                .depends_on
                .iter()
                .filter_map(|d| done.get(d).cloned())
                .collect();
            let mut ev = evidence.clone();
            ev.generated = covering_tests(&spec, &deps)
                .into_iter()
                .filter_map(|d| d.artifact.as_ref()?.code.clone())
                .collect();
            ctx.progress(
                Stage::Dispatcher,
                EventStatus::Progress,
                Some(&spec.id),
                None,
                format!(
                    "dispatched {} ({} worker{})",
                    spec.id,
                    spec.kind.name(),
                    if spec.critical { ", critical path" } else { "" }
                ),
            );
            order.push(spec.id.clone());
            let (ctx2, m2, r2, s2) = (ctx.clone(), workers.clone(), route.clone(), spec.clone());
            let handle = running.spawn(async move {
                retry::run_subtask(&ctx2, &m2, &r2, &s2, &deps, Arc::new(ev)).await
            });
            names.insert(handle.id(), spec);
            max_running = max_running.max(running.len());
        }
        let Some(joined) = running.join_next_with_id().await else {
            break;
        };
        let result = match joined {
            Ok((_, r)) => r,
            Err(e) => {
                let spec = names.get(&e.id()).cloned().expect("every task has a spec");
                SubtaskResult {
                    stopped: format!("the worker task failed: {e}"),
                    spec,
                    artifact: None,
                    verdict: None,
                    attempts: Vec::new(),
                    passed: false,
                    selection: None,
                    log: Vec::new(),
                }
            }
        };
        done.insert(result.spec.id.clone(), result);
    }
    Dispatched {
        results: dag
            .specs
            .iter()
            .filter_map(|s| done.remove(&s.id))
            .collect(),
        workers: workers.snapshot(),
        order,
        max_running,
    }
}
