//! The model's thread: it owns the engine and the KV cache of the last
//! conversation, and runs the queued requests one at a time, in order.
//!
//! KV reuse: the worker remembers which tokens the cache holds. A request
//! whose prompt begins with them truncates the cache to the shared prefix
//! and prefills only the rest; the reply's last token is fed too once the
//! reply is out, so the next turn of a chat finds the whole conversation
//! cached.

use super::stop::StopStrings;
use crate::engine::{Engine, SessionError};
use crate::generate::tokenizer::{TextStream, Tokenizer};
use crate::generate::{generate_reusing, GenerationOptions, StopReason};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// One request, tokenized and checked, waiting for the model.
pub struct Job {
    pub prompt: Vec<u32>,
    pub options: GenerationOptions,
    pub stop: Vec<String>,
    /// Where the reply goes; closed when the client has gone.
    pub events: UnboundedSender<Event>,
    /// Holds the request's place in the queue until the job is dropped.
    pub ticket: Ticket,
}

/// What the worker tells a request's handler, in order: text pieces, then
/// one `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    Text(String),
    Done(Finished),
    Failed(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached, or the KV cache full.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Finished {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens found in the KV cache, not prefilled again.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

/// The server's counters, shown by `GET /health`: what the worker did, so
/// that clients (and tests) can see the KV reuse without timing anything.
#[derive(Default)]
pub struct Stats {
    pub requests_finished: AtomicU64,
    pub requests_failed: AtomicU64,
    /// Requests whose client left before or during generation.
    pub requests_cancelled: AtomicU64,
    pub requests_refused_busy: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub prompt_tokens_cached: AtomicU64,
    /// Prompt tokens the engine ran: the prompts minus their cached prefix.
    pub prompt_tokens_prefilled: AtomicU64,
    pub completion_tokens: AtomicU64,
    /// Positions of the KV cache the current conversation holds.
    pub kv_positions_held: AtomicUsize,
    /// Microseconds the model spent on requests, for the 503's Retry-After.
    pub busy_micros: AtomicU64,
}

impl Stats {
    pub fn to_json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "requests_finished": get(&self.requests_finished),
            "requests_failed": get(&self.requests_failed),
            "requests_cancelled": get(&self.requests_cancelled),
            "requests_refused_busy": get(&self.requests_refused_busy),
            "prompt_tokens": get(&self.prompt_tokens),
            "prompt_tokens_cached": get(&self.prompt_tokens_cached),
            "prompt_tokens_prefilled": get(&self.prompt_tokens_prefilled),
            "completion_tokens": get(&self.completion_tokens),
            "kv_positions_held": self.kv_positions_held.load(Ordering::Relaxed),
        })
    }

    /// Mean seconds per request so far (1 before the first).
    pub fn mean_request_seconds(&self) -> f64 {
        let done = self.requests_finished.load(Ordering::Relaxed);
        if done == 0 {
            return 1.0;
        }
        self.busy_micros.load(Ordering::Relaxed) as f64 / 1e6 / done as f64
    }
}

/// Admission to the model: at most one running request and `queue`
/// waiting; past that a request is refused (503) rather than left to wait
/// without bound.
pub struct Admission {
    in_system: Arc<AtomicUsize>,
    limit: usize,
}

/// A request's place; dropping it frees the place.
#[derive(Debug)]
pub struct Ticket(Arc<AtomicUsize>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    pub fn new(queue: usize) -> Admission {
        Admission {
            in_system: Arc::default(),
            limit: queue + 1,
        }
    }

    pub fn try_admit(&self) -> Option<Ticket> {
        self.in_system
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Ticket(self.in_system.clone()))
    }

    /// Requests running or waiting.
    pub fn in_system(&self) -> usize {
        self.in_system.load(Ordering::Acquire)
    }
}

/// The worker's state between requests.
pub struct Worker {
    engine: Box<dyn Engine>,
    tokenizer: Arc<Tokenizer>,
    /// The tokens whose KV rows the engine holds, in order.
    cached: Vec<u32>,
    stats: Arc<Stats>,
}

impl Worker {
    pub fn new(engine: Box<dyn Engine>, tokenizer: Arc<Tokenizer>, stats: Arc<Stats>) -> Worker {
        Worker {
            engine,
            tokenizer,
            cached: Vec::new(),
            stats,
        }
    }

