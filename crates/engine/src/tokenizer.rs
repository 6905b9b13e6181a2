//! Tokenizer: a real `tokenizers::Tokenizer`, loaded from tokenizer.json or built from the
//! gpt2-style BPE or llama-style SentencePiece vocabulary in a GGUF file's metadata, plus
//! incremental detokenization.
//!
//! GGUF files carry no tokenizer.json. For gpt2-style BPE (`tokenizer.ggml.model = "gpt2"`)
//! their `tokenizer.ggml.*` keys hold the vocabulary, the merges, the token types and the name
//! of the pre-tokenizer (`tokenizer.ggml.pre`), which llama.cpp maps to a list of regexes
//! applied one after the other. The same regexes become a sequence of `Split` pre-tokenizers
//! (matches isolated, the rest kept) ahead of a byte-level step without its own regex, so that
//! encoding gives llama.cpp's ids.
//!
//! SentencePiece vocabularies (`"llama"`: Llama 2, Gemma, ...) have scores instead of merges;
//! `spm` encodes them as llama.cpp does, and a `tokenizers` BPE equivalent decodes.

mod spm;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{Error, Result};
use crate::model::files;

/// A model's fill-in-the-middle tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FimTokens {
    pub prefix: u32,
    pub suffix: u32,
    pub middle: u32,
}

/// The bytes a byte-level BPE piece (GPT-2's alphabet: printable bytes as themselves, the
/// others shifted to U+0100..) stands for; None when a character is outside that alphabet.
fn byte_level_bytes(piece: &str) -> Option<Vec<u8>> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    piece
        .chars()
        .map(|c| {
            let c = c as u32;
            if c < 256 && printable(c) {
                return Some(c as u8);
            }
            // The n-th unprintable byte is U+0100 + n.
            let n = c.checked_sub(256)?;
            (0u32..256)
                .filter(|&b| !printable(b))
                .nth(n as usize)
                .map(|b| b as u8)
        })
        .collect()
}

/// GPT-2's split regex as llama.cpp writes it (no trailing `\s+`: unmatched spans stay pieces).
const GPT2_RE: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const QWEN2_RE: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_RE: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Tokens that end a turn or a document. Those in `ALWAYS_EOS` end generation whenever the
/// vocabulary has them as special tokens; the others only when the chat template uses them.
const TURN_END_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<｜end▁of▁sentence｜>",
];
const ALWAYS_EOS: &[&str] = &["<|endoftext|>", "<|end_of_text|>", "</s>"];

/// The pre-tokenizers of llama.cpp's `llama-vocab.cpp` that forgeline reproduces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreTokenizer {
    /// llama.cpp's fallback: punctuation runs, GPT-2, number runs, then groups of three digits.
    Default,
    /// Plain GPT-2 byte-level regex (`gpt-2`, `phi-2`, `mpt`, `olmo`, `jais`).
    Gpt2,
    /// Every digit alone, then GPT-2 (`smollm`, `starcoder`, `refact`, `command-r`, ...).
    Smollm,
    /// Qwen2's regex: single digits, letters with one leading non-letter (`qwen2`, `stablelm2`).
    Qwen2,
    /// Llama 3's regex: digits in groups of up to three; whole words in the vocabulary skip
    /// the merges (`llama-bpe`, `llama3`, `llama-v3`, `falcon3`, `pixtral`).
    Llama3,
}

impl PreTokenizer {
    /// Maps a `tokenizer.ggml.pre` name; an unknown or empty name falls back to `Default`
    /// with a warning (encoding may then differ from the model's training tokenizer).
    pub fn from_gguf_name(name: &str) -> Self {
        match name {
            "default" => Self::Default,
            "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "exaone4" => Self::Gpt2,
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => Self::Smollm,
            "qwen2" | "deepseek-r1-qwen" | "megrez" | "stablelm2" => Self::Qwen2,
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => Self::Llama3,
            other => {
                tracing::warn!(
                    pre = other,
                    "unknown pre-tokenizer, using llama.cpp's default"
                );
                Self::Default
            }
        }
    }

