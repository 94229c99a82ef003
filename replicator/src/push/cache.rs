//! What the journal caches per file about the copy a replica holds: its
//! content tree (for range updates and base hashes) and its delta
//! signature (for rsync-style deltas). Opaque bytes to the journal.
//!
//! Only files larger than one tree leaf are cached: smaller ones are sent
//! whole when they change (as cheap as any delta). Sizes: the tree is 32
//! bytes per 16 KiB, the signature 12 bytes per 4 KiB block: 0.49% of the
//! data together.

use fast_rsync::{Signature, SignatureOptions};
use serde::{Deserialize, Serialize};

use crate::batch::WriteRange;
use crate::tree::{ContentTree, LEAF};

/// Block size of the delta signatures ferry makes.
pub(super) const SIGNATURE_BLOCK: u32 = 4096;
/// Bytes of the MD4 hash kept per block; a false match is caught by the
/// result hash (and the file is then sent whole).
const SIGNATURE_HASH: u32 = 8;
/// The block sizes and hash lengths a cached signature may have; anything
/// else is not used (a malformed signature must not hang or panic a diff).
const BLOCK_RANGE: std::ops::RangeInclusive<u32> = 512..=(1 << 20);
const HASH_RANGE: std::ops::RangeInclusive<u32> = 4..=16;
/// magic, block size, hash length.
const SIGNATURE_HEADER: usize = 12;

pub(super) fn signature_options() -> SignatureOptions {
    SignatureOptions {
        block_size: SIGNATURE_BLOCK,
        crypto_hash_size: SIGNATURE_HASH,
    }
}

/// Whether files of `size` bytes are cached.
pub(super) fn cached_size(size: u64) -> bool {
    size > LEAF
}

/// The cached description of a replica's copy of one file.
#[derive(Debug, Clone)]
pub(super) struct ReplicaCopy {
    pub tree: ContentTree,
    /// Absent for a file too large to diff in memory.
    pub signature: Option<Vec<u8>>,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    #[serde(with = "serde_bytes")]
    tree: Vec<u8>,
    #[serde(with = "serde_bytes")]
    signature: Vec<u8>,
}

impl ReplicaCopy {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(&Stored {
            tree: self.tree.to_bytes(),
            signature: self.signature.clone().unwrap_or_default(),
        })
        .expect("postcard encodes into a Vec without failing")
    }

    /// `None` for bytes that are not a cache entry.
    pub fn decode(b: &[u8]) -> Option<ReplicaCopy> {
        let s: Stored = postcard::from_bytes(b).ok()?;
        Some(ReplicaCopy {
            tree: ContentTree::from_bytes(&s.tree)?,
            signature: (!s.signature.is_empty()).then_some(s.signature),
        })
    }

    /// The signature, if it is well formed and describes exactly the
    /// content of the tree (block size and hash length in range, one block
    /// entry per block of the content).
    pub fn usable_signature(&self) -> Option<Signature> {
        let sig = self.signature.as_ref()?;
        let header = sig.get(..SIGNATURE_HEADER)?;
        let block = u32::from_be_bytes(header[4..8].try_into().ok()?);
        let hash = u32::from_be_bytes(header[8..12].try_into().ok()?);
        if !BLOCK_RANGE.contains(&block) || !HASH_RANGE.contains(&hash) {
            return None;
        }
        let blocks = self.tree.size().div_ceil(u64::from(block));
        let expected = blocks.checked_mul(u64::from(4 + hash))? + SIGNATURE_HEADER as u64;
        if sig.len() as u64 != expected {
            return None;
        }
        Signature::deserialize(sig.clone()).ok()
    }
}

impl ReplicaCopy {
    /// The signature of the content after `writes` (whole signature blocks
    /// of content of `size` bytes; every block that changed, including the
    /// old last one when the size changed, is in them), from this one.
    /// `None` if this one is not usable.
    pub fn patched_signature(&self, size: u64, writes: &[WriteRange]) -> Option<Vec<u8>> {
        self.usable_signature()?;
        let old = self.signature.as_ref()?;
        let block = u64::from(u32::from_be_bytes(old[4..8].try_into().ok()?));
        let entry = 4 + u32::from_be_bytes(old[8..12].try_into().ok()?) as usize;
        let options = SignatureOptions {
            block_size: block as u32,
            crypto_hash_size: (entry - 4) as u32,
        };
        let mut out = old[..SIGNATURE_HEADER].to_vec();
        for b in 0..size.div_ceil(block) {
            let (start, end) = (b * block, ((b + 1) * block).min(size));
            let written = writes
                .iter()
                .find(|w| w.offset <= start && end <= w.offset + w.data.len() as u64);
            match written {
                Some(w) => {
                    let bytes = &w.data[(start - w.offset) as usize..(end - w.offset) as usize];
                    let sig = Signature::calculate(bytes, options);
                    out.extend_from_slice(&sig.serialized()[SIGNATURE_HEADER..]);
                }
                None => {
                    let at = SIGNATURE_HEADER + b as usize * entry;
                    out.extend_from_slice(old.get(at..at + entry)?);
                }
            }
        }
        Some(out)
    }
}

