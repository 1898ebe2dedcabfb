//! `kiln-run serve` end to end, as clients use it: the official `openai`
//! Python client and raw HTTP against a server on 127.0.0.1, on a fixture
//! compiled by `kiln compile`. What the server returns is checked against
//! what `kiln-run generate` prints for the same prompt; the KV reuse is
//! checked through the server's own counters (`GET /health`), never timed.

mod common;

use common::{compile_fixture, golden, join_ids, python, repo_root, stderr, stdout};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const API_KEY: &str = "kiln-test-key";
/// A ChatML template (the layout Qwen and SmolLM2 use), for a fixture that
/// ships none.
const CHAT_TEMPLATE: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n\
{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// `kiln-run`, built beside `kiln` by the workspace's test run.
fn kiln_run() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_kiln")).with_file_name("kiln-run");
    assert!(
        path.is_file(),
        "{} is missing: run the workspace's tests (`cargo test --workspace`), which build it, \
         or `cargo build -p kiln-runtime --bin kiln-run` first",
        path.display()
    );
    path
}

fn run_kiln_run(args: &[&str]) -> std::process::Output {
    Command::new(kiln_run())
        .args(args)
        .output()
        .expect("kiln-run runs")
}

/// The qwen3 fixture compiled into `dir`, with a chat template; `max_len`
/// raises the KV cache (and the config's position limit, which the random
/// fixture's RoPE does not depend on).
fn compiled(tmp: &Path, name: &str, max_len: Option<usize>) -> PathBuf {
    let out = tmp.join(name);
    match max_len {
        None => {
            compile_fixture("qwen3", &out, &[]);
        }
        Some(len) => {
            let source = tmp.join(format!("{name}-source"));
            std::fs::create_dir_all(&source).unwrap();
            for entry in std::fs::read_dir(common::model_dir("qwen3")).unwrap() {
                let path = entry.unwrap().path();
                std::fs::copy(&path, source.join(path.file_name().unwrap())).unwrap();
            }
            let config_path = source.join("config.json");
            let mut config: Value =
                serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
            config["max_position_embeddings"] = json!(len);
            std::fs::write(&config_path, config.to_string()).unwrap();
            let len = len.to_string();
            let o = common::kiln(&[
                "compile",
                source.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--no-atc",
                "--max-seq-len",
                &len,
            ]);
            assert!(o.status.success(), "{}", stderr(&o));
        }
    }
    std::fs::write(out.join("chat_template.jinja"), CHAT_TEMPLATE).unwrap();
    out
}

