//! llama-style SentencePiece tokenizers (`tokenizer.ggml.model = "llama"`) from GGUF metadata.
//!
//! Encoding follows llama.cpp's `llm_tokenizer_spm` step for step, so the ids are llama.cpp's:
//! control, user-defined and unknown tokens written in the text are cut out whole first
//! (longest first, each one's every occurrence in what is left); each remaining span gets a
//! leading space when `tokenizer.ggml.add_space_prefix` asks for it (at the start and after a
//! special token), its spaces become `▁`, and it is split into characters which are merged
//! pairwise, always the adjacent pair whose concatenation is the vocabulary token with the
//! highest score (the leftmost among equals), while such a pair exists. Characters no token
//! covers become their UTF-8 bytes' `<0xXX>` tokens.
//!
//! The `tokenizers::Tokenizer` built beside it (for decoding and for constrained decoding's
//! token trie) is the one Hugging Face's converters make from a SentencePiece BPE model: a BPE
//! model whose merges come from the scores, byte fallback, `▁` for spaces.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::Sequence as NormalizerSequence;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper};

use crate::error::{Error, Result};

/// SentencePiece's stand-in for a space.
const SPACE: char = '▁';

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
pub(super) const TYPE_UNKNOWN: i32 = 2;
pub(super) const TYPE_CONTROL: i32 = 3;
pub(super) const TYPE_USER_DEFINED: i32 = 4;
pub(super) const TYPE_BYTE: i32 = 6;

/// The vocabulary and scores llama.cpp's SPM tokenizer works with.
#[derive(Debug)]
pub(super) struct Spm {
    /// Token text to id; a text held twice maps to its last id, as in llama.cpp.
    ids: HashMap<String, u32>,
    /// Per id: the token's text.
    pieces: Vec<String>,
    /// Per id: the score (merge priority), NaN read as -inf and -0 as 0.
    scores: Vec<f32>,
    /// Per id: the token type.
    types: Vec<i32>,
    /// Control, user-defined and unknown tokens, longest first: cut out of the text whole.
    specials: Vec<u32>,
    /// Per byte: its `<0xXX>` token (else the one-character token of that byte).
    byte_ids: Box<[Option<u32>; 256]>,
    unk: Option<u32>,
    add_space_prefix: bool,
}

