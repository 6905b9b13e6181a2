//! Where weights come from. One loader per file format behind a small trait; the model code
//! asks for logical tensors (`Weight`) and never sees a file's naming scheme.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// A tensor the model needs, by role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weight {
    Embed,
    Norm,
    LmHead,
    AttnNorm(usize),
    Q(usize),
    K(usize),
    V(usize),
    QBias(usize),
    KBias(usize),
    VBias(usize),
    /// qwen3's RMS norm weights over each head of q and of k: [head_dim].
    QNorm(usize),
    KNorm(usize),
    O(usize),
    FfnNorm(usize),
    /// Gemma 3's norms: after attention (before the residual add), before the feed-forward
    /// block (its `FfnNorm`, named apart in Hugging Face files), and after it.
    PostAttnNorm(usize),
    PreFfnNorm(usize),
    PostFfnNorm(usize),
    Gate(usize),
    Up(usize),
    Down(usize),
}

/// The weight of a linear layer as stored: either quantized GGUF blocks, kept as raw rows so
/// that layers can be fused and rows permuted without dequantizing, or a dense tensor.
pub enum RawLinear {
    Quantized {
        dtype: GgmlDType,
        data: Vec<u8>,
        rows: usize,
        cols: usize,
    },
    Dense(Tensor),
}

impl RawLinear {
    pub fn rows(&self) -> usize {
        match self {
            RawLinear::Quantized { rows, .. } => *rows,
            RawLinear::Dense(t) => t.dims()[0],
        }
    }

    fn kind(&self) -> Option<GgmlDType> {
        match self {
            RawLinear::Quantized { dtype, .. } => Some(*dtype),
            RawLinear::Dense(_) => None,
        }
    }

    /// Reorders rows: row `i` of the result is row `order[i]` of `self`.
    pub fn permute_rows(self, order: &[usize]) -> Result<Self> {
        Ok(match self {
            RawLinear::Quantized {
                dtype,
                data,
                rows,
                cols,
            } => {
                let row_bytes = data.len() / rows;
                let mut out = Vec::with_capacity(data.len());
                for &r in order {
                    out.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
                }
                RawLinear::Quantized {
                    dtype,
                    data: out,
                    rows,
                    cols,
                }
            }
            RawLinear::Dense(t) => {
                let idx: Vec<u32> = order.iter().map(|&i| i as u32).collect();
                let idx = Tensor::new(idx.as_slice(), t.device())?;
                RawLinear::Dense(t.index_select(&idx, 0)?)
            }
        })
    }

    /// Stacks the rows of several linears (same input size) into one, when they share a storage
    /// kind, so that one matmul computes all of them. Returns them unchanged otherwise.
    pub fn concat_rows(
        parts: Vec<RawLinear>,
    ) -> Result<std::result::Result<RawLinear, Vec<RawLinear>>> {
        let kind = parts[0].kind();
        if parts.iter().any(|p| p.kind() != kind) {
            return Ok(Err(parts));
        }
        Ok(Ok(match kind {
            Some(dtype) => {
                let mut data = Vec::new();
                let (mut rows, mut cols) = (0, 0);
                for p in parts {
                    if let RawLinear::Quantized {
                        data: d,
                        rows: r,
                        cols: c,
                        ..
                    } = p
                    {
                        data.extend_from_slice(&d);
                        rows += r;
                        cols = c;
                    }
                }
                RawLinear::Quantized {
                    dtype,
                    data,
                    rows,
                    cols,
                }
            }
            None => {
                let ts: Vec<Tensor> = parts
                    .into_iter()
                    .filter_map(|p| match p {
                        RawLinear::Dense(t) => Some(t),
                        RawLinear::Quantized { .. } => None,
                    })
                    .collect();
                RawLinear::Dense(Tensor::cat(&ts, 0)?)
            }
        }))
    }

