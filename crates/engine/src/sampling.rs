//! Turning logits into the next token: greedy, temperature, top-k, top-p, min-p, repetition
//! penalty, DRY, with a per-request seed so that the same seed gives the same output.

use rand::distr::{weighted::WeightedIndex, Distribution};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::Validation;
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
    /// DRY ("don't repeat yourself", llama.cpp's `--dry-multiplier`): 0 means off. Above 0, a
    /// token that would continue a run of at least `dry_allowed_length` tokens that already
    /// appeared in the prompt or output, followed by that token, loses
    /// `dry_multiplier * dry_base ^ (run - dry_allowed_length)` from its logit. Runs stop at
    /// sequence breakers (tokens holding a newline, `:`, `"` or `*`), so the syntax between
    /// values in JSON or code is not penalised, and a loop inside a string is.
    pub dry_multiplier: f32,
    pub dry_base: f32,
    pub dry_allowed_length: usize,
    /// Last tokens of the prompt and output searched for runs: -1 means all, 0 turns DRY off.
    pub dry_penalty_last_n: i64,
    pub seed: u64,
}

/// Sampling settings a model's manifest gives (its recipe, `[sampling]`): each one replaces
/// the built-in default, and a request's own value replaces it in turn.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingDefaults {
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub dry_multiplier: Option<f32>,
    pub dry_base: Option<f32>,
    pub dry_allowed_length: Option<usize>,
    pub dry_penalty_last_n: Option<i64>,
}

impl SamplingDefaults {
    /// Sets the fields these defaults give.
    pub fn apply(&self, s: &mut SamplingParams) {
        fn set<T: Copy>(to: &mut T, from: Option<T>) {
            if let Some(v) = from {
                *to = v;
            }
        }
        set(&mut s.temperature, self.temperature);
        set(&mut s.top_k, self.top_k);
        set(&mut s.top_p, self.top_p);
        set(&mut s.min_p, self.min_p);
        set(&mut s.repetition_penalty, self.repetition_penalty);
        set(&mut s.dry_multiplier, self.dry_multiplier);
        set(&mut s.dry_base, self.dry_base);
        set(&mut s.dry_allowed_length, self.dry_allowed_length);
        set(&mut s.dry_penalty_last_n, self.dry_penalty_last_n);
    }

    /// `base` with these defaults applied.
    pub fn over(&self, mut base: SamplingParams) -> SamplingParams {
        self.apply(&mut base);
        base
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            dry_multiplier: 0.0,
            dry_base: 1.75,
            dry_allowed_length: 2,
            dry_penalty_last_n: -1,
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
        let bad = |v: Validation| Err(Error::Validation(v));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(Validation::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(Validation::TopP(self.top_p));
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return bad(Validation::MinP(self.min_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(Validation::RepetitionPenalty(self.repetition_penalty));
        }
        if !self.dry_multiplier.is_finite() || self.dry_multiplier < 0.0 {
            return bad(Validation::DryMultiplier(self.dry_multiplier));
        }
        if !self.dry_base.is_finite() || self.dry_base < 1.0 {
            return bad(Validation::DryBase(self.dry_base));
        }
        if self.dry_allowed_length == 0 {
            return bad(Validation::DryAllowedLength(self.dry_allowed_length));
        }
        if self.dry_penalty_last_n < -1 {
            return bad(Validation::DryPenaltyLastN(self.dry_penalty_last_n));
        }
        Ok(())
    }

    /// Whether DRY is on.
    pub fn uses_dry(&self) -> bool {
        self.dry_multiplier > 0.0 && self.dry_penalty_last_n != 0
    }
}

/// Longest run DRY matches: longer ones are penalised as this long, which is already far
/// beyond any logit gap.
const DRY_MAX_RUN: usize = 48;

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch of (token, probability) pairs, reused between steps.
    candidates: Vec<(u32, f32)>,
    /// DRY's scratch: each token that followed an earlier occurrence, with its longest run.
    runs: Vec<(u32, usize)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Self {
            rng: StdRng::seed_from_u64(params.seed),
            params,
            candidates: Vec::new(),
            runs: Vec::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether `penalize_repeats` does anything.
    pub fn uses_dry(&self) -> bool {
        self.params.uses_dry()
    }

    /// DRY's penalties (see `SamplingParams::dry_multiplier`) on `logits`, given the prompt
    /// and output so far; `breakers[t]` says whether token `t` is a sequence breaker. Runs
    /// in the searched window that end with the last token are matched backwards (to at
    /// most `DRY_MAX_RUN` tokens); the token that followed each earlier occurrence is
    /// penalised by the longest run it would continue. Breakers are never penalised.
    pub fn penalize_repeats(&mut self, logits: &mut [f32], history: &[u32], breakers: &[bool]) {
        if !self.uses_dry() {
            return;
        }
        let p = &self.params;
        let window =
            usize::try_from(p.dry_penalty_last_n).map_or(history.len(), |n| n.min(history.len()));
        let h = &history[history.len() - window..];
        let breaks = |t: u32| breakers.get(t as usize).copied().unwrap_or(true);
        let Some(&last) = h.last() else {
            return;
        };
        if breaks(last) {
            return;
        }
        let n = h.len();
        let longest = &mut self.runs;
        longest.clear();
        for i in 0..n - 1 {
            let next = h[i + 1];
            if h[i] != last || breaks(next) {
                continue;
            }
            let mut run = 1;
            while run < DRY_MAX_RUN
                && run <= i
                && h[i - run] == h[n - 1 - run]
                && !breaks(h[i - run])
            {
                run += 1;
            }
            match longest.iter_mut().find(|(t, _)| *t == next) {
                Some((_, r)) => *r = (*r).max(run),
                None => longest.push((next, run)),
            }
        }
        for &(t, run) in longest.iter() {
            if run >= p.dry_allowed_length {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.dry_multiplier * p.dry_base.powi((run - p.dry_allowed_length) as i32);
                }
            }
        }
    }

    /// Picks the next token from `logits`; `history` is the prompt and output so far (for the
    /// repetition penalty). `logits` is modified in place.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.penalize(logits, history);
        self.draw(logits)
    }

