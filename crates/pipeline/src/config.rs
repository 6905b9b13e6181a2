//! Pipeline settings: per stage the model, sampling and token limits; per job the limits on
//! plans, concurrency, candidates and retries. Read from a TOML file (`forgeline.toml`);
//! every field has a default, and unknown fields are refused so that typos do not go unseen.

use std::collections::BTreeMap;
use std::path::Path;

use forgeline_engine::sampling::SamplingParams;
use forgeline_engine::scheduler::Priority;
use serde::{Deserialize, Serialize};

use crate::stage::LlmStage;
use crate::workers::WorkerKind;
use crate::{Error, Result};

/// Settings of one LLM stage or worker kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StageSettings {
    /// Models that serve this stage, balanced by load; empty means the default model.
    pub models: Vec<String>,
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub min_p: f32,
    pub repetition_penalty: f32,
    /// DRY, as llama.cpp's `--dry-*` options (see the engine's `SamplingParams`): 0 is off.
    pub dry_multiplier: f32,
    pub dry_base: f32,
    pub dry_allowed_length: usize,
    pub dry_penalty_last_n: i64,
    pub priority: Priority,
}

impl Default for StageSettings {
    fn default() -> Self {
        let engine = SamplingParams::default();
        Self {
            models: Vec::new(),
            max_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            dry_multiplier: engine.dry_multiplier,
            dry_base: engine.dry_base,
            dry_allowed_length: engine.dry_allowed_length,
            dry_penalty_last_n: engine.dry_penalty_last_n,
            priority: Priority::Normal,
        }
    }
}

impl StageSettings {
    fn with(max_tokens: usize, priority: Priority) -> Self {
        Self {
            max_tokens,
            priority,
            ..Self::default()
        }
    }

    /// Sampling for this stage; `seed` varies candidates.
    pub fn sampling(&self, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            dry_multiplier: self.dry_multiplier,
            dry_base: self.dry_base,
            dry_allowed_length: self.dry_allowed_length,
            dry_penalty_last_n: self.dry_penalty_last_n,
            seed,
        }
    }
}

/// Limits of one job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest plan kept; longer plans are cut (recorded in the trace).
    pub max_subtasks: usize,
    /// Subtasks of one job running at once.
    pub max_concurrent_workers: usize,
    /// Code candidates per attempt: the first of each framing greedy, the others sampled.
    /// The execution checks pick among them, so more candidates buy pass rate with compute
    /// (on the task set: 3/40 with 8, 4/40 with 16); retries get half as many.
    pub candidates: usize,
    /// Temperature of the sampled candidates.
    pub candidate_temperature: f32,
    /// Candidates of one attempt that may always be written at once.
    pub job_candidates_in_flight: usize,
    /// Further candidates written at once, shared by every job of the pipeline. A job alone
    /// writes `job_candidates_in_flight` plus these together (all 16 by default: an idle
    /// engine batches them for little more than the cost of one). Under load they are
    /// speculative work that competes with other jobs' needed work, so each job keeps few
    /// in flight, and the candidates not yet started when one passes are never written.
    /// The pipeline's own setting counts (one pool for all its jobs).
    pub shared_candidates_in_flight: usize,
    /// Attempts after the first, per subtask.
    pub max_retries: usize,
    /// Re-syntheses after a failed final validation.
    pub max_synthesis_retries: usize,
    /// Ask the LLM validators (per output and final) for a verdict.
    pub llm_judge: bool,
    /// Validations running at once (sandbox runs and judge calls).
    pub validators: usize,
    /// Seconds (wall and CPU) allowed for each sandboxed check. Short: a task's examples run
    /// in milliseconds, and a looping candidate would otherwise hold a core away from the
    /// model for the whole limit.
    pub sandbox_timeout_s: f64,
}

impl Limits {
    /// `sandbox_timeout_s` as a Duration (checked when the config was read; the default
    /// for a value that was never checked).
    pub fn sandbox_timeout(&self) -> std::time::Duration {
        forgeline_sandbox::Limits::timeout_from_secs(self.sandbox_timeout_s).unwrap_or_else(|_| {
            std::time::Duration::from_secs_f64(Limits::default().sandbox_timeout_s)
        })
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_subtasks: 6,
            max_concurrent_workers: 4,
            candidates: 16,
            candidate_temperature: 0.7,
            job_candidates_in_flight: 2,
            shared_candidates_in_flight: 14,
            max_retries: 2,
            max_synthesis_retries: 1,
            llm_judge: true,
            validators: 8,
            sandbox_timeout_s: 3.0,
        }
    }
}

/// Everything the pipeline reads from `forgeline.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    pub limits: Limits,
    /// Settings by stage (`LlmStage`): `router`, `orchestrator`, `validator`,
    /// `synthesizer`, `final_validator`, and the worker kinds `code`, `tests`, `reasoning`,
    /// `research`, `docs`, `data_analysis`. Missing stages get their defaults; an unknown
    /// name is an error that names it.
    pub stages: BTreeMap<LlmStage, StageSettings>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        use Priority::*;
        use WorkerKind::*;
        let stages = [
            (LlmStage::Router, StageSettings::with(48, High)),
            (
                LlmStage::Orchestrator,
                // A small model's plan can loop inside a string until its budget runs out:
                // DRY makes continuing a repeat cost more than closing the string.
                StageSettings {
                    dry_multiplier: 0.8,
                    ..StageSettings::with(192, High)
                },
            ),
            (LlmStage::Worker(Code), StageSettings::with(384, Normal)),
            (LlmStage::Worker(Tests), StageSettings::with(320, Normal)),
            (
                LlmStage::Worker(Reasoning),
                StageSettings::with(200, Normal),
            ),
            (LlmStage::Worker(Research), StageSettings::with(200, Low)),
            (LlmStage::Worker(Docs), StageSettings::with(256, Low)),
            (
                LlmStage::Worker(DataAnalysis),
                StageSettings::with(384, Normal),
            ),
            (LlmStage::Validator, StageSettings::with(120, High)),
            (LlmStage::Synthesizer, StageSettings::with(384, Critical)),
            (LlmStage::FinalValidator, StageSettings::with(120, Critical)),
        ];
        Self {
            limits: Limits::default(),
            stages: stages.into_iter().collect(),
        }
    }
}

