#!/usr/bin/env bash
# Build mpicaffe's container images with buildah (no Docker daemon, no registry needed).
#
#   scripts/build_images.sh [cpu] [gpu] [apptainer] [--print-tag]
#   scripts/build_images.sh --apptainer ARGS...
#
# cpu (the default): docker/Dockerfile.cpu -> mpicaffe-cpu:<hash>, real Caffe + the built-in engine.
# gpu: docker/Dockerfile.gpu -> mpicaffe-gpu:<hash>, a CUDA build of PyTorch (several GB).
# apptainer: the CPU image as an OCI archive, then `apptainer build` of docker/mpicaffe.def:
#   build/images/mpicaffe-cpu.sif. Without apptainer on the PATH, a Debian sid root with
#   Debian's apptainer package is made once (see ensure_sid_apptainer) and runs it.
# --print-tag: print the names of the cpu and gpu images asked for (cpu by default), no build.
# --apptainer ARGS: run `apptainer ARGS` in build/images, the same way (the rest of the line
#   goes to apptainer), e.g. --apptainer exec mpicaffe-cpu.sif mpicaffe --version.
#
# <hash> covers every file that goes into an image, so an unchanged tree is not rebuilt
# (`buildah images` already has the tag), and a rebuild reuses the cached heavy layers
# (system packages, PyTorch, Caffe) unless docker/ or the install scripts changed.
# The Debian base image (FROM docker.io/library/debian:bookworm) is made locally with
# debootstrap from this machine's Debian mirror when it is not in buildah's store.
# Wheels found on this machine (pip's find-links, local indexes) are handed to the build, so
# PyTorch is not downloaded again; elsewhere pip fetches them from PyPI.
# Needs root, buildah and debootstrap (Debian: apt-get install buildah debootstrap).
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=docker.io/library/debian:bookworm
SUITE=bookworm
CPU_TORCH="torch==2.13.0"   # as scripts/setup.sh pins it: the CPU wheel where one lies on disk
GPU_TORCH="torch==2.14.1"   # a CUDA build (PyPI's default torch for Linux x86_64)
# vfs and chroot: what works as root inside an unprivileged container (no overlay mounts,
# no runc namespaces); harmless elsewhere.
BUILDAH=(buildah --storage-driver vfs)
# The heavy build runs at low priority: CI machines are shared.
NICE=(nice -n 19)

say() { printf 'build_images: %s\n' "$*"; }
die() { printf 'build_images: error: %s\n' "$*" >&2; exit 1; }

targets=()
print_tag=0
run_apptainer=0
apptainer_args=()
while (($#)); do
  case "$1" in
    cpu|gpu|apptainer) targets+=("$1") ;;
    --print-tag) print_tag=1 ;;
    --apptainer) run_apptainer=1; shift; apptainer_args=("$@"); break ;;
    -h|--help) sed -n '2,24s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (cpu, gpu, apptainer, --print-tag, --apptainer ARGS)" ;;
  esac
  shift