impl Spm {
    /// `tokens`, `scores` and `types` have one entry per id (the caller checks their lengths).
    pub(super) fn new(
        tokens: &[String],
        scores: &[f32],
        types: &[i32],
        add_space_prefix: bool,
        unk: Option<u32>,
    ) -> Self {
        // llama.cpp names empty tokens so that they cannot match.
        let pieces: Vec<String> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if t.is_empty() {
                    format!("[EMPTY_{i}]")
                } else {
                    t.clone()
                }
            })
            .collect();
        let mut ids = HashMap::with_capacity(pieces.len());
        for (id, piece) in pieces.iter().enumerate() {
            ids.insert(piece.clone(), id as u32);
        }
        let scores = scores
            .iter()
            .map(|&s| {
                if s.is_nan() {
                    f32::NEG_INFINITY
                } else {
                    s + 0.0
                }
            })
            .collect();
        let mut specials: Vec<u32> = (0..pieces.len() as u32)
            .filter(|&id| {
                matches!(
                    types[id as usize],
                    TYPE_UNKNOWN | TYPE_CONTROL | TYPE_USER_DEFINED
                )
            })
            .collect();
        specials.sort_by_key(|&id| std::cmp::Reverse(pieces[id as usize].len()));
        let mut byte_ids = Box::new([None; 256]);
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = ids.get(&format!("<0x{b:02X}>")).copied().or_else(|| {
                let b = b as u8;
                b.is_ascii()
                    .then(|| ids.get(&char::from(b).to_string()).copied())
                    .flatten()
            });
        }
        Self {
            ids,
            pieces,
            scores,
            types: types.to_vec(),
            specials,
            byte_ids,
            unk,
            add_space_prefix,
        }
    }

    /// Appends the ids of `text` to `out`, special tokens in it parsed.
    pub(super) fn encode(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut prev_special = true;
        for frag in self.partition(text) {
            match frag {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(span) => {
                    let mut escaped = String::with_capacity(span.len() * 3 / 2 + 3);
                    if self.add_space_prefix && prev_special {
                        escaped.push(SPACE);
                    }
                    for c in span.chars() {
                        escaped.push(if c == ' ' { SPACE } else { c });
                    }
                    self.encode_span(&escaped, out)?;
                    prev_special = false;
                }
            }
        }
        Ok(())
    }

    /// llama.cpp's `tokenizer_st_partition` with special tokens parsed: each special token in
    /// turn, longest first, is cut out of the text left between the ones already found.
    fn partition<'t>(&self, text: &'t str) -> Vec<Fragment<'t>> {
        let mut frags = Vec::new();
        if text.is_empty() {
            return frags;
        }
        frags.push(Fragment::Text(text));
        // Which byte pairs the text holds: most special tokens are skipped without a search.
        let bytes = text.as_bytes();
        let mut pairs = vec![0u64; 1024];
        let mut single = [false; 256];
        for (i, &b) in bytes.iter().enumerate() {
            single[b as usize] = true;
            if let Some(&c) = bytes.get(i + 1) {
                let pair = (b as usize) << 8 | c as usize;
                pairs[pair / 64] |= 1 << (pair % 64);
            }
        }
        for &id in &self.specials {
            let piece = self.pieces[id as usize].as_str();
            let may_occur = match piece.as_bytes() {
                [] => false,
                [b] => single[*b as usize],
                [b, c, ..] => {
                    let pair = (*b as usize) << 8 | *c as usize;
                    pairs[pair / 64] & (1 << (pair % 64)) != 0
                }
            };
            if !may_occur || !text.contains(piece) {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for frag in frags {
                let Fragment::Text(mut rest) = frag else {
                    next.push(frag);
                    continue;
                };
                while let Some(at) = rest.find(piece) {
                    if at > 0 {
                        next.push(Fragment::Text(&rest[..at]));
                    }
                    next.push(Fragment::Token(id));
                    rest = &rest[at + piece.len()..];
                }
                if !rest.is_empty() {
                    next.push(Fragment::Text(rest));
                }
            }
            frags = next;
        }
        frags
    }

    /// llama.cpp's `llm_tokenizer_spm_session::tokenize` on one escaped span.
    fn encode_span(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        // One symbol per character, linked in a list; a merged-away symbol has len 0.
        let mut syms: Vec<Symbol> = text
            .char_indices()
            .map(|(start, c)| Symbol {
                prev: None,
                next: None,
                start,
                len: c.len_utf8(),
            })
            .collect();
        let n = syms.len();
        for (i, s) in syms.iter_mut().enumerate() {
            s.prev = i.checked_sub(1);
            s.next = (i + 1 < n).then_some(i + 1);
        }
        let mut queue = BinaryHeap::new();
        for i in 1..n {
            self.try_bigram(text, &syms, i - 1, i, &mut queue);
        }
        while let Some(bigram) = queue.pop() {
            let (l, r) = (bigram.left, bigram.right);
            // Either side already merged into something else: a stale entry.
            if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != bigram.size {
                continue;
            }
            syms[l].len += syms[r].len;
            syms[r].len = 0;
            syms[l].next = syms[r].next;
            if let Some(next) = syms[r].next {
                syms[next].prev = Some(l);
            }
            if let Some(prev) = syms[l].prev {
                self.try_bigram(text, &syms, prev, l, &mut queue);
            }
            if let Some(next) = syms[l].next {
                self.try_bigram(text, &syms, l, next, &mut queue);
            }
        }
        let mut at = Some(0);
        while let Some(i) = at {
            let s = &syms[i];
            let piece = text.get(s.start..s.start + s.len).ok_or_else(|| {
                Error::Tokenizer("encode: a symbol lost its character boundaries".into())
            })?;
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                // Only single characters can be outside the vocabulary (merges make tokens).
                None => {
                    for b in piece.bytes() {
                        out.push(self.byte_token(b)?);
                    }
                }
            }
            at = s.next;
        }
        Ok(())
    }

    fn try_bigram(
        &self,
        text: &str,
        syms: &[Symbol],
        left: usize,
        right: usize,
        queue: &mut BinaryHeap<Bigram>,
    ) {
        let start = syms[left].start;
        let size = syms[left].len + syms[right].len;
        let Some(pair) = text.get(start..start + size) else {
            return;
        };
        if let Some(&id) = self.ids.get(pair) {
            queue.push(Bigram {
                score: self.scores[id as usize],
                left,
                right,
                size,
            });
        }
    }

    /// The token for byte `b`: `<0xXX>`, else the byte as a one-character token, else UNK.
    fn byte_token(&self, b: u8) -> Result<u32> {
        self.byte_ids[b as usize].or(self.unk).ok_or_else(|| {
            Error::Tokenizer(format!(
                "encode: the vocabulary has no token for byte 0x{b:02X} (no <0x{b:02X}>, no unknown token)"
            ))
        })
    }

    /// The bytes token `id` stands for: a byte token's byte, a special or user-defined token's
    /// text, else the piece with `▁` as a space. None for an id outside the vocabulary.
    pub(super) fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let piece = self.pieces.get(id as usize)?;
        let ty = self.types[id as usize];
        if ty == TYPE_BYTE {
            if let Some(b) = byte_of_piece(piece) {
                return Some(vec![b]);
            }
        }
        if matches!(ty, TYPE_UNKNOWN | TYPE_CONTROL | TYPE_USER_DEFINED) {
            return Some(piece.as_bytes().to_vec());
        }
        Some(piece.replace(SPACE, " ").into_bytes())
    }
}

/// The byte of a `<0xXX>` piece.
fn byte_of_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

struct Symbol {
    prev: Option<usize>,
    next: Option<usize>,
    /// Byte range in the escaped text.
    start: usize,
    len: usize,
}

