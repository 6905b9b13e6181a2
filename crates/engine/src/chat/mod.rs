//! Chat templates: the model's own Jinja template (from the GGUF or tokenizer_config.json),
//! rendered with minijinja in the way Hugging Face transformers renders it.
//!
//! transformers compiles templates with `trim_blocks` and `lstrip_blocks`, defines
//! `raise_exception` and `strftime_now`, and has a `tojson` that writes Python's `json.dumps`
//! format; templates also call Python string methods (`.strip()`, `.startswith()`), which
//! minijinja-contrib's pycompat provides. A model without a template cannot render a chat (an
//! error that says so) unless its manifest gives one (`chat_template`, or `chatml`).

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

use candle_core::quantized::gguf_file::Content;
use minijinja::value::Kwargs;
use minijinja::{context, Environment, ErrorKind, State, Value};
use serde::Serialize;

use crate::error::{Error, Result, TemplateLimit};
use crate::model::files;
use crate::tokenizer::Tokenizer;

mod limits;
mod tools;
use limits::{batch, check_format, check_replace, format, indent, replace, slice, CappedWriter};
pub use tools::{FunctionCall, ToolCall, TOOL_CALL_CLOSE, TOOL_CALL_OPEN};

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's function calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A `tool` turn: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A `tool` turn: the function that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// The ChatML template (Qwen, SmolLM, ...) used when a model ships none.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const NAME: &str = "chat";

/// Template instructions one render may run. Real templates run a few dozen per message;
/// without a limit, nested loops over `range(100000)` would run for ever.
pub const FUEL: u64 = 200_000;
/// Nested blocks, loops and macro calls.
const RECURSION_LIMIT: usize = 100;
/// Bytes a render may write (a prompt far beyond any context window).
pub const MAX_OUTPUT: usize = 16 << 20;
/// Work inside one filter call uses no fuel; a render running this long is abandoned.
pub const RENDER_DEADLINE: Duration = Duration::from_secs(10);

