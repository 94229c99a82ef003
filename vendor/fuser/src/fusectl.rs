//! Ending a FUSE connection from the server's side, through fusectl's
//! `abort` (`/sys/fs/fuse/connections/<id>/abort`): every request waiting
//! on the connection fails at once (ENOTCONN), and the session's readers of
//! `/dev/fuse` see it end, as after an unmount. For when the server can no
//! longer answer some requests and their callers would otherwise wait
//! forever.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Aborts connection `id` (see [`connection_at`]), mounting fusectl first
/// where the system has not.
pub fn abort_connection(id: u32) -> io::Result<()> {
    let dir = Path::new(FUSECTL);
    let empty = std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none());
    if empty {
        // An error shows in the write below.
        let _ = nix::mount::mount(
            Some("fusectl"),
            dir,
            Some("fusectl"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
    }
    std::fs::write(dir.join(id.to_string()).join("abort"), "1")
}

/// The connection id of the FUSE filesystem mounted at `mountpoint`, found
/// in `/proc/self/mountinfo`: a `stat` of the mountpoint from the server
/// would itself be a request to the connection. A detached mount is no
/// longer listed: ask before detaching.
pub(crate) fn connection_at(mountpoint: &Path) -> io::Result<u32> {
    // Bytes: a path that is not UTF-8 anywhere on the system must not hide
    // this mount.
    let mounts = std::fs::read("/proc/self/mountinfo")?;
    connection_in(&mounts, mountpoint).ok_or_else(|| {
        io::Error::other(format!(
            "no FUSE mount at {} in /proc/self/mountinfo",
            mountpoint.display()
        ))
    })
}

/// The connection id of the last FUSE mount at `mountpoint` in `mountinfo`
/// (proc(5)'s format: the device is field 3, the mount point field 5,
/// octal-escaped; the filesystem type follows ` - `). fusectl names a
/// connection by the kernel's internal encoding of its device number.
fn connection_in(mountinfo: &[u8], mountpoint: &Path) -> Option<u32> {
    mountinfo.split(|b| *b == b'\n').rev().find_map(|line| {
        let dash = line.windows(3).position(|w| w == b" - ")?;
        let (fields, after) = (&line[..dash], &line[dash + 3..]);
        let fields: Vec<&[u8]> = fields.split(|b| *b == b' ').collect();
        let fs_type = after.split(|b| *b == b' ').next()?;
        let is_fuse = fs_type == b"fuse" || fs_type.starts_with(b"fuse.");
        let here = unescape_octal(fields.get(4)?) == mountpoint.as_os_str().as_bytes();
        if !(is_fuse && here) {
            return None;
        }
        let device = std::str::from_utf8(fields.get(2)?).ok()?;
        let (major, minor) = device.split_once(':')?;
        let (major, minor) = (major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?);
        Some((major << 20) | minor)
    })
}

/// Undoes mountinfo's escapes (`\040` for a space, and so on).
fn unescape_octal(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let code = bytes
            .get(i + 1..i + 4)
            .filter(|_| bytes[i] == b'\\')
            .and_then(|digits| u8::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok());
        match code {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::connection_in;

    const MOUNTINFO: &str = "\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
36 22 0:41 / /sys/fs/fuse/connections rw,relatime shared:15 - fusectl fusectl rw
52 22 0:47 / /mnt/a\\040b rw,nosuid,nodev,relatime shared:30 - fuse.ferry /src rw,user_id=0
53 22 0:48 / /mnt/plain rw,relatime shared:31 - ext4 /dev/vdb rw
54 22 0:49 / /mnt/x rw,relatime shared:32 - fuse /src2 rw
55 54 0:50 / /mnt/x rw,relatime shared:33 - fuse.ferry /src3 rw
56 22 2:3 / /mnt/y rw,relatime shared:34 - fuse /src4 rw
";

    #[test]
    fn a_connection_is_the_device_of_the_fuse_mount_there() {
        assert_eq!(
            connection_in(MOUNTINFO.as_bytes(), Path::new("/mnt/a b")),
            Some(47)
        );
        // Mounted over: the last mount there is the one in use.
        assert_eq!(
            connection_in(MOUNTINFO.as_bytes(), Path::new("/mnt/x")),
            Some(50)
        );
        // The kernel's encoding: major above the 20 bits of the minor.
        assert_eq!(
            connection_in(MOUNTINFO.as_bytes(), Path::new("/mnt/y")),
            Some((2 << 20) | 3)
        );
    }

    #[test]
    fn a_path_that_is_not_utf8_is_matched_byte_for_byte() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let mut mountinfo = MOUNTINFO.as_bytes().to_vec();
        mountinfo.extend_from_slice(b"57 22 0:51 / /mnt/\xff rw,relatime - fuse /s rw\n");
        let odd = Path::new(OsStr::from_bytes(b"/mnt/\xff"));
        assert_eq!(connection_in(&mountinfo, odd), Some(51));
        assert_eq!(connection_in(&mountinfo, Path::new("/mnt/a b")), Some(47));
    }

    #[test]
    fn other_filesystems_and_other_places_are_no_connection() {
        assert_eq!(
            connection_in(MOUNTINFO.as_bytes(), Path::new("/mnt/plain")),
            None
        );
        assert_eq!(
            connection_in(MOUNTINFO.as_bytes(), Path::new("/mnt/a\\040b")),
            None
        );
        assert_eq!(connection_in(MOUNTINFO.as_bytes(), Path::new("/mnt")), None);
        assert_eq!(connection_in(b"garbage\n\n", Path::new("/")), None);
    }
}
