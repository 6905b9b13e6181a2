//! Constrained decoding with llguidance: output that matches a JSON schema, a regex or a Lark
//! grammar, enforced token by token at sampling time.
//!
//! - `Constraint`: what a request asks for.
//! - `ConstraintFactory`: one per model, built from its tokenizer (the token trie and
//!   llguidance's parser factory; expensive, so built once and shared by `Arc`). `Constraints`
//!   holds it lazily: built on the first constrained request for that model.
//! - `ConstraintState`: one request's grammar state. Before sampling, `mask` sets the logits of
//!   every token the grammar forbids to -inf; after, `consume` feeds it the chosen token and
//!   `consume_forced` takes the tokens that are then the only choice (appended without
//!   sampling: `"route": "` costs one forward chunk, not four decode steps); `is_done` says
//!   when the grammar admits nothing more.
//!
//! JSON schemas are compiled with compact, fixed separators (`", "` and `": "`, no other
//! whitespace) unless the schema carries its own `"x-guidance"` options: a small model left free
//! to emit whitespace can spend its whole budget on it.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use toktrie_hf_tokenizers::ByteTokenizer;

use crate::error::Validation;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// The shape a request's output must have.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", content = "value")]
pub enum Constraint {
    /// A JSON value matching this JSON schema (local `$ref`s only: `#/$defs/...`).
    JsonSchema(Value),
    /// Any JSON object.
    Json,
    /// Text matching this regular expression (Rust `regex` syntax), anchored at both ends.
    Regex(String),
    /// Text in the language of this Lark grammar (llguidance's dialect; `start` is the start
    /// rule).
    Lark(String),
}

impl Constraint {
    /// The separators JSON schemas get unless they name their own.
    fn json_options() -> Value {
        json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
    }

    fn kind(&self) -> &'static str {
        match self {
            Constraint::JsonSchema(_) => "JSON schema",
            Constraint::Json => "JSON",
            Constraint::Regex(_) => "regex",
            Constraint::Lark(_) => "Lark grammar",
        }
    }

    fn grammar(&self) -> Result<TopLevelGrammar> {
        let schema = |mut s: Value| -> Result<TopLevelGrammar> {
            match &mut s {
                Value::Object(o) => {
                    o.entry("x-guidance").or_insert_with(Self::json_options);
                }
                Value::Bool(_) => {}
                other => {
                    return Err(Validation::Constraint {
                        kind: "JSON schema",
                        reason: format!("a schema is an object or a boolean, not `{other}`"),
                    }
                    .into())
                }
            }
            Ok(TopLevelGrammar::from_json_schema(s))
        };
        match self {
            Constraint::JsonSchema(s) => schema(s.clone()),
            Constraint::Json => schema(json!({"type": "object"})),
            Constraint::Regex(r) => Ok(TopLevelGrammar::from_regex(r)),
            Constraint::Lark(g) => Ok(TopLevelGrammar::from_lark(g.clone())),
        }
    }
}

/// Compiles constraints for one model. Cheap to share; expensive to build (it walks the whole
/// vocabulary), so build it once per model.
pub struct ConstraintFactory {
    factory: ParserFactory,
    /// Logits per row (the model's vocabulary, which may exceed the tokenizer's).
    vocab_size: usize,
}

impl std::fmt::Debug for ConstraintFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintFactory")
            .field("vocab_size", &self.vocab_size)
            .finish_non_exhaustive()
    }
}

impl ConstraintFactory {
    /// Builds the token trie of `tok` (every token's bytes; control tokens marked special,
    /// `tok`'s end-of-sequence tokens as the grammar's EOS) for a model with `vocab_size`
    /// logits per row.
    pub fn new(tok: &Tokenizer, vocab_size: usize) -> Result<Self> {
        let err = |e: String| Error::Tokenizer(format!("constrained decoding: {e}"));
        // The trie builder panics on some vocabularies (a `<0x..>` token that is not a byte,
        // say): a hostile model file is an error here, not a crash.
        let hf = tok.hf().clone();
        let mut bt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            ByteTokenizer::from_tokenizer(hf)
        }))
        .map_err(|p| {
            let why = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            err(format!("the vocabulary cannot be read as bytes: {why}"))
        })?
        .map_err(|e| err(e.to_string()))?;
        let n_tok = bt.tokrx_info().vocab_size as usize;
        let eos: Vec<u32> = tok
            .eos_token_ids()
            .iter()
            .copied()
            .filter(|&t| (t as usize) < n_tok)
            .collect();
        if !eos.is_empty() {
            bt.set_eos_tokens(&eos);
        }
        let env = bt
            .into_tok_env((vocab_size > n_tok).then_some(vocab_size))
            .map_err(|e| err(e.to_string()))?;
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| err(e.to_string()))?;
        // Problems reach the caller as errors; llguidance's own stderr log stays quiet.
        factory.quiet();
        Ok(Self {
            factory,
            vocab_size,
        })
    }

    /// Compiles `c` into a fresh per-request state; an error names what is wrong with it.
    pub fn compile(&self, c: &Constraint) -> Result<ConstraintState> {
        let bad = |reason: String| -> Error {
            Validation::Constraint {
                kind: c.kind(),
                reason,
            }
            .into()
        };
        let parser = self
            .factory
            .create_parser(c.grammar()?)
            .map_err(|e| bad(e.to_string()))?;
        let mut matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(bad(e));
        }
        for w in matcher.grammar_warnings() {
            tracing::warn!(constraint = c.kind(), warning = %w, "grammar warning");
        }
        Ok(ConstraintState {
            matcher,
            vocab_size: self.vocab_size,
            mask_time: Duration::ZERO,
            masks: 0,
        })
    }
}

