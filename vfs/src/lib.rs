//! FUSE filesystems of ferry: the journaling passthrough mount over a source
//! directory.
//!
//! `fs` holds the filesystem logic as plain Rust; `fuse` is the only module
//! that sees fuser's callback and reply types; `mount` mounts and unmounts.

mod fs;
mod fuse;
mod handles;
mod inode;
mod mount;
mod open;
mod statahead;
mod sys;

pub use fs::{Caller, DirItem, Entry, FsResult, JournalingFs, Opened, SetAttr, SetTime};
pub use mount::{MountConfig, Mounted, mount};
pub use open::{BackingToken, IoPath};
