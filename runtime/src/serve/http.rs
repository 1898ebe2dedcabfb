//! The HTTP side: axum routes on a single-threaded tokio runtime. Handlers
//! parse and check a request, tokenize it, take a place in the queue and
//! hand the job to the model's thread; replies come back as [`Event`]s,
//! sent on as one JSON body or as server-sent events in OpenAI's chunk
//! format. Dropping a reply's receiver (the client hung up) is what tells
//! the worker to stop.

use super::api::{self, ApiError, ChatRequest, CompletionRequest, Generation};
use super::tools::{ParsedCall, ToolCallFormat, ToolCallStream};
use super::worker::{Admission, Event, Finished, Job, Stats};
use crate::generate::chat::ChatTemplate;
use crate::generate::tokenizer::Tokenizer;
use crate::generate::GenerationOptions;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// Request bodies past this are refused (413): a long chat history is a
/// few hundred kilobytes.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// What every handler shares.
pub struct App {
    pub jobs: std::sync::mpsc::Sender<Job>,
    pub admission: Admission,
    pub stats: Arc<Stats>,
    pub api_key: Option<String>,
    pub model_id: String,
    pub device: String,
    pub created: u64,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<ChatTemplate>,
    pub capacity: usize,
    pub vocab: usize,
    pub eos_token_ids: Vec<u32>,
    pub queue: usize,
    pub next_id: AtomicU64,
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(app)
}

pub fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such endpoint; Kiln serves POST /v1/chat/completions, POST /v1/completions, \
                  GET /v1/models and GET /health"
            .into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("unknown_url"),
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: "this endpoint does not take that method (completions are POST, the rest GET)"
            .into(),
        kind: "invalid_request_error",
        param: None,
        code: None,
    }
}

async fn health(State(app): State<Arc<App>>) -> Response {
    Json(serde_json::json!({
        "status": "ok",
        "model": app.model_id,
        "device": app.device,
        "kv_cache_positions": app.capacity,
        "queue": { "in_system": app.admission.in_system(), "limit": app.queue },
        "stats": app.stats.to_json(),
    }))
    .into_response()
}

async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = app.authorize(&headers) {
        return e.into_response();
    }
    Json(serde_json::json!({
        "object": "list",
        "data": [{
            "id": app.model_id,
            "object": "model",
            "created": app.created,
            "owned_by": "kiln",
        }],
    }))
    .into_response()
}

async fn chat_completions(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let shape = Shape::Chat;
    let request = match app.read::<ChatRequest>(&headers, body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let generation = api::chat_prompt(&request, &app.tokenizer, app.template.as_ref()).and_then(
        |(prompt, tools)| {
            let mut g = app.check(&request.common, prompt)?;
            g.tools = tools;
            Ok(g)
        },
    );
    match generation {
        Ok(g) => app.reply(shape, g).await,
        Err(e) => e.into_response(),
    }
}

async fn completions(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request = match app.read::<CompletionRequest>(&headers, body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let generation = api::completion_prompt(&request, &app.tokenizer)
        .and_then(|prompt| app.check(&request.common, prompt));
    match generation {
        Ok(g) => app.reply(Shape::Completion, g).await,
        Err(e) => e.into_response(),
    }
}

impl App {
    /// Checks the API key (if the server has one) in constant time.
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        use subtle::ConstantTimeEq;
        let Some(key) = &self.api_key else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
            return Ok(());
        }
        Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "missing or wrong API key: send `Authorization: Bearer <key>` with the key \
                      kiln-run serve was started with (--api-key)"
                .into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        })
    }

    fn read<T: serde::de::DeserializeOwned>(
        &self,
        headers: &HeaderMap,
        body: Result<Bytes, BytesRejection>,
    ) -> Result<T, ApiError> {
        self.authorize(headers)?;
        let body = body.map_err(|rejection| ApiError {
            status: rejection.status(),
            message: if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                format!("the request body is over {MAX_BODY_BYTES} bytes")
            } else {
                format!("cannot read the request body: {}", rejection.body_text())
            },
            kind: "invalid_request_error",
            param: None,
            code: None,
        })?;
        api::parse(&body)
    }

    fn check(&self, common: &api::CommonFields, prompt: Vec<u32>) -> Result<Generation, ApiError> {
        // Unseeded sampling differs from run to run, as OpenAI's does.
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ self.next_id.load(Ordering::Relaxed);
        common.generation(prompt, self.capacity, self.vocab, seed)
    }

    /// Queues the job; the receiver gets its events.
    fn submit(&self, g: &Generation) -> Result<UnboundedReceiver<Event>, ApiError> {
        let Some(ticket) = self.admission.try_admit() else {
            self.stats
                .requests_refused_busy
                .fetch_add(1, Ordering::Relaxed);
            return Err(self.busy());
        };
        let (events, receiver) = unbounded_channel();
        let job = Job {
            prompt: g.prompt.clone(),
            options: GenerationOptions {
                max_new_tokens: g.max_tokens,
                eos_token_ids: self.eos_token_ids.clone(),
                record_logits: false,
                sampling: g.sampling.clone(),
            },
            stop: g.stop.clone(),
            events,
            ticket,
        };
        self.jobs.send(job).map_err(|_| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "the model's thread has stopped; restart kiln-run serve".into(),
            kind: "server_error",
            param: None,
            code: None,
        })?;
        Ok(receiver)
    }

    fn busy(&self) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!(
                "the model is busy: one request running and {} waiting (--queue {}); retry later",
                self.queue, self.queue
            ),
            kind: "server_error",
            param: None,
            code: Some("server_busy"),
        }
    }

    /// Seconds until a place is likely free: the mean request time so far
    /// times the requests ahead.
    fn retry_after(&self) -> u64 {
        let ahead = self.admission.in_system().max(1) as f64;
        (self.stats.mean_request_seconds() * ahead)
            .ceil()
            .clamp(1.0, 3600.0) as u64
    }

    async fn reply(self: &Arc<Self>, shape: Shape, g: Generation) -> Response {
        let receiver = match self.submit(&g) {
            Ok(r) => r,
            Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => {
                let mut response = e.into_response();
                let seconds = HeaderValue::from(self.retry_after());
                response.headers_mut().insert(header::RETRY_AFTER, seconds);
                return response;
            }
            Err(e) => return e.into_response(),
        };
        let meta = Meta {
            id: format!(
                "{}-kiln-{}",
                shape.id_prefix(),
                self.next_id.fetch_add(1, Ordering::Relaxed)
            ),
            created: unix_seconds(),
            model: self.model_id.clone(),
        };
        let tools = g.tools;
        if g.stream {
            stream(shape, meta, receiver, g.include_usage, tools).into_response()
        } else {
            whole(shape, meta, receiver, tools).await
        }
    }
}

