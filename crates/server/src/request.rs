//! `/v1/chat/completions` and `/v1/completions` bodies, validated at the boundary into an
//! `ApiRequest` (an engine `GenerateRequest` plus how to answer), with errors naming the field.
//!
//! Besides OpenAI's parameters, vLLM's sampling extras are accepted: `top_k`, `min_p`,
//! `repetition_penalty`, the `dry_*` fields (as llama.cpp's server) and `ignore_eos`
//! (benchmarks).

use forgeline_engine::chat::{ChatMessage, ToolCall};
use forgeline_engine::constraint::Constraint;
use forgeline_engine::sampling::{SamplingDefaults, SamplingParams};
use forgeline_engine::scheduler::{GenerateRequest, Prompt, MAX_TOP_LOGPROBS};
use serde_json::Value;

use crate::error::{ApiError, ApiResult};
use crate::fields::{kind, parse_object, Fields};
use crate::tools::{self, Tools};
use crate::ModelCard;

/// Which OpenAI endpoint a request came to; it decides the prompt's shape and the answer's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

impl Endpoint {
    /// The field that holds the prompt.
    pub fn prompt_param(self) -> &'static str {
        match self {
            Endpoint::Chat => "messages",
            Endpoint::Completion => "prompt",
        }
    }
}

/// A validated request.
#[derive(Clone, Debug)]
pub struct ApiRequest {
    pub endpoint: Endpoint,
    /// The loaded model it runs on.
    pub model: String,
    /// `max_tokens` is a placeholder when `max_tokens` below is None.
    pub generate: GenerateRequest,
    /// As asked; None means as many as the context and the server's default allow.
    pub max_tokens: Option<usize>,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage before `[DONE]`.
    pub include_usage: bool,
    /// Choices to generate (`n`): each its own sequence on the shared prompt, choice `i`
    /// sampled with the seed plus `i`.
    pub n: usize,
    /// Chat's functions, when any were given.
    pub tools: Option<Tools>,
}

/// The most choices one request may ask for (`n`).
pub const MAX_CHOICES: u64 = 16;

/// Stop strings per request, as in OpenAI's API (which allows 4).
pub const MAX_STOP: usize = 16;
/// Bytes in one stop string, and in all of them: the engine matches them after every token.
pub const MAX_STOP_BYTES: usize = 1024;
pub const MAX_STOP_TOTAL_BYTES: usize = 4096;

/// Parses a `/v1/chat/completions` body.
pub fn parse_chat(body: &[u8], models: &[ModelCard]) -> ApiResult<ApiRequest> {
    let obj = parse_object(body)?;
    let f = Fields::new(&obj, "");
    let msgs = f
        .array("messages")?
        .ok_or_else(|| ApiError::field("messages", "`messages` is required"))?;
    if msgs.is_empty() {
        return Err(ApiError::field(
            "messages",
            "`messages` must hold at least one message",
        ));
    }
    let messages = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| message(i, m))
        .collect::<ApiResult<Vec<_>>>()?;
    let mut req = common(&f, Endpoint::Chat, Prompt::Chat(messages), models)?;
    if let Some(t) = tools::parse(&f)? {
        if let Some(c) = t.constraint() {
            if req.generate.constraint.is_some() {
                return Err(ApiError::field(
                    "tools",
                    "`tools` and a constraint on the output (`response_format`, `regex`, \
                     `grammar`) were both given: calls are constrained by their schemas; set \
                     `tool_choice` to none to use the other constraint",
                ));
            }
            req.generate.constraint = Some(c);
        }
        req.generate.tools = t.defs.clone();
        req.tools = Some(t);
    }
    Ok(req)
}