/// A candidate merge: the higher score first, then the leftmost (llama.cpp's comparator).
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

/// Tokens longer than this (in bytes) get no merges in the `tokenizers` model.
const MAX_MERGED_LEN: usize = 1024;

/// The `tokenizers` equivalent, as Hugging Face converts a SentencePiece BPE model: the merges
/// are every split of a token into two tokens, ordered by the whole token's score (then by the
/// halves' ids); byte fallback; spaces as `▁` (with a leading one if `add_space_prefix`);
/// control and unknown tokens special, user-defined ones added as they are.
pub(super) fn build_hf(
    tokens: &[String],
    scores: &[f32],
    types: &[i32],
    add_space_prefix: bool,
    unk: Option<u32>,
) -> Result<tokenizers::Tokenizer> {
    let mut vocab = Vocab::default();
    for (id, tok) in tokens.iter().enumerate() {
        vocab.entry(tok.clone()).or_insert(id as u32);
    }
    let mut merges: Vec<(f32, u32, u32, usize, usize)> = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        // A token the vocabulary holds under another (earlier) id is merged into that id. Every
        // split of a token is looked up, so absurdly long ones (none in real vocabularies)
        // are left without merges rather than costing the square of their length.
        if vocab.get(tok) != Some(&(id as u32)) || tok.len() > MAX_MERGED_LEN {
            continue;
        }
        for (at, _) in tok.char_indices().skip(1) {
            let (a, b) = tok.split_at(at);
            if let (Some(&ia), Some(&ib)) = (vocab.get(a), vocab.get(b)) {
                merges.push((scores[id], ia, ib, id, at));
            }
        }
    }
    // Stable: equal scores keep the token order, and each token's splits by the halves' ids.
    merges.sort_by(|x, y| {
        y.0.total_cmp(&x.0)
            .then(x.3.cmp(&y.3))
            .then(x.1.cmp(&y.1))
            .then(x.2.cmp(&y.2))
    });
    let pairs: Vec<(String, String)> = merges
        .iter()
        .map(|&(_, _, _, id, at)| {
            let (a, b) = tokens[id].split_at(at);
            (a.to_string(), b.to_string())
        })
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk.and_then(|id| tokens.get(id as usize)) {
        builder = builder.unk_token(unk.clone());
    }
    let bpe = builder
        .build()
        .map_err(|e| Error::Tokenizer(format!("BPE model: {e}")))?;
    let mut hf = tokenizers::Tokenizer::new(bpe);
    let replace = |from: &str, to: &str| {
        Replace::new(from, to).map_err(|e| Error::Tokenizer(format!("normalizer: {e}")))
    };
    let space = SPACE.to_string();
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new(space.clone()).into());
    }
    normalizers.push(replace(" ", &space)?.into());
    hf.with_normalizer(Some(NormalizerSequence::new(normalizers)));
    let mut decoders: Vec<DecoderWrapper> = vec![
        replace(&space, " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    hf.with_decoder(Some(DecoderSequence::new(decoders)));
    let mut special = Vec::new();
    let mut user = Vec::new();
    for (tok, &ty) in tokens.iter().zip(types) {
        match ty {
            _ if tok.is_empty() => {}
            TYPE_UNKNOWN | TYPE_CONTROL => special.push(AddedToken::from(tok.clone(), true)),
            TYPE_USER_DEFINED => user.push(AddedToken::from(tok.clone(), false).normalized(false)),
            _ => {}
        }
    }
    hf.add_special_tokens(&special);
    hf.add_tokens(&user);
    Ok(hf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Spm {
        let toks = ["<unk>", "<s>", "a", "b", "ab", "abb", "▁", "▁a", "bb"];
        let tokens: Vec<String> = toks.iter().map(|s| s.to_string()).collect();
        let scores = [0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -0.5];
        let types = [2, 3, 1, 1, 1, 1, 1, 1, 1];
        Spm::new(&tokens, &scores, &types, false, Some(0))
    }

    #[test]
    fn merges_follow_scores() {
        let spm = tiny();
        let mut out = Vec::new();
        // "bb" (-0.5) beats "ab" (-3): a + bb, and "abb" then joins them.
        spm.encode("abb", &mut out).unwrap();
        assert_eq!(out, vec![5]);
        out.clear();
        spm.encode("ab a<s>", &mut out).unwrap();
        assert_eq!(out, vec![4, 7, 1]);
    }

    #[test]
    fn unknown_characters_without_byte_tokens_become_unk() {
        let spm = tiny();
        let mut out = Vec::new();
        spm.encode("aé", &mut out).unwrap();
        assert_eq!(out, vec![2, 0, 0]);
    }

    #[test]
    fn bytes_of_pieces() {
        assert_eq!(byte_of_piece("<0x0A>"), Some(10));
        assert_eq!(byte_of_piece("<0xZZ>"), None);
        assert_eq!(byte_of_piece("<0x0>"), None);
        assert_eq!(byte_of_piece("<0xé1>"), None);
        assert_eq!(byte_of_piece("<0x+1>"), None);
    }
}
