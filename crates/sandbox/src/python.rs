//! Finding the Python interpreter and asking it, once, for its version and paths.
//!
//! `python3` on PATH is often a shim (pyenv, asdf) that needs the user's environment; sandboxed
//! runs get an emptied environment, so the probe resolves the real binary (`sys.executable`)
//! and every run starts that directly.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The oldest Python the harness supports.
pub const MIN_PYTHON: (u32, u32) = (3, 9);

/// The interpreter the sandbox runs, as it described itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PythonInfo {
    /// The real interpreter binary.
    pub executable: PathBuf,
    /// `major.minor.micro`.
    pub version: String,
    /// `sys.prefix`, `sys.base_prefix` and the exec prefixes, without duplicates.
    pub prefixes: Vec<PathBuf>,
    /// `sys.path` as the interpreter reports it in isolated mode (stdlib and site-packages).
    pub path: Vec<PathBuf>,
    /// The site-packages directories, which runs add to `sys.path` themselves.
    pub site_packages: Vec<PathBuf>,
    /// Whether pytest can be imported.
    pub pytest: bool,
}

#[derive(Deserialize)]
struct ProbeAnswer {
    executable: String,
    prefixes: Vec<String>,
    path: Vec<String>,
    site: Vec<String>,
    pytest: bool,
}

// Runs on any Python: the version line comes first, so an old interpreter is still named.
const PROBE: &str = r#"
import sys
sys.stdout.write("%d.%d.%d\n" % tuple(sys.version_info[:3]))
sys.stdout.flush()
import json, site, importlib.util
print(json.dumps({
    "executable": sys.executable,
    "prefixes": [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix],
    "path": [p for p in sys.path if p],
    "site": site.getsitepackages() if hasattr(site, "getsitepackages") else [],
    "pytest": importlib.util.find_spec("pytest") is not None,
}))
"#;

/// Finds `python3` on PATH, as a shell would.
fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Locates the interpreter (the configured one, or `python3` on PATH) and probes it.
pub(crate) async fn probe(configured: Option<&Path>) -> Result<PythonInfo> {
    let program = match configured {
        Some(path) => path.to_path_buf(),
        None => find_on_path("python3").ok_or_else(|| Error::PythonNotFound {
            looked_for: "python3 on PATH".into(),
        })?,
    };
    // The probe runs a fixed script with the caller's environment, which shims need.
    let output = tokio::process::Command::new(&program)
        .args(["-E", "-s", "-c", PROBE])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(Duration::from_secs(60), output).await {
        Err(_) => {
            return Err(Error::PythonProbe {
                path: program,
                detail: "no answer within 60 s".into(),
            })
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::PythonNotFound {
                looked_for: program.display().to_string(),
            })
        }
        Ok(Err(e)) => {
            return Err(Error::PythonProbe {
                path: program,
                detail: e.to_string(),
            })
        }
        Ok(Ok(output)) => output,
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut lines = stdout.lines();
    let version = lines.next().unwrap_or("").trim().to_string();
    let Some((major, minor)) = parse_version(&version) else {
        return Err(Error::PythonProbe {
            path: program,
            detail: format!(
                "unexpected answer {:?}; stderr: {}",
                version,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    };
    if (major, minor) < MIN_PYTHON {
        return Err(Error::PythonTooOld {
            path: program,
            found: version,
        });
    }
    let answer: ProbeAnswer = lines
        .next()
        .and_then(|line| serde_json::from_str(line).ok())
        .ok_or_else(|| Error::PythonProbe {
            path: program.clone(),
            detail: format!(
                "no description of its paths; stderr: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        })?;
    let executable = if answer.executable.is_empty() {
        program.clone()
    } else {
        PathBuf::from(&answer.executable)
    };
    let executable = executable.canonicalize().unwrap_or(executable);
    let mut prefixes: Vec<PathBuf> = Vec::new();
    for prefix in answer.prefixes.iter().map(PathBuf::from) {
        if !prefixes.contains(&prefix) {
            prefixes.push(prefix);
        }
    }
    Ok(PythonInfo {
        executable,
        version,
        prefixes,
        path: answer.path.iter().map(PathBuf::from).collect(),
        site_packages: answer.site.iter().map(PathBuf::from).collect(),
        pytest: answer.pytest,
    })
}

fn parse_version(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        assert_eq!(parse_version("3.11.7"), Some((3, 11)));
        assert_eq!(parse_version("2.7.18"), Some((2, 7)));
        assert_eq!(parse_version("garbage"), None);
        assert!(parse_version("3.8.10").unwrap() < MIN_PYTHON);
    }

    #[tokio::test]
    async fn a_missing_interpreter_is_named() {
        let err = probe(Some(Path::new("/nonexistent/python3")))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::PythonNotFound { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/python3"));
    }

    #[tokio::test]
    async fn an_old_interpreter_is_refused() {
        // A stand-in interpreter that answers like Python 3.8 would.
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("python3");
        std::fs::write(&fake, "#!/bin/sh\necho 3.8.10\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        // A test thread forking at the moment the file was written can hold it open for a
        // moment (ETXTBSY): try again then.
        let mut err = probe(Some(&fake)).await.unwrap_err();
        for _ in 0..20 {
            if !err.to_string().contains("busy") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            err = probe(Some(&fake)).await.unwrap_err();
        }
        assert!(matches!(err, Error::PythonTooOld { .. }), "{err}");
        assert!(err.to_string().contains("3.8.10"), "{err}");
    }

    #[tokio::test]
    async fn probes_the_real_interpreter() {
        let info = probe(None).await.unwrap();
        assert!(info.executable.is_absolute());
        assert!(parse_version(&info.version).unwrap() >= MIN_PYTHON);
        assert!(!info.prefixes.is_empty());
    }
}