/// What every object of one reply repeats.
struct Meta {
    id: String,
    created: u64,
    model: String,
}

#[derive(Clone, Copy)]
enum Shape {
    Chat,
    Completion,
}

impl Shape {
    fn id_prefix(self) -> &'static str {
        match self {
            Shape::Chat => "chatcmpl",
            Shape::Completion => "cmpl",
        }
    }

    fn object(self, streamed: bool) -> &'static str {
        match (self, streamed) {
            (Shape::Chat, false) => "chat.completion",
            (Shape::Chat, true) => "chat.completion.chunk",
            (Shape::Completion, _) => "text_completion",
        }
    }

    /// One choice of a chunk: `text` new, `finish` set on the last.
    fn chunk_choice(self, text: &str, first: bool, finish: Option<&str>) -> serde_json::Value {
        match self {
            Shape::Chat => {
                let delta = match (first, finish) {
                    (true, _) => serde_json::json!({ "role": "assistant", "content": text }),
                    (false, Some(_)) => serde_json::json!({}),
                    (false, None) => serde_json::json!({ "content": text }),
                };
                serde_json::json!({
                    "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish,
                })
            }
            Shape::Completion => serde_json::json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": finish,
            }),
        }
    }

    fn whole_choice(self, text: String, finish: &str) -> serde_json::Value {
        match self {
            Shape::Chat => serde_json::json!({
                "index": 0,
                "message": { "role": "assistant", "content": text },
                "logprobs": null,
                "finish_reason": finish,
            }),
            Shape::Completion => serde_json::json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": finish,
            }),
        }
    }
}

fn usage(f: &Finished) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": f.cached_tokens },
    })
}

fn failure(message: String) -> ApiError {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message,
        kind: "server_error",
        param: None,
        code: None,
    }
}

/// OpenAI's `tool_calls` entries for the calls read from a reply; in a
/// streamed reply's delta each also carries its `index`.
fn tool_calls_json(meta: &Meta, calls: &[ParsedCall], streamed: bool) -> serde_json::Value {
    let request = meta.id.rsplit('-').next().unwrap_or_default();
    calls
        .iter()
        .enumerate()
        .map(|(i, call)| {
            let mut entry = serde_json::json!({
                "id": format!("call_kiln_{request}_{i}"),
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            });
            if streamed {
                entry["index"] = i.into();
            }
            entry
        })
        .collect()
}