/// Parses a `/v1/completions` body.
pub fn parse_completion(body: &[u8], models: &[ModelCard]) -> ApiResult<ApiRequest> {
    let obj = parse_object(body)?;
    let f = Fields::new(&obj, "");
    let mut prompt = prompt(f.require("prompt")?)?;
    if f.bool("echo")? == Some(true) {
        return Err(ApiError::field("echo", "`echo` is not supported"));
    }
    for name in ["tools", "functions", "tool_choice", "function_call"] {
        if f.get(name).is_some() {
            return Err(ApiError::field(
                name,
                format!("`{name}` belongs to /v1/chat/completions, not /v1/completions"),
            ));
        }
    }
    // Fill in the middle: the prompt is the code before the gap, `suffix` the code after.
    if let Some(suffix) = f.str("suffix")?.filter(|s| !s.is_empty()) {
        prompt = match prompt {
            Prompt::Text(prefix) => Prompt::Infill {
                prefix,
                suffix: suffix.to_string(),
            },
            _ => {
                return Err(ApiError::field(
                    "suffix",
                    "`suffix` needs a text `prompt` (the code before the gap), not token ids",
                ))
            }
        };
    }
    if f.get("best_of").is_some() && f.u64("best_of")? != Some(1) {
        return Err(ApiError::field("best_of", "`best_of` must be 1"));
    }
    common(&f, Endpoint::Completion, prompt, models)
}

fn message(i: usize, v: &Value) -> ApiResult<ChatMessage> {
    let path = format!("messages[{i}]");
    let Value::Object(o) = v else {
        return Err(ApiError::field(
            &path,
            format!("`{path}` must be an object, not {}", kind(v)),
        ));
    };
    let f = Fields::new(o, path);
    let role = f.str("role")?.ok_or_else(|| {
        ApiError::field(
            &f.param("role"),
            format!("`{}` is required", f.param("role")),
        )
    })?;
    let role = match role {
        "system" | "user" | "assistant" | "tool" => role,
        // OpenAI's newer name for the system role.
        "developer" => "system",
        other => {
            let p = f.param("role");
            return Err(ApiError::field(
                &p,
                format!("`{p}` must be system, developer, user, assistant or tool, not `{other}`"),
            ));
        }
    };
    let calls = match (role, f.array("tool_calls")?) {
        ("assistant", Some(list)) => tool_calls(&f.param("tool_calls"), list)?,
        (_, Some(_)) => {
            let p = f.param("tool_calls");
            return Err(ApiError::field(
                &p,
                format!("`{p}` belongs to assistant messages, not {role} messages"),
            ));
        }
        (_, None) => Vec::new(),
    };
    let content = match f.get("content") {
        // An assistant turn that only calls functions has no content.
        None if !calls.is_empty() => String::new(),
        None => {
            return Err(ApiError::field(
                &f.param("content"),
                format!("`{}` is required", f.param("content")),
            ))
        }
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => text_parts(&f.param("content"), parts)?,
        Some(other) => {
            let p = f.param("content");
            return Err(ApiError::field(
                &p,
                format!(
                    "`{p}` must be a string or an array of text parts, not {}",
                    kind(other)
                ),
            ));
        }
    };
    let mut msg = ChatMessage::new(role, content);
    msg.tool_calls = calls;
    if role == "tool" {
        msg.tool_call_id = f.str("tool_call_id")?.map(str::to_string);
        msg.name = f.str("name")?.map(str::to_string);
    }
    Ok(msg)
}

/// An assistant message's `tool_calls`: `[{"id", "type": "function", "function": {"name",
/// "arguments"}}]`, the arguments a string of JSON (kept as a string if it is not JSON).
fn tool_calls(path: &str, list: &[Value]) -> ApiResult<Vec<ToolCall>> {
    list.iter()
        .enumerate()
        .map(|(i, c)| {
            let p = format!("{path}[{i}]");
            let Value::Object(o) = c else {
                return Err(ApiError::field(
                    &p,
                    format!("`{p}` must be an object, not {}", kind(c)),
                ));
            };
            let f = Fields::new(o, p.clone());
            let func = f.object("function")?.ok_or_else(|| {
                ApiError::field(
                    &f.param("function"),
                    format!("`{}` is required", f.param("function")),
                )
            })?;
            let name = func.str("name")?.ok_or_else(|| {
                ApiError::field(
                    &func.param("name"),
                    format!("`{}` is required", func.param("name")),
                )
            })?;
            let arguments = match func.get("arguments") {
                None => Value::Object(Default::default()),
                Some(Value::String(s)) => {
                    serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone()))
                }
                Some(v) => v.clone(),
            };
            let id = f.str("id")?.unwrap_or_default();
            Ok(ToolCall::function(id, name, arguments))
        })
        .collect()
}

