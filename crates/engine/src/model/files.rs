//! Opening model files safely: only regular files (a FIFO would block `open` and every read
//! after it; a device such as /dev/zero never ends), and whole-file reads with a size cap.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// The largest JSON / template file read whole (tokenizer.json files reach ~35 MB).
pub const MAX_TEXT_FILE: u64 = 256 << 20;

/// Opens `path` for reading if it is a regular file (after following symlinks).
pub fn open_regular(path: &Path) -> Result<File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Without O_NONBLOCK, opening a FIFO waits for a writer forever.
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let file = opts.open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::bad_model(path, "not a regular file"));
    }
    Ok(file)
}

/// Reads a whole regular file of at most `max` bytes.
pub fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>> {
    let file = open_regular(path)?;
    let mut bytes = Vec::new();
    // One byte past the cap tells a file that is too large from one that is exactly `max`.
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > max {
        return Err(Error::bad_model(
            path,
            format!("file is larger than the {max}-byte limit for this kind of file"),
        ));
    }
    Ok(bytes)
}

/// `read_capped` at `MAX_TEXT_FILE`, as UTF-8 text.
pub fn read_text(path: &Path) -> Result<String> {
    String::from_utf8(read_capped(path, MAX_TEXT_FILE)?)
        .map_err(|e| Error::bad_model(path, format!("not UTF-8 text: {e}")))
}

/// Whether an error from `open_regular`/`read_capped` means the file does not exist.
pub fn is_not_found(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}
