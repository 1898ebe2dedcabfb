//! Choosing the next token from logits: greedy, or sampled with Hugging
//! Face's processors in their order — repetition penalty, temperature,
//! top-k, top-p — from a seeded generator, so a seed reproduces a run.
//! OpenAI's frequency and presence penalties come first when set.

/// How to pick tokens. The default is greedy.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// 0 picks the most likely token (greedy); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: all).
    pub top_p: f32,
    /// > 1 discourages tokens already in the conversation (1: off).
    pub repetition_penalty: f32,
    /// OpenAI's `frequency_penalty`: subtracted from a token's logit once per
    /// time it has been generated so far (0: off).
    pub frequency_penalty: f32,
    /// OpenAI's `presence_penalty`: subtracted once from every token
    /// generated so far (0: off).
    pub presence_penalty: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Sampling {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
        }
    }
}

impl Sampling {
    /// A description of what is wrong with the settings, if anything.
    pub fn check(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "--temperature must be 0 or positive, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("--top-p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "--repetition-penalty must be positive, got {}",
                self.repetition_penalty
            ));
        }
        for (name, value) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            // OpenAI's documented range.
            if !(-2.0..=2.0).contains(&value) {
                return Err(format!("{name} must be between -2 and 2, got {value}"));
            }
        }
        Ok(())
    }
}

/// The index of the largest logit; the first one on ties (as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

pub struct Sampler {
    settings: Sampling,
    state: u64,
    /// How often each token has been picked, for the OpenAI penalties.
    picked: std::collections::HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(settings: Sampling) -> Sampler {
        // splitmix64 of the seed, so nearby seeds start far apart.
        let mut state = settings.seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        state = (state ^ (state >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        state = (state ^ (state >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Sampler {
            settings,
            state: state ^ (state >> 31),
            picked: Default::default(),
        }
    }

    /// A uniform number in [0, 1) (xorshift64*).
    fn uniform(&mut self) -> f64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        let x = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Picks the next token. `history` is every token so far (prompt included).
    pub fn pick(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let token = self.choose(logits, history);
        *self.picked.entry(token).or_default() += 1;
        token
    }

    fn choose(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let s = &self.settings;
        let mut scores = logits.to_vec();
        if s.frequency_penalty != 0.0 || s.presence_penalty != 0.0 {
            // OpenAI counts the tokens sampled so far, not the prompt's.
            for (&token, &count) in &self.picked {
                if let Some(score) = scores.get_mut(token as usize) {
                    *score -= count as f32 * s.frequency_penalty + s.presence_penalty;
                }
            }
        }
        if s.repetition_penalty != 1.0 {
            let mut seen = vec![false; scores.len()];
            for &t in history {
                if let Some(flag) = seen.get_mut(t as usize) {
                    *flag = true;
                }
            }
            for (score, _) in scores.iter_mut().zip(&seen).filter(|(_, &seen)| seen) {
                *score = if *score > 0.0 {
                    *score / s.repetition_penalty
                } else {
                    *score * s.repetition_penalty
                };
            }
        }
        if s.temperature == 0.0 {
            return argmax(&scores);
        }
        // Candidates, most likely first (index order on ties, like argmax).
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        if s.top_k > 0 {
            order.truncate(s.top_k);
        }
        let max = scores[order[0]] as f64;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((scores[i] as f64 - max) / s.temperature as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if s.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|&p| {
                    cumulative += p;
                    cumulative >= s.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            order.truncate(keep);
            let kept: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= kept);
        }
        let mut r = self.uniform();
        for (&token, &p) in order.iter().zip(&probs) {
            if r < p {
                return token as u32;
            }
            r -= p;
        }
        *order.last().expect("at least one candidate") as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> Sampling {
        Sampling {
            temperature,
            top_k,
            top_p,
            seed,
            ..Sampling::default()
        }
    }

    #[test]
    fn greedy_and_top_1_pick_the_argmax() {
        let logits = [0.1, 2.0, 1.9, -1.0];
        assert_eq!(Sampler::new(Sampling::default()).pick(&logits, &[]), 1);
        let mut s = Sampler::new(sampling(5.0, 1, 1.0, 7));
        assert!((0..100).all(|_| s.pick(&logits, &[]) == 1));
        // A tiny nucleus holds only the top token.
        let mut s = Sampler::new(sampling(1.0, 0, 0.01, 7));
        assert!((0..100).all(|_| s.pick(&logits, &[]) == 1));
    }

    #[test]
    fn a_seed_reproduces_a_run_and_sampling_follows_the_distribution() {
        let logits = [0.0f32, 1.0f32.ln(), 3.0f32.ln()]; // probabilities 1:1:3
        let run = |seed| {
            let mut s = Sampler::new(sampling(1.0, 0, 1.0, seed));
            (0..5000).map(|_| s.pick(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
        let picks = run(1);
        let share = picks.iter().filter(|&&t| t == 2).count() as f64 / picks.len() as f64;
        assert!(
            (share - 0.6).abs() < 0.03,
            "token 2 drawn {share:.3} of the time, expected 0.6"
        );
        // top-k 2 never draws the least likely token... of the top two.
        let mut s = Sampler::new(sampling(1.0, 2, 1.0, 3));
        assert!((0..1000).all(|_| s.pick(&[5.0, 4.0, 1.0], &[]) != 2));
    }

    #[test]
    fn repetition_penalty_follows_transformers() {
        // Positive logits are divided, negative ones multiplied.
        let s = Sampling {
            repetition_penalty: 2.0,
            ..Sampling::default()
        };
        assert_eq!(Sampler::new(s.clone()).pick(&[3.0, 2.0, -1.0], &[0]), 1);
        assert_eq!(Sampler::new(s).pick(&[-0.5, -0.8, -3.0], &[0]), 1);
    }

    #[test]
    fn openai_penalties_count_generated_tokens_only() {
        let s = Sampling {
            frequency_penalty: 1.0,
            ..Sampling::default()
        };
        let mut sampler = Sampler::new(s);
        // The prompt (history) holds token 0 often: no penalty for it yet.
        assert_eq!(sampler.pick(&[2.0, 1.5, 0.0], &[0, 0, 0]), 0);
        // Once generated, token 0 loses 1.0 and token 1 wins.
        assert_eq!(sampler.pick(&[2.0, 1.5, 0.0], &[0]), 1);
        // Each has been picked once now: both lose 1.0, 0 leads again.
        assert_eq!(sampler.pick(&[2.0, 1.5, 0.0], &[0]), 0);
        let mut sampler = Sampler::new(Sampling {
            presence_penalty: 0.4,
            ..Sampling::default()
        });
        assert_eq!(sampler.pick(&[2.0, 1.5], &[]), 0);
        // Presence costs the same however often a token came: 1.6 > 1.5, then 1.6 > 1.5 again.
        assert_eq!(sampler.pick(&[2.0, 1.5], &[]), 0);
        assert_eq!(sampler.pick(&[2.0, 1.5], &[]), 0);
        assert!(Sampling {
            presence_penalty: 2.5,
            ..Sampling::default()
        }
        .check()
        .unwrap_err()
        .contains("presence_penalty"));
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn bad_settings_are_explained() {
        assert!(sampling(-1.0, 0, 1.0, 0)
            .check()
            .unwrap_err()
            .contains("--temperature"));
        assert!(sampling(1.0, 0, 0.0, 0)
            .check()
            .unwrap_err()
            .contains("--top-p"));
    }
}
