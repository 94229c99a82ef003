//! ferry's integration tests: one binary that drives the real `ferry`
//! command and real FUSE mounts in unique temp directories. Needs root and
//! /dev/fuse.
//!
//! - `differential`: generated operation sequences on a mount and on a native
//!   directory give the same results, and the journal describes them;
//! - `crash`: kill -9 during writes, then recovery misses nothing;
//! - `bad_input`: refused mounts leave nothing behind;
//! - `mount`: life cycle, inode numbers, single-operation journal records;
//! - `verify`: `ferry verify` against trees copied by `rsync -aHAX`;
//! - `replication`: pushes converge, judged by `ferry verify` and rsync;
//! - `remote`: the same over ssh (a real sshd), to the daemon, through
//!   batch files, and across cut connections.

mod bad_input;
mod crash;
mod differential;
mod mount;
mod ops;
mod privileges;
mod push_cli;
mod remote;
mod replication;
mod util;
mod verify;
