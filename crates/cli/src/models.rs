//! `forgeline models list|show`.

use std::process::ExitCode;

use clap::Subcommand;
use forgeline_engine::loader::inspect;

use crate::Env;

#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// The models in the models directory, and whether their weights are present
    List {
        #[arg(long)]
        json: bool,
    },
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
        ModelsCommand::List { json } => {
            let manifests = env.registry.manifests()?;
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
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                eprintln!(
                    "no model manifests in {}",
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
