# n2g graph --dot into a read-only folder: the error should name a.dot, not .a.dot.PID.TID.tmp
mkdir -p /mnt/ro && mount -t tmpfs -o size=1m,ro tmpfs /mnt/ro
python -m n2g.cli graph 0 34 --workspace "${1:-/tmp/pb/ws}" --dot /mnt/ro/a.dot; umount /mnt/ro