    /// The regexes, applied in order, each splitting the pieces the previous ones left.
    pub fn regexes(self) -> &'static [&'static str] {
        match self {
            Self::Default => &[
                r"[\p{P}\$\+<=>\^~\|]+",
                GPT2_RE,
                r"\p{N}+",
                r"[0-9][0-9][0-9]",
            ],
            Self::Gpt2 => &[GPT2_RE],
            Self::Smollm => &[r"\p{N}", GPT2_RE],
            Self::Qwen2 => &[QWEN2_RE],
            Self::Llama3 => &[LLAMA3_RE],
        }
    }

    fn ignore_merges(self) -> bool {
        self == Self::Llama3
    }

    fn build(self) -> Result<PreTokenizerWrapper> {
        let mut steps = Vec::new();
        for re in self.regexes() {
            let split = Split::new(
                SplitPattern::Regex((*re).to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex {re:?}: {e}")))?;
            steps.push(split.into());
        }
        steps.push(ByteLevel::new(false, true, false).into());
        Ok(Sequence::new(steps).into())
    }
}

/// A tokenizer with the ids the engine needs: BOS, every token that ends generation.
#[derive(Clone)]
pub struct Tokenizer {
    hf: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    pad_id: Option<u32>,
    /// The primary EOS first, then other end-of-turn tokens.
    eos_ids: Vec<u32>,
    bos: Option<String>,
    eos: Option<String>,
    add_bos: bool,
    vocab_size: usize,
    /// A SentencePiece vocabulary's own encoder (llama.cpp's algorithm); None: `hf` encodes.
    spm: Option<Arc<spm::Spm>>,
    /// Per token id, whether DRY's matches stop at it; built on first use, shared by clones
    /// (the client's and the engine thread's).
    dry_breakers: std::sync::Arc<std::sync::OnceLock<Box<[bool]>>>,
}

/// The texts that end a DRY match (llama.cpp's default sequence breakers): a token holding
/// any of them is never part of a repeat.
pub const DRY_SEQUENCE_BREAKERS: [&str; 4] = ["\n", ":", "\"", "*"];

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eos_ids", &self.eos_ids)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

impl Tokenizer {
    /// Reads the GGUF header at `path` and builds the tokenizer from its metadata.
    pub fn from_gguf_file(path: &Path) -> Result<Self> {
        let (_, content) = crate::model::gguf::read_file(path)?;
        Self::from_gguf(&content, path)
    }

    /// Builds a gpt2-style BPE or llama-style SentencePiece tokenizer from `tokenizer.ggml.*`
    /// metadata; `path` names the file in errors.
    pub fn from_gguf(content: &Content, path: &Path) -> Result<Self> {
        let md = &content.metadata;
        let bad = |msg: String| Error::bad_model(path, msg);
        let model = match md.get("tokenizer.ggml.model") {
            Some(model) => gguf_str(model, "tokenizer.ggml.model", path)?,
            None => "gpt2",
        };
        if model != "gpt2" && model != "llama" {
            return Err(bad(format!(
                "tokenizer.ggml.model is `{model}`: only gpt2-style BPE (`gpt2`) and \
                 SentencePiece (`llama`) GGUF tokenizers are supported (use a tokenizer.json for \
                 this model)"
            )));
        }
        let tokens = gguf_strings(md, "tokenizer.ggml.tokens", path)?;
        if tokens.is_empty() {
            return Err(bad("tokenizer.ggml.tokens is empty".into()));
        }
        let types = match md.get("tokenizer.ggml.token_type") {
            Some(v) => gguf_array(v, "tokenizer.ggml.token_type", path)?
                .iter()
                .map(|t| gguf_int(t, "tokenizer.ggml.token_type", path).map(|t| t as i32))
                .collect::<Result<Vec<_>>>()?,
            None => {
                tracing::warn!(path = %path.display(), "no tokenizer.ggml.token_type: no special tokens");
                vec![1; tokens.len()]
            }
        };
        if types.len() != tokens.len() {
            return Err(bad(format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let id = |key: &str| -> Result<Option<u32>> {
            let Some(v) = md.get(key) else {
                return Ok(None);
            };
            let id = gguf_int(v, key, path)?;
            // llama.cpp writes -1 (or u32::MAX) for "none".
            if id < 0 || id == i64::from(u32::MAX) {
                return Ok(None);
            }
            if id as u64 >= tokens.len() as u64 {
                return Err(bad(format!(
                    "{key} is {id}, outside the vocabulary of {} tokens",
                    tokens.len()
                )));
            }
            Ok(Some(id as u32))
        };
        let flag = |key: &str| -> Result<Option<bool>> {
            md.get(key)
                .map(|v| v.to_bool().map_err(|_| bad(format!("{key} is not a bool"))))
                .transpose()
        };
        let (hf, spm, default_add_bos) = if model == "llama" {
            let scores = match md.get("tokenizer.ggml.scores") {
                Some(v) => gguf_array(v, "tokenizer.ggml.scores", path)?
                    .iter()
                    .map(|s| gguf_float(s, "tokenizer.ggml.scores", path))
                    .collect::<Result<Vec<_>>>()?,
                None => {
                    tracing::warn!(path = %path.display(), "no tokenizer.ggml.scores: no merges");
                    vec![0.0; tokens.len()]
                }
            };
            if scores.len() != tokens.len() {
                return Err(bad(format!(
                    "tokenizer.ggml.scores has {} entries for {} tokens",
                    scores.len(),
                    tokens.len()
                )));
            }
            // llama.cpp's default for SentencePiece vocabularies is a leading space.
            let add_space_prefix = flag("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
            let unk = id("tokenizer.ggml.unknown_token_id")?;
            let hf = spm::build_hf(&tokens, &scores, &types, add_space_prefix, unk)
                .map_err(|e| bad(e.to_string()))?;
            let spm = spm::Spm::new(&tokens, &scores, &types, add_space_prefix, unk);
            (hf, Some(Arc::new(spm)), true)
        } else {
            let merges = gguf_strings(md, "tokenizer.ggml.merges", path)?;
            let pre = match md.get("tokenizer.ggml.pre") {
                Some(v) => PreTokenizer::from_gguf_name(gguf_str(v, "tokenizer.ggml.pre", path)?),
                None => PreTokenizer::from_gguf_name(""),
            };
            let hf = build_bpe(&tokens, &types, &merges, pre).map_err(|e| bad(e.to_string()))?;
            (hf, None, pre == PreTokenizer::Llama3)
        };
        let bos_id = id("tokenizer.ggml.bos_token_id")?;
        let pad_id = id("tokenizer.ggml.padding_token_id")?;
        let mut eos_ids: Vec<u32> = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            eos_ids.extend(id(key)?);
        }
        let template = match md.get("tokenizer.chat_template") {
            Some(v) => Some(gguf_str(v, "tokenizer.chat_template", path)?),
            None => None,
        };
        add_end_tokens(&hf, template, &mut eos_ids);
        let add_bos = flag("tokenizer.ggml.add_bos_token")?.unwrap_or(default_add_bos);
        let mut tok = Self::assemble(hf, bos_id, eos_ids, add_bos, tokens.len());
        tok.pad_id = pad_id;
        tok.spm = spm;
        Ok(tok)
    }

    /// Loads a tokenizer.json. BOS/EOS come from tokenizer_config.json and
    /// generation_config.json beside it when present.
    pub fn from_file(tokenizer_json: &Path) -> Result<Self> {
        let bytes = files::read_capped(tokenizer_json, files::MAX_TEXT_FILE)?;
        // The tokenizers crate validates as it builds; a panic in it is one more error here.
        let hf = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(&bytes))
            .map_err(|_| "the tokenizers library panicked on it".to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|e| Error::bad_model(tokenizer_json, format!("bad tokenizer.json: {e}")))?;
        if hf.get_vocab_size(true) == 0 {
            return Err(Error::bad_model(
                tokenizer_json,
                "bad tokenizer.json: the vocabulary is empty",
            ));
        }
        let dir = tokenizer_json.parent().unwrap_or(Path::new("."));
        let config = read_json_if_exists(&dir.join("tokenizer_config.json"))?;
        let gen = read_json_if_exists(&dir.join("generation_config.json"))?;
        let field = |name: &str| config.as_ref().and_then(|c| c.get(name));
        let named_id = |name: &str| {
            field(name)
                .and_then(token_content)
                .and_then(|t| hf.token_to_id(t))
        };
        let gen_ids = |name: &str| -> Vec<u32> {
            match gen.as_ref().and_then(|g| g.get(name)) {
                Some(serde_json::Value::Array(a)) => a.iter().filter_map(json_u32).collect(),
                Some(v) => json_u32(v).into_iter().collect(),
                None => Vec::new(),
            }
        };
        let bos_id = named_id("bos_token").or_else(|| gen_ids("bos_token_id").first().copied());
        let mut eos_ids: Vec<u32> = named_id("eos_token").into_iter().collect();
        eos_ids.extend(gen_ids("eos_token_id"));
        let template = match field("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => Some(
                list.iter()
                    .filter_map(|t| t.get("template").and_then(|t| t.as_str()))
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
            _ => files::read_text(&dir.join("chat_template.jinja")).ok(),
        };
        add_end_tokens(&hf, template.as_deref(), &mut eos_ids);
        let add_bos = match field("add_bos_token").and_then(|v| v.as_bool()) {
            Some(b) => b,
            // No flag: ask the tokenizer.json's own post-processor whether it prepends BOS.
            None => bos_id.is_some_and(|bos| {
                hf.encode("a", true)
                    .is_ok_and(|e| e.get_ids().first() == Some(&bos))
            }),
        };
        let pad_id = named_id("pad_token").or_else(|| gen_ids("pad_token_id").first().copied());
        let vocab_size = hf.get_vocab_size(true);
        // generation_config.json's ids are numbers, not names: they must be in the vocabulary.
        let in_vocab = |what: &str, id: Option<&u32>| match id {
            Some(&id) if id as usize >= vocab_size => Err(Error::bad_model(
                dir.join("generation_config.json"),
                format!("{what} {id} is outside the vocabulary of {vocab_size} tokens"),
            )),
            _ => Ok(()),
        };
        in_vocab("bos_token_id", bos_id.as_ref())?;
        in_vocab("pad_token_id", pad_id.as_ref())?;
        for id in &eos_ids {
            in_vocab("eos_token_id", Some(id))?;
        }
        let mut tok = Self::assemble(hf, bos_id, eos_ids, add_bos, vocab_size);
        tok.pad_id = pad_id;
        Ok(tok)
    }

    fn assemble(
        hf: tokenizers::Tokenizer,
        bos_id: Option<u32>,
        mut eos_ids: Vec<u32>,
        add_bos: bool,
        vocab_size: usize,
    ) -> Self {
        let mut seen = std::collections::HashSet::new();
        eos_ids.retain(|id| seen.insert(*id));
        let bos = bos_id.and_then(|id| hf.id_to_token(id));
        let eos = eos_ids.first().and_then(|&id| hf.id_to_token(id));
        Self {
            hf,
            bos_id,
            pad_id: None,
            eos_ids,
            bos,
            eos,
            add_bos,
            vocab_size,
            spm: None,
            dry_breakers: Default::default(),
        }
    }

    /// Per token id, whether its text holds one of `DRY_SEQUENCE_BREAKERS` (special tokens
    /// always do: a turn boundary ends every repeat).
    pub fn dry_breakers(&self) -> &[bool] {
        self.dry_breakers.get_or_init(|| {
            let n = self.vocab_size.max(self.hf.get_vocab_size(true));
            (0..n as u32)
                .map(|id| match self.hf.decode(&[id], false) {
                    Ok(text) if !text.is_empty() => {
                        DRY_SEQUENCE_BREAKERS.iter().any(|b| text.contains(b))
                            || self.hf.decode(&[id], true).is_ok_and(|t| t.is_empty())
                    }
                    _ => true,
                })
                .collect()
        })
    }

    /// Encodes `text`; special tokens written in it (`<|im_start|>`) become their ids.
    /// `add_bos` prepends the BOS token (an error if the model has none).
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if add_bos {
            let bos = self
                .bos_id
                .ok_or_else(|| Error::Tokenizer("BOS requested but the model has none".into()))?;
            ids.push(bos);
        }
        if let Some(spm) = &self.spm {
            spm.encode(text, &mut ids)?;
            return Ok(ids);
        }
        let enc = self
            .hf
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("encode: {e}")))?;
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Decodes to text, leaving out control tokens (BOS, EOS, `<|im_end|>`, ...).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_inner(ids, true)
    }

    /// Decodes to text with control tokens written out.
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String> {
        self.decode_inner(ids, false)
    }

    fn decode_inner(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.hf
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(format!("decode: {e}")))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.hf.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.hf.id_to_token(id)
    }

    /// The model's fill-in-the-middle tokens, if its vocabulary has a full set (Qwen2.5-Coder's
    /// `<|fim_prefix|>`..., StarCoder's and SmolLM's `<fim_prefix>`..., CodeLlama's `<PRE>`...).
    pub fn fim_tokens(&self) -> Option<FimTokens> {
        [
            ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"],
            ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"],
            ["<|fim▁begin|>", "<|fim▁hole|>", "<|fim▁end|>"],
            ["▁<PRE>", "▁<SUF>", "▁<MID>"],
        ]
        .iter()
        .find_map(|[p, s, m]| {
            Some(FimTokens {
                prefix: self.hf.token_to_id(p)?,
                suffix: self.hf.token_to_id(s)?,
                middle: self.hf.token_to_id(m)?,
            })
        })
    }

    /// The bytes token `id` stands for, which may be part of a character: a byte-level BPE
    /// token's characters mapped back to bytes (GPT-2's table), a SentencePiece token's piece
    /// with `▁` as a space (`<0x0A>`: the byte 0x0A), else its decoded text.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        if let Some(spm) = &self.spm {
            return spm.token_bytes(id).unwrap_or_default();
        }
        let byte_level = matches!(
            self.hf.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        );
        if let Some(piece) = self.hf.id_to_token(id).filter(|_| byte_level) {
            if let Some(bytes) = byte_level_bytes(&piece) {
                return bytes;
            }
        }
        self.decode_with_special(&[id])
            .map(String::into_bytes)
            .unwrap_or_default()
    }

    /// Number of token ids (for a GGUF: the length of `tokenizer.ggml.tokens`).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// The tokens that end generation: the model's EOS first, then end-of-turn tokens.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_deref()
    }

    /// Whether the model expects BOS before a prompt (`tokenizer.ggml.add_bos_token`).
    pub fn add_bos_token(&self) -> bool {
        self.add_bos
    }

    pub fn hf(&self) -> &tokenizers::Tokenizer {
        &self.hf
    }

    pub fn stream(&self) -> TokenStream<'_> {
        TokenStream {
            tok: self,
            state: Detokenizer::default(),
        }
    }
}