/// A model's `ConstraintFactory`, built on first use and shared from then on. A failure to
/// build is kept too (the tokenizer will not change), and returned to each request.
#[derive(Debug)]
pub struct Constraints {
    tokenizer: Tokenizer,
    vocab_size: usize,
    factory: OnceLock<std::result::Result<Arc<ConstraintFactory>, String>>,
}

impl Constraints {
    pub fn new(tokenizer: Tokenizer, vocab_size: usize) -> Self {
        Self {
            tokenizer,
            vocab_size,
            factory: OnceLock::new(),
        }
    }

    /// The factory, built now if this is the first call.
    pub fn factory(&self) -> Result<Arc<ConstraintFactory>> {
        self.factory
            .get_or_init(|| {
                let started = Instant::now();
                let f = ConstraintFactory::new(&self.tokenizer, self.vocab_size);
                tracing::debug!(elapsed = ?started.elapsed(), ok = f.is_ok(), "constraint factory built");
                f.map(Arc::new).map_err(|e| e.to_string())
            })
            .clone()
            .map_err(Error::Tokenizer)
    }

    pub fn compile(&self, c: &Constraint) -> Result<ConstraintState> {
        self.factory()?.compile(c)
    }
}

/// One request's position in its grammar.
#[derive(Clone)]
pub struct ConstraintState {
    matcher: Matcher,
    vocab_size: usize,
    mask_time: Duration,
    masks: usize,
}

impl std::fmt::Debug for ConstraintState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintState")
            .field("stop_reason", &self.matcher.stop_reason())
            .field("masks", &self.masks)
            .finish_non_exhaustive()
    }
}

impl ConstraintState {
    /// Sets every token the grammar forbids next to -inf. Fails when the grammar is in error
    /// or allows nothing.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let started = Instant::now();
        let mask = self.matcher.compute_mask().map_err(Self::err)?;
        let words = mask.as_slice();
        let n = self.vocab_size.min(logits.len());
        for (i, chunk) in logits[..n].chunks_mut(32).enumerate() {
            let w = words.get(i).copied().unwrap_or(0);
            if w == u32::MAX {
                continue;
            }
            for (b, l) in chunk.iter_mut().enumerate() {
                if (w >> b) & 1 == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        // Rows longer than the model's vocabulary: nothing past it is a token.
        if logits.len() > self.vocab_size {
            logits[self.vocab_size..].fill(f32::NEG_INFINITY);
        }
        self.mask_time += started.elapsed();
        self.masks += 1;
        Ok(())
    }

    /// Advances the grammar by the token just sampled.
    pub fn consume(&mut self, token: u32) -> Result<()> {
        let started = Instant::now();
        let r = self.matcher.consume_token(token).map_err(Self::err);
        self.mask_time += started.elapsed();
        r
    }

    /// The tokens the grammar now forces (the only ones it allows, one after another), already
    /// consumed: the caller appends them without sampling. Empty when there is a choice.
    pub fn consume_forced(&mut self) -> Vec<u32> {
        let started = Instant::now();
        let forced = self.matcher.consume_ff_tokens();
        self.mask_time += started.elapsed();
        forced
    }

    /// The grammar is complete and admits no further token.
    pub fn is_done(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// The output so far is a complete match (more may still be allowed).
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }

    /// Time spent computing masks and consuming tokens, and the number of masks computed.
    pub fn cost(&self) -> (Duration, usize) {
        (self.mask_time, self.masks)
    }

    fn err(e: impl std::fmt::Display) -> Error {
        Validation::ConstrainedDecoding(e.to_string()).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_schemas_get_compact_separators_unless_they_name_their_own() {
        let g = Constraint::Json.grammar().unwrap();
        let s = g.grammars[0].json_schema.as_ref().unwrap();
        assert_eq!(s["x-guidance"]["item_separator"], ", ");
        let own = json!({"type": "object", "x-guidance": {"whitespace_flexible": true}});
        let g = Constraint::JsonSchema(own.clone()).grammar().unwrap();
        assert_eq!(g.grammars[0].json_schema.as_ref().unwrap(), &own);
        assert!(Constraint::JsonSchema(json!("x")).grammar().is_err());
    }

    #[test]
    fn constraints_round_trip_through_serde() {
        let c = Constraint::Regex("(yes|no)".into());
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v, json!({"type": "regex", "value": "(yes|no)"}));
        assert_eq!(serde_json::from_value::<Constraint>(v).unwrap(), c);
        let j: Constraint = serde_json::from_value(json!({"type": "json"})).unwrap();
        assert_eq!(j, Constraint::Json);
    }
}
