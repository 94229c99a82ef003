//! Tests of the batch format: round trips, and hostile input of every kind
//! (flipped bytes, truncation, crafted frames with valid checksums).

use proptest::prelude::*;

use super::frame::{FrameKind, write_frame};
use super::limits::{MAX_COMPONENT_LEN, MAX_OP_PAYLOAD, MAX_RANGES};
use super::writer::Trailer;
use super::*;

const DELTA_MAGIC: [u8; 4] = [0x72, 0x73, 0x02, 0x36];

fn p(s: &str) -> RelPath {
    RelPath::parse(s.as_bytes()).expect("a valid test path")
}

fn header(op_count: u64, content_bytes: u64) -> BatchHeader {
    BatchHeader {
        source_id: [7; 16],
        replica_id: ANY_REPLICA,
        from_seq: 10,
        to_seq: 42,
        expected_state: [3; 32],
        created_unix_ns: 1_700_000_000_123_456_789,
        op_count,
        content_bytes,
    }
}

fn write_batch(ops: &[Op]) -> Vec<u8> {
    let content = ops.iter().map(Op::data_len).sum();
    let mut w = BatchWriter::new(Vec::new(), header(ops.len() as u64, content)).unwrap();
    for op in ops {
        w.push(op).unwrap();
    }
    let (bytes, summary) = w.finish().unwrap();
    assert_eq!(summary.bytes, bytes.len() as u64);
    assert_eq!(summary.ops, ops.len() as u64);
    bytes
}

/// Every operation of a batch, as a reader that verifies content yields
/// them.
fn read_all(bytes: &[u8]) -> Result<(BatchHeader, Vec<Op>), BatchError> {
    let mut r = BatchReader::new(bytes)?;
    let mut ops = Vec::new();
    while let Some(op) = r.next_op()? {
        op.verify_content()
            .map_err(|e| BatchError::new(r.last_op_offset(), Part::Op(r.stats().ops), e.into()))?;
        ops.push(op);
    }
    assert_eq!(r.next_op().unwrap(), None, "done stays done");
    Ok((r.header().clone(), ops))
}

fn text(n: usize) -> Vec<u8> {
    b"the quick brown fox jumps over the lazy dog\n"
        .iter()
        .copied()
        .cycle()
        .take(n)
        .collect()
}

/// A real batch with every kind of operation.
fn sample_ops() -> Vec<Op> {
    let h = Hash::of(b"x");
    vec![
        Op::Mkdir {
            path: p("dir"),
            mode: 0o755,
        },
        Op::Symlink {
            path: p("dir/link"),
            target: b"../../etc/passwd".to_vec(),
        },
        Op::Mknod {
            path: p("dir/fifo"),
            kind: NodeKind::Fifo,
            mode: 0o644,
            rdev: 0,
        },
        Op::CreateFile {
            path: p("dir/a"),
            mode: 0o644,
            content: Content::Raw(b"hello".to_vec()),
            result: Hash::of(b"hello"),
        },
        Op::CreateFile {
            path: p("dir/b"),
            mode: 0o600,
            content: Content::compress_if_it_pays(&text(10_000)),
            result: Hash::of(&text(10_000)),
        },
        Op::CreateFile {
            path: p("dir/sparse"),
            mode: 0o644,
            content: Content::Sparse {
                size: 1 << 20,
                extents: vec![
                    Extent {
                        offset: 0,
                        data: Chunk::Raw(b"head".to_vec()),
                    },
                    Extent {
                        offset: 512 << 10,
                        data: Chunk::compress_if_it_pays(&text(4096)),
                    },
                ],
            },
            result: h,
        },
        Op::BeginFile {
            path: p("dir/big"),
            mode: 0o644,
            size: 300_000,
        },
        Op::FileData {
            offset: 0,
            data: Chunk::Raw(vec![1; 1000]),
        },
        Op::FileData {
            offset: 200_000,
            data: Chunk::compress_if_it_pays(&text(5000)),
        },
        Op::EndFile { result: h },
        Op::Link {
            existing: p("dir/a"),
            new: p("dir/a2"),
        },
        Op::Rename {
            from: p("dir/a"),
            to: p("dir/b"),
            exchange: true,
        },
        Op::Rename {
            from: p("dir/a2"),
            to: p("c"),
            exchange: false,
        },
        Op::WriteRanges {
            path: p("c"),
            ranges: vec![
                WriteRange {
                    offset: 0,
                    data: b"HE".to_vec(),
                },
                WriteRange {
                    offset: 4,
                    data: b"O".to_vec(),
                },
            ],
            base: Hash::of(b"hello"),
            result: Hash::of(b"HEllO"),
        },
        Op::Truncate {
            path: p("c"),
            size: 3,
        },
        Op::Delta {
            path: p("dir/b"),
            base: h,
            delta: [&DELTA_MAGIC[..], &[0x41, 5, 1, 2, 3, 4, 5, 0]].concat(),
            result: h,
        },
        Op::CreateFromDelta {
            path: p("dir/b.new"),
            basis: p("dir/b"),
            base: h,
            delta: [&DELTA_MAGIC[..], &[0x45, 0, 3, 0]].concat(),
            mode: 0o640,
            result: Hash::of(b"HEl"),
        },
        Op::Chmod {
            path: RelPath::root(),
            mode: 0o700,
        },
        Op::Chown {
            path: p("c"),
            uid: 1000,
            gid: 100,
        },
        Op::Utimes {
            path: p("c"),
            atime: Timestamp { sec: 1, nsec: 2 },
            mtime: Timestamp {
                sec: -5,
                nsec: 999_999_999,
            },
        },
        Op::SetXattr {
            path: p("c"),
            name: b"user.k".to_vec(),
            value: vec![0, 1, 2],
        },
        Op::RemoveXattr {
            path: p("c"),
            name: b"user.k".to_vec(),
        },
        Op::Unlink {
            path: p("dir/fifo"),
        },
        Op::Rmdir { path: p("dir") },
    ]
}

#[test]
fn batch_round_trip_of_every_op() {
    let ops = sample_ops();
    let bytes = write_batch(&ops);
    let (h, back) = read_all(&bytes).unwrap();
    assert_eq!(
        h,
        header(ops.len() as u64, ops.iter().map(Op::data_len).sum())
    );
    assert_eq!(back, ops);
    let v = validate(&bytes[..]).unwrap();
    assert_eq!(v.stats.ops, ops.len() as u64);
    assert_eq!(v.stats.bytes, bytes.len() as u64);
    assert!(matches!(
        ops[4],
        Op::CreateFile {
            content: Content::Zstd { .. },
            ..
        }
    ));
}

#[test]
fn batch_every_flipped_byte_is_rejected() {
    let bytes = write_batch(&sample_ops());
    assert!(bytes.len() > 1000, "a batch of some size: {}", bytes.len());
    for pos in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut bad = bytes.clone();
            bad[pos] ^= mask;
            assert!(
                validate(&bad[..]).is_err(),
                "flip {mask:#x} at {pos} accepted"
            );
            assert!(read_all(&bad).is_err(), "flip {mask:#x} at {pos} read");
        }
    }
}

#[test]
fn batch_every_truncation_is_rejected() {
    let bytes = write_batch(&sample_ops());
    for len in 0..bytes.len() {
        let err = validate(&bytes[..len]).unwrap_err();
        assert!(
            matches!(err.kind, BatchErrorKind::Truncated { .. }),
            "truncated at {len}: {err}"
        );
    }
}

#[test]
fn batch_trailing_garbage_is_rejected_unless_embedded() {
    let mut bytes = write_batch(&sample_ops());
    let len = bytes.len();
    bytes.extend_from_slice(b"more");
    let err = validate(&bytes[..]).unwrap_err();
    assert!(matches!(err.kind, BatchErrorKind::TrailingData), "{err}");
    assert_eq!(err.part, Part::AfterTrailer);
    assert_eq!(err.offset, len as u64);

    let mut r = BatchReader::in_stream(&bytes[..]).unwrap();
    while r.next_op().unwrap().is_some() {}
    assert!(r.is_done());
    assert_eq!(r.into_inner(), b"more");
}

#[test]
fn batch_empty_batch_round_trips() {
    let bytes = write_batch(&[]);
    let v = validate(&bytes[..]).unwrap();
    assert_eq!(v.stats.ops, 0);
}

// ---- crafted input: valid frames and trailer around hostile payloads ----

