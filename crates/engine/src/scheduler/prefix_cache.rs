//! A token-level prefix tree over cached KV blocks (SGLang's RadixAttention, at block
//! granularity). Pipeline stages share long prompt prefixes (system prompt, task, plan); when a
//! sequence's prompt starts with blocks another sequence already computed, the scheduler adopts
//! those blocks instead of recomputing their prefill.
//!
//! Each node below the root holds exactly one full block: its `block_size` token ids and the KV
//! block that holds their KV. A path from the root spells a prefix, so a node's KV is valid only
//! after its ancestors' (attention reads every earlier position). Only whole blocks are cached:
//! a partly filled tail block is still being written by its sequence.
//!
//! The tree holds one reference on each of its blocks (`KvCache::retain_block`). A block whose
//! refcount is 1 is held by the tree alone and can be evicted; one above 1 is also in some
//! running sequence's table and must stay. Eviction takes leaves first (a node's children are
//! useless without it), least recently used first.

use std::collections::{BTreeSet, HashMap};

use crate::kv_cache::KvCache;

type NodeId = usize;

/// The root: holds no block, is never a leaf candidate, never evicted.
const ROOT: NodeId = 0;

#[derive(Debug, Default)]
struct Node {
    /// The block's token ids (also the key under which the parent finds this node).
    tokens: Box<[u32]>,
    block: u32,
    parent: NodeId,
    children: HashMap<Box<[u32]>, NodeId>,
    /// Tick of the last lookup or insert through this node. A lookup touches a whole path at
    /// once, so a parent's tick is never older than its children's.
    last_used: u64,
}

/// The prefix tree. Not thread-safe by itself: the scheduler owns it next to the `KvCache`.
#[derive(Debug)]
pub struct PrefixCache {
    block_size: usize,
    /// Arena; `nodes[ROOT]` is the root. Freed slots are listed in `free` and reused.
    nodes: Vec<Node>,
    free: Vec<NodeId>,
    /// Every non-root node without children, ordered by (last_used, id): eviction candidates
    /// in LRU order without scanning the whole tree.
    leaves: BTreeSet<(u64, NodeId)>,
    tick: u64,
}

impl PrefixCache {
    pub fn new(block_size: usize) -> Self {
        assert!(block_size > 0, "prefix cache needs a positive block size");
        Self {
            block_size,
            nodes: vec![Node::default()],
            free: Vec::new(),
            leaves: BTreeSet::new(),
            tick: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// How many blocks the tree holds a reference on.
    pub fn cached_blocks(&self) -> usize {
        self.nodes.len() - 1 - self.free.len()
    }

    /// The KV blocks of the longest cached prefix of `tokens`, whole blocks only, at most
    /// `max_blocks`; touches them (LRU). The caller takes its own references (`kv.adopt`)
    /// before anything can evict them. A caller that needs logits for its last prompt token
    /// passes `max_blocks = (tokens.len() - 1) / block_size` so that one token is left to
    /// compute.
    pub fn lookup(&mut self, tokens: &[u32], max_blocks: usize) -> Vec<u32> {
        let tick = self.next_tick();
        let mut node = ROOT;
        let mut blocks = Vec::new();
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let Some(&child) = self.nodes[node].children.get(chunk) else {
                break;
            };
            self.touch(child, tick);
            blocks.push(self.nodes[child].block);
            node = child;
        }
        blocks
    }

    /// What `lookup` would return, without touching anything: for planning a step before
    /// deciding who adopts what.
    pub fn peek(&self, tokens: &[u32], max_blocks: usize) -> Vec<u32> {
        let mut node = ROOT;
        let mut blocks = Vec::new();
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let Some(&child) = self.nodes[node].children.get(chunk) else {
                break;
            };
            blocks.push(self.nodes[child].block);
            node = child;
        }
        blocks
    }

