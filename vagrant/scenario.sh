#!/usr/bin/env bash
# Ferry's lab scenario on real KVM hosts: a guest on site-a writes a file system through
# the splitter, the writes replicate to site-b, site-b restores the disk, and the two
# copies are compared. Prints one line: MATCH or MISMATCH.
#
#   cd vagrant && vagrant up --provider=libvirt && ./scenario.sh
#
# Run on the host, it drives the two boxes over ssh (with the config `vagrant ssh-config`
# writes, so output and exit codes come back clean) by running this same script inside
# them, as root, with a role:
#
#   scenario.sh source GROUP TARGET   site-a: protect a new disk as GROUP, replicated to
#                                     TARGET (site-b's HOST:PORT); boot a guest on it that
#                                     makes and fills an ext4 file system; wait until
#                                     site-b holds every write; print SOURCE-SHA256
#   scenario.sh target GROUP          site-b: restore the disk to a file, check its file
#                                     system and files; print RESTORED-SHA256
#   scenario.sh cleanup GROUP         site-a: unprotect GROUP (its splitter stops)
#   scenario.sh listen-address        this site's replication address, from /etc/ferry
#   scenario.sh pair-token            site-b: print a one-time pairing token
#   scenario.sh pair TARGET TOKEN     site-a: pair with site-b (on every run, a new token)
#
# Environment (host): FERRY_GROUP (default lab-DATE), FERRY_KEEP=1 (leave the group
# protected), FERRY_ACCEL (kvm; tcg where nested KVM is off), FERRY_DISK_SIZE (256M).
# Roles also take FERRY_API (the ferry command's), FERRY_LAB_DIR (/var/lib/ferry-lab),
# FERRY_GUEST_KERNEL (the box's /boot/vmlinuz-RELEASE) and FERRY_GUEST_ROOT (/, where
# lib/modules/RELEASE with its modules.dep is), to try a role outside the boxes.
set -euo pipefail

LAB=${FERRY_LAB_DIR:-/var/lib/ferry-lab}
EXIT_MARKER=FERRY-GUEST-EXIT

say() { printf 'scenario%s: %s\n' "${role:+[$role]}" "$*" >&2; }
die() { say "error: $*"; exit 1; }

# --- on the host --------------------------------------------------------------------------

host() {
    local here cfg group target src_out dst_out src_sha dst_sha
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    cd "$here"
    command -v vagrant >/dev/null || die "vagrant is not installed"
    group=${FERRY_GROUP:-lab-$(date +%Y%m%d-%H%M%S)}
    cfg=$(mktemp)
    # shellcheck disable=SC2064
    trap "rm -f '$cfg'" EXIT

    say "pushing this script and the packages to the boxes"
    vagrant rsync site-a site-b >/dev/null
    vagrant ssh-config site-a site-b >"$cfg"

    on() {
        local site=$1
        shift
        ssh -F "$cfg" -o LogLevel=ERROR -o BatchMode=yes "$site" \
            sudo env "FERRY_ACCEL=${FERRY_ACCEL:-kvm}" "FERRY_DISK_SIZE=${FERRY_DISK_SIZE:-256M}" \
            bash /ferry/lab/scenario.sh "$@"
    }
    result() {  # the one line this scenario promises; then the exit code
        echo "$1"
        [ "${1%% *}" = MATCH ]
    }
    finish() {  # unprotect the group on site-a (unless FERRY_KEEP=1), then the result
        if [ "${FERRY_KEEP:-0}" != 1 ]; then
            on site-a cleanup "$group" || say "warning: could not unprotect $group on site-a"
        fi
        result "$1"
    }

    target=$(on site-b listen-address) || { result "MISMATCH (site-b has no replication address)"; return; }
    say "group $group: site-a -> site-b ($target)"
    if ! on site-a pair "$target" "$(on site-b pair-token)"; then
        result "MISMATCH (site-a could not pair with site-b; see the log above)"
        return
    fi
    if ! src_out=$(on site-a source "$group" "$target"); then
        finish "MISMATCH (the source side failed; see the log above)"
        return
    fi
    src_sha=$(sed -n 's/^SOURCE-SHA256 //p' <<<"$src_out")
    if ! dst_out=$(on site-b target "$group"); then
        finish "MISMATCH (the target side failed; see the log above)"
        return
    fi
    dst_sha=$(sed -n 's/^RESTORED-SHA256 //p' <<<"$dst_out")
    if [ -n "$src_sha" ] && [ "$src_sha" = "$dst_sha" ]; then
        finish "MATCH $src_sha (group $group, site-a -> site-b)"
    else
        finish "MISMATCH source=${src_sha:-none} restored=${dst_sha:-none} (group $group)"
    fi
}