/// A batch whose frames and trailer are all correctly checksummed around
/// the given op payloads: what a sender who knows the format can make.
/// `tamper` may alter the trailer before it is written.
fn craft_with(h: &BatchHeader, payloads: &[Vec<u8>], tamper: impl FnOnce(&mut Trailer)) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    let mut hasher = blake3::Hasher::new();
    hasher.update(&out);
    let header = postcard::to_stdvec(h).unwrap();
    write_frame(&mut out, Some(&mut hasher), FrameKind::Header, &header).unwrap();
    for payload in payloads {
        write_frame(&mut out, Some(&mut hasher), FrameKind::Op, payload).unwrap();
    }
    let mut t = Trailer {
        op_count: payloads.len() as u64,
        content_bytes: 0,
        hash: *hasher.finalize().as_bytes(),
    };
    tamper(&mut t);
    write_frame(
        &mut out,
        None,
        FrameKind::Trailer,
        &postcard::to_stdvec(&t).unwrap(),
    )
    .unwrap();
    out
}

/// Like `craft_with`, with the trailer's content count right for `ops`.
fn craft_ops(ops: &[Op]) -> Vec<u8> {
    let payloads: Vec<_> = ops
        .iter()
        .map(|op| postcard::to_stdvec(op).unwrap())
        .collect();
    let content = ops.iter().map(Op::data_len).fold(0, u64::saturating_add);
    craft_with(&header(u64::MAX, u64::MAX), &payloads, |t| {
        t.content_bytes = content
    })
}

fn varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A path on the wire, whatever its components.
fn raw_path(components: &[&[u8]], out: &mut Vec<u8>) {
    varint(components.len() as u64, out);
    for c in components {
        varint(c.len() as u64, out);
        out.extend_from_slice(c);
    }
}

/// An `Unlink` payload with a raw path.
fn raw_unlink(components: &[&[u8]]) -> Vec<u8> {
    let mut out = vec![5];
    raw_path(components, &mut out);
    out
}

#[test]
fn batch_wire_encoding_of_a_path_op() {
    // What the crafting helpers rely on, and what docs/FORMAT.md shows.
    let mut want = vec![5];
    raw_path(&[b"a", b"bc"], &mut want);
    assert_eq!(want, [5, 2, 1, b'a', 2, b'b', b'c']);
    assert_eq!(
        postcard::to_stdvec(&Op::Unlink { path: p("a/bc") }).unwrap(),
        want
    );
}

#[test]
fn batch_wire_encoding_of_create_from_delta() {
    // The example in docs/FORMAT.md.
    let delta = [&DELTA_MAGIC[..], &[0x41, 3, 1, 2, 3, 0]].concat();
    let op = Op::CreateFromDelta {
        path: p("a.tmp"),
        basis: p("a"),
        base: Hash([0xbb; 32]),
        delta: delta.clone(),
        mode: 0o644,
        result: Hash([0xee; 32]),
    };
    let want = [
        &[19, 1, 5][..],
        b"a.tmp",
        &[1, 1, b'a'],
        &[0xbb; 32],
        &[10],
        &delta,
        &[0xa4, 0x03],
        &[0xee; 32],
    ]
    .concat();
    assert_eq!(postcard::to_stdvec(&op).unwrap(), want);
}

fn error_of(bytes: &[u8]) -> BatchError {
    match read_all(bytes) {
        Ok((_, ops)) => panic!("accepted: {ops:?}"),
        Err(e) => e,
    }
}

#[test]
fn batch_crafted_paths_are_refused() {
    let long = vec![b'x'; MAX_COMPONENT_LEN + 1];
    let max = vec![b'x'; MAX_COMPONENT_LEN];
    let many: Vec<&[u8]> = std::iter::repeat_n(&max[..], 17).collect();
    let cases: Vec<(Vec<&[u8]>, &str)> = vec![
        (vec![b"a", b".."], "\"..\""),
        (vec![b".."], "\"..\""),
        (vec![b"."], "\"..\""),
        (vec![b"a/b"], "'/'"),
        (vec![b"/etc"], "'/'"),
        (vec![b"", b"etc"], "empty path component"),
        (vec![b"a", b""], "empty path component"),
        (vec![b"a\0b"], "NUL"),
        (vec![&long[..]], "256 bytes"),
        (many, "longer than 4096"),
        (vec![], "replica root"),
    ];
    for (components, want) in cases {
        let bytes = craft_with(&header(9, 9), &[raw_unlink(&components)], |_| {});
        let err = error_of(&bytes);
        let msg = err.to_string();
        assert!(msg.contains(want), "{components:?}: {msg}");
        assert!(msg.contains("op frame 1"), "{msg}");
        assert!(msg.contains("batch byte "), "{msg}");
        assert_eq!(err.part, Part::Op(1));
    }
    // The largest valid path is accepted.
    let ok: Vec<&[u8]> = std::iter::repeat_n(&max[..], 16).collect();
    let bytes = craft_with(&header(9, 9), &[raw_unlink(&ok)], |_| {});
    read_all(&bytes).unwrap();
}

#[test]
fn batch_relpath_constructors_refuse_escapes() {
    assert_eq!(RelPath::parse(b"/etc/passwd"), Err(PathError::Absolute));
    assert_eq!(RelPath::parse(b"a/../b"), Err(PathError::DotComponent));
    assert_eq!(RelPath::parse(b"a//b"), Err(PathError::EmptyComponent));
    assert_eq!(RelPath::parse(b"a/"), Err(PathError::EmptyComponent));
    assert_eq!(RelPath::parse(b"a\0"), Err(PathError::Nul));
    assert_eq!(
        RelPath::from_components([&b"a/b"[..]]),
        Err(PathError::Slash)
    );
    assert!(RelPath::parse(b"").unwrap().is_root());
    let path = p("a/b/c");
    assert_eq!(path.to_string(), "a/b/c");
    assert_eq!(path.parent().unwrap(), p("a/b"));
    assert_eq!(path.file_name().unwrap(), b"c");
    assert_eq!(p("a").join("b").unwrap(), p("a/b"));
    assert_eq!(RelPath::root().to_string(), ".");
    assert!(p("a").join("..").is_err());
}

#[test]
fn batch_rename_out_of_the_root_is_refused() {
    let mut payload = vec![4];
    raw_path(&[b"a"], &mut payload);
    raw_path(&[b"..", b"outside"], &mut payload);
    payload.push(0);
    let err = error_of(&craft_with(&header(9, 9), &[payload], |_| {}));
    assert!(err.to_string().contains("\"..\""), "{err}");
}

#[test]
fn batch_oversized_frame_lengths_are_refused_before_allocating() {
    let good = write_batch(&[Op::Unlink { path: p("a") }]);
    // Everything up to the first op frame, then a frame head that lies.
    let header_frame_end =
        12 + 5 + u32::from_le_bytes(good[13..17].try_into().unwrap()) as usize + 8;
    for len in [u32::MAX, MAX_OP_PAYLOAD + 1] {
        let mut bad = good[..header_frame_end].to_vec();
        bad.push(FrameKind::Op as u8);
        bad.extend_from_slice(&len.to_le_bytes());
        bad.extend_from_slice(&[0; 64]);
        let err = error_of(&bad);
        assert!(
            matches!(err.kind, BatchErrorKind::FrameTooLong { .. }),
            "{err}"
        );
        assert_eq!(err.offset, header_frame_end as u64);
    }
    // A length within the limit but far beyond the bytes sent: truncated,
    // and only the bytes sent were buffered.
    let mut bad = good[..header_frame_end].to_vec();
    bad.push(FrameKind::Op as u8);
    bad.extend_from_slice(&MAX_OP_PAYLOAD.to_le_bytes());
    bad.extend_from_slice(&[0; 64]);
    assert!(matches!(
        error_of(&bad).kind,
        BatchErrorKind::Truncated { .. }
    ));
    // A trailer or header frame longer than its small limit.
    let mut bad = good[..header_frame_end].to_vec();
    bad.push(FrameKind::Trailer as u8);
    bad.extend_from_slice(&1000u32.to_le_bytes());
    assert!(matches!(
        error_of(&bad).kind,
        BatchErrorKind::FrameTooLong { .. }
    ));
}

#[test]
fn batch_declared_counts_cannot_force_allocation() {
    // A WriteRanges that claims 2^40 ranges, and a path that claims 2^40
    // components, in a few bytes.
    let mut ranges = vec![8];
    raw_path(&[b"a"], &mut ranges);
    varint(1 << 40, &mut ranges);
    let mut path = vec![5];
    varint(1 << 40, &mut path);
    // More ranges than the limit, each actually present.
    let mut many = vec![8];
    raw_path(&[b"a"], &mut many);
    varint(MAX_RANGES as u64 + 1, &mut many);
    for i in 0..=MAX_RANGES as u64 {
        varint(i, &mut many);
        varint(1, &mut many);
        many.push(b'x');
    }
    for payload in [ranges, path, many] {
        let err = error_of(&craft_with(&header(9, 1 << 30), &[payload], |_| {}));
        assert!(matches!(err.kind, BatchErrorKind::Decode(_)), "{err}");
    }
}

