#!/usr/bin/env bash
# Build Ferry's .deb and .rpm the distributions' way.
#
#   packaging/build.sh [deb|rpm|all] OUTDIR
#
# Theory of operation
# -------------------
# 1. The source tree (what git tracks or would track: no .venv, no caches) is copied to a
#    scratch directory as ferry-VERSION/, and packed as ferry-VERSION.tar.gz (the rpm's
#    Source0). Building never writes into the checkout.
# 2. The .deb: dpkg-buildpackage -b in that copy, with debian/ (dh + pybuild + dh_python3).
#    The Python packages land in /usr/lib/python3/dist-packages, Depends are generated.
# 3. The .rpm: rpmbuild -bb (and -bs: the .src.rpm to rebuild on Fedora or EL9) with
#    packaging/ferry.spec, written to Fedora's Python guidelines (%pyproject_* macros).
#    Where this rpm has no such macros (Debian), packaging/rpm/macros.compat stands in
#    for them and BuildRequires are not checked (--nodeps): that build is for checking the
#    spec and its file list here; the packages to ship are rebuilt from the .src.rpm on
#    the distribution they are for (mock, or rpmbuild --rebuild), where the real macros and
#    python3 apply.
# 4. The paths of what was built are printed on stdout, one a line; steps go to stderr.
#
# One version: pyproject.toml's. debian/changelog and the spec must name the same upstream
# version, or the build stops (a release bumps all three).
#
# Environment: FERRY_RELEASE (package release; default: debian/changelog's revision and the
# spec's 1; another value adds a changelog entry in the scratch copy, e.g. for an upgrade
# test), FERRY_KEEP_WORK=1 (keep the scratch directory and print its path).
set -euo pipefail
umask 022

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
# The distribution's tools and Python, never a developer's pyenv, venv or ~/.local.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV PIP_REQUIRE_VIRTUALENV
export LC_ALL=C.UTF-8 PYTHONDONTWRITEBYTECODE=1

need() { command -v "$1" >/dev/null || die "$1 not found (Debian: apt-get install $2)"; }
case $what in deb|all) need dpkg-buildpackage dpkg-dev ;; esac
case $what in rpm|all) need rpmbuild rpm ;; esac

# --- versions -----------------------------------------------------------------------------

version=$(sed -n '/^\[project\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' "$src/pyproject.toml")
[[ $version =~ ^[0-9][0-9A-Za-z.]*$ ]] || die "no usable version in pyproject.toml: '$version'"
# PEP 440 pre-releases sort before the release in dpkg and rpm only behind a tilde:
# 0.2.0rc1 -> 0.2.0~rc1, 0.2.0.dev3 -> 0.2.0~dev3.
pkg_version=$(sed -E 's/\.?(a|b|rc|dev)([0-9]+)/~\1\2/' <<<"$version")

deb_full=$(sed -n '1s/^ferry (\([^)]*\)).*/\1/p' "$src/debian/changelog")
[ "${deb_full%-*}" = "$pkg_version" ] ||
    die "debian/changelog is at ${deb_full%-*}, pyproject.toml at $pkg_version: add a changelog entry"
spec_version=$(sed -n 's/^Version: *//p' "$here/ferry.spec")
[ "$spec_version" = "$pkg_version" ] ||
    die "packaging/ferry.spec is at $spec_version, pyproject.toml at $pkg_version: update its Version and %changelog"
release=${FERRY_RELEASE:-}
[ -z "$release" ] || [[ $release =~ ^[0-9][0-9A-Za-z.~+]*$ ]] || die "bad FERRY_RELEASE: '$release'"

work=$(mktemp -d "${TMPDIR:-/tmp}/ferry-build.XXXXXX")
if [ "${FERRY_KEEP_WORK:-0}" = 1 ]; then
    log "keeping $work"
else
    trap 'rm -rf "$work"' EXIT
fi
tree=$work/ferry-$pkg_version

# --- 1. source ----------------------------------------------------------------------------

copy_source() {
    mkdir -p "$tree"
    if git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        # Tracked and untracked-but-not-ignored files: the working tree as it is now.
        (cd "$src" && git ls-files -z --cached --others --exclude-standard \
            | while IFS= read -r -d '' f; do [ -e "$f" ] || [ -L "$f" ] && printf '%s\0' "$f"; done \
            | tar --null -T - -cf -) | tar -xf - -C "$tree"
    else
        tar -C "$src" --exclude=.git --exclude=.venv --exclude=__pycache__ --exclude='*.egg-info' \
            --exclude=build --exclude=dist --exclude=.cache --exclude=.pybuild -cf - . \
            | tar -xf - -C "$tree"
    fi
    if [ -n "$release" ] && [ "$release" != "${deb_full##*-}" ]; then
        # A rebuild with another release: its own changelog entry, as a distribution's
        # rebuild would have.
        local entry
        entry=$(printf 'ferry (%s-%s) unstable; urgency=medium\n\n  * Rebuild (FERRY_RELEASE=%s).\n\n -- %s  %s\n\n' \
            "$pkg_version" "$release" "$release" \
            "$(sed -n 's/^Maintainer: *//p' "$tree/debian/control")" "$(date -R)")
        printf '%s\n' "$entry" | cat - "$src/debian/changelog" >"$tree/debian/changelog"
    fi
    tar -C "$work" --sort=name --owner=0 --group=0 --numeric-owner \
        -czf "$work/ferry-$pkg_version.tar.gz" "ferry-$pkg_version"
}

# --- 2. deb -------------------------------------------------------------------------------

build_deb() {
    local deb
    rm -rf "$work/deb" && cp -a "$tree" "$work/deb"
    (cd "$work/deb" && dpkg-buildpackage -b -us -uc >"$work/deb.log" 2>&1) || {
        tail -n 40 "$work/deb.log" >&2
        die "dpkg-buildpackage failed (missing build dependencies: make package-deps)"
    }
    for deb in "$work"/ferry_*.deb; do
        mv "$deb" "$outdir/"
        echo "$outdir/${deb##*/}"
    done
}

# --- 3. rpm -------------------------------------------------------------------------------

build_rpm() {
    local top=$work/rpmbuild args=() f
    mkdir -p "$top/SOURCES" "$top/SPECS"
    cp "$work/ferry-$pkg_version.tar.gz" "$here/ferry.sysusers" "$top/SOURCES/"
    cp "$here/ferry.spec" "$top/SPECS/ferry.spec"
    args=(--define "_topdir $top")
    [ -z "$release" ] || args+=(--define "ferry_release $release")
    if [ -z "$(rpm --eval '%{?pyproject_wheel}')" ]; then
        # Not a Fedora/EL build root: the compat macros, and no BuildRequires check.
        args+=(--load "$here/rpm/macros.compat" --define "ferry_compat_dir $here/rpm" --nodeps)
    fi
    rpmbuild -ba "${args[@]}" "$top/SPECS/ferry.spec" >"$work/rpm.log" 2>&1 || {
        tail -n 40 "$work/rpm.log" >&2
        die "rpmbuild failed"
    }
    for f in "$top"/RPMS/*/ferry-*.rpm "$top"/SRPMS/ferry-*.src.rpm; do
        mv "$f" "$outdir/"
        echo "$outdir/${f##*/}"
    done
}

step() { log "$1 (${SECONDS}s)"; "$1"; }

log "ferry $version (package $pkg_version${release:+-$release}), in $work"
step copy_source
case $what in deb|all) step build_deb ;; esac
case $what in rpm|all) step build_rpm ;; esac
log "done (${SECONDS}s)"
