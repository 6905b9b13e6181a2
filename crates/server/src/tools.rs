//! Function calling: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls` validated at
//! the boundary, the grammar that holds the model's calls to each function's JSON schema while
//! it samples, and the parser that turns `<tool_call>` blocks in its output back into
//! `tool_calls`, whole or while streaming.
//!
//! Calls are written as Qwen2.5's and Qwen3's templates write them (and as forgeline's fallback
//! asks templates without tool support to): `<tool_call>\n{"name": ..., "arguments": {...}}\n
//! </tool_call>`, one block per call. With `tool_choice` `required` or a named function the
//! output is nothing but such blocks; with `auto` it is either text or blocks (text that does
//! not start with `<tool_call>` is left free); with `none` it is free and never parsed.

use forgeline_engine::chat::{TOOL_CALL_CLOSE, TOOL_CALL_OPEN};
use forgeline_engine::constraint::Constraint;
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::fields::{kind, Fields};

/// Functions per request.
pub const MAX_TOOLS: usize = 128;
/// Bytes of one function's definition (name, description, schema) as JSON.
pub const MAX_TOOL_BYTES: usize = 64 * 1024;

/// What the model may do with the functions it was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    /// Answer in text; calls are neither constrained nor parsed.
    None,
    /// Text or calls, as the model decides.
    Auto,
    /// One call or more.
    Required,
    /// A call of this function.
    Named(String),
}

/// A request's functions, validated.
#[derive(Clone, Debug)]
pub struct Tools {
    /// OpenAI's form, `{"type": "function", "function": {name, description, parameters}}`,
    /// with `parameters` defaulted: what chat templates read.
    pub defs: Vec<Value>,
    pub choice: ToolChoice,
    /// Several calls in one answer (`parallel_tool_calls`, true by default).
    pub parallel: bool,
}

impl Tools {
    /// Whether the answer is read for calls.
    pub fn parsed(&self) -> bool {
        !self.defs.is_empty() && self.choice != ToolChoice::None
    }

    fn name(def: &Value) -> &str {
        def["function"]["name"].as_str().unwrap_or_default()
    }

