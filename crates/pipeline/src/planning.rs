//! Stage 3, the task planning service: the orchestrator's plan made into a DAG of task
//! specs that can run. Unknown kinds and dependencies, duplicate ids, cycles and oversize
//! plans are repaired, each repair recorded with its reason.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use serde_json::{json, Value};

use crate::orchestrator::{main_kind, Plan, PlannedKind};
use crate::router::{Route, RouteKind};
use crate::stage::StageOutput;
use crate::trace::EventStatus;
use crate::workers::WorkerKind;

/// One runnable subtask.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TaskSpec {
    pub id: String,
    pub kind: WorkerKind,
    pub description: String,
    pub depends_on: Vec<String>,
    pub acceptance: Vec<String>,
    /// The subtask whose output is the job's main result.
    pub primary: bool,
    /// On the path to the primary subtask: its validations go first.
    pub critical: bool,
}

/// The plan as a DAG, in an order where dependencies come first.
#[derive(Clone, Debug, Serialize)]
pub struct Dag {
    pub specs: Vec<TaskSpec>,
    pub repairs: Vec<String>,
}

impl Dag {
    pub fn get(&self, id: &str) -> Option<&TaskSpec> {
        self.specs.iter().find(|s| s.id == id)
    }

    pub fn primary(&self) -> &TaskSpec {
        self.specs
            .iter()
            .find(|s| s.primary)
            .unwrap_or(&self.specs[0])
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 24
        && id.starts_with(|c: char| c.is_ascii_lowercase())
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Builds the DAG from a plan: each step repairs one kind of problem and records why.
pub fn build_dag(plan: &Plan, route: &Route, max_subtasks: usize) -> Dag {
    let mut repairs = Vec::new();
    let (mut specs, renamed) = specs_of(plan, max_subtasks, &mut repairs);
    keep_known_dependencies(&mut specs, &renamed, &mut repairs);
    let main = main_kind(route.kind);
    // One function to write means one code subtask.
    if matches!(
        route.kind,
        RouteKind::NewFunction | RouteKind::FixOrRefactor
    ) {
        fold_into_first(&mut specs, main, &mut repairs);
    }
    write_tests_from_the_task(&mut specs, &mut repairs);
    ensure_main_subtask(&mut specs, main, max_subtasks, &mut repairs);
    let mut specs = topological(specs, &mut repairs);
    mark_primary_and_critical(&mut specs, main);
    Dag { specs, repairs }
}

/// The plan's subtasks as specs, at most `max_subtasks`: known kinds, valid and unique ids.
/// Returns the specs and the new id of each subtask whose id changed.
fn specs_of(
    plan: &Plan,
    max_subtasks: usize,
    repairs: &mut Vec<String>,
) -> (Vec<TaskSpec>, HashMap<String, String>) {
    let mut specs: Vec<TaskSpec> = Vec::new();
    let mut renamed: HashMap<String, String> = HashMap::new();
    for (i, s) in plan.subtasks.iter().enumerate() {
        if specs.len() == max_subtasks {
            repairs.push(format!(
                "plan cut to {max_subtasks} subtasks ({} given)",
                plan.subtasks.len()
            ));
            break;
        }
        let kind = match &s.kind {
            PlannedKind::Known(k) => *k,
            PlannedKind::Unknown(text) => {
                repairs.push(format!(
                    "subtask `{}`: unknown kind `{text}`, run as reasoning",
                    s.id
                ));
                WorkerKind::Reasoning
            }
        };
        let mut id = if valid_id(&s.id) {
            s.id.clone()
        } else {
            let new = format!("step_{}", i + 1);
            repairs.push(format!(
                "subtask {}: id `{}` is not valid, renamed `{new}`",
                i + 1,
                s.id
            ));
            new
        };
        if specs.iter().any(|x| x.id == id) {
            let new = (2..)
                .map(|n| format!("{id}_{n}"))
                .find(|c| !specs.iter().any(|x| &x.id == c))
                .unwrap_or_default();
            repairs.push(format!("duplicate id `{id}` renamed `{new}`"));
            id = new;
        } else {
            renamed.insert(s.id.clone(), id.clone());
        }
        specs.push(TaskSpec {
            id,
            kind,
            description: if s.description.trim().is_empty() {
                format!("{} for the task", kind.name())
            } else {
                s.description.trim().to_string()
            },
            depends_on: s.depends_on.clone(),
            acceptance: s.acceptance.clone(),
            primary: false,
            critical: false,
        });
    }

    (specs, renamed)
}

/// Dependencies must name another kept subtask.
fn keep_known_dependencies(
    specs: &mut [TaskSpec],
    renamed: &HashMap<String, String>,
    repairs: &mut Vec<String>,
) {
    let ids: HashSet<String> = specs.iter().map(|s| s.id.clone()).collect();
    for s in specs.iter_mut() {
        let mut kept = Vec::new();
        for d in std::mem::take(&mut s.depends_on) {
            let d = renamed.get(&d).cloned().unwrap_or(d);
            if d == s.id {
                repairs.push(format!("`{}` depended on itself", s.id));
            } else if !ids.contains(&d) {
                repairs.push(format!("`{}`: unknown dependency `{d}` dropped", s.id));
            } else if !kept.contains(&d) {
                kept.push(d);
            }
        }
        s.depends_on = kept;
    }
}

/// Folds every `main` subtask after the first into the first.
fn fold_into_first(specs: &mut Vec<TaskSpec>, main: WorkerKind, repairs: &mut Vec<String>) {
    let code: Vec<usize> = (0..specs.len())
        .filter(|&i| specs[i].kind == main)
        .collect();
    if code.len() > 1 {
        let first = specs[code[0]].id.clone();
        let folded: Vec<TaskSpec> = code[1..].iter().map(|&i| specs[i].clone()).collect();
        for f in &folded {
            repairs.push(format!(
                "`{}` folded into `{first}`: the task asks for one result",
                f.id
            ));
            let extra = f.description.clone();
            let s = &mut specs[code[0]];
            s.description = format!("{} {}", s.description, extra);
            s.acceptance.extend(f.acceptance.iter().cloned());
        }
        let gone: HashSet<String> = folded.iter().map(|f| f.id.clone()).collect();
        specs.retain(|s| !gone.contains(&s.id));
        for s in specs.iter_mut() {
            for d in s.depends_on.iter_mut() {
                if gone.contains(d) {
                    *d = first.clone();
                }
            }
            let me = s.id.clone();
            s.depends_on.retain(|d| d != &me);
            s.depends_on.dedup();
        }
    }
}

/// Tests are written from the task, not from the code, so they check it independently.
fn write_tests_from_the_task(specs: &mut [TaskSpec], repairs: &mut Vec<String>) {
    let code_ids: HashSet<String> = specs
        .iter()
        .filter(|s| s.kind == WorkerKind::Code)
        .map(|s| s.id.clone())
        .collect();
    for s in specs.iter_mut().filter(|s| s.kind == WorkerKind::Tests) {
        let before = s.depends_on.len();
        s.depends_on.retain(|d| !code_ids.contains(d));
        if s.depends_on.len() < before {
            repairs.push(format!(
                "`{}`: dependency on code dropped; tests are written from the task",
                s.id
            ));
        }
    }
}

/// The route's main kind must be there: added (in place of the last subtask if the plan is
/// full) when it is not.
fn ensure_main_subtask(
    specs: &mut Vec<TaskSpec>,
    main: WorkerKind,
    max_subtasks: usize,
    repairs: &mut Vec<String>,
) {
    if !specs.iter().any(|s| s.kind == main) {
        let id = (1..)
            .map(|n| {
                if n == 1 {
                    main.name().to_string()
                } else {
                    format!("{}_{n}", main.name())
                }
            })
            .find(|c| !specs.iter().any(|s| &s.id == c))
            .unwrap_or_default();
        if specs.len() == max_subtasks {
            let dropped = specs.pop().map(|s| s.id).unwrap_or_default();
            repairs.push(format!("`{dropped}` dropped to make room"));
            for s in specs.iter_mut() {
                s.depends_on.retain(|d| d != &dropped);
            }
        }
        repairs.push(format!("no {} subtask: `{id}` added", main.name()));
        let deps = specs
            .iter()
            .filter(|s| matches!(s.kind, WorkerKind::Reasoning | WorkerKind::Research))
            .map(|s| s.id.clone())
            .collect();
        specs.push(TaskSpec {
            id,
            kind: main,
            description: "the task's result".into(),
            depends_on: deps,
            acceptance: Vec::new(),
            primary: false,
            critical: false,
        });
    }
}

/// The first `main` subtask is primary; it and everything it waits on are on the critical
/// path.
fn mark_primary_and_critical(specs: &mut [TaskSpec], main: WorkerKind) {
    let primary = specs.iter().position(|s| s.kind == main).unwrap_or(0);
    specs[primary].primary = true;
    // The primary subtask and everything it waits on are on the critical path.
    let mut stack = vec![specs[primary].id.clone()];
    let mut critical = HashSet::new();
    while let Some(id) = stack.pop() {
        if critical.insert(id.clone()) {
            if let Some(s) = specs.iter().find(|s| s.id == id) {
                stack.extend(s.depends_on.iter().cloned());
            }
        }
    }
    for s in specs.iter_mut() {
        s.critical = critical.contains(&s.id);
    }
}

/// Orders specs so that dependencies come first, dropping the edges that close cycles.
fn topological(mut specs: Vec<TaskSpec>, repairs: &mut Vec<String>) -> Vec<TaskSpec> {
    // Depth-first in plan order; an edge to a node on the stack closes a cycle.
    fn visit(
        i: usize,
        specs: &mut [TaskSpec],
        index: &HashMap<String, usize>,
        state: &mut [u8],
        order: &mut Vec<usize>,
        repairs: &mut Vec<String>,
    ) {
        state[i] = 1;
        let deps = specs[i].depends_on.clone();
        for d in deps {
            let j = index[&d];
            match state[j] {
                0 => visit(j, specs, index, state, order, repairs),
                1 => {
                    repairs.push(format!(
                        "cycle broken: `{}` no longer waits for `{d}`",
                        specs[i].id
                    ));
                    specs[i].depends_on.retain(|x| x != &d);
                }
                _ => {}
            }
        }
        state[i] = 2;
        order.push(i);
    }
    let index: HashMap<String, usize> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.clone(), i))
        .collect();
    let mut state = vec![0u8; specs.len()];
    let mut order = Vec::new();
    for i in 0..specs.len() {
        if state[i] == 0 {
            visit(i, &mut specs, &index, &mut state, &mut order, repairs);
        }
    }
    let mut slots: Vec<Option<TaskSpec>> = specs.into_iter().map(Some).collect();
    order.into_iter().filter_map(|i| slots[i].take()).collect()
}

