//! The OpenAI API's request bodies as the server reads them, and the
//! checks that turn one into a generation: fields Kiln does not know are
//! ignored, known ones of the wrong type or out of range are refused with
//! OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`).
//!
//! Field names and ranges follow OpenAI's API reference
//! (https://platform.openai.com/docs/api-reference/chat/create and
//! …/completions/create); `top_k` and `repetition_penalty` are the
//! extensions vLLM and llama.cpp's server accept.

use super::tools::ToolCallFormat;
use crate::generate::chat::{ChatMessage, ChatTemplate, ToolCall};
use crate::generate::sampling::Sampling;
use crate::generate::tokenizer::Tokenizer;
use axum::http::StatusCode;
use serde::Deserialize;

/// An error as OpenAI's API returns it.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

#[derive(Deserialize, Debug, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `stop`: one string or a list of them.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// The sampling and length fields both endpoints share.
#[derive(Deserialize, Debug, Default)]
pub struct CommonFields {
    pub model: Option<String>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub repetition_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub n: Option<u32>,
    pub logprobs: Option<serde_json::Value>,
}

/// A message's `content`: text, or a list of parts of which Kiln reads the
/// text ones.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize, Debug)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Deserialize, Debug)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
    /// An assistant message's calls of tools.
    pub tool_calls: Option<Vec<RequestToolCall>>,
    /// A `tool` message: the id of the call it answers.
    pub tool_call_id: Option<String>,
}

/// `{"id", "type": "function", "function": {"name", "arguments"}}`, the
/// arguments a JSON string (an object is taken too).
#[derive(Deserialize, Debug)]
pub struct RequestToolCall {
    pub id: Option<String>,
    pub function: RequestFunction,
}

#[derive(Deserialize, Debug)]
pub struct RequestFunction {
    pub name: String,
    pub arguments: Option<serde_json::Value>,
}

#[derive(Deserialize, Debug)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    /// The tools the model may call, passed to the chat template as they
    /// come (`{"type": "function", "function": {...}}`).
    pub tools: Option<Vec<serde_json::Value>>,
    /// `"auto"` (the default with tools) or `"none"`.
    pub tool_choice: Option<serde_json::Value>,
    #[serde(flatten)]
    pub common: CommonFields,
}

/// `prompt` of `/v1/completions`: text, one text in a list, or token ids.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum CompletionPrompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
}

#[derive(Deserialize, Debug)]
pub struct CompletionRequest {
    pub prompt: CompletionPrompt,
    #[serde(flatten)]
    pub common: CommonFields,
}

/// A request checked and ready for the model.
#[derive(Debug)]
pub struct Generation {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Where the request offers tools: the form the reply's calls are read in.
    pub tools: Option<ToolCallFormat>,
}

/// Parses a JSON body, turning serde's complaint into a 400.
pub fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid(
            "the request body is empty; send a JSON object",
            None,
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid: {e}"), None))
}

/// The roles chat templates know. OpenAI's `developer` is its newer name
/// for `system`.
fn template_role(role: &str) -> Option<&'static str> {
    match role {
        "system" | "developer" => Some("system"),
        "user" => Some("user"),
        "assistant" => Some("assistant"),
        "tool" => Some("tool"),
        _ => None,
    }
}

/// The messages as the chat template takes them.
pub fn chat_messages(messages: &[Message]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "`messages` is empty; send at least one message",
            Some("messages"),
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, message)| {
            let role = template_role(&message.role).ok_or_else(|| {
                ApiError::invalid(
                    format!(
                        "messages[{i}].role is {:?}; Kiln takes system, developer, user, assistant and tool",
                        message.role
                    ),
                    Some("messages"),
                )
            })?;
            let calls = message.tool_calls.as_deref().unwrap_or_default();
            let content = match &message.content {
                // OpenAI's null content of a message that only calls tools.
                None if !calls.is_empty() => None,
                None => Some(String::new()),
                Some(Content::Text(text)) => Some(text.clone()),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    format!(
                                        "messages[{i}] has a content part of type {kind:?}; \
                                         this model reads text parts only"
                                    ),
                                    Some("messages"),
                                ))
                            }
                        }
                    }
                    Some(text)
                }
            };
            if !calls.is_empty() && role != "assistant" {
                return Err(ApiError::invalid(
                    format!("messages[{i}] has tool_calls, which only assistant messages make"),
                    Some("messages"),
                ));
            }
            let tool_calls = calls
                .iter()
                .enumerate()
                .map(|(j, call)| tool_call(i, j, call))
                .collect::<Result<_, _>>()?;
            Ok(ChatMessage {
                role: role.into(),
                content,
                tool_calls,
                tool_call_id: message.tool_call_id.clone(),
            })
        })
        .collect()
}