/// A compiled chat template with the BOS/EOS strings it may reference.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    /// Set for a model that has no template: why a chat cannot be rendered, and what to do.
    missing: Option<String>,
    source: String,
    /// Where the template came from, for errors ("model.gguf, key tokenizer.chat_template").
    origin: String,
    bos: Option<String>,
    eos: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("origin", &self.origin)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; syntax errors are reported here, not at render time.
    pub fn new(
        source: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        Self::compile(source, String::new(), bos_token, eos_token)
    }

    /// As `new`, with `origin` (the file, and the key within it) named in every error.
    pub fn compile(
        source: String,
        origin: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(RECURSION_LIMIT);
        env.set_unknown_method_callback(py_method);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_filter("indent", indent);
        env.add_filter("batch", batch);
        env.add_filter("slice", slice);
        env.add_filter("replace", replace);
        env.add_filter("format", format);
        let mut t = Self {
            env: Arc::new(Environment::empty()),
            missing: None,
            source: source.clone(),
            origin,
            bos: bos_token,
            eos: eos_token,
        };
        // The parser recurses on nesting; a panic in it is one more compile error.
        let added =
            std::panic::catch_unwind(AssertUnwindSafe(|| env.add_template_owned(NAME, source)));
        match added {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(t.err(format!("cannot compile: {e:#}"))),
            Err(_) => return Err(t.err("cannot compile: the template engine panicked".into())),
        }
        t.env = Arc::new(env);
        Ok(t)
    }

    fn over(&self, limit: TemplateLimit) -> Error {
        Error::TemplateOverLimit {
            origin: self.origin.clone(),
            limit,
        }
    }

    fn err(&self, msg: String) -> Error {
        if self.origin.is_empty() {
            Error::Template(msg)
        } else {
            Error::Template(format!("{}: {msg}", self.origin))
        }
    }

    /// The template in `tokenizer.chat_template`, if the GGUF at `path` has one.
    pub fn from_gguf(content: &Content, path: &Path, tok: &Tokenizer) -> Result<Option<Self>> {
        let Some(v) = content.metadata.get("tokenizer.chat_template") else {
            return Ok(None);
        };
        let source = v
            .to_string()
            .map_err(|_| Error::bad_model(path, "tokenizer.chat_template is not a string"))?;
        let origin = format!("{}, key tokenizer.chat_template", path.display());
        Self::with_tokens(source.clone(), origin, tok).map(Some)
    }

    /// The template in tokenizer_config.json's `chat_template` (a string, or a list of named
    /// templates of which "default" is taken), else in chat_template.jinja beside it.
    /// `path` is the tokenizer_config.json or the directory holding it.
    pub fn from_tokenizer_config(path: &Path, tok: &Tokenizer) -> Result<Option<Self>> {
        let (file, dir) = if path.is_dir() {
            (path.join("tokenizer_config.json"), path)
        } else {
            (path.to_path_buf(), path.parent().unwrap_or(Path::new(".")))
        };
        let config: serde_json::Value = match files::read_capped(&file, files::MAX_TEXT_FILE) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::bad_model(&file, format!("bad JSON: {e}")))?,
            Err(e) if files::is_not_found(&e) => serde_json::Value::Null,
            Err(e) => return Err(e),
        };
        let source = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some((s.clone(), origin(&file))),
            Some(serde_json::Value::Array(list)) => {
                let named = |name: &str| {
                    list.iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))
                        .and_then(|t| t.get("template"))
                        .and_then(|t| t.as_str())
                };
                let source = named("default").ok_or_else(|| {
                    Error::bad_model(
                        &file,
                        "chat_template list has no template named \"default\"",
                    )
                })?;
                Some((source.to_string(), origin(&file)))
            }
            Some(serde_json::Value::Null) | None => {
                let jinja = dir.join("chat_template.jinja");
                match files::read_text(&jinja) {
                    Ok(s) => Some((s, jinja.display().to_string())),
                    Err(e) if files::is_not_found(&e) => None,
                    Err(e) => return Err(e),
                }
            }
            Some(_) => {
                return Err(Error::bad_model(
                    &file,
                    "chat_template is neither a string nor a list",
                ))
            }
        };
        source
            .map(|(s, origin)| Self::with_tokens(s, origin, tok))
            .transpose()
    }

    /// A model without a chat template (a base model, most often): rendering a chat is an
    /// error that says so and how to give one, never a guess at its format. Plain
    /// completions still work.
    pub fn missing(loc: &crate::registry::ModelLocation) -> Self {
        let mut t = Self::chatml_unchecked();
        t.source = String::new();
        t.origin = loc.path.display().to_string();
        t.missing = Some(format!(
            "model `{}` ({}) has no chat template, so it cannot take chat messages (it may be \
             a base model: give it plain text to complete instead). To chat with it anyway, \
             give a template in its manifest (models/<name>.toml): chat_template = \"chatml\" \
             or a Jinja template",
            loc.name,
            loc.path.display()
        ));
        t
    }

    /// Whether this stands for a missing template.
    pub fn is_missing(&self) -> bool {
        self.missing.is_some()
    }

    fn chatml_unchecked() -> Self {
        Self::compile(CHATML_TEMPLATE.to_string(), String::new(), None, None)
            .expect("the built-in ChatML template compiles")
    }

    /// ChatML, for models whose manifest asks for it.
    pub fn chatml(tok: &Tokenizer) -> Self {
        Self::with_tokens(CHATML_TEMPLATE.to_string(), "built-in ChatML".into(), tok)
            .expect("the built-in ChatML template compiles")
    }

    fn with_tokens(source: String, origin: String, tok: &Tokenizer) -> Result<Self> {
        Self::compile(
            source,
            origin,
            tok.bos_token().map(str::to_string),
            tok.eos_token().map(str::to_string),
        )
    }

    /// Renders a one-message conversation, so that a template that cannot render at all
    /// (out of fuel, too much output, too slow) fails the load, naming its file, rather
    /// than every request. Errors that depend on the conversation (`raise_exception` on
    /// roles, say) are only logged: real requests may well satisfy the template.
    pub fn probe(&self) -> Result<()> {
        if self.is_missing() {
            return Ok(());
        }
        match self.render(&[ChatMessage::user("Hello")], true) {
            Err(e @ Error::TemplateOverLimit { .. }) => Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "the chat template fails on a one-message chat");
                Ok(())
            }
            Ok(_) => Ok(()),
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the conversation; with `add_generation_prompt` the result ends where the
    /// assistant's answer starts. `raise_exception` in the template becomes an error here,
    /// as do running out of fuel, writing more than `MAX_OUTPUT` bytes and taking longer
    /// than `RENDER_DEADLINE`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_ctx(messages, &[], add_generation_prompt)
    }

    fn render_ctx(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String> {
        if let Some(why) = &self.missing {
            return Err(Error::NoChatTemplate(why.clone()));
        }
        // On its own thread, so that work fuel does not see (inside one filter call) cannot
        // hold the caller past the deadline.
        let (tx, rx) = std::sync::mpsc::channel();
        let this = self.clone();
        let msgs = messages.to_vec();
        let tl = tools.to_vec();
        let spawned = std::thread::Builder::new()
            .name("chat-template".into())
            .spawn(move || {
                let _ = tx.send(this.render_here(&msgs, &tl, add_generation_prompt));
            });
        if spawned.is_err() {
            return self.render_here(messages, tools, add_generation_prompt);
        }
        match rx.recv_timeout(RENDER_DEADLINE) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(self.over(TemplateLimit::Time {
                secs: RENDER_DEADLINE.as_secs(),
            })),
            Err(RecvTimeoutError::Disconnected) => {
                Err(self.err("render: the template engine failed".into()))
            }
        }
    }

    fn render_here(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| self.err(format!("{e:#}")))?;
        let ctx = context! {
            messages => messages,
            tools => (!tools.is_empty()).then_some(tools),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.as_deref().unwrap_or(""),
            eos_token => self.eos.as_deref().unwrap_or(""),
        };
        let mut out = CappedWriter::default();
        let res = std::panic::catch_unwind(AssertUnwindSafe(|| {
            tmpl.render_captured_to(ctx, &mut out).map(|_| ())
        }));
        match res {
            Ok(Ok(())) => String::from_utf8(out.buf)
                .map_err(|_| self.err("render: the output is not UTF-8".into())),
            Ok(Err(_)) if out.overflow => {
                Err(self.over(TemplateLimit::Output { bytes: MAX_OUTPUT }))
            }
            Ok(Err(e)) if e.kind() == ErrorKind::OutOfFuel => {
                Err(self.over(TemplateLimit::Fuel { steps: FUEL }))
            }
            Ok(Err(e)) => Err(self.err(format!("render: {e:#}"))),
            Err(_) => Err(self.err("render: the template engine panicked".into())),
        }
    }
}

