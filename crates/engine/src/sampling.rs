//! Turning logits into the next token: greedy, temperature, top-k, top-p, min-p, repetition
//! penalty, with a per-request seed so that the same seed gives the same output.

use rand::distr::{weighted::WeightedIndex, Distribution};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// In (0, 1]; 1 means no nucleus cut.
    pub top_p: f32,
    /// In [0, 1); tokens below `min_p` times the top probability are dropped.
    pub min_p: f32,
    /// 1 means none; > 1 discourages tokens already in the prompt or output.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Checks every value, with a message naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidRequest(m.to_string()));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("`temperature` must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("`top_p` must be in (0, 1]");
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return bad("`min_p` must be in [0, 1)");
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad("`repetition_penalty` must be a finite number > 0");
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch of (token, probability) pairs, reused between steps.
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Self {
            rng: StdRng::seed_from_u64(params.seed),
            params,
            candidates: Vec::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits`; `history` is the prompt and output so far (for the
    /// repetition penalty). `logits` is modified in place.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = std::collections::HashSet::with_capacity(history.len());
            for &t in history {
                if seen.insert(t) {
                    if let Some(l) = logits.get_mut(t as usize) {
                        *l = if *l > 0.0 {
                            *l / p.repetition_penalty
                        } else {
                            *l * p.repetition_penalty
                        };
                    }
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / p.temperature;
        let max = crate::simd::max(logits);
        // Logits become weights (unnormalized probabilities) in place, in vector registers:
        // over a 50k vocabulary the exponentials were most of a sequence's sampling time.
        let total = crate::simd::exp_sum(logits, max, inv_t);
        let weights = &*logits;
        if p.top_k == 0 && p.min_p == 0.0 && p.top_p >= 1.0 {
            // No cut: draw straight from the whole distribution, without building pairs.
            let mut u = self.rng.random::<f32>() * total;
            for (i, &w) in weights.iter().enumerate() {
                if u < w && w > 0.0 {
                    return i as u32;
                }
                u -= w;
            }
            // Rounding left u past the end: the last token with any weight.
            return weights.iter().rposition(|&w| w > 0.0).unwrap_or(0) as u32;
        }
        // Tokens below `floor` hold less than 1 - top_p of the mass together, so the smallest
        // head that reaches top_p is made of the others alone. Without top-k or min-p the
        // floor is known before any pair is built, and most of the vocabulary is below it.
        let only_top_p = p.top_k == 0 && p.min_p == 0.0;
        let floor = |total: f32, n: usize| (1.0 - p.top_p) * total / n as f32;
        let pre = if only_top_p {
            floor(total, weights.len())
        } else {
            0.0
        };
        self.candidates.clear();
        self.candidates.extend(
            weights
                .iter()
                .enumerate()
                .filter(|(_, &w)| w >= pre)
                .map(|(i, &w)| (i as u32, w)),
        );
        let c = &mut self.candidates;
        let by_prob = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_prob);
            c.truncate(p.top_k);
        }
        // Sorting the whole vocabulary costs milliseconds a token, more than a batched
        // forward pass's share: sort only when a cut needs the order, and only the tokens
        // that can be inside the cut.
        if p.min_p > 0.0 {
            // The largest weight is exp(0) = 1 (or the top-k's largest, which is the same).
            c.retain(|x| x.1 >= p.min_p);
        }
        if p.top_p < 1.0 {
            let total = if only_top_p {
                total
            } else {
                let total: f32 = c.iter().map(|x| x.1).sum();
                let f = floor(total, c.len());
                c.retain(|x| x.1 >= f);
                total
            };
            c.sort_unstable_by(by_prob);
            let mut acc = 0.0;
            let mut keep = c.len();
            for (i, x) in c.iter().enumerate() {
                acc += x.1 / total;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
        }
        if c.is_empty() {
            return argmax(logits);
        }
        match WeightedIndex::new(c.iter().map(|x| x.1)) {
            Ok(dist) => c[dist.sample(&mut self.rng)].0,
            Err(_) => c[0].0,
        }
    }
}

pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, 2.9]
    }

    #[test]
    fn greedy_takes_the_maximum() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&mut logits(), &[]), 1);
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.sample(&mut logits(), &[1]), 4);
    }

    #[test]
    fn top_k_one_is_greedy_whatever_the_temperature() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 5.0,
            top_k: 1,
            seed: 7,
            ..Default::default()
        })
        .unwrap();
        for _ in 0..20 {
            assert_eq!(s.sample(&mut logits(), &[]), 1);
        }
    }

    /// The nucleus, found the slow way: every token sorted by probability.
    fn reference_nucleus(logits: &[f32], temperature: f32, top_p: f32) -> Vec<u32> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut w: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / temperature).exp()))
            .collect();
        w.sort_by(|a, b| b.1.total_cmp(&a.1));
        let total: f32 = w.iter().map(|x| x.1).sum();
        let mut acc = 0.0;
        let keep = w
            .iter()
            .position(|x| {
                acc += x.1 / total;
                acc >= top_p
            })
            .map_or(w.len(), |i| i + 1);
        w[..keep].iter().map(|x| x.0).collect()
    }

    #[test]
    fn a_vocabulary_sized_nucleus_matches_the_full_sort() {
        // A peaked head and a long flat tail, as a language model's logits look.
        let mut x: u64 = 7;
        let logits: Vec<f32> = (0..50_000)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let noise = (x >> 40) as f32 / (1u64 << 24) as f32;
                if i % 997 == 0 {
                    8.0 + 4.0 * noise
                } else {
                    4.0 * noise
                }
            })
            .collect();
        for top_p in [0.5, 0.9, 0.99] {
            let nucleus = reference_nucleus(&logits, 0.7, top_p);
            let mut s = Sampler::new(SamplingParams {
                temperature: 0.7,
                top_p,
                ..Default::default()
            })
            .unwrap();
            let mut seen = std::collections::HashSet::new();
            for _ in 0..200 {
                let t = s.sample(&mut logits.clone(), &[]);
                assert!(
                    nucleus.contains(&t),
                    "top_p {top_p}: {t} is outside the nucleus"
                );
                seen.insert(t);
            }
            assert!(seen.len() > 1, "top_p {top_p}: one token only");
        }
        // Without a cut every token can come up; the draw follows the weights.
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.7,
            ..Default::default()
        })
        .unwrap();
        let heads = (0..500)
            .filter(|_| s.sample(&mut logits.clone(), &[]).is_multiple_of(997))
            .count();
        let expected = {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let w: Vec<f32> = logits.iter().map(|&l| ((l - max) / 0.7).exp()).collect();
            let head: f32 = w.iter().step_by(997).sum();
            head / w.iter().sum::<f32>()
        };
        let share = heads as f32 / 500.0;
        assert!(
            (share - expected).abs() < 0.08,
            "{share} against {expected}"
        );
    }

    #[test]
    fn top_p_and_min_p_keep_only_the_head() {
        for params in [
            SamplingParams {
                temperature: 1.0,
                top_p: 0.5,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                min_p: 0.8,
                ..Default::default()
            },
        ] {
            let mut s = Sampler::new(params).unwrap();
            for _ in 0..50 {
                let t = s.sample(&mut logits(), &[]);
                assert!(t == 1 || t == 4, "sampled {t}");
            }
        }
    }

    #[test]
    fn same_seed_same_tokens_other_seed_differs() {
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.5,
                seed,
                ..Default::default()
            })
            .unwrap();
            (0..64)
                .map(|_| s.sample(&mut logits(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn invalid_values_name_the_field() {
        for (p, field) in [
            (
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    temperature: -1.0,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    min_p: 1.0,
                    ..Default::default()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
        ] {
            let e = Sampler::new(p).err().unwrap().to_string();
            assert!(e.contains(field), "{e}");
        }
    }
}
