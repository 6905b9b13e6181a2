//! SentencePiece (`tokenizer.ggml.model = "llama"`) tokenizers built from GGUF metadata: a tiny
//! vocabulary written here, and Gemma 3 270M's against llama.cpp's ids when its file is present
//! (`scripts/fetch-model gemma-3-270m`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use forgeline_engine::constraint::{Constraint, ConstraintFactory};
use forgeline_engine::tokenizer::Tokenizer;

/// A small SentencePiece vocabulary: control tokens, a user-defined one, the 256 byte tokens,
/// and pieces whose scores decide the merges.
fn tiny_spm(add_space_prefix: Option<bool>) -> Content {
    let mut tokens: Vec<(String, f32, i32)> = vec![
        ("<pad>".into(), 0.0, 3),
        ("<eos>".into(), 0.0, 3),
        ("<bos>".into(), 0.0, 3),
        ("<unk>".into(), 0.0, 2),
        ("<end_of_turn>".into(), 0.0, 3),
        ("  ".into(), 0.0, 4),
    ];
    for b in 0..=255u8 {
        tokens.push((format!("<0x{b:02X}>"), 0.0, 6));
    }
    // Scores: "▁h" and "el" beat "he"; "lo" beats "ll"; "▁hello", "▁world" are whole tokens.
    for (piece, score) in [
        ("▁", -1.0),
        ("h", -2.0),
        ("e", -2.0),
        ("l", -2.0),
        ("o", -2.0),
        ("w", -2.0),
        ("r", -2.0),
        ("d", -2.0),
        ("é", -2.0),
        ("▁h", -3.0),
        ("el", -3.5),
        ("he", -4.0),
        ("lo", -4.5),
        ("ll", -5.0),
        ("▁hel", -6.0),
        ("▁hello", -7.0),
        ("▁w", -8.0),
        ("or", -8.0),
        ("▁wor", -9.0),
        ("ld", -9.5),
        ("▁world", -10.0),
        ("hel", -11.0),
        ("▁▁", -12.0),
        ("x", -2.0),
        ("y", -2.0),
        ("yx", -20.0),
        ("xy", -20.0),
    ] {
        tokens.push((piece.into(), score, 1));
    }
    let s = |x: &str| Value::String(x.to_string());
    let mut md = HashMap::from([
        ("tokenizer.ggml.model".to_string(), s("llama")),
        ("tokenizer.ggml.pre".into(), s("default")),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| s(&t.0)).collect()),
        ),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(tokens.iter().map(|t| Value::F32(t.1)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(tokens.iter().map(|t| Value::I32(t.2)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(3)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(0)),
    ]);
    if let Some(flag) = add_space_prefix {
        md.insert("tokenizer.ggml.add_space_prefix".into(), Value::Bool(flag));
    }
    Content {
        magic: VersionedMagic::GgufV3,
        metadata: md,
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    }
}

fn tiny(add_space_prefix: Option<bool>) -> Tokenizer {
    Tokenizer::from_gguf(&tiny_spm(add_space_prefix), Path::new("tiny.gguf")).unwrap()
}

fn ids(tok: &Tokenizer, pieces: &[&str]) -> Vec<u32> {
    pieces
        .iter()
        .map(|p| {
            tok.token_to_id(p)
                .unwrap_or_else(|| panic!("no token {p:?}"))
        })
        .collect()
}

#[test]
fn tiny_merges_by_score() {
    let tok = tiny(Some(false));
    // ▁ h e l l o: "▁h" (-3) first, then "el" (-3.5), "▁hel" (-6), "lo" (-4.5) ... "▁hello".
    assert_eq!(tok.encode(" hello", false).unwrap(), ids(&tok, &["▁hello"]));
    // Without the leading space: "el" then "lo" (before "he", "ll"), and "hel" (-11) joins h+el.
    assert_eq!(
        tok.encode("hello", false).unwrap(),
        ids(&tok, &["hel", "lo"])
    );
    assert_eq!(
        tok.encode(" hello world", false).unwrap(),
        ids(&tok, &["▁hello", "▁world"])
    );
    // Equal scores: the leftmost pair first ("xy" and "yx" overlap in "xyx").
    assert_eq!(tok.encode("xyx", false).unwrap(), ids(&tok, &["xy", "x"]));
    assert_eq!(tok.encode("yxy", false).unwrap(), ids(&tok, &["yx", "y"]));
}

