//! The embedded default model (SmolLM2-135M-Instruct Q4_1), for the tests that run it.

#![allow(dead_code)] // each test crate that includes this module uses part of it

use std::path::PathBuf;

use candle_core::Device;
use forgeline_engine::loader::{load, LoadedModel};
use forgeline_engine::registry::{Format, ModelLocation};

/// Its GGUF file; fails with the fix when `scripts/fetch-default-model` has not run.
pub fn default_model_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-default-model",
        p.display()
    );
    p
}

/// The default model on CPU, under `name`.
pub fn load_default_model(name: &str) -> LoadedModel {
    let loc = ModelLocation {
        name: name.into(),
        format: Format::Gguf,
        path: default_model_path(),
        chat_template: None,
        recipe: Default::default(),
    };
    let mut m = load(&loc, &Device::Cpu).unwrap();
    m.info.name = name.into();
    m
}