#[test]
fn batch_huge_zstd_lengths_are_refused() {
    let bomb = zstd::bulk::compress(&vec![0u8; 10 << 20], 3).unwrap();
    for op in [
        Op::CreateFile {
            path: p("f"),
            mode: 0o644,
            content: Content::Zstd {
                len: u64::MAX,
                bytes: bomb.clone(),
            },
            result: Hash::default(),
        },
        Op::FileData {
            offset: 0,
            data: Chunk::Zstd {
                len: 1 << 40,
                bytes: bomb.clone(),
            },
        },
        Op::CreateFile {
            path: p("f"),
            mode: 0o644,
            content: Content::Sparse {
                size: 1 << 50,
                extents: vec![Extent {
                    offset: 0,
                    data: Chunk::Zstd {
                        len: 1 << 40,
                        bytes: vec![],
                    },
                }],
            },
            result: Hash::default(),
        },
    ] {
        let ops = if matches!(op, Op::FileData { .. }) {
            vec![
                Op::BeginFile {
                    path: p("f"),
                    mode: 0,
                    size: 1 << 41,
                },
                op,
                Op::EndFile {
                    result: Hash::default(),
                },
            ]
        } else {
            vec![op]
        };
        let err = error_of(&craft_ops(&ops));
        assert!(matches!(err.kind, BatchErrorKind::InvalidOp(_)), "{err}");
    }
}

#[test]
fn batch_zstd_bomb_is_stopped_at_its_declared_length() {
    let bomb = zstd::bulk::compress(&vec![0u8; 20 << 20], 3).unwrap();
    assert!(bomb.len() < 10_000);
    let lying_short = Op::CreateFile {
        path: p("f"),
        mode: 0o644,
        content: Content::Zstd {
            len: 100,
            bytes: bomb,
        },
        result: Hash::default(),
    };
    let lying_long = Op::CreateFile {
        path: p("g"),
        mode: 0o644,
        content: Content::Zstd {
            len: 1000,
            bytes: zstd::bulk::compress(&[1u8; 100], 3).unwrap(),
        },
        result: Hash::default(),
    };
    let garbage = Op::FileData {
        offset: 0,
        data: Chunk::Zstd {
            len: 10,
            bytes: vec![1, 2, 3],
        },
    };
    for (ops, want) in [
        (vec![lying_short], "more than the declared 100"),
        (
            vec![lying_long],
            "decodes to 100 bytes, not the declared 1000",
        ),
        (
            vec![
                Op::BeginFile {
                    path: p("h"),
                    mode: 0,
                    size: 10,
                },
                garbage,
                Op::EndFile {
                    result: Hash::default(),
                },
            ],
            "does not decode",
        ),
    ] {
        let bytes = craft_ops(&ops);
        // The structure is fine: a reader yields the op ...
        let mut r = BatchReader::new(&bytes[..]).unwrap();
        assert!(r.next_op().unwrap().is_some());
        // ... but validation decodes the content and refuses it.
        let err = validate(&bytes[..]).unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
        assert!(matches!(err.kind, BatchErrorKind::Content(_)));
    }
}

#[test]
fn batch_trailer_mismatches_are_refused() {
    let ops = [Op::Unlink { path: p("a") }, Op::Rmdir { path: p("b") }];
    let payloads: Vec<_> = ops
        .iter()
        .map(|op| postcard::to_stdvec(op).unwrap())
        .collect();
    let h = header(9, 9);
    for (tamper, want) in [
        (
            Box::new(|t: &mut Trailer| t.op_count = 3) as Box<dyn FnOnce(&mut Trailer)>,
            "operation count is 3",
        ),
        (
            Box::new(|t: &mut Trailer| t.op_count = 1),
            "operation count is 1",
        ),
        (
            Box::new(|t: &mut Trailer| t.content_bytes = 1),
            "content byte count",
        ),
        (
            Box::new(|t: &mut Trailer| t.hash[0] ^= 1),
            "hash does not match",
        ),
    ] {
        let err = error_of(&craft_with(&h, &payloads, tamper));
        assert!(err.to_string().contains(want), "{err}");
        assert_eq!(err.part, Part::Trailer);
    }
    // An op frame replaced after the fact (checksum recomputed, trailer not).
    let good = craft_with(&h, &payloads, |_| {});
    let swapped = craft_with(&h, &[payloads[1].clone(), payloads[0].clone()], |_| {});
    let trailer_len = 5
        + postcard::to_stdvec(&Trailer {
            op_count: 2,
            content_bytes: 0,
            hash: [0; 32],
        })
        .unwrap()
        .len()
        + 8;
    let mut bad = swapped[..swapped.len() - trailer_len].to_vec();
    bad.extend_from_slice(&good[good.len() - trailer_len..]);
    assert!(matches!(error_of(&bad).kind, BatchErrorKind::TrailerHash));
    // No trailer at all.
    let cut = &good[..good.len() - trailer_len];
    assert!(matches!(
        error_of(cut).kind,
        BatchErrorKind::Truncated { .. }
    ));
}

#[test]
fn batch_header_bounds_are_enforced() {
    let ops = [Op::Unlink { path: p("a") }, Op::Rmdir { path: p("b") }];
    let payloads: Vec<_> = ops
        .iter()
        .map(|op| postcard::to_stdvec(op).unwrap())
        .collect();
    let err = error_of(&craft_with(&header(1, 0), &payloads, |_| {}));
    assert!(matches!(err.kind, BatchErrorKind::TooManyOps(1)), "{err}");
    assert_eq!(err.part, Part::Op(2));

    let file = Op::CreateFile {
        path: p("f"),
        mode: 0o644,
        content: Content::Raw(vec![0; 100]),
        result: Hash::default(),
    };
    let payload = postcard::to_stdvec(&file).unwrap();
    let err = error_of(&craft_with(&header(1, 99), &[payload], |t| {
        t.content_bytes = 100
    }));
    assert!(
        matches!(err.kind, BatchErrorKind::TooMuchContent(99)),
        "{err}"
    );

    let mut h = header(0, 0);
    h.from_seq = 5;
    h.to_seq = 4;
    let err = error_of(&craft_with(&h, &[], |_| {}));
    assert!(
        matches!(err.kind, BatchErrorKind::InvalidHeader(_)),
        "{err}"
    );
}

#[test]
fn batch_streamed_file_order_is_enforced() {
    let begin = Op::BeginFile {
        path: p("f"),
        mode: 0o644,
        size: 10,
    };
    let data = |offset, n| Op::FileData {
        offset,
        data: Chunk::Raw(vec![1; n]),
    };
    let cases = [
        (vec![data(0, 1)], "FileData without a BeginFile"),
        (
            vec![Op::EndFile {
                result: Hash::default(),
            }],
            "EndFile without a BeginFile",
        ),
        (vec![begin.clone(), data(0, 2)], "ends inside a BeginFile"),
        (
            vec![
                begin.clone(),
                Op::Unlink { path: p("a") },
                Op::EndFile {
                    result: Hash::default(),
                },
            ],
            "Unlink inside a BeginFile",
        ),
        (
            vec![begin.clone(), begin.clone()],
            "BeginFile inside a BeginFile",
        ),
        (
            vec![
                begin.clone(),
                data(5, 6),
                Op::EndFile {
                    result: Hash::default(),
                },
            ],
            "beyond the file's size 10",
        ),
        (
            vec![
                begin.clone(),
                data(4, 2),
                data(5, 1),
                Op::EndFile {
                    result: Hash::default(),
                },
            ],
            "overlaps",
        ),
    ];
    for (ops, want) in cases {
        let err = error_of(&craft_ops(&ops));
        assert!(err.to_string().contains(want), "{ops:?}: {err}");
        // The writer refuses the same sequence.
        let mut w = BatchWriter::new(Vec::new(), header(99, 99)).unwrap();
        let refused = ops.iter().try_for_each(|op| w.push(op)).is_err() || w.finish().is_err();
        assert!(refused, "writer accepted {ops:?}");
    }
    read_all(&craft_ops(&[
        begin,
        data(0, 2),
        data(2, 3),
        data(9, 1),
        Op::EndFile {
            result: Hash::default(),
        },
    ]))
    .unwrap();
}

