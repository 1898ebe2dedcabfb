//! The generation loop shared by every backend: prefill the prompt, then
//! pick and feed back one token at a time until a stop condition.

pub mod chat;
pub mod pyjson;
pub mod run;
pub mod sampling;
pub mod tokenizer;

use crate::engine::{Engine, SessionError};
pub use sampling::argmax;
use sampling::{Sampler, Sampling};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct GenerationOptions {
    pub max_new_tokens: usize,
    /// Generation stops after producing one of these (it is included in the output).
    pub eos_token_ids: Vec<u32>,
    /// Keep every step's logits in the report (for `--save-logits`).
    pub record_logits: bool,
    /// Greedy unless set otherwise.
    pub sampling: Sampling,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    MaxNewTokens,
    EndOfSequence,
    /// The KV cache is full; more tokens need a model compiled with a larger cache.
    ContextFull,
    /// The caller stopped it after a token (a stop string, a client gone).
    Stopped,
}

pub struct GenerationReport {
    pub tokens: Vec<u32>,
    /// Row `i` holds the logits token `i` was chosen from (if recorded).
    pub logits: Vec<Vec<f32>>,
    pub prompt_tokens: usize,
    /// Leading prompt tokens whose KV rows the engine already held, so the
    /// prefill skipped them.
    pub cached_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    pub stop: StopReason,
}

impl GenerationReport {
    /// Prompt tokens the prefill computed.
    pub fn prefilled_tokens(&self) -> usize {
        self.prompt_tokens - self.cached_tokens
    }

    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prefilled_tokens() as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    /// Decode steps are the tokens after the first (which comes from the prefill).
    pub fn decode_tokens_per_second(&self) -> Option<f64> {
        let steps = self.tokens.len().saturating_sub(1);
        (steps > 0).then(|| steps as f64 / self.decode_time.as_secs_f64().max(1e-9))
    }
}

/// Generation after `prompt`, from the engine's current position. `on_token`
/// sees each token as soon as it is chosen, and may stop the generation.
pub fn generate(
    engine: &mut dyn Engine,
    prompt: &[u32],
    options: &GenerationOptions,
    on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<GenerationReport, SessionError> {
    generate_reusing(engine, prompt, 0, options, on_token)
}

/// [`generate`] for an engine that already holds the KV rows of the first
/// `cached` prompt tokens (its position is `cached`): only the rest is
/// prefilled. `cached` must leave at least one prompt token to run, the one
/// whose logits give the first new token.
pub fn generate_reusing(
    engine: &mut dyn Engine,
    prompt: &[u32],
    cached: usize,
    options: &GenerationOptions,
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<GenerationReport, SessionError> {
    debug_assert!(cached < prompt.len().max(1));
    debug_assert!(cached == 0 || engine.position() == cached);
    let start = Instant::now();
    let mut logits = engine.forward(&prompt[cached.min(prompt.len())..])?;
    let prefill_time = start.elapsed();
    let decode_start = Instant::now();
    let mut report = GenerationReport {
        tokens: Vec::new(),
        logits: Vec::new(),
        prompt_tokens: prompt.len(),
        cached_tokens: cached,
        prefill_time,
        decode_time: Duration::ZERO,
        stop: StopReason::MaxNewTokens,
    };
    let mut sampler = Sampler::new(options.sampling.clone());
    let mut history = prompt.to_vec();
    while report.tokens.len() < options.max_new_tokens {
        let token = sampler.pick(&logits, &history);
        history.push(token);
        if options.record_logits {
            report.logits.push(std::mem::take(&mut logits));
        }
        report.tokens.push(token);
        if on_token(token).is_break() {
            report.stop = StopReason::Stopped;
            break;
        }
        if options.eos_token_ids.contains(&token) {
            report.stop = StopReason::EndOfSequence;
            break;
        }
        if report.tokens.len() == options.max_new_tokens {
            break;
        }
        if engine.position() >= engine.capacity() {
            report.stop = StopReason::ContextFull;
            break;
        }
        logits = engine.forward(&[token])?;
    }
    report.decode_time = decode_start.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An engine whose next token is always (last token + 1) mod 5.
    struct Counter {
        position: usize,
        capacity: usize,
    }

    impl Engine for Counter {
        fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, SessionError> {
            self.position += tokens.len();
            let mut logits = vec![0.0; 5];
            logits[(*tokens.last().unwrap() as usize + 1) % 5] = 1.0;
            Ok(logits)
        }
        fn position(&self) -> usize {
            self.position
        }
        fn capacity(&self) -> usize {
            self.capacity
        }
        fn truncate(&mut self, len: usize) {
            self.position = self.position.min(len);
        }
        fn device(&self) -> String {
            "test counter".into()
        }
    }

    fn options(max_new_tokens: usize, eos: &[u32]) -> GenerationOptions {
        GenerationOptions {
            max_new_tokens,
            eos_token_ids: eos.to_vec(),
            record_logits: true,
            sampling: Sampling::default(),
        }
    }

    #[test]
    fn stops_at_eos_max_tokens_or_a_full_cache() {
        let mut e = Counter {
            position: 0,
            capacity: 100,
        };
        let go_on = |_| ControlFlow::Continue(());
        let r = generate(&mut e, &[0], &options(3, &[]), go_on).unwrap();
        assert_eq!(
            (r.tokens, r.stop),
            (vec![1, 2, 3], StopReason::MaxNewTokens)
        );
        assert_eq!(r.logits.len(), 3);
        let mut e = Counter {
            position: 0,
            capacity: 100,
        };
        let r = generate(&mut e, &[0], &options(10, &[2]), go_on).unwrap();
        assert_eq!((r.tokens, r.stop), (vec![1, 2], StopReason::EndOfSequence));
        let mut e = Counter {
            position: 0,
            capacity: 3,
        };
        let r = generate(&mut e, &[0, 0], &options(10, &[]), go_on).unwrap();
        assert_eq!((r.tokens, r.stop), (vec![1, 2], StopReason::ContextFull));
        // The caller stops it after the token it saw.
        let mut e = Counter {
            position: 0,
            capacity: 100,
        };
        let until_3 = |t| {
            if t == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let r = generate(&mut e, &[0], &options(10, &[]), until_3).unwrap();
        assert_eq!((r.tokens, r.stop), (vec![1, 2, 3], StopReason::Stopped));
    }

    #[test]
    fn a_cached_prefix_is_not_prefilled_again() {
        let mut e = Counter {
            position: 0,
            capacity: 100,
        };
        e.forward(&[0, 1, 2]).unwrap();
        e.truncate(2);
        let go_on = |_| ControlFlow::Continue(());
        let r = generate_reusing(&mut e, &[0, 1, 4], 2, &options(1, &[]), go_on).unwrap();
        // Only token 4 ran: position 3, and the next token follows it.
        assert_eq!((e.position, &r.tokens[..]), (3, &[0][..]));
        assert_eq!(
            (r.prompt_tokens, r.cached_tokens, r.prefilled_tokens()),
            (3, 2, 1)
        );
    }
}
