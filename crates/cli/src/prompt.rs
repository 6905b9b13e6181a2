//! `forgeline prompt`: one completion, streamed to stdout; timings and counts on stderr.

use std::io::Write;
use std::process::ExitCode;

use clap::Args;
use forgeline_engine::chat::ChatMessage;
use forgeline_engine::generate::{generate, GenRequest};
use forgeline_engine::kv_cache::KvCache;
use forgeline_engine::sampling::SamplingParams;

use crate::Env;

#[derive(Args, Debug)]
pub struct PromptArgs {
    /// The prompt text (a chat message with --chat)
    pub text: String,
    /// Model name, path, or Hugging Face repo id [default: smollm2-135m-instruct]
    #[arg(long)]
    pub model: Option<String>,
    /// Wrap the text as a user message in the model's chat template
    #[arg(long)]
    pub chat: bool,
    /// System message (with --chat)
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Sampling temperature; 0 is greedy
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most tokens to generate
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Stop when this text appears (repeatable)
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print one JSON object with the text, counts and timings instead of streaming
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: PromptArgs, env: &Env) -> anyhow::Result<ExitCode> {
    if a.max_tokens == 0 {
        return Err(crate::usage("--max-tokens must be at least 1"));
    }
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
    };
    sampling.validate()?;
    let loaded_at = std::time::Instant::now();
    let m = env.load_model(a.model.as_deref())?;
    let load_s = loaded_at.elapsed().as_secs_f64();
    let text = if a.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(ChatMessage::system(s.clone()));
        }
        msgs.push(ChatMessage::user(a.text.clone()));
        m.chat_template.render(&msgs, true)?
    } else {
        a.text.clone()
    };
    let prompt = m
        .tokenizer
        .encode(&text, !a.chat && m.tokenizer.add_bos_token())?;
    let ctx = m.model.config().context_length;
    let max_tokens = a.max_tokens.min(ctx.saturating_sub(prompt.len()));
    if max_tokens == 0 || prompt.is_empty() {
        return Err(crate::usage(format!(
            "the prompt has {} tokens; the model's context holds {ctx}",
            prompt.len()
        )));
    }
    let need = prompt.len() + max_tokens;
    let mut kv = KvCache::new(
        m.model.config(),
        KvCache::DEFAULT_BLOCK_SIZE,
        need.div_ceil(KvCache::DEFAULT_BLOCK_SIZE),
        m.model.device(),
    )?;
    let req = GenRequest {
        prompt,
        max_tokens,
        sampling,
        stop_strings: a.stop.clone(),
        ..Default::default()
    };
    let mut stdout = std::io::stdout().lock();
    let json = a.json;
    let mut write_err = None;
    let out = generate(&m, &mut kv, vec![req], 512, |_, delta| {
        if !json && write_err.is_none() {
            if let Err(e) = stdout
                .write_all(delta.as_bytes())
                .and_then(|_| stdout.flush())
            {
                write_err = Some(e);
            }
        }
    })?
    .remove(0);
    if let Some(e) = write_err {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e.into());
        }
    }
    let decode_s = (out.total_time - out.time_to_first_token).as_secs_f64();
    let decode_tok_s = if out.tokens.len() > 1 && decode_s > 0.0 {
        (out.tokens.len() - 1) as f64 / decode_s
    } else {
        0.0
    };
    let prefill_tok_s = out.prompt_tokens as f64 / out.time_to_first_token.as_secs_f64().max(1e-9);
    if json {
        let v = serde_json::json!({
            "model": m.info.name,
            "text": out.text,
            "stop_reason": out.stop_reason,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.tokens.len(),
            "load_s": load_s,
            "time_to_first_token_ms": out.time_to_first_token.as_secs_f64() * 1e3,
            "prefill_tok_s": prefill_tok_s,
            "decode_tok_s": decode_tok_s,
        });
        println!("{v}");
    } else {
        if !out.text.ends_with('\n') {
            let _ = writeln!(stdout);
        }
        eprintln!(
            "[{}] prompt {} tokens ({:.0} tok/s), completion {} tokens ({:.1} tok/s), stop: {:?}, load {:.2}s",
            m.info.name,
            out.prompt_tokens,
            prefill_tok_s,
            out.tokens.len(),
            decode_tok_s,
            out.stop_reason,
            load_s
        );
    }
    Ok(ExitCode::SUCCESS)
}
