//! Hugging Face chat templates: the Jinja2 template a model ships (in
//! `chat_template.jinja` or `tokenizer_config.json`, or a GGUF's
//! `tokenizer.chat_template`), rendered as transformers'
//! `apply_chat_template` renders it, so a conversation becomes exactly the
//! text the model was trained on.
//!
//! transformers renders with Jinja2 (`trim_blocks`, `lstrip_blocks`, loop
//! controls, `raise_exception`, `strftime_now`) and templates call Python
//! string methods; minijinja with `pycompat` covers both.

use minijinja::value::Serde;
use minijinja::{Environment, Error, ErrorKind, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const TEMPLATE_FILE: &str = "chat_template.jinja";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// Instructions a template may execute per rendering.
const TEMPLATE_FUEL: u64 = 10_000_000;

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("the chat template from {origin} failed: {message}")]
    Render { origin: PathBuf, message: String },
}

/// One message of a conversation, as a chat template reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    /// `None`: the null `content` of an assistant message that only calls
    /// tools.
    pub content: Option<String>,
    /// The tools an assistant message called.
    pub tool_calls: Vec<ToolCall>,
    /// A `tool` message's answer to the call of this id.
    pub tool_call_id: Option<String>,
}

/// A call of a tool, as chat templates take it: Hugging Face's convention
/// (`{"type": "function", "function": {"name", "arguments"}}`) with the
/// arguments an object, where OpenAI's API sends them as a JSON string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: serde_json::Value,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: Some(content.into()),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    /// The message as the dict transformers' `apply_chat_template` gets:
    /// `tool_calls` and `tool_call_id` only where the message has them.
    fn to_json(&self) -> serde_json::Value {
        let mut message = serde_json::json!({"role": self.role, "content": self.content});
        if !self.tool_calls.is_empty() {
            message["tool_calls"] = self
                .tool_calls
                .iter()
                .map(|call| {
                    serde_json::json!({
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    })
                })
                .collect();
        }
        if let Some(id) = &self.tool_call_id {
            message["tool_call_id"] = serde_json::json!(id);
        }
        message
    }
}

/// A model's chat template and the special tokens it may refer to.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    source: String,
    /// Where the template came from, for errors.
    origin: PathBuf,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// The template of a model directory (Hugging Face or compiled):
    /// `chat_template.jinja` if present, else `tokenizer_config.json`'s
    /// `chat_template`. `None` when the model has neither.
    pub fn from_dir(dir: &Path) -> Result<Option<ChatTemplate>, ChatError> {
        let read = |name: &str| -> Result<Option<(Vec<u8>, PathBuf)>, ChatError> {
            let path = dir.join(name);
            if !path.is_file() {
                return Ok(None);
            }
            match std::fs::read(&path) {
                Ok(bytes) => Ok(Some((bytes, path))),
                Err(e) => Err(ChatError::BadFile {
                    path,
                    message: e.to_string(),
                }),
            }
        };
        let config = read(TOKENIZER_CONFIG_FILE)?;
        let template = read(TEMPLATE_FILE)?;
        Self::from_files(
            config.as_ref().map(|(b, p)| (b.as_slice(), p.as_path())),
            template.as_ref().map(|(b, p)| (b.as_slice(), p.as_path())),
        )
    }

    /// The template from the bytes of `tokenizer_config.json` and
    /// `chat_template.jinja` (either may be absent), each with the path that
    /// names it in errors.
    pub fn from_files(
        tokenizer_config: Option<(&[u8], &Path)>,
        template_file: Option<(&[u8], &Path)>,
    ) -> Result<Option<ChatTemplate>, ChatError> {
        let config_path = tokenizer_config
            .map(|(_, p)| p.to_path_buf())
            .unwrap_or_else(|| PathBuf::from(TOKENIZER_CONFIG_FILE));
        let config: serde_json::Value = match tokenizer_config {
            Some((bytes, _)) => serde_json::from_slice(bytes).map_err(|e| ChatError::BadFile {
                path: config_path.clone(),
                message: format!("invalid JSON: {e}"),
            })?,
            None => serde_json::Value::Null,
        };
        // A special token is written as a string or as {"content": …}.
        let token = |key: &str| -> String {
            match config.get(key) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(v) => v
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or_default()
                    .to_string(),
                None => String::new(),
            }
        };
        let (source, origin) = if let Some((bytes, path)) = template_file {
            let path = path.to_path_buf();
            let text = String::from_utf8(bytes.to_vec()).map_err(|_| ChatError::BadFile {
                path: path.clone(),
                message: "is not UTF-8".into(),
            })?;
            (text, path)
        } else {
            let template = match config.get("chat_template") {
                None | Some(serde_json::Value::Null) => return Ok(None),
                Some(serde_json::Value::String(s)) => s.clone(),
                // Several named templates: the one called "default".
                Some(serde_json::Value::Array(named)) => named
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str())
                    .ok_or_else(|| ChatError::BadFile {
                        path: config_path.clone(),
                        message: "chat_template lists named templates but none is \"default\""
                            .into(),
                    })?
                    .to_string(),
                Some(other) => {
                    return Err(ChatError::BadFile {
                        path: config_path,
                        message: format!("chat_template must be a string, got {other}"),
                    })
                }
            };
            (template, config_path)
        };
        let template = ChatTemplate {
            source,
            origin,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
        };
        // Fail on a template that does not parse now, not mid-conversation.
        template
            .environment()
            .template_from_str(&template.source)
            .map_err(|e| template.render_error(e))?;
        Ok(Some(template))
    }

    fn environment(&self) -> Environment<'_> {
        let mut env = Environment::new();
        let mut syntax = minijinja::syntax::SyntaxConfig::builder();
        syntax.trim_blocks(true).lstrip_blocks(true);
        env.set_syntax(syntax.build().expect("the default delimiters are valid"));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // The template comes with the model: bound its work, so a hostile
        // one fails instead of hanging (real templates use a few thousand).
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| strftime_now(&format));
        // transformers' own `tojson` (Python's json.dumps, not Jinja2's
        // HTML-safe one): templates print tool schemas and arguments with it.
        env.add_filter("tojson", super::pyjson::tojson_filter);
        env
    }

    /// Whether the template reads the `tools` a request offers: one that
    /// does not would drop them silently.
    pub fn takes_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    fn render_error(&self, e: Error) -> ChatError {
        let mut message = e.to_string();
        if let Some(detail) = e.detail() {
            message = format!("{message} ({detail})");
        }
        ChatError::Render {
            origin: self.origin.clone(),
            message,
        }
    }

    /// The conversation as the model's prompt text; with
    /// `add_generation_prompt`, ending where the assistant's reply begins.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// [`render`](Self::render) with the tools the model may call (OpenAI's
    /// `tools`: `{"type": "function", "function": {"name", "description",
    /// "parameters"}}` each), as transformers passes them: `tools` is none
    /// without them, and so is `documents`.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let env = self.environment();
        let template = env
            .template_from_str(&self.source)
            .map_err(|e| self.render_error(e))?;
        // Through serde_json, whose maps (like Python's dicts) keep their
        // order: templates iterate schemas and print them.
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| Value::from(Serde(m.to_json())))
            .collect();
        let context = BTreeMap::from([
            ("messages", Value::from(messages)),
            (
                "tools",
                tools.map_or(Value::from(()), |t| Value::from(Serde(t))),
            ),
            ("documents", Value::from(())),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("bos_token", Value::from(self.bos_token.as_str())),
            ("eos_token", Value::from(self.eos_token.as_str())),
        ]);
        template.render(context).map_err(|e| self.render_error(e))
    }
}

