#!/usr/bin/env bash
# Makes, on a machine that reaches no container registry, the base images that
# deploy/Dockerfile names, so that the same Dockerfile and compose.yaml build
# and run here unchanged. A machine with a normal Docker install, which pulls
# rust:1-bookworm and debian:bookworm-slim, never needs this script.
#
#   deploy/local-images.sh            # make what is missing
#   deploy/local-images.sh --force    # remake both images and re-vendor
#
# It makes:
#   * the runtime base (default name debian:bookworm-slim): a Debian bookworm
#     root made by `debootstrap --variant=minbase`, trimmed, loaded with
#     `docker import`;
#   * the builder (default name rust:1-bookworm): the same root plus
#     gcc, libc6-dev, make and cmake, plus this machine's Rust toolchain
#     (`rustc --print sysroot`) in /usr/local/rust, on PATH;
#   * vendor/ at the repository root: every crate of Cargo.lock, so that the
#     image build (which reaches no crate registry) runs offline. The
#     Dockerfile then uses deploy/cargo-vendor.toml as its cargo config.
#
# The Debian mirror is the one this machine's own apt sources name.
# Needs root, docker (a running engine), debootstrap, rustc and cargo.
#
# Environment:
#   RUST_IMAGE, RUNTIME_IMAGE  image names to make (defaults: the Dockerfile's)
#   DEBIAN_MIRROR              mirror to debootstrap from (default: from apt)
#   LOCAL_IMAGES_WORKDIR       scratch directory (default /var/tmp/pingora-lb-images)
set -euo pipefail

RUST_IMAGE=${RUST_IMAGE:-rust:1-bookworm}
RUNTIME_IMAGE=${RUNTIME_IMAGE:-debian:bookworm-slim}
SUITE=bookworm
WORKDIR=${LOCAL_IMAGES_WORKDIR:-/var/tmp/pingora-lb-images}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENDOR_DIR=$REPO/vendor
# Written inside vendor/; cargo skips dot files in a vendor directory.
VENDOR_STAMP=$VENDOR_DIR/.cargo-lock.sha256
BUILDER_PACKAGES=(gcc libc6-dev make cmake)
# The image's search path; /usr/local/cargo/bin is where the official rust
# image puts cargo and where `cargo install` would put tools.
BUILDER_PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

force=0
vendor=1

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
    cat <<EOF
Options:
  --force       remake the images even if they exist, and re-vendor
  --no-vendor   do not make vendor/ (the image build then needs crates.io)
  -h, --help    this text
EOF
}

while [ $# -gt 0 ]; do
    case $1 in
        --force) force=1 ;;
        --no-vendor) vendor=0 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "local-images.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

log() { printf '[local-images] %s\n' "$*" >&2; }
die() { printf '[local-images] error: %s\n' "$*" >&2; exit 1; }