#[test]
fn batch_invalid_fields_are_refused() {
    let bad = [
        Op::Mkdir {
            path: RelPath::root(),
            mode: 0o755,
        },
        Op::Mkdir {
            path: p("d"),
            mode: 0o40755,
        },
        Op::Mknod {
            path: p("f"),
            kind: NodeKind::Fifo,
            mode: 0o644,
            rdev: 5,
        },
        Op::Symlink {
            path: p("l"),
            target: vec![],
        },
        Op::Symlink {
            path: p("l"),
            target: b"a\0b".to_vec(),
        },
        Op::Symlink {
            path: p("l"),
            target: vec![b'a'; 4096],
        },
        Op::WriteRanges {
            path: p("f"),
            ranges: vec![WriteRange {
                offset: 0,
                data: vec![],
            }],
            base: Hash::default(),
            result: Hash::default(),
        },
        Op::WriteRanges {
            path: p("f"),
            ranges: vec![
                WriteRange {
                    offset: 5,
                    data: vec![1],
                },
                WriteRange {
                    offset: 0,
                    data: vec![1],
                },
            ],
            base: Hash::default(),
            result: Hash::default(),
        },
        Op::WriteRanges {
            path: p("f"),
            ranges: vec![WriteRange {
                offset: u64::MAX,
                data: vec![1],
            }],
            base: Hash::default(),
            result: Hash::default(),
        },
        Op::Truncate {
            path: p("f"),
            size: u64::MAX,
        },
        Op::Delta {
            path: p("f"),
            base: Hash::default(),
            delta: b"nope".to_vec(),
            result: Hash::default(),
        },
        Op::CreateFromDelta {
            path: p("f"),
            basis: p("g"),
            base: Hash::default(),
            delta: b"nope".to_vec(),
            mode: 0o644,
            result: Hash::default(),
        },
        Op::CreateFromDelta {
            path: p("f"),
            basis: p("g"),
            base: Hash::default(),
            delta: DELTA_MAGIC.to_vec(),
            mode: 0o10644,
            result: Hash::default(),
        },
        Op::CreateFromDelta {
            path: RelPath::root(),
            basis: p("g"),
            base: Hash::default(),
            delta: DELTA_MAGIC.to_vec(),
            mode: 0o644,
            result: Hash::default(),
        },
        Op::CreateFromDelta {
            path: p("f"),
            basis: RelPath::root(),
            base: Hash::default(),
            delta: DELTA_MAGIC.to_vec(),
            mode: 0o644,
            result: Hash::default(),
        },
        Op::Utimes {
            path: p("f"),
            atime: Timestamp {
                sec: 0,
                nsec: 1_000_000_000,
            },
            mtime: Timestamp { sec: 0, nsec: 0 },
        },
        Op::SetXattr {
            path: p("f"),
            name: vec![],
            value: vec![],
        },
        Op::SetXattr {
            path: p("f"),
            name: vec![b'n'; 256],
            value: vec![],
        },
        Op::SetXattr {
            path: p("f"),
            name: b"user.a".to_vec(),
            value: vec![0; (64 << 10) + 1],
        },
        Op::RemoveXattr {
            path: p("f"),
            name: b"a\0".to_vec(),
        },
        Op::Unlink {
            path: RelPath::root(),
        },
        Op::Link {
            existing: p("a"),
            new: RelPath::root(),
        },
        Op::CreateFile {
            path: p("f"),
            mode: 0o644,
            content: Content::Sparse {
                size: 10,
                extents: vec![Extent {
                    offset: 8,
                    data: Chunk::Raw(vec![1; 3]),
                }],
            },
            result: Hash::default(),
        },
    ];
    for op in bad {
        assert!(op.validate().is_err(), "{op:?}");
        let err = error_of(&craft_ops(std::slice::from_ref(&op)));
        assert!(
            matches!(err.kind, BatchErrorKind::InvalidOp(_)),
            "{op:?}: {err}"
        );
        let mut w = BatchWriter::new(Vec::new(), header(9, 1 << 20)).unwrap();
        assert!(w.push(&op).is_err(), "writer accepted {op:?}");
        // A refused op leaves the writer usable.
        w.push(&Op::Unlink { path: p("ok") }).unwrap();
        read_all(&w.finish().unwrap().0).unwrap();
    }
}

#[test]
fn batch_frame_and_preamble_errors() {
    let good = write_batch(&[Op::Unlink { path: p("a") }]);
    let header_end = 12 + 5 + u32::from_le_bytes(good[13..17].try_into().unwrap()) as usize + 8;

    assert!(matches!(
        error_of(b"").kind,
        BatchErrorKind::Truncated { at: 0 }
    ));
    assert!(matches!(
        error_of(b"FERRY").kind,
        BatchErrorKind::Truncated { at: 5 }
    ));
    assert!(matches!(
        error_of(b"GIF89a..........").kind,
        BatchErrorKind::BadMagic
    ));
    let mut other = good.clone();
    other[8] = 1;
    assert!(matches!(
        error_of(&other).kind,
        BatchErrorKind::UnsupportedVersion(1)
    ));
    // Version 2 checked frames with BLAKE3: it is refused for its version,
    // before any frame check could fail.
    other[8] = 2;
    let err = error_of(&other);
    assert!(
        matches!(err.kind, BatchErrorKind::UnsupportedVersion(2)),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("unsupported batch format version 2 (this ferry reads version 3)"),
        "{err}"
    );

    // An unknown frame kind, and a second header frame (each correctly
    // checksummed).
    for kind in [9u8, FrameKind::Header as u8] {
        let mut bad = good[..header_end].to_vec();
        let payload = [0u8; 4];
        let head = [kind, 4, 0, 0, 0];
        bad.extend_from_slice(&head);
        bad.extend_from_slice(&payload);
        let check = xxhash_rust::xxh3::xxh3_64(&[&head[..], &payload[..]].concat());
        bad.extend_from_slice(&check.to_le_bytes());
        let err = error_of(&bad);
        assert_eq!(err.offset, header_end as u64, "{err}");
        assert!(
            matches!(
                err.kind,
                BatchErrorKind::UnknownFrameKind(9) | BatchErrorKind::UnexpectedFrame { .. }
            ),
            "{err}"
        );
    }

    // A payload with bytes after its value.
    let mut payload = postcard::to_stdvec(&Op::Unlink { path: p("a") }).unwrap();
    payload.push(0);
    let err = error_of(&craft_with(&header(9, 9), &[payload], |_| {}));
    assert!(
        matches!(err.kind, BatchErrorKind::TrailingPayload(1)),
        "{err}"
    );

    // After an error the reader only fails.
    let mut r = BatchReader::new(&good[..good.len() - 1]).unwrap();
    assert!(r.next_op().unwrap().is_some());
    assert!(r.next_op().is_err());
    assert!(matches!(
        r.next_op().unwrap_err().kind,
        BatchErrorKind::Failed
    ));
}

/// Compression gives up on pieces that do not shrink once a window of
/// them saved nothing, sends the next pieces raw without trying, and tries
/// again after the pause; pieces that shrink are compressed, also when
/// they come mixed with pieces that do not.
#[test]
fn batch_compression_pauses_while_it_does_not_pay() {
    const PIECE: usize = 8 << 10;
    let is_zstd = |c: &Content| matches!(c, Content::Zstd { .. });
    // The account is per thread: a fresh one starts empty.
    std::thread::spawn(move || {
        let text = text(PIECE);
        let mut noise = vec![0u8; PIECE];
        blake3::Hasher::new().finalize_xof().fill(&mut noise);
        let window = (1 << 20) / PIECE;
        let pause = (8 << 20) / PIECE;

        // Text alternating with noise saves about half: never paused.
        for _ in 0..4 * window {
            assert!(is_zstd(&Content::compress_if_it_pays(&text)));
            assert_eq!(
                Content::compress_if_it_pays(&noise),
                Content::Raw(noise.clone())
            );
        }
        assert_eq!(content::skipped_pieces(), 0);

        // A window of noise alone: each piece is tried, none pays.
        for _ in 0..window {
            assert_eq!(
                Content::compress_if_it_pays(&noise),
                Content::Raw(noise.clone())
            );
        }
        assert_eq!(content::skipped_pieces(), 0);
        // The next 8 MiB go out raw untried, text too (and chunks count).
        for i in 0..pause {
            let c = if i % 2 == 0 {
                Content::compress_if_it_pays(&text)
            } else {
                match Chunk::compress_if_it_pays(&noise) {
                    Chunk::Raw(b) => Content::Raw(b),
                    Chunk::Zstd { .. } => panic!("noise compressed"),
                }
            };
            assert!(!is_zstd(&c), "piece {i} of the pause was compressed");
        }
        assert_eq!(content::skipped_pieces(), pause as u64);
        // Then compression is tried again, and pays for text.
        for _ in 0..2 * window {
            assert!(is_zstd(&Content::compress_if_it_pays(&text)));
        }
        assert_eq!(content::skipped_pieces(), pause as u64);
    })
    .join()
    .unwrap();
}

