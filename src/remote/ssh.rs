//! Running `ferry receive` on another host through the system's ssh
//! client, as rsync does: ssh reads `~/.ssh/config`, asks for passwords
//! on the terminal and prints its own errors on stderr; ferry speaks the
//! protocol over the child's stdin and stdout.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;

use anyhow::{Context, bail};

/// Splits a command line into words as a shell would for plain words,
/// single and double quotes and backslashes (no variables, no globs):
/// `--ssh-command "ssh -p 2222 -i '/my keys/id'"`.
pub fn split_words(line: &str) -> anyhow::Result<Vec<String>> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => bail!("unterminated ' in {line:?}"),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => w.push(c),
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => bail!("unterminated \" in {line:?}"),
                        },
                        Some(c) => w.push(c),
                        None => bail!("unterminated \" in {line:?}"),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(c) => word.get_or_insert_with(String::new).push(c),
                None => bail!("a trailing \\ in {line:?}"),
            },
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Ok(words)
}

/// `word` quoted for a POSIX shell (the remote end runs the command
/// through the user's shell).
pub fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@%".contains(&b));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// A running `ssh HOST ferry receive PATH`.
pub struct SshReceiver {
    pub process: SshProcess,
    /// Our end of ssh's stdin.
    pub to_ssh: UnixStream,
    /// Our end of ssh's stdout.
    pub from_ssh: UnixStream,
}

/// The ssh process, and the thread that copies its stderr to ours until
/// ssh closes it.
pub struct SshProcess {
    child: Child,
    stderr: JoinHandle<()>,
}

impl SshProcess {
    /// Waits for ssh to end (once the stream is closed it does) and for its
    /// last messages to be copied.
    pub fn wait(mut self) -> std::io::Result<ExitStatus> {
        let status = self.child.wait();
        let _ = self.stderr.join();
        status
    }

    /// Leaves ssh running: a live mount keeps its connection for the next
    /// push. Once this process is gone, ssh is reaped by init.
    pub fn leave(self) {}
}

/// Starts `ssh_command host ferry_path receive path`.
///
/// ssh's stderr reaches ours through a pipe and a thread, not directly: a
/// connection a live mount keeps after the push outlives this process, and
/// an ssh holding our stderr would keep whoever reads it (a script's
/// `$(...)`, a test) waiting until the connection closes.
///
/// ssh's stdin and stdout are socket pairs, not pipes, as rsync gives them:
/// a pipe wakes its writer for every page ssh reads (ssh reads 16 KiB at a
/// time), so a seed through a pipe spends its time switching between the
/// sender and ssh; a socket's writer sleeps until most of its buffer has
/// drained.
pub fn spawn(
    ssh_command: &str,
    host: &str,
    ferry_path: &str,
    path: &str,
) -> anyhow::Result<SshReceiver> {
    let mut words = split_words(ssh_command).context("--ssh-command")?;
    if words.is_empty() {
        bail!("--ssh-command is empty");
    }
    let program = words.remove(0);
    let remote = format!("{} receive {}", shell_quote(ferry_path), shell_quote(path));
    let (to_ssh, ssh_stdin) = UnixStream::pair().context("making a socket pair for ssh")?;
    let (from_ssh, ssh_stdout) = UnixStream::pair().context("making a socket pair for ssh")?;
    // A stream socket's writer may have this much in flight (capped by
    // net.core.wmem_max; best effort).
    for writer in [&to_ssh, &ssh_stdout] {
        let _ = nix::sys::socket::setsockopt(writer, nix::sys::socket::sockopt::SndBuf, &(1 << 20));
    }
    let mut child = Command::new(&program)
        .args(&words)
        .arg(host)
        .arg(remote)
        .stdin(Stdio::from(OwnedFd::from(ssh_stdin)))
        .stdout(Stdio::from(OwnedFd::from(ssh_stdout)))
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    let mut from_stderr = child.stderr.take().expect("piped");
    let stderr = std::thread::Builder::new()
        .name("ssh-stderr".into())
        .spawn(move || {
            let _ = std::io::copy(&mut from_stderr, &mut std::io::stderr());
        })
        .context("starting a thread for ssh's messages")?;
    Ok(SshReceiver {
        process: SshProcess { child, stderr },
        to_ssh,
        from_ssh,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_as_a_shell_splits_them() {
        assert_eq!(
            split_words(r#"ssh -p 22 -i '/my keys/id' -o "A=b c" x\ y"#).unwrap(),
            ["ssh", "-p", "22", "-i", "/my keys/id", "-o", "A=b c", "x y"]
        );
        assert_eq!(split_words("  ").unwrap(), Vec::<String>::new());
        assert_eq!(split_words("a''").unwrap(), ["a"]);
        assert!(split_words("ssh 'open").is_err());
    }

    #[test]
    fn quoting_survives_a_shell() {
        for word in ["/plain/path", "with space", "it's", "", "$HOME;rm -rf /"] {
            let out = Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s {}", shell_quote(word)))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap(), word);
        }
    }
}
