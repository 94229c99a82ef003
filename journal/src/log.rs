//! The record log: segment files, their header, and the frame around each
//! record (docs/FORMAT.md describes the bytes). The file I/O sits
//! behind [`LogStore`] so tests can simulate a crash that loses everything
//! after the n-th sync.
//!
//! Writing: [`Appender`] encodes records into a buffer, writes each group
//! with one `append` (one write(2)), rotates segments, and syncs on request.
//! Reading: [`Frames`] walks one segment's bytes; [`replay`] walks the whole
//! log for recovery and cuts off a torn tail.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::JournalError;
use crate::record::Record;

pub(crate) const MAGIC: [u8; 8] = *b"FERRYJL\n";
pub(crate) const VERSION: u32 = 1;
/// magic (8) + version (4) + reserved (4) + first seq (8) + check (8).
pub(crate) const HEADER_LEN: usize = 32;
/// length (4) + checksum (8).
pub(crate) const FRAME_HEAD: usize = 12;
/// No record comes near this; a larger length field is damage, and is
/// refused before anything is allocated for it.
pub(crate) const MAX_PAYLOAD: u32 = 16 << 20;
pub(crate) const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

/// The file operations the log needs, one segment at a time. Segments are
/// numbered from 1. Every method is one step of docs/DURABILITY.md.
pub(crate) trait LogStore: Send + 'static {
    /// The segment numbers present, ascending.
    fn list(&self) -> io::Result<Vec<u64>>;
    /// The whole segment.
    fn read(&self, seg: u64) -> io::Result<Vec<u8>>;
    /// Up to the first `n` bytes of the segment.
    fn read_head(&self, seg: u64, n: usize) -> io::Result<Vec<u8>>;
    /// The segment's length in bytes.
    fn len(&self, seg: u64) -> io::Result<u64>;
    /// Creates a segment holding `header`, durably (file and directory entry).
    fn create(&mut self, seg: u64, header: &[u8]) -> io::Result<()>;
    /// Appends with one write; safe from a killed process once it returns.
    fn append(&mut self, seg: u64, data: &[u8]) -> io::Result<()>;
    /// fdatasync: everything appended to `seg` is durable once it returns.
    fn sync(&mut self, seg: u64) -> io::Result<()>;
    /// Cuts the segment to `len` bytes, durably.
    fn truncate(&mut self, seg: u64, len: u64) -> io::Result<()>;
    /// Removes a segment, durably.
    fn remove(&mut self, seg: u64) -> io::Result<()>;
    /// The path to name in errors.
    fn path(&self, seg: u64) -> PathBuf;
}

pub(crate) fn segment_name(seg: u64) -> String {
    format!("{seg:08}.seg")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Lists the segments of a log directory (shared by the store and readers).
pub(crate) fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut segs = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(n) = entry.file_name().to_str().and_then(parse_segment_name) {
            segs.push(n);
        }
    }
    segs.sort_unstable();
    Ok(segs)
}

/// Each segment of a log directory with the sequence number of its first
/// record, ascending. A segment whose header is not readable yet (being
/// created) ends the list.
pub(crate) fn segment_starts(dir: &Path) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    for seg in list_segments(dir)? {
        let mut head = [0u8; HEADER_LEN];
        let mut f = File::open(dir.join(segment_name(seg)))?;
        if std::io::Read::read_exact(&mut f, &mut head).is_err() {
            break;
        }
        match decode_header(&head) {
            Ok(first) => out.push((seg, first)),
            Err(_) => break,
        }
    }
    Ok(out)
}

/// The real store: files in `state_dir/journal/log/`.
pub(crate) struct FsStore {
    dir: PathBuf,
    /// The segment being appended to, kept open.
    current: Option<(u64, File)>,
}

impl FsStore {
    pub fn new(dir: PathBuf) -> FsStore {
        FsStore { dir, current: None }
    }