    /// The grammar the output is held to, if calls are possible.
    pub fn constraint(&self) -> Option<Constraint> {
        if !self.parsed() {
            return None;
        }
        let calls: Vec<Value> = self
            .defs
            .iter()
            .filter(|d| match &self.choice {
                ToolChoice::Named(n) => Self::name(d) == n,
                _ => true,
            })
            .map(|d| {
                json!({
                    "type": "object",
                    "properties": {
                        "name": {"const": Self::name(d)},
                        "arguments": d["function"]["parameters"],
                    },
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let schema = json!({
            "anyOf": calls,
            "x-guidance": {"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "},
        });
        let open = lark_string(&format!("{TOOL_CALL_OPEN}\n"));
        let close = lark_string(&format!("\n{TOOL_CALL_CLOSE}"));
        let calls = if self.parallel {
            "call (\"\\n\" call)*"
        } else {
            "call"
        };
        let start = match self.choice {
            ToolChoice::Auto => "TEXT | calls",
            _ => "calls",
        };
        let mut g =
            format!("start: {start}\ncalls: {calls}\ncall: {open} %json {schema} {close}\n");
        if self.choice == ToolChoice::Auto {
            g.push_str(&format!("TEXT: /{}/\n", not_starting_with(TOOL_CALL_OPEN)));
        }
        Some(Constraint::Lark(g))
    }
}

/// A Lark string literal.
fn lark_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// A regex (for a Lark `/.../` literal) of the non-empty strings that do not start with `tag`:
/// a proper prefix of it, or a prefix followed by any other character, then anything.
fn not_starting_with(tag: &str) -> String {
    let esc = |c: char| {
        if c.is_ascii_alphanumeric() || c == '_' || c == '<' || c == '>' {
            c.to_string()
        } else {
            format!("\\x{{{:x}}}", c as u32)
        }
    };
    let chars: Vec<char> = tag.chars().collect();
    let mut alts = Vec::new();
    for i in 0..chars.len() {
        let head: String = chars[..i].iter().map(|&c| esc(c)).collect();
        // Not the empty string: a lexeme must hold something.
        if i > 0 {
            alts.push(head.clone());
        }
        alts.push(format!("{head}[^{}][\\s\\S]*", esc(chars[i])));
    }
    format!("({})", alts.join("|"))
}

/// Parses `tools`, `tool_choice`, `parallel_tool_calls`, and the deprecated `functions` and
/// `function_call` (taken as their `tools` equivalents). None when no function was given.
pub fn parse(f: &Fields) -> ApiResult<Option<Tools>> {
    let (defs, legacy) = match (f.array("tools")?, f.array("functions")?) {
        (Some(_), Some(_)) => {
            return Err(ApiError::field(
                "functions",
                "`functions` and `tools` were both given: use `tools` alone",
            ))
        }
        (Some(t), None) => (t, false),
        (None, Some(fns)) => (fns, true),
        (None, None) => (&Vec::new(), false),
    };
    let list = if legacy { "functions" } else { "tools" };
    if defs.len() > MAX_TOOLS {
        return Err(ApiError::field(
            list,
            format!(
                "`{list}` holds at most {MAX_TOOLS} functions, not {}",
                defs.len()
            ),
        ));
    }
    let defs = defs
        .iter()
        .enumerate()
        .map(|(i, d)| definition(&format!("{list}[{i}]"), d, legacy))
        .collect::<ApiResult<Vec<Value>>>()?;
    for (i, d) in defs.iter().enumerate() {
        let name = Tools::name(d);
        if defs[..i].iter().any(|e| Tools::name(e) == name) {
            return Err(ApiError::field(
                &format!("{list}[{i}]"),
                format!("two functions are named `{name}`"),
            ));
        }
    }
    let choice_field = if legacy {
        "function_call"
    } else {
        "tool_choice"
    };
    let choice = match f.get(choice_field) {
        None if defs.is_empty() => ToolChoice::None,
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" if !legacy => ToolChoice::Required,
            other => {
                return Err(ApiError::field(
                    choice_field,
                    format!(
                        "`{choice_field}` must be none, auto{}, or a function, not `{other}`",
                        if legacy { "" } else { ", required" }
                    ),
                ))
            }
        },
        Some(Value::Object(o)) => {
            let of = Fields::new(o, choice_field);
            let name = if legacy {
                of.str("name")?
            } else {
                match of.object("function")? {
                    Some(func) => func.str("name")?,
                    None => None,
                }
            };
            let name = name.ok_or_else(|| {
                ApiError::field(
                    choice_field,
                    format!("`{choice_field}` names no function: give {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"),
                )
            })?;
            ToolChoice::Named(name.to_string())
        }
        Some(other) => {
            return Err(ApiError::field(
                choice_field,
                format!(
                    "`{choice_field}` must be a string or an object, not {}",
                    kind(other)
                ),
            ))
        }
    };
    if defs.is_empty() {
        return match choice {
            ToolChoice::None | ToolChoice::Auto => Ok(None),
            _ => Err(ApiError::field(
                choice_field,
                format!("`{choice_field}` asks for a call, but no function was given in `{list}`"),
            )),
        };
    }
    if let ToolChoice::Named(n) = &choice {
        if !defs.iter().any(|d| Tools::name(d) == n) {
            return Err(ApiError::field(
                choice_field,
                format!(
                    "`{choice_field}` names `{n}`, which is not among the functions in `{list}`"
                ),
            ));
        }
    }
    let parallel = f.bool("parallel_tool_calls")?.unwrap_or(true);
    Ok(Some(Tools {
        defs,
        choice,
        parallel,
    }))
}

/// One function definition, checked, in `tools`' form.
fn definition(path: &str, v: &Value, legacy: bool) -> ApiResult<Value> {
    let Value::Object(o) = v else {
        return Err(ApiError::field(
            path,
            format!("`{path}` must be an object, not {}", kind(v)),
        ));
    };
    let f = Fields::new(o, path);
    let func = if legacy {
        Fields::new(o, path)
    } else {
        match f.str("type")? {
            Some("function") => {}
            other => {
                return Err(ApiError::field(
                    &f.param("type"),
                    format!(
                        "`{}` must be `function`, not `{}`",
                        f.param("type"),
                        other.unwrap_or("(none)")
                    ),
                ))
            }
        }
        f.object("function")?.ok_or_else(|| {
            ApiError::field(
                &f.param("function"),
                format!("`{}` is required", f.param("function")),
            )
        })?
    };
    let name = func.str("name")?.ok_or_else(|| {
        ApiError::field(
            &func.param("name"),
            format!("`{}` is required", func.param("name")),
        )
    })?;
    let name_ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    if !name_ok {
        return Err(ApiError::field(
            &func.param("name"),
            format!(
                "`{}` must be 1 to 64 letters, digits, `_`, `-` or `.`, not `{name}`",
                func.param("name")
            ),
        ));
    }
    let description = func.str("description")?;
    let parameters = match func.get("parameters") {
        None => json!({"type": "object", "properties": {}}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(other) => {
            return Err(ApiError::field(
                &func.param("parameters"),
                format!(
                    "`{}` must be a JSON schema object, not {}",
                    func.param("parameters"),
                    kind(other)
                ),
            ))
        }
    };
    let mut function = json!({"name": name});
    if let Some(d) = description {
        function["description"] = json!(d);
    }
    function["parameters"] = parameters;
    let def = json!({"type": "function", "function": function});
    let bytes = def.to_string().len();
    if bytes > MAX_TOOL_BYTES {
        return Err(ApiError::field(
            path,
            format!("`{path}` is {bytes} bytes as JSON; at most {MAX_TOOL_BYTES} are accepted"),
        ));
    }
    Ok(def)
}

/// A call found in the output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedCall {
    pub name: String,
    /// The arguments as a JSON string, as OpenAI's API gives them.
    pub arguments: String,
}

impl ParsedCall {
    /// OpenAI's `tool_calls[]` entry; `index` is its place among the choice's calls.
    pub fn to_json(&self, id: &str, index: usize) -> Value {
        json!({
            "index": index,
            "id": id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        })
    }

    /// The block's inside, if it is a call: `{"name": ..., "arguments": {...}}` (arguments
    /// may also come as a string holding JSON, or under `parameters`).
    fn from_block(inner: &str) -> Option<Self> {
        let v: Value = serde_json::from_str(inner.trim()).ok()?;
        let name = v.get("name")?.as_str()?.to_string();
        let args = v.get("arguments").or_else(|| v.get("parameters"));
        let arguments = match args {
            None => "{}".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        };
        Some(Self { name, arguments })
    }
}

/// What the output turned into, piece by piece.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Call(ParsedCall),
}

/// Reads `<tool_call>` blocks out of text as it streams: text that cannot be the start of a
/// block passes at once; a block is held until it closes, then becomes a call (or, if its
/// inside is not a call, text again). Whitespace around blocks is dropped once a call was
/// found.
#[derive(Debug, Default)]
pub struct CallParser {
    buf: String,
    in_call: bool,
    calls: usize,
    /// Whitespace held back: dropped if a call follows or the answer ends after calls.
    held_ws: String,
}

impl CallParser {
    pub fn calls(&self) -> usize {
        self.calls
    }

    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            if self.in_call {
                let Some(end) = self.buf.find(TOOL_CALL_CLOSE) else {
                    return out;
                };
                let inner: String = self.buf[..end].to_string();
                self.buf.drain(..end + TOOL_CALL_CLOSE.len());
                self.in_call = false;
                match ParsedCall::from_block(&inner) {
                    Some(call) => {
                        self.held_ws.clear();
                        self.calls += 1;
                        out.push(Piece::Call(call));
                    }
                    None => self.text(
                        &mut out,
                        format!("{TOOL_CALL_OPEN}{inner}{TOOL_CALL_CLOSE}"),
                    ),
                }
                continue;
            }
            if let Some(start) = self.buf.find(TOOL_CALL_OPEN) {
                let before: String = self.buf[..start].to_string();
                self.buf.drain(..start + TOOL_CALL_OPEN.len());
                if before.trim().is_empty() {
                    self.held_ws.clear();
                } else {
                    self.text(&mut out, before);
                    self.held_ws.clear();
                }
                self.in_call = true;
                continue;
            }
            // Keep what could be the start of a block.
            let keep = (1..TOOL_CALL_OPEN.len())
                .rev()
                .find(|&k| self.buf.ends_with(&TOOL_CALL_OPEN[..k]))
                .unwrap_or(0);
            let cut = self.buf.len() - keep;
            let free: String = self.buf[..cut].to_string();
            self.buf.drain(..cut);
            if !free.is_empty() {
                self.text(&mut out, free);
            }
            return out;
        }
    }

