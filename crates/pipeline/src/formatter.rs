//! Stage 14, the response formatter: the result as a markdown report (a template,
//! `prompts/report.j2`), as plain code, or as JSON; and the result's files written to an
//! output directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::job::{JobContext, JobResult};
use crate::stage::StageOutput;
use crate::synthesizer::FileRole;
use crate::trace::EventStatus;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    #[default]
    Md,
    Code,
    Json,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "md" | "markdown" => Ok(Format::Md),
            "code" => Ok(Format::Code),
            "json" => Ok(Format::Json),
            _ => Err(format!("unknown format `{s}` (md, code, json)")),
        }
    }
}

/// A result rendered in a format.
pub struct Rendered {
    pub format: Format,
    pub text: String,
}

impl StageOutput for Rendered {
    fn trace_output(&self) -> Value {
        json!({"bytes": self.text.len()})
    }

    fn outcome(&self) -> (EventStatus, String) {
        (
            EventStatus::Finished,
            format!("{:?} report, {} bytes", self.format, self.text.len()),
        )
    }
}

/// Renders the result in a format.
pub fn render(ctx: &JobContext, result: &JobResult, format: Format) -> Result<Rendered> {
    let text = match format {
        Format::Md => ctx
            .prompts()
            .render_report(json!({"result": result, "task": ctx.task.task}))?,
        Format::Code => match result
            .files
            .iter()
            .find(|f| matches!(f.role, FileRole::Module | FileRole::Analysis))
        {
            Some(f) => f.content.clone(),
            None => format!("{}\n", result.answer.trim_end()),
        },
        Format::Json => serde_json::to_string_pretty(result).map_err(Error::Json)? + "\n",
    };
    Ok(Rendered { format, text })
}

/// The files a job may write besides figures: what `--out` checks before any work starts.
pub fn output_names(module: &str) -> Vec<String> {
    use crate::collector::target_of;
    use crate::workers::WorkerKind;
    [
        WorkerKind::Code,
        WorkerKind::Tests,
        WorkerKind::Docs,
        WorkerKind::DataAnalysis,
    ]
    .into_iter()
    .map(|k| target_of(k, module))
    .collect()
}

/// Of `names` under `dir`, those that exist already (as anything: a file, a link, a
/// directory).
pub fn existing(dir: &Path, names: &[String]) -> Vec<PathBuf> {
    names
        .iter()
        .map(|n| dir.join(n))
        .filter(|p| p.symlink_metadata().is_ok())
        .collect()
}

/// Writes the result's files under `dir` (created if missing); returns their paths.
///
/// All or nothing, as far as the file system allows: every file is first written in full
/// to a temporary name beside its target, then each is renamed over its target, so a
/// failure while writing leaves the directory as it was. A file already there is replaced
/// only with `force` (the caller did not write it in this run), and then the link itself
/// is replaced, never followed; no path is written through a link.
pub fn write_files(result: &JobResult, dir: &Path, force: bool) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut targets = Vec::new();
    for f in &result.files {
        // Names come from the pipeline, but a figure's name comes from generated code.
        let rel = Path::new(&f.path);
        if f.path.is_empty()
            || rel.is_absolute()
            || rel
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(Error::OutsideOutput {
                name: f.path.clone(),
                dir: dir.to_path_buf(),
            });
        }
        let path = dir.join(rel);
        if let Ok(m) = path.symlink_metadata() {
            if m.is_dir() {
                return Err(Error::io(
                    path,
                    std::io::Error::other("a directory is in the way"),
                ));
            }
        }
        let bytes = if f.bytes.is_empty() {
            f.content.as_bytes()
        } else {
            &f.bytes
        };
        targets.push((rel, path, bytes));
    }
    if !force {
        let taken: Vec<PathBuf> = targets
            .iter()
            .filter(|(_, p, _)| p.symlink_metadata().is_ok())
            .map(|(_, p, _)| p.clone())
            .collect();
        if !taken.is_empty() {
            return Err(Error::WouldOverwrite(taken));
        }
    }
    let mut staged: Vec<(PathBuf, PathBuf)> = Vec::new();
    let remove_staged = |staged: &[(PathBuf, PathBuf)]| {
        for (tmp, _) in staged {
            let _ = std::fs::remove_file(tmp);
        }
    };
    for (i, (rel, path, bytes)) in targets.iter().enumerate() {
        let staging = make_parents(dir, rel).and_then(|()| stage(path, i, bytes));
        match staging {
            Ok(tmp) => staged.push((tmp, path.clone())),
            Err(e) => {
                remove_staged(&staged);
                return Err(Error::io(path, e));
            }
        }
    }
    let mut written = Vec::new();
    for (k, (tmp, path)) in staged.iter().enumerate() {
        if let Err(source) = std::fs::rename(tmp, path) {
            remove_staged(&staged[k..]);
            return Err(Error::PartlyWritten {
                path: path.clone(),
                source,
                written,
            });
        }
        written.push(path.clone());
    }
    Ok(written)
}