    fn file(&mut self, seg: u64) -> io::Result<&mut File> {
        if self.current.as_ref().map(|(n, _)| *n) != Some(seg) {
            let f = fs::OpenOptions::new().append(true).open(self.path(seg))?;
            self.current = Some((seg, f));
        }
        Ok(&mut self.current.as_mut().expect("just set").1)
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

impl LogStore for FsStore {
    fn list(&self) -> io::Result<Vec<u64>> {
        list_segments(&self.dir)
    }

    fn read(&self, seg: u64) -> io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        File::open(self.path(seg))?.read_to_end(&mut buf)?;
        Ok(buf)
    }

    fn read_head(&self, seg: u64, n: usize) -> io::Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(n);
        File::open(self.path(seg))?
            .take(n as u64)
            .read_to_end(&mut buf)?;
        Ok(buf)
    }

    fn len(&self, seg: u64) -> io::Result<u64> {
        Ok(fs::metadata(self.path(seg))?.len())
    }

    fn create(&mut self, seg: u64, header: &[u8]) -> io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(self.path(seg))?;
        f.write_all(header)?;
        f.sync_data()?;
        // The new name must survive a crash too, or the log would lose the
        // segment's records although each was fdatasync'd.
        self.sync_dir()?;
        self.current = Some((seg, f));
        Ok(())
    }

    fn append(&mut self, seg: u64, data: &[u8]) -> io::Result<()> {
        self.file(seg)?.write_all(data)
    }

    fn sync(&mut self, seg: u64) -> io::Result<()> {
        self.file(seg)?.sync_data()
    }

    fn truncate(&mut self, seg: u64, len: u64) -> io::Result<()> {
        let f = fs::OpenOptions::new().write(true).open(self.path(seg))?;
        f.set_len(len)?;
        f.sync_all()
    }

    fn remove(&mut self, seg: u64) -> io::Result<()> {
        if self.current.as_ref().map(|(n, _)| *n) == Some(seg) {
            self.current = None;
        }
        fs::remove_file(self.path(seg))?;
        self.sync_dir()
    }

    fn path(&self, seg: u64) -> PathBuf {
        self.dir.join(segment_name(seg))
    }
}

fn check8(bytes: &[u8]) -> [u8; 8] {
    let h = blake3::hash(bytes);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.as_bytes()[..8]);
    out
}

pub(crate) fn encode_header(first_seq: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    // 12..16 reserved, zero.
    h[16..24].copy_from_slice(&first_seq.to_le_bytes());
    let c = check8(&h[0..24]);
    h[24..32].copy_from_slice(&c);
    h
}

/// Why a segment header was refused.
pub(crate) enum BadHeader {
    /// Shorter than a header, or not checksummed right: a segment whose
    /// creation was cut short (only possible for the last one).
    Torn,
    Version(u32),
}

pub(crate) fn decode_header(data: &[u8]) -> Result<u64, BadHeader> {
    if data.len() < HEADER_LEN || data[0..8] != MAGIC {
        return Err(BadHeader::Torn);
    }
    let version = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes"));
    if check8(&data[0..24]) != data[24..32] {
        return Err(BadHeader::Torn);
    }
    if version != VERSION {
        return Err(BadHeader::Version(version));
    }
    Ok(u64::from_le_bytes(
        data[16..24].try_into().expect("8 bytes"),
    ))
}

/// Appends one framed record to `buf`, reusing its allocation.
pub(crate) fn encode_frame(r: &Record, mut buf: Vec<u8>) -> Vec<u8> {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; FRAME_HEAD]);
    let mut buf =
        postcard::to_extend(r, buf).expect("postcard encodes records into a Vec without failing");
    let payload_len = buf.len() - start - FRAME_HEAD;
    let len = u32::try_from(payload_len).expect("a record is far smaller than 4 GiB");
    let check = check8(&buf[start + FRAME_HEAD..]);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + FRAME_HEAD].copy_from_slice(&check);
    buf
}

