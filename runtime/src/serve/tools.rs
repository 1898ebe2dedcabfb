//! Tool calls in a model's reply, read back into OpenAI's `tool_calls`.
//!
//! Two forms, each the one a family's chat template teaches (and vLLM's
//! parser of the same name reads):
//! - `hermes`: each call a JSON object `{"name": …, "arguments": {…}}`
//!   between `<tool_call>` and `</tool_call>` (Qwen2.5, Qwen3, SmolLM3,
//!   Hermes); a template that writes `<tool_call>` uses it.
//! - `llama3_json`: a reply that is the call, `{"name": …, "parameters":
//!   {…}}` (several joined by `;`), as Llama 3.1, 3.2 and 3.3's templates
//!   ask ("Respond in the format {"name": function name, "parameters":
//!   dictionary of argument name and its value}").

use crate::generate::chat::ChatTemplate;
use crate::generate::pyjson;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
/// What Llama 3.x templates say when they offer tools.
const LLAMA3_ASK: &str = "\"parameters\": dictionary of argument name";
/// Llama 3.x's token before a call; kept if the tokenizer decodes it.
const PYTHON_TAG: &str = "<|python_tag|>";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolCallFormat {
    Hermes,
    Llama3Json,
}

impl ToolCallFormat {
    pub const DESCRIPTION: &'static str = "calls written as {\"name\": …, \"arguments\": {…}} \
        between <tool_call> and </tool_call> (Qwen2.5, Qwen3, SmolLM3, Hermes), or a reply that \
        is {\"name\": …, \"parameters\": {…}} (Llama 3.1 to 3.3)";

    /// The form the template teaches, if Kiln reads it.
    pub fn of(template: &ChatTemplate) -> Option<ToolCallFormat> {
        let source = template.source();
        if source.contains(OPEN) {
            Some(ToolCallFormat::Hermes)
        } else if source.contains(LLAMA3_ASK) {
            Some(ToolCallFormat::Llama3Json)
        } else {
            None
        }
    }

    /// The calls in a whole reply, or `None` when it holds none that parse
    /// (then the whole text is the reply's content, as it came).
    pub fn parse(self, text: &str) -> Option<ToolReply> {
        match self {
            ToolCallFormat::Hermes => parse_hermes(text),
            ToolCallFormat::Llama3Json => parse_llama3(text),
        }
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

/// Hermes calls; a last call the reply did not close (generation ended at
/// its end-of-turn token) still counts.
fn parse_hermes(text: &str) -> Option<ToolReply> {
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
        let value = serde_json::from_str(call.trim()).ok()?;
        calls.push(read_call(&value)?);
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

/// A Llama 3.x reply that is nothing but calls: JSON objects, `;` between.
fn parse_llama3(text: &str) -> Option<ToolReply> {
    let mut rest = text.trim_start();
    rest = rest.strip_prefix(PYTHON_TAG).unwrap_or(rest);
    let mut calls = Vec::new();
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ';');
        if rest.is_empty() {
            break;
        }
        if !rest.starts_with('{') {
            return None;
        }
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<serde_json::Value>();
        let value = values.next()?.ok()?;
        calls.push(read_call(&value)?);
        rest = &rest[values.byte_offset()..];
    }
    (!calls.is_empty()).then_some(ToolReply {
        content: None,
        calls,
    })
}

/// `{"name": …, "arguments" or "parameters": {…}}`, whichever form writes
/// it (and the arguments as a JSON string, as some models write them).
fn read_call(call: &serde_json::Value) -> Option<ParsedCall> {
    let name = call.get("name")?.as_str()?.to_string();
    let arguments = match call.get("arguments").or_else(|| call.get("parameters")) {
        None | Some(serde_json::Value::Null) => serde_json::json!({}),
        Some(serde_json::Value::String(text)) => serde_json::from_str(text).ok()?,
        Some(arguments @ serde_json::Value::Object(_)) => arguments.clone(),
        Some(_) => return None,
    };
    Some(ParsedCall {
        name,
        arguments: pyjson::dumps(&arguments, &pyjson::Style::default()),
    })
}

/// Streamed text with tool calls in it: text goes out as soon as it cannot
/// be the start of a call; from a call's start on, the rest is held and
/// read at the end.
pub struct ToolCallStream {
    format: ToolCallFormat,
    held: String,
    state: State,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing shows a call yet.
    Text,
    /// A call has begun: everything from it on is held.
    Call,
    /// Llama 3.x: the reply is plain text (it did not open with a call).
    NoCalls,
}

impl ToolCallStream {
    pub fn new(format: ToolCallFormat) -> ToolCallStream {
        ToolCallStream {
            format,
            held: String::new(),
            state: State::Text,
        }
    }

