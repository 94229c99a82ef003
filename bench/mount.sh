#!/usr/bin/env bash
# Mount speed against the native filesystem and bindfs, measured in one run.
#   sudo bench/mount.sh [--runs N] [--files N]
# Prints a Markdown table of ratios (higher is better for throughput, lower
# for times) ready for docs/BENCHMARKS.md. Wants an otherwise idle machine;
# takes several minutes. Needs fio and bindfs (installed if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=3 dirs=200
while [ $# -gt 0 ]; do
  case $1 in
    --runs) runs=$2; shift 2 ;;
    --files) dirs=$(( $2 / 500 )); shift 2 ;;
    *) echo "usage: $0 [--runs N] [--files N]" >&2; exit 2 ;;
  esac
done
for p in fio:fio bindfs:bindfs; do
  command -v "${p%%:*}" >/dev/null || { apt-get update -qq; apt-get install -y -qq "${p##*:}" >/dev/null; }
done
cargo build --release -q
ferry=$PWD/target/release/ferry
work=$(mktemp -d /var/tmp/ferry-bench.XXXXXX)
native=$work/native fsrc=$work/ferry-src fmnt=$work/ferry bsrc=$work/bindfs-src bmnt=$work/bindfs
dsrc=$work/dev-src dmnt=$work/ferry-dev
mkdir -p "$native" "$fsrc" "$fmnt" "$bsrc" "$bmnt" "$dsrc" "$dmnt"
cleanup() {
  for m in "$fmnt" "$dmnt"; do "$ferry" umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  fusermount3 -u "$bmnt" 2>/dev/null || umount -l "$bmnt" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
# ferry as it mounts by default (through the kernel's per-CPU io_uring
# queues where offered: scripts/setup enables them), and through /dev/fuse
# alone, to show what the transport is worth.
scripts/setup
"$ferry" mount "$fsrc" "$fmnt" --state "$work/state" --background >/dev/null
"$ferry" mount "$dsrc" "$dmnt" --state "$work/dev-state" --background --no-io-uring >/dev/null
bindfs "$bsrc" "$bmnt"

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
fio_bw() { # dir rw [extra...] -> KiB/s
  local dir=$1 rw=$2; shift 2
  local key=write; [ "$rw" = read ] && key=read
  fio --name=b --directory="$dir" --rw="$rw" --bs=1M --size=1G --end_fsync=1 --fallocate=none "$@" \
      --output-format=json 2>/dev/null | python3 -c "import json,sys; print(json.load(sys.stdin)['jobs'][0]['$key']['bw'])"
}
# A failed command must not pass for a fast one.
seconds() {
  local s; s=$(date +%s.%N)
  "$@" >/dev/null 2>"$work/cmd.err" || { echo "bench: '$*' failed: $(head -3 "$work/cmd.err")" >&2; exit 1; }
  python3 -c "import time; print(time.time() - $s)"
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }

# The host's writeback of one measurement slows the next one down (on the
# VMs this was measured on, whichever writes second after a 1 GiB fsync runs
# at about half speed). So: settle before every measurement, and rotate the
# order of the targets from run to run.
settle() { sync; sleep 5; }
targets=(native ferry dev bindfs)
dir_of() { case $1 in native) echo "$native" ;; ferry) echo "$fmnt" ;; dev) echo "$dmnt" ;; bindfs) echo "$bmnt" ;; esac; }
declare -A res samples
for run in $(seq "$runs"); do
  for k in 0 1 2 3; do
    target=${targets[$(( (k + run) % 4 ))]} d=$(dir_of "$target")
    settle; samples[$target.write]+=" $(fio_bw "$d" write)"
    settle; samples[$target.overwrite]+=" $(fio_bw "$d" write --overwrite=1)"
    drop_caches; settle; samples[$target.read]+=" $(fio_bw "$d" read)"
    rm -f "$d"/b.*
  done
done
for key in "${!samples[@]}"; do
  # shellcheck disable=SC2086
  res[$key]=$(median ${samples[$key]})
done

# A tree of small files, as a tar.
python3 - "$work/tree" "$dirs" <<'PY'
import os, sys, random
random.seed(7); root, dirs = sys.argv[1], int(sys.argv[2])
for d in range(dirs):
    for s in range(10):
        p = f"{root}/d{d:03d}/s{s}"; os.makedirs(p)
        for f in range(50):
            with open(f"{p}/f{f}", "wb") as fh: fh.write(os.urandom(random.randint(100, 8000)))
PY
tar cf "$work/tree.tar" -C "$work/tree" . && rm -rf "$work/tree"
for run in $(seq "$runs"); do
  for k in 0 1 2 3; do
    target=${targets[$(( (k + run) % 4 ))]} d=$(dir_of "$target")/tree$run
    mkdir "$d"
    drop_caches; settle
    samples[$target.untar]+=" $(seconds tar xf "$work/tree.tar" -C "$d")"
    drop_caches; settle
    samples[$target.find]+=" $(seconds find "$d" -size +1k)"
  done
done
for key in "${!samples[@]}"; do
  # shellcheck disable=SC2086
  res[$key]=$(median ${samples[$key]})
done

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
# What a FUSE request pays per wakeup on this machine (docs/ARCHITECTURE.md).
cc -O2 -pthread bench/wakeup.c -o "$work/wakeup"
read -r across one <<< "$("$work/wakeup")"
echo "Machine: $(nproc) cores ($cpu), $(free -g | awk '/Mem:/{print $2}') GiB, kernel $(uname -r), $(df -T "$work" | awk 'NR==2{print $2}') under $work; $runs runs (median); $((dirs * 500)) files in the tree; thread wakeup round trip $across µs across CPUs, $one µs on one."
echo
echo "| measure | native | ferry | ferry / native | ferry, /dev/fuse only | / native | bindfs | bindfs / native |"
echo "|---|---|---|---|---|---|---|---|"
mib() { python3 -c "print(f'{$1/1024:.0f}')"; }
for m in write overwrite read; do
  n=${res[native.$m]} f=${res[ferry.$m]} v=${res[dev.$m]} b=${res[bindfs.$m]}
  printf '| %s (MiB/s) | %s | %s | %s | %s | %s | %s | %s |\n' "$m" "$(mib "$n")" "$(mib "$f")" "$(ratio "$f" "$n")" "$(mib "$v")" "$(ratio "$v" "$n")" "$(mib "$b")" "$(ratio "$b" "$n")"
done
for m in untar find; do
  n=${res[native.$m]} f=${res[ferry.$m]} v=${res[dev.$m]} b=${res[bindfs.$m]}
  printf '| %s (s) | %.2f | %.2f | %s | %.2f | %s | %.2f | %s |\n' "$m" "$n" "$f" "$(ratio "$f" "$n")" "$v" "$(ratio "$v" "$n")" "$b" "$(ratio "$b" "$n")"
done
echo
for m in untar find; do
  echo "$m samples (s), in run order: native${samples[native.$m]}; ferry${samples[ferry.$m]}; /dev/fuse${samples[dev.$m]}; bindfs${samples[bindfs.$m]}"
done