#[test]
fn tiny_spaces_and_space_prefix() {
    let tok = tiny(Some(false));
    // Two spaces are the user-defined token "  ", cut out before the merges.
    assert_eq!(
        tok.encode("  hello", false).unwrap(),
        ids(&tok, &["  ", "hel", "lo"])
    );
    assert_eq!(tok.encode(" ", false).unwrap(), ids(&tok, &["▁"]));
    // llama.cpp's SentencePiece default: a space before the text and after special tokens.
    let tok = tiny(None);
    assert_eq!(tok.encode("hello", false).unwrap(), ids(&tok, &["▁hello"]));
    assert_eq!(
        tok.encode("hello<end_of_turn>world", false).unwrap(),
        ids(&tok, &["▁hello", "<end_of_turn>", "▁world"])
    );
    assert_eq!(
        tok.decode(&tok.encode("hello world", false).unwrap())
            .unwrap(),
        "hello world"
    );
    assert!(tok.add_bos_token());
    assert_eq!(
        tok.encode("hello", true).unwrap(),
        ids(&tok, &["<bos>", "▁hello"])
    );
}

#[test]
fn tiny_byte_fallback() {
    let tok = tiny(Some(false));
    // "ß" is not in the vocabulary: its UTF-8 bytes C3 9F; "é" is.
    assert_eq!(
        tok.encode("ßé", false).unwrap(),
        ids(&tok, &["<0xC3>", "<0x9F>", "é"])
    );
    assert_eq!(tok.encode("\n", false).unwrap(), ids(&tok, &["<0x0A>"]));
    let emoji = "🐍 hello";
    let enc = tok.encode(emoji, false).unwrap();
    assert_eq!(enc.len(), 5);
    assert_eq!(tok.decode(&enc).unwrap(), emoji);
    // Raw bytes of pieces: the byte of a byte token, ▁ as a space.
    let id = |p: &str| tok.token_to_id(p).unwrap();
    assert_eq!(tok.token_bytes(id("<0x0A>")), b"\n");
    assert_eq!(tok.token_bytes(id("<0xF0>")), [0xF0]);
    assert_eq!(tok.token_bytes(id("▁hello")), b" hello");
    assert_eq!(tok.token_bytes(id("  ")), b"  ");
    assert_eq!(tok.token_bytes(id("<eos>")), b"<eos>");
    assert_eq!(tok.token_bytes(u32::MAX), b"");
}

#[test]
fn tiny_specials_and_round_trip() {
    let tok = tiny(Some(false));
    assert_eq!(tok.bos_token_id(), Some(2));
    assert_eq!(tok.pad_token_id(), Some(0));
    assert_eq!(tok.eos_token(), Some("<eos>"));
    // No chat template: every end-of-turn token the vocabulary has ends generation.
    assert_eq!(tok.eos_token_ids(), ids(&tok, &["<eos>", "<end_of_turn>"]));
    let text = "<bos> hello  world<end_of_turn>\nßé🐍";
    let enc = tok.encode(text, false).unwrap();
    assert_eq!(enc[0], 2);
    assert_eq!(tok.decode_with_special(&enc).unwrap(), text);
    assert_eq!(tok.decode(&enc).unwrap(), " hello  world\nßé🐍");
    // The hf() tokenizer (decoding, constrained decoding's trie) encodes the same ids here.
    let hf = tok.hf().encode(text, false).unwrap();
    assert_eq!(hf.get_ids(), enc.as_slice());
    // The stream never splits a character and gives the text back whole.
    let mut stream = tok.stream();
    let mut chunks = Vec::new();
    for &id in &enc {
        chunks.extend(stream.next(id).unwrap());
    }
    chunks.extend(stream.flush().unwrap());
    assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')), "{chunks:?}");
    assert_eq!(chunks.concat(), " hello  world\nßé🐍");
    assert_eq!(tok.dry_breakers().len(), tok.vocab_size());
    assert!(tok.dry_breakers()[tok.token_to_id("<0x0A>").unwrap() as usize]);
    assert!(!tok.dry_breakers()[tok.token_to_id("▁hello").unwrap() as usize]);
}