    /// Runs jobs until every sender is gone.
    pub fn serve(mut self, jobs: Receiver<Job>) {
        for job in jobs {
            if job.events.is_closed() {
                self.stats
                    .requests_cancelled
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let start = Instant::now();
            self.run(job);
            let micros = start.elapsed().as_micros() as u64;
            self.stats.busy_micros.fetch_add(micros, Ordering::Relaxed);
        }
    }

    /// The prompt tokens the cache already holds: the shared prefix, less
    /// the last prompt token, whose logits must be computed afresh.
    fn reusable(&self, prompt: &[u32]) -> usize {
        let shared = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        shared.min(prompt.len().saturating_sub(1))
    }

    fn run(&mut self, job: Job) {
        let reuse = self.reusable(&job.prompt);
        self.engine.truncate(reuse);
        self.cached.truncate(reuse);
        let tokenizer = self.tokenizer.clone();
        let mut text = TextStream::new(&tokenizer);
        let mut stops = StopStrings::new(job.stop.clone());
        let mut stopped_by_string = false;
        let mut client_gone = false;
        let mut decode_error = None;
        let send = |piece: String| piece.is_empty() || job.events.send(Event::Text(piece)).is_ok();
        let result = generate_reusing(
            self.engine.as_mut(),
            &job.prompt,
            reuse,
            &job.options,
            |token| {
                if job.events.is_closed() {
                    client_gone = true;
                    return ControlFlow::Break(());
                }
                let piece = match text.push(token) {
                    Ok(piece) => piece,
                    Err(e) => {
                        decode_error = Some(e.to_string());
                        return ControlFlow::Break(());
                    }
                };
                let released = stops.push(&piece);
                if !send(released.text) {
                    client_gone = true;
                    return ControlFlow::Break(());
                }
                if released.stopped {
                    stopped_by_string = true;
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            },
        );
        let report = match (result, decode_error) {
            (Ok(report), None) => report,
            (Err(e), _) => return self.fail(&job, &e),
            (Ok(_), Some(message)) => return self.fail_with(&job, message),
        };
        // The engine holds the prompt and every new token but the last.
        self.cached.extend_from_slice(&job.prompt[reuse..]);
        if let Some((_, fed)) = report.tokens.split_last() {
            self.cached.extend_from_slice(fed);
        }
        let stats = &self.stats;
        if client_gone {
            stats.requests_cancelled.fetch_add(1, Ordering::Relaxed);
            self.note_cache();
            return;
        }
        if !stopped_by_string {
            let rest = text.finish().unwrap_or_default();
            let mut tail = stops.push(&rest);
            if !tail.stopped {
                tail.text.push_str(&stops.finish());
            }
            stopped_by_string = tail.stopped;
            send(tail.text);
        }
        let reason = match report.stop {
            StopReason::EndOfSequence | StopReason::Stopped => FinishReason::Stop,
            StopReason::MaxNewTokens | StopReason::ContextFull if stopped_by_string => {
                FinishReason::Stop
            }
            StopReason::MaxNewTokens | StopReason::ContextFull => FinishReason::Length,
        };
        let finished = Finished {
            reason,
            prompt_tokens: report.prompt_tokens,
            cached_tokens: report.cached_tokens,
            completion_tokens: report.tokens.len(),
        };
        stats.requests_finished.fetch_add(1, Ordering::Relaxed);
        stats
            .prompt_tokens
            .fetch_add(report.prompt_tokens as u64, Ordering::Relaxed);
        stats
            .prompt_tokens_cached
            .fetch_add(report.cached_tokens as u64, Ordering::Relaxed);
        stats
            .prompt_tokens_prefilled
            .fetch_add(report.prefilled_tokens() as u64, Ordering::Relaxed);
        stats
            .completion_tokens
            .fetch_add(report.tokens.len() as u64, Ordering::Relaxed);
        let _ = job.events.send(Event::Done(finished));
        crate::note!(
            "kiln-run serve: {} prompt tokens ({} cached), {} new, {} ({:.0} ms)",
            finished.prompt_tokens,
            finished.cached_tokens,
            finished.completion_tokens,
            finished.reason.as_str(),
            (report.prefill_time + report.decode_time).as_secs_f64() * 1e3
        );
        // The reply is out: now feed its last token, so that a next turn
        // quoting this reply finds it cached.
        if let Some(&last) = report.tokens.last() {
            if self.engine.position() < self.engine.capacity() {
                match self.engine.forward(&[last]) {
                    Ok(_) => self.cached.push(last),
                    Err(_) => self.forget(),
                }
            }
        }
        self.note_cache();
    }

    fn fail(&mut self, job: &Job, error: &SessionError) {
        self.fail_with(job, error.to_string());
    }

    fn fail_with(&mut self, job: &Job, message: String) {
        crate::note!("kiln-run serve: a request failed: {message}");
        self.stats.requests_failed.fetch_add(1, Ordering::Relaxed);
        let _ = job.events.send(Event::Failed(message));
        // What the cache holds is unknown after a failure.
        self.forget();
        self.note_cache();
    }

    fn forget(&mut self) {
        self.engine.reset();
        self.cached.clear();
    }

    fn note_cache(&self) {
        self.stats
            .kv_positions_held
            .store(self.cached.len(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_holds_one_running_and_the_queue() {
        let admission = Admission::new(1);
        let first = admission.try_admit().unwrap();
        let second = admission.try_admit().unwrap();
        assert!(admission.try_admit().is_none());
        drop(first);
        assert_eq!(admission.in_system(), 1);
        let third = admission.try_admit().unwrap();
        drop((second, third));
        assert_eq!(admission.in_system(), 0);
    }
}
