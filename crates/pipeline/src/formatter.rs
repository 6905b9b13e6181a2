//! Stage 14, the response formatter: the result as a markdown report (a template,
//! `prompts/report.j2`), as plain code, or as JSON; and the result's files written to an
//! output directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::job::{JobContext, JobResult};
use crate::trace::{EventStatus, Stage};
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

/// Renders the result in a format.
pub fn render(ctx: &JobContext, result: &JobResult, format: Format) -> Result<String> {
    let started = ctx.rec.elapsed_ms();
    let out = match format {
        Format::Md => ctx
            .prompts
            .render_text("report", json!({"result": result, "task": ctx.task.task}))?,
        Format::Code => match result
            .files
            .iter()
            .find(|f| f.role == "module" || f.role == "analysis")
        {
            Some(f) => f.content.clone(),
            None => format!("{}\n", result.answer.trim_end()),
        },
        Format::Json => {
            serde_json::to_string_pretty(result).map_err(|e| Error::Prompt(e.to_string()))? + "\n"
        }
    };
    ctx.rec.stage(
        Stage::Formatter,
        None,
        started,
        json!({"format": format}),
        json!({"bytes": out.len()}),
    );
    ctx.rec.event(
        Stage::Formatter,
        EventStatus::Finished,
        None,
        None,
        format!("{format:?} report, {} bytes", out.len()),
    );
    Ok(out)
}

/// Writes the result's files under `dir` (created if missing); returns their paths.
pub fn write_files(result: &JobResult, dir: &Path) -> Result<Vec<PathBuf>> {
    let io = |p: &Path, e: std::io::Error| Error::Io(format!("{}: {e}", p.display()));
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut written = Vec::new();
    for f in &result.files {
        // Names come from the pipeline, but a figure's name comes from generated code.
        let rel = Path::new(&f.path);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(Error::Io(format!(
                "refusing to write `{}` outside {}",
                f.path,
                dir.display()
            )));
        }
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        let bytes = if f.bytes.is_empty() {
            f.content.as_bytes()
        } else {
            &f.bytes
        };
        std::fs::write(&path, bytes).map_err(|e| io(&path, e))?;
        written.push(path);
    }
    Ok(written)
}