/// Creates the directories between `dir` and `rel`'s file, refusing any that is a link
/// (it could lead out of `dir`).
fn make_parents(dir: &Path, rel: &Path) -> std::io::Result<()> {
    let mut at = dir.to_path_buf();
    let parts: Vec<_> = rel.components().collect();
    for c in &parts[..parts.len().saturating_sub(1)] {
        at.push(c);
        match at.symlink_metadata() {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(std::io::Error::other(format!(
                    "{} is not a directory (or is a link)",
                    at.display()
                )))
            }
            Err(_) => std::fs::create_dir(&at)?,
        }
    }
    Ok(())
}

/// Writes `bytes` to a temporary name beside `path`, then renames it over `path`: a reader
/// sees the old file or the whole new one, and a failure leaves the old one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = stage(path, 0, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Writes `bytes` in full to a new temporary file beside `path`; returns its name.
fn stage(path: &Path, i: usize, bytes: &[u8]) -> std::io::Result<PathBuf> {
    use std::io::Write;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.forgeline-{}-{i}.tmp", std::process::id()));
    // create_new: never through a link or over a file someone else made.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    let written = f.write_all(bytes).and_then(|()| f.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthesizer::OutputFile;

    fn result(files: &[(&str, &str)]) -> JobResult {
        JobResult {
            files: files
                .iter()
                .map(|(p, c)| OutputFile {
                    path: p.to_string(),
                    role: FileRole::Module,
                    content: c.to_string(),
                    bytes: Vec::new(),
                })
                .collect(),
            job: 1,
            passed: false,
            route: crate::router::RouteKind::NewFunction,
            entry_point: None,
            answer: String::new(),
            verdict: Default::default(),
            notes: Vec::new(),
            subtasks: Vec::new(),
            synthesis_revisions: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            llm_calls: 0,
            wall_ms: 0,
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn refuses_to_overwrite_without_force_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("README.md"), "the project's own").unwrap();
        let r = result(&[("solution.py", "x = 1\n"), ("README.md", "generated")]);
        let e = write_files(&r, dir.path(), false).unwrap_err();
        assert!(
            matches!(&e, Error::WouldOverwrite(p) if p.len() == 1),
            "{e}"
        );
        assert!(e.to_string().contains("README.md") && e.to_string().contains("--force"));
        assert_eq!(names(dir.path()), ["README.md"]);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("README.md")).unwrap(),
            "the project's own"
        );
        let written = write_files(&r, dir.path(), true).unwrap();
        assert_eq!(written.len(), 2);
        assert_eq!(names(dir.path()), ["README.md", "solution.py"]);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("README.md")).unwrap(),
            "generated"
        );
    }

    #[test]
    fn replaces_a_link_instead_of_writing_through_it() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("solution.py")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("figs")).unwrap();
        let r = result(&[("solution.py", "x = 1\n")]);
        write_files(&r, dir.path(), true).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert!(!dir
            .path()
            .join("solution.py")
            .symlink_metadata()
            .unwrap()
            .is_symlink());
        // A directory on the way that is a link is refused, and nothing is left staged.
        let r = result(&[("a.py", "1"), ("figs/plot.png", "png")]);
        assert!(write_files(&r, dir.path(), true).is_err());
        assert_eq!(names(outside.path()), ["victim"]);
        assert_eq!(names(dir.path()), ["figs", "solution.py"]);
    }

    #[test]
    fn names_outside_the_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["../x.py", "/etc/x", "", "a/../../b"] {
            assert!(
                write_files(&result(&[(bad, "1")]), dir.path(), true).is_err(),
                "{bad}"
            );
        }
        assert!(names(dir.path()).is_empty());
        assert_eq!(
            output_names("solution"),
            [
                "solution.py",
                "test_solution.py",
                "README.md",
                "analysis.py"
            ]
        );
    }
}
