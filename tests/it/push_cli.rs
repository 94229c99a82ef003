//! `ferry push`: the command's refusals, the mount's control socket, and
//! (once the push engine is in) a push through the socket and offline.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::Value;

use crate::util::{Output, TestMount, assert_one_line_error, ferry};

fn push_via_mount(tm: &TestMount, replica: &Path, extra: &[&str]) -> Output {
    let mut args = vec![OsStr::new("push"), tm.mnt.as_os_str(), replica.as_os_str()];
    args.extend(extra.iter().map(OsStr::new));
    ferry(args)
}

fn push_offline(tm: &TestMount, replica: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        OsStr::new("push"),
        OsStr::new("--state"),
        tm.state.as_os_str(),
        OsStr::new("--source"),
        tm.source.as_os_str(),
        replica.as_os_str(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    ferry(args)
}

fn assert_error_mentions(out: &Output, what: &str, needles: &[&str]) {
    assert_one_line_error(out, what);
    for n in needles {
        assert!(
            out.stderr.contains(n),
            "{what}: the error should mention {n:?}: {out:#?}"
        );
    }
}

/// One request on the control socket; every reply line.
fn control_exchange(tm: &TestMount, request: &[u8]) -> Vec<Value> {
    let mut s = UnixStream::connect(tm.state.join("control.sock")).expect("connect control.sock");
    s.write_all(request).expect("send the request");
    BufReader::new(s)
        .lines()
        .map(|l| {
            let l = l.expect("read a reply line");
            serde_json::from_str(&l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"))
        })
        .collect()
}

/// The mount still serves files and answers `ferry status`.
fn assert_mount_works(tm: &TestMount) {
    let f = tm.mnt.join("still-alive");
    std::fs::write(&f, b"yes").expect("write through the mount");
    assert_eq!(std::fs::read(&f).expect("read back"), b"yes");
    assert_eq!(tm.status()["mounted"], true);
}

#[test]
fn a_missing_replica_is_named() {
    let tm = TestMount::new();
    let missing = tm.path("no-such-replica");
    let out = push_via_mount(&tm, &missing, &[]);
    assert_error_mentions(
        &out,
        "missing replica",
        &["no-such-replica", "does not exist"],
    );
    let out = push_offline(&tm, &missing, &["--json"]);
    assert_error_mentions(&out, "missing replica (offline)", &["no-such-replica"]);
    assert!(out.stdout.is_empty(), "nothing on stdout: {out:#?}");
    let file = tm.path("a-file");
    std::fs::write(&file, b"x").unwrap();
    let out = push_via_mount(&tm, &file, &[]);
    assert_error_mentions(&out, "replica is a file", &["a-file", "not a directory"]);
}

#[test]
fn replicas_overlapping_the_source_mountpoint_or_state_are_refused() {
    let tm = TestMount::new();
    std::fs::create_dir(tm.mnt.join("sub")).unwrap();
    let cases = [
        (tm.source.join("sub"), "inside SOURCE"),
        (tm.mnt.join("sub"), "inside MOUNTPOINT"),
        (tm.source.clone(), "inside SOURCE"),
        (tm.state.clone(), "inside the state directory"),
        (tm.path(""), "contains SOURCE"),
    ];
    for (replica, why) in &cases {
        let out = push_via_mount(&tm, replica, &[]);
        assert_error_mentions(&out, why, &[why, "replicate into itself"]);
    }
    assert_mount_works(&tm);
    tm.umount();
    // The same rules offline.
    for (replica, why) in &cases {
        if replica.starts_with(&tm.mnt) {
            continue; // not a mount any more
        }
        let out = push_offline(&tm, replica, &[]);
        assert_error_mentions(&out, why, &[why]);
    }
}

#[test]
fn the_state_of_a_live_mount_is_refused_naming_the_mount() {
    let tm = TestMount::new();
    let replica = tm.path("replica");
    std::fs::create_dir(&replica).unwrap();
    let out = push_offline(&tm, &replica, &[]);
    assert_error_mentions(
        &out,
        "--state of a live mount",
        &["in use", &tm.mnt.to_string_lossy()],
    );
    assert_mount_works(&tm);
    assert_eq!(
        std::fs::read_dir(&replica).unwrap().count(),
        0,
        "the replica was not touched"
    );
}

#[test]
fn a_state_directory_without_a_journal_is_refused() {
    let tm = TestMount::unmounted();
    std::fs::create_dir(&tm.state).unwrap();
    let replica = tm.path("replica");
    std::fs::create_dir(&replica).unwrap();
    let out = push_offline(&tm, &replica, &[]);
    assert_error_mentions(&out, "no journal", &["not a ferry state directory"]);
    assert_eq!(
        std::fs::read_dir(&tm.state).unwrap().count(),
        0,
        "nothing was created in the state directory"
    );
}

#[test]
fn a_mountpoint_that_is_not_a_ferry_mount_is_refused() {
    let tm = TestMount::unmounted();
    let replica = tm.path("replica");
    std::fs::create_dir(&replica).unwrap();
    let out = ferry([OsStr::new("push"), tm.mnt.as_os_str(), replica.as_os_str()]);
    assert_error_mentions(&out, "plain directory", &["is not mounted"]);
    let out = ferry([OsStr::new("push"), OsStr::new("/proc"), replica.as_os_str()]);
    assert_error_mentions(&out, "/proc", &["/proc is not a ferry mount"]);
}

#[test]
fn a_mount_without_a_control_socket_is_reported_as_not_answering() {
    let tm = TestMount::new();
    let replica = tm.path("replica");
    std::fs::create_dir(&replica).unwrap();
    // As a mount started by a ferry without the socket would be.
    std::fs::remove_file(tm.state.join("control.sock")).unwrap();
    let out = push_via_mount(&tm, &replica, &[]);
    assert_error_mentions(&out, "no socket", &["does not answer", "control.sock"]);
}

#[test]
fn the_control_socket_answers_garbage_with_an_error_and_the_mount_goes_on() {
    let tm = TestMount::new();
    let socket = tm.state.join("control.sock");
    {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let md = std::fs::metadata(&socket).expect("the mount has a control socket");
        assert!(md.file_type().is_socket());
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
    }
    for garbage in [&b"garbage\n"[..], b"{\"push\":42}\n", b"{\"unmount\":{}}\n"] {
        let replies = control_exchange(&tm, garbage);
        assert_eq!(replies.len(), 1, "one reply: {replies:?}");
        assert!(
            replies[0]["error"].as_str().is_some_and(|m| !m.is_empty()),
            "an error reply: {replies:?}"
        );
    }
    // A well-formed request whose replica is refused.
    let req = format!(
        "{{\"push\":{{\"replica\":{}}}}}\n",
        serde_json::to_string(&tm.source.join("x")).unwrap()
    );
    let replies = control_exchange(&tm, req.as_bytes());
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert!(replies[0]["error"].is_string(), "{replies:?}");
    // A client that leaves right after its request.
    let replica = tm.path("replica");
    std::fs::create_dir(&replica).unwrap();
    let mut s = UnixStream::connect(&socket).unwrap();
    let req = format!(
        "{{\"push\":{{\"replica\":{},\"options\":{{\"dry_run\":true}}}}}}\n",
        serde_json::to_string(&replica).unwrap()
    );
    s.write_all(req.as_bytes()).unwrap();
    drop(s);
    // A client that connects and says nothing.
    drop(UnixStream::connect(&socket).unwrap());
    assert_mount_works(&tm);
    tm.umount();
    assert!(!socket.exists(), "the socket is removed at a clean stop");
}

/// Progress lines come only to a client that asks for them (counting the
/// batch costs a stat of every file it sends).
#[test]
fn progress_is_reported_only_when_asked_for() {
    let tm = TestMount::with_source(|src| {
        for i in 0..5 {
            std::fs::write(src.join(format!("f{i}")), vec![1u8; 1000 * (i + 1)]).unwrap();
        }
    });
    let replica = tm.path("replica");
    std::fs::create_dir(&replica).unwrap();
    let dry_run = |progress: bool| {
        let req = format!(
            "{{\"push\":{{\"replica\":{},\"options\":{{\"dry_run\":true,\"progress\":{progress}}}}}}}\n",
            serde_json::to_string(&replica).unwrap()
        );
        let replies = control_exchange(&tm, req.as_bytes());
        let (done, progress): (Vec<_>, Vec<_>) =
            replies.into_iter().partition(|r| r.get("done").is_some());
        assert_eq!(done.len(), 1, "one report: {done:?}");
        progress
    };
    let silent = dry_run(false);
    assert!(silent.is_empty(), "progress nobody asked for: {silent:?}");
    let shown = dry_run(true);
    let last = &shown.last().expect("progress lines")["progress"];
    assert_eq!(last["files_total"], 5, "{shown:?}");
    assert_eq!(last["files_done"], 5, "{shown:?}");
    assert_eq!(last["bytes_total"], 15_000, "{shown:?}");
    assert_eq!(last["bytes_done"], 15_000, "{shown:?}");
}

/// Needs the push engine (`replicator::push::push`).
#[test]
fn push_through_socket_and_offline() {
    let tm = TestMount::with_source(|src| {
        std::fs::create_dir(src.join("dir")).unwrap();
        std::fs::write(src.join("dir/a"), b"hello").unwrap();
        std::fs::write(src.join("b"), vec![7u8; 100_000]).unwrap();
    });
    let replica = tm.path("replica");
    std::fs::create_dir(&replica).unwrap();
    let parse_one = |out: &Output| -> Value {
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert_eq!(lines.len(), 1, "exactly one line on stdout: {out:#?}");
        let v: Value =
            serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("not JSON ({e}): {out:#?}"));
        for f in crate::util::PUSH_REPORT_FIELDS {
            assert!(v[f].is_u64(), "field {f} missing in {v}");
        }
        v
    };

    let out = push_via_mount(&tm, &replica, &["--json"]).expect_ok("seed push through the mount");
    let seed = parse_one(&out);
    assert_eq!(seed["from_seq"], 0);
    assert!(seed["files_created"].as_u64().unwrap() >= 3, "{seed}");
    let verify = ferry([
        OsStr::new("verify"),
        tm.source.as_os_str(),
        replica.as_os_str(),
    ]);
    assert!(verify.ok(), "the replica equals the source: {verify:#?}");

    std::fs::write(tm.mnt.join("dir/a"), b"changed").unwrap();
    std::fs::rename(tm.mnt.join("b"), tm.mnt.join("dir/b")).unwrap();
    tm.umount();

    let out = push_offline(&tm, &replica, &["--json"]).expect_ok("offline push");
    let second = parse_one(&out);
    assert_eq!(second["from_seq"], seed["to_seq"], "{second}");
    assert!(second["renames"].as_u64().unwrap() >= 1, "{second}");
    let verify = ferry([
        OsStr::new("verify"),
        tm.source.as_os_str(),
        replica.as_os_str(),
    ]);
    assert!(verify.ok(), "the replica equals the source: {verify:#?}");

    // The human forms.
    let out = push_offline(&tm, &replica, &[]).expect_ok("push with nothing to do");
    assert_eq!(out.stdout.lines().count(), 1, "{out:#?}");
    let out = push_offline(&tm, &replica, &["--stats"]).expect_ok("push --stats");
    assert!(out.stdout.lines().count() > 10, "{out:#?}");
}
