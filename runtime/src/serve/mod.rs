//! `kiln-run serve`: an OpenAI-compatible HTTP server for one compiled
//! model, for the clients people already use (the `openai` SDKs, Open
//! WebUI, LangChain, editor plugins).
//!
//! Two threads matter. The model's thread ([`worker`]) opens the engine
//! (the NPU session stays on the thread that opened it) and runs requests
//! one at a time, keeping the last conversation's KV cache so that the next
//! turn prefills only what is new. The HTTP thread ([`http`]: axum on a
//! single-threaded tokio runtime) parses, checks and tokenizes requests,
//! admits at most `--queue` waiting behind the running one (503 past that),
//! and streams replies.

pub mod api;
mod http;
pub mod stop;
pub mod tools;
pub mod worker;

use crate::compiled::manifest::Manifest;
use crate::engine::{self, Backend};
use crate::generate::chat::ChatTemplate;
use crate::generate::run::init_threads;
use crate::generate::tokenizer::Tokenizer;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use worker::{Admission, Stats, Worker};

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Endpoints: POST /v1/chat/completions (the model's chat template), POST /v1/completions, \
GET /v1/models, GET /health (status and counters, no key needed). Streaming with \"stream\": true \
sends OpenAI's chunks as server-sent events. Tool calling: \"tools\" go to the chat template; \
calls the model writes as <tool_call>{\"name\": …, \"arguments\": …}</tool_call> (Qwen2.5, Qwen3, \
Hermes) or as a reply {\"name\": …, \"parameters\": …} (Llama 3.x) come back as tool_calls; \
tool_choice \"auto\" or \"none\".

Example, with the official client (pip install openai):
  kiln-run serve model.kiln &
  python -c 'from openai import OpenAI; c = OpenAI(base_url=\"http://127.0.0.1:8080/v1\", api_key=\"-\"); \
print(c.chat.completions.create(model=\"model.kiln\", messages=[{\"role\": \"user\", \"content\": \"Hi\"}]).choices[0].message.content)'")]
pub struct ServeArgs {
    /// A directory written by `kiln compile`.
    pub model: PathBuf,
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: Backend,
    /// The ACL device id for `--backend npu`.
    #[arg(long, default_value_t = 0)]
    pub device: i32,
    /// The address to listen on. The default answers this machine only; use
    /// 0.0.0.0 to serve the network (then set --api-key).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// The port to listen on (0: any free port; the one chosen is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 requests.
    #[arg(long, env = "KILN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Requests that may wait behind the running one; more get 503 with Retry-After.
    #[arg(long, default_value_t = 4)]
    pub queue: usize,
    /// The model id clients see in /v1/models [default: the directory's name].
    #[arg(long)]
    pub model_name: Option<String>,
    /// Worker threads for the interpreter [default: all cores]
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Runs the server until the process is stopped.
pub fn serve(args: &ServeArgs) -> Result<(), String> {
    init_threads(args.threads)?;
    // Read before the engine opens (loading .om files takes a while), so a
    // model the server cannot take is refused at once.
    let manifest = Manifest::load(&args.model).map_err(|e| e.to_string())?;
    let tokenizer_file = manifest.tokenizer.as_ref().ok_or_else(|| {
        format!(
            "{}: the model has no tokenizer.json, and the server takes text; \
             recompile from a checkpoint that has one",
            args.model.display()
        )
    })?;
    let tokenizer = Arc::new(
        Tokenizer::from_file(&args.model.join(tokenizer_file)).map_err(|e| e.to_string())?,
    );
    let template = ChatTemplate::from_dir(&args.model).map_err(|e| e.to_string())?;
    if template.is_none() {
        crate::note!(
            "kiln-run serve: the model has no chat template: /v1/chat/completions will refuse \
             requests; /v1/completions works"
        );
    }
    let stats = Arc::new(Stats::default());
    let (jobs, queued) = std::sync::mpsc::channel();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let (dir, backend, device) = (args.model.clone(), args.backend, args.device);
    let worker_stats = stats.clone();
    let worker_tokenizer = tokenizer.clone();
    std::thread::Builder::new()
        .name("kiln-model".into())
        .spawn(move || match engine::open(&dir, backend, device) {
            Ok((_, engine)) => {
                let _ = ready_tx.send(Ok((engine.capacity(), engine.device())));
                Worker::new(engine, worker_tokenizer, worker_stats).serve(queued);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        })
        .map_err(|e| format!("cannot start the model's thread: {e}"))?;
    let (capacity, device) = ready
        .recv()
        .map_err(|_| "the model's thread stopped while opening the model".to_string())??;
    let model_id = args.model_name.clone().unwrap_or_else(|| {
        let name = args
            .model
            .canonicalize()
            .unwrap_or_else(|_| args.model.clone());
        name.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "kiln".into())
    });
    let app = Arc::new(http::App {
        jobs,
        admission: Admission::new(args.queue),
        stats,
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        model_id: model_id.clone(),
        device: device.clone(),
        created: http::unix_seconds(),
        tokenizer,
        template,
        capacity,
        vocab: manifest.vocab_size,
        eos_token_ids: manifest.generation.eos_token_ids.clone(),
        queue: args.queue,
        next_id: Default::default(),
    });
    let address = SocketAddr::new(args.host, args.port);
    let listener = std::net::TcpListener::bind(address)
        .map_err(|e| format!("cannot listen on {address}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot listen on {address}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    if !args.host.is_loopback() && app.api_key.is_none() {
        crate::note!(
            "kiln-run serve: warning: listening on {} without --api-key: anyone who can reach \
             this machine can use the model",
            args.host
        );
    }
    crate::note!(
        "kiln-run serve: {model_id} on {device}, {capacity} KV positions, up to {} waiting",
        args.queue
    );
    crate::note!("kiln-run serve: listening on http://{bound} (OpenAI base URL http://{bound}/v1)");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| format!("cannot start the HTTP runtime: {e}"))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| format!("cannot listen on {bound}: {e}"))?;
        axum::serve(listener, http::router(app))
            .await
            .map_err(|e| format!("the server stopped: {e}"))
    })
}
