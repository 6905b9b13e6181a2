//! Function calling in chat templates: the calls an assistant turn holds, and rendering a
//! conversation with function definitions, by the model's own template when it reads
//! `tools`, else by forgeline's fallback (`ChatTemplate::render_with_tools`).

use super::{ChatMessage, ChatTemplate};
use crate::error::Result;

/// A function call as chat templates read it (Hugging Face's form of OpenAI's, with the
/// arguments as a JSON value rather than a string).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: serde_json::Value,
}

impl ToolCall {
    pub fn function(
        id: impl Into<String>,
        name: impl Into<String>,
        arguments: serde_json::Value,
    ) -> Self {
        Self {
            id: id.into(),
            kind: "function".into(),
            function: FunctionCall {
                name: name.into(),
                arguments,
            },
        }
    }

    /// The call as the fallback format writes it (and as Qwen's templates do).
    pub fn tagged(&self) -> String {
        let call =
            serde_json::json!({"name": self.function.name, "arguments": self.function.arguments});
        format!("{TOOL_CALL_OPEN}\n{call}\n{TOOL_CALL_CLOSE}")
    }
}

/// How a function call is written in the model's output, by templates without tool support
/// of their own (forgeline's fallback) and by Qwen2.5's and Qwen3's.
pub const TOOL_CALL_OPEN: &str = "<tool_call>";
pub const TOOL_CALL_CLOSE: &str = "</tool_call>";

impl ChatTemplate {
    /// Whether the template renders `tools` (and tool calls) itself; others get forgeline's
    /// fallback (`render_with_tools`).
    pub fn supports_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// Renders the conversation with function definitions (OpenAI's `tools`, as JSON). A
    /// template that supports tools gets them as `tools` (as transformers passes them);
    /// others get the fallback: a system message listing the functions and asking for
    /// `<tool_call>` blocks, earlier calls written as such blocks in the assistant's turns,
    /// and `tool` turns as user turns holding `<tool_response>` blocks.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String> {
        if self.supports_tools() {
            return self.render_ctx(messages, tools, add_generation_prompt);
        }
        let mut msgs: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
        if !tools.is_empty() {
            let mut preamble = String::from(
                "You can call functions. To call one, answer with nothing but a block per call:\n\
                 <tool_call>\n{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}\n</tool_call>\n\
                 The results come back in <tool_response> blocks. Functions:",
            );
            for t in tools {
                preamble.push('\n');
                preamble.push_str(&t.get("function").unwrap_or(t).to_string());
            }
            match messages.first() {
                Some(first) if first.role == "system" => {
                    msgs.push(ChatMessage::system(format!(
                        "{}\n\n{preamble}",
                        first.content
                    )));
                }
                _ => msgs.push(ChatMessage::system(preamble)),
            }
        }
        let skip =
            usize::from(!tools.is_empty() && messages.first().is_some_and(|m| m.role == "system"));
        for m in &messages[skip..] {
            if m.role == "tool" {
                msgs.push(ChatMessage::user(format!(
                    "<tool_response>\n{}\n</tool_response>",
                    m.content
                )));
            } else if !m.tool_calls.is_empty() {
                let mut content = m.content.clone();
                for c in &m.tool_calls {
                    if !content.is_empty() {
                        content.push('\n');
                    }
                    content.push_str(&c.tagged());
                }
                msgs.push(ChatMessage::new(m.role.clone(), content));
            } else {
                msgs.push(m.clone());
            }
        }
        self.render_ctx(&msgs, &[], add_generation_prompt)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{tests::sys_user, CHATML_TEMPLATE};
    use super::*;

    fn weather() -> serde_json::Value {
        serde_json::json!({"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})
    }

    fn call_round() -> Vec<ChatMessage> {
        let mut call = ChatMessage::assistant("");
        call.tool_calls = vec![ToolCall::function(
            "c1",
            "get_weather",
            serde_json::json!({"city": "Oslo"}),
        )];
        let mut result = ChatMessage::new("tool", "{\"temp\": 3}");
        result.tool_call_id = Some("c1".into());
        vec![ChatMessage::user("Weather in Oslo?"), call, result]
    }

    #[test]
    fn a_template_with_tool_support_reads_tools_and_calls_itself() {
        // The parts of Qwen2.5's template that read tools, calls and tool turns.
        let qwen = "{% if tools %}<|im_start|>system{{ '\n' }}<tools>{% for tool in tools %}{{ '\n' }}{{ tool | tojson }}{% endfor %}{{ '\n' }}</tools><|im_end|>{{ '\n' }}{% endif %}\
{% for message in messages %}{% if message.role == 'tool' %}<|im_start|>user{{ '\n' }}<tool_response>{{ '\n' }}{{ message.content }}{{ '\n' }}</tool_response><|im_end|>{{ '\n' }}\
{% elif message.tool_calls %}<|im_start|>assistant{% for tool_call in message.tool_calls %}{% if tool_call.function is defined %}{% set tool_call = tool_call.function %}{% endif %}{{ '\n' }}<tool_call>{{ '\n' }}{\"name\": \"{{ tool_call.name }}\", \"arguments\": {{ tool_call.arguments | tojson }}}{{ '\n' }}</tool_call>{% endfor %}<|im_end|>{{ '\n' }}\
{% else %}<|im_start|>{{ message.role }}{{ '\n' }}{{ message.content }}<|im_end|>{{ '\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{{ '\n' }}{% endif %}";
        let t = ChatTemplate::new(qwen.into(), None, None).unwrap();
        assert!(t.supports_tools());
        let out = t
            .render_with_tools(&call_round(), &[weather()], true)
            .unwrap();
        assert!(
            out.starts_with("<|im_start|>system\n<tools>\n{\"type\": \"function\""),
            "{out}"
        );
        assert!(out.contains("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>"), "{out}");
        assert!(
            out.contains("<tool_response>\n{\"temp\": 3}\n</tool_response>"),
            "{out}"
        );
        // Without tools, the template's own plain branch.
        let plain = t.render_with_tools(&sys_user(), &[], true).unwrap();
        assert_eq!(plain, t.render(&sys_user(), true).unwrap());
        assert!(!plain.contains("<tools>"));
    }

    #[test]
    fn a_template_without_tool_support_gets_the_fallback() {
        let t = ChatTemplate::new(CHATML_TEMPLATE.into(), None, None).unwrap();
        assert!(!t.supports_tools());
        let mut msgs = vec![ChatMessage::system("Be brief.")];
        msgs.extend(call_round());
        let out = t.render_with_tools(&msgs, &[weather()], true).unwrap();
        // One system turn: the caller's, then the functions and the format.
        assert_eq!(out.matches("<|im_start|>system").count(), 1, "{out}");
        assert!(
            out.starts_with("<|im_start|>system\nBe brief.\n\nYou can call functions."),
            "{out}"
        );
        assert!(out.contains("\n{\"name\":\"get_weather\""), "{out}");
        assert!(out.contains("<|im_start|>assistant\n<tool_call>\n{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Oslo\"}}\n</tool_call><|im_end|>"), "{out}");
        assert!(
            out.contains(
                "<|im_start|>user\n<tool_response>\n{\"temp\": 3}\n</tool_response><|im_end|>"
            ),
            "{out}"
        );
        assert!(!out.contains("<|im_start|>tool"));
        assert!(out.ends_with("<|im_start|>assistant\n"));
        // No tools and plain messages: exactly the plain render.
        assert_eq!(
            t.render_with_tools(&sys_user(), &[], true).unwrap(),
            t.render(&sys_user(), true).unwrap()
        );
    }
}
