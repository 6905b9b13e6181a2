//! Where a model comes from, in this order: an explicit path (a GGUF file, or a directory of
//! safetensors), a manifest under the models directory, then the Hugging Face cache (read
//! offline through hf-hub: nothing is downloaded). Nothing here touches the network.
//!
//! A manifest's `sha256` is checked when the model is resolved, once per file version: the
//! digest is remembered (by path, size and modification time) in the models directory's
//! `.sha256-cache.json`. `import` writes a manifest for a model file, `remove` deletes one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::sampling::{SamplingDefaults, SamplingParams};
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
    /// The model's recipe (what every request on it starts from).
    #[serde(flatten)]
    pub recipe: Recipe,
}

/// A model's recipe, as an Ollama Modelfile is: the settings every request on the model starts
/// from, in its manifest beside `chat_template`.
///
/// ```toml
/// context_length = 4096            # at most the model's own
/// system_prompt = "You write Python."  # for a chat that has no system message
/// stop = ["\n### "]                # besides each request's own stop strings
/// [sampling]                       # what a request does not set
/// temperature = 0.2
/// top_p = 0.95
/// [pipeline]                       # a forgeline.toml's [limits] and [stages.*], for
/// limits = { candidates = 8 }      # `generate`, `eval` and `serve` without --config
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub sampling: SamplingDefaults,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<toml::Table>,
}

fn is_default(s: &SamplingDefaults) -> bool {
    *s == SamplingDefaults::default()
}

