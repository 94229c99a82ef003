#!/usr/bin/env bash
# The issue-2 acceptance check's write sequence with the native filesystem in
# both places: what the machine alone makes of "second writer / first writer".
#   sudo bench/write-order.sh [--rounds N]
# Each round writes a new 1 GiB file in directory A, then one in B, overwrites
# both, drops the page cache, reads both and deletes them, exactly as the check
# does with A native and B the mount. Prints the B/A ratios of each round and
# their median. On a machine without first-touch costs they are near 1.0.
set -euo pipefail
rounds=3
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    *) echo "usage: $0 [--rounds N]" >&2; exit 2 ;;
  esac
done
command -v fio >/dev/null || { apt-get update -qq; apt-get install -y -qq fio >/dev/null; }
work=$(mktemp -d /tmp/ferry-write-order.XXXXXX)
trap 'rm -rf "$work"' EXIT
a=$work/a b=$work/b
mkdir -p "$a" "$b"
fio_bw() { # dir rw [extra] -> KiB/s
  local key=write; [ "$2" = read ] && key=read
  fio --name=b --directory="$1" --rw="$2" --bs=1M --size=1G --end_fsync=1 --fallocate=none ${3:-} \
      --output-format=json 2>/dev/null | python3 -c "import json,sys; print(json.load(sys.stdin)['jobs'][0]['$key']['bw'])"
}
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
w=() o=() r=()
for round in $(seq "$rounds"); do
  aw=$(fio_bw "$a" write); bw=$(fio_bw "$b" write)
  ao=$(fio_bw "$a" write --overwrite=1); bo=$(fio_bw "$b" write --overwrite=1)
  sync; echo 3 > /proc/sys/vm/drop_caches
  ar=$(fio_bw "$a" read); sync; echo 3 > /proc/sys/vm/drop_caches; br=$(fio_bw "$b" read)
  rm -f "$a"/b.* "$b"/b.*
  w+=("$(ratio "$bw" "$aw")") o+=("$(ratio "$bo" "$ao")") r+=("$(ratio "$br" "$ar")")
  echo "round $round: write B/A ${w[-1]} ($bw/$aw KiB/s), overwrite ${o[-1]}, read ${r[-1]}"
done
echo "median B/A: write $(median "${w[@]}"), overwrite $(median "${o[@]}"), read $(median "${r[@]}")"