#[test]
fn tiny_bad_metadata_is_an_error() {
    let mut content = tiny_spm(Some(false));
    content.metadata.insert(
        "tokenizer.ggml.scores".into(),
        Value::Array(vec![Value::F32(0.0)]),
    );
    let err = Tokenizer::from_gguf(&content, Path::new("bad.gguf")).unwrap_err();
    assert!(err.to_string().contains("scores"), "{err}");
    let mut content = tiny_spm(Some(false));
    content
        .metadata
        .insert("tokenizer.ggml.scores".into(), Value::String("no".into()));
    assert!(Tokenizer::from_gguf(&content, Path::new("bad.gguf")).is_err());
    let mut content = tiny_spm(Some(false));
    content
        .metadata
        .insert("tokenizer.ggml.model".into(), Value::String("t5".into()));
    let err = Tokenizer::from_gguf(&content, Path::new("bad.gguf")).unwrap_err();
    assert!(err.to_string().contains("`t5`"), "{err}");
}

fn gemma_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/gemma-3-270m-q4_k_m.gguf")
}

/// Gemma 3 270M's tokenizer, or None (with a note) when the model file has not been fetched.
fn gemma() -> Option<Tokenizer> {
    let path = gemma_path();
    if !path.exists() {
        println!("SKIPPED: run scripts/fetch-model gemma-3-270m");
        return None;
    }
    Some(Tokenizer::from_gguf_file(&path).unwrap())
}

/// llama.cpp's ids for 16 strings (llama-tokenize, special tokens parsed, no BOS); a copy of
/// shared/reference/gemma3-270m-tokens.json.
const REFERENCE: &str = include_str!("data/gemma3-270m-tokens.json");

/// The reference's (text, ids) pairs. llama-tokenize, which wrote them, reads its prompt with
/// escapes processed (no `--no-escape`), so the text here is the reference's after the same
/// processing: only the case with `\\\\` changes (its ids are those of one backslash).
fn reference_cases() -> Vec<(String, Vec<u32>)> {
    let reference: serde_json::Value = serde_json::from_str(REFERENCE).unwrap();
    reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            let text = llama_tokenize_escapes(case["text"].as_str().unwrap());
            let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            (text, ids)
        })
        .collect()
}

/// llama.cpp's `string_process_escapes`: `\n \r \t \' \" \\ \xNN`; other escapes stay.
fn llama_tokenize_escapes(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            i += 1;
            match b[i] {
                b'n' => out.push(b'\n'),
                b'r' => out.push(b'\r'),
                b't' => out.push(b'\t'),
                c @ (b'\'' | b'"' | b'\\') => out.push(c),
                b'x' if i + 2 < b.len()
                    && b[i + 1].is_ascii_hexdigit()
                    && b[i + 2].is_ascii_hexdigit() =>
                {
                    let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 2;
                }
                c => out.extend([b'\\', c]),
            }
        } else {
            out.push(b[i]);
        }
        i += 1;
    }
    String::from_utf8(out).expect("the reference texts stay UTF-8")
}

#[test]
fn gemma3_ids_match_llama_cpp() {
    let Some(tok) = gemma() else { return };
    let cases = reference_cases();
    assert_eq!(cases.len(), 16);
    for (text, want) in &cases {
        assert_eq!(&tok.encode(text, false).unwrap(), want, "ids of {text:?}");
        assert_eq!(
            &tok.decode_with_special(want).unwrap(),
            text,
            "round trip of {text:?}"
        );
        // Raw bytes of the pieces add up to the text.
        let bytes: Vec<u8> = want.iter().flat_map(|&id| tok.token_bytes(id)).collect();
        assert_eq!(bytes, text.as_bytes(), "token bytes of {text:?}");
    }
    // Two backslashes are one token ("▁\\\\"), not the reference's "▁\\" for one.
    let two = tok.encode(" \\\\", false).unwrap();
    assert_eq!(two.len(), 1);
    assert_eq!(tok.token_bytes(two[0]), b" \\\\");
}

