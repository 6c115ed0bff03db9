#!/bin/sh
# PID 1 of fresh pid/mount/net/uts/ipc namespaces (started by sandbox.py): build a throwaway
# root (the host's / as the lower layer of an overlay, a tmpfs upper: nothing reaches the host)
# and exec a real systemd in it. Env: CG (this guest's cgroup2 directory), NS (a host dir).
set -eu
if [ -z "${VGATE_CGNS:-}" ]; then
  echo 0 > "$CG/payload/cgroup.procs"               # "0": this process (PID 1 here)
  VGATE_CGNS=1 exec unshare --cgroup "$0" "$@"      # cgroup namespace rooted at payload/
fi
mount --make-rprivate /
mount -t tmpfs -o mode=755 vgate-guest "$NS"
mkdir -p "$NS/upper" "$NS/work" "$NS/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$NS/upper,workdir=$NS/work" "$NS/root"
R=$NS/root
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
for p in sys sysrq-trigger; do                      # kernel knobs read-only, as nspawn does
  [ -e "$R/proc/$p" ] || continue
  mount --bind "$R/proc/$p" "$R/proc/$p"; mount -o remount,bind,ro "$R/proc/$p"
done
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=755,nosuid,size=64m vgate-dev "$R/dev"
mknod -m 666 "$R/dev/null" c 1 3; mknod -m 666 "$R/dev/zero" c 1 5; mknod -m 666 "$R/dev/full" c 1 7
mknod -m 666 "$R/dev/random" c 1 8; mknod -m 666 "$R/dev/urandom" c 1 9; mknod -m 666 "$R/dev/tty" c 5 0
mkdir -p "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"; ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"; ln -s /proc/self/fd/1 "$R/dev/stdout"; ln -s /proc/self/fd/2 "$R/dev/stderr"
mount -t tmpfs -o mode=1777,nosuid,nodev vgate-shm "$R/dev/shm"
touch "$R/dev/console"
# systemd sends its console output to /dev/null unless /dev/console is a terminal: `script`
# gives this process a pty, logged to console.log.
if [ -t 1 ]; then mount --bind /proc/self/fd/1 "$R/dev/console"; else mount --bind /dev/null "$R/dev/console"; fi
mount -t tmpfs -o mode=755,nosuid,nodev vgate-run "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev vgate-tmp "$R/tmp"
# The checkout under test (REPO) may live below /tmp or /run, which the guest gets fresh:
# keep it visible there, read-only (the overlay keeps every other host path writable-in-guest).
case "${REPO:-}" in
  /tmp/*|/run/*) mkdir -p "$R$REPO"; mount --bind "$REPO" "$R$REPO"
                 mount -o remount,bind,ro "$R$REPO" ;;
esac
# Guest-only: none of the host's enabled services (nginx, redis, ...) start in here.
rm -f "$R"/etc/systemd/system/*.wants/*
systemd-id128 new > "$R/etc/machine-id"
echo vgate-guest > "$R/etc/hostname"
cd "$R"
pivot_root . .
umount -l .
exec setpriv --bounding-set=-sys_module,-sys_time,-syslog,-sys_rawio,-wake_alarm \
  env -i container=vgate-test TERM=dumb PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  /lib/systemd/systemd --system --unit=basic.target --show-status=no
