//! Refused mounts: a clear one-line error, a non-zero exit, nothing mounted,
//! nothing left behind (the state directory is not created).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use crate::util::{
    Output, TestMount, assert_one_line_error, ferry_bin, ferry_cmd, is_mountpoint, mount_args,
    mounts_at, run,
};

fn mount(source: &Path, mnt: &Path, state: &Path) -> Output {
    run(&mut ferry_cmd(mount_args(source, mnt, state)))
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The refusal contract, for a mount of `mnt` that must not have happened
/// and a state directory that must not have been made.
fn assert_refused(out: &Output, what: &str, mnt: &Path, state: &Path) {
    assert_one_line_error(out, what);
    assert!(
        !is_mountpoint(mnt),
        "{what}: {} got mounted: {:?}",
        mnt.display(),
        mounts_at(mnt)
    );
    assert!(
        !state.exists(),
        "{what}: the state directory {} was created",
        state.display()
    );
    assert_eq!(
        entries(mnt),
        Vec::<String>::new(),
        "{what}: the mountpoint gained entries"
    );
}

#[test]
fn missing_source_is_refused() {
    let tm = TestMount::unmounted();
    let out = mount(&tm.path("no-such-dir"), &tm.mnt, &tm.state);
    assert_refused(&out, "missing SOURCE", &tm.mnt, &tm.state);
    assert!(
        out.stderr.contains("no-such-dir"),
        "the error should name SOURCE: {out:?}"
    );
}

#[test]
fn source_that_is_a_file_is_refused() {
    let tm = TestMount::unmounted();
    let file = tm.path("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let out = mount(&file, &tm.mnt, &tm.state);
    assert_refused(&out, "SOURCE is a file", &tm.mnt, &tm.state);
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}

#[test]
fn mountpoint_already_mounted_is_refused() {
    let tm = TestMount::new();
    let (src2, state2) = (tm.path("source2"), tm.path("state2"));
    std::fs::create_dir(&src2).unwrap();
    let out = mount(&src2, &tm.mnt, &state2);
    assert_one_line_error(&out, "MOUNTPOINT in use");
    assert_eq!(
        mounts_at(&tm.mnt).len(),
        1,
        "a second mount was stacked on {}",
        tm.mnt.display()
    );
    assert!(
        !state2.exists(),
        "the state directory of the refused mount was created"
    );
    // The first mount is untouched and still serves its source.
    std::fs::write(tm.mnt.join("still-works"), b"yes").unwrap();
    assert_eq!(
        std::fs::read(tm.source.join("still-works")).unwrap(),
        b"yes"
    );
    assert_eq!(entries(&src2), Vec::<String>::new());
}

#[test]
fn state_inside_source_is_refused() {
    let tm = TestMount::unmounted();
    std::fs::write(tm.source.join("keep"), b"k").unwrap();
    let state = tm.source.join(".ferry-state");
    let out = mount(&tm.source, &tm.mnt, &state);
    assert_refused(&out, "--state inside SOURCE", &tm.mnt, &state);
    assert_eq!(entries(&tm.source), vec!["keep".to_string()]);
}

#[test]
fn state_inside_mountpoint_is_refused() {
    let tm = TestMount::unmounted();
    let state = tm.mnt.join("state");
    let out = mount(&tm.source, &tm.mnt, &state);
    assert_refused(&out, "--state inside MOUNTPOINT", &tm.mnt, &state);
}

#[test]
fn second_mount_of_a_live_state_dir_is_refused() {
    let tm = TestMount::new();
    let (src2, mnt2) = (tm.path("source2"), tm.path("mnt2"));
    std::fs::create_dir(&src2).unwrap();
    std::fs::create_dir(&mnt2).unwrap();
    let before = entries(&tm.state);
    let out = mount(&src2, &mnt2, &tm.state);
    assert_one_line_error(&out, "state dir in use");
    assert!(
        !is_mountpoint(&mnt2),
        "the second mount of one state dir happened"
    );
    assert_eq!(
        entries(&tm.state),
        before,
        "the refused mount changed the state dir"
    );
    assert_eq!(entries(&src2), Vec::<String>::new());
    // The live mount and its journal are intact.
    assert_eq!(tm.status()["mounted"], serde_json::Value::Bool(true));
    std::fs::write(tm.mnt.join("after"), b"1").unwrap();
    tm.umount();
    assert!(tm.log(false).iter().any(|r| r["op"] == "create"
        && r["path"].as_str().map(|p| p.trim_start_matches('/')) == Some("after")));
}

#[test]
fn missing_dev_fuse_is_refused() {
    let tm = TestMount::unmounted();
    // A private mount namespace where /dev is an empty tmpfs.
    let out = run(Command::new("timeout")
        .args([
            "--kill-after=5",
            "120",
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
        ])
        .arg(r#"mount -t tmpfs none /dev && exec "$0" mount "$1" "$2" --state "$3" --background"#)
        .arg(ferry_bin())
        .arg(&tm.source)
        .arg(&tm.mnt)
        .arg(&tm.state)
        .env_remove("FERRY_LOG"));
    assert_refused(&out, "no /dev/fuse", &tm.mnt, &tm.state);
    assert!(
        out.stderr.contains("/dev/fuse"),
        "the error should name /dev/fuse: {out:?}"
    );
}

#[test]
fn non_root_user_is_refused() {
    let tm = TestMount::unmounted();
    // Everything is reachable and writable for the user, so the refusal can
    // only be about privilege.
    crate::util::chmod(tm.root.path(), 0o777);
    crate::util::chmod(&tm.source, 0o777);
    crate::util::chmod(&tm.mnt, 0o777);
    let bin = tm.path("ferry");
    std::fs::copy(ferry_bin(), &bin).unwrap();
    crate::util::chmod(&bin, 0o755);
    let attempt = || {
        run(Command::new("timeout")
            .args(["--kill-after=5", "120"])
            .arg(&bin)
            .args(tm.mount_args())
            .uid(65534)
            .gid(65534)
            .env_remove("FERRY_LOG"))
    };
    // A test forking elsewhere in this process may hold the fresh copy's
    // write descriptor between its fork and exec, and exec then fails with
    // ETXTBSY: retry that, and only that.
    let mut out = attempt();
    for _ in 0..10 {
        if !out.stderr.contains("Text file busy") {
            break;
        }
        out = attempt();
    }
    assert_refused(&out, "non-root user", &tm.mnt, &tm.state);
    let text = out.stderr.to_lowercase();
    assert!(
        ["root", "privilege", "permission"]
            .iter()
            .any(|w| text.contains(w)),
        "the error should say that privilege is missing: {out:?}"
    );
}