    pub fn into_qmatmul(self, device: &Device) -> Result<QMatMul> {
        Ok(match self {
            RawLinear::Quantized {
                dtype,
                data,
                rows,
                cols,
            } => {
                let qt = candle_core::quantized::ggml_file::qtensor_from_ggml(
                    dtype,
                    &data,
                    vec![rows, cols],
                    device,
                )?;
                QMatMul::from_qtensor(qt)?
            }
            RawLinear::Dense(t) => QMatMul::Tensor(t.to_dtype(DType::F32)?.to_device(device)?),
        })
    }
}

/// One weight file format.
pub trait WeightSource {
    fn path(&self) -> &Path;
    fn has(&self, w: Weight) -> bool;
    /// A linear weight of shape (rows, cols) = (out, in).
    fn linear(&mut self, w: Weight, rows: usize, cols: usize) -> Result<RawLinear>;
    /// A dense f32 tensor of the given shape (norm weights, biases, the embedding table).
    fn dense(&mut self, w: Weight, shape: &[usize], device: &Device) -> Result<Tensor>;
    /// Bytes of weights in the file, and a short name of their dominant storage type.
    fn summary(&self) -> (u64, String);
    /// Checks that `w` is present with shape `want`, without reading its data.
    fn check_shape(&self, w: Weight, want: &[usize]) -> Result<()>;
}

fn check_shape(path: &Path, name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        return Err(Error::bad_model(
            path,
            format!("tensor `{name}` has shape {got:?}, expected {want:?}"),
        ));
    }
    Ok(())
}

pub struct GgufSource {
    path: PathBuf,
    file: File,
    pub content: gguf_file::Content,
    arch: String,
}

impl GgufSource {
    pub fn open(path: &Path) -> Result<Self> {
        // Validates every count, shape and offset (and that the tensors fit in the file).
        let (file, content) = super::gguf::read_file(path)?;
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            content,
            arch,
        })
    }

    fn name(w: Weight) -> String {
        match w {
            Weight::Embed => "token_embd.weight".into(),
            Weight::Norm => "output_norm.weight".into(),
            Weight::LmHead => "output.weight".into(),
            Weight::AttnNorm(l) => format!("blk.{l}.attn_norm.weight"),
            Weight::Q(l) => format!("blk.{l}.attn_q.weight"),
            Weight::K(l) => format!("blk.{l}.attn_k.weight"),
            Weight::V(l) => format!("blk.{l}.attn_v.weight"),
            Weight::QBias(l) => format!("blk.{l}.attn_q.bias"),
            Weight::KBias(l) => format!("blk.{l}.attn_k.bias"),
            Weight::VBias(l) => format!("blk.{l}.attn_v.bias"),
            Weight::QNorm(l) => format!("blk.{l}.attn_q_norm.weight"),
            Weight::KNorm(l) => format!("blk.{l}.attn_k_norm.weight"),
            Weight::O(l) => format!("blk.{l}.attn_output.weight"),
            Weight::FfnNorm(l) | Weight::PreFfnNorm(l) => format!("blk.{l}.ffn_norm.weight"),
            Weight::PostAttnNorm(l) => format!("blk.{l}.post_attention_norm.weight"),
            Weight::PostFfnNorm(l) => format!("blk.{l}.post_ffw_norm.weight"),
            Weight::Gate(l) => format!("blk.{l}.ffn_gate.weight"),
            Weight::Up(l) => format!("blk.{l}.ffn_up.weight"),
            Weight::Down(l) => format!("blk.{l}.ffn_down.weight"),
        }
    }

    fn qtensor(&mut self, name: &str, want: &[usize]) -> Result<QTensor> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| Error::bad_model(&self.path, format!("missing tensor `{name}`")))?;
        check_shape(&self.path, name, info.shape.dims(), want)?;
        self.content
            .tensor(&mut self.file, name, &Device::Cpu)
            .map_err(|e| Error::bad_model(&self.path, format!("reading tensor `{name}`: {e}")))
    }

    /// The tensor that holds `w`: the tied output layer reads the embedding table.
    fn resolve(&self, w: Weight) -> String {
        if w == Weight::LmHead && !self.has(Weight::LmHead) {
            Self::name(Weight::Embed)
        } else {
            Self::name(w)
        }
    }

    /// GGUF stores llama's q/k rows interleaved for the "normal" rotary convention.
    pub fn rope_interleaved(&self) -> bool {
        self.arch == "llama"
    }
}