/// `[{"type": "text", "text": "..."}, ...]`, joined.
fn text_parts(path: &str, parts: &[Value]) -> ApiResult<String> {
    let mut out = String::new();
    for (i, p) in parts.iter().enumerate() {
        let pp = format!("{path}[{i}]");
        let Value::Object(o) = p else {
            return Err(ApiError::field(&pp, format!("`{pp}` must be an object")));
        };
        let f = Fields::new(o, pp.clone());
        match f.str("type")? {
            Some("text") => out.push_str(f.str("text")?.unwrap_or_default()),
            other => {
                return Err(ApiError::field(
                    &f.param("type"),
                    format!(
                        "only text content parts are supported, not `{}`",
                        other.unwrap_or("(none)")
                    ),
                ))
            }
        }
    }
    Ok(out)
}

/// A string, a one-element array of a string, or token ids (or one array of them).
fn prompt(v: &Value) -> ApiResult<Prompt> {
    let bad = || {
        ApiError::field(
            "prompt",
            "`prompt` must be a string, an array of one string, or an array of token ids",
        )
    };
    let tokens = |a: &[Value]| -> ApiResult<Vec<u32>> {
        a.iter()
            .map(|t| {
                t.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(bad)
            })
            .collect()
    };
    match v {
        Value::String(s) => Ok(Prompt::Text(s.clone())),
        Value::Array(a) => match a.as_slice() {
            [] => Err(bad()),
            [Value::String(s)] => Ok(Prompt::Text(s.clone())),
            [Value::Array(t)] => Ok(Prompt::Tokens(tokens(t)?)),
            [Value::Number(_), ..] => Ok(Prompt::Tokens(tokens(a)?)),
            [_, _, ..] if a.iter().all(|p| p.is_string() || p.is_array()) => Err(ApiError::field(
                "prompt",
                "only one prompt per request is supported",
            )),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

/// The parameters both endpoints share.
fn common(
    f: &Fields,
    endpoint: Endpoint,
    prompt: Prompt,
    models: &[ModelCard],
) -> ApiResult<ApiRequest> {
    refuse_unsupported(f)?;
    let card = match f.str("model")? {
        None => models
            .first()
            .ok_or_else(|| ApiError::internal("no model is loaded"))?,
        Some(name) => models.iter().find(|m| m.name == name).ok_or_else(|| {
            let loaded: Vec<String> = models.iter().map(|m| m.name.clone()).collect();
            ApiError::unknown_model(name, &loaded)
        })?,
    };
    let model = card.name.clone();
    let max_tokens = match f.u64("max_completion_tokens")? {
        Some(n) => Some(("max_completion_tokens", n)),
        None => f.u64("max_tokens")?.map(|n| ("max_tokens", n)),
    };
    let max_tokens = match max_tokens {
        Some((name, 0)) => {
            return Err(ApiError::field(
                name,
                format!("`{name}` must be at least 1"),
            ))
        }
        // More than the whole context can never run; refusing it here also keeps the
        // engine's `prompt + max_tokens` far from overflowing.
        Some((name, n)) => match usize::try_from(n) {
            Ok(n) if n <= card.context_length => Some(n),
            _ => {
                return Err(ApiError::field(
                    name,
                    format!(
                    "`{name}` must be at most the context of model `{model}`, {} tokens, not {n}",
                    card.context_length
                ),
                )
                .with_code("context_length_exceeded"))
            }
        },
        None => None,
    };
    let sampling = sampling(f, &card.sampling)?;
    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            let stops = a
                .iter()
                .map(|s| s.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    ApiError::field("stop", "`stop` must be a string or an array of strings")
                })?;
            if stops.len() > MAX_STOP {
                return Err(ApiError::field(
                    "stop",
                    format!(
                        "`stop` holds at most {MAX_STOP} strings, not {}",
                        stops.len()
                    ),
                ));
            }
            stops
        }
        Some(other) => {
            return Err(ApiError::field(
                "stop",
                format!(
                    "`stop` must be a string or an array of strings, not {}",
                    kind(other)
                ),
            ))
        }
    };
    check_stop_lengths(&stop)?;
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.object("stream_options")? {
        Some(o) => o.bool("include_usage")?.unwrap_or(false),
        None => false,
    };
    let mut generate = GenerateRequest::new(prompt, max_tokens.unwrap_or(1));
    generate.model = Some(model.clone());
    generate.sampling = sampling;
    generate.stop_strings = stop;
    generate.ignore_eos = f.bool("ignore_eos")?.unwrap_or(false);
    generate.constraint = constraint(f)?;
    generate.logprobs = logprobs(f, endpoint)?;
    let n = match f.u64("n")? {
        None => 1,
        Some(n @ 1..=MAX_CHOICES) => n as usize,
        Some(n) => {
            return Err(ApiError::field(
                "n",
                format!("`n` must be between 1 and {MAX_CHOICES}, not {n}"),
            ))
        }
    };
    Ok(ApiRequest {
        endpoint,
        model,
        generate,
        max_tokens,
        stream,
        include_usage,
        n,
        tools: None,
    })
}