impl Recipe {
    /// Checks the values (the pipeline table is checked where it is used); errors name the
    /// manifest key.
    fn validate(&self) -> std::result::Result<(), String> {
        if self.context_length == Some(0) {
            return Err("context_length must be at least 1".into());
        }
        if let Some(i) = self.stop.iter().position(String::is_empty) {
            return Err(format!("stop[{i}] is empty"));
        }
        self.sampling
            .over(SamplingParams::default())
            .validate()
            .map_err(|e| format!("[sampling]: {e}"))
    }
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
    /// Its manifest's recipe (empty for a model named by path or from the cache).
    #[serde(skip)]
    pub recipe: Recipe,
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
            if let Some(want) = &m.sha256 {
                let got = self.cached_sha256(&path)?;
                if !got.eq_ignore_ascii_case(want.trim()) {
                    let hint = m
                        .fetch
                        .as_deref()
                        .map(|f| format!("; fetch it again with {f}"))
                        .unwrap_or_default();
                    return Err(Error::bad_model(
                        &path,
                        format!(
                            "sha256 mismatch: the manifest of `{}` says {want}, the weights have \
                             {got}: they are damaged or were replaced{hint}",
                            m.name
                        ),
                    ));
                }
            }
            return Ok(ModelLocation {
                name: m.name,
                format: m.format,
                path,
                chat_template: m.chat_template,
                recipe: m.recipe,
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

/// What `import` writes: a manifest for a model file or directory, where it is.
#[derive(Clone, Debug)]
pub struct Import<'a> {
    pub path: &'a Path,
    /// The name to give it; None: the file's stem.
    pub name: Option<&'a str>,
    pub description: String,
    /// A chat template for its manifest (`chatml`, or a Jinja template).
    pub chat_template: Option<String>,
}

/// A model in the local Hugging Face cache, as `resolve` names it.
#[derive(Clone, Debug, Serialize)]
pub struct CachedModel {
    /// `org/name` (safetensors) or `org/name:file.gguf`.
    pub name: String,
    pub format: Format,
    pub path: PathBuf,
}

impl Registry {
    /// The sha256 of `path` (see `sha256_of`), from the digest cache when the file's size and
    /// modification time are the ones remembered; computed (and remembered) otherwise.
    pub fn cached_sha256(&self, path: &Path) -> Result<String> {
        let stamp = stamp_of(path)?;
        let cache_path = self.models_dir.join(".sha256-cache.json");
        let mut cache: std::collections::BTreeMap<String, (u64, u128, String)> =
            std::fs::read(&cache_path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
        let key = std::fs::canonicalize(path)
            .unwrap_or_else(|_| path.to_path_buf())
            .display()
            .to_string();
        if let Some((size, mtime, sha)) = cache.get(&key) {
            if (*size, *mtime) == stamp {
                return Ok(sha.clone());
            }
        }
        let sha = sha256_of(path)?;
        cache.insert(key, (stamp.0, stamp.1, sha.clone()));
        // Best effort: a read-only models directory only means hashing again next time.
        if let Ok(bytes) = serde_json::to_vec_pretty(&cache) {
            let tmp = cache_path.with_extension(format!("json.{}", std::process::id()));
            if std::fs::write(&tmp, bytes).is_ok() && std::fs::rename(&tmp, &cache_path).is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
        }
        Ok(sha)
    }

    /// Writes a manifest for the model at `imp.path` (a GGUF file or a safetensors
    /// directory, left where it is) under `imp.name`, with its sha256. The caller checks
    /// that it loads first. Refuses a name that is taken or not a plain name.
    pub fn import(&self, imp: &Import) -> Result<(Manifest, PathBuf)> {
        let loc = locate_path(imp.path, &imp.path.display().to_string())?;
        let name = imp.name.map(str::to_string).unwrap_or(loc.name.clone());
        let plain = !name.is_empty()
            && name.len() <= 128
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !plain {
            return Err(Error::Config(crate::error::ConfigError::Import(format!(
                "model name `{name}`: use letters, digits, `.`, `-` and `_` (give --name)"
            ))));
        }
        let file = self.models_dir.join(format!("{name}.toml"));
        if self.manifest(&name)?.is_some() || file.exists() {
            return Err(Error::Config(crate::error::ConfigError::Import(format!(
                "a model named `{name}` exists already ({}): give another --name, or remove it \
                 with `forgeline models rm {name}`",
                file.display()
            ))));
        }
        let path = std::fs::canonicalize(&loc.path).map_err(|e| Error::io(&loc.path, e))?;
        let sha256 = self.cached_sha256(&path)?;
        let m = Manifest {
            name,
            description: imp.description.clone(),
            format: loc.format,
            path,
            sha256: Some(sha256),
            fetch: None,
            chat_template: imp.chat_template.clone(),
            recipe: Recipe::default(),
        };
        std::fs::create_dir_all(&self.models_dir).map_err(|e| Error::io(&self.models_dir, e))?;
        let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let mut text = format!(
            "# Written by `forgeline models import`.\nname = {}\ndescription = {}\nformat = \"{}\"\npath = {}\nsha256 = {}\n",
            q(&m.name),
            q(&m.description),
            match m.format {
                Format::Gguf => "gguf",
                Format::Safetensors => "safetensors",
            },
            q(&m.path.display().to_string()),
            q(m.sha256.as_deref().unwrap_or_default()),
        );
        if let Some(t) = &m.chat_template {
            text.push_str(&format!("chat_template = {}\n", q(t)));
        }
        // Created, never overwritten: two imports of one name cannot both win.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&file)
            .map_err(|e| Error::io(&file, e))?;
        std::io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| Error::io(&file, e))?;
        Ok((m, file))
    }

    /// Removes the manifest of `name`, and its weights when they are inside the models
    /// directory (an imported model's files elsewhere are left alone). The paths removed.
    pub fn remove(&self, name: &str) -> Result<Vec<PathBuf>> {
        let rd = std::fs::read_dir(&self.models_dir).map_err(|e| Error::io(&self.models_dir, e))?;
        for entry in rd.flatten() {
            let p = entry.path();
            if p.extension().is_none_or(|x| x != "toml") {
                continue;
            }
            let m = read_manifest(&p)?;
            if m.name != name {
                continue;
            }
            let mut removed = Vec::new();
            let weights = self.models_dir.join(&m.path);
            let inside = match (
                std::fs::canonicalize(&weights),
                std::fs::canonicalize(&self.models_dir),
            ) {
                (Ok(w), Ok(d)) => w.starts_with(&d) && w != d,
                _ => false,
            };
            if inside {
                let gone = if weights.is_dir() {
                    std::fs::remove_dir_all(&weights)
                } else {
                    std::fs::remove_file(&weights)
                };
                gone.map_err(|e| Error::io(&weights, e))?;
                removed.push(weights);
            }
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            removed.push(p);
            return Ok(removed);
        }
        Err(Error::ModelNotFound {
            name: name.into(),
            searched: format!("no manifest in {} names it", self.models_dir.display()),
        })
    }
}

/// The models in the local Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub, else
/// ~/.cache/huggingface/hub), read offline: each snapshot's GGUF files, and its directory when
/// it has a config.json.
pub fn hf_cache_models() -> Vec<CachedModel> {
    let cache = hf_cache();
    let Ok(rd) = std::fs::read_dir(cache.path()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in rd.flatten() {
        let dir_name = entry.file_name().to_string_lossy().into_owned();
        let Some(repo) = dir_name.strip_prefix("models--") else {
            continue;
        };
        let Some((org, name)) = repo.split_once("--") else {
            continue;
        };
        let repo_id = format!("{org}/{name}");
        let Ok(snaps) = std::fs::read_dir(entry.path().join("snapshots")) else {
            continue;
        };
        for snap in snaps.flatten() {
            let dir = snap.path();
            if dir.join("config.json").exists() {
                out.push(CachedModel {
                    name: repo_id.clone(),
                    format: Format::Safetensors,
                    path: dir.clone(),
                });
            }
            for f in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let fname = f.file_name().to_string_lossy().into_owned();
                if fname.ends_with(".gguf") {
                    out.push(CachedModel {
                        name: format!("{repo_id}:{fname}"),
                        format: Format::Gguf,
                        path: f.path(),
                    });
                }
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out.dedup_by(|a, b| a.name == b.name);
    out
}

/// The Hugging Face cache as transformers finds it: HF_HUB_CACHE, else HF_HOME/hub, else
/// ~/.cache/huggingface/hub.
fn hf_cache() -> hf_hub::Cache {
    match std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        Some(dir) => hf_hub::Cache::new(PathBuf::from(dir)),
        None => hf_hub::Cache::from_env(),
    }
}

/// Size and modification time (ns) of a file, or for a directory the sum of its files' sizes
/// and their latest modification time.
fn stamp_of(path: &Path) -> Result<(u64, u128)> {
    let one = |p: &Path| -> Result<(u64, u128)> {
        let md = std::fs::metadata(p).map_err(|e| Error::io(p, e))?;
        let mtime = md
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        Ok((md.len(), mtime))
    };
    if !path.is_dir() {
        return one(path);
    }
    let mut total = (0u64, 0u128);
    for f in dir_files(path)? {
        let (size, mtime) = one(&path.join(&f))?;
        total = (total.0 + size, total.1.max(mtime));
    }
    Ok(total)
}

/// The files directly in `dir`, sorted by name.
fn dir_files(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

/// The sha256 (hex) of a file; of a directory, the sha256 of its `NAME SHA256` lines (one per
/// file directly in it, sorted by name), so that any file changed, added or removed changes it.
pub fn sha256_of(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let file = |p: &Path| -> Result<String> {
        let mut f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut f, &mut buf).map_err(|e| Error::io(p, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(hex(&h.finalize()))
    };
    if !path.is_dir() {
        return file(path);
    }
    let mut h = Sha256::new();
    for name in dir_files(path)? {
        h.update(format!("{name} {}\n", file(&path.join(&name))?).as_bytes());
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The keys a manifest may have: the model's and its recipe's.
const MANIFEST_KEYS: [&str; 12] = [
    "name",
    "description",
    "format",
    "path",
    "sha256",
    "fetch",
    "chat_template",
    "context_length",
    "system_prompt",
    "stop",
    "sampling",
    "pipeline",
];

fn read_manifest(p: &Path) -> Result<Manifest> {
    let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
    let bad = |e: String| Error::bad_model(p, format!("invalid model manifest: {e}"));
    // The recipe is flattened into the manifest, where serde cannot refuse unknown keys: a
    // misspelt one would be silently ignored.
    let table: toml::Table = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if let Some(k) = table.keys().find(|k| !MANIFEST_KEYS.contains(&k.as_str())) {
        return Err(bad(format!(
            "unknown key `{k}` (keys: {})",
            MANIFEST_KEYS.join(", ")
        )));
    }
    let m: Manifest = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    m.recipe
        .validate()
        .map_err(|e| Error::bad_model(p, format!("invalid model manifest: {e}")))?;
    Ok(m)
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
            recipe: Recipe::default(),
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
        recipe: Recipe::default(),
    })
}

/// Looks `org/name[:file.gguf]` up in the Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub), offline.
fn hf_cache_lookup(spec: &str) -> Result<Option<ModelLocation>> {
    let (repo_id, file) = match spec.split_once(':') {
        Some((r, f)) => (r, Some(f)),
        None => (spec, None),
    };
    if repo_id.split('/').count() != 2 {
        return Ok(None);
    }
    let cache = hf_cache();
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
        recipe: Recipe::default(),
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
    fn a_manifests_recipe_is_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let head = "name = \"tiny\"\nformat = \"gguf\"\npath = \"tiny.gguf\"\n";
        std::fs::write(dir.path().join("tiny.gguf"), b"GGUF....").unwrap();
        let write = |recipe: &str| {
            std::fs::write(dir.path().join("m.toml"), format!("{head}{recipe}")).unwrap();
        };
        write(
            "context_length = 2048\nsystem_prompt = \"Be brief.\"\nstop = [\"###\"]\n\
             [sampling]\ntemperature = 0.3\ntop_k = 20\n\
             [pipeline.limits]\ncandidates = 4\n",
        );
        let reg = Registry::new(dir.path());
        let r = reg.resolve("tiny").unwrap().recipe;
        assert_eq!(r.context_length, Some(2048));
        assert_eq!(r.system_prompt.as_deref(), Some("Be brief."));
        assert_eq!(r.stop, ["###"]);
        assert_eq!(r.sampling.temperature, Some(0.3));
        assert_eq!(r.sampling.top_k, Some(20));
        assert_eq!(r.sampling.top_p, None);
        let limits = r.pipeline.unwrap()["limits"].clone();
        assert_eq!(limits["candidates"].as_integer(), Some(4));
        for (recipe, names) in [
            ("context_length = 0\n", "context_length"),
            ("stop = [\"\"]\n", "stop[0]"),
            ("[sampling]\ntop_p = 2.0\n", "top_p"),
            ("[sampling]\ntemprature = 0.3\n", "temprature"),
            (
                "sytem_prompt = \"Be brief.\"\n",
                "unknown key `sytem_prompt`",
            ),
        ] {
            write(recipe);
            let err = reg.resolve("tiny").unwrap_err().to_string();
            assert!(
                err.contains("m.toml") && err.contains(names),
                "{recipe}: {err}"
            );
        }
    }

    #[test]
    fn a_manifests_sha256_is_checked_once_per_file_version() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().join("tiny.gguf");
        std::fs::write(&w, b"GGUF....").unwrap();
        let good = sha256_of(&w).unwrap();
        // As `sha256sum` computes it.
        assert_eq!(
            good,
            "f9dde9e21b7864aeb33373d04031f635140c5ce63bf66db21ba9cd3b5e8b2386"
        );
        let manifest = |sha: &str| {
            std::fs::write(
                dir.path().join("m.toml"),
                format!("name = \"tiny\"\nformat = \"gguf\"\npath = \"tiny.gguf\"\nsha256 = \"{sha}\"\nfetch = \"scripts/fetch-tiny\"\n"),
            )
            .unwrap()
        };
        let reg = Registry::new(dir.path());
        manifest(&good);
        assert!(reg.resolve("tiny").is_ok());
        assert!(dir.path().join(".sha256-cache.json").exists());
        // Damaged (same size, new content): caught, naming both digests and the fetch step.
        std::fs::write(&w, b"GGUF...!").unwrap();
        let err = reg.resolve("tiny").unwrap_err().to_string();
        assert!(
            err.contains("sha256 mismatch")
                && err.contains(&good)
                && err.contains("scripts/fetch-tiny"),
            "{err}"
        );
        manifest(&"0".repeat(64));
        assert!(reg.resolve("tiny").is_err());
    }

    #[test]
    fn import_writes_a_manifest_and_remove_deletes_it() {
        let dir = tempfile::tempdir().unwrap();
        let models = dir.path().join("models");
        let outside = dir.path().join("my model.gguf");
        std::fs::write(&outside, b"GGUF....").unwrap();
        let reg = Registry::new(&models);
        let imp = Import {
            path: &outside,
            name: Some("mine"),
            description: "a \"quoted\" one".into(),
            chat_template: Some("{{ messages[0].content }}\n".into()),
        };
        let (m, file) = reg.import(&imp).unwrap();
        assert_eq!(file, models.join("mine.toml"));
        assert_eq!(
            m.sha256.as_deref(),
            Some(sha256_of(&outside).unwrap().as_str())
        );
        let back = reg.manifest("mine").unwrap().unwrap();
        assert_eq!(back.description, "a \"quoted\" one");
        assert_eq!(back.chat_template, imp.chat_template);
        let loc = reg.resolve("mine").unwrap();
        assert_eq!(loc.path, std::fs::canonicalize(&outside).unwrap());
        // Taken; not a plain name.
        assert!(reg
            .import(&imp)
            .unwrap_err()
            .to_string()
            .contains("exists already"));
        let bad = Import {
            name: Some("../x"),
            ..imp.clone()
        };
        assert!(reg.import(&bad).is_err());
        // Removing an imported model leaves its file where it was.
        let removed = reg.remove("mine").unwrap();
        assert_eq!(removed, vec![models.join("mine.toml")]);
        assert!(outside.exists());
        assert!(reg.remove("mine").is_err());
        // Weights inside the models directory go with their manifest.
        std::fs::write(models.join("in.gguf"), b"GGUF....").unwrap();
        std::fs::write(
            models.join("in.toml"),
            "name = \"in\"\nformat = \"gguf\"\npath = \"in.gguf\"\n",
        )
        .unwrap();
        assert_eq!(reg.remove("in").unwrap().len(), 2);
        assert!(!models.join("in.gguf").exists());
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