/// Builds the BPE model, byte-level pre-tokenizer/decoder and the added special tokens.
fn build_bpe(
    tokens: &[String],
    types: &[i32],
    merges: &[String],
    pre: PreTokenizer,
) -> Result<tokenizers::Tokenizer> {
    let mut vocab = Vocab::default();
    let mut duplicates = 0usize;
    for (id, tok) in tokens.iter().enumerate() {
        if vocab.contains_key(tok) {
            duplicates += 1;
        } else {
            vocab.insert(tok.clone(), id as u32);
        }
    }
    if duplicates > 0 {
        tracing::warn!(
            duplicates,
            "duplicate token strings; later ids cannot be decoded"
        );
    }
    let mut pairs = Vec::with_capacity(merges.len());
    let mut dropped = 0usize;
    for m in merges {
        // The first piece may itself start with a space, so search from the second char.
        let split = m.char_indices().skip(1).find(|&(_, c)| c == ' ');
        let Some((at, _)) = split else {
            return Err(Error::Tokenizer(format!("malformed merge {m:?}")));
        };
        let (a, b) = (&m[..at], &m[at + 1..]);
        if vocab.contains_key(a) && vocab.contains_key(b) && vocab.contains_key(&format!("{a}{b}"))
        {
            pairs.push((a.to_string(), b.to_string()));
        } else {
            dropped += 1;
        }
    }
    if dropped > 0 {
        tracing::warn!(
            dropped,
            "merges with pieces outside the vocabulary were dropped"
        );
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .ignore_merges(pre.ignore_merges())
        .build()
        .map_err(|e| Error::Tokenizer(format!("BPE model: {e}")))?;
    let mut hf = tokenizers::Tokenizer::new(bpe);
    hf.with_pre_tokenizer(Some(pre.build()?));
    hf.with_decoder(Some(ByteLevel::new(false, true, false)));
    hf.with_post_processor(Some(ByteLevel::new(false, true, false)));
    // llama.cpp keeps unknown (2), control (3) and user-defined (4) tokens whole when parsing
    // special tokens; control and unknown ones are not printed when decoding.
    let mut special = Vec::new();
    let mut user = Vec::new();
    for (tok, &ty) in tokens.iter().zip(types) {
        match ty {
            _ if tok.is_empty() => {}
            2 | 3 => special.push(AddedToken::from(tok.clone(), true)),
            4 => user.push(AddedToken::from(tok.clone(), false).normalized(false)),
            _ => {}
        }
    }
    hf.add_special_tokens(&special);
    hf.add_tokens(&user);
    Ok(hf)
}

/// Adds the end-of-turn tokens the chat template uses and the document-end tokens.
fn add_end_tokens(hf: &tokenizers::Tokenizer, template: Option<&str>, eos_ids: &mut Vec<u32>) {
    let specials = hf.get_added_tokens_decoder();
    let special_id = |name: &str| {
        let id = hf.token_to_id(name)?;
        specials.get(&id).filter(|t| t.special).map(|_| id)
    };
    for name in TURN_END_TOKENS {
        // Without a template, any end-of-turn token the vocabulary has counts.
        if template.is_none_or(|t| t.contains(name)) {
            eos_ids.extend(special_id(name));
        }
    }
    for name in ALWAYS_EOS {
        eos_ids.extend(special_id(name));
    }
}

fn gguf_array<'a>(v: &'a Value, key: &str, path: &Path) -> Result<&'a Vec<Value>> {
    v.to_vec()
        .map_err(|_| Error::bad_model(path, format!("{key} is not an array")))
}

