//! Tool calls in a model's reply, read back into OpenAI's `tool_calls`.
//!
//! Kiln reads the Hermes form: each call a JSON object `{"name": …,
//! "arguments": {…}}` between `<tool_call>` and `</tool_call>`. The chat
//! templates of Qwen2.5, Qwen3, SmolLM3 and the Hermes models teach it, and
//! vLLM's `hermes` parser reads the same. A template that writes
//! `<tool_call>` is taken to use it.

use crate::generate::chat::ChatTemplate;
use crate::generate::pyjson;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolCallFormat {
    Hermes,
}

impl ToolCallFormat {
    pub const DESCRIPTION: &'static str = "calls written as {\"name\": …, \"arguments\": {…}} \
        between <tool_call> and </tool_call> (Qwen2.5, Qwen3, SmolLM3, Hermes)";

    /// The form the template teaches, if Kiln reads it.
    pub fn of(template: &ChatTemplate) -> Option<ToolCallFormat> {
        template
            .source()
            .contains(OPEN)
            .then_some(ToolCallFormat::Hermes)
    }
}

/// One call read from a reply: the arguments as the JSON text OpenAI's
/// `function.arguments` carries (written as Python's `json.dumps` would,
/// as vLLM does).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedCall {
    pub name: String,
    pub arguments: String,
}

/// A reply split into its text and its calls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolReply {
    /// The text around the calls, trimmed; `None` when there is none.
    pub content: Option<String>,
    pub calls: Vec<ParsedCall>,
}

/// The calls in `text`, or `None` when it holds none that parse (then the
/// whole text is the reply's content, as it came). A last call the reply
/// did not close (generation ended at its end-of-turn token) still counts.
pub fn parse(text: &str) -> Option<ToolReply> {
    let mut calls = Vec::new();
    let mut content = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(OPEN) {
        content.push_str(&rest[..at]);
        let body = &rest[at + OPEN.len()..];
        let (call, after) = match body.find(CLOSE) {
            Some(end) => (&body[..end], &body[end + CLOSE.len()..]),
            None => (body, ""),
        };
        calls.push(parse_call(call)?);
        rest = after;
    }
    content.push_str(rest);
    if calls.is_empty() {
        return None;
    }
    let content = content.trim();
    Some(ToolReply {
        content: (!content.is_empty()).then(|| content.to_string()),
        calls,
    })
}

fn parse_call(body: &str) -> Option<ParsedCall> {
    let call: serde_json::Value = serde_json::from_str(body.trim()).ok()?;
    let name = call.get("name")?.as_str()?.to_string();
    let arguments = match call.get("arguments") {
        None | Some(serde_json::Value::Null) => serde_json::json!({}),
        // Some models write the arguments as a JSON string.
        Some(serde_json::Value::String(text)) => serde_json::from_str(text).ok()?,
        Some(arguments) => arguments.clone(),
    };
    Some(ParsedCall {
        name,
        arguments: pyjson::dumps(&arguments, &pyjson::Style::default()),
    })
}

/// Streamed text with tool calls in it: text goes out as soon as it cannot
/// be the start of a call; from a call's opening tag on, the rest is held
/// and read at the end.
#[derive(Default)]
pub struct ToolCallStream {
    held: String,
    in_call: bool,
}

impl ToolCallStream {
    /// Adds generated text; returns the content that can be sent now.
    pub fn push(&mut self, piece: &str) -> String {
        self.held.push_str(piece);
        if self.in_call {
            return String::new();
        }
        if let Some(at) = self.held.find(OPEN) {
            self.in_call = true;
            return self.held.drain(..at).collect();
        }
        let keep = super::stop::longest_suffix_that_starts(&self.held, OPEN);
        let split = self.held.len() - keep;
        self.held.drain(..split).collect()
    }

    /// Once generation has ended: the content still to send, and the calls.
    /// A held call that does not parse goes out as content.
    pub fn finish(self) -> (String, Vec<ParsedCall>) {
        if !self.in_call {
            return (self.held, Vec::new());
        }
        match parse(&self.held) {
            Some(reply) => (reply.content.unwrap_or_default(), reply.calls),
            None => (self.held, Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hermes_calls_and_the_text_around_them() {
        let reply = parse(
            "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 2}}\n</tool_call>\n\
             <tool_call>{\"name\": \"clock\", \"arguments\": \"{\\\"tz\\\":\\\"CET\\\"}\"}</tool_call>",
        )
        .unwrap();
        assert_eq!(reply.content.as_deref(), Some("Let me look."));
        assert_eq!(
            reply.calls,
            [
                ParsedCall {
                    name: "get_weather".into(),
                    arguments: r#"{"city": "Paris", "days": 2}"#.into()
                },
                ParsedCall {
                    name: "clock".into(),
                    arguments: r#"{"tz": "CET"}"#.into()
                },
            ]
        );
        // Unclosed at the end of the reply, and without arguments.
        let reply = parse("<tool_call>\n{\"name\": \"now\"}").unwrap();
        assert_eq!(reply.content, None);
        assert_eq!(reply.calls[0].arguments, "{}");
    }

    #[test]
    fn text_without_a_call_that_parses_is_content() {
        assert_eq!(parse("The answer is 4."), None);
        assert_eq!(parse("<tool_call>{\"name\": 3}</tool_call>"), None);
        assert_eq!(parse("<tool_call>not json</tool_call>"), None);
    }

    #[test]
    fn streamed_text_is_held_only_from_a_call_on() {
        let mut s = ToolCallStream::default();
        assert_eq!(s.push("Sure <tool"), "Sure ");
        // "<tooX" cannot start a call: it goes out.
        let mut other = ToolCallStream::default();
        assert_eq!(other.push("<too"), "");
        assert_eq!(other.push("X"), "<tooX");
        assert_eq!(s.push("_call>{\"name\": \"f\", "), "");
        assert_eq!(s.push("\"arguments\": {}}</tool_call>"), "");
        let (rest, calls) = s.finish();
        assert_eq!(rest, "");
        assert_eq!(calls[0].name, "f");

        let mut broken = ToolCallStream::default();
        assert_eq!(broken.push("<tool_call>oops"), "");
        assert_eq!(broken.finish(), ("<tool_call>oops".into(), Vec::new()));
    }
}