    /// Records that `blocks[i]` holds the KV of `tokens[i*bs..(i+1)*bs]` (only whole blocks:
    /// `blocks.len() <= tokens.len() / bs`; extra blocks are ignored). Each block newly added
    /// to the tree gets a reference (`kv.retain_block`). Where the tree already has a node for
    /// a token block (another sequence computed the same prefix), the existing node and block
    /// are kept and followed: the caller's duplicate block stays the caller's alone and returns
    /// to the pool when its sequence releases it. Later blocks of the caller may still hang
    /// under the existing node, since KV depends on the token ids, not on which block holds
    /// the earlier positions.
    pub fn insert(&mut self, tokens: &[u32], blocks: &[u32], kv: &mut KvCache) {
        debug_assert!(blocks.len() * self.block_size <= tokens.len());
        let tick = self.next_tick();
        let mut node = ROOT;
        for (chunk, &block) in tokens.chunks_exact(self.block_size).zip(blocks) {
            node = match self.nodes[node].children.get(chunk) {
                Some(&child) => child,
                None => {
                    kv.retain_block(block);
                    self.add_child(node, chunk, block)
                }
            };
            self.touch(node, tick);
        }
    }

    /// Evicts least-recently-used leaves whose block only the cache holds
    /// (`kv.refcount == 1`), releasing them, until `kv.free_blocks() >= need` or nothing is
    /// evictable. A parent becomes a leaf, and a candidate, when its last child goes. Returns
    /// the number of blocks freed.
    pub fn evict(&mut self, kv: &mut KvCache, need: usize) -> usize {
        let mut freed = 0;
        // Leaves some sequence still uses, set aside for this call so that each is looked at
        // once; they go back into `leaves` at the end.
        let mut pinned = Vec::new();
        while kv.free_blocks() < need {
            let Some((tick, id)) = self.leaves.pop_first() else {
                break;
            };
            let block = self.nodes[id].block;
            if kv.refcount(block) > 1 {
                pinned.push((tick, id));
                continue;
            }
            self.remove_leaf(id);
            kv.release_block(block);
            freed += 1;
        }
        self.leaves.extend(pinned);
        freed
    }

    /// How many blocks `evict` could free now: nodes whose block, and every descendant's, only
    /// the cache holds. O(nodes); for admission decisions (free + evictable >= need).
    pub fn evictable_blocks(&self, kv: &KvCache) -> usize {
        // Post-order over the tree without recursion: a node counts when its whole subtree
        // is held by the cache alone.
        let mut count = 0;
        let mut stack = vec![(ROOT, false)];
        let mut all_free = vec![true; self.nodes.len()];
        while let Some((id, expanded)) = stack.pop() {
            if !expanded {
                stack.push((id, true));
                stack.extend(self.nodes[id].children.values().map(|&c| (c, false)));
                continue;
            }
            let node = &self.nodes[id];
            let free = node.children.values().all(|&c| all_free[c])
                && (id == ROOT || kv.refcount(node.block) == 1);
            all_free[id] = free;
            if free && id != ROOT {
                count += 1;
            }
        }
        count
    }