/// A request's tool call as templates take it: the arguments' JSON string
/// read into an object (as vLLM does for Hugging Face templates).
fn tool_call(i: usize, j: usize, call: &RequestToolCall) -> Result<ToolCall, ApiError> {
    let bad = |problem: String| {
        ApiError::invalid(
            format!("messages[{i}].tool_calls[{j}].function.arguments {problem}"),
            Some("messages"),
        )
    };
    let arguments = match &call.function.arguments {
        None => serde_json::json!({}),
        Some(serde_json::Value::String(text)) => {
            serde_json::from_str(text).map_err(|e| bad(format!("is not JSON ({e}): {text:?}")))?
        }
        Some(object @ serde_json::Value::Object(_)) => object.clone(),
        Some(other) => return Err(bad(format!("must be a JSON string, got {other}"))),
    };
    Ok(ToolCall {
        id: call.id.clone().unwrap_or_default(),
        name: call.function.name.clone(),
        arguments,
    })
}

/// The tools a chat request offers the model, with the form the template
/// teaches for calling them; checked against what the template and Kiln
/// can do with them.
fn offered_tools<'r>(
    request: &'r ChatRequest,
    template: &ChatTemplate,
) -> Result<Option<(&'r [serde_json::Value], ToolCallFormat)>, ApiError> {
    let choice = request.tool_choice.as_ref().filter(|c| !c.is_null());
    let tools = match request.tools.as_deref() {
        None | Some([]) => {
            return match choice {
                Some(c) if c != "none" && c != "auto" => Err(ApiError::invalid(
                    format!("tool_choice is {c}, but the request offers no tools"),
                    Some("tool_choice"),
                )),
                _ => Ok(None),
            }
        }
        Some(tools) => tools,
    };
    match choice {
        None => {}
        Some(c) if c == "auto" => {}
        Some(c) if c == "none" => return Ok(None),
        Some(c) => {
            return Err(ApiError::invalid(
                format!(
                    "tool_choice {c} is not supported: Kiln cannot force a call (it has no \
                     constrained decoding); send \"auto\" and the model decides"
                ),
                Some("tool_choice"),
            ))
        }
    }
    for (i, tool) in tools.iter().enumerate() {
        let name = tool.pointer("/function/name").and_then(|n| n.as_str());
        if tool.get("type").and_then(|t| t.as_str()) != Some("function") || name.is_none() {
            return Err(ApiError::invalid(
                format!(
                    "tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": …}}}}, got {tool}"
                ),
                Some("tools"),
            ));
        }
    }
    if !template.takes_tools() {
        return Err(ApiError::invalid(
            "this model's chat template does not read `tools`, so the model would never see \
             them; send the request without tools",
            Some("tools"),
        ));
    }
    let format = ToolCallFormat::of(template).ok_or_else(|| {
        ApiError::invalid(
            format!(
                "this model's chat template describes tool calls in a form Kiln does not read \
                 back; Kiln reads {}",
                ToolCallFormat::DESCRIPTION
            ),
            Some("tools"),
        )
    })?;
    Ok(Some((tools, format)))
}

/// The prompt ids of a chat request: its messages (and tools) through the
/// model's chat template, tokenized as `kiln-run generate --chat` does;
/// with the form the reply's tool calls are read in, when it offers tools.
pub fn chat_prompt(
    request: &ChatRequest,
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
) -> Result<(Vec<u32>, Option<ToolCallFormat>), ApiError> {
    let messages = chat_messages(&request.messages)?;
    let template = template.ok_or_else(|| {
        ApiError::invalid(
            "this model has no chat template (none in tokenizer_config.json or \
             chat_template.jinja); use /v1/completions with the prompt written out",
            None,
        )
    })?;
    let offered = offered_tools(request, template)?;
    let text = template
        .render_with_tools(&messages, offered.map(|(tools, _)| tools), true)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    let ids = tokenizer
        .encode_plain(&text)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    Ok((ids, offered.map(|(_, format)| format)))
}

