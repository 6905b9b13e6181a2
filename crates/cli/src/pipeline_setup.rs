//! What `generate`, `eval`, `bench pipeline` and `serve` share: the pipeline's flags, and
//! the models, sandbox and pipeline built from them.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use forgeline_engine::loader::LoadedModel;
use forgeline_engine::registry::DEFAULT_MODEL;
use forgeline_engine::scheduler::{
    default_kv_budget, LlmClient, ModelSchedulerConfig, SchedulerConfig,
};
use forgeline_pipeline::{Pipeline, PipelineConfig, Prompts};
use forgeline_sandbox::{Sandbox, SandboxConfig};

use crate::Env;

#[derive(Args, Debug, Clone, Default)]
pub struct PipelineArgs {
    /// Model for every stage: a name, a path, or a Hugging Face repo id [default: smollm2-135m-instruct, or what the config names]
    #[arg(long)]
    pub model: Option<String>,
    /// Pipeline config (per-stage models, sampling, limits) [default: ./forgeline.toml if present]
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Directory of stage templates (`<stage>.j2`) that replace the built-in ones
    #[arg(long)]
    pub prompts: Option<PathBuf>,
}

/// The engine, sandbox and pipeline a command runs on.
pub struct PipelineSetup {
    pub client: LlmClient,
    pub sandbox: Sandbox,
    pub pipeline: Pipeline,
}

impl PipelineArgs {
    /// The config file's settings; without one, those of the model's recipe (its manifest's
    /// `[pipeline]`), else the defaults.
    pub fn config(&self, env: &Env) -> anyhow::Result<PipelineConfig> {
        self.config_for(env, self.model.as_deref())
    }

    /// `config`, with the recipe of `model` (None: the default model).
    pub fn config_for(&self, env: &Env, model: Option<&str>) -> anyhow::Result<PipelineConfig> {
        let path = match &self.config {
            Some(p) => Some(p.clone()),
            None => Some(PathBuf::from("forgeline.toml")).filter(|p| p.is_file()),
        };
        let mut cfg = match path {
            Some(p) => PipelineConfig::load(&p).map_err(|e| crate::usage(e.to_string()))?,
            None => recipe_config(env, model)?.unwrap_or_default(),
        };
        if let Some(m) = &self.model {
            cfg = cfg.with_model(m);
        }
        Ok(cfg)
    }

    /// Loads every model the config names (the default model when it names none), starts
    /// the scheduler and the sandbox. Must run inside a tokio runtime.
    pub async fn build(&self, env: &Env) -> anyhow::Result<PipelineSetup> {
        let mut cfg = self.config(env)?;
        let prompts =
            Prompts::load(self.prompts.as_deref()).map_err(|e| crate::usage(e.to_string()))?;
        let mut names: Vec<Option<String>> = Vec::new();
        for s in cfg.stages.values() {
            for m in &s.models {
                if !names.contains(&Some(m.clone())) {
                    names.push(Some(m.clone()));
                }
            }
        }
        if names.is_empty() {
            names.push(None);
        }
        let mut models: Vec<LoadedModel> = Vec::new();
        for n in &names {
            let m = env.load_model(n.as_deref())?;
            // A path or repo id loads under the model's own name: stages call it that.
            if let Some(n) = n {
                for s in cfg.stages.values_mut() {
                    for x in s.models.iter_mut().filter(|x| *x == n) {
                        *x = m.info.name.clone();
                    }
                }
            }
            if !models.iter().any(|x| x.info.name == m.info.name) {
                models.push(m);
            }
        }
        let budgets: Vec<usize> = models
            .iter()
            .map(|m| default_kv_budget(m, models.len(), env.cache_type.dtype()))
            .collect();
        let client = LlmClient::start(models, pipeline_scheduler(env.scheduler(), &budgets))?;
        let sandbox = Sandbox::new(SandboxConfig::default()).await?;
        let pipeline = Pipeline::new(Arc::new(client.clone()), sandbox.clone(), prompts, cfg);
        Ok(PipelineSetup {
            client,
            sandbox,
            pipeline,
        })
    }
}

/// The pipeline settings of a model's recipe (`[pipeline]` in its manifest), if it has any. A
/// model that cannot be resolved has none here: loading it names the problem.
fn recipe_config(env: &Env, model: Option<&str>) -> anyhow::Result<Option<PipelineConfig>> {
    let Ok(loc) = env.registry.resolve(model.unwrap_or(DEFAULT_MODEL)) else {
        return Ok(None);
    };
    let Some(table) = &loc.recipe.pipeline else {
        return Ok(None);
    };
    PipelineConfig::from_table(table.clone())
        .map(Some)
        .map_err(|e| {
            crate::usage(format!(
                "the manifest of model `{}`, [pipeline]: {e}",
                loc.name
            ))
        })
}

/// Pipeline jobs run many candidates at once (16 per job by default, several jobs together):
/// twice the engine's default KV budget and 64 running sequences, so that the candidates of
/// concurrent jobs are admitted together and a shared prompt is not evicted from the prefix
/// cache before the candidates waiting on it are admitted.
fn pipeline_scheduler(base: SchedulerConfig, kv_budgets: &[usize]) -> SchedulerConfig {
    SchedulerConfig {
        per_model: ModelSchedulerConfig {
            max_running: 64,
            ..base.per_model
        },
        kv_budget_bytes: kv_budgets.iter().min().map(|b| 2 * b),
        ..base
    }
}
