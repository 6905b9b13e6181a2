//! The names of the pipeline's stages, one vocabulary for every place that names them.
//! `Stage` is a stage of the design as a job goes through it (trace, events, metrics);
//! `LlmStage` is a stage that calls a model, by the settings it reads (`[stages.<name>]` in
//! the config) and the template it renders (`prompts/<name>.j2`). The workers call a model
//! once per kind, so each kind is an `LlmStage` of its own, shown as `Stage::Worker`.
//! `StageOutput` is how a stage's typed output shows itself in the trace.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::trace::EventStatus;
use crate::workers::WorkerKind;

/// What a finished stage shows of itself. Each stage is a function from typed inputs to a
/// typed output; `Pipeline::run` passes the outputs along and records each stage in the
/// trace and the live events from this, so no stage writes to the trace itself.
pub trait StageOutput {
    /// The output as the trace records it.
    fn trace_output(&self) -> Value;
    /// The stage's end event: its status and one line for people.
    fn outcome(&self) -> (EventStatus, String);
}

/// The stages of the design, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Router,
    Orchestrator,
    Planning,
    Dispatcher,
    Worker,
    Validation,
    Retry,
    Collector,
    Synthesizer,
    FinalValidator,
    SynthesizerRetry,
    Formatter,
}

impl Stage {
    pub const ALL: [Stage; 12] = [
        Stage::Router,
        Stage::Orchestrator,
        Stage::Planning,
        Stage::Dispatcher,
        Stage::Worker,
        Stage::Validation,
        Stage::Retry,
        Stage::Collector,
        Stage::Synthesizer,
        Stage::FinalValidator,
        Stage::SynthesizerRetry,
        Stage::Formatter,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Router => "router",
            Stage::Orchestrator => "orchestrator",
            Stage::Planning => "planning",
            Stage::Dispatcher => "dispatcher",
            Stage::Worker => "worker",
            Stage::Validation => "validation",
            Stage::Retry => "retry",
            Stage::Collector => "collector",
            Stage::Synthesizer => "synthesizer",
            Stage::FinalValidator => "final_validator",
            Stage::SynthesizerRetry => "synthesizer_retry",
            Stage::Formatter => "formatter",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A stage that calls a model: its config key and template name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LlmStage {
    Router,
    Orchestrator,
    /// A worker of one kind (`code`, `tests`, ...).
    Worker(WorkerKind),
    /// The per-output LLM validator.
    Validator,
    /// The synthesizer's prose and its repairs.
    Synthesizer,
    FinalValidator,
}

impl LlmStage {
    pub const ALL: [LlmStage; 11] = [
        LlmStage::Router,
        LlmStage::Orchestrator,
        LlmStage::Worker(WorkerKind::Code),
        LlmStage::Worker(WorkerKind::Tests),
        LlmStage::Worker(WorkerKind::Reasoning),
        LlmStage::Worker(WorkerKind::Research),
        LlmStage::Worker(WorkerKind::Docs),
        LlmStage::Worker(WorkerKind::DataAnalysis),
        LlmStage::Validator,
        LlmStage::Synthesizer,
        LlmStage::FinalValidator,
    ];

    /// The config key and template name.
    pub fn name(self) -> &'static str {
        match self {
            LlmStage::Router => "router",
            LlmStage::Orchestrator => "orchestrator",
            LlmStage::Worker(k) => k.name(),
            LlmStage::Validator => "validator",
            LlmStage::Synthesizer => "synthesizer",
            LlmStage::FinalValidator => "final_validator",
        }
    }

    /// The stage of that name exactly (config keys and template files have no aliases).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Every name, for messages that list them.
    pub fn names() -> String {
        Self::ALL.map(LlmStage::name).join(", ")
    }

    /// Where its calls show in the trace and events.
    pub fn stage(self) -> Stage {
        match self {
            LlmStage::Router => Stage::Router,
            LlmStage::Orchestrator => Stage::Orchestrator,
            LlmStage::Worker(_) => Stage::Worker,
            LlmStage::Validator => Stage::Validation,
            LlmStage::Synthesizer => Stage::Synthesizer,
            LlmStage::FinalValidator => Stage::FinalValidator,
        }
    }
}

impl std::fmt::Display for LlmStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for LlmStage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for LlmStage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Self::from_name(&name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown stage `{name}` (stages: {})",
                Self::names()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llm_stage_names_are_the_config_keys_and_round_trip() {
        for s in LlmStage::ALL {
            assert_eq!(LlmStage::from_name(s.name()), Some(s));
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.name()));
            assert_eq!(serde_json::from_str::<LlmStage>(&json).unwrap(), s);
        }
        for k in WorkerKind::ALL {
            assert_eq!(LlmStage::Worker(k).name(), k.name());
            assert_eq!(LlmStage::Worker(k).stage(), Stage::Worker);
        }
        // Aliases a plan may use are not config keys.
        assert_eq!(LlmStage::from_name("creative"), None);
        let e = serde_json::from_str::<LlmStage>("\"coder\"").unwrap_err();
        assert!(e.to_string().contains("unknown stage `coder`"), "{e}");
    }
}