/// The prompt ids of a completion request (the tokenizer adds its special
/// tokens to text, as `kiln-run generate --prompt` does).
pub fn completion_prompt(
    request: &CompletionRequest,
    tokenizer: &Tokenizer,
) -> Result<Vec<u32>, ApiError> {
    let encode = |text: &str| {
        tokenizer
            .encode(text)
            .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))
    };
    match &request.prompt {
        CompletionPrompt::Text(text) => encode(text),
        CompletionPrompt::Texts(texts) if texts.len() == 1 => encode(&texts[0]),
        CompletionPrompt::Texts(texts) => Err(ApiError::invalid(
            format!(
                "`prompt` holds {} texts; Kiln serves one prompt per request",
                texts.len()
            ),
            Some("prompt"),
        )),
        CompletionPrompt::Ids(ids) => Ok(ids.clone()),
    }
}

impl CommonFields {
    /// Checks the fields against OpenAI's ranges and the model: the prompt
    /// and the tokens asked for must fit the KV cache of `capacity`
    /// positions, with ids below `vocab`.
    pub fn generation(
        &self,
        prompt: Vec<u32>,
        capacity: usize,
        vocab: usize,
        default_seed: u64,
    ) -> Result<Generation, ApiError> {
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::invalid(
                format!("n = {n}: Kiln returns one choice per request"),
                Some("n"),
            ));
        }
        if matches!(self.logprobs, Some(ref v) if !v.is_null() && v != &serde_json::json!(false)) {
            return Err(ApiError::invalid(
                "logprobs are not supported",
                Some("logprobs"),
            ));
        }
        if prompt.is_empty() {
            return Err(ApiError::invalid("the prompt is empty", Some("prompt")));
        }
        if let Some(&id) = prompt.iter().find(|&&id| id as usize >= vocab) {
            return Err(ApiError::invalid(
                format!("token id {id} is outside the vocabulary of {vocab} tokens"),
                Some("prompt"),
            ));
        }
        let room = capacity.saturating_sub(prompt.len());
        let asked = self.max_completion_tokens.or(self.max_tokens);
        let max_tokens = match asked {
            Some(0) => {
                return Err(ApiError::invalid(
                    "max_tokens must be at least 1",
                    Some("max_tokens"),
                ))
            }
            Some(n) => n as usize,
            None => room,
        };
        if room == 0 || max_tokens > room {
            return Err(ApiError::invalid(
                format!(
                    "this model's KV cache holds {capacity} positions, but the request needs {} \
                     ({} in the prompt, {max_tokens} to generate); shorten the conversation or \
                     ask for fewer tokens, or compile the model with a larger --max-seq-len",
                    prompt.len() + max_tokens.max(1),
                    prompt.len()
                ),
                Some("messages"),
            )
            .with_code("context_length_exceeded"));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                format!("temperature must be between 0 and 2, got {temperature}"),
                Some("temperature"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                format!("top_p must be in (0, 1], got {top_p}"),
                Some("top_p"),
            ));
        }
        let sampling = Sampling {
            temperature,
            top_k: self.top_k.unwrap_or(0) as usize,
            top_p,
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            seed: self.seed.map_or(default_seed, |s| s as u64),
        };
        // The sampler words its complaints for the command line.
        sampling.check().map_err(|message| {
            ApiError::invalid(
                message.replace("--repetition-penalty", "repetition_penalty"),
                None,
            )
        })?;
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(list)) => list.clone(),
        };
        // OpenAI takes up to 4.
        if stop.len() > 4 {
            return Err(ApiError::invalid(
                format!("stop holds {} strings; at most 4", stop.len()),
                Some("stop"),
            ));
        }
        Ok(Generation {
            prompt,
            max_tokens,
            sampling,
            stop,
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
            tools: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(json: &str) -> Result<CommonFields, ApiError> {
        parse(json.as_bytes())
    }

    #[test]
    fn unknown_fields_are_ignored_and_wrong_types_refused() {
        let c = common(r#"{"temperature": 0, "user": "x", "tools": []}"#).unwrap();
        assert_eq!(c.temperature, Some(0.0));
        let e = common(r#"{"temperature": "hot"}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("invalid type"), "{}", e.message);
        assert!(common(r#"{"max_tokens": -1}"#).is_err());
        assert!(parse::<CommonFields>(b"")
            .unwrap_err()
            .message
            .contains("empty"));
        assert!(parse::<CommonFields>(b"{").is_err());
    }

    #[test]
    fn lengths_must_fit_the_cache() {
        let c = common(r#"{"max_tokens": 5}"#).unwrap();
        assert_eq!(c.generation(vec![1, 2], 7, 10, 0).unwrap().max_tokens, 5);
        let e = c.generation(vec![1, 2, 3], 7, 10, 0).unwrap_err();
        assert_eq!(e.code, Some("context_length_exceeded"));
        assert!(e.message.contains("holds 7 positions"), "{}", e.message);
        // Without max_tokens: whatever room is left.
        let c = common("{}").unwrap();
        assert_eq!(c.generation(vec![1, 2], 7, 10, 0).unwrap().max_tokens, 5);
        assert!(c.generation(vec![1; 7], 7, 10, 0).is_err());
        assert!(c.generation(vec![], 7, 10, 0).is_err());
        assert!(c
            .generation(vec![10], 7, 10, 0)
            .unwrap_err()
            .message
            .contains("vocabulary"));
        // max_completion_tokens wins over the older name.
        let c = common(r#"{"max_tokens": 1, "max_completion_tokens": 3}"#).unwrap();
        assert_eq!(c.generation(vec![1], 7, 10, 0).unwrap().max_tokens, 3);
    }

    #[test]
    fn sampling_fields_are_checked() {
        let g = common(r#"{"temperature": 0.5, "top_p": 0.9, "top_k": 4, "seed": 7, "stop": "x"}"#)
            .unwrap()
            .generation(vec![1], 8, 10, 0)
            .unwrap();
        assert_eq!(
            (g.sampling.temperature, g.sampling.top_k, g.sampling.seed),
            (0.5, 4, 7)
        );
        assert_eq!(g.stop, ["x"]);
        for bad in [
            r#"{"temperature": 3}"#,
            r#"{"top_p": 0}"#,
            r#"{"frequency_penalty": 5}"#,
            r#"{"n": 2}"#,
            r#"{"logprobs": true}"#,
            r#"{"stop": ["a", "b", "c", "d", "e"]}"#,
            r#"{"max_tokens": 0}"#,
        ] {
            let e = common(bad)
                .unwrap()
                .generation(vec![1], 8, 10, 0)
                .unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn messages_need_known_roles_and_text() {
        let request: ChatRequest = parse(
            br#"{"messages": [{"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}"#,
        )
        .unwrap();
        let messages = chat_messages(&request.messages).unwrap();
        assert_eq!(
            messages,
            [
                ChatMessage::new("system", "be brief"),
                ChatMessage::new("user", "hi")
            ]
        );
        let bad: ChatRequest =
            parse(br#"{"messages": [{"role": "wizard", "content": "x"}]}"#).unwrap();
        assert!(chat_messages(&bad.messages)
            .unwrap_err()
            .message
            .contains("wizard"));
        let empty: ChatRequest = parse(br#"{"messages": []}"#).unwrap();
        assert!(chat_messages(&empty.messages)
            .unwrap_err()
            .message
            .contains("empty"));
        let image: ChatRequest =
            parse(br#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#)
                .unwrap();
        assert!(chat_messages(&image.messages).is_err());
        assert!(parse::<ChatRequest>(br#"{"model": "x"}"#).is_err());
    }

    #[test]
    fn tool_calls_and_tool_messages_are_read_and_checked() {
        let request: ChatRequest = parse(
            br#"{"messages": [
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                    "function": {"name": "f", "arguments": "{\"b\": 1, \"a\": [2]}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}"#,
        )
        .unwrap();
        let messages = chat_messages(&request.messages).unwrap();
        assert_eq!(messages[0].content, None);
        let call = &messages[0].tool_calls[0];
        assert_eq!((call.id.as_str(), call.name.as_str()), ("c1", "f"));
        // Read into an object that keeps the arguments' order.
        assert_eq!(call.arguments.to_string(), r#"{"b":1,"a":[2]}"#);
        assert_eq!(messages[1].role, "tool");
        assert_eq!(messages[1].tool_call_id.as_deref(), Some("c1"));

        let bad = |body: &[u8]| {
            let request: ChatRequest = parse(body).unwrap();
            chat_messages(&request.messages).unwrap_err().message
        };
        let err = bad(br#"{"messages": [{"role": "assistant", "tool_calls": [
            {"function": {"name": "f", "arguments": "{not json"}}]}]}"#);
        assert!(
            err.contains("messages[0].tool_calls[0].function.arguments is not JSON"),
            "{err}"
        );
        let err = bad(
            br#"{"messages": [{"role": "user", "content": "x", "tool_calls": [
            {"function": {"name": "f"}}]}]}"#,
        );
        assert!(err.contains("only assistant messages"), "{err}");
    }
}