    /// Drops every entry, releasing the cache's references (blocks a sequence still holds stay
    /// allocated until it releases them).
    pub fn clear(&mut self, kv: &mut KvCache) {
        for node in self.nodes.drain(1..) {
            // Freed arena slots are not in the tree: their blocks were released already.
            if !node.tokens.is_empty() {
                kv.release_block(node.block);
            }
        }
        self.nodes[ROOT].children.clear();
        self.free.clear();
        self.leaves.clear();
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Marks `id` used at `tick`, keeping its place in `leaves` current.
    fn touch(&mut self, id: NodeId, tick: u64) {
        let node = &mut self.nodes[id];
        if node.children.is_empty() {
            self.leaves.remove(&(node.last_used, id));
            self.leaves.insert((tick, id));
        }
        node.last_used = tick;
    }

    fn add_child(&mut self, parent: NodeId, tokens: &[u32], block: u32) -> NodeId {
        let node = Node {
            tokens: tokens.into(),
            block,
            parent,
            children: HashMap::new(),
            last_used: 0,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.nodes[id] = node;
                id
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        };
        let p = &mut self.nodes[parent];
        if p.children.is_empty() && parent != ROOT {
            self.leaves.remove(&(p.last_used, parent));
        }
        p.children.insert(tokens.into(), id);
        self.leaves.insert((0, id));
        id
    }

    /// Unlinks a leaf (already taken out of `leaves`) and frees its slot; its parent becomes
    /// a leaf when this was its last child.
    fn remove_leaf(&mut self, id: NodeId) {
        let node = std::mem::take(&mut self.nodes[id]);
        debug_assert!(node.children.is_empty());
        let p = &mut self.nodes[node.parent];
        p.children.remove(&node.tokens);
        if p.children.is_empty() && node.parent != ROOT {
            self.leaves.insert((p.last_used, node.parent));
        }
        self.free.push(id);
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::kv_cache::BlockTable;
    use crate::model::{Arch, ModelConfig};

    const BS: usize = 4;

    fn kv(num_blocks: usize) -> KvCache {
        let cfg = ModelConfig {
            arch: Arch::Llama,
            hidden_size: 8,
            intermediate_size: 16,
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            vocab_size: 100,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.,
            rope_scaling: None,
            context_length: 256,
            tie_word_embeddings: true,
            gemma: None,
        };
        KvCache::new(&cfg, BS, num_blocks, candle_core::DType::F32, &Device::Cpu).unwrap()
    }

    /// A sequence that computed `tokens`: reserves its blocks, caches its whole ones.
    fn run(pc: &mut PrefixCache, kv: &mut KvCache, tokens: &[u32]) -> BlockTable {
        let mut table = BlockTable::default();
        kv.reserve(&mut table, tokens.len()).unwrap();
        let whole = tokens.len() / BS;
        pc.insert(tokens, &table.blocks()[..whole], kv);
        table
    }

    fn seq(start: u32, len: usize) -> Vec<u32> {
        (start..start + len as u32).collect()
    }

    #[test]
    fn lookup_returns_whole_inserted_blocks_capped_by_max_blocks() {
        let (mut kv, mut pc) = (kv(8), PrefixCache::new(BS));
        let tokens = seq(0, 10); // two whole blocks and a tail of two
        let table = run(&mut pc, &mut kv, &tokens);
        assert_eq!(pc.cached_blocks(), 2, "the partial tail is not cached");
        assert_eq!(pc.lookup(&tokens, usize::MAX), table.blocks()[..2]);
        assert_eq!(pc.lookup(&seq(0, 7), usize::MAX), table.blocks()[..1]);
        assert_eq!(pc.lookup(&tokens, 1), table.blocks()[..1]);
        assert_eq!(pc.peek(&tokens, usize::MAX), table.blocks()[..2]);
        assert_eq!(pc.peek(&seq(0, 7), 1), table.blocks()[..1]);
        assert!(pc.lookup(&seq(1, 10), usize::MAX).is_empty());
        let diverging = [seq(0, 5), vec![99, 6, 7]].concat();
        assert_eq!(pc.lookup(&diverging, usize::MAX), table.blocks()[..1]);
    }

    #[test]
    fn sequences_sharing_a_prefix_share_nodes() {
        let (mut kv, mut pc) = (kv(16), PrefixCache::new(BS));
        let a = seq(0, 12);
        let mut b = seq(0, 12);
        b[9] = 99; // same first two blocks, different third
        let ta = run(&mut pc, &mut kv, &a);
        // b adopts the cached prefix, as the scheduler does, then computes the rest.
        let hit = pc.lookup(&b, usize::MAX);
        assert_eq!(hit, ta.blocks()[..2]);
        let mut tb = kv.adopt(&hit);
        kv.reserve(&mut tb, b.len()).unwrap();
        pc.insert(&b, tb.blocks(), &mut kv);
        assert_eq!(pc.cached_blocks(), 4, "two shared nodes and one leaf each");
        assert_eq!(kv.refcount(ta.blocks()[0]), 3, "a, b and the tree");
        assert_eq!(pc.lookup(&b, usize::MAX), tb.blocks());
        assert_eq!(pc.lookup(&a, usize::MAX), ta.blocks());
    }

    #[test]
    fn duplicate_insert_keeps_the_first_blocks_and_leaks_nothing() {
        let (mut kv, mut pc) = (kv(8), PrefixCache::new(BS));
        let tokens = seq(0, 8);
        let mut a = run(&mut pc, &mut kv, &tokens);
        // b computed the same prompt concurrently, in its own blocks.
        let mut b = run(&mut pc, &mut kv, &tokens);
        assert_ne!(a.blocks(), b.blocks());
        assert_eq!(pc.cached_blocks(), 2);
        assert_eq!(pc.lookup(&tokens, usize::MAX), a.blocks());
        assert!(b.blocks().iter().all(|&blk| kv.refcount(blk) == 1));
        kv.release(&mut b);
        assert_eq!(kv.free_blocks(), 6, "b's duplicates went back to the pool");
        kv.release(&mut a);
        assert_eq!(kv.free_blocks(), 6, "the tree keeps a's blocks");
        pc.clear(&mut kv);
        assert_eq!(kv.free_blocks(), 8);
    }

    #[test]
    fn eviction_is_lru_and_lookup_protects() {
        let (mut kv, mut pc) = (kv(3), PrefixCache::new(BS));
        let (x, y, z) = (seq(0, 4), seq(10, 4), seq(20, 4));
        for t in [&x, &y, &z] {
            let mut table = run(&mut pc, &mut kv, t);
            kv.release(&mut table);
        }
        assert_eq!(kv.free_blocks(), 0);
        pc.lookup(&x, usize::MAX); // x is now the most recent; y the oldest
        assert_eq!(pc.evict(&mut kv, 1), 1);
        assert!(pc.lookup(&y, usize::MAX).is_empty(), "y went first");
        assert_eq!(pc.evict(&mut kv, 2), 1);
        assert!(pc.lookup(&z, usize::MAX).is_empty(), "then z");
        assert_eq!(pc.lookup(&x, usize::MAX).len(), 1);
        assert_eq!(pc.evict(&mut kv, 0), 0, "nothing needed, nothing evicted");
    }

    #[test]
    fn blocks_in_use_are_never_evicted() {
        let (mut kv, mut pc) = (kv(4), PrefixCache::new(BS));
        let mut old = run(&mut pc, &mut kv, &seq(0, 4));
        let mut running = run(&mut pc, &mut kv, &seq(10, 8));
        kv.release(&mut old);
        assert_eq!(pc.evictable_blocks(&kv), 1);
        assert_eq!(pc.evict(&mut kv, 4), 1, "only the idle block goes");
        assert_eq!(kv.free_blocks(), 2);
        assert_eq!(pc.lookup(&seq(10, 8), usize::MAX), running.blocks());
        kv.release(&mut running);
        assert_eq!(pc.evictable_blocks(&kv), 2);
        assert_eq!(pc.evict(&mut kv, 4), 2, "pinned leaf kept");
        assert_eq!((kv.free_blocks(), pc.cached_blocks()), (4, 0));
    }

    #[test]
    fn evicting_a_leaf_makes_its_parent_evictable() {
        let (mut kv, mut pc) = (kv(4), PrefixCache::new(BS));
        let long = seq(0, 12);
        let mut t = run(&mut pc, &mut kv, &long);
        kv.release(&mut t);
        let mut other = run(&mut pc, &mut kv, &seq(50, 4));
        kv.release(&mut other);
        pc.lookup(&seq(50, 4), usize::MAX); // the lone block is the most recent
        assert_eq!(pc.evict(&mut kv, 2), 2, "the chain's tail, then its middle");
        assert_eq!(pc.lookup(&long, usize::MAX).len(), 1);
        assert_eq!(pc.lookup(&seq(50, 4), usize::MAX).len(), 1);
        assert_eq!(pc.evict(&mut kv, 4), 2);
        assert_eq!(pc.cached_blocks(), 0);
        // Freed arena slots are reused.
        let mut again = run(&mut pc, &mut kv, &long);
        assert_eq!(pc.lookup(&long, usize::MAX), again.blocks());
        kv.release(&mut again);
        pc.clear(&mut kv);
        assert_eq!(kv.free_blocks(), 4);
    }

    #[test]
    fn clear_returns_every_block_to_the_pool() {
        let (mut kv, mut pc) = (kv(8), PrefixCache::new(BS));
        let mut a = run(&mut pc, &mut kv, &seq(0, 12));
        let mut b = run(&mut pc, &mut kv, &seq(40, 9));
        kv.release(&mut a);
        pc.evict(&mut kv, 6); // leaves a freed slot in the arena
        pc.clear(&mut kv);
        assert_eq!(pc.cached_blocks(), 0);
        assert_eq!(kv.free_blocks(), 8 - 3, "only b's own blocks remain");
        kv.release(&mut b);
        assert_eq!(kv.free_blocks(), 8);
        assert!(pc.lookup(&seq(0, 12), usize::MAX).is_empty());
    }

    #[test]
    fn thousands_of_blocks_evict_quickly() {
        let n = 4096;
        let (mut kv, mut pc) = (kv(n), PrefixCache::new(BS));
        for s in 0..n / 8 {
            let mut t = run(&mut pc, &mut kv, &seq(s as u32 * 1000, 8 * BS));
            kv.release(&mut t);
        }
        assert_eq!(pc.cached_blocks(), n);
        assert_eq!(pc.evict(&mut kv, n), n);
        assert_eq!(kv.free_blocks(), n);
    }
}
