//! Hostile model files: malformed GGUF headers, shapes and hyper-parameters, tokenizers and
//! chat templates, and files that are not files (FIFOs, /dev/zero). Each is an error that
//! names the file and the problem; none panics, hangs or allocates without bound. The
//! `prop_` properties feed the GGUF reader, the tokenizer builder and chat templates
//! arbitrary and mutated input (`scripts/fuzz` runs them for a million cases).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use forgeline_engine::chat::{ChatMessage, ChatTemplate};
use forgeline_engine::loader::load;
use forgeline_engine::model::gguf;
use forgeline_engine::model::ModelConfig;
use forgeline_engine::registry::{Format, ModelLocation, Registry};
use forgeline_engine::tokenizer::Tokenizer;
use proptest::prelude::*;

mod common;
use common::{Arch, Spec, TinyModel};

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The smallest model the loader accepts: fast to write, load and mutate.
fn mini() -> TinyModel {
    // Q8_0 blocks are 32 wide.
    TinyModel::new(Spec {
        hidden: 32,
        heads: 2,
        kv_heads: 1,
        intermediate: 64,
        layers: 1,
        context: 32,
        ..Spec::small(Arch::Llama)
    })
}

fn loc(path: &Path) -> ModelLocation {
    ModelLocation {
        name: "hostile".into(),
        format: Format::Gguf,
        path: path.to_path_buf(),
        chat_template: None,
        recipe: Default::default(),
    }
}

/// Loads `path`, which must fail; returns the error's text. Panics (failing the test) if
/// the load takes more than 20 s.
fn load_err(path: &Path, format: Format) -> String {
    let started = Instant::now();
    let l = ModelLocation {
        format,
        ..loc(path)
    };
    let res = load(&l, &Device::Cpu);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "load took too long"
    );
    match res {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error does not mention `{p}`: {err}");
    }
}

/// Runs `f` on a thread; fails the test if it has not returned within `secs` (a hang).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .expect("did not finish in time (a hang)")
}

/// The byte offset just past the name of tensor `name` in a GGUF v3 file's tensor infos
/// (where its rank is written).
fn tensor_info_at(bytes: &[u8], name: &str) -> usize {
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend(name.as_bytes());
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("tensor info present");
    at + key.len()
}

fn put_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

// ---------------------------------------------------------------------------------------------
// GGUF headers.

#[test]
fn zero_alignment_is_named_not_divided_by() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = mini();
    let path = dir.path().join("align0.gguf");
    let mut md = tiny.gguf_metadata();
    md.push(("general.alignment".into(), Value::U32(0)));
    common::write_gguf(&path, &md, &tiny.gguf_tensors(GgmlDType::F32));
    let err = load_err(&path, Format::Gguf);
    assert_mentions(&err, &["align0.gguf", "general.alignment is 0"]);
    let err = Tokenizer::from_gguf_file(&path).unwrap_err().to_string();
    assert_mentions(&err, &["align0.gguf", "general.alignment is 0"]);
}

#[test]
fn overflowing_tensor_offsets_and_shapes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = mini();
    let path = dir.path().join("ok.gguf");
    tiny.write_gguf(&path, GgmlDType::F32);
    let good = std::fs::read(&path).unwrap();
    // token_embd.weight: rank u32, two u64 dims, type u32, offset u64.
    let at = tensor_info_at(&good, "token_embd.weight");

    let mut bytes = good.clone();
    put_u64(&mut bytes, at + 4 + 16 + 4, u64::MAX - 10);
    let p = dir.path().join("offset.gguf");
    std::fs::write(&p, &bytes).unwrap();
    assert_mentions(
        &load_err(&p, Format::Gguf),
        &["offset.gguf", "tensor `token_embd.weight`", "overflows"],
    );

    let mut bytes = good.clone();
    put_u64(&mut bytes, at + 4, 1 << 40);
    put_u64(&mut bytes, at + 12, 1 << 40);
    let p = dir.path().join("dims.gguf");
    std::fs::write(&p, &bytes).unwrap();
    assert_mentions(
        &load_err(&p, Format::Gguf),
        &[
            "dims.gguf",
            "tensor `token_embd.weight`",
            "element count overflows",
        ],
    );

    // Past the end of the file, without overflowing.
    let mut bytes = good;
    put_u64(&mut bytes, at + 4 + 16 + 4, 1 << 50);
    let p = dir.path().join("far.gguf");
    std::fs::write(&p, &bytes).unwrap();
    assert_mentions(
        &load_err(&p, Format::Gguf),
        &["far.gguf", "truncated", "token_embd.weight"],
    );
}

