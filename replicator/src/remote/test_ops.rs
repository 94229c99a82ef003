//! What the protocol's tests build their batches from.

use crate::batch::{BatchHeader, Content, Hash, Op, RelPath};

pub(super) fn p(s: &str) -> RelPath {
    RelPath::parse(s.as_bytes()).expect("valid test path")
}

/// A new file `path` holding `data`, sent whole.
pub(super) fn create(path: &str, data: &[u8]) -> Op {
    Op::CreateFile {
        path: p(path),
        mode: 0o644,
        content: Content::Raw(data.to_vec()),
        result: Hash::of(data),
    }
}

/// The header of a batch from `source` as a stream carries it: its counts
/// are known at the trailer only.
pub(super) fn header(source: [u8; 16], from: u64, to: u64) -> BatchHeader {
    BatchHeader {
        source_id: source,
        from_seq: from,
        to_seq: to,
        op_count: u64::MAX,
        content_bytes: u64::MAX,
        ..BatchHeader::default()
    }
}