/// The reply as one JSON object, once generation has ended.
async fn whole(
    shape: Shape,
    meta: Meta,
    mut events: UnboundedReceiver<Event>,
    tools: Option<ToolCallFormat>,
) -> Response {
    let mut text = String::new();
    loop {
        match events.recv().await {
            Some(Event::Text(piece)) => text.push_str(&piece),
            Some(Event::Done(f)) => {
                let reply = tools.and_then(|format| format.parse(&text));
                let choice = match reply {
                    Some(reply) => serde_json::json!({
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": reply.content,
                            "tool_calls": tool_calls_json(&meta, &reply.calls, false),
                        },
                        "logprobs": null,
                        "finish_reason": "tool_calls",
                    }),
                    None => shape.whole_choice(text, f.reason.as_str()),
                };
                return Json(serde_json::json!({
                    "id": meta.id,
                    "object": shape.object(false),
                    "created": meta.created,
                    "model": meta.model,
                    "choices": [choice],
                    "usage": usage(&f),
                }))
                .into_response();
            }
            Some(Event::Failed(message)) => return failure(message).into_response(),
            None => {
                return failure("the model's thread stopped during the request".into())
                    .into_response()
            }
        }
    }
}

struct Streaming {
    shape: Shape,
    meta: Meta,
    events: UnboundedReceiver<Event>,
    include_usage: bool,
    /// With tools offered: holds back what may be a call.
    tools: Option<ToolCallStream>,
    ready: VecDeque<SseEvent>,
    first: bool,
    ended: bool,
}

impl Streaming {
    fn chunk(&self, choices: serde_json::Value, usage: Option<serde_json::Value>) -> SseEvent {
        let mut object = serde_json::json!({
            "id": self.meta.id,
            "object": self.shape.object(true),
            "created": self.meta.created,
            "model": self.meta.model,
            "choices": choices,
        });
        // With include_usage, every chunk carries `usage`, null until the last.
        if self.include_usage {
            object["usage"] = usage.unwrap_or(serde_json::Value::Null);
        }
        SseEvent::default().data(object.to_string())
    }

    /// A piece of generated text: sent on, unless it may be a tool call.
    fn piece(&mut self, piece: &str) {
        match self.tools.as_mut().map(|t| t.push(piece)) {
            Some(released) if released.is_empty() => {}
            Some(released) => self.text(&released),
            None => self.text(piece),
        }
    }

    fn text(&mut self, text: &str) {
        let choice = self.shape.chunk_choice(text, self.first, None);
        self.first = false;
        let chunk = self.chunk(serde_json::json!([choice]), None);
        self.ready.push_back(chunk);
    }

    fn end(&mut self, event: Option<Event>) {
        match event {
            Some(Event::Done(f)) => {
                let (rest, calls) = self.tools.take().map(|t| t.finish()).unwrap_or_default();
                if !rest.is_empty() || self.first {
                    // The role comes first even when no text did.
                    self.text(&rest);
                }
                let mut finish = f.reason.as_str();
                if !calls.is_empty() {
                    let delta = serde_json::json!({
                        "index": 0,
                        "delta": {"tool_calls": tool_calls_json(&self.meta, &calls, true)},
                        "logprobs": null,
                        "finish_reason": null,
                    });
                    let chunk = self.chunk(serde_json::json!([delta]), None);
                    self.ready.push_back(chunk);
                    finish = "tool_calls";
                }
                let choice = self.shape.chunk_choice("", false, Some(finish));
                let last = self.chunk(serde_json::json!([choice]), None);
                self.ready.push_back(last);
                if self.include_usage {
                    let usage = self.chunk(serde_json::json!([]), Some(usage(&f)));
                    self.ready.push_back(usage);
                }
            }
            Some(Event::Failed(message)) => {
                let error = failure(message).body().to_string();
                self.ready.push_back(SseEvent::default().data(error));
            }
            _ => {
                let error = failure("the model's thread stopped during the request".into());
                self.ready
                    .push_back(SseEvent::default().data(error.body().to_string()));
            }
        }
        self.ready.push_back(SseEvent::default().data("[DONE]"));
        self.ended = true;
    }
}

/// The reply as server-sent events: a chunk per text piece, the finish
/// reason, usage if asked for, then `data: [DONE]`.
fn stream(
    shape: Shape,
    meta: Meta,
    events: UnboundedReceiver<Event>,
    include_usage: bool,
    tools: Option<ToolCallFormat>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let state = Streaming {
        shape,
        meta,
        events,
        include_usage,
        tools: tools.map(ToolCallStream::new),
        ready: VecDeque::new(),
        first: true,
        ended: false,
    };
    let events = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(event) = s.ready.pop_front() {
                return Some((Ok(event), s));
            }
            if s.ended {
                return None;
            }
            match s.events.recv().await {
                Some(Event::Text(piece)) => s.piece(&piece),
                other => s.end(other),
            }
        }
    });
    Sse::new(events)
}