#[test]
fn a_scalar_embedding_is_a_shape_error() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = mini();
    let path = dir.path().join("scalar.gguf");
    // Without a vocabulary in the metadata, the vocabulary size comes from the embedding.
    let md: Vec<(String, Value)> = tiny
        .gguf_metadata()
        .into_iter()
        .filter(|(k, _)| k != "tokenizer.ggml.tokens")
        .collect();
    let mut tensors = tiny.gguf_tensors(GgmlDType::F32);
    let one = Tensor::new(&[1f32], &Device::Cpu).unwrap();
    tensors
        .iter_mut()
        .find(|(n, _)| n == "token_embd.weight")
        .unwrap()
        .1 = QTensor::quantize(&one, GgmlDType::F32).unwrap();
    common::write_gguf(&path, &md, &tensors);
    // candle writes no rank-0 tensors: drop the one dimension of [1] by hand, and pad the
    // end so that every tensor still lies in the file.
    let mut bytes = std::fs::read(&path).unwrap();
    let at = tensor_info_at(&bytes, "token_embd.weight");
    assert_eq!(bytes[at..at + 4], 1u32.to_le_bytes());
    bytes[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
    bytes.drain(at + 4..at + 12);
    bytes.extend([0u8; 8]);
    std::fs::write(&path, bytes).unwrap();
    assert_mentions(
        &load_err(&path, Format::Gguf),
        &[
            "scalar.gguf",
            "tensor `token_embd.weight` has shape []",
            "expected [vocab, 32]",
        ],
    );
}

#[test]
fn absurd_hyper_parameters_are_named_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = mini();
    for (key, value, says) in [
        (
            "llama.context_length",
            Value::U32(u32::MAX),
            "context length is 4294967295",
        ),
        (
            "llama.embedding_length",
            Value::I32(-16),
            "llama.embedding_length`: -16 is out of range",
        ),
        (
            "llama.attention.head_count_kv",
            Value::U32(0),
            "kv head count is 0",
        ),
        ("llama.block_count", Value::U64(1 << 40), "out of range"),
    ] {
        let path = dir.path().join("params.gguf");
        let mut md = tiny.gguf_metadata();
        md.retain(|(k, _)| k != key);
        md.push((key.into(), value));
        common::write_gguf(&path, &md, &tiny.gguf_tensors(GgmlDType::F32));
        assert_mentions(&load_err(&path, Format::Gguf), &["params.gguf", says]);
    }
}

#[test]
fn fifos_and_devices_are_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("model.gguf");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let models = dir.path().to_path_buf();
    let f = fifo.clone();
    let err = within(10, move || {
        Registry::new(models)
            .resolve(f.to_str().unwrap())
            .unwrap_err()
            .to_string()
    });
    assert_mentions(&err, &["model.gguf", "not a GGUF"]);
    let f = fifo.clone();
    let err = within(10, move || {
        Tokenizer::from_gguf_file(&f).unwrap_err().to_string()
    });
    assert_mentions(&err, &["model.gguf", "not a regular file"]);

    // A safetensors directory whose config.json is a FIFO and tokenizer.json is /dev/zero.
    let st = dir.path().join("st");
    mini().write_safetensors(&st, candle_core::DType::F32, 1);
    std::fs::remove_file(st.join("config.json")).unwrap();
    let c = std::ffi::CString::new(st.join("config.json").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let s = st.clone();
    let err = within(10, move || load_err(&s, Format::Safetensors));
    assert_mentions(&err, &["config.json", "not a regular file"]);
    std::fs::remove_file(st.join("config.json")).unwrap();
    std::fs::write(st.join("config.json"), mini().hf_config().to_string()).unwrap();
    std::fs::remove_file(st.join("tokenizer.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", st.join("tokenizer.json")).unwrap();
    let s = st.clone();
    let err = within(10, move || load_err(&s, Format::Safetensors));
    assert_mentions(&err, &["tokenizer.json", "not a regular file"]);
}

#[test]
fn the_default_model_reads_as_candle_reads_it() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        eprintln!("skipped: no default model at {}", path.display());
        return;
    }
    let (_, ours) = gguf::read_file(&path).unwrap();
    let mut f = std::fs::File::open(&path).unwrap();
    let theirs = Content::read(&mut f).unwrap();
    assert_eq!(ours.tensor_data_offset, theirs.tensor_data_offset);
    assert_eq!(ours.metadata.len(), theirs.metadata.len());
    assert_eq!(ours.tensor_infos.len(), theirs.tensor_infos.len());
    for (name, t) in &theirs.tensor_infos {
        let o = &ours.tensor_infos[name];
        assert_eq!(
            (o.shape.dims(), o.offset, o.ggml_dtype),
            (t.shape.dims(), t.offset, t.ggml_dtype)
        );
    }
    for (k, v) in &theirs.metadata {
        assert_eq!(format!("{:?}", ours.metadata[k]), format!("{v:?}"), "{k}");
    }
}

