//! The command's side of remote replicas: ssh as a transport, the daemon
//! (`ferry serve`), and the daemon's authentication. The protocol spoken
//! over them is `replicator::remote`.

pub mod auth;
pub mod serve;
pub mod ssh;
