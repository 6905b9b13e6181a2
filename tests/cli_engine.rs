//! End-to-end tests of the engine commands: they run the real binary on the default model.

use std::process::{Command, Output};

fn forgeline(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_forgeline"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_LOG")
        .output()
        .expect("run forgeline");
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts the exit code, printing the command's output when it differs.
fn expect(args: &[&str], code: i32) -> Output {
    check(forgeline(args), args, code)
}

fn check(out: Output, args: &[&str], code: i32) -> Output {
    assert_eq!(
        out.status.code(),
        Some(code),
        "forgeline {args:?}\nstdout:\n{}\nstderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// forgeline with `--models-dir models`, without RUST_LOG.
fn with_models(models: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_forgeline"));
    c.arg("--models-dir").arg(models).env_remove("RUST_LOG");
    c
}

/// `cmd` run with `args`; asserts the exit code.
fn expect_with(mut cmd: Command, args: &[&str], code: i32) -> Output {
    check(cmd.args(args).output().expect("run forgeline"), args, code)
}

#[test]
fn models_list_and_show_describe_the_default_model() {
    let out = expect(&["models", "list", "--json"], 0);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = list
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "smollm2-135m-instruct")
        .expect("default model listed");
    assert_eq!(m["present"], true, "run scripts/fetch-default-model");

    let out = expect(&["models", "show", "smollm2-135m-instruct", "--json"], 0);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["architecture"], "llama");
    assert_eq!(info["quantization"], "Q4_1");
    assert_eq!(info["context_length"], 8192);
    let params = info["parameters"].as_u64().unwrap();
    assert!((130_000_000..140_000_000).contains(&params), "{params}");
    assert!(info["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
}

#[test]
fn prompt_streams_text_to_stdout_and_timings_to_stderr() {
    let out = expect(
        &[
            "prompt",
            "--chat",
            "--max-tokens",
            "16",
            "Write a Python function that adds two numbers.",
        ],
        0,
    );
    assert!(!text(&out.stdout).trim().is_empty());
    let err = text(&out.stderr);
    assert!(
        err.contains("tok/s") && err.contains("completion 16 tokens"),
        "{err}"
    );

    let out = expect(
        &["prompt", "--json", "--max-tokens", "5", "def add(a, b):"],
        0,
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["completion_tokens"], 5);
    assert_eq!(v["stop_reason"], "max_tokens");
    assert!(v["text"].as_str().is_some());
}

#[test]
fn dry_stops_the_model_continuing_a_repeat() {
    let complete = |multiplier: &str| {
        let out = expect(
            &[
                "prompt",
                "--max-tokens",
                "12",
                "--dry-multiplier",
                multiplier,
                "1, 2, 1, 2, 1, 2, 1, 2,",
            ],
            0,
        );
        text(&out.stdout)
    };
    // Greedy, the model goes on counting 1, 2; with DRY, going on would continue the run it
    // has already repeated, so it writes something else.
    let plain = complete("0");
    assert!(plain.contains("1, 2, 1, 2"), "{plain:?}");
    let dry = complete("5");
    assert!(!dry.contains("1, 2, 1"), "{dry:?}");

    let out = expect(&["prompt", "--dry-multiplier", "-1", "hi"], 2);
    assert!(text(&out.stderr).contains("dry_multiplier"));
}

#[test]
fn bad_input_gets_exit_code_2_and_names_the_problem() {
    let out = expect(&["prompt", "--model", "no-such-model", "hi"], 2);
    assert!(text(&out.stderr).contains("no-such-model"));

    let out = expect(&["prompt", "--temperature", "1", "--top-p", "0", "hi"], 2);
    assert!(text(&out.stderr).contains("top_p"));

    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("bogus.gguf");
    std::fs::write(&bogus, b"GGUF\x03\x00\x00\x00truncated").unwrap();
    let out = expect(&["prompt", "--model", bogus.to_str().unwrap(), "hi"], 2);
    assert!(
        text(&out.stderr).contains("bogus.gguf"),
        "{}",
        text(&out.stderr)
    );

    let out = expect(&["--device", "cuda", "prompt", "hi"], 2);
    assert!(text(&out.stderr).contains("`cuda` feature"));

    let out = expect(&["--cache-type", "q4_0", "prompt", "hi"], 2);
    let err = text(&out.stderr);
    assert!(
        err.contains("--cache-type") && err.contains("q4_0"),
        "{err}"
    );

    let out = expect(&["bench", "pipeline", "--repeats", "0"], 2);
    assert!(text(&out.stderr).contains("--repeats"));

    let out = expect(&["bench", "cluster", "--nodes", "1,0"], 2);
    assert!(
        text(&out.stderr).contains("--nodes"),
        "{}",
        text(&out.stderr)
    );
    // No broker to start: a clear error, not a hang.
    let out = Command::new(env!("CARGO_BIN_EXE_forgeline"))
        .args(["bench", "cluster", "--jobs", "1"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("nats-server"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn bench_engine_reports_every_figure_as_json() {
    let out = expect(
        &[
            "bench",
            "engine",
            "--json",
            "--prompt-tokens",
            "32",
            "--decode-tokens",
            "8",
            "--batches",
            "1,2",
            "--repeats",
            "1",
            "--depth",
            "40",
            "--shared-prompt",
            "--cache-type",
            "f32",
        ],
        0,
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["model"], "smollm2-135m-instruct");
    assert_eq!(v["depth"], 40);
    assert_eq!(v["shared_prompt"], true);
    assert_eq!(v["cache_type"], "f32");
    for k in ["prefill_tok_s", "decode_tok_s", "reference_decode_tok_s"] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k}: {v}");
    }
    let batched = v["batched"].as_array().unwrap();
    assert_eq!(batched.len(), 2);
    assert_eq!(batched[1]["batch"], 2);
    assert!(batched[1]["tok_s"].as_f64().unwrap() > 0.0);
}

/// `models import` checks that a model loads and writes its manifest with its sha256 (left
/// where it is); the name then works everywhere; `models list` shows it and the local
/// Hugging Face cache; a damaged file fails its sha256 with a clear error; `models rm`
/// removes the manifest and leaves an imported file alone.
#[test]
fn models_import_list_rm_and_a_damaged_file_fails_its_sha256() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    let weights = dir.path().join("elsewhere").join("tiny-base.gguf");
    std::fs::create_dir_all(weights.parent().unwrap()).unwrap();
    let shape = forgeline_engine::synthetic::preset("tiny").unwrap();
    forgeline_engine::synthetic::write_gguf(&shape, "Q8_0", 3, &weights).unwrap();
    let hub = dir.path().join("hub");
    let snap = hub.join("models--someorg--somerepo/snapshots/0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::copy(&weights, snap.join("model-q8.gguf")).unwrap();
    // As the hub client leaves it: refs/main names the snapshot.
    std::fs::create_dir_all(hub.join("models--someorg--somerepo/refs")).unwrap();
    std::fs::write(hub.join("models--someorg--somerepo/refs/main"), "0123abcd").unwrap();
    let run = |args: &[&str], code: i32| -> Output {
        let mut cmd = with_models(&models);
        cmd.env_remove("HF_HOME").env("HF_HUB_CACHE", &hub);
        expect_with(cmd, args, code)
    };
    let w = weights.to_str().unwrap();

    let out = run(
        &[
            "models",
            "import",
            w,
            "--name",
            "tiny-chat",
            "--chat-template",
            "chatml",
            "--json",
        ],
        0,
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sha = v["sha256"].as_str().unwrap().to_string();
    assert_eq!(
        sha,
        forgeline_engine::registry::sha256_of(&weights).unwrap()
    );
    let manifest = std::fs::read_to_string(models.join("tiny-chat.toml")).unwrap();
    assert!(
        manifest.contains(&sha) && manifest.contains("chat_template = \"chatml\""),
        "{manifest}"
    );

    let out = run(&["models", "list", "--json"], 0);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"tiny-chat"), "{names:?}");
    assert!(
        names.contains(&"someorg/somerepo:model-q8.gguf"),
        "{names:?}"
    );

    // The name works; so does the cached one, offline.
    run(
        &[
            "prompt",
            "--model",
            "tiny-chat",
            "--chat",
            "--max-tokens",
            "3",
            "hi",
        ],
        0,
    );
    run(
        &[
            "prompt",
            "--model",
            "someorg/somerepo:model-q8.gguf",
            "--max-tokens",
            "3",
            "hi",
        ],
        0,
    );

    // Taken names and files that are no model are refused, naming the problem.
    let out = run(&["models", "import", w, "--name", "tiny-chat"], 2);
    assert!(
        text(&out.stderr).contains("exists already"),
        "{}",
        text(&out.stderr)
    );
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"not a model").unwrap();
    let out = run(&["models", "import", junk.to_str().unwrap()], 2);
    assert!(
        text(&out.stderr).contains("junk.gguf"),
        "{}",
        text(&out.stderr)
    );
    assert!(!models.join("junk.toml").exists());

    // A damaged file (same size): its sha256 no longer matches.
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&weights, &bytes).unwrap();
    let out = run(
        &["prompt", "--model", "tiny-chat", "--max-tokens", "3", "hi"],
        2,
    );
    let err = text(&out.stderr);
    assert!(
        err.contains("sha256 mismatch") && err.contains(&sha),
        "{err}"
    );

    run(&["models", "rm", "tiny-chat"], 0);
    assert!(!models.join("tiny-chat.toml").exists());
    assert!(weights.exists(), "an imported file stays where it was");
    let out = run(&["models", "rm", "tiny-chat"], 2);
    assert!(
        text(&out.stderr).contains("tiny-chat"),
        "{}",
        text(&out.stderr)
    );
}

/// A manifest is the model's recipe: its context length, system prompt, stop strings,
/// sampling defaults (a flag still wins) and pipeline settings apply wherever the model is
/// named; a bad value is an error naming the manifest.
#[test]
fn a_manifests_recipe_applies_wherever_the_model_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let weights = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let manifest = |name: &str, recipe: &str| {
        let head = format!(
            "name = \"{name}\"\nformat = \"gguf\"\npath = {:?}\n",
            weights.to_str().unwrap()
        );
        std::fs::write(models.join(format!("{name}.toml")), head + recipe).unwrap();
    };
    let run = |args: &[&str], code: i32| expect_with(with_models(&models), args, code);
    let complete = |model: &str, extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "prompt",
            "--model",
            model,
            "--chat",
            "--json",
            "--max-tokens",
            "16",
            "--seed",
            "7",
        ];
        args.extend_from_slice(extra);
        args.push("Write a haiku about the sea.");
        serde_json::from_slice(&run(&args, 0).stdout).unwrap()
    };
    manifest("plain", "");
    let plain = complete("plain", &[]);
    let poet = complete("plain", &["--system", "You are a poet."]);
    let greedy = poet["text"].as_str().unwrap().to_string();
    let words: Vec<&str> = greedy.split_whitespace().collect();
    assert!(words.len() >= 3, "{greedy:?}");
    let stop = words[2];

    manifest(
        "tuned",
        &format!(
            "context_length = 64\nsystem_prompt = \"You are a poet.\"\nstop = [{stop:?}]\n\
             [sampling]\ntemperature = 1.5\ntop_k = 50\n"
        ),
    );
    // The recipe's system prompt is added to a chat without one, and its stop string ends
    // the text; a flag wins over its sampling (greedy here).
    let flagged = complete("tuned", &["--temperature", "0"]);
    assert_eq!(flagged["prompt_tokens"], poet["prompt_tokens"], "{flagged}");
    // (SmolLM2's template writes a system message of its own when a chat has none.)
    assert_ne!(flagged["prompt_tokens"], plain["prompt_tokens"], "{plain}");
    let cut = &greedy[..greedy.find(stop).unwrap()];
    assert_eq!(flagged["text"].as_str().unwrap(), cut, "{flagged}");
    // Without the flag, the recipe's sampling: not greedy.
    let tuned = complete("tuned", &[]);
    assert_ne!(tuned["text"], flagged["text"], "{tuned}");
    // The context is the recipe's 64 tokens.
    let long = "word ".repeat(80);
    let out = run(&["prompt", "--model", "tuned", &long], 2);
    assert!(
        text(&out.stderr).contains("context holds 64"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["models", "show", "tuned", "--json"], 0);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["context_length"], 64, "{v}");

    // Pipeline settings: read for the model a job runs on (here refused by name).
    manifest("piped", "[pipeline]\nlimits = { candidates = 0 }\n");
    let out = run(&["generate", "--model", "piped", "Add two numbers."], 2);
    let err = text(&out.stderr);
    assert!(
        err.contains("piped") && err.contains("[pipeline]") && err.contains("candidates"),
        "{err}"
    );

    // A bad value names the manifest and the key.
    std::fs::remove_file(models.join("piped.toml")).unwrap();
    manifest("bad", "[sampling]\ntemperature = -1\n");
    let out = run(&["prompt", "--model", "bad", "hi"], 2);
    let err = text(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("[sampling]") && err.contains("temperature"),
        "{err}"
    );
}