/// The frame check is XXH3-64 (seed 0) of kind ‖ len ‖ payload, stored
/// little-endian. The expected values come from the reference C library
/// (libxxhash 0.8.1, `XXH3_64bits`), not from the crate the writer uses.
#[test]
fn batch_frame_check_is_xxh3_64_of_kind_len_and_payload() {
    let short = b"abc".to_vec();
    let long: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    for (payload, want) in [
        (short, 0xf12b_f7ea_c6e0_cae0u64),
        (long, 0x9771_e1d2_e93f_5ef7),
    ] {
        let mut out = Vec::new();
        write_frame(&mut out, None, FrameKind::Op, &payload).unwrap();
        let len = (payload.len() as u32).to_le_bytes();
        let head = [2, len[0], len[1], len[2], len[3]];
        assert_eq!(out, [&head[..], &payload, &want.to_le_bytes()].concat());
    }
}

#[test]
fn batch_content_helpers() {
    let data = text(100_000);
    let c = Content::compress_if_it_pays(&data);
    assert!(matches!(c, Content::Zstd { .. }));
    assert!(c.wire_len() < 10_000);
    assert_eq!(c.to_vec(1 << 20).unwrap(), data);
    let mut noise = vec![0u8; 10_000];
    blake3::Hasher::new().finalize_xof().fill(&mut noise);
    assert!(
        Content::compress_if_it_pays(&noise) == Content::Raw(noise.clone()),
        "noise does not compress"
    );
    assert_eq!(
        Content::compress_if_it_pays(b"tiny"),
        Content::Raw(b"tiny".to_vec())
    );

    let sparse = Content::Sparse {
        size: 10,
        extents: vec![
            Extent {
                offset: 2,
                data: Chunk::Raw(vec![1, 2]),
            },
            Extent {
                offset: 6,
                data: Chunk::compress_if_it_pays(&[9; 3]),
            },
        ],
    };
    sparse.validate().unwrap();
    assert_eq!(sparse.to_vec(10).unwrap(), [0, 0, 1, 2, 0, 0, 9, 9, 9, 0]);
    assert_eq!(sparse.data_len(), 5);
    assert!(sparse.to_vec(9).is_err());
}

// ---- properties ----

fn arb_path() -> impl Strategy<Value = RelPath> {
    prop::collection::vec(
        prop::collection::vec(
            any::<u8>().prop_filter("no / or NUL", |b| *b != b'/' && *b != 0),
            1..12,
        ),
        1..4,
    )
    .prop_filter_map("a valid path", |c| RelPath::from_components(c).ok())
}

fn arb_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

/// Bytes that are sometimes compressible.
fn arb_data() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 1..300),
        (1usize..5000, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
        (1usize..5000).prop_map(text),
    ]
}

fn arb_chunk() -> impl Strategy<Value = Chunk> {
    arb_data().prop_map(|d| Chunk::compress_if_it_pays(&d))
}

fn arb_content() -> impl Strategy<Value = Content> {
    prop_oneof![
        arb_bytes(300).prop_map(Content::Raw),
        arb_data().prop_map(|d| Content::compress_if_it_pays(&d)),
        (
            prop::collection::vec((0u64..10_000, arb_chunk()), 0..5),
            0u64..10_000
        )
            .prop_map(|(parts, tail)| {
                let mut offset = 0;
                let extents = parts
                    .into_iter()
                    .map(|(gap, data)| {
                        let e = Extent {
                            offset: offset + gap,
                            data,
                        };
                        offset = e.offset + e.data.len();
                        e
                    })
                    .collect();
                Content::Sparse {
                    size: offset + tail,
                    extents,
                }
            }),
    ]
}

fn arb_hash() -> impl Strategy<Value = Hash> {
    any::<[u8; 32]>().prop_map(Hash)
}

fn arb_time() -> impl Strategy<Value = Timestamp> {
    (any::<i64>(), 0u32..1_000_000_000).prop_map(|(sec, nsec)| Timestamp { sec, nsec })
}

fn arb_op() -> impl Strategy<Value = Op> {
    let mode = 0u32..=0o7777;
    prop_oneof![
        (arb_path(), mode.clone()).prop_map(|(path, mode)| Op::Mkdir { path, mode }),
        (arb_path(), prop::collection::vec(1u8..=255, 1..100))
            .prop_map(|(path, target)| Op::Symlink { path, target }),
        (arb_path(), 0usize..4, mode.clone(), any::<u64>()).prop_map(|(path, k, mode, rdev)| {
            let kind = [
                NodeKind::Fifo,
                NodeKind::Socket,
                NodeKind::Char,
                NodeKind::Block,
            ][k];
            let rdev = if k < 2 { 0 } else { rdev };
            Op::Mknod {
                path,
                kind,
                mode,
                rdev,
            }
        }),
        (arb_path(), arb_path()).prop_map(|(existing, new)| Op::Link { existing, new }),
        (arb_path(), arb_path(), any::<bool>()).prop_map(|(from, to, exchange)| Op::Rename {
            from,
            to,
            exchange
        }),
        arb_path().prop_map(|path| Op::Unlink { path }),
        arb_path().prop_map(|path| Op::Rmdir { path }),
        (arb_path(), mode.clone(), arb_content(), arb_hash()).prop_map(
            |(path, mode, content, result)| Op::CreateFile {
                path,
                mode,
                content,
                result
            }
        ),
        (
            arb_path(),
            prop::collection::vec(
                (0u64..1000, prop::collection::vec(any::<u8>(), 1..50)),
                0..6
            ),
            arb_hash(),
            arb_hash()
        )
            .prop_map(|(path, parts, base, result)| {
                let mut offset = 0;
                let ranges = parts
                    .into_iter()
                    .map(|(gap, data)| {
                        let r = WriteRange {
                            offset: offset + gap,
                            data,
                        };
                        offset = r.offset + r.data.len() as u64;
                        r
                    })
                    .collect();
                Op::WriteRanges {
                    path,
                    ranges,
                    base,
                    result,
                }
            }),
        (arb_path(), 0..=i64::MAX as u64).prop_map(|(path, size)| Op::Truncate { path, size }),
        (arb_path(), arb_hash(), arb_bytes(200), arb_hash()).prop_map(|(path, base, d, result)| {
            Op::Delta {
                path,
                base,
                delta: [&DELTA_MAGIC[..], &d].concat(),
                result,
            }
        }),
        (
            (arb_path(), arb_path()),
            arb_hash(),
            arb_bytes(200),
            mode.clone(),
            arb_hash()
        )
            .prop_map(
                |((path, basis), base, d, mode, result)| Op::CreateFromDelta {
                    path,
                    basis,
                    base,
                    delta: [&DELTA_MAGIC[..], &d].concat(),
                    mode,
                    result,
                }
            ),
        (arb_path(), mode.clone()).prop_map(|(path, mode)| Op::Chmod { path, mode }),
        (arb_path(), any::<u32>(), any::<u32>()).prop_map(|(path, uid, gid)| Op::Chown {
            path,
            uid,
            gid
        }),
        (arb_path(), arb_time(), arb_time()).prop_map(|(path, atime, mtime)| Op::Utimes {
            path,
            atime,
            mtime
        }),
        (
            arb_path(),
            prop::collection::vec(1u8..=255, 1..30),
            arb_bytes(100)
        )
            .prop_map(|(path, name, value)| Op::SetXattr { path, name, value }),
        (arb_path(), prop::collection::vec(1u8..=255, 1..30))
            .prop_map(|(path, name)| Op::RemoveXattr { path, name }),
    ]
}

/// A `BeginFile`, its data and its `EndFile`.
fn arb_streamed_file() -> impl Strategy<Value = Vec<Op>> {
    (
        arb_path(),
        prop::collection::vec((0u64..100_000, arb_chunk()), 0..4),
        0u64..1000,
        arb_hash(),
    )
        .prop_map(|(path, parts, tail, result)| {
            let mut offset = 0;
            let data: Vec<Op> = parts
                .into_iter()
                .map(|(gap, data)| {
                    let at = offset + gap;
                    offset = at + data.len();
                    Op::FileData { offset: at, data }
                })
                .collect();
            let mut ops = vec![Op::BeginFile {
                path,
                mode: 0o644,
                size: offset + tail,
            }];
            ops.extend(data);
            ops.push(Op::EndFile { result });
            ops
        })
}