    /// The repetition penalty on `logits`, given the prompt and output so far: the first
    /// half of `sample`.
    pub fn penalize(&self, logits: &mut [f32], history: &[u32]) {
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
    }

    /// The log-probabilities of the distribution `draw` samples from (`logits` after every
    /// penalty, scaled by the temperature; greedy counts as temperature 1), before top-k,
    /// top-p and min-p cut it, as vLLM reports them: the chosen token's and the `top` most
    /// likely. Tokens a constraint forbids (-inf) have none.
    pub fn logprobs(&self, logits: &[f32], chosen: u32, top: usize) -> Logprobs {
        let t = self.params.temperature;
        let inv_t = if t > 0.0 { 1.0 / t } else { 1.0 };
        let max = crate::simd::max(logits);
        let lse = if max.is_finite() {
            let sum: f64 = logits
                .iter()
                .filter(|l| l.is_finite())
                .map(|&l| f64::from((l - max) * inv_t).exp())
                .sum();
            (max * inv_t) as f64 + sum.ln()
        } else {
            0.0
        };
        let lp = |l: f32| ((l * inv_t) as f64 - lse) as f32;
        let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
        if top > 0 {
            for (i, &l) in logits.iter().enumerate() {
                if !l.is_finite() || (best.len() == top && l <= best[top - 1].1) {
                    continue;
                }
                let at = best.partition_point(|&(_, b)| b >= l);
                best.insert(at, (i as u32, l));
                best.truncate(top);
            }
        }
        let chosen_lp = logits
            .get(chosen as usize)
            .map_or(f32::NEG_INFINITY, |&l| lp(l));
        Logprobs {
            token: chosen,
            logprob: chosen_lp,
            top: best.into_iter().map(|(i, l)| (i, lp(l))).collect(),
        }
    }