require() {
    local cmd
    for cmd in "$@"; do
        command -v "$cmd" >/dev/null 2>&1 || die "'$cmd' is not installed (apt-get install docker.io debootstrap; Rust from rustup)"
    done
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# The Debian mirror that this machine's apt sources use for the bookworm suite
# with the main component, from sources.list(.d) in one-line or deb822 form.
apt_mirror() {
    local files=() f
    [ -f /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && files+=("$f")
    done
    [ ${#files[@]} -gt 0 ] || return 1
    awk -v suite="$SUITE" '
        function has(list, word,    n, i, parts) {
            n = split(list, parts, /[ \t]+/)
            for (i = 1; i <= n; i++) if (parts[i] == word) return 1
            return 0
        }
        function stanza_end() {
            if (!found && has(types, "deb") && has(suites, suite) && has(comps, "main") && uris != "") {
                split(uris, u, /[ \t]+/); print u[1]; found = 1
            }
            types = uris = suites = comps = ""
        }
        FNR == 1 { if (deb822) stanza_end(); deb822 = (FILENAME ~ /\.sources$/) }
        # deb822: stanzas of "Key: value" lines separated by blank lines.
        deb822 && /^[ \t]*$/ { stanza_end(); next }
        deb822 && /^[ \t]*#/ { next }
        deb822 {
            key = tolower($1); sub(/:$/, "", key)
            val = $0; sub(/^[^:]*:[ \t]*/, "", val)
            if (key == "types") types = val
            else if (key == "uris") uris = val
            else if (key == "suites") suites = val
            else if (key == "components") comps = val
            next
        }
        # One-line form: deb [options] URI suite component...
        !found && $1 == "deb" {
            line = $0; sub(/^deb[ \t]+/, "", line)
            if (line ~ /^\[/) sub(/^\[[^]]*\][ \t]*/, "", line)
            n = split(line, w, /[ \t]+/)
            if (n >= 3 && w[2] == suite) {
                for (i = 3; i <= n; i++) if (w[i] == "main") { print w[1]; found = 1; break }
            }
        }
        END { if (deb822) stanza_end() }
    ' "${files[@]}" | head -n 1 | grep .
}

# A minbase Debian root in $1 (made once, then copied for the second image).
debootstrap_root() {
    local dest=$1 cache=$WORKDIR/debootstrap-$SUITE
    if [ ! -e "$cache/.complete" ]; then
        local mirror=${DEBIAN_MIRROR:-}
        if [ -z "$mirror" ]; then
            mirror=$(apt_mirror) || die "no 'deb' source for $SUITE main in /etc/apt/sources.list(.d); set DEBIAN_MIRROR"
        fi
        log "debootstrap --variant=minbase $SUITE from the mirror of this machine's apt sources"
        rm -rf "$cache"
        mkdir -p "$cache"
        local started=$SECONDS
        debootstrap --variant=minbase "$SUITE" "$cache" "$mirror" >"$WORKDIR/debootstrap.log" 2>&1 ||
            die "debootstrap failed; see $WORKDIR/debootstrap.log"
        # Nothing of this host stays in the image: Docker provides these files.
        : >"$cache/etc/resolv.conf"
        : >"$cache/etc/hostname"
        touch "$cache/.complete"
        log "debootstrap done in $((SECONDS - started)) s"
    fi
    rm -rf "$dest"
    mkdir -p "$dest"
    cp -a "$cache/." "$dest/"
    rm -f "$dest/.complete"
}

# What a slim image leaves out: documentation, manual pages, translations,
# package caches and lists.
trim_root() {
    local root=$1
    find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
    rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
        "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
        "$root"/var/lib/apt/lists/* "$root"/var/log/*.log "$root"/var/cache/debconf/*-old \
        "$root"/tmp/* "$root"/var/tmp/*
}

# Runs a command inside the root with /proc mounted (the dynamic loader reads
# /proc/self/exe to find the Rust toolchain's libraries; apt's scripts use it).
in_root() {
    local root=$1 rc=0
    shift
    mount -t proc proc "$root/proc"
    chroot "$root" "$@" || rc=$?
    umount "$root/proc"
    return $rc
}

# Installs Debian packages in the root, with this host's name resolution only
# while apt-get runs.
root_apt_install() {
    local root=$1 rc=0
    shift
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    {
        in_root "$root" apt-get update -q &&
            in_root "$root" env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -q --no-install-recommends "$@" &&
            in_root "$root" apt-get clean
    } >"$WORKDIR/apt-get.log" 2>&1 || rc=$?
    : >"$root/etc/resolv.conf"
    [ $rc -eq 0 ] || die "apt-get install $* in the builder root failed; see $WORKDIR/apt-get.log"
}

import_root() {
    local root=$1 name=$2
    shift 2
    local started=$SECONDS
    tar --numeric-owner -C "$root" -c . | docker import "$@" - "$name" >/dev/null
    log "imported $name in $((SECONDS - started)) s"
}

make_runtime_image() {
    if image_exists "$RUNTIME_IMAGE" && [ $force -eq 0 ]; then
        log "$RUNTIME_IMAGE exists (use --force to remake it)"
        return
    fi
    local root=$WORKDIR/runtime-root
    debootstrap_root "$root"
    trim_root "$root"
    import_root "$root" "$RUNTIME_IMAGE" \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]'
    rm -rf "$root"
}

make_builder_image() {
    if image_exists "$RUST_IMAGE" && [ $force -eq 0 ]; then
        log "$RUST_IMAGE exists (use --force to remake it)"
        return
    fi
    local sysroot root=$WORKDIR/builder-root
    sysroot=$(rustc --print sysroot) || die "rustc --print sysroot failed"
    if [ ! -x "$sysroot/bin/rustc" ] || [ ! -x "$sysroot/bin/cargo" ]; then
        die "$sysroot has no bin/rustc and bin/cargo"
    fi
    debootstrap_root "$root"
    log "installing ${BUILDER_PACKAGES[*]} in the builder root"
    root_apt_install "$root" "${BUILDER_PACKAGES[@]}"
    log "copying the Rust toolchain ($(rustc --version)) into /usr/local/rust"
    mkdir -p "$root/usr/local/rust" "$root/usr/local/cargo/bin"
    # The toolchain without its HTML documentation (most of its size).
    tar -C "$sysroot" --exclude=./share/doc -c . | tar -C "$root/usr/local/rust" -x
    in_root "$root" /usr/local/rust/bin/rustc --version >/dev/null || die "the copied rustc does not run in the builder root"
    in_root "$root" /usr/local/rust/bin/cargo --version >/dev/null || die "the copied cargo does not run in the builder root"
    trim_root "$root"
    import_root "$root" "$RUST_IMAGE" \
        --change "ENV PATH=$BUILDER_PATH" \
        --change 'ENV CARGO_HOME=/usr/local/cargo' \
        --change 'CMD ["bash"]'
    rm -rf "$root"
}

vendor_crates() {
    [ $vendor -eq 1 ] || { log "not vendoring (--no-vendor)"; return; }
    local want
    want=$(sha256sum "$REPO/Cargo.lock" | cut -d' ' -f1)
    if [ $force -eq 0 ] && [ -f "$VENDOR_STAMP" ] && [ "$(cat "$VENDOR_STAMP")" = "$want" ]; then
        log "vendor/ matches Cargo.lock"
        return
    fi
    log "vendoring the crates of Cargo.lock into vendor/"
    local started=$SECONDS
    # The printed source-replacement snippet is not needed: deploy/cargo-vendor.toml has it.
    cargo vendor --quiet --locked --manifest-path "$REPO/Cargo.toml" "$VENDOR_DIR" \
        >/dev/null 2>"$WORKDIR/cargo-vendor.log" ||
        die "cargo vendor failed; see $WORKDIR/cargo-vendor.log"
    echo "$want" >"$VENDOR_STAMP"
    log "vendored $(find "$VENDOR_DIR" -mindepth 1 -maxdepth 1 -type d | wc -l) crates in $((SECONDS - started)) s"
}

main() {
    [ "$(id -u)" -eq 0 ] || die "run as root (debootstrap and chroot need it)"
    require docker debootstrap rustc cargo tar awk sha256sum
    docker info >/dev/null 2>&1 || die "the Docker engine does not answer (start dockerd)"
    mkdir -p "$WORKDIR"
    # --force also starts from a fresh debootstrap.
    [ $force -eq 0 ] || rm -rf "$WORKDIR/debootstrap-$SUITE"
    make_runtime_image
    make_builder_image
    vendor_crates
    rm -rf "$WORKDIR/runtime-root" "$WORKDIR/builder-root"
    log "images:"
    local name
    for name in "$RUNTIME_IMAGE" "$RUST_IMAGE"; do
        printf '  %-24s %s\n' "$name" "$(docker image inspect --format '{{.Size}}' "$name" |
            awk '{ printf "%.0f MB", $1 / 1000000 }')" >&2
    done
}

main