/// One frame at the start of `data`: the record and the frame's length, or
/// why it is not a good frame.
fn decode_frame(data: &[u8]) -> Result<(Record, usize), String> {
    if data.len() < FRAME_HEAD {
        return Err(format!("frame header cut short ({} bytes)", data.len()));
    }
    let len = u32::from_le_bytes(data[0..4].try_into().expect("4 bytes"));
    if len > MAX_PAYLOAD {
        return Err(format!(
            "frame length {len} exceeds the limit {MAX_PAYLOAD}"
        ));
    }
    let end = FRAME_HEAD + len as usize;
    if end > data.len() {
        return Err(format!(
            "frame of {len} bytes runs past the end of the segment"
        ));
    }
    let payload = &data[FRAME_HEAD..end];
    if check8(payload) != data[4..FRAME_HEAD] {
        return Err("frame checksum mismatch".to_string());
    }
    let r: Record =
        postcard::from_bytes(payload).map_err(|e| format!("undecodable record: {e}"))?;
    Ok((r, end))
}

/// Where and why reading a segment stopped early.
#[derive(Debug)]
pub(crate) struct Stop {
    pub offset: u64,
    pub reason: String,
    /// Nothing valid follows the bad frame: it is a torn tail (a write cut
    /// short by a crash), not damage in the middle of the log.
    pub tail: bool,
}

/// The frames of one segment's bytes (after its header).
pub(crate) struct Frames<'a> {
    data: &'a [u8],
    pos: usize,
    done: bool,
}

impl<'a> Frames<'a> {
    pub fn new(data: &'a [u8]) -> Frames<'a> {
        Frames {
            data,
            pos: HEADER_LEN.min(data.len()),
            done: false,
        }
    }
}

impl Iterator for Frames<'_> {
    /// A record and its frame's offset in the segment.
    type Item = Result<(u64, Record), Stop>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.pos >= self.data.len() {
            return None;
        }
        let rest = &self.data[self.pos..];
        match decode_frame(rest) {
            Ok((r, n)) => {
                let off = self.pos as u64;
                self.pos += n;
                Some(Ok((off, r)))
            }
            Err(reason) => {
                self.done = true;
                // A frame whose bytes are all there but fail the check, with
                // a good frame right after it, is damage in the middle of
                // the log; anything else is what a cut-short write leaves.
                let len =
                    u32::from_le_bytes(rest[..4.min(rest.len())].try_into().unwrap_or([0xff; 4]));
                let next = FRAME_HEAD.saturating_add(len as usize);
                let tail = !(len <= MAX_PAYLOAD
                    && next < rest.len()
                    && decode_frame(&rest[next..]).is_ok());
                Some(Err(Stop {
                    offset: self.pos as u64,
                    reason,
                    tail,
                }))
            }
        }
    }
}

/// What replay found.
#[derive(Debug, Default)]
pub(crate) struct Replayed {
    /// Highest sequence number in the log (0 if none).
    pub last_seq: u64,
    /// Records applied (those after the checkpoint).
    pub applied: u64,
    /// The last segment and its length, to append to; `None` if no segment.
    pub tail: Option<(u64, u64)>,
    /// Bytes of all segments before the last.
    pub closed_bytes: u64,
}

fn corrupt(store: &dyn LogStore, seg: u64, offset: u64, reason: impl Into<String>) -> JournalError {
    JournalError::Corrupt {
        path: store.path(seg),
        offset,
        reason: reason.into(),
    }
}