/// Today's date for templates that print it (Llama 3.x), in the few strftime
/// fields they use.
fn strftime_now(format: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
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
    let name = MONTHS[(month - 1) as usize];
    format
        .replace("%Y", &year.to_string())
        .replace("%m", &format!("{month:02}"))
        .replace("%d", &format!("{day:02}"))
        .replace("%B", name)
        .replace("%b", &name[..3])
}

/// Days since 1970-01-01 → (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
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

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn template(source: &str) -> ChatTemplate {
        let config = serde_json::json!({"chat_template": source, "bos_token": {"content": "<s>"}, "eos_token": "</s>"});
        ChatTemplate::from_files(Some((config.to_string().as_bytes(), Path::new("m"))), None)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn renders_chatml_with_a_default_system_message() {
        let text = template(CHATML)
            .render(&[ChatMessage::new("user", "Hi")], true)
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_special_tokens_and_raise_exception_work() {
        let t =
            template("{{ bos_token }}{{ messages[0]['content'].strip().upper() }}{{ eos_token }}");
        assert_eq!(
            t.render(&[ChatMessage::new("user", "  hi ")], false)
                .unwrap(),
            "<s>HI</s>"
        );
        let t = template("{% if messages[0]['role'] != 'system' %}{{ raise_exception('needs a system message') }}{% endif %}");
        let err = t
            .render(&[ChatMessage::new("user", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs a system message"), "{err}");
    }

    #[test]
    fn trim_and_lstrip_blocks_as_transformers_sets_them() {
        let t = template("{% for m in messages %}\n    {{ m['content'] }}\n{% endfor %}");
        assert_eq!(
            t.render(
                &[ChatMessage::new("user", "a"), ChatMessage::new("user", "b")],
                false
            )
            .unwrap(),
            "    a\n    b\n"
        );
    }

    #[test]
    fn missing_and_broken_templates() {
        let none =
            ChatTemplate::from_files(Some((b"{}", Path::new("m/tokenizer_config.json"))), None)
                .unwrap();
        assert!(none.is_none());
        let err = ChatTemplate::from_files(
            Some((
                br#"{"chat_template": "{% for x in %}"}"#,
                Path::new("m/tokenizer_config.json"),
            )),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("tokenizer_config.json"), "{err}");
        let file =
            ChatTemplate::from_files(None, Some((b"[{{ messages|length }}]", Path::new("m"))))
                .unwrap()
                .unwrap();
        assert_eq!(file.render(&[], false).unwrap(), "[0]");
    }

    #[test]
    fn a_runaway_template_runs_out_of_fuel() {
        let t = template(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        );
        let err = t.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("fuel"), "{err}");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_781), (2026, 11, 24));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
