#!/usr/bin/env bash
# Build Ferry's .deb and .rpm from one staged tree.
#
#   packaging/build.sh [deb|rpm|all] OUTDIR
#
# Theory of operation
# -------------------
# 1. The source tree (what git tracks or would track, so no .venv or caches) is copied to a
#    scratch directory: building never writes into the checkout.
# 2. A venv is made with the system's versioned Python (/usr/bin/python3.X) at
#    STAGE/opt/ferry, and Ferry with its PyPI dependencies is installed into it with pip
#    (which honours the usual PIP_* settings: index, find-links, constraints). pip and
#    setuptools are then removed: the venv is an application, not a development tool.
# 3. Relocation. Only three kinds of file in a venv name the directory it was built in:
#    the scripts in bin/ (shebangs, activate), pyvenv.cfg, and the compiled .pyc files
#    (co_filename). The first two are rewritten to /opt/ferry; the .pyc files are deleted
#    and compiled again with compileall's -s/-p, so tracebacks name /opt/ferry/... too.
#    Then the whole staged tree is searched for the scratch path and the build fails if it
#    is still anywhere. (This is what dh-virtualenv does. Building under /opt/ferry itself
#    through a private mount namespace would need root or user namespaces and a shadowed
#    /opt, where this machine keeps its pip wheelhouses; the rewrite needs neither, and the
#    final search makes it fail closed.)
# 4. Host-daemon files join the venv in the staged tree: the systemd unit, its start
#    script (reads /etc/ferry/agent.conf and conf.d/), the config file, /var/lib/ferry and
#    /usr/bin/ferry.
# 5. The .deb (dpkg-deb --build on a hard-linked copy of the tree, plus DEBIAN/) and the
#    .rpm (rpmbuild with packaging/ferry.spec.in, whose %install copies the tree) are
#    made from that same tree. Their paths are printed on stdout, one a line.
#
# The venv runs with the Python it was built with: the packages depend on that exact
# /usr/bin/python3.X (Debian 12: 3.11), so build on the distribution you ship to.
#
# Environment: PYTHON (default /usr/bin/python3), FERRY_RELEASE (package release, 1),
# FERRY_MAINTAINER, FERRY_CONSTRAINTS (a pip constraints file that pins dependencies),
# FERRY_KEEP_WORK=1 (keep the scratch directory and print its path).
set -euo pipefail
umask 022

PREFIX=/opt/ferry
UNIT=ferry-agent.service

log() { printf 'build.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
usage() { echo "usage: $0 [deb|rpm|all] OUTDIR" >&2; exit 2; }

[ $# -eq 2 ] || usage
what=$1
case $what in deb|rpm|all) ;; *) usage ;; esac
mkdir -p "$2"
outdir=$(cd "$2" && pwd)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
src=$(cd "$here/.." && pwd)
python=${PYTHON:-/usr/bin/python3}
release=${FERRY_RELEASE:-1}
maintainer=${FERRY_MAINTAINER:-Ferry developers <ferry@example.invalid>}

need() { command -v "$1" >/dev/null || die "$1 not found (Debian: apt-get install $2)"; }
need "$python" python3
case $what in deb|all) need dpkg-deb dpkg ;; esac
case $what in rpm|all) need rpmbuild rpm ;; esac

# --- version ------------------------------------------------------------------------------

version=$(sed -n '/^\[project\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' "$src/pyproject.toml")
[[ $version =~ ^[0-9][0-9A-Za-z.]*$ ]] || die "no usable version in pyproject.toml: '$version'"
# PEP 440 pre-releases sort before the release in dpkg and rpm only behind a tilde:
# 0.2.0rc1 -> 0.2.0~rc1, 0.2.0.dev3 -> 0.2.0~dev3.
pkg_version=$(sed -E 's/\.?(a|b|rc|dev)([0-9]+)/~\1\2/' <<<"$version")

pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
base_python=/usr/bin/python$pyver
[ -x "$base_python" ] || die "$base_python not found: the venv must use a Python the package can depend on"

work=$(mktemp -d "${TMPDIR:-/tmp}/ferry-build.XXXXXX")
if [ "${FERRY_KEEP_WORK:-0}" = 1 ]; then
    log "keeping $work"
else
    trap 'rm -rf "$work"' EXIT
fi
stage=$work/root
venv=$stage$PREFIX

# --- 1. source ----------------------------------------------------------------------------

copy_source() {
    mkdir -p "$work/src"
    if git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        # Tracked and untracked-but-not-ignored files: the working tree as it is now.
        (cd "$src" && git ls-files -z --cached --others --exclude-standard \
            | grep -zv -E '^(tests|bench|docs|packaging|vagrant|\.ci)/' \
            | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
            | tar --null -T - -cf -) | tar -xf - -C "$work/src"
    else
        tar -C "$src" --exclude=.git --exclude=.venv --exclude=__pycache__ --exclude='*.egg-info' \
            --exclude=build --exclude=dist --exclude=.cache --exclude=tests --exclude=bench \
            --exclude=docs --exclude=packaging --exclude=vagrant -cf - . | tar -xf - -C "$work/src"
    fi
    # pyproject.toml names README.md as the long description; a checkout without one
    # (yet) still builds.
    [ -f "$work/src/README.md" ] || echo "Ferry" >"$work/src/README.md"
}

# --- 2. venv ------------------------------------------------------------------------------

build_venv() {
    "$base_python" -m venv "$venv" || die "$base_python -m venv failed (Debian: apt-get install python3-venv)"
    local pip=("$venv/bin/python" -m pip --disable-pip-version-check)
    local constraints=()
    [ -z "${FERRY_CONSTRAINTS:-}" ] || constraints=(-c "$FERRY_CONSTRAINTS")
    "${pip[@]}" install -q --no-compile --no-warn-script-location "${constraints[@]}" "$work/src"
    # Installer metadata that names the scratch directory, and means nothing on a host.
    local dist
    for dist in "$venv"/lib/python"$pyver"/site-packages/ferry-*.dist-info; do
        rm -f "$dist/direct_url.json"
        sed -i '/^[^,]*direct_url\.json,/d' "$dist/RECORD"
    done
    mkdir -p "$venv/share/ferry"
    "${pip[@]}" freeze >"$venv/share/ferry/requirements.txt"
    "${pip[@]}" uninstall -q -y pip setuptools
}

# --- 3. relocation ------------------------------------------------------------------------

relocate() {
    # grep -r does not follow the bin/python symlinks, so sed never replaces one.
    grep -rlZF "$venv" "$venv/bin" "$venv/pyvenv.cfg" | xargs -0r sed -i "s|$venv|$PREFIX|g"
    find "$venv" -name __pycache__ -type d -prune -exec rm -rf {} +
    "$venv/bin/python" -I -m compileall -q -j0 -s "$stage" -p / "$venv/lib" >/dev/null \
        || die "compileall failed"
}

# --- 4. host-daemon files -----------------------------------------------------------------

stage_files() {
    install -D -m 0755 "$here/ferry-agent" "$venv/libexec/ferry-agent"
    install -D -m 0644 "$here/$UNIT" "$stage/usr/lib/systemd/system/$UNIT"
    install -D -m 0644 "$here/agent.conf" "$stage/etc/ferry/agent.conf"
    install -d -m 0755 "$stage/etc/ferry/conf.d"
    install -d -m 0750 "$stage/var/lib/ferry"
    install -d -m 0755 "$stage/usr/bin"
    ln -s "$PREFIX/bin/ferry" "$stage/usr/bin/ferry"
    install -D -m 0644 "$here/README.md" "$stage/usr/share/doc/ferry/README.packaging.md"
}