// ---------------------------------------------------------------------------------------------
// Tokenizers.

type Metadata = Vec<(String, Value)>;

#[test]
fn malformed_gguf_tokenizers_are_errors() {
    let path = Path::new("/m/tok.gguf");
    let content = |edit: &dyn Fn(&mut Metadata)| {
        let mut md = common::tokenizer_metadata("smollm");
        edit(&mut md);
        Content {
            magic: candle_core::quantized::gguf_file::VersionedMagic::GgufV3,
            metadata: md.into_iter().collect(),
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        }
    };
    let set = |key: &'static str, v: Value| {
        move |md: &mut Vec<(String, Value)>| {
            md.retain(|(k, _)| k != key);
            md.push((key.into(), v.clone()));
        }
    };
    for (edit, says) in [
        (
            Box::new(set("tokenizer.ggml.bos_token_id", Value::U32(303))) as Box<dyn Fn(&mut _)>,
            "tokenizer.ggml.bos_token_id is 303, outside the vocabulary of 303 tokens",
        ),
        (
            Box::new(set("tokenizer.ggml.eos_token_id", Value::I64(1 << 40))),
            "tokenizer.ggml.eos_token_id is 1099511627776",
        ),
        (
            Box::new(set("tokenizer.ggml.tokens", Value::Array(vec![]))),
            "tokenizer.ggml.tokens is empty",
        ),
        (
            Box::new(set("tokenizer.ggml.token_type", Value::Array(vec![]))),
            "tokenizer.ggml.token_type has 0 entries for 303 tokens",
        ),
        (
            Box::new(set("tokenizer.ggml.merges", Value::U32(1))),
            "tokenizer.ggml.merges is not an array",
        ),
    ] {
        let err = Tokenizer::from_gguf(&content(&*edit), path)
            .unwrap_err()
            .to_string();
        assert_mentions(&err, &["/m/tok.gguf", says]);
    }
    // Merges of pieces outside the vocabulary are dropped, not followed.
    let c = content(&set(
        "tokenizer.ggml.merges",
        Value::Array(vec![
            Value::String("zz qq".into()),
            Value::String("Ġ t".into()),
        ]),
    ));
    let tok = Tokenizer::from_gguf(&c, path).unwrap();
    assert_eq!(
        tok.decode(&tok.encode(" the zz", false).unwrap()).unwrap(),
        " the zz"
    );
}

#[test]
fn malformed_tokenizer_json_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tokenizer.json");
    for (json, says) in [
        ("{", "bad tokenizer.json"),
        (
            r#"{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}}"#,
            "bad tokenizer.json",
        ),
        (
            r#"{"model": {"type": "BPE", "vocab": {}, "merges": []}}"#,
            "the vocabulary is empty",
        ),
    ] {
        std::fs::write(&p, json).unwrap();
        let err = Tokenizer::from_file(&p).unwrap_err().to_string();
        assert_mentions(&err, &["tokenizer.json", says]);
    }
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": 4000000000}"#,
    )
    .unwrap();
    common::write_hf_tokenizer(dir.path(), "smollm");
    let err = Tokenizer::from_file(&p).unwrap_err().to_string();
    assert_mentions(
        &err,
        &[
            "generation_config.json",
            "eos_token_id 4000000000 is outside",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Chat templates.

const NESTED_LOOPS: &str = "{% for a in range(100000) %}{% for b in range(100000) %}\
{% for c in range(100000) %}x{% endfor %}{% endfor %}{% endfor %}";

#[test]
fn an_endless_template_runs_out_of_fuel_at_load_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = mini();
    let path = dir.path().join("loop.gguf");
    let mut md = tiny.gguf_metadata();
    md.push((
        "tokenizer.chat_template".into(),
        Value::String(NESTED_LOOPS.into()),
    ));
    common::write_gguf(&path, &md, &tiny.gguf_tensors(GgmlDType::F32));
    let p = path.clone();
    let err = within(30, move || load_err(&p, Format::Gguf));
    assert_mentions(
        &err,
        &["loop.gguf", "tokenizer.chat_template", "ran out of fuel"],
    );
}

fn render_err(source: &str) -> String {
    let t = ChatTemplate::new(source.into(), None, None).unwrap();
    let started = Instant::now();
    let msgs = [ChatMessage::user("hi")];
    let err = t.render(&msgs, true).unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(5), "{source}: slow");
    err
}

