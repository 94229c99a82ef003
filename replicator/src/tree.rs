//! Content trees: a file's blake3 hash kept as the chaining values of its
//! 16 KiB leaves, so that a change of a few bytes updates the hash by reading
//! the leaves it touched, not the whole file.
//!
//! The root is the standard blake3 hash of the content (`b3sum` agrees):
//! blake3 is itself a tree over 1 KiB chunks, and a leaf of 16 chunks that
//! starts at a multiple of 16 KiB is one of its subtrees for every length, so
//! the leaves' chaining values merge into the root exactly as blake3 merges
//! its own subtrees (`blake3::hazmat`). Both ends of a replication keep
//! trees: the source for the content a replica holds (in the journal's
//! cache), the replica for its own files (beside it), and each side checks
//! a batch's base and result hashes through its tree.
//!
//! Size: 32 bytes per 16 KiB leaf, 0.2% of the content.

use std::collections::BTreeSet;
use std::io;

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};

use crate::batch::Hash;

/// Bytes per leaf (16 blake3 chunks).
pub const LEAF: u64 = 16 << 10;

/// The leaves of content of `size` bytes.
pub fn leaf_count(size: u64) -> u64 {
    size.div_ceil(LEAF)
}

/// The chaining values a tree of content of `size` bytes keeps.
fn stored_leaves(size: u64) -> u64 {
    if size <= LEAF { 0 } else { leaf_count(size) }
}

/// Offset and length of leaf `index` in content of `size` bytes.
pub fn leaf_span(index: u64, size: u64) -> (u64, usize) {
    let start = index * LEAF;
    (start, size.saturating_sub(start).min(LEAF) as usize)
}

/// The leaves that bytes `[offset, offset+len)` fall in, within `size`.
pub fn leaves_of(offset: u64, len: u64, size: u64) -> std::ops::Range<u64> {
    let end = offset.saturating_add(len).min(size);
    if offset >= end {
        return 0..0;
    }
    offset / LEAF..end.div_ceil(LEAF)
}

/// A content's size, its blake3 hash, and the chaining value of each leaf
/// (none for content of at most one leaf: its root is hashed from its bytes,
/// which any change rereads anyway).
#[derive(Clone, PartialEq, Eq)]
pub struct ContentTree {
    size: u64,
    root: Hash,
    leaves: Vec<ChainingValue>,
}

impl std::fmt::Debug for ContentTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContentTree")
            .field("size", &self.size)
            .field("root", &self.root)
            .finish()
    }
}

fn leaf_cv(index: u64, bytes: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(index * LEAF);
    h.update(bytes);
    h.finalize_non_root()
}

/// The chaining value of the subtree of `leaves` spanning `len` bytes.
fn subtree(leaves: &[ChainingValue], len: u64) -> ChainingValue {
    if leaves.len() == 1 {
        return leaves[0];
    }
    let left = left_subtree_len(len);
    let mid = (left / LEAF) as usize;
    merge_subtrees_non_root(
        &subtree(&leaves[..mid], left),
        &subtree(&leaves[mid..], len - left),
        Mode::Hash,
    )
}

impl ContentTree {
    /// The tree of `data`, hashed where it lies (a push summarizes every
    /// small file it sends this way).
    pub fn of_bytes(data: &[u8]) -> ContentTree {
        let size = data.len() as u64;
        if size <= LEAF {
            return ContentTree {
                size,
                root: Hash::of(data),
                leaves: Vec::new(),
            };
        }
        let leaves = data
            .chunks(LEAF as usize)
            .zip(0..)
            .map(|(leaf, i)| leaf_cv(i, leaf))
            .collect();
        let mut tree = ContentTree {
            size,
            root: Hash::of(&[]),
            leaves,
        };
        tree.root = tree.merged_root();
        tree
    }

