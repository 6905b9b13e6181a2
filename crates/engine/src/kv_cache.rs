//! The KV cache, owned by the engine rather than by the layers: a pool of fixed-size blocks
//! (as vLLM's PagedAttention). Each sequence holds a `BlockTable`; position `p` of a sequence
//! lives in slot `table[p / block_size] * block_size + p % block_size`. Blocks are reference
//! counted so that sequences can share a cached prefix without copying it.

use candle_core::{DType, Device, Tensor};

use crate::error::{ConfigError, KvShortage};
use crate::memory::ForkExcluded;
use crate::model::ModelConfig;
use crate::Result;

/// The blocks of one sequence, in position order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<u32>,
}

impl BlockTable {
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The slot of each position in `range`.
    pub fn slots(&self, block_size: usize, range: std::ops::Range<usize>) -> Vec<u32> {
        range
            .map(|p| self.blocks[p / block_size] * block_size as u32 + (p % block_size) as u32)
            .collect()
    }
}

pub struct KvCache {
    block_size: usize,
    /// Declared before `layers`, so that they drop first.
    _fork: Vec<ForkExcluded>,
    /// Per layer: [slots, 2, kv_heads, head_dim], K at index 0 and V at index 1 of dim 1.
    layers: Vec<Tensor>,
    refcount: Vec<u32>,
    free: Vec<u32>,
    bytes_per_block: usize,
}

/// What the KV cache stores K and V as, by the names the command line takes
/// (`--cache-type`, as llama.cpp's `--cache-type-k`): f16 by default, or f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvCacheType {
    #[default]
    F16,
    F32,
}

impl KvCacheType {
    pub const fn dtype(self) -> DType {
        match self {
            Self::F16 => DType::F16,
            Self::F32 => DType::F32,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::F32 => "f32",
        }
    }
}

impl std::str::FromStr for KvCacheType {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(Self::F16),
            "f32" => Ok(Self::F32),
            _ => Err(format!("unknown KV cache type `{s}`: expected f16 or f32")),
        }
    }
}

impl std::fmt::Display for KvCacheType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl KvCache {
    pub const DEFAULT_BLOCK_SIZE: usize = 16;
    /// What K and V are stored as by default. f16 (llama.cpp's default too) halves what
    /// attention reads, and with long contexts those reads are most of its time; f32 is kept
    /// for comparisons that must match a reference exactly.
    pub const DEFAULT_DTYPE: DType = KvCacheType::F16.dtype();

    /// Bytes of cache one token takes across all layers.
    pub fn bytes_per_token(cfg: &ModelConfig, dtype: DType) -> usize {
        cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * dtype.size_in_bytes()
    }

    /// A cache of at most `budget_bytes` (at least one block).
    pub fn with_budget(
        cfg: &ModelConfig,
        block_size: usize,
        budget_bytes: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let per_block = Self::bytes_per_token(cfg, dtype) * block_size;
        Self::new(
            cfg,
            block_size,
            (budget_bytes / per_block).max(1),
            dtype,
            device,
        )
    }