impl StageOutput for Dag {
    fn trace_output(&self) -> Value {
        json!({"dag": self})
    }

    fn outcome(&self) -> (EventStatus, String) {
        let repairs = if self.repairs.is_empty() {
            String::new()
        } else {
            format!(
                ", {} repairs: {}",
                self.repairs.len(),
                self.repairs.join("; ")
            )
        };
        (
            EventStatus::Finished,
            format!("{} tasks{repairs}", self.specs.len()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orchestrator::PlannedSubtask;
    use crate::task::TaskRequest;

    fn sub(id: &str, kind: &str, deps: &[&str]) -> PlannedSubtask {
        PlannedSubtask {
            id: id.into(),
            kind: kind.into(),
            description: format!("do {id}"),
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            acceptance: vec![],
        }
    }

    fn dag(subs: Vec<PlannedSubtask>, max: usize) -> Dag {
        let route = crate::router::route_by_rules(&TaskRequest::new("def f(x):\n    pass\n"));
        build_dag(
            &Plan {
                subtasks: subs,
                fallback: None,
                cut: None,
            },
            &route,
            max,
        )
    }

    fn pos(d: &Dag, id: &str) -> usize {
        d.specs.iter().position(|s| s.id == id).unwrap()
    }

    #[test]
    fn dependencies_come_first_and_the_critical_path_is_marked() {
        let d = dag(
            vec![
                sub("impl", "code", &["think"]),
                sub("think", "reasoning", &[]),
                sub("doc", "docs", &["impl"]),
            ],
            6,
        );
        assert!(d.repairs.is_empty(), "{:?}", d.repairs);
        assert!(pos(&d, "think") < pos(&d, "impl") && pos(&d, "impl") < pos(&d, "doc"));
        assert!(d.get("impl").unwrap().primary);
        assert!(d.get("think").unwrap().critical);
        assert!(!d.get("doc").unwrap().critical);
    }

    #[test]
    fn cycles_are_broken_with_a_reason() {
        let d = dag(
            vec![
                sub("a", "reasoning", &["c"]),
                sub("b", "research", &["a"]),
                sub("c", "code", &["b"]),
            ],
            6,
        );
        assert!(
            d.repairs.iter().any(|r| r.starts_with("cycle broken")),
            "{:?}",
            d.repairs
        );
        for s in &d.specs {
            for dep in &s.depends_on {
                assert!(pos(&d, dep) < pos(&d, &s.id), "{dep} before {}", s.id);
            }
        }
    }

    #[test]
    fn unknown_duplicate_and_oversize_plans_are_repaired() {
        let d = dag(
            vec![
                sub("a", "code", &["ghost", "a"]),
                sub("a", "tests", &["a"]),
                sub("Bad Id", "poetry", &[]),
                sub("d", "docs", &[]),
            ],
            3,
        );
        let r = d.repairs.join("\n");
        assert!(r.contains("unknown dependency `ghost`"), "{r}");
        assert!(r.contains("depended on itself"), "{r}");
        assert!(r.contains("duplicate id `a` renamed `a_2`"), "{r}");
        assert!(r.contains("renamed `step_3`"), "{r}");
        assert!(r.contains("unknown kind `poetry`"), "{r}");
        assert!(r.contains("plan cut to 3"), "{r}");
        assert_eq!(d.specs.len(), 3);
        // The tests subtask does not wait for the code it checks.
        assert!(d.get("a_2").unwrap().depends_on.is_empty(), "{r}");
    }

    #[test]
    fn a_missing_main_subtask_is_added_and_extra_code_folded() {
        let d = dag(vec![sub("think", "reasoning", &[])], 1);
        assert_eq!(d.specs.len(), 1);
        assert_eq!(d.specs[0].kind, WorkerKind::Code);
        assert!(d.repairs.iter().any(|r| r.contains("no code subtask")));

        let d = dag(
            vec![
                sub("one", "code", &[]),
                sub("two", "code", &["one"]),
                sub("t", "docs", &["two"]),
            ],
            6,
        );
        assert_eq!(
            d.specs
                .iter()
                .filter(|s| s.kind == WorkerKind::Code)
                .count(),
            1
        );
        assert_eq!(d.get("t").unwrap().depends_on, vec!["one"]);
    }
}
