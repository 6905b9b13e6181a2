//! The layout of one forward call over many sequences: where each token sits, which cache
//! slots each sequence reads, and how the tiles of queries are grouped by the prefix their
//! sequences share (which the CPU attention kernel reads once per group).

/// Tokens of one sequence whose queries share one pass over its cache.
pub(crate) const QUERY_TILE: usize = 4;

/// Per-token and per-sequence indices of one forward call.
pub struct BatchLayout {
    /// Position of each token in its sequence.
    pub positions: Vec<u32>,
    /// Cache slot each token's K and V are written to.
    pub write_slots: Vec<u32>,
    /// Index of each token's sequence.
    pub token_seq: Vec<u32>,
    /// For each sequence, the slots of positions 0..=its last position in this batch.
    pub seq_slots: Vec<Vec<u32>>,
    /// For each sequence, the range of its tokens in the batch.
    pub seq_tokens: Vec<std::ops::Range<usize>>,
    /// How the CPU kernel groups the batch's query tiles: worked out once, on the first
    /// layer, and the same for every layer.
    pub tile_groups: std::sync::OnceLock<Vec<TileGroup>>,
}

/// Tiles of up to `QUERY_TILE` consecutive tokens of one sequence whose cache slots start
/// with the same `shared` slots: sequences that share a cached prefix (several samples of
/// one prompt, prompts with a common system part) or tiles of one sequence's prefill. The
/// kernel reads those rows once for every query of the group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TileGroup {
    /// Token ranges, in the batch.
    pub tiles: Vec<(usize, usize)>,
    /// Leading positions every tile's slots have in common: a multiple of 8, and 0 for a
    /// group of one.
    pub shared: usize,
}

/// Most tokens in one group: bounds a work item's scratch and keeps enough items to
/// balance over the cores.
const GROUP_TOKENS: usize = 16;
/// Fewest shared positions worth grouping for: one cache block.
const MIN_SHARED: usize = 16;

impl BatchLayout {
    /// The slots a tile's queries see: its sequence's, up to the tile's last position.
    pub(crate) fn tile_slots(&self, (t0, t1): (usize, usize)) -> &[u32] {
        let seq = self.token_seq[t0] as usize;
        &self.seq_slots[seq][..=self.positions[t1 - 1] as usize]
    }

    /// The batch's tiles grouped by shared prefix (see `TileGroup`). Tiles are ordered by
    /// their slots, so that those sharing the longest prefix sit together, and taken in
    /// runs that share at least `MIN_SHARED` positions; a tile that shares more with the
    /// one after it than with the run it would join starts a run of its own.
    pub fn groups(&self) -> &[TileGroup] {
        self.tile_groups.get_or_init(|| {
            let mut tiles = Vec::new();
            for r in &self.seq_tokens {
                let mut t = r.start;
                while t < r.end {
                    tiles.push((t, (t + QUERY_TILE).min(r.end)));
                    t += QUERY_TILE;
                }
            }
            tiles.sort_by(|&a, &b| self.tile_slots(a).cmp(self.tile_slots(b)));
            let lcp = |a, b| {
                let (a, b) = (self.tile_slots(a), self.tile_slots(b));
                let n = a.iter().zip(b).take_while(|(x, y)| x == y).count();
                // Whole rows of eight, so that shared and own passes meet on the
                // kernel's eight-row steps.
                n - n % 8
            };
            let mut groups: Vec<TileGroup> = Vec::new();
            for (i, &tile) in tiles.iter().enumerate() {
                if let Some(g) = groups.last_mut() {
                    let first = g.tiles[0];
                    let tokens: usize = g.tiles.iter().map(|(a, b)| b - a).sum();
                    let common = lcp(first, tile);
                    let joins = tokens + (tile.1 - tile.0) <= GROUP_TOKENS
                        && common >= MIN_SHARED
                        && if g.tiles.len() == 1 {
                            // A pair fixes the group's prefix: not when the next tile
                            // would share more with this one.
                            tiles
                                .get(i + 1)
                                .is_none_or(|&next| lcp(tile, next) <= common)
                        } else {
                            common >= g.shared
                        };
                    if joins {
                        if g.tiles.len() == 1 {
                            g.shared = common;
                        }
                        g.tiles.push(tile);
                        continue;
                    }
                }
                groups.push(TileGroup {
                    tiles: vec![tile],
                    shared: 0,
                });
            }
            groups
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// A batch of sequences given by their slots, the last `new` of which are computed now.
    pub(crate) fn layout_of(seqs: Vec<(Vec<u32>, usize)>) -> BatchLayout {
        let mut b = BatchLayout {
            positions: vec![],
            write_slots: vec![],
            token_seq: vec![],
            seq_slots: vec![],
            seq_tokens: vec![],
            tile_groups: Default::default(),
        };
        for (s, (slots, new)) in seqs.into_iter().enumerate() {
            let start = b.positions.len();
            for (p, &slot) in slots.iter().enumerate().skip(slots.len() - new) {
                b.positions.push(p as u32);
                b.write_slots.push(slot);
                b.token_seq.push(s as u32);
            }
            b.seq_tokens.push(start..b.positions.len());
            b.seq_slots.push(slots);
        }
        b
    }

    /// Sequences that share cached prefixes (three samples of one 200-position prompt,
    /// one sharing its first 96 positions), one prefilling 40 tokens after 100 cached ones
    /// (tiles that share each other's positions), and one on its own.
    pub(crate) fn shared_batch(rng: &mut impl Rng) -> BatchLayout {
        let mut free: Vec<u32> = (0..1000).collect();
        let mut take = |n: usize| -> Vec<u32> {
            (0..n)
                .map(|_| free.swap_remove(rng.random_range(0..free.len())))
                .collect()
        };
        let prompt = take(200);
        let mut seqs: Vec<(Vec<u32>, usize)> = Vec::new();
        for own in [50, 30, 7] {
            seqs.push(([prompt.clone(), take(own)].concat(), 1));
        }
        seqs.push(([prompt[..96].to_vec(), take(21)].concat(), 1));
        seqs.push((take(140), 40));
        seqs.push((take(60), 1));
        layout_of(seqs)
    }

    #[test]
    fn tiles_sharing_a_prefix_are_grouped() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let b = shared_batch(&mut rng);
        let groups = b.groups();
        // Every tile is in exactly one group, and no group is over its size.
        let mut tiles: Vec<_> = groups.iter().flat_map(|g| g.tiles.clone()).collect();
        tiles.sort();
        assert_eq!(tiles.len(), 3 + 1 + 10 + 1);
        assert!(groups
            .iter()
            .all(|g| g.tiles.iter().map(|(a, b)| b - a).sum::<usize>() <= GROUP_TOKENS));
        // The three samples of the prompt share its 200 positions; the prefill's tiles
        // share what the earliest of each group sees.
        let seq_of = |g: &TileGroup| b.token_seq[g.tiles[0].0];
        let samples = groups.iter().find(|g| seq_of(g) == 0).unwrap();
        assert_eq!((samples.tiles.len(), samples.shared), (3, 200));
        let prefill: Vec<_> = groups.iter().filter(|g| seq_of(g) == 4).collect();
        assert!(prefill.iter().all(|g| g.shared % 8 == 0));
        assert!(prefill
            .iter()
            .any(|g| g.tiles.len() == 4 && g.shared >= 100));
        for g in groups.iter().filter(|g| g.tiles.len() > 1) {
            for &t in &g.tiles {
                assert_eq!(
                    b.tile_slots(t)[..g.shared],
                    b.tile_slots(g.tiles[0])[..g.shared]
                );
            }
        }
    }
}