/// Replays the log: checks every frame and the sequence, applies the records
/// after `after` (the checkpoint's sequence number) through `apply`, and cuts
/// a torn tail off the last segment.
pub(crate) fn replay(
    store: &mut dyn LogStore,
    after: u64,
    mut apply: impl FnMut(&Record),
) -> Result<Replayed, JournalError> {
    let io_err =
        |store: &dyn LogStore, seg: u64, e: io::Error| JournalError::io(store.path(seg), e);
    let mut segs = store.list().map_err(|e| io_err(store, 0, e))?;

    // A last segment whose header never made it to disk holds no record.
    while let Some(&last) = segs.last() {
        let data = store
            .read_head(last, HEADER_LEN)
            .map_err(|e| io_err(store, last, e))?;
        match decode_header(&data) {
            Ok(_) => break,
            Err(BadHeader::Version(v)) => {
                return Err(JournalError::Version {
                    path: store.path(last),
                    version: v,
                });
            }
            Err(BadHeader::Torn) => {
                tracing::warn!(path = %store.path(last).display(), "removing a log segment whose creation was cut short");
                store.remove(last).map_err(|e| io_err(store, last, e))?;
                segs.pop();
            }
        }
    }

    let mut out = Replayed::default();
    // Start at the last segment that begins at or before the first record
    // to apply; earlier segments hold only checkpointed records.
    let mut start = 0;
    for (i, &seg) in segs.iter().enumerate() {
        let data = read_prefix(store, seg)?;
        match decode_header(&data) {
            Ok(first) if first <= after + 1 => start = i,
            Ok(_) => break,
            Err(BadHeader::Version(v)) => {
                return Err(JournalError::Version {
                    path: store.path(seg),
                    version: v,
                });
            }
            Err(BadHeader::Torn) => return Err(corrupt(store, seg, 0, "bad segment header")),
        }
    }
    for (i, &seg) in segs.iter().enumerate() {
        if i < start {
            out.closed_bytes += store.len(seg).map_err(|e| io_err(store, seg, e))?;
        }
    }

    let mut expected: Option<u64> = None;
    for (i, &seg) in segs.iter().enumerate().skip(start) {
        let is_last = i + 1 == segs.len();
        let data = store.read(seg).map_err(|e| io_err(store, seg, e))?;
        let first = match decode_header(&data) {
            Ok(f) => f,
            Err(BadHeader::Version(v)) => {
                return Err(JournalError::Version {
                    path: store.path(seg),
                    version: v,
                });
            }
            Err(BadHeader::Torn) => return Err(corrupt(store, seg, 0, "bad segment header")),
        };
        if let Some(exp) = expected
            && first != exp
        {
            return Err(corrupt(
                store,
                seg,
                0,
                format!("segment starts at seq {first}, expected {exp}"),
            ));
        }
        let mut next = first;
        let mut end = data.len() as u64;
        for frame in Frames::new(&data) {
            match frame {
                Ok((off, r)) => {
                    if r.seq.0 != next {
                        return Err(corrupt(
                            store,
                            seg,
                            off,
                            format!("record has seq {}, expected {next}", r.seq.0),
                        ));
                    }
                    next += 1;
                    if r.seq.0 > after {
                        apply(&r);
                        out.applied += 1;
                    }
                }
                Err(stop) if stop.tail && is_last => {
                    tracing::warn!(
                        path = %store.path(seg).display(),
                        offset = stop.offset,
                        reason = %stop.reason,
                        dropped = data.len() as u64 - stop.offset,
                        "cutting a torn tail off the journal log"
                    );
                    store
                        .truncate(seg, stop.offset)
                        .map_err(|e| io_err(store, seg, e))?;
                    end = stop.offset;
                }
                Err(stop) => return Err(corrupt(store, seg, stop.offset, stop.reason)),
            }
        }
        out.last_seq = next - 1;
        expected = Some(next);
        if is_last {
            out.tail = Some((seg, end));
        } else {
            out.closed_bytes += end;
        }
    }
    if out.last_seq < after {
        let seg = segs.last().copied().unwrap_or(1);
        return Err(corrupt(
            store,
            seg,
            0,
            format!(
                "the log ends at seq {} but the index was checkpointed at seq {after}",
                out.last_seq
            ),
        ));
    }
    Ok(out)
}

fn read_prefix(store: &dyn LogStore, seg: u64) -> Result<Vec<u8>, JournalError> {
    store
        .read_head(seg, HEADER_LEN)
        .map_err(|e| JournalError::io(store.path(seg), e))
}

