//! The daemon's authentication: both ends prove they hold the same key
//! before anything else is read, and every frame after that carries a MAC.
//!
//! The key is derived from the key file's contents (surrounding
//! whitespace ignored): `K = blake3::derive_key("ferry daemon key v1",
//! contents)`. The handshake, all in the clear:
//!
//! ```text
//! client → daemon   "FERRYD1\n" nonce_c[32]
//! daemon → client   "FERRYD1\n" nonce_d[32] proof_d[32]    proof_d = MAC_K("daemon" nonce_c nonce_d)
//! client → daemon   proof_c[32]                            proof_c = MAC_K("client" nonce_c nonce_d)
//! daemon → client   "FERRYOK\n"  |  "FERRYNO\n" (and the connection closes)
//! ```
//!
//! `MAC_K` is blake3's keyed hash. A client checks `proof_d` before it
//! sends anything of its own, so a daemon without the key learns nothing
//! and gets nothing; a daemon checks `proof_c` before it reads a byte of
//! the protocol. Fresh nonces on both sides make every session's proofs
//! and keys new: nothing recorded from one session is accepted in another.
//!
//! After the handshake each direction is a stream of frames
//! `[len: u32 LE][payload: len bytes][tag: 32 bytes]`, with
//! `tag = MAC_k(counter: u64 LE, len, payload)`, `k` the direction's key
//! (`MAC_K("client to daemon" nonce_c nonce_d)` or `"daemon to client"`)
//! and `counter` the frame's number in that direction: a frame changed,
//! dropped, replayed or moved is refused. The frames are authenticated,
//! not encrypted: over an untrusted network use the ssh transport, or a
//! tunnel, for confidentiality (docs/SECURITY.md).

use std::io::{self, Read, Write};
use std::path::Path;

use anyhow::{Context, bail};

/// The handshake's first bytes, each way.
const HELLO: &[u8; 8] = b"FERRYD1\n";
const ACCEPTED: &[u8; 8] = b"FERRYOK\n";
const REFUSED: &[u8; 8] = b"FERRYNO\n";

/// Largest frame payload.
const MAX_FRAME: usize = 256 << 10;
/// Bytes a writer gathers before it sends a frame.
const FRAME_TARGET: usize = 64 << 10;
const TAG_LEN: usize = 32;

/// The shared key.
#[derive(Clone)]
pub struct Key([u8; 32]);

impl Key {
    /// Reads and derives the key from `path`.
    pub fn from_file(path: &Path) -> anyhow::Result<Key> {
        let bytes = std::fs::read(path).with_context(|| format!("key file {}", path.display()))?;
        let text = bytes.trim_ascii();
        if text.len() < 16 {
            bail!(
                "key file {}: {} bytes; a key needs at least 16 (e.g. `head -c 32 /dev/urandom | base64 > FILE`)",
                path.display(),
                text.len()
            );
        }
        Ok(Key(blake3::derive_key("ferry daemon key v1", text)))
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        for p in parts {
            h.update(p);
        }
        *h.finalize().as_bytes()
    }
}

/// The keys of one session, one per direction.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct SessionKeys {
    /// For what this end sends.
    pub send: [u8; 32],
    /// For what this end receives.
    pub receive: [u8; 32],
}

/// The daemon's half of the handshake after the client's hello: what it
/// sends back, and what it expects.
pub struct DaemonChallenge {
    pub reply: Vec<u8>,
    expected: [u8; 32],
    keys: SessionKeys,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

/// Compares in constant time.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn nonce() -> anyhow::Result<[u8; 32]> {
    let mut n = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut n))
        .context("reading /dev/urandom")?;
    Ok(n)
}

fn session_keys(key: &Key, nc: &[u8; 32], nd: &[u8; 32]) -> (SessionKeys, SessionKeys) {
    let c2d = key.mac(&[b"client to daemon", nc, nd]);
    let d2c = key.mac(&[b"daemon to client", nc, nd]);
    (
        SessionKeys {
            send: c2d,
            receive: d2c,
        },
        SessionKeys {
            send: d2c,
            receive: c2d,
        },
    )
}