fn gguf_strings(md: &HashMap<String, Value>, key: &str, path: &Path) -> Result<Vec<String>> {
    let v = md
        .get(key)
        .ok_or_else(|| Error::bad_model(path, format!("missing GGUF key {key}")))?;
    gguf_array(v, key, path)?
        .iter()
        .map(|s| gguf_str(s, key, path).map(str::to_string))
        .collect()
}

fn gguf_str<'a>(v: &'a Value, key: &str, path: &Path) -> Result<&'a str> {
    v.to_string()
        .map(String::as_str)
        .map_err(|_| Error::bad_model(path, format!("{key} is not a string")))
}

/// A number (a score); integers are read as floats.
fn gguf_float(v: &Value, key: &str, path: &Path) -> Result<f32> {
    match v {
        Value::F32(x) => Ok(*x),
        Value::F64(x) => Ok(*x as f32),
        v => crate::model::gguf::int_value(v)
            .map(|x| x as f32)
            .ok_or_else(|| Error::bad_model(path, format!("{key} is not a number"))),
    }
}

/// An integer value; one past i64 reads as -1, which every caller's range check refuses.
fn gguf_int(v: &Value, key: &str, path: &Path) -> Result<i64> {
    let x = crate::model::gguf::int_value(v)
        .ok_or_else(|| Error::bad_model(path, format!("{key} is not an integer")))?;
    Ok(i64::try_from(x).unwrap_or(-1))
}

