//! forgeline's own GGUF header reader. It produces candle's `gguf_file::Content`, but checks
//! every count, length, shape and offset against the file before acting on it: candle's
//! reader divides by a zero `general.alignment`, and its shape and offset arithmetic can
//! overflow. Nothing here allocates more than the bytes it has seen justify (a bounded
//! multiple of the header's size), and a malformed file is an error naming the problem.
//!
//! The format: magic `GGUF`, version (1-3), tensor count, metadata count (u32 in v1, else
//! u64), metadata key/type/value triples, tensor infos (name, rank, dims innermost first,
//! ggml type, offset), padding to `general.alignment`, tensor data.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;

use super::files;
use crate::{Error, Result};

/// The largest `general.alignment` accepted (llama.cpp writes 32).
pub const MAX_ALIGNMENT: u64 = 1 << 20;
/// Metadata values in all (array elements count one each). Real vocabularies with their
/// merges and token types hold about a million; each value costs ~32 bytes in memory.
pub const MAX_VALUES: u64 = 1 << 22;
/// Tensors in one file (real models: hundreds to a few thousand).
pub const MAX_TENSORS: u64 = 1 << 18;
/// Bytes in a metadata key or tensor name.
const MAX_NAME: u64 = 1 << 16;
/// Arrays nested in arrays.
const MAX_DEPTH: usize = 4;
/// ggml tensors have at most 4 dimensions.
const MAX_DIMS: u32 = 4;
const DEFAULT_ALIGNMENT: u64 = 32;

/// Opens `path` (a regular file only) and reads its header. Errors name the file.
pub fn read_file(path: &Path) -> Result<(File, Content)> {
    let file = files::open_regular(path)?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let content = read(BufReader::with_capacity(1 << 16, &file), len)
        .map_err(|e| Error::bad_model(path, e.to_string()))?;
    Ok((file, content))
}

/// Reads a GGUF header from bytes (the whole file).
pub fn read_bytes(bytes: &[u8]) -> std::result::Result<Content, GgufError> {
    read(bytes, bytes.len() as u64)
}

/// What is wrong with a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The header itself is malformed.
    #[error("not a readable GGUF file: {0}")]
    Header(String),
    /// The header reads, but the tensor data it describes is not all in the file.
    #[error("file is truncated: {0}")]
    Truncated(String),
}

type Res<T> = std::result::Result<T, GgufError>;

fn bad<T>(msg: impl Into<String>) -> Res<T> {
    Err(GgufError::Header(msg.into()))
}

/// Reads the header of a file of `len` bytes from its start.
fn read<R: Read>(inner: R, len: u64) -> Res<Content> {
    let mut r = Reader {
        inner,
        pos: 0,
        len,
        v1: false,
        values: 0,
    };
    let magic: [u8; 4] = r.array("the magic")?;
    if &magic != b"GGUF" {
        return bad(format!("bad magic {magic:?}, expected \"GGUF\""));
    }
    let version = u32::from_le_bytes(r.array("the version")?);
    let magic = match version {
        1 => VersionedMagic::GgufV1,
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        v => return bad(format!("unsupported GGUF version {v} (supported: 1, 2, 3)")),
    };
    r.v1 = version == 1;
    let tensor_count = r.length("the tensor count")?;
    let kv_count = r.length("the metadata count")?;
    // A metadata entry takes at least 13 bytes on disk (9 in v1), a tensor info 24 (16).
    let (min_kv, min_tensor) = if r.v1 { (9, 16) } else { (13, 24) };
    let need = kv_count
        .checked_mul(min_kv)
        .zip(tensor_count.checked_mul(min_tensor))
        .and_then(|(a, b)| a.checked_add(b));
    if need.is_none_or(|n| n > r.remaining()) {
        return bad(format!(
            "the header declares {tensor_count} tensors and {kv_count} metadata entries, \
             more than the {} bytes left in the file can hold",
            r.remaining()
        ));
    }
    if tensor_count > MAX_TENSORS {
        return bad(format!(
            "{tensor_count} tensors, more than the limit of {MAX_TENSORS}"
        ));
    }

    let mut metadata = HashMap::new();
    for _ in 0..kv_count {
        let key = r.string(MAX_NAME, "a metadata key")?;
        let ty = u32::from_le_bytes(r.array("a metadata type")?);
        let value = r.value(ty, 0, &key)?;
        if metadata.insert(key.clone(), value).is_some() {
            return bad(format!("metadata key `{key}` appears twice"));
        }
    }

    let mut infos = Vec::new();
    for _ in 0..tensor_count {
        infos.push(r.tensor_info()?);
    }
    let alignment = alignment(&metadata)?;
    let tensor_data_offset = r
        .pos
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| GgufError::Header("tensor data offset overflows".into()))?;

    let mut tensor_infos = HashMap::with_capacity(infos.len());
    for (name, info, bytes) in infos {
        // The data must lie in the file: a truncated download reads fine until here.
        let end = tensor_data_offset
            .checked_add(info.offset)
            .and_then(|s| s.checked_add(bytes));
        match end {
            Some(end) if end <= len => {}
            Some(end) => {
                return Err(GgufError::Truncated(format!(
                    "tensor `{name}` needs bytes up to {end}, the file has {len}"
                )))
            }
            None => return bad(format!("tensor `{name}`: offset {} overflows", info.offset)),
        }
        if tensor_infos.insert(name.clone(), info).is_some() {
            return bad(format!("tensor `{name}` appears twice"));
        }
    }
    Ok(Content {
        magic,
        metadata,
        tensor_infos,
        tensor_data_offset,
    })
}

