//! Set-user-ID and set-group-ID bits are cleared exactly as natively when an
//! unprivileged user writes or truncates a file (ferry negotiates
//! FUSE_HANDLE_KILLPRIV_V2, so clearing them is the server's job), and kept
//! when root does.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use crate::util::{PYTHON, TestMount, chmod};

/// (file, mode, group, how it is changed, who changes it)
const CASES: &[(&str, u32, u32, &str, u32)] = &[
    ("write", 0o6777, 0, "write", 65534),
    ("trunc-open", 0o6777, 0, "otrunc", 65534),
    ("truncate", 0o6777, 0, "truncate", 65534),
    ("sgid-no-gx-other-group", 0o2767, 0, "write", 65534),
    ("sgid-no-gx-own-group", 0o2767, 65534, "write", 65534),
    ("root-writes", 0o6777, 0, "write", 0),
];

const CHANGE_PY: &str = r#"
import os, sys
how, path = sys.argv[1], sys.argv[2]
if how == "write":
    fd = os.open(path, os.O_WRONLY); os.pwrite(fd, b"x", 0); os.close(fd)
elif how == "otrunc":
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC); os.close(fd)
elif how == "truncate":
    os.truncate(path, 1)
"#;

/// Makes every case's file under `dir`, changes it as its user, and returns
/// the resulting modes as seen through `dir`.
fn modes_after_changes(dir: &Path) -> Vec<(String, u32)> {
    use std::os::unix::fs::MetadataExt;
    for (name, mode, gid, how, uid) in CASES {
        let path = dir.join(name);
        std::fs::write(&path, b"data").expect("write file");
        std::os::unix::fs::chown(&path, None, Some(*gid)).expect("chgrp");
        chmod(&path, *mode);
        let out = Command::new(PYTHON)
            .args(["-c", CHANGE_PY, how])
            .arg(&path)
            .uid(*uid)
            .gid(*uid)
            .output()
            .expect("run python3");
        assert!(
            out.status.success(),
            "{name}: {how} as uid {uid} failed: {out:?}"
        );
    }
    CASES
        .iter()
        .map(|(name, ..)| {
            let mode = std::fs::metadata(dir.join(name)).expect("stat").mode() & 0o7777;
            (name.to_string(), mode)
        })
        .collect()
}

#[test]
fn set_id_bits_are_cleared_as_natively() {
    let native = crate::util::open_tempdir();
    chmod(native.path(), 0o755);
    let tm = TestMount::new();
    let expected = modes_after_changes(native.path());
    // The cases differ natively, or the test would prove nothing.
    assert!(expected.iter().any(|(_, m)| m & 0o6000 == 0));
    assert!(expected.iter().any(|(_, m)| m & 0o6000 != 0));
    assert_eq!(
        modes_after_changes(&tm.mnt),
        expected,
        "modes through the mount"
    );
    let in_source: Vec<_> = CASES
        .iter()
        .map(|(name, ..)| {
            use std::os::unix::fs::MetadataExt;
            (
                name.to_string(),
                std::fs::metadata(tm.source.join(name))
                    .expect("stat")
                    .mode()
                    & 0o7777,
            )
        })
        .collect();
    assert_eq!(in_source, expected, "modes in SOURCE");
    // Each clearing is journaled as a mode change.
    let cleared: Vec<_> = tm
        .log(false)
        .into_iter()
        .filter(|r| {
            r["op"] == "setattr" && r["mode"].as_str().is_some_and(|m| m == "777" || m == "767")
        })
        .collect();
    assert!(cleared.len() >= 4, "mode changes journaled: {cleared:?}");
}