fn arb_ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![4 => arb_op().prop_map(|op| vec![op]), 1 => arb_streamed_file()],
        0..12,
    )
    .prop_map(|groups| groups.into_iter().flatten().collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn batch_round_trips(ops in arb_ops()) {
        let bytes = write_batch(&ops);
        let (_, back) = read_all(&bytes).unwrap();
        prop_assert_eq!(&back, &ops);
        let v = validate(&bytes[..]).unwrap();
        prop_assert_eq!(v.stats.ops, ops.len() as u64);
    }

    /// Any bytes as an op payload, inside correctly checksummed frames: the
    /// reader never panics, and whatever it accepts passes every check.
    #[test]
    fn batch_hostile_payloads_never_panic(payload in arb_bytes(200)) {
        if let Ok((_, ops)) = read_all(&craft_with(&header(9, u64::MAX), &[payload], |_| {})) {
            for op in ops {
                prop_assert!(op.validate().is_ok());
            }
        }
    }

    /// A valid op's encoding with bytes changed (checksums recomputed):
    /// never a panic, never an invalid op.
    #[test]
    fn batch_mutated_payloads_never_panic(
        op in arb_op(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut payload = postcard::to_stdvec(&op).unwrap();
        for (at, b) in edits {
            let i = at.index(payload.len());
            payload[i] = b;
        }
        let bytes = craft_with(&header(9, u64::MAX), &[payload], |t| t.content_bytes = u64::MAX);
        if let Ok(mut r) = BatchReader::new(&bytes[..]) {
            while let Ok(Some(op)) = r.next_op() {
                prop_assert!(op.validate().is_ok());
                let _ = op.verify_content();
            }
        }
    }
}

/// Writes real batches as the fuzzer's seed corpus when asked:
/// `FERRY_FUZZ_CORPUS=fuzz/corpus/batch_decode cargo test -p ferry-replicator -- --ignored write_fuzz_seed_corpus`
#[test]
#[ignore = "writes files; run explicitly to refresh the fuzz corpus"]
fn write_fuzz_seed_corpus() {
    let Some(dir) = std::env::var_os("FERRY_FUZZ_CORPUS") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).expect("create corpus dir");
    let ops = sample_ops();
    std::fs::write(dir.join("every-op"), write_batch(&ops)).expect("write seed");
    std::fs::write(dir.join("empty"), write_batch(&[])).expect("write seed");
    // One seed per op that can stand alone (a streamed file's parts cannot).
    for (i, op) in ops.iter().enumerate() {
        let mut w = BatchWriter::new(Vec::new(), header(1, op.data_len())).expect("header");
        if w.push(op).is_err() {
            continue;
        }
        if let Ok((seed, _)) = w.finish() {
            std::fs::write(dir.join(format!("op-{i:02}-{}", op.name())), seed).expect("write seed");
        }
    }
}