    pub fn new(
        cfg: &ModelConfig,
        block_size: usize,
        num_blocks: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if block_size == 0 || num_blocks == 0 {
            return Err(ConfigError::EmptyKvCache.into());
        }
        if !matches!(dtype, DType::F16 | DType::F32) {
            return Err(ConfigError::KvCacheType(dtype).into());
        }
        let slots = block_size * num_blocks;
        let layers = (0..cfg.num_layers)
            .map(|_| Tensor::zeros((slots, 2, cfg.num_kv_heads, cfg.head_dim), dtype, device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            block_size,
            _fork: layers.iter().map(ForkExcluded::tensor).collect(),
            layers,
            refcount: vec![0; num_blocks],
            free: (0..num_blocks as u32).rev().collect(),
            bytes_per_block: Self::bytes_per_token(cfg, dtype) * block_size,
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.refcount.len()
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn used_bytes(&self) -> usize {
        (self.num_blocks() - self.free_blocks()) * self.bytes_per_block
    }

    pub fn capacity_bytes(&self) -> usize {
        self.num_blocks() * self.bytes_per_block
    }

    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    pub(crate) fn layer(&self, l: usize) -> &Tensor {
        &self.layers[l]
    }

    /// Grows `table` so that it holds `tokens` positions. Allocates all or nothing.
    pub fn reserve(&mut self, table: &mut BlockTable, tokens: usize) -> Result<()> {
        let need = self.blocks_for(tokens).saturating_sub(table.blocks.len());
        if need > self.free.len() {
            return Err(KvShortage::Reserve {
                tokens,
                needed_blocks: need,
                free_blocks: self.free.len(),
                block_size: self.block_size,
            }
            .into());
        }
        for _ in 0..need {
            let b = self.free.pop().expect("checked above");
            self.refcount[b as usize] = 1;
            table.blocks.push(b);
        }
        Ok(())
    }

    /// A new table sharing the first `n_blocks` blocks of `table` (a cached prefix). Only
    /// full blocks may be shared: the new sequence writes its own positions after them.
    pub fn share_prefix(&mut self, table: &BlockTable, n_blocks: usize) -> BlockTable {
        let blocks = table.blocks[..n_blocks].to_vec();
        for &b in &blocks {
            self.refcount[b as usize] += 1;
        }
        BlockTable { blocks }
    }

    /// Gives back the blocks of `table`; each returns to the pool when nothing holds it.
    pub fn release(&mut self, table: &mut BlockTable) {
        for b in table.blocks.drain(..) {
            self.release_block(b);
        }
    }

    /// Takes one more reference on an allocated block (a prefix cache keeping it).
    pub fn retain_block(&mut self, block: u32) {
        debug_assert!(self.refcount[block as usize] > 0, "retaining a free block");
        self.refcount[block as usize] += 1;
    }

    /// Drops one reference; the block returns to the pool when it was the last.
    pub fn release_block(&mut self, block: u32) {
        let rc = &mut self.refcount[block as usize];
        *rc -= 1;
        if *rc == 0 {
            self.free.push(block);
        }
    }

    /// How many holders a block has (0: free).
    pub fn refcount(&self, block: u32) -> u32 {
        self.refcount[block as usize]
    }

    /// A new table starting with `blocks` (a cached prefix), taking a reference on each.
    pub fn adopt(&mut self, blocks: &[u32]) -> BlockTable {
        for &b in blocks {
            self.retain_block(b);
        }
        BlockTable {
            blocks: blocks.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[test]
    fn cache_types_parse_by_name() {
        assert_eq!("f16".parse::<KvCacheType>(), Ok(KvCacheType::F16));
        assert_eq!("F32".parse::<KvCacheType>(), Ok(KvCacheType::F32));
        assert_eq!(KvCacheType::default().dtype(), KvCache::DEFAULT_DTYPE);
        let e = "q8_0".parse::<KvCacheType>().unwrap_err();
        assert!(e.contains("q8_0") && e.contains("f16"), "{e}");
    }
    use crate::model::Arch;

    fn cfg() -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            hidden_size: 8,
            intermediate_size: 16,
            num_layers: 2,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            vocab_size: 10,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.,
            rope_scaling: None,
            context_length: 64,
            tie_word_embeddings: true,
            gemma: None,
        }
    }

    #[test]
    fn reserve_is_all_or_nothing_and_release_returns_blocks() {
        let mut kv = KvCache::new(&cfg(), 4, 3, DType::F32, &Device::Cpu).unwrap();
        let mut a = BlockTable::default();
        kv.reserve(&mut a, 9).unwrap();
        assert_eq!(a.blocks().len(), 3);
        assert_eq!(kv.free_blocks(), 0);
        let mut b = BlockTable::default();
        let err = kv.reserve(&mut b, 1).unwrap_err();
        let Error::OutOfMemory(short) = err else {
            panic!("{err}")
        };
        assert_eq!(
            short,
            KvShortage::Reserve {
                tokens: 1,
                needed_blocks: 1,
                free_blocks: 0,
                block_size: 4
            }
        );
        assert!(b.is_empty());
        kv.release(&mut a);
        assert_eq!(kv.free_blocks(), 3);
        assert_eq!(kv.used_bytes(), 0);
    }

    #[test]
    fn shared_prefix_blocks_outlive_their_first_owner() {
        let mut kv = KvCache::new(&cfg(), 4, 4, DType::F32, &Device::Cpu).unwrap();
        let mut a = BlockTable::default();
        kv.reserve(&mut a, 8).unwrap();
        let mut b = kv.share_prefix(&a, 2);
        kv.reserve(&mut b, 10).unwrap();
        assert_eq!(&b.blocks()[..2], a.blocks());
        assert_eq!(kv.free_blocks(), 1);
        kv.release(&mut a);
        assert_eq!(kv.free_blocks(), 1, "shared blocks stay while b holds them");
        kv.release(&mut b);
        assert_eq!(kv.free_blocks(), 4);
    }

    #[test]
    fn slots_follow_the_block_table() {
        let t = BlockTable { blocks: vec![5, 2] };
        assert_eq!(t.slots(4, 2..7), vec![22, 23, 8, 9, 10]);
    }
}