#[test]
fn templates_hit_limits_instead_of_hanging_or_exhausting_memory() {
    assert_mentions(&render_err(NESTED_LOOPS), &["ran out of fuel"]);
    assert_mentions(
        &render_err("{% for i in range(1000) %}{{ 'x' * 100000 }}{% endfor %}"),
        &["output exceeds"],
    );
    assert_mentions(
        &render_err("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
        &["recursion"],
    );
    // Filters and methods that would allocate whatever they are told (these abort or
    // panic without the checks).
    for (src, says) in [
        ("{{ 'a\nb'|indent(10**12) }}", "indent width"),
        ("{{ [1]|batch(10**18, 0) }}", "batch size"),
        ("{{ [1]|slice(10**18) }}", "slice count"),
        (
            "{{ ('x' * 10000)|replace('', 'y' * 10000) }}",
            "replace result",
        ),
        (
            "{{ ('x' * 10000).replace('x', 'y' * 10000) }}",
            "replace result",
        ),
        ("{{ '%*s'|format(10**12, 'x') }}", "format argument"),
        ("{{ '{:>1000000000000}'.format('x') }}", "format strings"),
    ] {
        assert_mentions(&render_err(src), &[says]);
    }
}

// ---------------------------------------------------------------------------------------------
// Properties.

/// A small valid GGUF model file, as bytes.
fn valid_gguf() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mini.gguf");
        let tiny = mini();
        let mut md = tiny.gguf_metadata();
        md.push((
            "tokenizer.chat_template".into(),
            Value::String(forgeline_engine::chat::CHATML_TEMPLATE.into()),
        ));
        common::write_gguf(&path, &md, &tiny.gguf_tensors(GgmlDType::Q8_0));
        std::fs::read(path).unwrap()
    })
}

/// Everything the loader builds from a header, short of the weights.
fn use_header(c: &Content) {
    let path = Path::new("mutated.gguf");
    let _ = ModelConfig::from_gguf(c, path);
    if let Ok(tok) = Tokenizer::from_gguf(c, path) {
        let _ = tok.encode("def f(x):\n    return x ≤ 1 ➞ é", true);
        if let Ok(Some(t)) = ChatTemplate::from_gguf(c, path, &tok) {
            let _ = t.render(&[ChatMessage::user("hi")], true);
        }
    }
}

#[derive(Clone, Debug)]
enum Mutation {
    /// Overwrite with one byte.
    Byte(usize, u8),
    /// Overwrite eight bytes with a little-endian number (a count, length, dim or offset).
    Word(usize, u64),
    /// Cut the file here.
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    // Most of the header is in the first few KB; weight bytes matter less.
    let at = prop_oneof![3 => 0usize..4096, 1 => 0usize..1 << 20];
    let word = prop_oneof![
        any::<u64>(),
        Just(0u64),
        Just(u64::MAX),
        (0u32..64).prop_map(|b| 1u64 << b),
        0u64..4096,
    ];
    prop_oneof![
        (at.clone(), any::<u8>()).prop_map(|(a, b)| Mutation::Byte(a, b)),
        (at.clone(), word).prop_map(|(a, w)| Mutation::Word(a, w)),
        at.prop_map(Mutation::Truncate),
    ]
}