/// A metadata value of any integer type, widened; `None` for other types.
pub(crate) fn int_value(v: &Value) -> Option<i128> {
    Some(match *v {
        Value::U8(x) => x.into(),
        Value::I8(x) => x.into(),
        Value::U16(x) => x.into(),
        Value::I16(x) => x.into(),
        Value::U32(x) => x.into(),
        Value::I32(x) => x.into(),
        Value::U64(x) => x.into(),
        Value::I64(x) => x.into(),
        _ => return None,
    })
}

/// `general.alignment`: any integer type candle accepts, a power of two up to `MAX_ALIGNMENT`.
fn alignment(md: &HashMap<String, Value>) -> Res<u64> {
    let Some(v) = md.get("general.alignment") else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    let Some(a) = int_value(v) else {
        return bad(format!(
            "general.alignment is not an integer but {:?}",
            v.value_type()
        ));
    };
    match u64::try_from(a) {
        Ok(a) if a.is_power_of_two() && a <= MAX_ALIGNMENT => Ok(a),
        _ => bad(format!(
            "general.alignment is {a}, expected a power of two from 1 to {MAX_ALIGNMENT}"
        )),
    }
}

/// The ggml type numbers candle supports (ggml.h's `ggml_type`).
fn ggml_dtype(u: u32) -> Option<GgmlDType> {
    Some(match u {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

struct Reader<R> {
    inner: R,
    /// Bytes consumed from the start of the file.
    pos: u64,
    len: u64,
    v1: bool,
    /// Metadata values read so far.
    values: u64,
}

impl<R: Read> Reader<R> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn fill(&mut self, buf: &mut [u8], what: &str) -> Res<()> {
        if buf.len() as u64 > self.remaining() {
            return bad(format!("the file ends at byte {} inside {what}", self.len));
        }
        self.inner
            .read_exact(buf)
            .map_err(|e| GgufError::Header(format!("reading {what} at byte {}: {e}", self.pos)))?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Res<[u8; N]> {
        let mut b = [0u8; N];
        self.fill(&mut b, what)?;
        Ok(b)
    }

    /// A count or length: u32 in GGUF v1, u64 after.
    fn length(&mut self, what: &str) -> Res<u64> {
        Ok(if self.v1 {
            u32::from_le_bytes(self.array(what)?).into()
        } else {
            u64::from_le_bytes(self.array(what)?)
        })
    }

    fn string(&mut self, max: u64, what: &str) -> Res<String> {
        let len = self.length(what)?;
        if len > max || len > self.remaining() {
            return bad(format!(
                "{what} at byte {} is {len} bytes long, more than {}",
                self.pos,
                max.min(self.remaining())
            ));
        }
        let mut v = vec![0u8; len as usize];
        self.fill(&mut v, what)?;
        // As candle's reader: trailing NULs dropped, invalid UTF-8 replaced.
        while v.last() == Some(&0) {
            v.pop();
        }
        Ok(String::from_utf8_lossy(&v).into_owned())
    }

    fn count_values(&mut self, n: u64, key: &str) -> Res<()> {
        self.values = self.values.saturating_add(n);
        if self.values > MAX_VALUES {
            return bad(format!(
                "metadata `{key}`: the metadata holds more than {MAX_VALUES} values"
            ));
        }
        Ok(())
    }

    fn value(&mut self, ty: u32, depth: usize, key: &str) -> Res<Value> {
        self.count_values(1, key)?;
        let what = &format!("the value of `{key}`");
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(self.array(what)?)),
            1 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(what)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return bad(format!("metadata `{key}`: bool of value {b}")),
            },
            8 => Value::String(self.string(u64::MAX, what)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return bad(format!(
                        "metadata `{key}`: arrays nested more than {MAX_DEPTH} deep"
                    ));
                }
                let elem = u32::from_le_bytes(self.array(what)?);
                let len = self.length(what)?;
                let Some(min) = self.min_size(elem) else {
                    return bad(format!(
                        "metadata `{key}`: unknown array element type {elem}"
                    ));
                };
                if len.checked_mul(min).is_none_or(|n| n > self.remaining()) {
                    return bad(format!(
                        "metadata `{key}`: an array of {len} elements does not fit in the {} bytes left",
                        self.remaining()
                    ));
                }
                // Checked before the allocation below.
                self.count_values(len, key)?;
                self.values -= len;
                let mut vs = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    vs.push(self.value(elem, depth + 1, key)?);
                }
                Value::Array(vs)
            }
            10 => Value::U64(u64::from_le_bytes(self.array(what)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            t => return bad(format!("metadata `{key}`: unknown value type {t}")),
        })
    }

    /// The fewest bytes a value of type `ty` takes on disk; None for an unknown type.
    fn min_size(&self, ty: u32) -> Option<u64> {
        let len = if self.v1 { 4 } else { 8 };
        Some(match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => len,
            9 => 4 + len,
            _ => return None,
        })
    }

    /// One tensor info: its name, candle's `TensorInfo` (dims outermost first) and its size
    /// in bytes.
    fn tensor_info(&mut self) -> Res<(String, TensorInfo, u64)> {
        let name = self.string(MAX_NAME, "a tensor name")?;
        let what = &format!("tensor `{name}`");
        let rank = u32::from_le_bytes(self.array(what)?);
        if rank > MAX_DIMS {
            return bad(format!(
                "{what} has {rank} dimensions, at most {MAX_DIMS} are allowed"
            ));
        }
        let mut dims = Vec::with_capacity(rank as usize);
        let mut elems: u64 = 1;
        for _ in 0..rank {
            let d = self.length(what)?;
            if d == 0 {
                return bad(format!("{what} has a dimension of size 0"));
            }
            elems = elems
                .checked_mul(d)
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(|| GgufError::Header(format!("{what}: its element count overflows")))?;
            dims.push(
                usize::try_from(d).map_err(|_| {
                    GgufError::Header(format!("{what}: dimension {d} is too large"))
                })?,
            );
        }
        let ty = u32::from_le_bytes(self.array(what)?);
        let dtype = ggml_dtype(ty)
            .ok_or_else(|| GgufError::Header(format!("{what} has unknown ggml type {ty}")))?;
        let offset = u64::from_le_bytes(self.array(what)?);
        let (bs, ts) = (dtype.block_size() as u64, dtype.type_size() as u64);
        // ggml packs each row (the innermost dimension, written first) in whole blocks.
        let row = dims.first().copied().unwrap_or(1) as u64;
        if !row.is_multiple_of(bs) {
            return bad(format!(
                "{what}: rows of {row} elements are not whole {dtype:?} blocks of {bs}"
            ));
        }
        let bytes = (elems / bs)
            .checked_mul(ts)
            .ok_or_else(|| GgufError::Header(format!("{what}: its byte size overflows")))?;
        dims.reverse();
        let info = TensorInfo {
            ggml_dtype: dtype,
            shape: candle_core::Shape::from(dims),
            offset,
        };
        Ok((name, info, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 file: metadata `md` (already encoded key/type/value bytes), then tensors
    /// given as (name, dims innermost first, type, offset).
    fn file(kvs: &[Vec<u8>], tensors: &[(&str, &[u64], u32, u64)], data: usize) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((kvs.len() as u64).to_le_bytes());
        for kv in kvs {
            b.extend(kv);
        }
        for (name, dims, ty, off) in tensors {
            b.extend((name.len() as u64).to_le_bytes());
            b.extend(name.as_bytes());
            b.extend((dims.len() as u32).to_le_bytes());
            for d in *dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(off.to_le_bytes());
        }
        while !b.len().is_multiple_of(32) {
            b.push(0);
        }
        b.extend(std::iter::repeat_n(0u8, data));
        b
    }

    fn kv(key: &str, ty: u32, value: &[u8]) -> Vec<u8> {
        let mut b = (key.len() as u64).to_le_bytes().to_vec();
        b.extend(key.as_bytes());
        b.extend(ty.to_le_bytes());
        b.extend(value);
        b
    }

    fn err(bytes: &[u8]) -> String {
        read_bytes(bytes).unwrap_err().to_string()
    }

    #[test]
    fn a_valid_file_reads_like_candle_reads_it() {
        let bytes = file(
            &[kv("general.architecture", 8, b"\x05\0\0\0\0\0\0\0llama")],
            &[("t", &[32, 2], 0, 0)],
            256,
        );
        let ours = read_bytes(&bytes).unwrap();
        let theirs =
            candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(&bytes))
                .unwrap();
        assert_eq!(ours.tensor_data_offset, theirs.tensor_data_offset);
        assert_eq!(ours.tensor_infos["t"].shape.dims(), &[2, 32]);
        assert_eq!(
            theirs.tensor_infos["t"].shape.dims(),
            ours.tensor_infos["t"].shape.dims()
        );
        assert_eq!(
            ours.metadata["general.architecture"].to_string().unwrap(),
            "llama"
        );
    }

    #[test]
    fn zero_or_odd_alignment_is_named() {
        for a in [0u32, 3, 1 << 30] {
            let bytes = file(&[kv("general.alignment", 4, &a.to_le_bytes())], &[], 0);
            let e = err(&bytes);
            assert!(e.contains("general.alignment is"), "{e}");
        }
    }

    #[test]
    fn overflowing_shapes_and_offsets_are_named() {
        let big = 1u64 << 40;
        let e = err(&file(&[], &[("t", &[big, big], 0, 0)], 0));
        assert!(e.contains("tensor `t`: its element count overflows"), "{e}");
        let e = err(&file(&[], &[("t", &[32], 0, u64::MAX - 8)], 256));
        assert!(e.contains("tensor `t`: offset"), "{e}");
        let e = err(&file(&[], &[("t", &[4, 1, 1, 1, 1], 0, 0)], 256));
        assert!(e.contains("5 dimensions"), "{e}");
        let e = err(&file(&[], &[("t", &[4, 0], 0, 0)], 256));
        assert!(e.contains("dimension of size 0"), "{e}");
        let e = err(&file(&[], &[("t", &[33], 8, 0)], 256));
        assert!(e.contains("not whole Q8_0 blocks"), "{e}");
        let e = err(&file(&[], &[("t", &[64], 0, 0)], 100));
        assert!(e.contains("truncated") && e.contains("tensor `t`"), "{e}");
    }

    #[test]
    fn lengths_beyond_the_file_are_refused_before_allocating() {
        // A string, an array and the counts each claiming far more than the file holds.
        let e = err(&file(&[kv("s", 8, &u64::MAX.to_le_bytes())], &[], 0));
        assert!(e.contains("the value of `s`"), "{e}");
        let mut arr = 0u32.to_le_bytes().to_vec();
        arr.extend((1u64 << 60).to_le_bytes());
        let e = err(&file(&[kv("a", 9, &arr)], &[], 0));
        assert!(e.contains("array of 1152921504606846976 elements"), "{e}");
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(u64::MAX.to_le_bytes());
        b.extend(u64::MAX.to_le_bytes());
        assert!(err(&b).contains("more than the 0 bytes left"));
        assert!(err(b"GGUF").contains("the file ends"));
        assert!(err(b"GGML\x03\0\0\0").contains("bad magic"));
    }
}