impl DaemonChallenge {
    /// Answers a client's 40-byte hello; `None` if it is not one.
    pub fn new(key: &Key, hello: &[u8; 40]) -> anyhow::Result<Option<DaemonChallenge>> {
        if &hello[..8] != HELLO {
            return Ok(None);
        }
        let nc: [u8; 32] = hello[8..].try_into().expect("32 bytes");
        let nd = nonce()?;
        let mut reply = HELLO.to_vec();
        reply.extend_from_slice(&nd);
        reply.extend_from_slice(&key.mac(&[b"daemon", &nc, &nd]));
        let (_, keys) = session_keys(key, &nc, &nd);
        Ok(Some(DaemonChallenge {
            reply,
            expected: key.mac(&[b"client", &nc, &nd]),
            keys,
        }))
    }

    /// The session's keys if `proof` is the client's, with the byte string
    /// to answer either way.
    pub fn check(self, proof: &[u8; 32]) -> (Option<SessionKeys>, &'static [u8; 8]) {
        if same(proof, &self.expected) {
            (Some(self.keys), ACCEPTED)
        } else {
            (None, REFUSED)
        }
    }
}

/// The client's handshake over `stream`: the session's keys, or an error
/// that says which side lacks the key.
pub fn client_handshake(
    key: &Key,
    stream: &mut (impl Read + Write),
    daemon: &str,
) -> anyhow::Result<SessionKeys> {
    let nc = nonce()?;
    let mut hello = HELLO.to_vec();
    hello.extend_from_slice(&nc);
    stream
        .write_all(&hello)
        .and_then(|()| stream.flush())
        .with_context(|| format!("sending the handshake to {daemon}"))?;
    let mut reply = [0u8; 72];
    stream
        .read_exact(&mut reply)
        .with_context(|| format!("reading the handshake of {daemon} (is it a ferry daemon?)"))?;
    if &reply[..8] != HELLO {
        bail!(
            "{daemon} is not a ferry daemon (it answered {:?})",
            String::from_utf8_lossy(&reply[..8])
        );
    }
    let nd: [u8; 32] = reply[8..40].try_into().expect("32 bytes");
    let proof: [u8; 32] = reply[40..].try_into().expect("32 bytes");
    if !same(&proof, &key.mac(&[b"daemon", &nc, &nd])) {
        bail!(
            "refused: the daemon at {daemon} does not hold this key (wrong --key-file?); nothing was sent"
        );
    }
    stream
        .write_all(&key.mac(&[b"client", &nc, &nd]))
        .and_then(|()| stream.flush())
        .with_context(|| format!("sending the key proof to {daemon}"))?;
    let mut verdict = [0u8; 8];
    stream
        .read_exact(&mut verdict)
        .with_context(|| format!("reading the verdict of {daemon}"))?;
    if &verdict != ACCEPTED {
        bail!("refused: the daemon at {daemon} did not accept this key");
    }
    Ok(session_keys(key, &nc, &nd).0)
}

/// The sending half of an authenticated stream.
pub struct MacWriter<W: Write> {
    inner: W,
    key: [u8; 32],
    counter: u64,
    buf: Vec<u8>,
}

impl<W: Write> MacWriter<W> {
    pub fn new(inner: W, keys: &SessionKeys) -> MacWriter<W> {
        MacWriter {
            inner,
            key: keys.send,
            counter: 0,
            buf: Vec::with_capacity(FRAME_TARGET),
        }
    }

    fn send_frame(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let len = (self.buf.len() as u32).to_le_bytes();
        let tag = frame_tag(&self.key, self.counter, &len, &self.buf);
        self.counter += 1;
        self.inner.write_all(&len)?;
        self.inner.write_all(&self.buf)?;
        self.inner.write_all(&tag)?;
        self.buf.clear();
        Ok(())
    }
}

fn frame_tag(key: &[u8; 32], counter: u64, len: &[u8; 4], payload: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(&counter.to_le_bytes());
    h.update(len);
    h.update(payload);
    *h.finalize().as_bytes()
}

impl<W: Write> Write for MacWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(FRAME_TARGET - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == FRAME_TARGET {
            self.send_frame()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_frame()?;
        self.inner.flush()
    }
}

/// The receiving half of an authenticated stream: yields a frame's bytes
/// only once its tag has been checked.
pub struct MacReader<R: Read> {
    inner: R,
    key: [u8; 32],
    counter: u64,
    frame: Vec<u8>,
    at: usize,
}

impl<R: Read> MacReader<R> {
    pub fn new(inner: R, keys: &SessionKeys) -> MacReader<R> {
        MacReader {
            inner,
            key: keys.receive,
            counter: 0,
            frame: Vec::new(),
            at: 0,
        }
    }

