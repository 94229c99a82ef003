//! [`RelPath`]: a path beneath the replica root that cannot name anything
//! outside it.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

use super::limits::{MAX_COMPONENT_LEN, MAX_PATH_LEN};
use super::wire::reject;

/// A relative path as a list of components.
///
/// Invariant (enforced by every constructor and by deserialization): each
/// component is non-empty, at most 255 bytes, contains neither `/` nor NUL,
/// and is neither `.` nor `..`; joined with `/` the path is at most 4096
/// bytes. Such a path can never be absolute nor climb out of the directory
/// it is resolved in (symlinks along the way are the resolver's business).
/// The empty path names the replica root itself; operations that create or
/// remove something refuse it.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelPath {
    components: Vec<Vec<u8>>,
}

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("empty path component")]
    EmptyComponent,
    #[error("path component \".\" or \"..\"")]
    DotComponent,
    #[error("path component contains '/'")]
    Slash,
    #[error("path component contains a NUL byte")]
    Nul,
    #[error("path component of {0} bytes (at most {MAX_COMPONENT_LEN})")]
    ComponentTooLong(usize),
    #[error("path longer than {MAX_PATH_LEN} bytes")]
    TooLong,
    #[error("absolute path")]
    Absolute,
    #[error("the replica root itself")]
    Root,
}

fn check_component(c: &[u8]) -> Result<(), PathError> {
    if c.is_empty() {
        return Err(PathError::EmptyComponent);
    }
    if c == b"." || c == b".." {
        return Err(PathError::DotComponent);
    }
    if c.len() > MAX_COMPONENT_LEN {
        return Err(PathError::ComponentTooLong(c.len()));
    }
    if c.contains(&b'/') {
        return Err(PathError::Slash);
    }
    if c.contains(&0) {
        return Err(PathError::Nul);
    }
    Ok(())
}

impl RelPath {
    /// The replica root.
    pub fn root() -> RelPath {
        RelPath::default()
    }

    /// A path from its components, each checked.
    pub fn from_components<I, C>(components: I) -> Result<RelPath, PathError>
    where
        I: IntoIterator<Item = C>,
        C: Into<Vec<u8>>,
    {
        let mut path = RelPath::root();
        for c in components {
            path.push(c.into())?;
        }
        Ok(path)
    }

    /// Parses `a/b/c`. The empty string is the root; a leading `/`, an
    /// empty component (`a//b`, a trailing `/`), `.` and `..` are refused.
    pub fn parse(bytes: &[u8]) -> Result<RelPath, PathError> {
        if bytes.is_empty() {
            return Ok(RelPath::root());
        }
        if bytes[0] == b'/' {
            return Err(PathError::Absolute);
        }
        RelPath::from_components(bytes.split(|&b| b == b'/'))
    }

    /// Appends one component, checking it and the resulting length.
    pub fn push(&mut self, component: Vec<u8>) -> Result<(), PathError> {
        check_component(&component)?;
        let sep = usize::from(!self.components.is_empty());
        if self.byte_len() + sep + component.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong);
        }
        self.components.push(component);
        Ok(())
    }

    /// This path with one more component.
    pub fn join(&self, component: impl Into<Vec<u8>>) -> Result<RelPath, PathError> {
        let mut p = self.clone();
        p.push(component.into())?;
        Ok(p)
    }

    /// Whether this is the replica root (no components).
    pub fn is_root(&self) -> bool {
        self.components.is_empty()
    }

    /// The components, outermost first.
    pub fn components(&self) -> impl ExactSizeIterator<Item = &[u8]> {
        self.components.iter().map(Vec::as_slice)
    }

    /// The parent directory; `None` for the root.
    pub fn parent(&self) -> Option<RelPath> {
        let (_, rest) = self.components.split_last()?;
        Some(RelPath {
            components: rest.to_vec(),
        })
    }

    /// The last component; `None` for the root.
    pub fn file_name(&self) -> Option<&[u8]> {
        self.components.last().map(Vec::as_slice)
    }

    /// The components joined with `/` (empty for the root).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.components.join(&b'/')
    }

    /// The path as a relative `PathBuf` (empty for the root).
    pub fn to_path_buf(&self) -> PathBuf {
        PathBuf::from(OsStr::from_bytes(&self.to_bytes()))
    }

    /// Length of [`to_bytes`](Self::to_bytes).
    pub fn byte_len(&self) -> usize {
        let n = self.components.len();
        self.components.iter().map(Vec::len).sum::<usize>() + n.saturating_sub(1)
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_root() {
            return f.write_str(".");
        }
        write!(f, "{}", String::from_utf8_lossy(&self.to_bytes()))
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelPath({:?})", self.to_string())
    }
}

impl Serialize for RelPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.components.len()))?;
        for c in &self.components {
            seq.serialize_element(serde_bytes::Bytes::new(c))?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for RelPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RelPath, D::Error> {
        struct PathVisitor;

        impl<'de> Visitor<'de> for PathVisitor {
            type Value = RelPath;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sequence of path components")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RelPath, A::Error> {
                // Every component takes at least one byte and a separator,
                // so a longer declared count cannot be a valid path.
                if let Some(n) = seq.size_hint()
                    && n > MAX_PATH_LEN.div_ceil(2)
                {
                    return Err(reject(PathError::TooLong));
                }
                let mut path = RelPath::root();
                while let Some(c) = seq.next_element::<serde_bytes::ByteBuf>()? {
                    path.push(c.into_vec()).map_err(reject)?;
                }
                Ok(path)
            }
        }

        d.deserialize_seq(PathVisitor)
    }
}
