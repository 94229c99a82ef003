//! Where a mount keeps its journal, and the rules for that place.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

const DEFAULT_ROOT: &str = "/var/lib/ferry";

/// The default state directory of a source: one per source path, outside
/// any tree ferry serves.
pub fn default_for(source: &Path) -> PathBuf {
    let mut name = String::new();
    for b in source.as_os_str().as_encoded_bytes() {
        match b {
            b'/' => name.push_str("%2F"),
            b'%' => name.push_str("%25"),
            c if c.is_ascii_graphic() => name.push(*c as char),
            c => name.push_str(&format!("%{c:02X}")),
        }
    }
    Path::new(DEFAULT_ROOT).join(name)
}

/// `path` made absolute with symlinks resolved, for a path that may not exist
/// yet (its nearest existing ancestor is resolved, the rest appended).
pub fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    let abs = std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    loop {
        match std::fs::canonicalize(existing) {
            Ok(real) => {
                let mut out = real;
                for part in rest.iter().rev() {
                    out.push(part);
                }
                return Ok(out);
            }
            Err(_) => match (existing.parent(), existing.file_name()) {
                (Some(parent), Some(name)) => {
                    rest.push(name.to_owned());
                    existing = parent;
                }
                _ => return Ok(abs),
            },
        }
    }
}

/// Refuses a state directory inside the tree it journals (or the mount):
/// the journal would record its own writes, and a replica would carry it.
pub fn check_outside(state: &Path, source: &Path, mountpoint: &Path) -> anyhow::Result<()> {
    for (tree, what) in [(source, "SOURCE"), (mountpoint, "MOUNTPOINT")] {
        if state.starts_with(tree) {
            bail!(
                "state directory {} is inside {what} {}: choose one outside it with --state",
                state.display(),
                tree.display()
            );
        }
        if tree.starts_with(state) {
            bail!(
                "{what} {} is inside the state directory {}: choose another --state",
                tree.display(),
                state.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_distinct_per_source() {
        assert_ne!(
            default_for(Path::new("/a/b")),
            default_for(Path::new("/a_b"))
        );
        assert_ne!(
            default_for(Path::new("/a/b")),
            default_for(Path::new("/a%2Fb"))
        );
        assert!(default_for(Path::new("/home/u")).starts_with(DEFAULT_ROOT));
    }

    #[test]
    fn state_inside_either_tree_is_refused() {
        let (s, m) = (Path::new("/src"), Path::new("/mnt"));
        assert!(check_outside(Path::new("/src/.ferry"), s, m).is_err());
        assert!(check_outside(Path::new("/mnt/x"), s, m).is_err());
        assert!(check_outside(Path::new("/"), s, m).is_err());
        assert!(check_outside(Path::new("/var/lib/ferry/x"), s, m).is_ok());
    }
}