check_stage() {
    local leaks
    if leaks=$(grep -rlF "$work" "$stage"); then
        die "the scratch path $work is still named in:"$'\n'"$leaks"
    fi
    # The agent's Python imports everything, and the CLI starts (from the staged tree:
    # a venv finds its site-packages next to the python it was started as).
    "$venv/bin/python" -I -B -c 'import agent.cli, agent.daemon, agent.source.splitters, nbd_plugin' \
        || die "the staged venv cannot import Ferry"
    "$venv/bin/python" -I -B "$venv/bin/ferry" --help >/dev/null \
        || die "the staged ferry --help failed"
    # nbdkit embeds the system python3 and loads splitter.py by path; it imports nbd_plugin
    # from the directory above its own: the standard library must be enough there.
    /usr/bin/python3 -I -B -c '
import sys
sys.path.insert(0, sys.argv[1])
import nbd_plugin.changelog, nbd_plugin.dirtymap, nbd_plugin.disk, nbd_plugin.link
import nbd_plugin.localwire, nbd_plugin.state
' "$venv/lib/python$pyver/site-packages" || die "the system python3 cannot import nbd_plugin"
}

# --- 5. packages --------------------------------------------------------------------------

build_deb() {
    local arch root deb
    arch=$(dpkg --print-architecture)
    root=$work/deb
    cp -al "$stage" "$root"
    install -d -m 0755 "$root/DEBIAN"
    cat >"$root/DEBIAN/control" <<EOF
Package: ferry
Version: $pkg_version-$release
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $(du -sk "$stage" | cut -f1)
Depends: python3 (>= 3.9), python$pyver, nbdkit, nbdkit-plugin-python
Suggests: qemu-system-x86, libnbd-bin
Section: admin
Priority: optional
Description: continuous replication of KVM virtual machine disks
 Ferry replicates the writes of KVM virtual machine disks to a second site,
 keeps a journal there from which any recent point in time can be recovered,
 and fails over, tests failover and fails back in seconds.
 .
 This package holds the host agent (ferry-agent.service), the ferry command
 and the nbdkit splitter plugin, in a self-contained venv under $PREFIX.
EOF
    echo /etc/ferry/agent.conf >"$root/DEBIAN/conffiles"
    local script
    for script in postinst prerm postrm; do
        install -m 0755 "$here/deb/$script" "$root/DEBIAN/$script"
    done
    deb=$outdir/ferry_${pkg_version}-${release}_${arch}.deb
    dpkg-deb --root-owner-group -Zxz -z3 --build "$root" "$deb" >/dev/null
    echo "$deb"
}

build_rpm() {
    local arch top spec rpm
    arch=$(uname -m)
    top=$work/rpmbuild
    spec=$work/ferry.spec
    mkdir -p "$top"
    sed -e "s|@VERSION@|$pkg_version|g" -e "s|@RELEASE@|$release|g" \
        -e "s|@PYVER@|$pyver|g" -e "s|@PREFIX@|$PREFIX|g" -e "s|@UNIT@|$UNIT|g" \
        "$here/ferry.spec.in" >"$spec"
    rpmbuild -bb --quiet --nodeps --target "$arch" \
        --define "_topdir $top" --define "_rpmdir $top/RPMS" \
        --define "ferry_stage $stage" "$spec" >/dev/null
    rpm=$outdir/ferry-${pkg_version}-${release}.$arch.rpm
    mv "$top/RPMS/$arch/ferry-${pkg_version}-${release}.$arch.rpm" "$rpm"
    echo "$rpm"
}

step() { log "$1 (${SECONDS}s)"; "$1"; }

log "ferry $version (package $pkg_version-$release), python $pyver, staging in $work"
step copy_source
step build_venv
step relocate
step stage_files
step check_stage
case $what in deb|all) step build_deb ;; esac
case $what in rpm|all) step build_rpm ;; esac
log "done (${SECONDS}s)"