    /// The tree of content of `size` bytes whose leaf `i` `read_leaf(i, buf)`
    /// fills (`buf` is the leaf's length).
    pub fn build(
        size: u64,
        mut read_leaf: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> io::Result<ContentTree> {
        let mut tree = ContentTree {
            size,
            root: Hash::of(&[]),
            leaves: Vec::with_capacity(leaf_count(size) as usize),
        };
        let mut buf = vec![0u8; LEAF as usize];
        let mut single = None;
        for i in 0..leaf_count(size) {
            let (_, len) = leaf_span(i, size);
            read_leaf(i, &mut buf[..len])?;
            if size <= LEAF {
                single = Some(Hash::of(&buf[..len]));
            } else {
                tree.leaves.push(leaf_cv(i, &buf[..len]));
            }
        }
        tree.root = match single {
            Some(h) => h,
            None if size == 0 => Hash::of(&[]),
            None => tree.merged_root(),
        };
        Ok(tree)
    }

    /// The tree after the content changed to `new_size` bytes and the leaves
    /// in `changed` (indices in the new content) were rewritten.
    /// `read_leaf` gives leaves of the new content: those in `changed`, and
    /// those a change of size alters (the old last leaf, any new leaf, and
    /// the only leaf of content of at most one leaf).
    pub fn updated(
        &self,
        new_size: u64,
        changed: &BTreeSet<u64>,
        mut read_leaf: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> io::Result<ContentTree> {
        let count = leaf_count(new_size);
        let mut leaves = self.leaves.clone();
        leaves.truncate(count as usize);
        let mut redo: BTreeSet<u64> = changed.iter().copied().filter(|i| *i < count).collect();
        if new_size != self.size {
            // The leaf holding the old end changed length (or gained bytes),
            // and every leaf past the old end is new.
            let from = self.size.min(new_size) / LEAF;
            redo.extend(from..count);
        }
        if count == 1 {
            redo.insert(0);
        } else {
            // Content of one leaf kept no chaining value.
            redo.extend(leaves.len() as u64..count);
        }
        let mut buf = vec![0u8; LEAF as usize];
        let mut single = None;
        for i in redo {
            let (_, len) = leaf_span(i, new_size);
            read_leaf(i, &mut buf[..len])?;
            if count == 1 {
                single = Some(Hash::of(&buf[..len]));
                continue;
            }
            let cv = leaf_cv(i, &buf[..len]);
            match leaves.get_mut(i as usize) {
                Some(l) => *l = cv,
                None => leaves.push(cv),
            }
        }
        if count <= 1 {
            leaves.clear();
        }
        debug_assert_eq!(leaves.len() as u64, stored_leaves(new_size));
        let mut tree = ContentTree {
            size: new_size,
            root: Hash::of(&[]),
            leaves,
        };
        tree.root = match single {
            Some(h) => h,
            None if count == 0 => Hash::of(&[]),
            None => tree.merged_root(),
        };
        Ok(tree)
    }

    /// The root of content of more than one leaf.
    fn merged_root(&self) -> Hash {
        debug_assert!(self.size > LEAF);
        let left = left_subtree_len(self.size);
        let mid = (left / LEAF) as usize;
        merge_subtrees_root(
            &subtree(&self.leaves[..mid], left),
            &subtree(&self.leaves[mid..], self.size - left),
            Mode::Hash,
        )
        .into()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The blake3 hash of the whole content.
    pub fn root(&self) -> Hash {
        self.root
    }

    /// The encoding kept in caches: size (u64 LE), root, then each leaf's
    /// chaining value.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(40 + 32 * self.leaves.len());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.root.0);
        for l in &self.leaves {
            out.extend_from_slice(l);
        }
        out
    }

    /// Decodes [`to_bytes`](Self::to_bytes); `None` if the bytes are not a
    /// tree (wrong length for the size they state).
    pub fn from_bytes(b: &[u8]) -> Option<ContentTree> {
        let size = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
        let root = Hash(b.get(8..40)?.try_into().ok()?);
        let rest = &b[40..];
        if rest.len() as u64 != stored_leaves(size).checked_mul(32)? {
            return None;
        }
        let leaves = rest
            .chunks_exact(32)
            .map(|c| c.try_into().expect("32 bytes"))
            .collect();
        Some(ContentTree { size, root, leaves })
    }
}

/// Builds the tree of content given in order, piece by piece (content
/// that is being written, such as a delta's output).
#[derive(Default)]
pub struct TreeBuilder {
    size: u64,
    leaves: Vec<ChainingValue>,
    /// The bytes of the leaf being filled (fewer than `LEAF`).
    partial: Vec<u8>,
}

impl TreeBuilder {
    pub fn new() -> TreeBuilder {
        TreeBuilder::default()
    }

    /// Appends `data` to the content.
    pub fn update(&mut self, mut data: &[u8]) {
        self.size += data.len() as u64;
        while !data.is_empty() {
            // A full leaf is hashed once more content follows it: content
            // of at most one leaf is hashed whole, as a root, at the end.
            if self.partial.len() == LEAF as usize {
                self.push_partial();
            }
            // Whole leaves with more content after them are hashed where
            // they are, not copied first.
            if self.partial.is_empty() && data.len() > LEAF as usize {
                let index = self.leaves.len() as u64;
                self.leaves.push(leaf_cv(index, &data[..LEAF as usize]));
                data = &data[LEAF as usize..];
                continue;
            }
            let take = (LEAF as usize - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
    }

    fn push_partial(&mut self) {
        let index = self.leaves.len() as u64;
        self.leaves.push(leaf_cv(index, &self.partial));
        self.partial.clear();
    }

    /// The tree of everything given.
    pub fn finish(mut self) -> ContentTree {
        if self.size <= LEAF {
            return ContentTree::of_bytes(&self.partial);
        }
        self.push_partial();
        let mut tree = ContentTree {
            size: self.size,
            root: Hash::of(&[]),
            leaves: self.leaves,
        };
        tree.root = tree.merged_root();
        tree
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn root_is_blake3_at_leaf_boundaries() {
        let l = LEAF as usize;
        for len in [
            0,
            1,
            1024,
            l - 1,
            l,
            l + 1,
            2 * l,
            3 * l + 5,
            17 * l,
            64 * l + 1,
        ] {
            let d = data(len, 3);
            let t = ContentTree::of_bytes(&d);
            assert_eq!(t.root(), Hash::of(&d), "len {len}");
            assert_eq!(ContentTree::from_bytes(&t.to_bytes()), Some(t));
        }
    }

    #[test]
    fn of_bytes_matches_a_tree_built_from_leaves() {
        let l = LEAF as usize;
        for len in [0, 1, l - 1, l, l + 1, 2 * l, 5 * l + 77] {
            let d = data(len, 5);
            let built = ContentTree::build(len as u64, |i, buf| {
                let (start, n) = leaf_span(i, len as u64);
                buf.copy_from_slice(&d[start as usize..start as usize + n]);
                Ok(())
            })
            .unwrap();
            assert_eq!(ContentTree::of_bytes(&d), built, "len {len}");
        }
    }

    #[test]
    fn from_bytes_refuses_wrong_lengths() {
        let t = ContentTree::of_bytes(&data(3 * LEAF as usize, 1));
        let b = t.to_bytes();
        assert!(ContentTree::from_bytes(&b[..b.len() - 1]).is_none());
        assert!(ContentTree::from_bytes(&b[..39]).is_none());
    }

    #[test]
    fn builder_matches_of_bytes_for_any_pieces() {
        let l = LEAF as usize;
        for len in [0, 1, l - 1, l, l + 1, 2 * l, 5 * l + 77] {
            let d = data(len, 9);
            for piece in [1, 1000, l, l + 3, 3 * l] {
                let mut b = TreeBuilder::new();
                d.chunks(piece).for_each(|c| b.update(c));
                assert_eq!(
                    b.finish(),
                    ContentTree::of_bytes(&d),
                    "len {len} piece {piece}"
                );
            }
        }
    }

    proptest! {
        /// Updating through the leaves a change touches gives the tree of
        /// the changed content.
        #[test]
        fn update_matches_rebuild(
            len in 0usize..(6 * LEAF as usize),
            writes in prop::collection::vec((0usize..(7 * LEAF as usize), 1usize..40_000), 0..4),
            new_len in prop::option::of(0usize..(7 * LEAF as usize)),
        ) {
            let old = data(len, 1);
            let tree = ContentTree::of_bytes(&old);
            let mut new = old.clone();
            let mut changed = BTreeSet::new();
            for (off, n) in &writes {
                let end = off + n;
                if new.len() < end { new.resize(end, 0); }
                new[*off..end].fill(0xA5);
                changed.extend(leaves_of(*off as u64, *n as u64, u64::MAX));
            }
            if let Some(n) = new_len { new.resize(n, 0); }
            let size = new.len() as u64;
            let updated = tree.updated(size, &changed, |i, buf| {
                let (s, l) = leaf_span(i, size);
                buf.copy_from_slice(&new[s as usize..s as usize + l]);
                Ok(())
            }).unwrap();
            prop_assert_eq!(updated.root(), Hash::of(&new));
            prop_assert_eq!(updated, ContentTree::of_bytes(&new));
        }
    }
}