    /// Reads the next frame; `false` at a clean end of the stream.
    fn next_frame(&mut self) -> io::Result<bool> {
        let mut len = [0u8; 4];
        match self.inner.read(&mut len[..1])? {
            0 => return Ok(false),
            _ => self.inner.read_exact(&mut len[1..])?,
        }
        let n = u32::from_le_bytes(len) as usize;
        if n == 0 || n > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("an authenticated frame of {n} bytes (at most {MAX_FRAME})"),
            ));
        }
        self.frame.resize(n, 0);
        self.inner.read_exact(&mut self.frame)?;
        let mut tag = [0u8; TAG_LEN];
        self.inner.read_exact(&mut tag)?;
        if !same(&tag, &frame_tag(&self.key, self.counter, &len, &self.frame)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a frame failed authentication (changed, replayed or out of order)",
            ));
        }
        self.counter += 1;
        self.at = 0;
        Ok(true)
    }
}

impl<R: Read> Read for MacReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.at == self.frame.len() && !self.next_frame()? {
            return Ok(0);
        }
        let n = out.len().min(self.frame.len() - self.at);
        out[..n].copy_from_slice(&self.frame[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> Key {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, text).unwrap();
        Key::from_file(&p).unwrap()
    }

    fn pair() -> (SessionKeys, SessionKeys) {
        session_keys(&key("0123456789abcdef0123"), &[1; 32], &[2; 32])
    }

    #[test]
    fn frames_round_trip_and_any_change_is_refused() {
        let (client, daemon) = pair();
        let mut wire = Vec::new();
        let mut w = MacWriter::new(&mut wire, &client);
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        w.write_all(&data).unwrap();
        w.flush().unwrap();
        let mut got = Vec::new();
        MacReader::new(&wire[..], &daemon)
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got, data);
        for pos in [0, 3, 4, 100, wire.len() / 2, wire.len() - 1] {
            let mut bad = wire.clone();
            bad[pos] ^= 1;
            let mut out = Vec::new();
            assert!(
                MacReader::new(&bad[..], &daemon)
                    .read_to_end(&mut out)
                    .is_err(),
                "byte {pos} flipped was accepted"
            );
        }
        // The client's own frames do not authenticate as the daemon's.
        let mut out = Vec::new();
        assert!(
            MacReader::new(&wire[..], &client)
                .read_to_end(&mut out)
                .is_err()
        );
    }

    #[test]
    fn a_dropped_frame_is_refused() {
        let (client, daemon) = pair();
        let mut w = MacWriter::new(Vec::new(), &client);
        w.write_all(b"first").unwrap();
        w.flush().unwrap();
        let first_len = w.inner.len();
        w.write_all(b"second").unwrap();
        w.flush().unwrap();
        let wire = w.inner;
        let mut out = Vec::new();
        let err = MacReader::new(&wire[first_len..], &daemon)
            .read_to_end(&mut out)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn the_handshake_needs_the_same_key_on_both_ends() {
        use std::os::unix::net::UnixStream;
        for (client_key, daemon_key, ok) in [
            (
                "the right key, long enough",
                "the right key, long enough",
                true,
            ),
            (
                "a wrong key, long enough!!",
                "the right key, long enough",
                false,
            ),
        ] {
            let (mut c, mut d) = UnixStream::pair().unwrap();
            let dk = key(daemon_key);
            let daemon = std::thread::spawn(move || {
                let mut hello = [0u8; 40];
                d.read_exact(&mut hello).unwrap();
                let challenge = DaemonChallenge::new(&dk, &hello).unwrap().unwrap();
                d.write_all(&challenge.reply).unwrap();
                let mut proof = [0u8; 32];
                if d.read_exact(&mut proof).is_err() {
                    return None; // the client gave up on our proof
                }
                let (keys, verdict) = challenge.check(&proof);
                d.write_all(verdict).unwrap();
                keys
            });
            let client = client_handshake(&key(client_key), &mut c, "test");
            drop(c);
            let daemon = daemon.join().unwrap();
            assert_eq!(client.is_ok(), ok, "{:?}", client.err());
            assert_eq!(daemon.is_some(), ok);
            if let (Ok(c), Some(d)) = (client, daemon) {
                assert_eq!(c.send, d.receive);
                assert_eq!(c.receive, d.send);
            }
        }
    }
}