/// How many alternatives to report log-probabilities for at each step, if any: chat's
/// `logprobs: true` with `top_logprobs` (0 by default), the completions endpoint's
/// `logprobs: N` (0 reports the sampled tokens' alone, as vLLM does).
fn logprobs(f: &Fields, endpoint: Endpoint) -> ApiResult<Option<usize>> {
    let max = MAX_TOP_LOGPROBS as u64;
    let within = |name: &str, n: u64| {
        if n > max {
            Err(ApiError::field(
                name,
                format!("`{name}` must be between 0 and {max}, not {n}"),
            ))
        } else {
            Ok(n as usize)
        }
    };
    match endpoint {
        Endpoint::Chat => {
            let on = f.bool("logprobs")?.unwrap_or(false);
            match f.u64("top_logprobs")? {
                Some(n) if !on => Err(ApiError::field(
                    "top_logprobs",
                    format!("`top_logprobs` ({n}) needs `logprobs` set to true"),
                )),
                Some(n) => within("top_logprobs", n).map(Some),
                None => Ok(on.then_some(0)),
            }
        }
        Endpoint::Completion => match f.get("logprobs") {
            None => Ok(None),
            // Some clients send the chat form here too.
            Some(Value::Bool(false)) => Ok(None),
            Some(Value::Bool(true)) => Ok(Some(0)),
            Some(_) => match f.u64("logprobs")? {
                Some(n) => within("logprobs", n).map(Some),
                None => Ok(None),
            },
        },
    }
}

/// Each stop string, and all of them together, within their byte caps.
fn check_stop_lengths(stop: &[String]) -> ApiResult<()> {
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::field(
            "stop",
            format!(
                "each `stop` string must be at most {MAX_STOP_BYTES} bytes, not {}",
                long.len()
            ),
        ));
    }
    let total: usize = stop.iter().map(String::len).sum();
    if total > MAX_STOP_TOTAL_BYTES {
        return Err(ApiError::field(
            "stop",
            format!("the `stop` strings must be at most {MAX_STOP_TOTAL_BYTES} bytes together, not {total}"),
        ));
    }
    Ok(())
}

/// The request's sampling fields over the model's recipe over OpenAI's defaults.
fn sampling(f: &Fields, recipe: &SamplingDefaults) -> ApiResult<SamplingParams> {
    let mut s = recipe.over(SamplingParams {
        // OpenAI's default.
        temperature: 1.0,
        ..SamplingParams::default()
    });
    if let Some(t) = f.f32("temperature")? {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::field(
                "temperature",
                format!("`temperature` must be in [0, 2], not {t}"),
            ));
        }
        s.temperature = t;
    }
    if let Some(p) = f.f32("top_p")? {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::field(
                "top_p",
                format!("`top_p` must be in (0, 1], not {p}"),
            ));
        }
        s.top_p = p;
    }
    if let Some(k) = f.u64("top_k")? {
        s.top_k = usize::try_from(k).unwrap_or(usize::MAX);
    }
    if let Some(m) = f.f32("min_p")? {
        s.min_p = m;
    }
    if let Some(r) = f.f32("repetition_penalty")? {
        s.repetition_penalty = r;
    }
    if let Some(m) = f.f32("dry_multiplier")? {
        s.dry_multiplier = m;
    }
    if let Some(b) = f.f32("dry_base")? {
        s.dry_base = b;
    }
    if let Some(n) = f.u64("dry_allowed_length")? {
        s.dry_allowed_length = usize::try_from(n).unwrap_or(usize::MAX);
    }
    if let Some(n) = f.i64("dry_penalty_last_n")? {
        s.dry_penalty_last_n = n;
    }
    if let Some(seed) = f.u64("seed")? {
        s.seed = seed;
    }
    // A validation error names its field (`temperature`, ...), which becomes `param`.
    s.validate()
        .map_err(|e| ApiError::from_engine(&e, "prompt"))?;
    Ok(s)
}

