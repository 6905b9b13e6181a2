//! The default model's tokenizer and chat template against llama.cpp's reference.
//!
//! Uses the real model file: run `scripts/fetch-default-model` first.

use std::path::PathBuf;

use candle_core::quantized::gguf_file::Content;
use forgeline_engine::chat::{ChatMessage, ChatTemplate};
use forgeline_engine::tokenizer::Tokenizer;

/// llama.cpp's ids (llama-cpp-python 0.3.36, special tokens parsed, no BOS) for 15 strings.
const REFERENCE: &str = include_str!("data/smollm2-135m-instruct-tokens.json");

fn default_model() -> (Tokenizer, Content) {
    let path = path_of_default();
    assert!(
        path.exists(),
        "default model missing at {}: run scripts/fetch-default-model",
        path.display()
    );
    let mut f = std::fs::File::open(&path).unwrap();
    let content = Content::read(&mut f).unwrap();
    (Tokenizer::from_gguf(&content, &path).unwrap(), content)
}

fn path_of_default() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[test]
fn default_model_ids_match_llama_cpp() {
    let (tok, _) = default_model();
    let reference: serde_json::Value = serde_json::from_str(REFERENCE).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 15);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), want, "ids of {text:?}");
        assert_eq!(
            tok.decode_with_special(&want).unwrap(),
            text,
            "round trip of {text:?}"
        );
    }
}

#[test]
fn default_model_special_ids() {
    let (tok, _) = default_model();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.pad_token_id(), Some(2));
    assert_eq!(tok.bos_token(), Some("<|im_start|>"));
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    assert_eq!(tok.eos_token_ids(), &[2, 0]);
    assert!(!tok.add_bos_token());
    assert_eq!(tok.encode("x", true).unwrap(), vec![1, 104]);
    assert_eq!(tok.hf().get_vocab_size(true), 49152);
}

#[test]
fn default_model_stream_holds_back_split_emoji() {
    let (tok, _) = default_model();
    let text = "emoji: 🐍🚀👩\u{200d}💻 and ✓";
    let mut stream = tok.stream();
    let mut chunks = Vec::new();
    for id in tok.encode(text, false).unwrap() {
        chunks.extend(stream.next(id).unwrap());
    }
    chunks.extend(stream.flush().unwrap());
    assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')), "{chunks:?}");
    assert!(chunks.iter().any(|c| c == "🐍" || c == " 🐍"), "{chunks:?}");
    assert_eq!(chunks.concat(), text);
}

#[test]
fn default_model_chat_template() {
    let (tok, content) = default_model();
    let template = ChatTemplate::from_gguf(&content, &path_of_default(), &tok)
        .unwrap()
        .expect("SmolLM2 has a template");
    let messages = [
        ChatMessage::system("You are a Python expert."),
        ChatMessage::user("Write a function that reverses a string."),
    ];
    assert_eq!(
        template.render(&messages, true).unwrap(),
        "<|im_start|>system\nYou are a Python expert.<|im_end|>\n\
         <|im_start|>user\nWrite a function that reverses a string.<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    // Without a system message the template supplies SmolLM's own.
    assert_eq!(
        template.render(&messages[1..], false).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWrite a function that reverses a string.<|im_end|>\n"
    );
    let prompt = template.render(&messages, true).unwrap();
    let ids = tok.encode(&prompt, false).unwrap();
    assert_eq!(&ids[..2], &[1, 9690], "<|im_start|>system");
    assert_eq!(
        &ids[ids.len() - 4..],
        &[1, 520, 9531, 198],
        "<|im_start|>assistant\\n"
    );
}
