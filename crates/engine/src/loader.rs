//! Loading a located model: weights, tokenizer and chat template, and a description of it
//! (`ModelInfo`) that can be read without loading the weights.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::Serialize;

use crate::chat::ChatTemplate;
use crate::model::files;
use crate::model::weights::{GgufSource, SafetensorsSource, WeightSource};
use crate::model::{Model, ModelConfig};
use crate::registry::{Format, ModelLocation, Recipe};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub format: Format,
    pub path: PathBuf,
    pub architecture: String,
    pub parameters: u64,
    pub quantization: String,
    pub size_bytes: u64,
    pub context_length: usize,
    pub vocab_size: usize,
    pub layers: usize,
    pub hidden_size: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub chat_template: String,
}

/// A model ready to run: weights, tokenizer, chat template, and its manifest's recipe.
pub struct LoadedModel {
    pub info: ModelInfo,
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub chat_template: ChatTemplate,
    pub recipe: Recipe,
}

enum Opened {
    Gguf(GgufSource),
    Safetensors(SafetensorsSource, ModelConfig),
}

struct Parts {
    cfg: ModelConfig,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    source: Opened,
}

/// The manifest's `chat_template`, which replaces the model's own: `chatml` is the built-in
/// ChatML, anything else a Jinja template.
fn override_template(loc: &ModelLocation, tok: &Tokenizer) -> Result<Option<ChatTemplate>> {
    let Some(t) = &loc.chat_template else {
        return Ok(None);
    };
    if t.trim().eq_ignore_ascii_case("chatml") {
        return Ok(Some(ChatTemplate::chatml(tok)));
    }
    ChatTemplate::compile(
        t.clone(),
        format!("the manifest of {}, key chat_template", loc.name),
        tok.bos_token().map(str::to_string),
        tok.eos_token().map(str::to_string),
    )
    .map(Some)
}

fn open(loc: &ModelLocation) -> Result<Parts> {
    let mut parts = open_files(loc)?;
    // The recipe's context length caps the model's own.
    if let Some(n) = loc.recipe.context_length {
        parts.cfg.context_length = parts.cfg.context_length.min(n);
    }
    if let Opened::Safetensors(_, cfg) = &mut parts.source {
        cfg.context_length = parts.cfg.context_length;
    }
    Ok(parts)
}

fn open_files(loc: &ModelLocation) -> Result<Parts> {
    match loc.format {
        Format::Gguf => {
            let src = GgufSource::open(&loc.path)?;
            let cfg = ModelConfig::from_gguf(&src.content, &loc.path)?;
            let tokenizer = Tokenizer::from_gguf(&src.content, &loc.path)?;
            let template = match override_template(loc, &tokenizer)? {
                Some(t) => t,
                None => ChatTemplate::from_gguf(&src.content, &loc.path, &tokenizer)?
                    .unwrap_or_else(|| ChatTemplate::missing(loc)),
            };
            template.probe()?;
            Ok(Parts {
                cfg,
                tokenizer,
                template,
                source: Opened::Gguf(src),
            })
        }
        Format::Safetensors => {
            let dir = &loc.path;
            let cfg_path = dir.join("config.json");
            let json = files::read_text(&cfg_path)?;
            let cfg = ModelConfig::from_hf_config(&json, &cfg_path)?;
            let tok_path = dir.join("tokenizer.json");
            if !tok_path.exists() {
                return Err(Error::bad_model(dir, "missing tokenizer.json"));
            }
            let tokenizer = Tokenizer::from_file(&tok_path)?;
            let tc = dir.join("tokenizer_config.json");
            let template = match override_template(loc, &tokenizer)? {
                Some(t) => Some(t),
                None if tc.exists() => ChatTemplate::from_tokenizer_config(&tc, &tokenizer)?,
                None => None,
            }
            .unwrap_or_else(|| ChatTemplate::missing(loc));
            template.probe()?;
            let src = SafetensorsSource::open(dir)?;
            Ok(Parts {
                cfg: cfg.clone(),
                tokenizer,
                template,
                source: Opened::Safetensors(src, cfg),
            })
        }
    }
}

fn info(loc: &ModelLocation, p: &Parts) -> ModelInfo {
    let src: &dyn WeightSource = match &p.source {
        Opened::Gguf(s) => s,
        Opened::Safetensors(s, _) => s,
    };
    let (size_bytes, quantization) = src.summary();
    let c = &p.cfg;
    let (h, i, v) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.vocab_size as u64,
    );
    let (q, kv) = (
        (c.num_heads * c.head_dim) as u64,
        (c.num_kv_heads * c.head_dim) as u64,
    );
    // `validate` bounds every size, so none of these products comes near u64::MAX.
    let qk_norm = if c.arch.qk_norm() {
        2 * c.head_dim as u64
    } else {
        0
    };
    let per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h + qk_norm;
    let head = if c.tie_word_embeddings { 0 } else { v * h };
    ModelInfo {
        name: loc.name.clone(),
        format: loc.format,
        path: loc.path.clone(),
        architecture: c.arch.as_str().into(),
        parameters: v * h + c.num_layers as u64 * per_layer + h + head,
        quantization,
        size_bytes,
        context_length: c.context_length,
        vocab_size: c.vocab_size,
        layers: c.num_layers,
        hidden_size: c.hidden_size,
        heads: c.num_heads,
        kv_heads: c.num_kv_heads,
        chat_template: p.template.source().to_string(),
    }
}

/// Describes a model without loading its weights.
pub fn inspect(loc: &ModelLocation) -> Result<ModelInfo> {
    Ok(info(loc, &open(loc)?))
}

pub fn load(loc: &ModelLocation, device: &Device) -> Result<LoadedModel> {
    let _span = tracing::info_span!("load", model = %loc.name).entered();
    let started = std::time::Instant::now();
    let mut parts = open(loc)?;
    let info = info(loc, &parts);
    let model = match &mut parts.source {
        Opened::Gguf(src) => {
            let permute = src.rope_interleaved();
            Model::load(parts.cfg.clone(), src, permute, device)?
        }
        Opened::Safetensors(src, cfg) => Model::load(cfg.clone(), src, false, device)?,
    };
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    Ok(LoadedModel {
        info,
        model,
        tokenizer: parts.tokenizer,
        chat_template: parts.template,
        recipe: loc.recipe.clone(),
    })
}

impl LoadedModel {
    pub fn path(&self) -> &Path {
        &self.info.path
    }
}