fn mutate(bytes: &[u8], ms: &[Mutation]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for m in ms {
        let n = b.len().max(1);
        match *m {
            Mutation::Byte(at, v) => {
                if let Some(x) = b.get_mut(at % n) {
                    *x = v;
                }
            }
            Mutation::Word(at, w) => {
                let at = at % n;
                let end = (at + 8).min(b.len());
                b[at..end].copy_from_slice(&w.to_le_bytes()[..end - at]);
            }
            Mutation::Truncate(at) => b.truncate(at % n),
        }
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(2000)))]

    #[test]
    fn prop_gguf_reader_survives_arbitrary_bytes(
        gguf_prefix in any::<bool>(),
        version in 0u32..5,
        rest in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = Vec::new();
        if gguf_prefix {
            bytes.extend(b"GGUF");
            bytes.extend(version.to_le_bytes());
        }
        bytes.extend(rest);
        if let Ok(c) = gguf::read_bytes(&bytes) {
            use_header(&c);
        }
    }

    #[test]
    fn prop_gguf_reader_survives_mutated_files(
        ms in prop::collection::vec(mutation(), 1..4),
    ) {
        let bytes = mutate(valid_gguf(), &ms);
        if let Ok(c) = gguf::read_bytes(&bytes) {
            use_header(&c);
        }
    }
}

fn metadata_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<u32>().prop_map(Value::U32),
        any::<i32>().prop_map(Value::I32),
        any::<u64>().prop_map(Value::U64),
        any::<i64>().prop_map(Value::I64),
        any::<f32>().prop_map(Value::F32),
        any::<f64>().prop_map(Value::F64),
        any::<bool>().prop_map(Value::Bool),
        (0u32..8).prop_map(Value::U32),
        "\\PC{0,8}".prop_map(Value::String),
    ];
    prop_oneof![
        4 => leaf,
        1 => prop::collection::vec(any::<u32>().prop_map(Value::U32), 0..4).prop_map(Value::Array),
        1 => prop::collection::vec("\\PC{0,4}".prop_map(Value::String), 0..4)
            .prop_map(Value::Array),
    ]
}

proptest! {
    // Each case writes and fully loads a model (a few ms).
    #![proptest_config(ProptestConfig::with_cases(cases(200)))]

    #[test]
    fn prop_loading_mutated_model_files_never_panics(
        ms in prop::collection::vec(mutation(), 1..3),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, mutate(valid_gguf(), &ms)).unwrap();
        let _ = load(&loc(&path), &Device::Cpu);
    }

    #[test]
    fn prop_loading_models_with_random_metadata_values_never_panics(
        edits in prop::collection::vec((any::<prop::sample::Index>(), metadata_value()), 1..3),
    ) {
        let tiny = mini();
        let mut md = tiny.gguf_metadata();
        md.push(("general.alignment".into(), Value::U32(32)));
        for (i, v) in edits {
            let at = i.index(md.len());
            md[at].1 = v;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        common::write_gguf(&path, &md, &tiny.gguf_tensors(GgmlDType::F32));
        let _ = load(&loc(&path), &Device::Cpu);
    }
}

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "\\PC{0,4}",
        1 => prop::sample::select(vec!["", " ", "Ġ", "Ċ", "<|im_end|>", "a", "b", "ab", "\u{0}"])
            .prop_map(String::from),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(2000)))]

    #[test]
    fn prop_tokenizer_builder_survives_arbitrary_vocabularies(
        tokens in prop::collection::vec(token(), 0..24),
        merges in prop::collection::vec(
            prop_oneof![
                (token(), token()).prop_map(|(a, b)| format!("{a} {b}")),
                "\\PC{0,6}",
            ],
            0..24,
        ),
        types in prop::collection::vec(-2i32..8, 0..24),
        ids in prop::collection::vec(-3i64..40, 0..3),
        pre in prop::sample::select(vec!["smollm", "qwen2", "llama-bpe", "gpt-2", "", "??"]),
        text in "\\PC{0,16}",
    ) {
        let s = |x: &str| Value::String(x.to_string());
        let mut md: Vec<(String, Value)> = vec![
            ("tokenizer.ggml.model".into(), s("gpt2")),
            ("tokenizer.ggml.pre".into(), s(pre)),
            ("tokenizer.ggml.tokens".into(), Value::Array(tokens.iter().map(|t| s(t)).collect())),
            ("tokenizer.ggml.merges".into(), Value::Array(merges.iter().map(|m| s(m)).collect())),
        ];
        if !types.is_empty() {
            md.push((
                "tokenizer.ggml.token_type".into(),
                Value::Array(types.into_iter().take(tokens.len()).map(Value::I32).collect()),
            ));
        }
        for (key, id) in ["bos", "eos", "eot"].iter().zip(ids) {
            md.push((format!("tokenizer.ggml.{key}_token_id"), Value::I64(id)));
        }
        let content = Content {
            magic: candle_core::quantized::gguf_file::VersionedMagic::GgufV3,
            metadata: md.into_iter().collect(),
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        };
        if let Ok(tok) = Tokenizer::from_gguf(&content, Path::new("p.gguf")) {
            if let Ok(ids) = tok.encode(&text, tok.bos_token_id().is_some()) {
                let _ = tok.decode(&ids);
                let mut stream = tok.stream();
                for id in ids {
                    let _ = stream.next(id);
                }
                let _ = stream.flush();
            }
            let _ = tok.dry_breakers();
        }
    }

    #[test]
    fn prop_chat_templates_survive_arbitrary_text(
        source in "\\PC{0,40}",
        messages in prop::collection::vec(("\\PC{0,8}", "\\PC{0,24}"), 0..4),
    ) {
        if let Ok(t) = ChatTemplate::new(source, Some("<s>".into()), None) {
            let msgs: Vec<ChatMessage> =
                messages.into_iter().map(|(r, c)| ChatMessage::new(r, c)).collect();
            let _ = t.render(&msgs, true);
        }
    }
}