/// The writing end of the log, owned by the writer thread.
pub(crate) struct Appender {
    store: Box<dyn LogStore>,
    seg: u64,
    /// Bytes of the current segment already written.
    len: u64,
    limit: u64,
    /// Frames encoded but not yet written.
    buf: Vec<u8>,
    closed_bytes: u64,
}

impl Appender {
    /// Opens the log for appending after replay; creates the first segment
    /// (starting at `next_seq`) if there is none.
    pub fn new(
        mut store: Box<dyn LogStore>,
        r: &Replayed,
        limit: u64,
    ) -> Result<Appender, JournalError> {
        let (seg, len) = match r.tail {
            Some(t) => t,
            None => {
                store
                    .create(1, &encode_header(r.last_seq + 1))
                    .map_err(|e| JournalError::io(store.path(1), e))?;
                (1, HEADER_LEN as u64)
            }
        };
        Ok(Appender {
            store,
            seg,
            len,
            limit: limit.max(4096),
            buf: Vec::with_capacity(64 << 10),
            closed_bytes: r.closed_bytes,
        })
    }

    fn err(&self, e: io::Error) -> JournalError {
        JournalError::io(self.store.path(self.seg), e)
    }

    /// Encodes a record into the pending group, starting a new segment first
    /// if it would not fit in this one.
    pub fn push(&mut self, r: &Record) -> Result<(), JournalError> {
        let before = self.buf.len();
        self.buf = encode_frame(r, std::mem::take(&mut self.buf));
        let over = self.len + self.buf.len() as u64 > self.limit;
        if over && self.len + before as u64 > HEADER_LEN as u64 {
            let frame = self.buf.split_off(before);
            self.write()?;
            // A segment is complete and durable before the next one exists,
            // so only the last segment can ever have a torn tail.
            self.store.sync(self.seg).map_err(|e| self.err(e))?;
            self.closed_bytes += self.len;
            self.seg += 1;
            self.store
                .create(self.seg, &encode_header(r.seq.0))
                .map_err(|e| self.err(e))?;
            self.len = HEADER_LEN as u64;
            self.buf = frame;
        }
        Ok(())
    }

    /// Writes the pending group with one append.
    pub fn write(&mut self) -> Result<(), JournalError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.store
            .append(self.seg, &self.buf)
            .map_err(|e| self.err(e))?;
        self.len += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// fdatasync of the current segment (earlier ones were synced when closed).
    pub fn sync(&mut self) -> Result<(), JournalError> {
        self.store.sync(self.seg).map_err(|e| self.err(e))
    }

    pub fn total_bytes(&self) -> u64 {
        self.closed_bytes + self.len
    }
}

#[cfg(test)]
pub(crate) mod mem {
    //! An in-memory store that simulates a crash: after the n-th durable
    //! operation every later one fails, and only what was durable (plus,
    //! optionally, a torn prefix of what was not) survives.

    use std::collections::BTreeMap;
    use std::io;
    use std::path::PathBuf;
    use std::sync::Arc;

    use parking_lot::Mutex;

    use super::LogStore;

    #[derive(Default, Clone)]
    struct Seg {
        data: Vec<u8>,
        durable: Vec<u8>,
    }

    #[derive(Default)]
    struct Disk {
        segs: BTreeMap<u64, Seg>,
        /// Durable operations still allowed; `None` means no crash planned.
        syncs_left: Option<u64>,
        crashed: bool,
    }

    #[derive(Clone, Default)]
    pub(crate) struct MemStore(Arc<Mutex<Disk>>);

    impl MemStore {
        /// A store that crashes at durable operation `n + 1`.
        pub fn crashing_after(n: u64) -> MemStore {
            let s = MemStore::default();
            s.0.lock().syncs_left = Some(n);
            s
        }

