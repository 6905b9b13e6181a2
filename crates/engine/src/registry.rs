//! Where a model comes from, in this order: an explicit path (a GGUF file, or a directory of
//! safetensors), a manifest under the models directory, then the Hugging Face cache (read
//! offline through hf-hub: nothing is downloaded). Nothing here touches the network.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Gguf,
    Safetensors,
}

/// A model's manifest in the models directory (`NAME.toml`): names the model and says where
/// its files are. Weights themselves are git-ignored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub format: Format,
    /// A GGUF file or a safetensors directory, relative to the models directory.
    pub path: PathBuf,
    #[serde(default)]
    pub sha256: Option<String>,
    /// The command that fetches the weights, for the error when they are missing.
    #[serde(default)]
    pub fetch: Option<String>,
    /// The chat template to use instead of the model's own (a Jinja template as
    /// transformers writes them, or `chatml` for the built-in ChatML): for a model that
    /// ships none, or one that is wrong.
    #[serde(default)]
    pub chat_template: Option<String>,
}

/// A model located on disk, ready to load.
#[derive(Clone, Debug, Serialize)]
pub struct ModelLocation {
    pub name: String,
    pub format: Format,
    pub path: PathBuf,
    /// Its manifest's `chat_template`, which replaces the model's own.
    #[serde(skip)]
    pub chat_template: Option<String>,
}

pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

pub struct Registry {
    models_dir: PathBuf,
}

impl Registry {
    pub fn new(models_dir: impl Into<PathBuf>) -> Self {
        Self {
            models_dir: models_dir.into(),
        }
    }

    pub fn models_dir(&self) -> &Path {
        &self.models_dir
    }

    /// Every manifest in the models directory, sorted by name.
    pub fn manifests(&self) -> Result<Vec<Manifest>> {
        let rd = match std::fs::read_dir(&self.models_dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(&self.models_dir, e)),
        };
        let mut out = Vec::new();
        for entry in rd.flatten() {
            let p = entry.path();
            if p.extension().is_some_and(|x| x == "toml") {
                out.push(read_manifest(&p)?);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub fn manifest(&self, name: &str) -> Result<Option<Manifest>> {
        Ok(self.manifests()?.into_iter().find(|m| m.name == name))
    }

    /// Finds `spec`: a path, a manifest name, or a Hugging Face repo id (`org/name`, or
    /// `org/name:file.gguf`) already in the local cache.
    pub fn resolve(&self, spec: &str) -> Result<ModelLocation> {
        let as_path = Path::new(spec);
        if as_path.exists() {
            return locate_path(as_path, spec);
        }
        if let Some(m) = self.manifest(spec)? {
            let path = self.models_dir.join(&m.path);
            if !path.exists() {
                let hint = m
                    .fetch
                    .as_deref()
                    .map(|f| format!("; run {f} to fetch it"))
                    .unwrap_or_default();
                return Err(Error::ModelNotFound {
                    name: spec.into(),
                    searched: format!(
                        "its manifest names {} which does not exist{hint}",
                        path.display()
                    ),
                });
            }
            return Ok(ModelLocation {
                name: m.name,
                format: m.format,
                path,
                chat_template: m.chat_template,
            });
        }
        if let Some(loc) = hf_cache_lookup(spec)? {
            return Ok(loc);
        }
        let known: Vec<String> = self.manifests()?.into_iter().map(|m| m.name).collect();
        Err(Error::ModelNotFound {
            name: spec.into(),
            searched: format!(
                "not a path, not a manifest in {} (known: {}), not in the Hugging Face cache",
                self.models_dir.display(),
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            ),
        })
    }
}

fn read_manifest(p: &Path) -> Result<Manifest> {
    let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
    toml::from_str(&text).map_err(|e| Error::bad_model(p, format!("invalid model manifest: {e}")))
}

fn locate_path(p: &Path, spec: &str) -> Result<ModelLocation> {
    let name = p
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| spec.to_string());
    if p.is_dir() {
        if !p.join("config.json").exists() {
            return Err(Error::bad_model(
                p,
                "a model directory needs config.json and *.safetensors",
            ));
        }
        return Ok(ModelLocation {
            name,
            format: Format::Safetensors,
            path: p.to_path_buf(),
            chat_template: None,
        });
    }
    if !crate::model::weights::is_gguf(p) {
        return Err(Error::bad_model(
            p,
            "not a GGUF file (no GGUF magic) and not a safetensors directory",
        ));
    }
    Ok(ModelLocation {
        name,
        format: Format::Gguf,
        path: p.to_path_buf(),
        chat_template: None,
    })
}

/// Looks `org/name[:file.gguf]` up in the Hugging Face cache (HF_HOME / HF_HUB_CACHE), offline.
fn hf_cache_lookup(spec: &str) -> Result<Option<ModelLocation>> {
    let (repo_id, file) = match spec.split_once(':') {
        Some((r, f)) => (r, Some(f)),
        None => (spec, None),
    };
    if repo_id.split('/').count() != 2 {
        return Ok(None);
    }
    let cache = hf_hub::Cache::from_env();
    let repo = cache.model(repo_id.to_string());
    let found = match file {
        Some(f) => repo.get(f).map(|p| (Format::Gguf, p)),
        None => repo
            .get("config.json")
            .and_then(|p| p.parent().map(|d| (Format::Safetensors, d.to_path_buf()))),
    };
    Ok(found.map(|(format, path)| ModelLocation {
        name: spec.to_string(),
        format,
        path,
        chat_template: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_resolves_and_missing_weights_name_the_fetch_command() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("m.toml"),
            "name = \"tiny\"\nformat = \"gguf\"\npath = \"tiny.gguf\"\nfetch = \"scripts/fetch-tiny\"\n",
        )
        .unwrap();
        let reg = Registry::new(dir.path());
        let err = reg.resolve("tiny").unwrap_err().to_string();
        assert!(
            err.contains("scripts/fetch-tiny") && err.contains("tiny.gguf"),
            "{err}"
        );
        std::fs::write(dir.path().join("tiny.gguf"), b"GGUF....").unwrap();
        let loc = reg.resolve("tiny").unwrap();
        assert_eq!(loc.format, Format::Gguf);
        assert_eq!(loc.path, dir.path().join("tiny.gguf"));
    }

    #[test]
    fn unknown_names_list_what_was_searched() {
        let dir = tempfile::tempdir().unwrap();
        let err = Registry::new(dir.path())
            .resolve("nope")
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope") && err.contains("not a path"), "{err}");
    }

    #[test]
    fn a_file_that_is_not_gguf_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.bin");
        std::fs::write(&p, b"PK\x03\x04").unwrap();
        let err = Registry::new(dir.path())
            .resolve(p.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.bin") && err.contains("not a GGUF"),
            "{err}"
        );
    }
}