impl WeightSource for GgufSource {
    fn path(&self) -> &Path {
        &self.path
    }

    fn has(&self, w: Weight) -> bool {
        self.content.tensor_infos.contains_key(&Self::name(w))
    }

    fn linear(&mut self, w: Weight, rows: usize, cols: usize) -> Result<RawLinear> {
        let name = self.resolve(w);
        let qt = self.qtensor(&name, &[rows, cols])?;
        Ok(match qt.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                RawLinear::Dense(qt.dequantize(&Device::Cpu)?)
            }
            dtype => RawLinear::Quantized {
                dtype,
                data: qt.data()?.into_owned(),
                rows,
                cols,
            },
        })
    }

    fn dense(&mut self, w: Weight, shape: &[usize], device: &Device) -> Result<Tensor> {
        let name = Self::name(w);
        Ok(self.qtensor(&name, shape)?.dequantize(device)?)
    }

    fn summary(&self) -> (u64, String) {
        let mut bytes = 0u64;
        let mut by_type: HashMap<String, u64> = HashMap::new();
        for info in self.content.tensor_infos.values() {
            // The reader checked that each size fits; tensors may overlap, so saturate.
            let b = (info.shape.elem_count() / info.ggml_dtype.block_size()) as u64
                * info.ggml_dtype.type_size() as u64;
            bytes = bytes.saturating_add(b);
            let t = by_type.entry(format!("{:?}", info.ggml_dtype)).or_default();
            *t = t.saturating_add(b);
        }
        let dominant = by_type
            .into_iter()
            .max_by_key(|(_, b)| *b)
            .map(|(t, _)| t)
            .unwrap_or_default();
        (bytes, dominant)
    }

    fn check_shape(&self, w: Weight, want: &[usize]) -> Result<()> {
        let name = self.resolve(w);
        let info = self
            .content
            .tensor_infos
            .get(&name)
            .ok_or_else(|| Error::bad_model(&self.path, format!("missing tensor `{name}`")))?;
        check_shape(&self.path, &name, info.shape.dims(), want)
    }
}

/// A Hugging Face safetensors checkpoint (one file or shards), memory-mapped.
pub struct SafetensorsSource {
    dir: PathBuf,
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// Tensor name to index in `files`.
    names: HashMap<String, usize>,
}