# --- on site-a: the guest -----------------------------------------------------------------

# A guest that needs no image: this box's own kernel, and an initramfs holding busybox,
# mke2fs (with its libraries) and the modules for virtio disks and ext4, in the order
# `modprobe --show-depends` gives. /init makes the file system, writes files and a
# manifest of their checksums, unmounts, prints the exit marker and powers off.
build_initramfs() {
    local out=$1 kver=$2 root deps m lib
    root=$(mktemp -d)
    mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,mnt,tmp,lib/modules}
    cp /bin/busybox "$root/bin/busybox"
    cp /etc/mke2fs.conf "$root/etc/"
    cp /sbin/mke2fs "$root/sbin/"
    for lib in $(ldd /sbin/mke2fs | grep -o '/[^ ]*'); do
        cp -L --parents "$lib" "$root"
    done
    deps=$(modprobe -d "${FERRY_GUEST_ROOT:-/}" -S "$kver" --show-depends -a \
           virtio_pci virtio_blk virtio_rng ext4) \
        || die "modprobe --show-depends failed for kernel $kver"
    : >"$root/etc/modules"
    while read -r kind path _; do
        [ "$kind" = insmod ] || continue  # "builtin NAME" needs nothing
        m=$(basename "$path")
        case $m in
            *.ko.xz) xz -dc "$path" >"$root/lib/modules/${m%.xz}"; m=${m%.xz} ;;
            *.ko.zst) zstd -qdc "$path" >"$root/lib/modules/${m%.zst}"; m=${m%.zst} ;;
            *) cp "$path" "$root/lib/modules/" ;;
        esac
        grep -qx "$m" "$root/etc/modules" || echo "$m" >>"$root/etc/modules"
    done <<<"$deps"
    cat >"$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
for m in $(cat /etc/modules); do insmod "/lib/modules/$m" 2>/dev/null || true; done
n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
run() {
    set -e
    /sbin/mke2fs -F -q -t ext4 /dev/vda  # not busybox's applet, which makes only ext2
    mount -t ext4 /dev/vda /mnt
    mkdir -p /mnt/data
    echo "written by the ferry lab guest" >/mnt/hello.txt
    dd if=/dev/urandom of=/mnt/data/random.bin bs=1M count=48 2>/dev/null
    i=0
    while [ $i -lt 200 ]; do echo "line $i" >"/mnt/data/small-$i.txt"; i=$((i + 1)); done
    sync
    (cd /mnt && find . -type f ! -name MANIFEST ! -path './lost+found/*' | sort \
        | xargs sha256sum >MANIFEST)
    echo "guest: $(wc -l </mnt/MANIFEST) files written"
    umount /mnt
    sync
}
( run )
echo "FERRY-GUEST-EXIT $?"
poweroff -f
INIT
    chmod 0755 "$root/init"
    (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$out"
    rm -rf "$root"
}