/// The signature of `data`, as ferry makes them.
pub(super) fn signature_of(data: &[u8]) -> Vec<u8> {
    Signature::calculate(data, signature_options()).into_serialized()
}

/// Builds a signature from pieces of content whose lengths, but for the
/// last, are multiples of the block size: the same bytes as
/// `Signature::calculate` over the whole content.
pub(super) struct SignatureBuilder {
    bytes: Vec<u8>,
}

impl SignatureBuilder {
    pub fn new() -> SignatureBuilder {
        SignatureBuilder { bytes: Vec::new() }
    }

    pub fn add(&mut self, piece: &[u8]) {
        self.append(&Self::of_piece(piece));
    }

    /// The signature of one piece, for `append`.
    pub fn of_piece(piece: &[u8]) -> Signature {
        Signature::calculate(piece, signature_options())
    }

    /// Adds the signature of the next piece.
    pub fn append(&mut self, sig: &Signature) {
        let s = sig.serialized();
        if self.bytes.is_empty() {
            self.bytes.extend_from_slice(s);
        } else {
            self.bytes.extend_from_slice(&s[SIGNATURE_HEADER..]);
        }
    }

    pub fn finish(mut self) -> Vec<u8> {
        if self.bytes.is_empty() {
            self.add(&[]);
        }
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn pieces_make_the_whole_signature() {
        let d = data(3 * SIGNATURE_BLOCK as usize * 5 + 77);
        let mut b = SignatureBuilder::new();
        for piece in d.chunks(3 * SIGNATURE_BLOCK as usize) {
            b.add(piece);
        }
        let whole = Signature::calculate(&d, signature_options());
        assert_eq!(b.finish(), whole.serialized());
    }

    #[test]
    fn malformed_signatures_are_not_used() {
        let d = data(100_000);
        let copy = |sig: Vec<u8>| ReplicaCopy {
            tree: ContentTree::of_bytes(&d),
            signature: Some(sig),
        };
        let good = Signature::calculate(&d, signature_options()).into_serialized();
        assert!(copy(good.clone()).usable_signature().is_some());
        let decoded = ReplicaCopy::decode(&copy(good.clone()).encode()).unwrap();
        assert!(decoded.usable_signature().is_some());
        // Block size zero or huge, hash too long, truncated, wrong count.
        for (at, v) in [(4usize, 0u32), (4, u32::MAX), (8, 17), (8, 0)] {
            let mut bad = good.clone();
            bad[at..at + 4].copy_from_slice(&v.to_be_bytes());
            assert!(copy(bad).usable_signature().is_none(), "field {at} = {v}");
        }
        assert!(
            copy(good[..good.len() - 1].to_vec())
                .usable_signature()
                .is_none()
        );
        assert!(
            copy(good[..good.len() - 12].to_vec())
                .usable_signature()
                .is_none()
        );
        assert!(ReplicaCopy::decode(b"\xff\xff").is_none());
    }

    #[test]
    fn patching_gives_the_signature_of_the_new_content() {
        let old = data(200_000);
        let copy = ReplicaCopy {
            tree: ContentTree::of_bytes(&old),
            signature: Some(Signature::calculate(&old, signature_options()).into_serialized()),
        };
        // Rewrite the leaf at 32 KiB, and grow the file from its old last leaf.
        let mut new = old.clone();
        new.resize(230_000, 9);
        new[40_000..40_010].fill(1);
        let leaf = LEAF as usize;
        let tail = old.len() / leaf * leaf;
        let writes = vec![
            WriteRange {
                offset: 2 * LEAF,
                data: new[2 * leaf..3 * leaf].to_vec(),
            },
            WriteRange {
                offset: tail as u64,
                data: new[tail..].to_vec(),
            },
        ];
        let patched = copy.patched_signature(new.len() as u64, &writes).unwrap();
        assert_eq!(
            patched,
            Signature::calculate(&new, signature_options()).into_serialized()
        );
    }
}