        /// The disk as a reboot would find it: durable bytes plus the first
        /// `torn` bytes of whatever was written after them.
        pub fn after_crash(&self, torn: usize) -> MemStore {
            let d = self.0.lock();
            let mut segs = BTreeMap::new();
            for (n, s) in &d.segs {
                if s.durable.is_empty() {
                    continue;
                }
                let mut data = s.durable.clone();
                let extra = s.data.get(data.len()..).unwrap_or(&[]);
                data.extend_from_slice(&extra[..torn.min(extra.len())]);
                segs.insert(
                    *n,
                    Seg {
                        durable: data.clone(),
                        data,
                    },
                );
            }
            MemStore(Arc::new(Mutex::new(Disk {
                segs,
                syncs_left: None,
                crashed: false,
            })))
        }

        pub fn crashed(&self) -> bool {
            self.0.lock().crashed
        }

        fn durable_op(d: &mut Disk) -> io::Result<()> {
            if d.crashed {
                return Err(io::Error::other("simulated crash"));
            }
            if let Some(left) = d.syncs_left.as_mut() {
                if *left == 0 {
                    d.crashed = true;
                    return Err(io::Error::other("simulated crash"));
                }
                *left -= 1;
            }
            Ok(())
        }
    }

    fn missing() -> io::Error {
        io::Error::from(io::ErrorKind::NotFound)
    }

