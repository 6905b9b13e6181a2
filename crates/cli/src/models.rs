//! `forgeline models list|show|import|rm`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use forgeline_engine::loader::inspect;
use forgeline_engine::registry::{hf_cache_models, Import};

use crate::Env;

#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// The models in the models directory (whether their weights are present), and those in
    /// the local Hugging Face cache (read offline)
    List {
        #[arg(long)]
        json: bool,
    },
    /// Adds a GGUF file or a safetensors directory as a named model, where it is: checks that
    /// it loads, and writes its manifest (models/NAME.toml) with its sha256
    Import {
        /// The GGUF file, or the directory with config.json, tokenizer.json and *.safetensors
        path: PathBuf,
        /// The model's name [default: the file's name without its extension]
        #[arg(long)]
        name: Option<String>,
        /// A chat template for a model that has none (or a wrong one): `chatml`, or a file
        /// holding a Jinja template
        #[arg(long, value_name = "chatml|FILE")]
        chat_template: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Removes a model's manifest, and its weights when they are in the models directory
    Rm { name: String },
    /// Architecture, parameters, quantization, context length, chat template and file path
    Show {
        /// A model name, a path to a GGUF file or safetensors directory, or a Hugging Face repo id
        name: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: ModelsCommand, env: &Env) -> anyhow::Result<ExitCode> {
    match cmd {
        ModelsCommand::Import {
            path,
            name,
            chat_template,
            json,
        } => {
            let chat_template = match chat_template {
                None => None,
                Some(t) if t.eq_ignore_ascii_case("chatml") => Some("chatml".to_string()),
                Some(f) => Some(std::fs::read_to_string(&f).map_err(|e| {
                    crate::usage(format!("--chat-template {f}: cannot read it: {e}"))
                })?),
            };
            // It must load (weights, tokenizer, chat template) before it gets a name.
            let mut loc = env.registry.resolve(&path.display().to_string())?;
            loc.chat_template = chat_template.clone();
            let info = inspect(&loc)?;
            forgeline_engine::loader::load(&loc, &env.device.open()?)?;
            let description = format!(
                "{}, {:.0}M parameters, {}, imported from {}",
                info.architecture,
                info.parameters as f64 / 1e6,
                info.quantization,
                path.display()
            );
            let (m, file) = env.registry.import(&Import {
                path: &path,
                name: name.as_deref(),
                description,
                chat_template,
            })?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "name": m.name,
                        "manifest": file,
                        "path": m.path,
                        "format": m.format,
                        "sha256": m.sha256,
                        "description": m.description,
                    }))?
                );
            } else {
                println!("{}", m.name);
                eprintln!(
                    "imported {} as `{}` ({}): sha256 {}",
                    m.path.display(),
                    m.name,
                    file.display(),
                    m.sha256.as_deref().unwrap_or_default()
                );
            }
        }
        ModelsCommand::Rm { name } => {
            for p in env.registry.remove(&name)? {
                eprintln!("removed {}", p.display());
            }
        }
        ModelsCommand::List { json } => {
            let manifests = env.registry.manifests()?;
            let cached = hf_cache_models();
            let rows: Vec<serde_json::Value> = manifests
                .iter()
                .map(|m| {
                    let path = env.registry.models_dir().join(&m.path);
                    serde_json::json!({
                        "name": m.name,
                        "format": m.format,
                        "path": path,
                        "present": path.exists(),
                        "description": m.description,
                    })
                })
                .collect();
            if json {
                let mut rows = rows;
                rows.extend(cached.iter().map(|c| {
                    serde_json::json!({
                        "name": c.name,
                        "format": c.format,
                        "path": c.path,
                        "present": true,
                        "description": "in the Hugging Face cache",
                    })
                }));
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() && cached.is_empty() {
                eprintln!(
                    "no model manifests in {}, nothing in the Hugging Face cache",
                    env.registry.models_dir().display()
                );
            } else {
                for (m, r) in manifests.iter().zip(&rows) {
                    let state = if r["present"] == true {
                        "present".to_string()
                    } else {
                        format!(
                            "missing: run {}",
                            m.fetch.as_deref().unwrap_or("its fetch step")
                        )
                    };
                    println!("{}\t{:?}\t{}\t{}", m.name, m.format, state, m.description);
                }
                for c in &cached {
                    println!(
                        "{}\t{:?}\tpresent\tin the Hugging Face cache: {}",
                        c.name,
                        c.format,
                        c.path.display()
                    );
                }
            }
        }
        ModelsCommand::Show { name, json } => {
            let loc = env.registry.resolve(&name)?;
            let info = inspect(&loc)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!("name:           {}", info.name);
                println!("architecture:   {}", info.architecture);
                println!(
                    "parameters:     {} ({:.1}M)",
                    info.parameters,
                    info.parameters as f64 / 1e6
                );
                println!("quantization:   {}", info.quantization);
                println!("format:         {:?}", info.format);
                println!("size:           {:.1} MB", info.size_bytes as f64 / 1e6);
                println!("context length: {}", info.context_length);
                println!(
                    "layers:         {}  hidden: {}  heads: {} (kv {})",
                    info.layers, info.hidden_size, info.heads, info.kv_heads
                );
                println!("vocabulary:     {}", info.vocab_size);
                println!("path:           {}", info.path.display());
                println!("chat template:\n{}", info.chat_template);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