#[test]
fn gemma3_special_ids() {
    let Some(tok) = gemma() else { return };
    assert_eq!(tok.vocab_size(), 262144);
    assert_eq!(tok.bos_token(), Some("<bos>"));
    assert_eq!(tok.bos_token_id(), Some(2));
    assert_eq!(tok.pad_token_id(), Some(0));
    assert_eq!(tok.eos_token(), Some("<eos>"));
    let end_of_turn = tok.token_to_id("<end_of_turn>").unwrap();
    assert_eq!(tok.eos_token_ids(), &[1, end_of_turn]);
    assert!(tok.add_bos_token());
    assert_eq!(tok.encode("x", true).unwrap(), vec![2, 236781]);
    assert_eq!(tok.token_bytes(tok.token_to_id("<0x0A>").unwrap()), b"\n");
    assert_eq!(
        tok.token_bytes(tok.token_to_id("▁return").unwrap()),
        b" return"
    );
    assert_eq!(tok.hf().get_vocab_size(true), 262144);
    // Control tokens are left out of plain decoding.
    let ids = tok
        .encode("<start_of_turn>user\nhi<end_of_turn>", false)
        .unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), "user\nhi");
}

#[test]
fn gemma3_stream_holds_back_split_characters() {
    let Some(tok) = gemma() else { return };
    for (text, ids) in reference_cases() {
        let mut stream = tok.stream();
        let mut chunks = Vec::new();
        for id in ids {
            chunks.extend(stream.next(id).unwrap());
        }
        chunks.extend(stream.flush().unwrap());
        assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')), "{chunks:?}");
        assert_eq!(
            chunks.concat(),
            tok.decode(&tok.encode(&text, false).unwrap()).unwrap()
        );
    }
}

/// Constrained decoding builds its token trie from `hf()`: byte tokens, `▁` and special tokens
/// must come out right for a SentencePiece vocabulary too.
fn forced_text(tok: &Tokenizer, regex: &str) -> String {
    let factory = ConstraintFactory::new(tok, tok.vocab_size()).unwrap();
    let mut state = factory.compile(&Constraint::Regex(regex.into())).unwrap();
    let mut ids = Vec::new();
    for _ in 0..64 {
        let forced = state.consume_forced();
        if forced.is_empty() {
            break;
        }
        ids.extend(forced);
    }
    // Whatever is not forced: the only token the mask allows, taken one at a time.
    for _ in 0..64 {
        if state.is_done() {
            break;
        }
        let mut logits = vec![0.0f32; tok.vocab_size()];
        state.mask(&mut logits).unwrap();
        let allowed: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| logits[i as usize].is_finite())
            .collect();
        let Some(&next) = allowed.iter().find(|&&i| !tok.eos_token_ids().contains(&i)) else {
            break;
        };
        state.consume(next).unwrap();
        ids.push(next);
    }
    tok.decode(&ids).unwrap()
}

#[test]
fn tiny_constrained_decoding() {
    let tok = tiny(Some(false));
    assert_eq!(forced_text(&tok, " hello ß\n"), " hello ß\n");
}

#[test]
fn gemma3_constrained_decoding() {
    let Some(tok) = gemma() else { return };
    assert_eq!(
        forced_text(&tok, "def f\\(\\):\n\treturn 'é'"),
        "def f():\n\treturn 'é'"
    );
}

/// A vocabulary with a piece that looks like a byte token and is not one (`<0xZZ>`): the
/// constraint library's trie builder panics on it; forgeline reports an error instead (a
/// hostile model file never crashes a grammar request).
#[test]
fn a_vocabulary_the_constraint_library_cannot_read_is_an_error() {
    let mut content = tiny_spm(Some(false));
    let push = |content: &mut Content, key: &str, v: Value| match content.metadata.get_mut(key) {
        Some(Value::Array(a)) => a.push(v),
        _ => panic!("{key} is not an array"),
    };
    push(
        &mut content,
        "tokenizer.ggml.tokens",
        Value::String("<0xZZ>".into()),
    );
    push(&mut content, "tokenizer.ggml.scores", Value::F32(-30.0));
    push(&mut content, "tokenizer.ggml.token_type", Value::I32(1));
    let Ok(tok) = Tokenizer::from_gguf(&content, Path::new("odd.gguf")) else {
        return; // refused earlier: no panic either
    };
    let made =
        std::panic::catch_unwind(|| ConstraintFactory::new(&tok, tok.vocab_size()).map(|_| ()));
    let res = made.expect("ConstraintFactory::new panicked");
    if let Err(e) = res {
        assert!(e.to_string().contains("constrained decoding"), "{e}");
    }
}
