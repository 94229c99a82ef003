//! `ferry receive PATH`: the receiving end of a push over ssh. The
//! protocol runs on stdin and stdout; messages go to stderr, which ssh
//! shows the pushing user.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::cli::ReceiveArgs;

pub fn run(args: ReceiveArgs) -> anyhow::Result<()> {
    // Plain descriptors: the protocol buffers on its own, and stdout's
    // line buffering has no place in a binary stream.
    let stdin = File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let stdout = File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
    enlarge_pipe(&stdin);
    let path = args.path;
    let received = replicator::remote::receive(stdin, stdout, |_| replica_dir(&path))
        .with_context(|| format!("receiving into {}", path.display()))?;
    tracing::info!(?received, "received");
    Ok(())
}

/// sshd hands the command pipes of 64 KiB: it then wakes this process for
/// every few packets of a batch, and the transfer runs as fast as the two
/// take turns. A larger pipe (1 MiB, the default most a user may ask for)
/// lets sshd run ahead. Not a pipe, or a smaller limit: left as it is.
fn enlarge_pipe(input: &File) {
    let _ = nix::fcntl::fcntl(input, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
}

/// The replica directory, made if missing.
fn replica_dir(path: &Path) -> Result<PathBuf, String> {
    super::make_replica_dir(path)
        .map(|()| path.to_path_buf())
        .map_err(|e| format!("the replica directory {}: {e}", path.display()))
}