/// What the output is held to while it is sampled: `response_format` (JSON), `regex` (a
/// regular expression the whole output matches, as vLLM's `guided_regex`) or `grammar` (a
/// Lark grammar, llguidance's dialect with a `start` rule, as vLLM's `guided_grammar`). At
/// most one of them.
fn constraint(f: &Fields) -> ApiResult<Option<Constraint>> {
    let mut found: Vec<(&str, Constraint)> = Vec::new();
    if let Some(c) = response_format(f)? {
        found.push(("response_format", c));
    }
    for name in ["guided_json", "guided_choice"] {
        if f.get(name).is_some() {
            return Err(ApiError::field(
                name,
                format!(
                    "`{name}` is not supported: use `response_format` (json_schema) or `regex`"
                ),
            ));
        }
    }
    for (name, make) in [
        ("regex", Constraint::Regex as fn(String) -> Constraint),
        ("grammar", Constraint::Lark),
        // vLLM's names for the same.
        ("guided_regex", Constraint::Regex),
        ("guided_grammar", Constraint::Lark),
    ] {
        if let Some(text) = f.str(name)? {
            if text.trim().is_empty() {
                return Err(ApiError::field(
                    name,
                    format!("`{name}` is empty: give a {} or leave it out", what(name)),
                ));
            }
            if text.len() > MAX_GRAMMAR_BYTES {
                return Err(ApiError::field(
                    name,
                    format!(
                        "`{name}` is {} bytes; at most {MAX_GRAMMAR_BYTES} are accepted",
                        text.len()
                    ),
                ));
            }
            found.push((name, make(text.to_string())));
        }
    }
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|(n, _)| *n).collect();
        return Err(ApiError::field(
            names[1],
            format!(
                "`{}` and `{}` both constrain the output: give one",
                names[0], names[1]
            ),
        ));
    }
    Ok(found.pop().map(|(_, c)| c))
}

/// The longest `regex` or `grammar` accepted, in bytes.
const MAX_GRAMMAR_BYTES: usize = 64 * 1024;

fn what(field: &str) -> &'static str {
    if field.ends_with("regex") {
        "regular expression"
    } else {
        "Lark grammar"
    }
}

/// `{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}}`.
fn response_format(f: &Fields) -> ApiResult<Option<Constraint>> {
    let Some(rf) = f.object("response_format")? else {
        return Ok(None);
    };
    match rf.str("type")? {
        None | Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::Json)),
        Some("json_schema") => {
            let js = rf.object("json_schema")?.ok_or_else(|| {
                ApiError::field(
                    "response_format.json_schema",
                    "`response_format.json_schema` is required when `type` is `json_schema`",
                )
            })?;
            let schema = js.require("schema")?;
            if !(schema.is_object() || schema.is_boolean()) {
                let p = js.param("schema");
                return Err(ApiError::field(
                    &p,
                    format!("`{p}` must be a JSON schema object, not {}", kind(schema)),
                ));
            }
            Ok(Some(Constraint::JsonSchema(schema.clone())))
        }
        Some(other) => Err(ApiError::field(
            "response_format.type",
            format!(
                "`response_format.type` must be text, json_object or json_schema, not `{other}`"
            ),
        )),
    }
}

/// Parameters forgeline does not implement: refused rather than silently ignored.
fn refuse_unsupported(f: &Fields) -> ApiResult<()> {
    let unsupported = |name: &str| {
        Err(ApiError::field(
            name,
            format!("`{name}` is not supported by this server"),
        ))
    };
    if f.object("logit_bias")?.is_some()
        && f.get("logit_bias")
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
    {
        return unsupported("logit_bias");
    }
    for name in ["presence_penalty", "frequency_penalty"] {
        if f.f32(name)?.is_some_and(|p| p != 0.0) {
            return unsupported(name);
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
