//! Unit-test support: a scripted model behind the same `LanguageModel` trait (answers by
//! stage, recognised from the stage template's opening line), and a test bed with the real
//! sandbox and the built-in prompts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forgeline_engine::scheduler::{Completion, GenerateRequest, Prompt};
use forgeline_engine::stop::StopReason;
use forgeline_sandbox::{Sandbox, SandboxConfig};

use crate::config::PipelineConfig;
use crate::job::{JobContext, Pipeline};
use crate::llm::{BoxFuture, LanguageModel};
use crate::prompts::Prompts;
use crate::stage::LlmStage;
use crate::task::TaskRequest;
use crate::workers::WorkerKind;

/// An answer that makes the call panic instead.
pub const PANIC: &str = "<panic>";

/// The tests worker's template asking for a smoke input opens with this; the scripted
/// model answers it as the stage `smoke_input`.
pub const SMOKE_MARKER: &str = "You write one small, ordinary input";

/// Each stage's template opens its system block with this.
pub fn marker(stage: LlmStage) -> &'static str {
    match stage {
        LlmStage::Router => "You sort programming tasks",
        LlmStage::Orchestrator => "You plan the work",
        LlmStage::Worker(WorkerKind::Code) => "You write Python code",
        LlmStage::Worker(WorkerKind::Tests) => "You write tests",
        LlmStage::Worker(WorkerKind::Reasoning) => "You think through",
        LlmStage::Worker(WorkerKind::Research) => "You research",
        LlmStage::Worker(WorkerKind::Docs) => "You write documentation",
        LlmStage::Worker(WorkerKind::DataAnalysis) => "You write data analysis scripts",
        LlmStage::Validator => "You review one step",
        LlmStage::Synthesizer => "You present the result",
        LlmStage::FinalValidator => "You check the finished result",
    }
}

#[derive(Default)]
struct Script {
    /// Answers by stage, used in order; the last repeats.
    answers: HashMap<String, Vec<String>>,
    /// Stages of the calls made, in order, with the text each was given.
    calls: Vec<(String, String)>,
    /// Calls of each stage in flight now, and the most at once so far.
    in_flight: HashMap<String, (usize, usize)>,
}

#[derive(Clone, Default)]
pub struct ScriptedModel {
    script: Arc<Mutex<Script>>,
    /// How long each answer takes.
    latency: Duration,
}

impl ScriptedModel {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an answer for a stage (by its config name: `code`, `validator`...), or for the
    /// tests worker's smoke input (`smoke_input`).
    pub fn on(self, stage: &str, answer: &str) -> Self {
        assert!(
            LlmStage::from_name(stage).is_some() || stage == "smoke_input",
            "no stage {stage}"
        );
        self.script
            .lock()
            .unwrap()
            .answers
            .entry(stage.into())
            .or_default()
            .push(answer.into());
        self
    }

    /// Each answer takes `d` (calls then overlap, as on a real engine).
    pub fn with_latency(mut self, d: Duration) -> Self {
        self.latency = d;
        self
    }

    /// The most calls of `stage` that were in flight at once.
    pub fn max_in_flight(&self, stage: &str) -> usize {
        let script = self.script.lock().unwrap();
        script.in_flight.get(stage).map_or(0, |&(_, max)| max)
    }

    pub fn calls(&self) -> Vec<(String, String)> {
        self.script.lock().unwrap().calls.clone()
    }

    fn text_of(req: &GenerateRequest) -> String {
        match &req.prompt {
            Prompt::Chat(m) => m
                .iter()
                .map(|m| m.content.clone())
                .collect::<Vec<_>>()
                .join("\n"),
            Prompt::ChatContinue {
                messages,
                assistant_prefix,
            } => {
                let mut s = messages
                    .iter()
                    .map(|m| m.content.clone())
                    .collect::<Vec<_>>()
                    .join("\n");
                s.push_str(assistant_prefix);
                s
            }
            Prompt::Text(t) => t.clone(),
            Prompt::Infill { prefix, suffix } => format!("{prefix}{suffix}"),
            Prompt::Tokens(_) => String::new(),
        }
    }
}

struct InFlight(Arc<Mutex<Script>>, String);

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some((now, _)) = self.0.lock().unwrap().in_flight.get_mut(&self.1) {
            *now -= 1;
        }
    }
}

impl LanguageModel for ScriptedModel {
    fn complete(
        &self,
        req: GenerateRequest,
    ) -> BoxFuture<'_, forgeline_engine::Result<Completion>> {
        let text = Self::text_of(&req);
        let stage = if text.contains(SMOKE_MARKER) {
            "smoke_input".to_string()
        } else {
            LlmStage::ALL
                .into_iter()
                .find(|s| text.contains(marker(*s)))
                .map_or("unknown", LlmStage::name)
                .to_string()
        };
        let mut script = self.script.lock().unwrap();
        script.calls.push((stage.clone(), text));
        let answer = match script.answers.get_mut(&stage) {
            Some(list) if list.len() > 1 => list.remove(0),
            Some(list) => list[0].clone(),
            None => String::new(),
        };
        let (now, max) = script.in_flight.entry(stage.clone()).or_default();
        *now += 1;
        *max = (*max).max(*now);
        drop(script);
        // Counted out when the call ends or is dropped (a cancelled candidate).
        let in_flight = InFlight(self.script.clone(), stage);
        let latency = self.latency;
        let max_tokens = req.max_tokens;
        Box::pin(async move {
            let _in_flight = in_flight;
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            // Stands in for a bug that some model output reaches.
            if answer == PANIC {
                panic!("scripted panic");
            }
            // A word is a token; an answer longer than the budget is cut after it.
            let mut c = Completion::default();
            let mut words = answer.split_whitespace();
            match words.nth(max_tokens) {
                Some(first_over) => {
                    let end = first_over.as_ptr() as usize - answer.as_ptr() as usize;
                    c.text = answer[..end].trim_end().to_string();
                    c.usage.completion_tokens = max_tokens;
                    c.stop_reason = StopReason::MaxTokens;
                }
                None => {
                    c.usage.completion_tokens = answer.split_whitespace().count();
                    c.text = answer;
                    c.stop_reason = StopReason::Eos;
                }
            }
            Ok(c)
        })
    }

    fn models(&self) -> Vec<String> {
        vec!["scripted".into()]
    }

    fn context_length(&self, _model: Option<&str>) -> forgeline_engine::Result<usize> {
        Ok(8192)
    }

    fn prompt_tokens(&self, req: &GenerateRequest) -> forgeline_engine::Result<usize> {
        Ok(Self::text_of(req).len() / 4)
    }
}

pub struct TestBed {
    pub pipeline: Pipeline,
}

impl TestBed {
    pub async fn new(model: ScriptedModel) -> Self {
        Self::with_config(model, PipelineConfig::default()).await
    }

    pub async fn with_config(model: ScriptedModel, config: PipelineConfig) -> Self {
        let sandbox = Sandbox::new(SandboxConfig::default())
            .await
            .expect("sandbox");
        let pipeline = Pipeline::new(
            Arc::new(model.clone()),
            sandbox,
            Prompts::built_in(),
            config,
        );
        Self { pipeline }
    }

    pub fn ctx(&self) -> JobContext {
        self.ctx_for(TaskRequest::new(
            "Write a function add(a, b) that returns a + b.",
        ))
    }

    pub fn ctx_for(&self, task: TaskRequest) -> JobContext {
        self.pipeline.context(task, None)
    }
}