fn read_json_if_exists(path: &Path) -> Result<Option<serde_json::Value>> {
    match files::read_capped(path, files::MAX_TEXT_FILE) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::bad_model(path, format!("bad JSON: {e}"))),
        Err(e) if files::is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A token field of tokenizer_config.json: `"</s>"` or `{"content": "</s>", ...}`.
fn token_content(v: &serde_json::Value) -> Option<&str> {
    v.as_str()
        .or_else(|| v.get("content").and_then(|c| c.as_str()))
}

fn json_u32(v: &serde_json::Value) -> Option<u32> {
    v.as_u64().and_then(|x| u32::try_from(x).ok())
}

/// Incremental detokenizer: feed generated ids one at a time, get the newly complete text.
///
/// Text is held back while it ends in an incomplete UTF-8 sequence (a byte-level token can
/// carry part of a character), so no chunk ever holds half a character. Each step decodes
/// the last emitted chunk together with the new tokens and returns only what was added,
/// which keeps decoders that drop a leading space (SentencePiece) right.
///
/// This is the owned state; `TokenStream` pairs it with its tokenizer. Holders that cannot
/// borrow the tokenizer for their whole life (the scheduler's sequences) keep this instead.
#[derive(Clone, Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// `ids[prev..cur]` is the last emitted chunk, `ids[cur..]` is not emitted yet.
    prev: usize,
    cur: usize,
}

