#!/usr/bin/env bash
# Pushes against rsync, measured side by side in one run (issues 3 and 4):
#   bench/push.sh [--files N] [--ssh]    (as root; several minutes; wants an idle machine)
# With --ssh both go through a real sshd on loopback: `rsync -e ssh` to
# root@127.0.0.1:DIR and `ferry push MNT root@127.0.0.1:DIR`.
# On a tree of N small files (default 100,000) plus a 1 GiB and a 100 MB file:
#   seed      first copy: `rsync -a` vs the first `ferry push`
#   edit      a 4 KiB write in the middle of the 1 GiB file and a 500-file
#             directory renamed: `rsync -a --no-whole-file --delete` vs `ferry push`
#   empty     `ferry push` with nothing to do
#   save      an editor's save (a new file with a small change renamed over the
#             100 MB file): bytes sent by each
# Prints a Markdown table (ratios: ferry / rsync) for docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
files=100000 over_ssh=
while [ $# -gt 0 ]; do
  case $1 in
    --files) files=$2; shift 2 ;;
    --ssh) over_ssh=1; shift ;;
    *) echo "usage: $0 [--files N] [--ssh]" >&2; exit 2 ;;
  esac
done
scripts/setup
cargo build --release -q
ferry=$PWD/target/release/ferry
work=$(mktemp -d /var/tmp/ferry-bench-push.XXXXXX)
src=$work/src mnt=$work/mnt rep=$work/replica rr=$work/rsync-replica
mkdir -p "$src" "$mnt" "$rep"
sshd_pid=
cleanup() {
  "$ferry" umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
  [ -z "$sshd_pid" ] || kill "$sshd_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

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
push() { "$ferry" push "$mnt" "$ferry_to" "${ssh_args[@]}" --json > "$1"; }

settle; t0=$(now); rsync -a "${rsync_ssh[@]}" "$src"/ "$rsync_to"; t1=$(now)
settle; t2=$(now); push "$work/seed.json"; t3=$(now)
seed_rsync=$(elapsed "$t0" "$t1") seed_ferry=$(elapsed "$t2" "$t3")

python3 -c "
import os
f=open('$mnt/big.img','r+b'); f.seek(512*1024*1024+123); f.write(os.urandom(4096)); f.close()"
mv "$mnt/d000" "$mnt/d000-renamed"
settle; t0=$(now); rsync -a --no-whole-file --delete --stats "${rsync_ssh[@]}" "$src"/ "$rsync_to" > "$work/rs.edit"; t1=$(now)
settle; t2=$(now); push "$work/edit.json"; t3=$(now)
edit_rsync=$(elapsed "$t0" "$t1") edit_ferry=$(elapsed "$t2" "$t3")
edit_rbytes=$(rsync_bytes "$work/rs.edit") edit_fbytes=$(field "$work/edit.json" bytes_sent)

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
Machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(free -g | awk '/Mem:/{print $2}') GiB, kernel $(uname -r), $(df -T "$work" | awk 'NR==2{print $2}'); $files small files + 1 GiB + 100 MB; $how.

| measure | rsync | ferry | ferry / rsync | target |
|---|---|---|---|---|
| seed (s) | $seed_rsync | $seed_ferry | $(ratio "$seed_ferry" "$seed_rsync") | ≤ 1 |
| 4 KiB edit + 500-file dir rename (s) | $edit_rsync | $edit_ferry | $(ratio "$edit_ferry" "$edit_rsync") | ≤ 0.05 |
| same, bytes sent | $edit_rbytes | $edit_fbytes | $(ratio "$edit_fbytes" "$edit_rbytes") | ≤ 0.01 |
| empty push (ms) | | $empty_ms | | < 10 |
| editor save of 100 MB, bytes sent | $save_rbytes | $save_fbytes | $(ratio "$save_fbytes" "$save_rbytes") | ≤ 1.2 |

ferry seed: commit window $(field "$work/seed.json" commit_window_us) µs, staging $(field "$work/seed.json" staging_ms) ms, sync $(field "$work/seed.json" sync_ms) ms; edit: commit window $(field "$work/edit.json" commit_window_us) µs.
EOF