    /// Text out, with whitespace after a call held until something that is not a call
    /// follows it.
    fn text(&mut self, out: &mut Vec<Piece>, t: String) {
        if self.calls > 0 && t.trim().is_empty() {
            self.held_ws.push_str(&t);
            return;
        }
        let t = std::mem::take(&mut self.held_ws) + &t;
        match out.last_mut() {
            Some(Piece::Text(prev)) => prev.push_str(&t),
            _ => out.push(Piece::Text(t)),
        }
    }

    /// The end of the answer: what is still held, as text (an unclosed block included).
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut rest = std::mem::take(&mut self.buf);
        if self.in_call {
            rest = format!("{TOOL_CALL_OPEN}{rest}");
            self.in_call = false;
        }
        let mut out = Vec::new();
        if !rest.is_empty() {
            self.text(&mut out, rest);
        }
        out
    }
}

/// A whole answer's text and calls: the text outside the blocks (None when it is only
/// whitespace around calls), and the calls.
pub fn split_calls(text: &str) -> (Option<String>, Vec<ParsedCall>) {
    let mut p = CallParser::default();
    let mut pieces = p.push(text);
    pieces.extend(p.finish());
    let mut content = String::new();
    let mut calls = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Text(t) => content.push_str(&t),
            Piece::Call(c) => calls.push(c),
        }
    }
    let content = if calls.is_empty() || !content.trim().is_empty() {
        Some(content)
    } else {
        None
    };
    (content, calls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    fn fields(v: &Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}}])
    }

    fn tools(body: Value) -> ApiResult<Option<Tools>> {
        let o = fields(&body);
        parse(&Fields::new(&o, ""))
    }

    #[test]
    fn choices_are_read_and_checked() {
        let t = tools(json!({"tools": weather()})).unwrap().unwrap();
        assert_eq!(t.choice, ToolChoice::Auto);
        assert!(t.parallel && t.parsed());
        let t = tools(json!({"tools": weather(), "tool_choice": "none"}))
            .unwrap()
            .unwrap();
        assert!(!t.parsed() && t.constraint().is_none());
        let t = tools(json!({"tools": weather(), "tool_choice":
            {"type": "function", "function": {"name": "get_weather"}}, "parallel_tool_calls": false}))
        .unwrap()
        .unwrap();
        assert_eq!(t.choice, ToolChoice::Named("get_weather".into()));
        assert!(!t.parallel);
        assert!(tools(json!({"tool_choice": "auto"})).unwrap().is_none());
        // Legacy functions.
        let t = tools(json!({"functions": [{"name": "f"}], "function_call": {"name": "f"}}))
            .unwrap()
            .unwrap();
        assert_eq!(t.defs[0]["function"]["parameters"]["type"], "object");

        let err = |body: Value, param: &str, msg: &str| {
            let e = tools(body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{}", e.message);
            assert!(e.message.contains(msg), "{}", e.message);
        };
        err(
            json!({"tools": [{"type": "function"}]}),
            "tools[0].function",
            "required",
        );
        err(
            json!({"tools": [{"type": "code"}]}),
            "tools[0].type",
            "`function`",
        );
        err(
            json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
            "tools[0].function.name",
            "letters",
        );
        err(
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}),
            "tools[0].function.parameters",
            "schema",
        );
        err(
            json!({"tools": weather(), "tool_choice": "always"}),
            "tool_choice",
            "always",
        );
        err(
            json!({"tools": weather(), "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            "tool_choice",
            "not among",
        );
        err(
            json!({"tool_choice": "required"}),
            "tool_choice",
            "no function",
        );
        let two = json!([weather()[0], weather()[0]]);
        err(json!({"tools": two}), "tools[1]", "two functions");
        err(
            json!({"tools": weather(), "functions": []}),
            "functions",
            "both",
        );
    }

    #[test]
    fn the_grammar_names_the_functions_and_compiles_its_text_rule() {
        let t = tools(json!({"tools": weather(), "tool_choice": "required"}))
            .unwrap()
            .unwrap();
        let Some(Constraint::Lark(g)) = t.constraint() else {
            panic!()
        };
        assert!(g.starts_with("start: calls\n"), "{g}");
        assert!(g.contains(r#"{"const":"get_weather"}"#), "{g}");
        assert!(!g.contains("TEXT"));
        let auto = tools(json!({"tools": weather()})).unwrap().unwrap();
        let Some(Constraint::Lark(g)) = auto.constraint() else {
            panic!()
        };
        assert!(g.contains("start: TEXT | calls"), "{g}");
        // The text rule's regex takes what does not start with the tag, and not the tag.
        let rx = not_starting_with("<ab>");
        let re = regex_lite(&rx);
        for ok in ["<", "<a", "<ab", "hello", "<b", "<ax>", " <ab>"] {
            assert!(re(ok), "{ok:?} should match {rx}");
        }
        for bad in ["", "<ab>", "<ab> x"] {
            assert!(!re(bad), "{bad:?} should not match {rx}");
        }
    }

    /// Whether `rx` matches the whole of a string (a tiny backtracking matcher for the
    /// regexes `not_starting_with` writes: literals, `[^c]`, `[\s\S]*`, alternation).
    fn regex_lite(rx: &str) -> impl Fn(&str) -> bool + '_ {
        move |s: &str| {
            let inner = &rx[1..rx.len() - 1];
            inner.split('|').any(|alt| {
                let (lit, rest) = match alt.find('[') {
                    Some(i) => (&alt[..i], &alt[i..]),
                    None => (alt, ""),
                };
                if rest.is_empty() {
                    return s == lit;
                }
                let Some(tail) = s.strip_prefix(lit) else {
                    return false;
                };
                // rest is `[^c][\s\S]*`
                let c = rest.chars().nth(2).unwrap();
                tail.chars().next().is_some_and(|t| t != c)
            })
        }
    }

    #[test]
    fn calls_are_split_from_text_whole_and_streamed() {
        let out = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>";
        let (content, calls) = split_calls(out);
        assert_eq!(content, None);
        assert_eq!(
            calls,
            vec![
                ParsedCall {
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Oslo"}"#.into()
                },
                ParsedCall {
                    name: "f".into(),
                    arguments: "{}".into()
                }
            ]
        );
        // Streamed a few bytes at a time: the same calls, and no text.
        let mut p = CallParser::default();
        let mut pieces = Vec::new();
        for chunk in out.as_bytes().chunks(3) {
            pieces.extend(p.push(std::str::from_utf8(chunk).unwrap()));
        }
        pieces.extend(p.finish());
        let streamed: Vec<&ParsedCall> = pieces
            .iter()
            .map(|x| match x {
                Piece::Call(c) => c,
                Piece::Text(t) => panic!("text {t:?}"),
            })
            .collect();
        assert_eq!(streamed.len(), 2);

        // Plain text passes, a `<` that starts no block included; an unclosed or
        // malformed block stays text.
        assert_eq!(split_calls("a < b"), (Some("a < b".into()), vec![]));
        assert_eq!(
            split_calls("x <tool_call>{oops</tool_call>"),
            (Some("x <tool_call>{oops</tool_call>".into()), vec![])
        );
        assert_eq!(
            split_calls("<tool_call>{\"name\": \"f\""),
            (Some("<tool_call>{\"name\": \"f\"".into()), vec![])
        );
        // Text before a call is kept.
        let (c, calls) = split_calls("Let me look.\n<tool_call>{\"name\": \"f\"}</tool_call>");
        assert_eq!(c.as_deref(), Some("Let me look.\n"));
        assert_eq!(calls[0].arguments, "{}");
    }
}
