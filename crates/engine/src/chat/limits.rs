//! Limits on what one render of a chat template may allocate: its output, and the size
//! arguments of the built-in filters (fuel counts instructions, not the work inside one
//! filter call, so `indent(10**12)` would allocate whatever it is asked for).

use minijinja::value::{Kwargs, Rest, StringInput};
use minijinja::{ErrorKind, State, Value};

use super::MAX_OUTPUT;

/// Size arguments of filters (indent width, batch and slice counts, format widths): the
/// built-in filters allocate whatever they are asked for.
const MAX_SIZE_ARG: usize = 100_000;

/// Collects output up to `MAX_OUTPUT` bytes; a write past it fails the render.
#[derive(Default)]
pub(super) struct CappedWriter {
    pub(super) buf: Vec<u8>,
    pub(super) overflow: bool,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > MAX_OUTPUT {
            self.overflow = true;
            return Err(std::io::Error::other("chat template output too large"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub(super) fn too_large(what: &str, n: usize, max: usize) -> minijinja::Error {
    minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("{what} {n} is over the limit of {max}"),
    )
}

pub(super) fn size_arg(what: &str, n: usize) -> std::result::Result<(), minijinja::Error> {
    if n > MAX_SIZE_ARG {
        return Err(too_large(what, n, MAX_SIZE_ARG));
    }
    Ok(())
}

/// Rejects integer arguments past `MAX_SIZE_ARG` (widths given with `*` or `{}`) and width
/// digits of that size written in the format string itself.
pub(super) fn check_format(fmt: &str, args: &[Value]) -> std::result::Result<(), minijinja::Error> {
    for a in args {
        if let Ok(n) = i64::try_from(a.clone()) {
            size_arg("format argument", n.unsigned_abs() as usize)?;
        }
    }
    let digits = MAX_SIZE_ARG.to_string().len();
    let mut run = 0;
    for c in fmt.chars() {
        run = if c.is_ascii_digit() { run + 1 } else { 0 };
        if run >= digits {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("format strings with numbers of {digits} or more digits are refused"),
            ));
        }
    }
    Ok(())
}

/// The length of `s` with every `from` replaced by `to` (an empty `from` matches between
/// every two characters, as Python's `str.replace` does).
pub(super) fn replaced_len(s: &str, from: &str, to: &str) -> usize {
    let n = if from.is_empty() {
        s.chars().count() + 1
    } else {
        s.matches(from).count()
    };
    let kept = s.len() - n.saturating_mul(from.len()).min(s.len());
    kept.saturating_add(n.saturating_mul(to.len()))
}

pub(super) fn check_replace(
    s: &str,
    from: &str,
    to: &str,
) -> std::result::Result<(), minijinja::Error> {
    let n = replaced_len(s, from, to);
    if n > MAX_OUTPUT {
        return Err(too_large("replace result of", n, MAX_OUTPUT));
    }
    Ok(())
}

pub(super) fn indent(
    value: StringInput<'_>,
    width: Option<usize>,
    first: Option<bool>,
    blank: Option<bool>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let width = match width {
        Some(w) => Some(w),
        None => kwargs.get::<Option<usize>>("width")?,
    };
    size_arg("indent width", width.unwrap_or(0))?;
    minijinja::filters::indent(value, width, first, blank, kwargs)
}

pub(super) fn batch(
    state: &State,
    value: Value,
    count: usize,
    fill: Option<Value>,
) -> std::result::Result<Value, minijinja::Error> {
    size_arg("batch size", count)?;
    minijinja::filters::batch(state, value, count, fill)
}

pub(super) fn slice(
    state: &State,
    value: Value,
    count: usize,
    fill: Option<Value>,
) -> std::result::Result<Value, minijinja::Error> {
    size_arg("slice count", count)?;
    minijinja::filters::slice(state, value, count, fill)
}

pub(super) fn replace(
    state: &State,
    value: StringInput<'_>,
    from: StringInput<'_>,
    to: StringInput<'_>,
) -> std::result::Result<Value, minijinja::Error> {
    check_replace(value.as_str(), from.as_str(), to.as_str())?;
    minijinja::filters::replace(state, value, from, to)
}

pub(super) fn format(
    state: &State,
    fmt: &Value,
    args: Rest<Value>,
) -> std::result::Result<Value, minijinja::Error> {
    check_format(fmt.as_str().unwrap_or(""), &args)?;
    minijinja::filters::format(state, fmt, args)
}