impl Detokenizer {
    /// Pushes one token; returns the text it completes, if any.
    pub fn next(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        let emitted = tok.decode(&self.ids[self.prev..self.cur])?;
        self.ids.push(id);
        let text = tok.decode(&self.ids[self.prev..])?;
        if text.len() > emitted.len() && !text.ends_with(char::REPLACEMENT_CHARACTER) {
            let new = suffix_after(&text, &emitted).to_string();
            self.ids.drain(..self.cur);
            self.prev = 0;
            self.cur = self.ids.len();
            Ok(Some(new))
        } else {
            Ok(None)
        }
    }

    /// Returns whatever text is still held back (at the end of generation) and resets.
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<Option<String>> {
        let emitted = tok.decode(&self.ids[self.prev..self.cur])?;
        let text = tok.decode(&self.ids[self.prev..])?;
        *self = Self::default();
        Ok((text.len() > emitted.len()).then(|| suffix_after(&text, &emitted).to_string()))
    }
}

/// A `Detokenizer` with its tokenizer.
pub struct TokenStream<'a> {
    tok: &'a Tokenizer,
    state: Detokenizer,
}

impl TokenStream<'_> {
    /// Pushes one token; returns the text it completes, if any.
    pub fn next(&mut self, id: u32) -> Result<Option<String>> {
        self.state.next(self.tok, id)
    }

    /// Returns whatever text is still held back (at the end of generation) and resets.
    pub fn flush(&mut self) -> Result<Option<String>> {
        self.state.flush(self.tok)
    }
}

fn suffix_after<'t>(text: &'t str, prefix: &str) -> &'t str {
    if let Some(rest) = text.strip_prefix(prefix) {
        return rest;
    }
    let mut at = prefix.len().min(text.len());
    while !text.is_char_boundary(at) {
        at += 1;
    }
    &text[at..]
}