/// Pieces of Jinja that real templates use, and ones that attack the engine.
fn template_piece() -> impl Strategy<Value = String> {
    let pieces = vec![
        "{% for m in messages %}",
        "{% endfor %}",
        "{% if m.role == 'user' %}",
        "{% else %}",
        "{% endif %}",
        "{{ m.content }}",
        "{{ m['role'] }}",
        "{{ m.content|trim }}",
        "{{ messages|length }}",
        "{{ messages[0].content }}",
        "{{ messages|tojson }}",
        "{{ bos_token }}",
        "{% if add_generation_prompt %}",
        "{{ raise_exception('no') }}",
        "{% for i in range(100000) %}",
        "{% for i in range(3) %}",
        "{{ 'x' * 1000 }}",
        "{{ m.content * 100000 }}",
        "{{ m.content.split() }}",
        "{{ m.content.strip('a') }}",
        "{{ m.content|replace('', '--') }}",
        "{{ m.content.replace('a', 'bb') }}",
        "{{ m.content|indent(4) }}",
        "{{ m.content|indent(10**12) }}",
        "{{ messages|batch(10**15, 0) }}",
        "{{ messages|slice(2) }}",
        "{{ '%s-%d'|format('a', 3) }}",
        "{{ '{}'.format(m) }}",
        "{{ '{:>99999999}'.format(1) }}",
        "{% set ns = namespace(s='ab') %}",
        "{% set ns.s = ns.s ~ ns.s %}",
        "{{ ns.s|length }}",
        "{% macro f(n) %}{{ f(n) }}{% endmacro %}",
        "{{ f(1) }}",
        "{{ strftime_now('%Y') }}",
        "{{",
        "}}",
        "{%",
        "%}",
        "{#",
        "#}",
        "'",
        "\n",
        " ",
        "é≤➞",
    ];
    prop_oneof![
        4 => prop::sample::select(pieces).prop_map(String::from),
        1 => "\\PC{0,4}",
    ]
}

proptest! {
    // A case may run a template out of fuel (a few ms).
    #![proptest_config(ProptestConfig::with_cases(cases(500)))]

    #[test]
    fn prop_chat_templates_built_from_jinja_pieces_end_in_time(
        pieces in prop::collection::vec(template_piece(), 0..16),
        messages in prop::collection::vec(("\\PC{0,8}", "\\PC{0,24}"), 0..4),
    ) {
        let source = pieces.concat();
        if let Ok(t) = ChatTemplate::new(source.clone(), None, Some("</s>".into())) {
            let msgs: Vec<ChatMessage> =
                messages.into_iter().map(|(r, c)| ChatMessage::new(r, c)).collect();
            let started = Instant::now();
            let _ = t.render(&msgs, true);
            prop_assert!(started.elapsed() < Duration::from_secs(5), "slow: {source}");
        }
    }
}
