//! Chat templates: the model's own Jinja template (from the GGUF or tokenizer_config.json),
//! rendered with minijinja in the way Hugging Face transformers renders it.
//!
//! transformers compiles templates with `trim_blocks` and `lstrip_blocks`, defines
//! `raise_exception` and `strftime_now`, and has a `tojson` that writes Python's `json.dumps`
//! format; templates also call Python string methods (`.strip()`, `.startswith()`), which
//! minijinja-contrib's pycompat provides. A model without a template gets ChatML.

use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use minijinja::value::Kwargs;
use minijinja::{context, Environment, ErrorKind, Value};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
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

/// A compiled chat template with the BOS/EOS strings it may reference.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos: Option<String>,
    eos: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
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
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.clone())
            .map_err(|e| Error::Template(format!("cannot compile: {e:#}")))?;
        Ok(Self {
            env,
            source,
            bos: bos_token,
            eos: eos_token,
        })
    }

    /// The template in `tokenizer.chat_template`, if the GGUF has one.
    pub fn from_gguf(content: &Content, tok: &Tokenizer) -> Result<Option<Self>> {
        let Some(v) = content.metadata.get("tokenizer.chat_template") else {
            return Ok(None);
        };
        let source = v
            .to_string()
            .map_err(|_| Error::Template("tokenizer.chat_template is not a string".into()))?;
        Self::with_tokens(source.clone(), tok).map(Some)
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
        let config: serde_json::Value = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::bad_model(&file, format!("bad JSON: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Value::Null,
            Err(e) => return Err(Error::io(&file, e)),
        };
        let source = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
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
                Some(source.to_string())
            }
            Some(serde_json::Value::Null) | None => {
                let jinja = dir.join("chat_template.jinja");
                match std::fs::read_to_string(&jinja) {
                    Ok(s) => Some(s),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => return Err(Error::io(&jinja, e)),
                }
            }
            Some(_) => {
                return Err(Error::bad_model(
                    &file,
                    "chat_template is neither a string nor a list",
                ))
            }
        };
        source.map(|s| Self::with_tokens(s, tok)).transpose()
    }

    /// ChatML, for models without a template of their own.
    pub fn chatml(tok: &Tokenizer) -> Self {
        Self::with_tokens(CHATML_TEMPLATE.to_string(), tok)
            .expect("the built-in ChatML template compiles")
    }

    fn with_tokens(source: String, tok: &Tokenizer) -> Result<Self> {
        Self::new(
            source,
            tok.bos_token().map(str::to_string),
            tok.eos_token().map(str::to_string),
        )
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the conversation; with `add_generation_prompt` the result ends where the
    /// assistant's answer starts. `raise_exception` in the template becomes an error here.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| Error::Template(format!("{e:#}")))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.as_deref().unwrap_or(""),
            eos_token => self.eos.as_deref().unwrap_or(""),
        })
        .map_err(|e| Error::Template(format!("render: {e:#}")))
    }
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

    fn sys_user() -> Vec<ChatMessage> {
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
