//! The tokenizer built from GGUF metadata and from tokenizer.json, the token stream and the
//! chat template sources, on a small tokenizer these tests make (no model file needed).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Content, Value, VersionedMagic};
use forgeline_engine::chat::{ChatMessage, ChatTemplate};
use forgeline_engine::tokenizer::{PreTokenizer, Tokenizer};

mod common;
use common::byte_chars;

/// A small GGUF tokenizer: 3 control tokens, the 256 bytes, a few merges.
fn tiny_gguf(pre: &str, template: Option<&str>) -> Content {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    tokens.extend(byte_chars().into_iter().map(String::from));
    let merges = [
        "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", "1 2", "12 3",
        "Ċ Ċ",
    ];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    tokens.push("<tool>".into());
    let mut types = vec![3i32; 3];
    types.resize(tokens.len() - 1, 1);
    types.push(4);
    let s = |x: &str| Value::String(x.to_string());
    let mut md = HashMap::from([
        ("tokenizer.ggml.model".to_string(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s(pre)),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.iter().map(|m| s(m)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ]);
    if let Some(t) = template {
        md.insert("tokenizer.chat_template".into(), s(t));
    }
    Content {
        magic: VersionedMagic::GgufV3,
        metadata: md,
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    }
}

fn tiny(pre: &str) -> Tokenizer {
    Tokenizer::from_gguf(&tiny_gguf(pre, None), Path::new("tiny.gguf")).unwrap()
}

#[test]
fn gguf_metadata_builds_bpe_with_specials() {
    let tok = tiny("smollm");
    let hello = tok.token_to_id("hello").unwrap();
    let world = tok.token_to_id("Ġworld").unwrap();
    assert_eq!(
        tok.encode("hello world", false).unwrap(),
        vec![hello, world]
    );
    let ids = tok
        .encode("<|im_start|>hello<tool><|im_end|>", true)
        .unwrap();
    assert_eq!(
        ids,
        vec![1, 1, hello, tok.token_to_id("<tool>").unwrap(), 2]
    );
    assert_eq!(tok.decode(&ids).unwrap(), "hello<tool>");
    assert_eq!(
        tok.decode_with_special(&ids).unwrap(),
        "<|im_start|><|im_start|>hello<tool><|im_end|>"
    );
    assert_eq!(
        (tok.bos_token(), tok.eos_token()),
        (Some("<|im_start|>"), Some("<|im_end|>"))
    );
    // No template: <|im_end|> is the EOS, <|endoftext|> always ends generation.
    assert_eq!(tok.eos_token_ids(), &[2, 0]);
    assert_eq!(tok.vocab_size(), 3 + 256 + 12 + 1);
    assert!(!tok.add_bos_token());
    let text = "tab\tnew\nline ünïcödé 🐍 x";
    assert_eq!(tok.decode(&tok.encode(text, false).unwrap()).unwrap(), text);
}

#[test]
fn pre_tokenizers_split_digits_as_llama_cpp_does() {
    let single = |pre: &str| tiny(pre).encode("123", false).unwrap().len();
    assert_eq!(single("smollm"), 3);
    assert_eq!(single("qwen2"), 3);
    assert_eq!(single("llama-bpe"), 1);
    assert_eq!(single("default"), 1);
    assert_eq!(
        single("no-such-pre"),
        1,
        "unknown names fall back to default"
    );
    assert_eq!(
        PreTokenizer::from_gguf_name("no-such-pre"),
        PreTokenizer::Default
    );
    // Qwen2 keeps a run of newlines together; GPT-2's `\s+(?!\S)` leaves the last alone.
    let newlines = |pre: &str| tiny(pre).encode("a\n\nb", false).unwrap().len();
    assert_eq!(
        (newlines("qwen2"), newlines("llama-bpe"), newlines("smollm")),
        (3, 3, 4)
    );
    let q = tiny("qwen2");
    assert_eq!(
        q.decode(&q.encode("a  \n\n b", false).unwrap()).unwrap(),
        "a  \n\n b"
    );
}

#[test]
fn missing_key_names_key_and_file() {
    let mut content = tiny_gguf("smollm", None);
    content.metadata.remove("tokenizer.ggml.merges");
    let err = Tokenizer::from_gguf(&content, Path::new("/m/x.gguf"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer.ggml.merges") && err.contains("/m/x.gguf"),
        "{err}"
    );
}

#[test]
fn template_decides_end_of_turn_tokens() {
    let content = tiny_gguf("smollm", Some("{{ '<|eot_id|>' }}"));
    let tok = Tokenizer::from_gguf(&content, Path::new("t.gguf")).unwrap();
    assert_eq!(tok.eos_token_ids(), &[2, 0]);
    assert!(tok.is_eos(0) && !tok.is_eos(1));
}

#[test]
fn from_file_reads_tokenizer_json_and_configs() {
    let dir = tempfile::tempdir().unwrap();
    let built = tiny("smollm");
    let json = dir.path().join("tokenizer.json");
    built.hf().save(&json, false).unwrap();
    let config = serde_json::json!({
        "bos_token": {"content": "<|im_start|>", "special": true},
        "eos_token": "<|endoftext|>",
        "add_bos_token": true,
        "chat_template": [{"name": "default", "template": "{{ '<|im_end|>' }}"}],
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let tok = Tokenizer::from_file(&json).unwrap();
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token(), Some("<|endoftext|>"));
    assert_eq!(tok.eos_token_ids(), &[0, 2]);
    assert!(tok.add_bos_token());
    let text = "<|im_start|>hello world 123 🐍";
    assert_eq!(
        tok.encode(text, true).unwrap(),
        built.encode(text, true).unwrap()
    );
    assert_eq!(tok.vocab_size(), built.vocab_size());

    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [2, 0]}"#,
    )
    .unwrap();
    std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
    let tok = Tokenizer::from_file(&json).unwrap();
    assert_eq!(
        (tok.bos_token_id(), tok.eos_token_ids()),
        (None, &[2u32, 0][..])
    );
    assert!(tok.encode("a", true).is_err(), "BOS requested without one");
    let missing = Tokenizer::from_file(&dir.path().join("nope.json")).unwrap_err();
    assert!(missing.to_string().contains("nope.json"));
}

#[test]
fn stream_never_splits_a_character() {
    let tok = tiny("smollm");
    let text = "hello 🐍 world ✓!";
    let ids = tok.encode(text, false).unwrap();
    let mut stream = tok.stream();
    let mut chunks = Vec::new();
    let mut held = 0;
    for &id in &ids {
        match stream.next(id).unwrap() {
            Some(chunk) => chunks.push(chunk),
            None => held += 1,
        }
    }
    chunks.extend(stream.flush().unwrap());
    // The snake is four byte tokens: three of them complete nothing.
    assert!(held >= 3, "{held} tokens held back");
    assert!(
        chunks
            .iter()
            .all(|c| !c.contains(char::REPLACEMENT_CHARACTER)),
        "{chunks:?}"
    );
    assert!(
        chunks.contains(&"🐍".to_string()) || chunks.contains(&" 🐍".to_string()),
        "{chunks:?}"
    );
    assert_eq!(chunks.concat(), text);
    // A trailing half character only comes out at flush, as a replacement character.
    let mut stream = tok.stream();
    let snake = tok.encode("🐍", false).unwrap();
    assert_eq!(
        stream.next(2).unwrap(),
        None,
        "control tokens print nothing"
    );
    assert_eq!(stream.next(snake[0]).unwrap(), None);
    assert_eq!(stream.flush().unwrap().as_deref(), Some("\u{FFFD}"));
    assert_eq!(stream.flush().unwrap(), None);
}

fn sys_user() -> Vec<ChatMessage> {
    vec![
        ChatMessage::system("You write Python."),
        ChatMessage::user("Add two numbers."),
    ]
}

#[test]
fn gguf_file_on_disk_loads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let content = tiny_gguf("qwen2", Some("{{ '<|im_end|>' }}"));
    let metadata: Vec<(&str, &Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut f, &metadata, &[]).unwrap();
    drop(f);
    let tok = Tokenizer::from_gguf_file(&path).unwrap();
    let from_memory = Tokenizer::from_gguf(&content, &path).unwrap();
    let text = "<|im_start|>hello world 123\n\n🐍";
    assert_eq!(
        tok.encode(text, false).unwrap(),
        from_memory.encode(text, false).unwrap()
    );
    assert_eq!(tok.encode("123", false).unwrap().len(), 3);
    assert_eq!(tok.eos_token_ids(), &[2, 0]);
    let err = Tokenizer::from_gguf_file(&dir.path().join("missing.gguf")).unwrap_err();
    assert!(err.to_string().contains("missing.gguf"), "{err}");
    std::fs::write(dir.path().join("junk.gguf"), b"not a gguf").unwrap();
    let err = Tokenizer::from_gguf_file(&dir.path().join("junk.gguf")).unwrap_err();
    assert!(err.to_string().contains("junk.gguf"), "{err}");
}

#[test]
fn chatml_default_and_sources() {
    let tok = tiny("smollm");
    let t = ChatTemplate::chatml(&tok);
    assert_eq!(
        t.render(&sys_user()[..1], true).unwrap(),
        "<|im_start|>system\nYou write Python.<|im_end|>\n<|im_start|>assistant\n"
    );
    assert!(
        ChatTemplate::from_gguf(&tiny_gguf("smollm", None), Path::new("t.gguf"), &tok)
            .unwrap()
            .is_none()
    );
    let content = tiny_gguf("smollm", Some("{{ bos_token }}{{ eos_token }}"));
    let t = ChatTemplate::from_gguf(&content, Path::new("t.gguf"), &tok)
        .unwrap()
        .unwrap();
    assert_eq!(t.render(&[], false).unwrap(), "<|im_start|><|im_end|>");

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tokenizer_config.json");
    assert!(ChatTemplate::from_tokenizer_config(&config, &tok)
        .unwrap()
        .is_none());
    std::fs::write(dir.path().join("chat_template.jinja"), "jinja file").unwrap();
    let t = ChatTemplate::from_tokenizer_config(dir.path(), &tok)
        .unwrap()
        .unwrap();
    assert_eq!(t.source(), "jinja file");
    let list = serde_json::json!({"chat_template": [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "{{ messages|length }} turns"},
    ]});
    std::fs::write(&config, list.to_string()).unwrap();
    let t = ChatTemplate::from_tokenizer_config(&config, &tok)
        .unwrap()
        .unwrap();
    assert_eq!(t.render(&sys_user(), false).unwrap(), "2 turns");
    std::fs::write(&config, r#"{"chat_template": "{{ 'plain' }}"}"#).unwrap();
    let t = ChatTemplate::from_tokenizer_config(&config, &tok)
        .unwrap()
        .unwrap();
    assert_eq!(t.render(&[], true).unwrap(), "plain");
}

#[test]
fn dry_breakers_are_the_tokens_holding_a_breaker_and_the_specials() {
    let tok = tiny("smollm");
    let clone = tok.clone();
    let b = tok.dry_breakers();
    assert_eq!(b.len(), tok.vocab_size());
    // Built once: clones (the client's, the engine thread's) share the table.
    assert!(std::ptr::eq(b, clone.dry_breakers()));
    let id = |t: &str| tok.token_to_id(t).unwrap() as usize;
    // Newline (Ċ), a pair of them, quote and colon break a run; words and specials do not
    // continue one either way.
    for t in ["Ċ", "ĊĊ", "\"", ":", "*"] {
        assert!(b[id(t)], "{t} is a breaker");
    }
    for t in ["hello", "Ġworld", "123", "a"] {
        assert!(!b[id(t)], "{t} is not a breaker");
    }
    assert!(b[id("<|im_end|>")] && b[id("<|endoftext|>")]);
}
