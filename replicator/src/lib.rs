//! Replication: comparing trees, the batch format, and (in progress) planning
//! batches from the journal and applying them on a replica.

pub mod apply;
pub mod batch;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz_scene;
pub mod push;
pub mod remote;
pub mod tree;
pub mod verify;
