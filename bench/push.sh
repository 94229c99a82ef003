#!/usr/bin/env bash
# Pushes against rsync, measured side by side in one run (issues 3 and 4):
#   bench/push.sh [--files N] [--runs N] [--ssh]    (as root; several minutes; wants an idle machine)
# With --ssh both go through a real sshd on loopback: `rsync -e ssh` to
# root@127.0.0.1:DIR and `ferry push MNT root@127.0.0.1:DIR`.
# On a tree of N small files (default 100,000) plus a 1 GiB and a 100 MB file:
#   seed      first copy: `rsync -a` vs the first `ferry push`, each into a
#             freshly made filesystem, --runs times (default 3, the order
#             alternating); the medians are compared
#   edit      a 4 KiB write in the middle of the 1 GiB file and a 500-file
#             directory renamed: `rsync -a --no-whole-file --delete` vs `ferry push`
#   empty     `ferry push` with nothing to do
#   save      an editor's save (a new file with a small change renamed over the
#             100 MB file): bytes sent by each
# Prints a Markdown table (ratios: ferry / rsync) for docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
files=100000 over_ssh= runs=3
while [ $# -gt 0 ]; do
  case $1 in
    --files) files=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --ssh) over_ssh=1; shift ;;
    *) echo "usage: $0 [--files N] [--runs N] [--ssh]" >&2; exit 2 ;;
  esac
done
scripts/setup
cargo build --release -q
ferry=$PWD/target/release/ferry
work=$(mktemp -d /var/tmp/ferry-bench-push.XXXXXX)
src=$work/src mnt=$work/mnt
mkdir -p "$src" "$mnt"
sshd_pid=
cleanup() {
  "$ferry" umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
  [ -z "$sshd_pid" ] || kill "$sshd_pid" 2>/dev/null || true
  for fs in "$work"/fs-*; do
    umount "$fs" 2>/dev/null || umount -l "$fs" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

# Each tool's replica gets a freshly made ext4 of its own (an image on a
# loop device, direct I/O so that its pages are not cached twice): ext4
# allocates inodes slowly for minutes after a few hundred thousand files
# were deleted (`recently_deleted`), which made the seed's time depend on
# what ran before far more than on the tool.
fresh_fs() {
  local dir=$work/fs-$1 img=$work/$1.img dev
  ! mountpoint -q "$dir" || umount "$dir"
  rm -f "$img"
  truncate -s 8G "$img"
  mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$img"
  dev=$(losetup -f --show --direct-io=on "$img")
  mkdir -p "$dir" && mount "$dev" "$dir"
  losetup -d "$dev" # freed when unmounted
  mkdir "$dir/replica"
}
rep=$work/fs-ferry/replica rr=$work/fs-rsync/replica

# Where each tool writes: local directories, or the same through ssh.
rsync_to=$rr/ ferry_to=$rep ssh_args=() rsync_ssh=() how=local
if [ -n "$over_ssh" ]; then
  mkdir -p "$work/ssh" /run/sshd
  ssh-keygen -q -t ed25519 -N '' -f "$work/ssh/host"
  ssh-keygen -q -t ed25519 -N '' -f "$work/ssh/id"
  cp "$work/ssh/id.pub" "$work/ssh/authorized_keys"
  port=$(python3 -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])")
  /usr/sbin/sshd -D -p "$port" -o ListenAddress=127.0.0.1 -h "$work/ssh/host" \
    -o AuthorizedKeysFile="$work/ssh/authorized_keys" -o PermitRootLogin=prohibit-password \
    -o StrictModes=no -o PidFile=none -o UsePAM=no &
  sshd_pid=$!
  ssh_cmd="ssh -p $port -i $work/ssh/id -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR"
  for _ in $(seq 50); do $ssh_cmd root@127.0.0.1 true 2>/dev/null && break; sleep 0.2; done
  rsync_to=root@127.0.0.1:$rr/ ferry_to=root@127.0.0.1:$rep
  rsync_ssh=(-e "$ssh_cmd") ssh_args=(--ssh-command "$ssh_cmd" --ferry-path "$ferry")
  how="over ssh on loopback ($(ssh -V 2>&1 | cut -d, -f1), default cipher)"
