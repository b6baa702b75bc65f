#!/usr/bin/env bash
# Provision one Ferry lab site; Vagrant runs it as root on each box:
#
#   provision.sh SITE ADDRESS        e.g. provision.sh site-a 10.77.0.11
#
# Installs what the scenario's guest needs, then the newest ferry_*.deb from the synced
# /ferry/dist (apt resolves its Depends: python3.11, nbdkit, nbdkit-plugin-python),
# names the site and binds its replication address in a conf.d drop-in, and (re)starts
# the agent. Run again (`vagrant provision`) after building a new package: the agent
# restarts, splitters that serve guests keep running.
set -euo pipefail

say() { printf 'provision[%s]: %s\n' "${site:-?}" "$*" >&2; }
die() { say "error: $*"; exit 1; }

[ $# -eq 2 ] || die "usage: $0 SITE ADDRESS"
site=$1
address=$2
dist=/ferry/dist
conf=/etc/ferry/conf.d/50-lab.conf

export DEBIAN_FRONTEND=noninteractive
say "installing the lab's tools"
apt-get update -qq
# qemu and the guest's pieces (kernel modules found with kmod, busybox, mke2fs, cpio).
apt-get install -y -qq --no-install-recommends \
    qemu-system-x86 qemu-utils nbdkit nbdkit-plugin-python libnbd-bin \
    busybox-static cpio e2fsprogs kmod >/dev/null

deb=$(find "$dist" -maxdepth 1 -name 'ferry_*.deb' | sort -V | tail -n 1)
[ -n "$deb" ] || die "no ferry_*.deb in $dist (packaging/build.sh deb dist on the host)"
say "installing $(basename "$deb")"
# --reinstall: a rebuilt package of the same version still replaces the installed one.
apt-get install -y -qq --reinstall --allow-downgrades "$deb" >/dev/null

say "configuring $conf"
install -d -m 0755 /etc/ferry/conf.d
cat >"$conf" <<CONF
# Written by vagrant/provision.sh: this lab site's name and replication address.
FERRY_SITE=$site
FERRY_LISTEN=$address:4005
CONF

systemctl enable ferry-agent.service
# Type=notify: restart returns once the agent has bound its sockets (or failed).
systemctl restart ferry-agent.service
systemctl is-active --quiet ferry-agent.service || {
    journalctl -u ferry-agent.service -n 50 --no-pager >&2
    die "ferry-agent.service did not start"
}
ferry status >&2

if [ ! -c /dev/kvm ]; then
    say "warning: no /dev/kvm: nested KVM is not on for this box (see vagrant/README.md);" \
        "run the scenario with FERRY_ACCEL=tcg"
fi
say "ready: site $site, replication $address:4005, $(dpkg-query -W -f='ferry ${Version}' ferry)"