/// Writes the seed corpus of the `apply_batch` fuzz target when asked:
/// `FERRY_FUZZ_CORPUS=fuzz/corpus/apply_batch cargo test -p ferry-replicator -- --ignored write_apply_fuzz_seed_corpus`
///
/// Every seed is a real batch from seq 0 (as `ferry push` writes them, with
/// unbounded header counts) for the replica tree the target makes before
/// each input: `populate` in `fuzz/fuzz_targets/apply_batch.rs`, repeated
/// here (keep the two in step). Together the seeds hold every operation,
/// on replica entries and on entries the same batch made. Each seed is
/// applied to that tree here and must apply, or, for the attempts to reach
/// outside the root through a symlink, be refused, without changing the
/// directory beside the replica that `r/out` points to.
#[test]
#[ignore = "writes files; run explicitly to refresh the apply_batch fuzz corpus"]
fn write_apply_fuzz_seed_corpus() {
    use std::fs;
    use std::path::PathBuf;

    use crate::apply::{ApplyOptions, apply};
    use crate::fuzz_scene::{A_TXT, B_TXT, CANARY, big, listing, populate};

    fn seal(ops: &[Op]) -> Vec<u8> {
        let header = BatchHeader {
            source_id: [0x5e; 16],
            replica_id: ANY_REPLICA,
            from_seq: 0,
            to_seq: 1,
            expected_state: [0; 32],
            created_unix_ns: 1_700_000_000_000_000_000,
            op_count: u64::MAX,
            content_bytes: u64::MAX,
        };
        let mut w = BatchWriter::new(Vec::new(), header).expect("header");
        for op in ops {
            w.push(op).expect("a well-formed op");
        }
        w.finish().expect("trailer").0
    }

    fn delta(base: &[u8], new: &[u8]) -> Vec<u8> {
        let sig = fast_rsync::Signature::calculate(
            base,
            fast_rsync::SignatureOptions {
                block_size: 64,
                crypto_hash_size: 8,
            },
        );
        let mut out = Vec::new();
        fast_rsync::diff(&sig.index(), new, &mut out).expect("diff");
        out
    }

    fn create(path: &str, mode: u32, content: Content) -> Op {
        let data = content.to_vec(1 << 30).expect("content");
        Op::CreateFile {
            path: p(path),
            mode,
            content,
            result: Hash::of(&data),
        }
    }

    fn raw(path: &str, data: &[u8]) -> Op {
        create(path, 0o644, Content::Raw(data.to_vec()))
    }

    fn edited(base: &[u8], at: usize, bytes: &[u8]) -> Vec<u8> {
        let mut out = base.to_vec();
        if out.len() < at + bytes.len() {
            out.resize(at + bytes.len(), 0);
        }
        out[at..at + bytes.len()].copy_from_slice(bytes);
        out
    }

    fn time(sec: i64, nsec: u32) -> Timestamp {
        Timestamp { sec, nsec }
    }

    let Some(corpus) = std::env::var_os("FERRY_FUZZ_CORPUS") else {
        return;
    };
    let corpus = PathBuf::from(corpus);
    fs::create_dir_all(&corpus).expect("create corpus dir");

    let big = big();
    let mut big_edits = big.clone();
    big_edits[100..102].copy_from_slice(b"XY");
    big_edits[30_000..30_010].copy_from_slice(&[b'Z'; 10]);
    let big_edits = edited(&big_edits, 39_995, b"0123456789");
    let mut big2 = big.clone();
    big2.splice(20_000..20_010, b"EDITED IN THE MIDDLE".iter().copied());
    let mut big3 = big2.clone();
    big3.truncate(30_000);
    big3.extend_from_slice(b"a new tail");
    let a2 = b"hello, edited replica\n".to_vec();
    let canary_x = edited(CANARY, 0, b"X");
    let streamed = |path: &str, size: u64, pieces: &[(u64, Chunk)]| -> Vec<Op> {
        let mut data = vec![0u8; size as usize];
        for (at, c) in pieces {
            let bytes = c.to_vec().expect("chunk");
            data[*at as usize..*at as usize + bytes.len()].copy_from_slice(&bytes);
        }
        let mut ops = vec![Op::BeginFile {
            path: p(path),
            mode: 0o644,
            size,
        }];
        ops.extend(pieces.iter().map(|(offset, data)| Op::FileData {
            offset: *offset,
            data: data.clone(),
        }));
        ops.push(Op::EndFile {
            result: Hash::of(&data),
        });
        ops
    };
    let zstd = Content::compress_if_it_pays(&text(10_000));
    assert!(matches!(zstd, Content::Zstd { .. }), "text compresses");
    let sparse = Content::Sparse {
        size: 100_000,
        extents: vec![
            Extent {
                offset: 0,
                data: Chunk::Raw(b"head".to_vec()),
            },
            Extent {
                offset: 50_000,
                data: Chunk::compress_if_it_pays(&text(4096)),
            },
            Extent {
                offset: 99_990,
                data: Chunk::Raw(b"tail".to_vec()),
            },
        ],
    };
    let staged0 = text(100);
    let staged1 = edited(&staged0, 0, b"THE");
    let staged2 = staged1[..50].to_vec();
    let staged3 = [&staged2[..], b" and more"].concat();

    let ok_seeds: Vec<(&str, Vec<Op>)> = vec![
        ("empty", vec![]),
        (
            "mkdir",
            vec![
                Op::Mkdir {
                    path: p("new"),
                    mode: 0o755,
                },
                Op::Mkdir {
                    path: p("new/inner"),
                    mode: 0o700,
                },
                Op::Mkdir {
                    path: p("sub/z"),
                    mode: 0o2750,
                },
            ],
        ),
        (
            "symlink",
            vec![
                Op::Symlink {
                    path: p("abs"),
                    target: b"/etc/passwd".to_vec(),
                },
                Op::Symlink {
                    path: p("sub/rel"),
                    target: b"../a.txt".to_vec(),
                },
                Op::Symlink {
                    path: p("up"),
                    target: b"../outside/canary".to_vec(),
                },
            ],
        ),
        (
            "mknod",
            vec![
                Op::Mknod {
                    path: p("fifo"),
                    kind: NodeKind::Fifo,
                    mode: 0o644,
                    rdev: 0,
                },
                Op::Mknod {
                    path: p("sub/sock"),
                    kind: NodeKind::Socket,
                    mode: 0o600,
                    rdev: 0,
                },
                // rdev 0: no device (the fuzz target makes every device
                // node so).
                Op::Mknod {
                    path: p("chr"),
                    kind: NodeKind::Char,
                    mode: 0o600,
                    rdev: 0,
                },
                Op::Mknod {
                    path: p("blk"),
                    kind: NodeKind::Block,
                    mode: 0o600,
                    rdev: 0,
                },
            ],
        ),
        (
            "link",
            vec![
                Op::Link {
                    existing: p("a.txt"),
                    new: p("a2.txt"),
                },
                Op::Link {
                    existing: p("sub/b.txt"),
                    new: p("sub/deep/b2.txt"),
                },
                Op::Link {
                    existing: p("out"),
                    new: p("out2"),
                },
            ],
        ),
        (
            "rename",
            vec![
                Op::Rename {
                    from: p("a.txt"),
                    to: p("a.renamed"),
                    exchange: false,
                },
                Op::Rename {
                    from: p("sub"),
                    to: p("sub2"),
                    exchange: false,
                },
                Op::Rename {
                    from: p("empty"),
                    to: p("sub2/empty2"),
                    exchange: false,
                },
                Op::Rename {
                    from: p("big.bin"),
                    to: p("a.link"),
                    exchange: false,
                },
            ],
        ),
        (
            "rename-exchange",
            vec![
                Op::Rename {
                    from: p("a.txt"),
                    to: p("big.bin"),
                    exchange: true,
                },
                Op::Rename {
                    from: p("sub"),
                    to: p("empty"),
                    exchange: true,
                },
                Op::Rename {
                    from: p("in"),
                    to: p("out"),
                    exchange: true,
                },
            ],
        ),
        (
            "unlink",
            vec![
                Op::Unlink { path: p("a.link") },
                Op::Unlink { path: p("out") },
                Op::Unlink { path: p("in") },
                Op::Unlink {
                    path: p("sub/deep/c.txt"),
                },
            ],
        ),
        (
            "rmdir",
            vec![
                Op::Rmdir { path: p("empty") },
                Op::Unlink {
                    path: p("sub/deep/c.txt"),
                },
                Op::Rmdir {
                    path: p("sub/deep"),
                },
            ],
        ),
        (
            "create-plain",
            vec![
                raw("new.txt", b"new file\n"),
                create("sub/empty-file", 0o600, Content::Raw(vec![])),
            ],
        ),
        ("create-zstd", vec![create("z.txt", 0o640, zstd.clone())]),
        (
            "create-sparse",
            vec![create("sparse", 0o644, sparse.clone())],
        ),
        (
            "create-over-existing",
            vec![
                create("a.txt", 0o600, Content::Raw(b"replaced\n".to_vec())),
                raw("out", b"a file where the outward symlink was\n"),
            ],
        ),
        (
            "streamed",
            [
                streamed(
                    "streamed",
                    200_000,
                    &[
                        (0, Chunk::Raw(vec![1; 1000])),
                        (100_000, Chunk::compress_if_it_pays(&text(5000))),
                    ],
                ),
                streamed(
                    "big.bin",
                    70_000,
                    &[(69_990, Chunk::Raw(b"at the end".to_vec()))],
                ),
            ]
            .concat(),
        ),
        (
            "write-ranges",
            vec![
                Op::WriteRanges {
                    path: p("a.txt"),
                    ranges: vec![
                        WriteRange {
                            offset: 0,
                            data: b"HE".to_vec(),
                        },
                        WriteRange {
                            offset: 15,
                            data: b"more\n".to_vec(),
                        },
                    ],
                    base: Hash::of(A_TXT),
                    result: Hash::of(&edited(&edited(A_TXT, 0, b"HE"), 15, b"more\n")),
                },
                Op::WriteRanges {
                    path: p("big.bin"),
                    ranges: vec![
                        WriteRange {
                            offset: 100,
                            data: b"XY".to_vec(),
                        },
                        WriteRange {
                            offset: 30_000,
                            data: vec![b'Z'; 10],
                        },
                        WriteRange {
                            offset: 39_995,
                            data: b"0123456789".to_vec(),
                        },
                    ],
                    base: Hash::of(&big),
                    result: Hash::of(&big_edits),
                },
            ],
        ),
        (
            "truncate",
            vec![
                Op::Truncate {
                    path: p("big.bin"),
                    size: 20_000,
                },
                Op::Truncate {
                    path: p("a.txt"),
                    size: 100,
                },
                Op::Truncate {
                    path: p("sub/b.txt"),
                    size: 0,
                },
            ],
        ),
        (
            "delta",
            vec![Op::Delta {
                path: p("big.bin"),
                base: Hash::of(&big),
                delta: delta(&big, &big2),
                result: Hash::of(&big2),
            }],
        ),
        // a.txt has two links: the result is copied into its inode.
        (
            "delta-hardlinked",
            vec![Op::Delta {
                path: p("a.txt"),
                base: Hash::of(A_TXT),
                delta: delta(A_TXT, &a2),
                result: Hash::of(&a2),
            }],
        ),
        (
            "create-from-delta",
            vec![
                Op::CreateFromDelta {
                    path: p("big.new"),
                    basis: p("big.bin"),
                    base: Hash::of(&big),
                    delta: delta(&big, &big3),
                    mode: 0o600,
                    result: Hash::of(&big3),
                },
                Op::CreateFromDelta {
                    path: p("sub/b.txt"),
                    basis: p("sub/b.txt"),
                    base: Hash::of(B_TXT),
                    delta: delta(B_TXT, b"world, again\n"),
                    mode: 0o644,
                    result: Hash::of(b"world, again\n"),
                },
            ],
        ),
        (
            "chmod",
            vec![
                Op::Chmod {
                    path: p("a.txt"),
                    mode: 0o600,
                },
                Op::Chmod {
                    path: p("sub"),
                    mode: 0o700,
                },
                Op::Chmod {
                    path: RelPath::root(),
                    mode: 0o750,
                },
                Op::Chmod {
                    path: p("big.bin"),
                    mode: 0o4755,
                },
            ],
        ),
        (
            "chown",
            vec![
                Op::Chown {
                    path: p("a.txt"),
                    uid: 1000,
                    gid: 1000,
                },
                Op::Chown {
                    path: p("sub"),
                    uid: 0,
                    gid: 100,
                },
                Op::Chown {
                    path: RelPath::root(),
                    uid: 0,
                    gid: 0,
                },
            ],
        ),
        (
            "utimes",
            vec![
                Op::Utimes {
                    path: p("a.txt"),
                    atime: time(1, 2),
                    mtime: time(-5, 999_999_999),
                },
                Op::Utimes {
                    path: p("sub"),
                    atime: time(1_600_000_000, 0),
                    mtime: time(1_700_000_000, 5),
                },
                Op::Utimes {
                    path: RelPath::root(),
                    atime: time(0, 0),
                    mtime: time(1_234_567_890, 1),
                },
            ],
        ),
        (
            "xattrs",
            vec![
                Op::SetXattr {
                    path: p("a.txt"),
                    name: b"user.k".to_vec(),
                    value: vec![0, 1, 2],
                },
                Op::SetXattr {
                    path: p("sub"),
                    name: b"user.dir".to_vec(),
                    value: b"d".to_vec(),
                },
                Op::SetXattr {
                    path: RelPath::root(),
                    name: b"user.root".to_vec(),
                    value: vec![],
                },
                Op::RemoveXattr {
                    path: p("a.txt"),
                    name: b"user.fuzz".to_vec(),
                },
                Op::RemoveXattr {
                    path: p("big.bin"),
                    name: b"user.absent".to_vec(),
                },
            ],
        ),
        // Metadata of the symlink that points out of the root: the link
        // itself changes (or the change is refused), never its target.
        (
            "meta-on-outward-symlink",
            vec![
                Op::Chmod {
                    path: p("out"),
                    mode: 0o777,
                },
                Op::Chown {
                    path: p("out"),
                    uid: 1,
                    gid: 1,
                },
                Op::Utimes {
                    path: p("out"),
                    atime: time(1, 0),
                    mtime: time(2, 0),
                },
                Op::SetXattr {
                    path: p("out"),
                    name: b"user.x".to_vec(),
                    value: b"1".to_vec(),
                },
                Op::RemoveXattr {
                    path: p("out"),
                    name: b"user.x".to_vec(),
                },
            ],
        ),
        // Every change to entries the same batch made (still in staging).
        (
            "staged-then-changed",
            vec![
                Op::Mkdir {
                    path: p("n"),
                    mode: 0o755,
                },
                raw("n/f", &staged0),
                Op::WriteRanges {
                    path: p("n/f"),
                    ranges: vec![WriteRange {
                        offset: 0,
                        data: b"THE".to_vec(),
                    }],
                    base: Hash::of(&staged0),
                    result: Hash::of(&staged1),
                },
                Op::Truncate {
                    path: p("n/f"),
                    size: 50,
                },
                Op::Delta {
                    path: p("n/f"),
                    base: Hash::of(&staged2),
                    delta: delta(&staged2, &staged3),
                    result: Hash::of(&staged3),
                },
                Op::Chmod {
                    path: p("n/f"),
                    mode: 0o600,
                },
                Op::Chown {
                    path: p("n/f"),
                    uid: 1,
                    gid: 1,
                },
                Op::Utimes {
                    path: p("n/f"),
                    atime: time(3, 0),
                    mtime: time(4, 0),
                },
                Op::SetXattr {
                    path: p("n/f"),
                    name: b"user.s".to_vec(),
                    value: b"staged".to_vec(),
                },
                Op::Rename {
                    from: p("n/f"),
                    to: p("n/g"),
                    exchange: false,
                },
                Op::Link {
                    existing: p("n/g"),
                    new: p("h"),
                },
                Op::Unlink { path: p("n/g") },
                Op::Symlink {
                    path: p("n/l"),
                    target: b"g".to_vec(),
                },
                Op::Rename {
                    from: p("n"),
                    to: p("m"),
                    exchange: false,
                },
            ],
        ),
        (
            "every-op",
            [
                vec![
                    Op::Mkdir {
                        path: p("new"),
                        mode: 0o755,
                    },
                    Op::Mkdir {
                        path: p("new/inner"),
                        mode: 0o700,
                    },
                    Op::Symlink {
                        path: p("new/s"),
                        target: b"../outside/canary".to_vec(),
                    },
                    Op::Mknod {
                        path: p("new/fifo"),
                        kind: NodeKind::Fifo,
                        mode: 0o644,
                        rdev: 0,
                    },
                    raw("new/plain", b"plain\n"),
                    create("new/z", 0o640, zstd.clone()),
                    create("new/sparse", 0o644, sparse.clone()),
                ],
                streamed(
                    "new/streamed",
                    200_000,
                    &[
                        (0, Chunk::Raw(vec![1; 1000])),
                        (100_000, Chunk::compress_if_it_pays(&text(5000))),
                    ],
                ),
                vec![
                    Op::Link {
                        existing: p("a.txt"),
                        new: p("new/a.hard"),
                    },
                    Op::Rename {
                        from: p("sub/b.txt"),
                        to: p("sub/deep/c.txt"),
                        exchange: true,
                    },
                    Op::Rename {
                        from: p("new/plain"),
                        to: p("plain.moved"),
                        exchange: false,
                    },
                    Op::WriteRanges {
                        path: p("a.txt"),
                        ranges: vec![WriteRange {
                            offset: 0,
                            data: b"HE".to_vec(),
                        }],
                        base: Hash::of(A_TXT),
                        result: Hash::of(&edited(A_TXT, 0, b"HE")),
                    },
                    Op::Truncate {
                        path: p("plain.moved"),
                        size: 3,
                    },
                    Op::Delta {
                        path: p("big.bin"),
                        base: Hash::of(&big),
                        delta: delta(&big, &big2),
                        result: Hash::of(&big2),
                    },
                    Op::CreateFromDelta {
                        path: p("big.copy"),
                        basis: p("big.bin"),
                        base: Hash::of(&big2),
                        delta: delta(&big2, &big3),
                        mode: 0o600,
                        result: Hash::of(&big3),
                    },
                    Op::Chmod {
                        path: p("sub"),
                        mode: 0o750,
                    },
                    Op::Chmod {
                        path: RelPath::root(),
                        mode: 0o755,
                    },
                    Op::Chown {
                        path: p("new/z"),
                        uid: 1000,
                        gid: 1000,
                    },
                    Op::Chown {
                        path: p("a.txt"),
                        uid: 0,
                        gid: 0,
                    },
                    Op::Utimes {
                        path: p("new"),
                        atime: time(1_600_000_000, 1),
                        mtime: time(1_700_000_000, 2),
                    },
                    Op::Utimes {
                        path: p("a.txt"),
                        atime: time(5, 6),
                        mtime: time(7, 8),
                    },
                    Op::SetXattr {
                        path: p("a.txt"),
                        name: b"user.k".to_vec(),
                        value: b"v".to_vec(),
                    },
                    Op::SetXattr {
                        path: p("new"),
                        name: b"user.d".to_vec(),
                        value: b"dir".to_vec(),
                    },
                    Op::RemoveXattr {
                        path: p("a.txt"),
                        name: b"user.fuzz".to_vec(),
                    },
                    Op::Unlink { path: p("a.link") },
                    Op::Unlink { path: p("out") },
                    Op::Rmdir { path: p("empty") },
                    Op::Rename {
                        from: p("sub"),
                        to: p("sub.moved"),
                        exchange: false,
                    },
                ],
            ]
            .concat(),
        ),
    ];

    // Each refused: a symlink in the path.
    let escapes: Vec<(&str, Vec<Op>)> = vec![
        ("escape-create", vec![raw("out/evil", b"evil")]),
        (
            "escape-unlink",
            vec![Op::Unlink {
                path: p("out/canary"),
            }],
        ),
        (
            "escape-rename-into",
            vec![Op::Rename {
                from: p("a.txt"),
                to: p("out/a.txt"),
                exchange: false,
            }],
        ),
        (
            "escape-rename-from",
            vec![Op::Rename {
                from: p("out/canary"),
                to: p("stolen"),
                exchange: true,
            }],
        ),
        (
            "escape-link",
            vec![Op::Link {
                existing: p("out/canary"),
                new: p("stolen"),
            }],
        ),
        (
            "escape-write",
            vec![Op::WriteRanges {
                path: p("out/canary"),
                ranges: vec![WriteRange {
                    offset: 0,
                    data: b"X".to_vec(),
                }],
                base: Hash::of(CANARY),
                result: Hash::of(&canary_x),
            }],
        ),
        (
            "escape-truncate",
            vec![Op::Truncate {
                path: p("out/canary"),
                size: 0,
            }],
        ),
        (
            "escape-chmod",
            vec![Op::Chmod {
                path: p("out/canary"),
                mode: 0o777,
            }],
        ),
        (
            "escape-xattr",
            vec![Op::SetXattr {
                path: p("out/nested"),
                name: b"user.evil".to_vec(),
                value: b"1".to_vec(),
            }],
        ),
        (
            "escape-mkdir",
            vec![Op::Mkdir {
                path: p("out/d"),
                mode: 0o777,
            }],
        ),
        (
            "escape-delta-basis",
            vec![Op::CreateFromDelta {
                path: p("stolen"),
                basis: p("out/canary"),
                base: Hash::of(CANARY),
                delta: delta(CANARY, &canary_x),
                mode: 0o644,
                result: Hash::of(&canary_x),
            }],
        ),
        ("escape-inner-symlink", vec![raw("in/x", b"x")]),
        (
            "escape-new-symlink",
            vec![
                Op::Symlink {
                    path: p("esc"),
                    target: b"../outside".to_vec(),
                },
                raw("esc/evil", b"evil"),
            ],
        ),
        (
            "escape-renamed-symlink",
            vec![
                Op::Rename {
                    from: p("out"),
                    to: p("o2"),
                    exchange: false,
                },
                Op::Unlink {
                    path: p("o2/canary"),
                },
            ],
        ),
    ];

    let seeds = ok_seeds
        .iter()
        .map(|s| (s, true))
        .chain(escapes.iter().map(|s| (s, false)));
    for ((name, ops), ok) in seeds {
        let bytes = seal(ops);
        let dir = tempfile::tempdir().expect("tempdir");
        let (r, outside) = populate(dir.path());
        let before = listing(&outside);
        let result = apply(&r, &bytes[..], &ApplyOptions::default());
        match (&result, ok) {
            (Ok(report), true) => assert_eq!(report.to_seq, 1, "{name}"),
            // Through the model's own symlink the path does not exist.
            (Err(e), false) => assert!(
                ["symlink", "does not exist"]
                    .iter()
                    .any(|why| e.to_string().contains(why)),
                "{name}: refused for another reason: {e}"
            ),
            _ => panic!("{name}: {result:?}"),
        }
        assert_eq!(listing(&outside), before, "{name}: outside/ changed");
        fs::write(corpus.join(name), bytes).expect("write seed");
    }
}