struct Server {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let log = model.with_extension(format!("serve-{}.log", extra.len()));
        let child = Command::new(kiln_run())
            .args(["serve", model.to_str().unwrap(), "--port", "0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("kiln-run serve starts");
        let mut server = Server {
            child,
            port: 0,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        let marker = "listening on http://127.0.0.1:";
        loop {
            let text = server.log_text();
            if let Some(at) = text.find(marker) {
                let digits: String = text[at + marker.len()..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                server.port = digits.parse().unwrap();
                return server;
            }
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("kiln-run serve exited ({status}):\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "the server did not start:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn health(&self) -> Value {
        let reply = http(self.port, "GET", "/health", &[], b"");
        assert_eq!(reply.status, 200, "{}", reply.body);
        serde_json::from_str(&reply.body).unwrap()
    }

    fn stat(&self, name: &str) -> u64 {
        self.health()["stats"][name].as_u64().unwrap()
    }

    /// A POST with the test key; the reply's JSON.
    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let reply = http(
            self.port,
            "POST",
            path,
            &[auth()],
            body.to_string().as_bytes(),
        );
        let json = serde_json::from_str(&reply.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", reply.body));
        (reply.status, json)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn auth() -> (&'static str, String) {
    ("Authorization", format!("Bearer {API_KEY}"))
}

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

/// One HTTP/1.1 exchange over a fresh connection.
fn http(port: u16, method: &str, path: &str, headers: &[(&str, String)], body: &[u8]) -> Reply {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head += &format!("{name}: {value}\r\n");
    }
    head += "\r\n";
    stream.write_all(head.as_bytes()).unwrap();
    // The server may answer (413) before reading all of a large body.
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP reply: {text:?}"));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let headers = head.to_ascii_lowercase();
    let body = if headers.contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        out += &rest[..size];
        body = &rest[size + 2..];
    }
    out
}

/// The `data:` payloads of a server-sent event stream.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// What `kiln-run generate` prints (text, without the closing newline) and
/// its prompt's token count.
fn generated(model: &Path, args: &[&str]) -> (String, usize) {
    let mut all = vec!["generate", model.to_str().unwrap()];
    all.extend_from_slice(args);
    let o = run_kiln_run(&all);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let prompt_tokens = err
        .lines()
        .find_map(|l| l.strip_prefix("prefill: "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no prefill line:\n{err}"));
    let text = stdout(&o);
    (
        text.strip_suffix('\n').unwrap_or(&text).to_string(),
        prompt_tokens,
    )
}

fn usage(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

#[test]
fn openai_client_raw_http_kv_reuse_bad_requests_and_bench() {
    let tmp = tempfile::tempdir().unwrap();
    let model = compiled(tmp.path(), "qwen3", None);
    let server = Server::start(&model, &["--api-key", API_KEY, "--queue", "8"]);
    let prompt = "Tell me about kilns.";
    let max_tokens = 12;

    // The official client: the same text as `kiln-run generate --chat`,
    // streamed or not, with the right usage.
    let (expected, prompt_tokens) = generated(
        &model,
        &["--chat", "--prompt", prompt, "--max-new-tokens", "12"],
    );
    let o = Command::new(python())
        .arg(repo_root().join("tests/serve_openai.py"))
        .args([
            &format!("http://127.0.0.1:{}/v1", server.port),
            API_KEY,
            prompt,
            &max_tokens.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "the openai client failed (is `openai` installed? pip install -r tests/requirements.txt):\n{}\nserver:\n{}",
        stderr(&o),
        server.log_text()
    );
    let got: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(got["model"], "qwen3");
    let whole = &got["whole"];
    assert_eq!(whole["text"], expected.as_str());
    let finish = whole["finish_reason"].as_str().unwrap();
    let completion_tokens = usage(&whole["usage"], "completion_tokens");
    // Greedy on a random fixture: either the length limit or its EOS.
    match finish {
        "length" => assert_eq!(completion_tokens, max_tokens),
        "stop" => assert!(completion_tokens <= max_tokens),
        other => panic!("finish_reason {other}"),
    }
    assert_eq!(
        usage(&whole["usage"], "prompt_tokens"),
        prompt_tokens as u64
    );
    assert_eq!(
        usage(&whole["usage"], "total_tokens"),
        prompt_tokens as u64 + completion_tokens
    );
    assert_eq!(whole["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let stream = &got["stream"];
    let streamed: String = stream["pieces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(streamed, expected);
    assert_eq!(stream["finish_reason"], finish);
    assert_eq!(stream["roles"], json!(["assistant"]));
    assert_eq!(
        usage(&stream["usage"], "completion_tokens"),
        completion_tokens
    );
    // The same prompt again: all of it cached but the last token.
    assert_eq!(
        stream["usage"]["prompt_tokens_details"]["cached_tokens"],
        prompt_tokens - 1
    );
    // A second turn quoting the reply starts with the first prompt.
    let second = &got["second_turn"]["usage"];
    assert!(
        usage(&second["prompt_tokens_details"], "cached_tokens") >= prompt_tokens as u64,
        "{second}"
    );
    // The same stream over raw HTTP: OpenAI's chunks, then `data: [DONE]`.
    let body = json!({
        "messages": [{ "role": "user", "content": prompt }],
        "temperature": 0, "max_tokens": max_tokens, "stream": true,
    });
    let reply = http(
        server.port,
        "POST",
        "/v1/chat/completions",
        &[auth()],
        body.to_string().as_bytes(),
    );
    assert!(
        reply.headers.contains("content-type: text/event-stream"),
        "{}",
        reply.headers
    );
    let events = sse_data(&reply.body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let raw_text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(raw_text, expected);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        finish
    );
    let (expected_completion, _) =
        generated(&model, &["--prompt", prompt, "--max-new-tokens", "12"]);
    assert_eq!(got["completion"]["text"], expected_completion.as_str());

    // Exact KV reuse, by token ids: the second request extends the first
    // conversation (its prompt and every generated token) by three tokens.
    let ids = golden("qwen3").prompt_ids;
    let o = run_kiln_run(&[
        "generate",
        model.to_str().unwrap(),
        "--token-ids",
        &join_ids(&ids),
        "--max-new-tokens",
        "6",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let generated_ids: Vec<u32> = stdout(&o)
        .trim()
        .split(',')
        .map(|t| t.parse().unwrap())
        .collect();
    let greedy = |prompt: &[u32], n: usize| json!({ "model": "qwen3", "prompt": prompt, "max_tokens": n, "temperature": 0 });
    let (status, _) = server.post("/v1/completions", &greedy(&ids, 6));
    assert_eq!(status, 200);
    let mut extended = ids.clone();
    extended.extend(&generated_ids);
    extended.extend([5, 6, 7]);
    let prefilled_before = server.stat("prompt_tokens_prefilled");
    let (status, reply) = server.post("/v1/completions", &greedy(&extended, 2));
    assert_eq!(status, 200, "{reply}");
    let first_conversation = (ids.len() + generated_ids.len()) as u64;
    assert_eq!(
        reply["usage"]["prompt_tokens_details"]["cached_tokens"],
        first_conversation
    );
    assert_eq!(server.stat("prompt_tokens_prefilled") - prefilled_before, 3);
    // A prompt that leaves the cached conversation early reuses only the shared part.
    let mut diverging = ids[..3].to_vec();
    diverging.push(9);
    let (_, reply) = server.post("/v1/completions", &greedy(&diverging, 1));
    assert_eq!(reply["usage"]["prompt_tokens_details"]["cached_tokens"], 3);

    // Stop strings cut the text where they start, finish_reason "stop".
    let cut: String = expected.chars().skip(2).take(2).collect();
    if !cut.is_empty() {
        let body = json!({
            "messages": [{ "role": "user", "content": prompt }],
            "temperature": 0, "max_tokens": 12, "stop": [cut],
        });
        let (status, reply) = server.post("/v1/chat/completions", &body);
        assert_eq!(status, 200);
        let before = &expected[..expected.find(&cut).unwrap()];
        assert_eq!(reply["choices"][0]["message"]["content"], before);
        assert_eq!(reply["choices"][0]["finish_reason"], "stop");
    }

    // 8 clients at once over raw HTTP: each gets the whole, right answer.
    let port = server.port;
    let clients: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                let body = json!({
                    "messages": [{ "role": "user", "content": format!("Client {i} asks.") }],
                    "temperature": 0, "max_tokens": 8,
                });
                let reply = http(
                    port,
                    "POST",
                    "/v1/chat/completions",
                    &[auth()],
                    body.to_string().as_bytes(),
                );
                (i, reply)
            })
        })
        .collect();
    for client in clients {
        let (i, reply) = client.join().unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
        let v: Value = serde_json::from_str(&reply.body).unwrap();
        let (alone, _) = generated(
            &model,
            &[
                "--chat",
                "--prompt",
                &format!("Client {i} asks."),
                "--max-new-tokens",
                "8",
            ],
        );
        assert_eq!(v["choices"][0]["message"]["content"], alone.as_str());
    }

    // Bad requests: each its 4xx in OpenAI's error shape, and the server goes on.
    let chat = |body: &[u8], key: &str| {
        http(
            port,
            "POST",
            "/v1/chat/completions",
            &[("Authorization", format!("Bearer {key}"))],
            body,
        )
    };
    let message = |content: &str| json!([{ "role": "user", "content": content }]);
    let huge = vec![b' '; 5 << 20];
    let cases: Vec<(&str, Reply, u16)> = vec![
        ("malformed JSON", chat(b"{\"messages\": [", API_KEY), 400),
        ("not an object", chat(b"[1, 2]", API_KEY), 400),
        ("over the size limit", chat(&huge, API_KEY), 413),
        ("empty messages", chat(br#"{"messages": []}"#, API_KEY), 400),
        (
            "unknown role",
            chat(
                br#"{"messages": [{"role": "wizard", "content": "x"}]}"#,
                API_KEY,
            ),
            400,
        ),
        (
            "wrong type",
            chat(
                json!({ "messages": message("x"), "temperature": "hot" })
                    .to_string()
                    .as_bytes(),
                API_KEY,
            ),
            400,
        ),
        (
            "max_tokens past the cache",
            chat(
                json!({ "messages": message("x"), "max_tokens": 100_000 })
                    .to_string()
                    .as_bytes(),
                API_KEY,
            ),
            400,
        ),
        (
            // The qwen3 fixture's template has no tools: they would be dropped.
            "tools the chat template does not read",
            chat(
                json!({ "messages": message("x"), "tools": [{
                    "type": "function", "function": {"name": "f", "parameters": {}}
                }] })
                .to_string()
                .as_bytes(),
                API_KEY,
            ),
            400,
        ),
        (
            "wrong API key",
            chat(
                json!({ "messages": message("x") }).to_string().as_bytes(),
                "wrong",
            ),
            401,
        ),
        (
            "no such endpoint",
            http(port, "GET", "/v2/nothing", &[], b""),
            404,
        ),
    ];
    for (what, reply, status) in cases {
        assert_eq!(reply.status, status, "{what}: {}", reply.body);
        assert!(
            reply.headers.contains("content-type: application/json"),
            "{what}"
        );
        let v: Value = serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: {v}"
        );
        assert!(v["error"]["type"].is_string(), "{what}: {v}");
        assert_eq!(server.health()["status"], "ok", "{what}");
    }
    let (_, v) = server.post(
        "/v1/chat/completions",
        &json!({ "messages": message("x"), "max_tokens": 100_000 }),
    );
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let models = http(port, "GET", "/v1/models", &[auth()], b"");
    assert_eq!(models.status, 200);

    // A bounded fuzz: mutated and random bodies never crash or hang the
    // server (each reply is a status below 500 and JSON).
    let valid = json!({
        "messages": [{ "role": "user", "content": "hi" }],
        "max_tokens": 2, "temperature": 0.7, "top_p": 0.9, "stop": ["\n"], "seed": 3,
    })
    .to_string()
    .into_bytes();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    const FUZZ_CASES: usize = 300;
    for case in 0..FUZZ_CASES {
        let mut body = valid.clone();
        match case % 3 {
            0 => {
                for _ in 0..1 + next() % 4 {
                    let at = (next() as usize) % body.len();
                    body[at] = next() as u8;
                }
            }
            1 => body.truncate((next() as usize) % body.len()),
            _ => body = (0..next() % 64).map(|_| next() as u8).collect(),
        }
        let reply = chat(&body, API_KEY);
        assert!(
            reply.status < 500,
            "case {case}: {} for {:?}: {}",
            reply.status,
            String::from_utf8_lossy(&body),
            reply.body
        );
        assert!(
            serde_json::from_str::<Value>(&reply.body).is_ok(),
            "case {case}: not JSON: {}",
            reply.body
        );
    }
    assert_eq!(server.health()["status"], "ok");
    assert!(
        !server.log_text().contains("panicked"),
        "{}",
        server.log_text()
    );

    // kiln-run bench: llama-bench's table, and JSON.
    let dir = model.to_str().unwrap();
    let o = run_kiln_run(&["bench", dir, "-p", "16", "-n", "8", "-r", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = stdout(&o);
    for row in ["| pp16 |", "| tg8 |", "| model | dtype | backend |"] {
        assert!(table.contains(row), "{row} missing:\n{table}");
    }
    let o = run_kiln_run(&["bench", dir, "-p", "16", "-n", "8", "-r", "2", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(report["backend"], "CPU");
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for r in results {
        let samples = r["samples_ts"].as_array().unwrap();
        assert_eq!(samples.len(), 2);
        assert!(samples.iter().all(|s| s.as_f64().unwrap() > 0.0), "{r}");
        assert!(r["avg_ts"].as_f64().unwrap() > 0.0);
    }
    assert!(results[0]["ttft_ms"].as_f64().unwrap() > 0.0);
    let o = run_kiln_run(&["bench", dir, "-p", "100000"]);
    common::assert_fails_with(&o, &["pp100000", "KV cache holds 256"]);
}

/// Reads from a streaming reply until its first `data:` event.
fn open_stream(port: u16, body: &Value) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let body = body.to_string();
    write!(
        stream,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("data: ") {
        let n = stream.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "the stream ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    stream
}

#[test]
fn a_full_queue_refuses_and_a_client_that_leaves_frees_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    // A long cache, so that the first request runs long enough to hold the
    // model while the others arrive; it is cancelled, never waited for.
    let model = compiled(tmp.path(), "qwen3-long", Some(4096));
    let server = Server::start(&model, &["--queue", "1"]);
    let port = server.port;
    let long = json!({
        "messages": [{ "role": "user", "content": "Go on and on." }],
        "temperature": 0, "max_tokens": 4000, "stream": true,
    });
    let holder = open_stream(port, &long);

    // One may wait behind it; the other seven are refused at once.
    let clients: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                let body = json!({
                    "messages": [{ "role": "user", "content": "Short one." }],
                    "temperature": 0, "max_tokens": 4,
                });
                http(
                    port,
                    "POST",
                    "/v1/chat/completions",
                    &[],
                    body.to_string().as_bytes(),
                )
            })
        })
        .collect();
    // The refusals come back while the long request still runs; the
    // waiting request cannot finish before the holder leaves.
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.stat("requests_refused_busy") < 7 {
        assert!(Instant::now() < deadline, "{}", server.health());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.stat("requests_finished"), 0);
    drop(holder);

    let replies: Vec<Reply> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let busy: Vec<&Reply> = replies.iter().filter(|r| r.status == 503).collect();
    let served: Vec<&Reply> = replies.iter().filter(|r| r.status == 200).collect();
    assert_eq!(
        (busy.len(), served.len()),
        (7, 1),
        "{:?}",
        replies.iter().map(|r| &r.body).collect::<Vec<_>>()
    );
    for reply in busy {
        assert!(reply.headers.contains("retry-after: "), "{}", reply.headers);
        let v: Value = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(v["error"]["code"], "server_busy");
    }
    let v: Value = serde_json::from_str(&served[0].body).unwrap();
    let (alone, _) = generated(
        &model,
        &["--chat", "--prompt", "Short one.", "--max-new-tokens", "4"],
    );
    assert_eq!(v["choices"][0]["message"]["content"], alone.as_str());
    // The long one was cancelled when its client left, not run to the end.
    assert_eq!(server.stat("requests_cancelled"), 1);
    assert_eq!(server.stat("requests_finished"), 1);
}

/// Tools on `qwen2-tool-caller` and `llama-tool-caller`
/// (tests/golden/make_tool_fixture.py), models made to answer every chat
/// with one call of `get_weather`, in the Hermes and the Llama 3 form:
/// requests with tools, assistant tool calls and tool results render to the
/// text and ids transformers' `apply_chat_template` made; through the
/// official client, the call comes back as OpenAI's `tool_calls`, whole and
/// streamed.
#[test]
fn tools_render_as_transformers_does_and_calls_come_back_as_tool_calls() {
    for fixture in ["qwen2-tool-caller", "llama-tool-caller"] {
        tool_calls_round_trip(fixture);
    }
}

fn tool_calls_round_trip(fixture: &str) {
    use kiln_runtime::generate::chat::ChatTemplate;
    use kiln_runtime::generate::tokenizer::Tokenizer;
    use kiln_runtime::serve::api::{self, ChatRequest};

    let golden_path = repo_root()
        .join("tests/fixtures/golden")
        .join(fixture)
        .join("golden.json");
    let g: Value = serde_json::from_str(&std::fs::read_to_string(&golden_path).unwrap()).unwrap();
    let source = common::model_dir(fixture);
    let template = ChatTemplate::from_dir(&source).unwrap().unwrap();
    let tokenizer = Tokenizer::from_file(&source.join("tokenizer.json")).unwrap();
    for (name, chat) in g["chats"].as_object().unwrap() {
        // The request as a client sends it: each call's arguments as JSON text.
        let mut body = json!({ "messages": chat["messages"], "tools": chat["tools"] });
        for message in body["messages"].as_array_mut().unwrap() {
            for call in message["tool_calls"].as_array_mut().into_iter().flatten() {
                let text = call["function"]["arguments"].to_string();
                call["function"]["arguments"] = json!(text);
            }
        }
        let request: ChatRequest = api::parse(body.to_string().as_bytes()).unwrap();
        let messages = api::chat_messages(&request.messages).unwrap();
        let text = template
            .render_with_tools(&messages, request.tools.as_deref(), true)
            .unwrap();
        assert_eq!(
            text,
            chat["text"].as_str().unwrap(),
            "{name}: rendered text"
        );
        let (ids, format) = api::chat_prompt(&request, &tokenizer, Some(&template)).unwrap();
        let expected: Vec<u32> = serde_json::from_value(chat["ids"].clone()).unwrap();
        assert_eq!(ids, expected, "{fixture} {name}: prompt ids");
        assert_eq!(
            format.is_some(),
            chat["tools"].is_array(),
            "{fixture} {name}"
        );
    }

    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join(fixture);
    compile_fixture(fixture, &model, &["--max-seq-len", "1536"]);
    let server = Server::start(&model, &[]);
    let o = Command::new(python())
        .arg(repo_root().join("tests/serve_tools.py"))
        .arg(format!("http://127.0.0.1:{}/v1", server.port))
        .arg(&golden_path)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "serve_tools.py failed on {fixture}:\n{}\nserver:\n{}",
        stderr(&o),
        server.log_text()
    );
    let got: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let chats = &g["chats"];
    let prompt_len = |chat: &str| chats[chat]["ids"].as_array().unwrap().len() as u64;
    let arguments = |v: &Value| -> Value { serde_json::from_str(v.as_str().unwrap()).unwrap() };

    let whole = &got["whole"];
    assert_eq!(whole["finish_reason"], "tool_calls", "{whole}");
    assert_eq!(whole["content"], Value::Null, "{whole}");
    let call = &whole["tool_calls"][0];
    assert_eq!(whole["tool_calls"].as_array().unwrap().len(), 1, "{whole}");
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], g["call"]["name"]);
    assert_eq!(
        arguments(&call["function"]["arguments"]),
        g["call"]["arguments"]
    );
    assert!(call["id"].as_str().is_some_and(|id| !id.is_empty()));
    assert_eq!(
        usage(&whole["usage"], "prompt_tokens"),
        prompt_len("question")
    );
    assert_eq!(
        usage(&whole["usage"], "completion_tokens"),
        g["generated_ids"].as_array().unwrap().len() as u64
    );

    let streamed = &got["stream"];
    assert_eq!(streamed["finish_reason"], "tool_calls", "{streamed}");
    assert_eq!(streamed["content"], "", "no call text leaks as content");
    let call = &streamed["calls"][0];
    assert_eq!(call["name"], g["call"]["name"]);
    assert_eq!(arguments(&call["arguments"]), g["call"]["arguments"]);

    let second = &got["second_turn"];
    assert_eq!(
        usage(&second["usage"], "prompt_tokens"),
        prompt_len("tool_result")
    );
    assert_eq!(
        second["tool_calls"][0]["function"]["name"],
        g["call"]["name"]
    );

    // tool_choice "none": the prompt holds no tools, the reply is text.
    let none = &got["tool_choice_none"];
    assert_eq!(none["tool_calls"], Value::Null, "{none}");
    assert_eq!(none["content"], g["generated_text"], "{none}");
    assert_eq!(none["finish_reason"], "stop");
    assert!(usage(&none["usage"], "prompt_tokens") < prompt_len("question"));
    let refused = got["tool_choice_required"].to_string();
    assert!(refused.contains("cannot force a call"), "{refused}");
}