fn origin(file: &Path) -> String {
    format!("{}, key chat_template", file.display())
}

/// Python's string methods (pycompat), with the size checks of the filters above.
fn py_method(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    if let Some(s) = value.as_str() {
        match (method, args) {
            ("replace", [from, to, ..]) => {
                if let (Some(from), Some(to)) = (from.as_str(), to.as_str()) {
                    check_replace(s, from, to)?;
                }
            }
            ("format", _) => check_format(s, args)?,
            _ => {}
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent)`,
/// so `", "`/`": "` separators without indent, and no HTML escaping.
fn tojson(
    value: &Value,
    indent: Option<usize>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent = match indent {
        Some(i) => Some(i),
        None => kwargs.get::<Option<usize>>("indent")?,
    };
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let res = match indent {
        Some(n) => {
            let pad = " ".repeat(n);
            let fmt = serde_json::ser::PrettyFormatter::with_indent(pad.as_bytes());
            value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, fmt))
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out,
            PyFormatter,
        )),
    };
    res.map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let json = String::from_utf8(out)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from_safe_string(json))
}

/// Python's default `json.dumps` separators.
struct PyFormatter;

impl serde_json::ser::Formatter for PyFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime(&format, secs)
}

/// The subset of C's strftime that chat templates use, in UTC: %Y %y %m %d %e %H %M %S %j
/// %b %B %a %A %%. Other directives are written out as they are.
fn strftime(format: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let yday = days - days_from_civil(year, 1, 1) + 1;
    let weekday = (days + 4).rem_euclid(7) as usize;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out += &year.to_string(),
            Some('y') => out += &format!("{:02}", year.rem_euclid(100)),
            Some('m') => out += &format!("{month:02}"),
            Some('d') => out += &format!("{day:02}"),
            Some('e') => out += &format!("{day:>2}"),
            Some('H') => out += &format!("{:02}", secs / 3600),
            Some('M') => out += &format!("{:02}", secs / 60 % 60),
            Some('S') => out += &format!("{:02}", secs % 60),
            Some('j') => out += &format!("{yday:03}"),
            Some('B') => out += MONTHS[month as usize - 1],
            Some('b') => out += &MONTHS[month as usize - 1][..3],
            Some('A') => out += DAYS[weekday],
            Some('a') => out += &DAYS[weekday][..3],
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn sys_user() -> Vec<ChatMessage> {
        vec![
            ChatMessage::system("You write Python."),
            ChatMessage::user(" Add two numbers. \n"),
        ]
    }

    /// Meta-Llama-3-8B-Instruct's template.
    const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}\
{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}\
{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}\
{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

    /// Qwen2.5-Instruct's template (its message part), in its multi-line whitespace-control style.
    const QWEN2: &str = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "tool" %}
        {{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

    #[test]
    fn llama3_template_renders_with_bos_and_trim() {
        let t = ChatTemplate::new(
            LLAMA3.into(),
            Some("<|begin_of_text|>".into()),
            Some("<|eot_id|>".into()),
        )
        .unwrap();
        assert_eq!(
            t.render(&sys_user(), true).unwrap(),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou write Python.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nAdd two numbers.<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        assert_eq!(t.source(), LLAMA3);
    }

    #[test]
    fn qwen2_template_renders_default_system_prompt() {
        let t = ChatTemplate::new(QWEN2.into(), None, Some("<|im_end|>".into())).unwrap();
        let msgs = [
            ChatMessage::user("hi"),
            ChatMessage::assistant("hello"),
            ChatMessage::user("bye"),
        ];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n\
             <|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&sys_user()[..1], false).unwrap(),
            "<|im_start|>system\nYou write Python.<|im_end|>\n"
        );
    }

    #[test]
    fn python_idioms_work() {
        let src = "{% for m in messages %}{% if m.content.startswith('!') %}{{ raise_exception('no bangs: ' + m.role) }}{% endif %}\
                   [{{ m.role.upper() }}|{{ m.content.strip() }}|{{ m.content.split()|length }}]{% endfor %}\
                   {{ messages[0] | tojson }}|{{ {'a': [1, 'é<>'], 'b': none} | tojson }}|{{ [1] | tojson(indent=2) }}";
        let t = ChatTemplate::new(src.into(), None, None).unwrap();
        assert_eq!(
            t.render(&sys_user(), false).unwrap(),
            "[SYSTEM|You write Python.|3][USER|Add two numbers.|3]\
             {\"role\": \"system\", \"content\": \"You write Python.\"}|{\"a\": [1, \"é<>\"], \"b\": null}|[\n  1\n]"
        );
        let err = t
            .render(&[ChatMessage::user("!x")], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no bangs: user"), "{err}");
        let err = ChatTemplate::new("{% for %}".into(), None, None).unwrap_err();
        assert!(matches!(err, Error::Template(_)), "{err}");
    }

    #[test]
    fn probe_fails_a_template_over_its_limits_and_lets_a_picky_one_load() {
        let endless =
            "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(endless.into(), None, None).unwrap();
        let err = t.probe().unwrap_err();
        assert!(
            matches!(
                err,
                Error::TemplateOverLimit {
                    limit: TemplateLimit::Fuel { steps: FUEL },
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("over its limits: ran out of fuel"));
        let picky = ChatTemplate::new("{{ raise_exception('no') }}".into(), None, None).unwrap();
        assert!(picky.probe().is_ok());
    }

    #[test]
    fn strftime_formats_utc_dates() {
        assert_eq!(strftime("%d %b %Y", 0), "01 Jan 1970");
        assert_eq!(
            strftime("%A %a %B %e %y-%m-%d %H:%M:%S %j %% %Q", 1_700_000_000),
            "Tuesday Tue November 14 23-11-14 22:13:20 318 % %Q"
        );
        assert_eq!(strftime("%Y-%m-%d", 951_782_400), "2000-02-29");
        let t = ChatTemplate::new("{{ strftime_now('%Y') }}".into(), None, None).unwrap();
        assert!(t.render(&[], false).unwrap().parse::<u32>().unwrap() >= 2025);
    }
}