source_side() {
    local group=$1 target=$2 disk uri log initrd kernel kver sock splitter qemu
    command -v ferry >/dev/null || die "ferry is not installed (vagrant provision)"
    mkdir -p "$LAB"
    disk=$LAB/$group-disk0.img
    rm -f "$disk"
    truncate -s "${FERRY_DISK_SIZE:-256M}" "$disk"
    say "protecting $disk as $group, target $target"
    uri=$(ferry protect "$group" --disk "disk0=$disk" --target "$target" \
          | awk -F '\t' '$1 == "disk0" { print $2 }')
    [ -n "$uri" ] || die "ferry protect printed no NBD URI for disk0"
    say "splitter: $uri"

    kernel=${FERRY_GUEST_KERNEL:-/boot/vmlinuz-$(uname -r)}
    [ -r "$kernel" ] || die "cannot read the guest kernel $kernel"
    kver=${kernel##*/vmlinuz-}
    initrd=$LAB/guest-$kver.cpio.gz
    if [ ! -f "$initrd" ] || [ "$0" -nt "$initrd" ]; then
        say "building the guest's initramfs for kernel $kver"
        build_initramfs "$initrd" "$kver"
    fi
    if [ "${FERRY_ACCEL:-kvm}" = kvm ] && [ ! -c /dev/kvm ]; then
        die "no /dev/kvm on $(hostname): enable nested KVM (README.md) or set FERRY_ACCEL=tcg"
    fi
    log=$LAB/$group-guest.log
    sock=${uri#*socket=}
    splitter=$(pgrep -f -- "--unix $sock" | head -n 1) || die "no nbdkit serves $sock"
    say "booting the guest (-accel ${FERRY_ACCEL:-kvm}); console in $log"
    local cpu=()
    [ "${FERRY_ACCEL:-kvm}" = kvm ] && cpu=(-cpu host)
    timeout 900 qemu-system-x86_64 -accel "${FERRY_ACCEL:-kvm}" "${cpu[@]}" -m 512 -smp 2 \
        -nodefaults -no-user-config -display none -no-reboot \
        -serial "file:$log" -device virtio-rng-pci \
        -kernel "$kernel" -initrd "$initrd" -append "console=ttyS0 panic=-1 quiet" \
        -drive "file=$uri,format=raw,if=virtio" &
    qemu=$!
    # What a package upgrade does (postinst: try-restart): restart the agent under the
    # running guest. Its splitter must keep serving (KillMode=process), same process.
    if systemctl is-active --quiet ferry-agent.service 2>/dev/null; then
        sleep 1
        say "restarting ferry-agent.service while the guest runs"
        systemctl restart ferry-agent.service
    fi
    wait "$qemu" || die "qemu failed or timed out; see $log"
    tr -d '\r' <"$log" | grep -E '^(guest:|ferry|EXT4-fs error)' >&2 || true
    grep -qa "^$EXIT_MARKER 0" <(tr -d '\r' <"$log") \
        || die "the guest did not finish its work; see $log"
    [ "$(pgrep -f -- "--unix $sock" | head -n 1)" = "$splitter" ] \
        || die "the splitter (nbdkit pid $splitter) did not survive; see journalctl -u ferry-agent"
    say "splitter pid $splitter served the guest throughout"

    say "waiting until $target holds every write"
    ferry wait "$group" --synced --timeout 900 >&2
    ferry status "$group" >&2
    echo "SOURCE-SHA256 $(sha256sum "$disk" | cut -d' ' -f1)"
}

# --- on site-b ----------------------------------------------------------------------------

target_side() {
    local group=$1 out mnt
    mkdir -p "$LAB"
    out=$LAB/$group-disk0.restored.img
    rm -f "$out"
    say "restoring $group/disk0 to $out"
    ferry restore "$group" --disk disk0 --to "$out" >&2
    e2fsck -fn "$out" >&2 || die "the restored file system does not check clean"
    mnt=$(mktemp -d)
    mount -o loop,ro,noload "$out" "$mnt"
    if (cd "$mnt" && sha256sum --quiet -c MANIFEST) >&2; then
        say "all $(wc -l <"$mnt/MANIFEST") files of the guest match their manifest"
    else
        umount "$mnt"
        die "files in the restored file system differ from the guest's manifest"
    fi
    umount "$mnt"
    rmdir "$mnt"
    echo "RESTORED-SHA256 $(sha256sum "$out" | cut -d' ' -f1)"
}

cleanup_side() {
    ferry unprotect "$1" >&2 || true  # not protected if the source side failed early
    rm -f "$LAB/$1-disk0.img"
}

listen_address() {
    # The agent's own view of its settings: the same files, in the same order.
    local conf
    FERRY_LISTEN=0.0.0.0:4005
    for conf in /etc/ferry/agent.conf /etc/ferry/conf.d/*.conf; do
        # shellcheck disable=SC1090
        [ -f "$conf" ] && . "$conf"
    done
    case $FERRY_LISTEN in
        0.0.0.0:*|:*) die "FERRY_LISTEN=$FERRY_LISTEN is not an address site-a can dial" ;;
    esac
    echo "$FERRY_LISTEN"
}

pair_side() {
    # Replication runs over TLS between paired sites only; pairing twice is harmless.
    say "pairing with $1"
    ferry pair "$1" --token "$2" >&2
}

role=${1:-}
case $role in
    "") host ;;
    source) [ $# -eq 3 ] || die "usage: $0 source GROUP TARGET"; source_side "$2" "$3" ;;
    target) [ $# -eq 2 ] || die "usage: $0 target GROUP"; target_side "$2" ;;
    cleanup) [ $# -eq 2 ] || die "usage: $0 cleanup GROUP"; cleanup_side "$2" ;;
    listen-address) listen_address ;;
    pair-token) ferry pair-token ;;
    pair) [ $# -eq 3 ] || die "usage: $0 pair TARGET TOKEN"; pair_side "$2" "$3" ;;
    *) die "unknown role $role (run it without arguments on the host)" ;;
esac
