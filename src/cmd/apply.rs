//! `ferry apply BATCH... --replica DIR`: applies batch files made by
//! `ferry push --batch-dir`.
//!
//! Everything that can be checked before the replica changes is checked
//! first, for every file: each file whole (frames, the trailer hash), then
//! the sequence (sorted by sequence number, from the replica's applied
//! one: files already applied are skipped; a gap, an overlap, another
//! source or another stream refuse the whole command). Only then are the
//! batches applied, one by one, each with the commit protocol, which
//! checks base hashes before anything is visible.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use replicator::apply::{ApplyOptions, ApplyReport, Session};
use replicator::batch::{ANY_REPLICA, BatchHeader, BatchReader, validate};
use serde::Serialize;

use crate::cli::ApplyArgs;

/// One file's outcome, as `--json` prints it.
#[derive(Debug, Serialize)]
struct Outcome {
    batch: PathBuf,
    from_seq: u64,
    to_seq: u64,
    /// Already applied: nothing was done.
    skipped: bool,
    ops: u64,
    content_bytes: u64,
    commit_window_us: u64,
    warnings: Vec<String>,
}

pub fn run(args: ApplyArgs) -> anyhow::Result<()> {
    let mut batches = Vec::new();
    for path in &args.batches {
        let file = File::open(path).with_context(|| format!("batch {}", path.display()))?;
        let valid = validate(BufReader::new(file))
            .with_context(|| format!("batch {} is damaged; nothing was applied", path.display()))?;
        batches.push((path.clone(), valid.header));
    }
    batches.sort_by_key(|(_, h)| (h.from_seq, h.to_seq));
    super::make_replica_dir(&args.replica)
        .with_context(|| format!("replica directory {}", args.replica.display()))?;
    let mut session = Session::open(&args.replica)
        .with_context(|| format!("replica {}", args.replica.display()))?;
    let applied = session.applied()?;
    let todo = plan(
        &batches,
        applied.map(|a| (a.seq, a.source_id, a.replica_id)),
    )?;

    let mut outcomes = Vec::new();
    for (path, header) in &batches {
        if !todo.contains(path) {
            outcomes.push(outcome(path, header, None));
            continue;
        }
        let file = File::open(path).with_context(|| format!("batch {}", path.display()))?;
        let mut reader = BatchReader::new(BufReader::with_capacity(1 << 20, file))
            .with_context(|| format!("batch {}", path.display()))?;
        let report = session
            .apply_from(&mut reader, &ApplyOptions::default())
            .with_context(|| format!("applying {}", path.display()))?;
        outcomes.push(outcome(path, header, Some(report)));
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({ "batches": outcomes }))?
        );
    } else {
        for o in &outcomes {
            if o.skipped {
                println!(
                    "{}: already applied (seq {} to {})",
                    o.batch.display(),
                    o.from_seq,
                    o.to_seq
                );
            } else {
                println!(
                    "{}: applied seq {} to {}: {} ops, {} content bytes, commit window {} us",
                    o.batch.display(),
                    o.from_seq,
                    o.to_seq,
                    o.ops,
                    o.content_bytes,
                    o.commit_window_us
                );
            }
            for w in &o.warnings {
                eprintln!("ferry: warning: {}: {w}", o.batch.display());
            }
        }
    }
    Ok(())
}

fn outcome(path: &Path, h: &BatchHeader, report: Option<ApplyReport>) -> Outcome {
    let report = report.unwrap_or(ApplyReport {
        skipped: true,
        ..ApplyReport::default()
    });
    Outcome {
        batch: path.to_path_buf(),
        from_seq: h.from_seq,
        to_seq: h.to_seq,
        skipped: report.skipped,
        ops: report.ops,
        content_bytes: report.content_bytes,
        commit_window_us: report.commit_window_us,
        warnings: report.warnings,
    }
}

/// The batches (sorted by sequence) to apply to a replica in `applied`
/// state (seq, source, stream), or why none may be.
fn plan(
    batches: &[(PathBuf, BatchHeader)],
    applied: Option<(u64, [u8; 16], [u8; 16])>,
) -> anyhow::Result<Vec<PathBuf>> {
    let (mut seq, mut source, mut stream) = match applied {
        Some((seq, source, stream)) => (seq, Some(source), stream),
        None => (0, None, ANY_REPLICA),
    };
    let mut todo = Vec::new();
    for (path, h) in batches {
        let name = path.display();
        if source.is_some_and(|s| s != h.source_id) {
            bail!("{name} comes from another source than the replica's; nothing was applied");
        }
        if stream != ANY_REPLICA && h.replica_id != ANY_REPLICA && h.replica_id != stream {
            bail!(
                "{name} was made for another replica (another batch directory's stream); \
                 nothing was applied"
            );
        }
        if h.to_seq <= seq {
            continue;
        }
        if h.from_seq > seq {
            bail!(
                "the batch starting at seq {seq} is missing: the replica is at seq {seq} and \
                 {name} starts at seq {} (look for a file named {seq:020}-*.ferry); nothing \
                 was applied",
                h.from_seq
            );
        }
        if h.from_seq < seq {
            bail!(
                "{name} covers seq {} to {}, but the replica is at seq {seq}, inside it: it \
                 belongs to another sequence of batches; nothing was applied",
                h.from_seq,
                h.to_seq
            );
        }
        seq = h.to_seq;
        source = Some(h.source_id);
        if h.replica_id != ANY_REPLICA {
            stream = h.replica_id;
        }
        todo.push(path.clone());
    }
    Ok(todo)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(name: &str, from: u64, to: u64) -> (PathBuf, BatchHeader) {
        (
            PathBuf::from(name),
            BatchHeader {
                source_id: [1; 16],
                replica_id: [2; 16],
                from_seq: from,
                to_seq: to,
                ..BatchHeader::default()
            },
        )
    }

    #[test]
    fn batches_apply_in_sequence_skip_what_is_applied_and_refuse_gaps() {
        let all = [b("a", 0, 10), b("b", 10, 20), b("c", 20, 30)];
        assert_eq!(
            plan(&all, None).unwrap(),
            ["a", "b", "c"].map(PathBuf::from)
        );
        assert_eq!(
            plan(&all, Some((20, [1; 16], [2; 16]))).unwrap(),
            [PathBuf::from("c")]
        );
        assert!(plan(&all, Some((30, [1; 16], [2; 16]))).unwrap().is_empty());
        let gap = plan(&[b("a", 0, 10), b("c", 20, 30)], None).unwrap_err();
        assert!(gap.to_string().contains("seq 10 is missing"), "{gap}");
        let first_missing = plan(&[b("b", 10, 20)], None).unwrap_err();
        assert!(
            first_missing.to_string().contains("seq 0 is missing"),
            "{first_missing}"
        );
        let overlap = plan(&[b("b", 10, 20)], Some((15, [1; 16], [2; 16]))).unwrap_err();
        assert!(overlap.to_string().contains("inside it"), "{overlap}");
        let other_source = plan(&all, Some((0, [9; 16], [2; 16]))).unwrap_err();
        assert!(
            other_source.to_string().contains("another source"),
            "{other_source}"
        );
        let other_stream = plan(&all, Some((0, [1; 16], [7; 16]))).unwrap_err();
        assert!(
            other_stream.to_string().contains("another replica"),
            "{other_stream}"
        );
    }
}