    /// Adds generated text; returns the content that can be sent now.
    pub fn push(&mut self, piece: &str) -> String {
        self.held.push_str(piece);
        match (self.state, self.format) {
            (State::Call, _) => String::new(),
            (State::NoCalls, _) => std::mem::take(&mut self.held),
            (State::Text, ToolCallFormat::Hermes) => {
                if let Some(at) = self.held.find(OPEN) {
                    self.state = State::Call;
                    return self.held.drain(..at).collect();
                }
                let keep = super::stop::longest_suffix_that_starts(&self.held, OPEN);
                let split = self.held.len() - keep;
                self.held.drain(..split).collect()
            }
            (State::Text, ToolCallFormat::Llama3Json) => {
                let start = self.held.trim_start();
                if start.is_empty() || PYTHON_TAG.starts_with(start) {
                    return String::new();
                }
                if start.starts_with('{') || start.starts_with(PYTHON_TAG) {
                    self.state = State::Call;
                    return String::new();
                }
                self.state = State::NoCalls;
                std::mem::take(&mut self.held)
            }
        }
    }

    /// Once generation has ended: the content still to send, and the calls.
    /// A held call that does not parse goes out as content.
    pub fn finish(self) -> (String, Vec<ParsedCall>) {
        if self.state != State::Call {
            return (self.held, Vec::new());
        }
        match self.format.parse(&self.held) {
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
        let reply = ToolCallFormat::Hermes.parse(
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
        let reply = ToolCallFormat::Hermes
            .parse("<tool_call>\n{\"name\": \"now\"}")
            .unwrap();
        assert_eq!(reply.content, None);
        assert_eq!(reply.calls[0].arguments, "{}");
    }

    #[test]
    fn text_without_a_call_that_parses_is_content() {
        let hermes = ToolCallFormat::Hermes;
        assert_eq!(hermes.parse("The answer is 4."), None);
        assert_eq!(hermes.parse("<tool_call>{\"name\": 3}</tool_call>"), None);
        assert_eq!(hermes.parse("<tool_call>not json</tool_call>"), None);
        let llama = ToolCallFormat::Llama3Json;
        assert_eq!(llama.parse("The answer is {\"name\": \"f\"}"), None);
        assert_eq!(llama.parse("{\"name\": \"f\"} and then text"), None);
        assert_eq!(llama.parse(""), None);
    }

    #[test]
    fn streamed_text_is_held_only_from_a_call_on() {
        let mut s = ToolCallStream::new(ToolCallFormat::Hermes);
        assert_eq!(s.push("Sure <tool"), "Sure ");
        // "<tooX" cannot start a call: it goes out.
        let mut other = ToolCallStream::new(ToolCallFormat::Hermes);
        assert_eq!(other.push("<too"), "");
        assert_eq!(other.push("X"), "<tooX");
        assert_eq!(s.push("_call>{\"name\": \"f\", "), "");
        assert_eq!(s.push("\"arguments\": {}}</tool_call>"), "");
        let (rest, calls) = s.finish();
        assert_eq!(rest, "");
        assert_eq!(calls[0].name, "f");

        let mut broken = ToolCallStream::new(ToolCallFormat::Hermes);
        assert_eq!(broken.push("<tool_call>oops"), "");
        assert_eq!(broken.finish(), ("<tool_call>oops".into(), Vec::new()));
    }

    #[test]
    fn reads_llama3_replies_that_are_calls() {
        let reply = ToolCallFormat::Llama3Json
            .parse(" <|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}; {\"name\": \"clock\", \"parameters\": {}}")
            .unwrap();
        assert_eq!(reply.content, None);
        assert_eq!(
            reply.calls,
            [
                ParsedCall {
                    name: "get_weather".into(),
                    arguments: r#"{"city": "Paris"}"#.into()
                },
                ParsedCall {
                    name: "clock".into(),
                    arguments: "{}".into()
                },
            ]
        );
        // Streamed: a reply that opens with `{` is held, text goes out.
        let mut call = ToolCallStream::new(ToolCallFormat::Llama3Json);
        assert_eq!(call.push("\n"), "");
        assert_eq!(call.push("{\"name\": \"f\", "), "");
        assert_eq!(call.push("\"parameters\": {\"x\": 1}}"), "");
        let (rest, calls) = call.finish();
        assert_eq!(
            (rest.as_str(), calls[0].arguments.as_str()),
            ("", r#"{"x": 1}"#)
        );
        let mut text = ToolCallStream::new(ToolCallFormat::Llama3Json);
        assert_eq!(text.push(" Hello"), " Hello");
        assert_eq!(text.push(" {"), " {");
        assert_eq!(text.finish(), (String::new(), Vec::new()));
    }
}