fi

# Memory this VM's host has not backed yet costs a fault on first touch
# (pages the guest frees are handed back to the host after a moment):
# writing into the page cache then runs at a tenth of its speed, and
# whichever tool writes into fresh memory looks slow. Filling the page
# cache first with a file's clean pages (reclaimed as the run needs
# memory) puts every measurement in the same, steady state.
ballast=$(awk '/MemAvailable/ {print int($2 / 1024 / 1024) - 6}' /proc/meminfo)
if [ "$ballast" -gt 0 ]; then
  truncate -s "${ballast}G" "$work/ballast"
  cat "$work/ballast" > /dev/null
fi

python3 - "$src" "$files" <<'PY'
import os, sys, random
random.seed(7); root, n = sys.argv[1], int(sys.argv[2])
dirs = max(1, n // 500)
for d in range(dirs):
    for s in range(10):
        p = f"{root}/d{d:03d}/s{s}"; os.makedirs(p)
        for f in range(50):
            with open(f"{p}/f{f}", "wb") as fh: fh.write(os.urandom(random.randint(100, 8000)))
with open(f"{root}/big.img", "wb") as fh:
    for _ in range(1024): fh.write(os.urandom(1 << 20))
with open(f"{root}/doc.bin", "wb") as fh:
    for _ in range(100): fh.write(os.urandom(1 << 20))
PY
"$ferry" mount "$src" "$mnt" --state "$work/state" --background >/dev/null

settle() { sync; sleep 5; }
now() { date +%s.%N; }
elapsed() { python3 -c "print(f'{$2 - $1:.3f}')"; }
ratio() { python3 -c "print(f'{$1 / $2:.4f}')"; }
field() { python3 -c "import json,sys; print(json.load(open('$1'))['$2'])"; }
rsync_bytes() { python3 -c "
import re; t=open('$1').read()
g=lambda k: int(re.search(k+r': ([\d,]+)', t).group(1).replace(',',''))
print(g('Total bytes sent')+g('Total bytes received'))"; }
push() { local out=$1; shift; "$ferry" push "$mnt" "$ferry_to" "${ssh_args[@]}" "$@" --json > "$out"; }

# rsync leaves its copy in the page cache; ferry's seed ends with the
# replica durable (its commit protocol syncs the staged content). The time
# until rsync's copy is on disk too is measured beside it. Over ssh every
# seed but the last closes its connection (the next must pay ssh's setup
# as rsync does); the last one's is kept for the change set below.
seed_rsync() {
  fresh_fs rsync; settle
  local t0 t1 t1s; t0=$(now); rsync -a "${rsync_ssh[@]}" "$src"/ "$rsync_to"; t1=$(now); sync; t1s=$(now)
  seeds_rsync+=("$(elapsed "$t0" "$t1")"); seeds_rsync_sync+=("$(elapsed "$t0" "$t1s")")
}
seed_ferry() {
  fresh_fs ferry; settle
  local t0 t1; t0=$(now); push "$work/seed.json" "$@"; t1=$(now)
  seeds_ferry+=("$(elapsed "$t0" "$t1")")
}
seeds_rsync=() seeds_rsync_sync=() seeds_ferry=()
for run in $(seq "$runs"); do
  keep=(--keep-connection 0); [ "$run" -lt "$runs" ] || keep=()
  if [ $((run % 2)) = 1 ]; then seed_rsync; seed_ferry "${keep[@]}"; else seed_ferry "${keep[@]}"; seed_rsync; fi
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
seed_rsync=$(median "${seeds_rsync[@]}") seed_ferry=$(median "${seeds_ferry[@]}") seed_rsync_sync=$(median "${seeds_rsync_sync[@]}")

# A 4 KiB edit in the middle of the 1 GiB file and a 500-file directory
# renamed, pushed by each; `edit N [ferry options]` (N picks the offset and
# the directory).
edit() {
  local n=$1; shift
  python3 -c "
import os
f=open('$mnt/big.img','r+b'); f.seek((512+$n)*1024*1024+123); f.write(os.urandom(4096)); f.close()"
  mv "$mnt/d00$n" "$mnt/d00$n-renamed"
  settle; t0=$(now); rsync -a --no-whole-file --delete --stats "${rsync_ssh[@]}" "$src"/ "$rsync_to" > "$work/rs.edit$n"; t1=$(now)
  settle; t2=$(now); push "$work/edit$n.json" "$@"; t3=$(now)
  echo "$(elapsed "$t0" "$t1") $(elapsed "$t2" "$t3") $(rsync_bytes "$work/rs.edit$n") $(field "$work/edit$n.json" bytes_sent)"
}
out=$(edit 0); read -r edit_rsync edit_ferry edit_rbytes edit_fbytes <<< "$out"
# Again with a new connection for the push (over ssh, the first push's
# connection is kept by the mount and reused above).
out=$(edit 1 --keep-connection 0); read -r edit1_rsync edit1_ferry edit1_rbytes edit1_fbytes <<< "$out"

push "$work/empty.json"; empty_ms=$(field "$work/empty.json" elapsed_ms)

python3 -c "
import os
d=open('$mnt/doc.bin','rb').read(); d=d[:1000]+b'inserted'+d[1000:5000000]+os.urandom(100)+d[5000000:]
open('$mnt/.doc.bin.swp','wb').write(d); os.rename('$mnt/.doc.bin.swp','$mnt/doc.bin')"
rsync -a --no-whole-file --delete --stats "${rsync_ssh[@]}" "$src"/ "$rsync_to" > "$work/rs.save"
push "$work/save.json"
save_rbytes=$(rsync_bytes "$work/rs.save") save_fbytes=$(field "$work/save.json" bytes_sent)

"$ferry" verify "$src" "$rep" >/dev/null || { echo "bench: the replica differs from the source" >&2; exit 1; }

cat <<EOF
Machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(free -g | awk '/Mem:/{print $2}') GiB, kernel $(uname -r), source on $(df -T "$work" | awk 'NR==2{print $2}'); $files small files + 1 GiB + 100 MB; $how.

| measure | rsync | ferry | ferry / rsync | target |
|---|---|---|---|---|
| seed (s) | $seed_rsync | $seed_ferry | $(ratio "$seed_ferry" "$seed_rsync") | ≤ 1 |
| seed, rsync then sync (s) | $seed_rsync_sync | $seed_ferry | $(ratio "$seed_ferry" "$seed_rsync_sync") | |
| 4 KiB edit + 500-file dir rename (s) | $edit_rsync | $edit_ferry | $(ratio "$edit_ferry" "$edit_rsync") | ≤ 0.05 (local), ≤ 0.1 (ssh) |
| same, bytes sent | $edit_rbytes | $edit_fbytes | $(ratio "$edit_fbytes" "$edit_rbytes") | ≤ 0.01 |
| again, ferry on a new connection (s) | $edit1_rsync | $edit1_ferry | $(ratio "$edit1_ferry" "$edit1_rsync") | |
| empty push (ms) | | $empty_ms | | < 10 |
| editor save of 100 MB, bytes sent | $save_rbytes | $save_fbytes | $(ratio "$save_fbytes" "$save_rbytes") | ≤ 1.2 |

Seeds (s), in run order: rsync ${seeds_rsync[*]}; rsync then sync ${seeds_rsync_sync[*]}; ferry ${seeds_ferry[*]}.
Last ferry seed: commit window $(field "$work/seed.json" commit_window_us) µs, staging $(field "$work/seed.json" staging_ms) ms, sync $(field "$work/seed.json" sync_ms) ms; edit: commit window $(field "$work/edit0.json" commit_window_us) µs, connection reused: $(field "$work/edit0.json" reused_connection); again: reused $(field "$work/edit1.json" reused_connection). Replicas on fresh ext4 images (loop, direct I/O).
EOF