impl SafetensorsSource {
    pub fn open(dir: &Path) -> Result<Self> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(Error::bad_model(
                dir,
                "no *.safetensors files in this directory",
            ));
        }
        let mut files = Vec::new();
        let mut names = HashMap::new();
        for p in paths {
            // SAFETY: mapped read-only; forgeline never writes to model files.
            let st = unsafe { MmapedSafetensors::new(&p) }
                .map_err(|e| Error::bad_model(&p, format!("not a valid safetensors file: {e}")))?;
            for (n, _) in st.tensors() {
                names.insert(n, files.len());
            }
            files.push((p, st));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            names,
        })
    }

    fn name(w: Weight) -> String {
        let l = |l: usize, rest: &str| format!("model.layers.{l}.{rest}");
        match w {
            Weight::Embed => "model.embed_tokens.weight".into(),
            Weight::Norm => "model.norm.weight".into(),
            Weight::LmHead => "lm_head.weight".into(),
            Weight::AttnNorm(i) => l(i, "input_layernorm.weight"),
            Weight::Q(i) => l(i, "self_attn.q_proj.weight"),
            Weight::K(i) => l(i, "self_attn.k_proj.weight"),
            Weight::V(i) => l(i, "self_attn.v_proj.weight"),
            Weight::QBias(i) => l(i, "self_attn.q_proj.bias"),
            Weight::KBias(i) => l(i, "self_attn.k_proj.bias"),
            Weight::VBias(i) => l(i, "self_attn.v_proj.bias"),
            Weight::QNorm(i) => l(i, "self_attn.q_norm.weight"),
            Weight::KNorm(i) => l(i, "self_attn.k_norm.weight"),
            Weight::O(i) => l(i, "self_attn.o_proj.weight"),
            Weight::FfnNorm(i) => l(i, "post_attention_layernorm.weight"),
            // Gemma 3 names its pre-feed-forward norm apart: its post_attention_layernorm
            // is the norm after attention.
            Weight::PostAttnNorm(i) => l(i, "post_attention_layernorm.weight"),
            Weight::PreFfnNorm(i) => l(i, "pre_feedforward_layernorm.weight"),
            Weight::PostFfnNorm(i) => l(i, "post_feedforward_layernorm.weight"),
            Weight::Gate(i) => l(i, "mlp.gate_proj.weight"),
            Weight::Up(i) => l(i, "mlp.up_proj.weight"),
            Weight::Down(i) => l(i, "mlp.down_proj.weight"),
        }
    }

    /// The file holding tensor `name`, and its reader.
    fn file_of(&self, name: &str) -> Result<&(PathBuf, MmapedSafetensors)> {
        let &i = self
            .names
            .get(name)
            .ok_or_else(|| Error::bad_model(&self.dir, format!("missing tensor `{name}`")))?;
        Ok(&self.files[i])
    }

    fn load(&self, w: Weight, want: &[usize]) -> Result<Tensor> {
        let name = Self::name(w);
        let (file, st) = self.file_of(&name)?;
        let t = st
            .load(&name, &Device::Cpu)
            .map_err(|e| Error::bad_model(file, format!("reading tensor `{name}`: {e}")))?;
        check_shape(file, &name, t.dims(), want)?;
        Ok(t)
    }
}

impl WeightSource for SafetensorsSource {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn has(&self, w: Weight) -> bool {
        self.names.contains_key(&Self::name(w))
    }

    fn linear(&mut self, w: Weight, rows: usize, cols: usize) -> Result<RawLinear> {
        let w = if w == Weight::LmHead && !self.has(Weight::LmHead) {
            Weight::Embed
        } else {
            w
        };
        Ok(RawLinear::Dense(
            self.load(w, &[rows, cols])?.to_dtype(DType::F32)?,
        ))
    }

    fn dense(&mut self, w: Weight, shape: &[usize], device: &Device) -> Result<Tensor> {
        Ok(self
            .load(w, shape)?
            .to_dtype(DType::F32)?
            .to_device(device)?)
    }

    fn check_shape(&self, w: Weight, want: &[usize]) -> Result<()> {
        let w = if w == Weight::LmHead && !self.has(Weight::LmHead) {
            Weight::Embed
        } else {
            w
        };
        let name = Self::name(w);
        let (file, st) = self.file_of(&name)?;
        let view = st
            .get(&name)
            .map_err(|e| Error::bad_model(file, format!("reading tensor `{name}`: {e}")))?;
        check_shape(file, &name, view.shape(), want)
    }

    fn summary(&self) -> (u64, String) {
        let mut bytes = 0u64;
        let mut dtype = String::new();
        for (name, view) in self.files.iter().flat_map(|(_, st)| st.tensors()) {
            bytes += view.data().len() as u64;
            if name.ends_with("q_proj.weight") {
                dtype = format!("{:?}", view.dtype()).to_lowercase();
            }
        }
        (bytes, dtype)
    }
}

/// Whether the file is a regular file starting with the GGUF magic bytes (a FIFO or device
/// is not opened for reading at all).
pub fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    super::files::open_regular(path)
        .is_ok_and(|mut f| f.read_exact(&mut magic).is_ok() && &magic == b"GGUF")
}