/// A config file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    limits: Option<Limits>,
    #[serde(default)]
    stages: BTreeMap<String, toml::Value>,
}

impl PipelineConfig {
    /// Reads a config file; fields it does not set keep their defaults.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        Self::from_file(toml::from_str(text).map_err(|e| e.to_string())?)
    }

    /// A config file's contents already read as TOML (a model recipe's `[pipeline]` table).
    pub fn from_table(table: toml::Table) -> std::result::Result<Self, String> {
        Self::from_file(
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| e.to_string())?,
        )
    }

    fn from_file(file: File) -> std::result::Result<Self, String> {
        let mut cfg = Self::default();
        if let Some(l) = file.limits {
            cfg.limits = l;
        }
        for (name, value) in file.stages {
            let Some(stage) = LlmStage::from_name(&name) else {
                return Err(format!(
                    "unknown stage `{name}` (stages: {})",
                    LlmStage::names()
                ));
            };
            let base = cfg.stage(stage);
            // Fields the file gives override the stage's own defaults.
            let mut merged = toml::Value::try_from(&base).map_err(|e| e.to_string())?;
            if let (Some(m), toml::Value::Table(t)) = (merged.as_table_mut(), value) {
                m.extend(t);
            }
            let s: StageSettings = merged
                .try_into()
                .map_err(|e| format!("stages.{name}: {e}"))?;
            cfg.stages.insert(stage, s);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let l = &self.limits;
        for (v, name) in [
            (l.max_subtasks, "max_subtasks"),
            (l.max_concurrent_workers, "max_concurrent_workers"),
            (l.candidates, "candidates"),
            (l.job_candidates_in_flight, "job_candidates_in_flight"),
            (l.validators, "validators"),
        ] {
            if v == 0 {
                return Err(format!("limits.{name} must be at least 1"));
            }
        }
        // The sandbox owns what a timeout may be (and a Duration cannot hold 1e20 s).
        forgeline_sandbox::Limits::timeout_from_secs(l.sandbox_timeout_s)
            .map_err(|e| format!("limits.sandbox_timeout_s: {e}"))?;
        for (name, s) in &self.stages {
            if s.max_tokens == 0 {
                return Err(format!("stages.{name}.max_tokens must be at least 1"));
            }
            s.sampling(0)
                .validate()
                .map_err(|e| format!("stages.{name}: {e}"))?;
        }
        Ok(())
    }

    pub fn stage(&self, stage: LlmStage) -> StageSettings {
        self.stages.get(&stage).cloned().unwrap_or_default()
    }

    /// Every stage on `model` (the `--model` flag).
    pub fn with_model(mut self, model: &str) -> Self {
        for s in self.stages.values_mut() {
            s.models = vec![model.to_string()];
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_only_what_it_sets() {
        let cfg = PipelineConfig::parse(
            "[limits]\ncandidates = 3\n\n[stages.code]\ntemperature = 0.5\nmodels = [\"a\", \"b\"]\n",
        )
        .unwrap();
        assert_eq!(cfg.limits.candidates, 3);
        assert_eq!(cfg.limits.max_retries, Limits::default().max_retries);
        let code = cfg.stage(LlmStage::Worker(WorkerKind::Code));
        assert_eq!(code.temperature, 0.5);
        assert_eq!(code.models, vec!["a", "b"]);
        assert_eq!(code.max_tokens, 384, "the stage's own default is kept");
    }

    #[test]
    fn bad_files_name_the_problem() {
        let e = PipelineConfig::parse("[stages.coder]\nmax_tokens = 3\n").unwrap_err();
        assert!(e.contains("unknown stage `coder`"), "{e}");
        let e = PipelineConfig::parse("[limits]\ncandidatez = 3\n").unwrap_err();
        assert!(e.contains("candidatez"), "{e}");
        let e = PipelineConfig::parse("[stages.code]\ntop_p = 0\n").unwrap_err();
        assert!(e.contains("stages.code") && e.contains("top_p"), "{e}");
        let e = PipelineConfig::parse("[limits]\ncandidates = 0\n").unwrap_err();
        assert!(e.contains("limits.candidates"), "{e}");
        let e = PipelineConfig::parse("[stages.code]\nmax_tokens = \"x\"\n").unwrap_err();
        assert!(e.contains("max_tokens"), "{e}");
        for t in ["1e20", "nan", "inf", "-1.0", "0.0"] {
            let e =
                PipelineConfig::parse(&format!("[limits]\nsandbox_timeout_s = {t}\n")).unwrap_err();
            assert!(e.contains("limits.sandbox_timeout_s"), "{t}: {e}");
        }
    }
}