    impl LogStore for MemStore {
        fn list(&self) -> io::Result<Vec<u64>> {
            Ok(self.0.lock().segs.keys().copied().collect())
        }
        fn read(&self, seg: u64) -> io::Result<Vec<u8>> {
            self.0
                .lock()
                .segs
                .get(&seg)
                .map(|s| s.data.clone())
                .ok_or_else(missing)
        }
        fn read_head(&self, seg: u64, n: usize) -> io::Result<Vec<u8>> {
            let mut d = self.read(seg)?;
            d.truncate(n);
            Ok(d)
        }
        fn len(&self, seg: u64) -> io::Result<u64> {
            Ok(self.read(seg)?.len() as u64)
        }
        fn create(&mut self, seg: u64, header: &[u8]) -> io::Result<()> {
            let mut d = self.0.lock();
            Self::durable_op(&mut d)?;
            d.segs.insert(
                seg,
                Seg {
                    data: header.to_vec(),
                    durable: header.to_vec(),
                },
            );
            Ok(())
        }
        fn append(&mut self, seg: u64, data: &[u8]) -> io::Result<()> {
            // Writes "succeed" after a crash too: they sit in a page cache
            // that will never reach the disk.
            let mut d = self.0.lock();
            d.segs
                .get_mut(&seg)
                .ok_or_else(missing)?
                .data
                .extend_from_slice(data);
            Ok(())
        }
        fn sync(&mut self, seg: u64) -> io::Result<()> {
            let mut d = self.0.lock();
            Self::durable_op(&mut d)?;
            let s = d.segs.get_mut(&seg).ok_or_else(missing)?;
            s.durable = s.data.clone();
            Ok(())
        }
        fn truncate(&mut self, seg: u64, len: u64) -> io::Result<()> {
            let mut d = self.0.lock();
            Self::durable_op(&mut d)?;
            let s = d.segs.get_mut(&seg).ok_or_else(missing)?;
            s.data.truncate(len as usize);
            s.durable = s.data.clone();
            Ok(())
        }
        fn remove(&mut self, seg: u64) -> io::Result<()> {
            let mut d = self.0.lock();
            Self::durable_op(&mut d)?;
            d.segs.remove(&seg).map(|_| ()).ok_or_else(missing)
        }
        fn path(&self, seg: u64) -> PathBuf {
            PathBuf::from(format!("mem/{}", super::segment_name(seg)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::mem::MemStore;
    use super::*;
    use crate::id::{FileId, Seq};
    use crate::record::Op;

    fn rec(seq: u64) -> Record {
        Record {
            seq: Seq(seq),
            unix_ns: seq as i64,
            op: Op::Dirty { id: FileId(seq) },
        }
    }

    fn write_log(store: &MemStore, n: u64, limit: u64) {
        let mut a =
            Appender::new(Box::new(store.clone()), &Replayed::default(), limit).expect("appender");
        for s in 1..=n {
            a.push(&rec(s)).expect("push");
            a.write().expect("write");
        }
        a.sync().expect("sync");
    }

    fn replay_all(store: &MemStore) -> Result<(Vec<u64>, Replayed), JournalError> {
        let mut seqs = Vec::new();
        let mut s = store.clone();
        let r = replay(&mut s, 0, |r| seqs.push(r.seq.0))?;
        Ok((seqs, r))
    }

    #[test]
    fn roundtrip_across_segments() {
        let store = MemStore::default();
        write_log(&store, 2000, 4096);
        assert!(store.list().expect("list").len() > 3);
        let (seqs, r) = replay_all(&store).expect("replay");
        assert_eq!(seqs, (1..=2000).collect::<Vec<_>>());
        assert_eq!(r.last_seq, 2000);
    }

    #[test]
    fn torn_tail_is_cut_off() {
        let store = MemStore::default();
        write_log(&store, 10, DEFAULT_SEGMENT_BYTES);
        let full = store.read(1).expect("read");
        for cut in [1usize, 5, 12, 13] {
            let s = MemStore::default();
            let mut w = s.clone();
            w.create(1, &full[..HEADER_LEN]).expect("create");
            w.append(1, &full[HEADER_LEN..full.len() - cut])
                .expect("append");
            let (seqs, r) = replay_all(&s).expect("torn tail is not an error");
            assert_eq!(seqs, (1..=9).collect::<Vec<_>>(), "cut {cut}");
            let (_, len) = r.tail.expect("tail");
            assert_eq!(s.read(1).expect("read").len() as u64, len, "tail truncated");
        }
    }

    #[test]
    fn flipped_byte_in_the_middle_is_corruption() {
        let store = MemStore::default();
        write_log(&store, 10, DEFAULT_SEGMENT_BYTES);
        let mut data = store.read(1).expect("read");
        let frame_len = (data.len() - HEADER_LEN) / 10;
        let victim = HEADER_LEN + 4 * frame_len + FRAME_HEAD + 1;
        data[victim] ^= 0x40;
        let s = MemStore::default();
        let mut w = s.clone();
        w.create(1, &data[..HEADER_LEN]).expect("create");
        w.append(1, &data[HEADER_LEN..]).expect("append");
        match replay_all(&s) {
            Err(JournalError::Corrupt { offset, .. }) => {
                assert_eq!(offset, (HEADER_LEN + 4 * frame_len) as u64)
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        // Nothing was cut: the damage is left for a human to look at.
        assert_eq!(s.read(1).expect("read"), data);
    }

    #[test]
    fn flipped_byte_in_last_frame_is_a_torn_tail() {
        let store = MemStore::default();
        write_log(&store, 3, DEFAULT_SEGMENT_BYTES);
        let mut data = store.read(1).expect("read");
        let last = data.len() - 1;
        data[last] ^= 1;
        let s = MemStore::default();
        let mut w = s.clone();
        w.create(1, &data[..HEADER_LEN]).expect("create");
        w.append(1, &data[HEADER_LEN..]).expect("append");
        let (seqs, _) = replay_all(&s).expect("replay");
        assert_eq!(seqs, vec![1, 2]);
    }

    #[test]
    fn huge_length_is_refused_without_allocating() {
        let mut data = encode_header(1).to_vec();
        data.extend_from_slice(&u32::MAX.to_le_bytes());
        data.extend_from_slice(&[0u8; 8]);
        let mut frames = Frames::new(&data);
        match frames.next() {
            Some(Err(stop)) => assert!(stop.reason.contains("exceeds"), "{}", stop.reason),
            other => panic!("unexpected {other:?}"),
        }
    }
}