done
((${#targets[@]})) || targets=(cpu)

# The tag: a hash of the image's inputs, the build script included (it picks the wheels).
# Generated and cached files (__pycache__, wheels) are left out.
image_tag() {
  local dockerfile="$1"
  {
    printf '%s\n' "$dockerfile" "$CPU_TORCH" "$GPU_TORCH"
    find "$dockerfile" docker/.dockerignore scripts/build_images.sh scripts/install_caffe.sh \
      pyproject.toml setup.py README.md mpicaffe prototxt \
      -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-12
}
CPU_IMAGE="localhost/mpicaffe-cpu:$(image_tag docker/Dockerfile.cpu)"
GPU_IMAGE="localhost/mpicaffe-gpu:$(image_tag docker/Dockerfile.gpu)"
if ((print_tag)); then
  for target in "${targets[@]}"; do
    case "$target" in
      cpu) echo "$CPU_IMAGE" ;;
      gpu) echo "$GPU_IMAGE" ;;
    esac
  done
  exit 0
fi

((EUID == 0)) || die "buildah here runs as root (vfs storage, chroot isolation); run with sudo"
command -v buildah >/dev/null || die "buildah not found (Debian: apt-get install buildah)"

have_image() { [[ -n "$("${BUILDAH[@]}" images -q "$1" 2>/dev/null)" ]]; }

# The Debian mirror this machine's apt uses: the base image and Caffe's source come from it.
debian_mirror() {
  local uri
  # shellcheck disable=SC2016  # $(REPO_URI) is apt's format field
  uri="$(apt-get indextargets --format '$(REPO_URI)' 'Origin: Debian' 'Label: Debian' 2>/dev/null | head -n 1)"
  echo "${uri:-http://deb.debian.org/debian/}"
}

ensure_base() {
  have_image "$BASE" && return
  command -v debootstrap >/dev/null || die "debootstrap not found (Debian: apt-get install debootstrap)"
  local mirror root ctr mnt started=$SECONDS
  mirror="$(debian_mirror)"
  mirror="${mirror%/}"
  root="$(mktemp -d /var/tmp/mpicaffe-rootfs.XXXXXX)"
  # shellcheck disable=SC2064  # expand now
  trap "rm -rf '$root'" EXIT
  say "making $BASE with debootstrap from $mirror (a minute or two)"
  "${NICE[@]}" debootstrap --variant=minbase "$SUITE" "$root" "$mirror" >"$root.log" 2>&1 || {
    tail -n 20 "$root.log" >&2
    die "debootstrap failed (log: $root.log)"
  }
  # The image's apt uses the same mirror as this machine (install_caffe.sh reads it from there).
  printf 'deb %s %s main\ndeb %s %s-updates main\n' "$mirror" "$SUITE" "$mirror" "$SUITE" \
    >"$root/etc/apt/sources.list"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  ctr="$("${BUILDAH[@]}" from scratch)"
  mnt="$("${BUILDAH[@]}" mount "$ctr")"
  cp -a "$root/." "$mnt/"
  "${BUILDAH[@]}" umount "$ctr" >/dev/null
  "${BUILDAH[@]}" config --env LANG=C.UTF-8 --cmd /bin/bash "$ctr"
  "${BUILDAH[@]}" commit --rm -q "$ctr" "$BASE" >/dev/null
  rm -rf "$root" "$root.log"
  trap - EXIT
  say "made $BASE in $((SECONDS - started)) s"
}

# Put the wheels pip resolves for a requirement (from this machine's find-links or local
# indexes when they have it, else PyPI) into a cache folder that the build mounts at /wheels:
# mounted, not copied, so they never end up in a layer.
WHEELS="${MPICAFFE_CACHE:-$HOME/.cache/mpicaffe}/wheels"
stage_wheels() {
  local deps="$2" req="$3" dest="$WHEELS/$1"
  mkdir -p "$dest"
  local py=python3
  [[ -x .venv/bin/python ]] && py=.venv/bin/python
  # This machine's Python stands for the image's: both are CPython 3.11 on x86_64 glibc Linux.
  local flags=(--disable-pip-version-check -q --only-binary=:all: --dest "$dest")
  [[ "$deps" == nodeps ]] && flags+=(--no-deps)
  # pip warns about local index entries that lack this package; only failures matter here.
  "$py" -m pip download "${flags[@]}" "$req" 2> >(grep -v "is ignored: it is neither" >&2) ||
    die "pip download $req failed"
}

build() {
  local dockerfile="$1" image="$2" torch="$3" wheels="$4"
  shift 4  # the rest: more options for buildah bud
  if have_image "$image"; then
    say "$image is up to date"
    return
  fi
  local started=$SECONDS extra=(--volume "$wheels:/wheels:ro" "$@")
  # Where this machine reaches PyPI through a TLS proxy, pip here trusts a CA bundle of its own;
  # the build's pip gets the same bundle, mounted for RUN steps only, never stored in the image.
  local ca="${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}"
  if [[ -n "$ca" && -f "$ca" ]]; then
    extra+=(--volume "$ca:/run/mpicaffe-build-ca.crt:ro" --build-arg PIP_CERT=/run/mpicaffe-build-ca.crt)
  fi
  say "building $image from $dockerfile (log: build/images/$(basename "$dockerfile").log)"
  mkdir -p build/images
  # --layers: unchanged steps (system packages, PyTorch, Caffe) come from the cache, so a change
  # to mpicaffe's source only redoes the last steps. A RUN step's buildah re-executes itself from
  # a sealed in-memory copy of its binary, and the kernel can refuse the seal for a moment (EBUSY);
  # that step then ran nothing, so the build is tried again from the cached steps (twice at most).
  local log try
  log="build/images/$(basename "$dockerfile").log"
  for try in 1 2 3; do
    "${NICE[@]}" "${BUILDAH[@]}" bud --isolation chroot --pull=never --layers --force-rm \
      --build-arg "TORCH_REQUIREMENT=$torch" "${extra[@]}" --ignorefile docker/.dockerignore -f "$dockerfile" -t "$image" . \
      >"$log" 2>&1 && break
    if ((try == 3)) || ! grep -q "sealing memfd copy" "$log"; then
      tail -n 40 "$log" >&2
      die "building $image failed (log: $log)"
    fi
    say "buildah could not re-execute itself (sealing memfd copy: a passing kernel refusal); trying again"
  done
  "${BUILDAH[@]}" tag "$image" "${image%:*}:latest"
  say "built $image in $((SECONDS - started)) s"
  prune_old "$image"
}

# vfs keeps a full copy of the file system per layer: drop the images of earlier trees, then
# the cached steps only they used (untagged images no other image builds on). The cached
# steps under the new image stay.
prune_old() {
  local image="$1" old
  for old in $("${BUILDAH[@]}" images --format '{{.Name}}:{{.Tag}}'); do
    [[ "$old" == "${image%:*}:"* && "$old" != "$image" && "$old" != "${image%:*}:latest" ]] &&
      "${BUILDAH[@]}" rmi "$old" >/dev/null
  done
  while [[ -n "$("${BUILDAH[@]}" rmi --prune 2>/dev/null)" ]]; do :; done
}

# Debian 12 has no Apptainer package; Debian sid has one, built against a newer C library than
# bookworm's. Where apptainer is not on the PATH, it runs from a Debian sid root made once with
# debootstrap from this machine's mirror (kept in the cache folder).
SID_ROOT="${MPICAFFE_CACHE:-$HOME/.cache/mpicaffe}/apptainer-sid"

# Run a command in the sid root, with /proc, /sys, /dev and build/images (as /work) mounted, in
# a mount namespace of its own: the mounts go away with it, however it ends. pivot_root, not
# chroot: apptainer refuses to start in a chroot.
in_sid() {
  local root="$1"
  shift
  mkdir -p "$root/work" "$root/.old-root"
  # shellcheck disable=SC2016  # the inner bash expands them
  unshare --mount --propagation private -- bash -euc '
    root="$1" work="$2"
    shift 2
    mount --bind "$root" "$root"
    mount -t proc proc "$root/proc"
    mount --rbind /sys "$root/sys"
    mount --rbind /dev "$root/dev"
    mount --bind "$work" "$root/work"
    cd "$root"
    pivot_root . .old-root
    umount -l /.old-root
    cd /
    exec "$@"' in_sid "$root" "$PWD/build/images" "$@"
}

ensure_sid_apptainer() {
  [[ -x "$SID_ROOT/usr/bin/apptainer" ]] && return
  command -v debootstrap >/dev/null || die "debootstrap not found (Debian: apt-get install debootstrap)"
  local mirror tmp="$SID_ROOT.tmp" started=$SECONDS
  mirror="$(debian_mirror)"
  rm -rf "$tmp"
  mkdir -p "$tmp" build/images
  say "making a Debian sid root with apptainer in $SID_ROOT from $mirror (once, about a minute)"
  "${NICE[@]}" debootstrap --variant=minbase sid "$tmp" "$mirror" >"$tmp.log" 2>&1 || {
    tail -n 20 "$tmp.log" >&2
    die "debootstrap sid failed (log: $tmp.log)"
  }
  # A mirror that is a dated snapshot serves an expired Release file; its signature still holds.
  echo 'Acquire::Check-Valid-Until "false";' >"$tmp/etc/apt/apt.conf.d/99mpicaffe"
  # apptainer binds /etc/hosts into its containers; debootstrap leaves none
  printf '127.0.0.1 localhost\n::1 localhost\n' >"$tmp/etc/hosts"
  in_sid "$tmp" env DEBIAN_FRONTEND=noninteractive sh -ec \
    'apt-get update -q && apt-get install -y -q --no-install-recommends apptainer && apt-get clean' \
    >>"$tmp.log" 2>&1 || {
    tail -n 20 "$tmp.log" >&2
    die "installing apptainer in the sid root failed (log: $tmp.log)"
  }
  # Root's containers ask for every capability; where root here lacks one (CAP_SYS_RESOURCE in
  # a sandboxed VM) they fail to start, so they get none: mpicaffe needs none.
  sed -i 's/^root default capabilities = full$/root default capabilities = no/' \
    "$tmp/etc/apptainer/apptainer.conf"
  mv "$tmp" "$SID_ROOT"
  rm -f "$tmp.log"
  say "made $SID_ROOT in $((SECONDS - started)) s"
}

# apptainer ARGS in build/images: the one on the PATH, else the sid root's (where build/images
# is /work).
apptainer_in_images() {
  mkdir -p build/images
  if command -v apptainer >/dev/null; then
    (cd build/images && apptainer "$@")
  else
    ensure_sid_apptainer
    in_sid "$SID_ROOT" sh -c 'cd /work && exec apptainer "$@"' apptainer "$@"
  fi
}

# The CPU image as an OCI archive, then `apptainer build` of docker/mpicaffe.def beside it;
# skipped while the SIF is made of the current CPU image and definition.
# MPICAFFE_SIF_COMPRESSION picks mksquashfs's compression: gzip (the default) mounts everywhere;
# lz4 builds four times faster here (1 minute instead of 4) into a 40% larger file (the tests).
build_sif() {
  local sif=build/images/mpicaffe-cpu.sif comp="${MPICAFFE_SIF_COMPRESSION:-gzip}" started=$SECONDS made_of
  made_of="$CPU_IMAGE $(sha256sum <docker/mpicaffe.def | cut -c1-12) $comp"
  if [[ -f "$sif" && "$(cat "$sif.image" 2>/dev/null)" == "$made_of" ]]; then
    say "$sif is up to date"
    return
  fi
  mkdir -p build/images
  rm -f build/images/mpicaffe-cpu.oci.tar "$sif.image"
  "${NICE[@]}" "${BUILDAH[@]}" push -q "$CPU_IMAGE" oci-archive:build/images/mpicaffe-cpu.oci.tar:latest
  cp docker/mpicaffe.def build/images/mpicaffe.def
  say "wrote build/images/mpicaffe-cpu.oci.tar in $((SECONDS - started)) s"
  started=$SECONDS
  # --disable-cache: apptainer would keep a copy of every image's layers in ~/.apptainer/cache
  local flags=(--force --disable-cache --mksquashfs-args "-comp $comp")
  (
    renice -n 19 -p "$BASHPID" >/dev/null
    if command -v apptainer >/dev/null; then
      apptainer_in_images build "${flags[@]}" mpicaffe-cpu.sif mpicaffe.def
    else
      # %test would ask for every capability (root's builds keep them all), which fails where
      # root lacks one (see ensure_sid_apptainer): build without it, then run it with
      # `apptainer test`, which starts the SIF as any container.
      apptainer_in_images build --notest "${flags[@]}" mpicaffe-cpu.sif mpicaffe.def
      apptainer_in_images test mpicaffe-cpu.sif
    fi
  )
  echo "$made_of" >"$sif.image"
  say "wrote $sif ($comp) in $((SECONDS - started)) s"
}

if ((run_apptainer)); then
  apptainer_in_images "${apptainer_args[@]}"
  exit
fi

for target in "${targets[@]}"; do
  case "$target" in
    cpu)
      have_image "$CPU_IMAGE" && { say "$CPU_IMAGE is up to date"; continue; }
      ensure_base
      stage_wheels cpu nodeps "$CPU_TORCH"
      build docker/Dockerfile.cpu "$CPU_IMAGE" "$CPU_TORCH" "$WHEELS/cpu"
      ;;
    gpu)
      have_image "$GPU_IMAGE" && { say "$GPU_IMAGE is up to date"; continue; }
      ensure_base
      # torch and its CUDA libraries (nvidia-* wheels), several GB
      stage_wheels gpu deps "$GPU_TORCH"
      # its last step reads the source from a mounted build context, which buildah's step
      # cache does not look at: the tree's hash tells it when to redo that step
      build docker/Dockerfile.gpu "$GPU_IMAGE" "$GPU_TORCH" "$WHEELS/gpu" \
        --build-arg "SOURCE_HASH=${GPU_IMAGE##*:}"
      ;;
    apptainer)
      have_image "$CPU_IMAGE" || die "build the CPU image first: scripts/build_images.sh cpu apptainer"
      build_sif
      ;;
  esac
done