    /// Picks the next token from `logits` already penalized (the second half of `sample`).
    /// `logits` is modified in place.
    pub fn draw(&mut self, logits: &mut [f32]) -> u32 {
        let p = &self.params;
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

/// One sampled token's log-probability, and the most likely tokens' at that step.
#[derive(Clone, Debug, PartialEq)]
pub struct Logprobs {
    pub token: u32,
    pub logprob: f32,
    /// Most likely first.
    pub top: Vec<(u32, f32)>,
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

    fn dry(multiplier: f32, last_n: i64) -> Sampler {
        Sampler::new(SamplingParams {
            dry_multiplier: multiplier,
            dry_penalty_last_n: last_n,
            ..SamplingParams::greedy()
        })
        .unwrap()
    }

    #[test]
    fn logprobs_are_the_log_softmax_of_the_sampled_distribution() {
        let l = logits();
        let s = Sampler::new(SamplingParams::greedy()).unwrap();
        let lp = s.logprobs(&l, 1, 3);
        let lse = l.iter().map(|x| x.exp()).sum::<f32>().ln();
        assert!((lp.logprob - (3.0 - lse)).abs() < 1e-5, "{lp:?}");
        assert_eq!(
            lp.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![1, 4, 2]
        );
        assert!((lp.top[1].1 - (2.9 - lse)).abs() < 1e-5);
        // Temperature scales the distribution; a forbidden token is never listed.
        let hot = Sampler::new(SamplingParams {
            temperature: 2.0,
            ..SamplingParams::default()
        })
        .unwrap();
        let mut masked = l.clone();
        masked[1] = f32::NEG_INFINITY;
        let lp = hot.logprobs(&masked, 4, 10);
        let lse: f32 = masked.iter().map(|x| (x / 2.0).exp()).sum::<f32>().ln();
        assert!((lp.logprob - (1.45 - lse)).abs() < 1e-5, "{lp:?}");
        assert_eq!(lp.top.len(), 4);
        assert!(lp.top.iter().all(|t| t.0 != 1));
        let total: f32 = lp.top.iter().map(|t| t.1.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert!(s.logprobs(&l, 0, 0).top.is_empty());
    }

    #[test]
    fn dry_penalises_the_token_that_would_continue_a_repeat() {
        // Tokens 0..8; 7 is a breaker. "1 2 3 4" was followed by 5; the output ends "1 2 3 4"
        // again, so 5 would continue a run of 4: 0.8 * 1.75^(4 - 2) off its logit.
        let breakers = [false, false, false, false, false, false, false, true];
        let history = [0, 1, 2, 3, 4, 5, 6, 1, 2, 3, 4];
        let mut l = vec![0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 2.0, 0.0];
        let mut s = dry(0.8, -1);
        s.penalize_repeats(&mut l, &history, &breakers);
        let want = 3.0 - 0.8 * 1.75f32.powi(2);
        assert!((l[5] - want).abs() < 1e-6, "{l:?}");
        assert_eq!(&l[..5], &[0.0; 5]);
        assert_eq!(l[6], 2.0);
        // Greedy now takes 6 instead of continuing the loop.
        assert_eq!(s.sample(&mut l, &history), 6);

        // A breaker inside the earlier occurrence cuts the run to 1 (below the allowed 2).
        let history = [0, 7, 4, 5, 6, 7, 4];
        let mut l = vec![0.0; 8];
        dry(0.8, -1).penalize_repeats(&mut l, &history, &breakers);
        assert_eq!(l, vec![0.0; 8]);
        let history = [2, 3, 4, 5, 6, 2, 3, 4];
        let mut l = vec![0.0; 8];
        dry(0.8, -1).penalize_repeats(&mut l, &history, &breakers);
        assert!(l[5] < 0.0, "{l:?}");

        // A breaker is never penalised: a string may always close.
        let history = [2, 3, 7, 2, 3];
        let mut l = vec![0.0; 8];
        dry(0.8, -1).penalize_repeats(&mut l, &history, &breakers);
        assert_eq!(l, vec![0.0; 8]);

        // Off, or a window too short to hold the earlier occurrence: nothing changes.
        let history = [1, 2, 3, 4, 5, 6, 1, 2, 3, 4];
        for mut s in [dry(0.0, -1), dry(0.8, 0), dry(0.8, 6)] {
            let mut l = vec![0.0; 8];
            s.penalize_repeats(&mut l, &history, &breakers);
            assert_eq!(l, vec![0.0; 8]);
        }
        let mut l = vec![0.0; 8];
        dry(0.8, 9).penalize_repeats(&mut l, &history, &breakers);
        assert!(l[5] < 0.0);
    }

    #[test]
    fn dry_settings_are_checked() {
        for (m, base, len, n) in [
            (-1.0, 1.75, 2, -1),
            (0.8, 0.5, 2, -1),
            (0.8, 1.75, 0, -1),
            (0.8, 1.75, 2, -2),
        ] {
            let p = SamplingParams {
                dry_multiplier: m,
                dry_base: base,
                dry_allowed_length: len,
                dry_penalty_last_n: n,
                ..SamplingParams::default()
            };
            let e = p.validate().unwrap_err().to_string();
            assert!(e.contains("`dry_"), "{e}");
        }
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
