#!/usr/bin/env bash
# Build BVLC Caffe (CPU only, with pycaffe and the `caffe` tool) from Debian's
# source package and make it importable from the active virtual environment.
#
#   . venv/bin/activate && scripts/install_caffe.sh [--prefix DIR] [--jobs N] [--force] [--keep-build]
#
# The build goes to a cached, versioned prefix (default
# ${MPICAFFE_CACHE:-~/.cache/mpicaffe}/caffe-<debian version>-<python tag>-numpy<major>);
# a later run, from this or a new venv, only links that prefix into the venv.
# Environment: MPICAFFE_CAFFE_PREFIX (same as --prefix), MPICAFFE_CACHE,
# MPICAFFE_DEBIAN_MIRROR (a Debian mirror URI, when apt's sources name none).
set -euo pipefail

CAFFE_VERSION="1.0.0+git20180821.99bd997-8"
CAFFE_SUITE="bullseye"
# Bump when the build recipe below changes, so cached prefixes get rebuilt.
RECIPE=1

APT_BUILD_DEPS=(
  cmake g++ make dpkg-dev
  libboost-system-dev libboost-thread-dev libboost-filesystem-dev libboost-python-dev
  libgflags-dev libgoogle-glog-dev libhdf5-dev liblmdb-dev libopenblas-dev
  libprotobuf-dev protobuf-compiler
)
# What `import caffe` and caffe.io need; scikit-image brings scipy and Pillow.
# protobuf >= 3.20: the generated caffe_pb2.py uses the `builder` API.
PIP_DEPS=(numpy "protobuf>=3.20" scikit-image six)

say() { printf 'install_caffe: %s\n' "$*"; }
die() { printf 'install_caffe: error: %s\n' "$*" >&2; exit 1; }

usage() {
  sed -n '2,12s/^# \{0,1\}//p' "$0"
  exit "${1:-0}"
}

prefix="${MPICAFFE_CAFFE_PREFIX:-}"
jobs="$(nproc 2>/dev/null || echo 2)"
force=0
keep_build=0
while (($#)); do
  case "$1" in
    --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
    --prefix=*) prefix="${1#*=}"; shift ;;
    --jobs|-j) jobs="${2:?--jobs needs a number}"; shift 2 ;;
    --force) force=1; shift ;;
    --keep-build) keep_build=1; shift ;;
    -h|--help) usage 0 ;;
    *) printf 'install_caffe: unknown argument: %s\n' "$1" >&2; usage 2 >&2 ;;
  esac
done

[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || die "--jobs needs a positive number, not '$jobs'"

# ---- the virtual environment ------------------------------------------------
[[ -n "${VIRTUAL_ENV:-}" && -x "${VIRTUAL_ENV}/bin/python" ]] ||
  die "no active virtual environment: run '. <venv>/bin/activate' first"
PY="${VIRTUAL_ENV}/bin/python"
"$PY" -m pip --version >/dev/null 2>&1 || die "pip is missing from ${VIRTUAL_ENV}"

ensure_python_deps() {
  # Importing is much faster than asking pip, and keeps a repeat run in seconds.
  if ! "$PY" -c 'import numpy, google.protobuf, skimage, six' >/dev/null 2>&1; then
    say "installing Python dependencies into ${VIRTUAL_ENV}: ${PIP_DEPS[*]}"
    "$PY" -m pip install --disable-pip-version-check -q "${PIP_DEPS[@]}" ||
      die "pip install ${PIP_DEPS[*]} failed"
  fi
}
ensure_python_deps

py_tag="$("$PY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')"
py_version="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
# _caffe.so built against numpy 1 headers fails to import under numpy 2, so
# builds for the two are cached apart.
numpy_major="$("$PY" -c 'import numpy; print(numpy.__version__.split(".")[0])')"
prefix="${prefix:-${MPICAFFE_CACHE:-$HOME/.cache/mpicaffe}/caffe-${CAFFE_VERSION}-${py_tag}-numpy${numpy_major}}"
case "$prefix" in /*) ;; *) prefix="$PWD/$prefix" ;; esac
pkg_dir="$prefix/lib/python3/dist-packages"   # Debian's patch series installs pycaffe here
stamp="$prefix/.mpicaffe-install-stamp"
proto="$prefix/share/caffe/caffe.proto"   # Caffe's own schema, which tests compare ours against
build_dir="$prefix/build"
log_dir="$build_dir/logs"
stamp_text="caffe ${CAFFE_VERSION} recipe ${RECIPE} python ${py_version} numpy ${numpy_major}"

# A rebuild empties the prefix's bin/, lib/ etc.: never do that to a directory
# this script did not make (say --prefix /usr/local).
if [[ -n "$(ls -A "$prefix" 2>/dev/null)" && ! -f "$prefix/.mpicaffe-prefix" ]]; then
  die "$prefix is not empty and was not made by this script; choose another --prefix"
fi
mkdir -p "$prefix"
touch "$prefix/.mpicaffe-prefix"

# Concurrent runs (CI jobs, several venvs) would otherwise build into one prefix at once.
if command -v flock >/dev/null; then
  exec 9>"$prefix/.lock"
  flock 9
fi

installed_ok() {
  [[ -f "$stamp" && "$(cat "$stamp")" == "$stamp_text" && -x "$prefix/bin/caffe" && -f "$proto" ]] &&
    env -u LD_LIBRARY_PATH PYTHONPATH="$pkg_dir" "$PY" -c 'import caffe' >/dev/null 2>&1
}

link_into_venv() {
  local site
  site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  printf '%s\n' "$pkg_dir" >"$site/mpicaffe_caffe.pth"
  local bin="${VIRTUAL_ENV}/bin/caffe"
  if [[ -e "$bin" && ! -L "$bin" ]]; then
    say "warning: $bin exists and is not a link; not replacing it (caffe is $prefix/bin/caffe)"
  else
    ln -sfn "$prefix/bin/caffe" "$bin"
  fi
}

verify() {
  local where
  where="$(env -u LD_LIBRARY_PATH "$PY" -c 'import caffe, caffe.io; print(caffe.__file__)' 2>&1)" ||
    die "'import caffe' fails in ${VIRTUAL_ENV}: $where"
  env -u LD_LIBRARY_PATH "$prefix/bin/caffe" --version >/dev/null 2>&1 ||
    die "$prefix/bin/caffe does not run"
  say "import caffe -> $where"
  say "caffe tool -> ${VIRTUAL_ENV}/bin/caffe ($("$prefix/bin/caffe" --version 2>&1))"
}

if ((!force)) && installed_ok; then
  link_into_venv
  verify
  say "Caffe ${CAFFE_VERSION} already built in $prefix"
  exit 0
fi

# ---- system build dependencies ----------------------------------------------
if ! command -v apt-get >/dev/null || ! command -v dpkg-query >/dev/null; then
  die "apt-get not found: this script builds Caffe on Debian (or a derivative) only"
fi
SUDO=()
if ((EUID != 0)); then
  command -v sudo >/dev/null || die "installing build dependencies needs root or sudo"
  SUDO=(sudo)
fi

py_include="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
apt_deps=("${APT_BUILD_DEPS[@]}")
if [[ ! -f "$py_include/Python.h" ]]; then
  # Only Debian's own interpreters get their headers from apt.
  [[ "$py_include" == /usr/include/* ]] ||
    die "Python.h not found in $py_include: install the headers for $PY"
  apt_deps+=("libpython${py_version}-dev")
fi

missing=()
for pkg in "${apt_deps[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
done
mkdir -p "$log_dir"
if ((${#missing[@]})); then
  say "installing build dependencies with apt: ${missing[*]}"
  {
    "${SUDO[@]}" apt-get update &&
      DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
  } >"$log_dir/apt-install.log" 2>&1 || {
    tail -n 20 "$log_dir/apt-install.log" >&2
    die "apt-get install failed (full log: $log_dir/apt-install.log)"
  }
fi

# The runtime libraries may simply have been missing on this machine.
if ((!force)) && installed_ok; then
  link_into_venv
  verify
  say "Caffe ${CAFFE_VERSION} already built in $prefix"
  exit 0
fi

# Debian's Boost.Python exists for Debian's default python3 only; without it
# CMake quietly builds Caffe without pycaffe.
multiarch="$(gcc -print-multiarch)"
boost_python="/usr/lib/${multiarch}/libboost_python${py_version/./}.so"
[[ -e "$boost_python" ]] ||
  die "no Boost.Python for Python ${py_version} ($boost_python); use a venv made from this system's python3 version"

# CMake's FindPythonLibs needs a shared libpython to link pycaffe and the Python layer.
py_library="$("$PY" - <<'EOF'
import os, sysconfig
v = sysconfig.get_config_var
name = "libpython%s.so" % v("LDVERSION")
for d in (v("LIBDIR"), os.path.join(v("LIBDIR") or "", v("MULTIARCH") or "")):
    if d and os.path.exists(os.path.join(d, name)):
        print(os.path.join(d, name))
        break
EOF
)"
[[ -n "$py_library" ]] ||
  die "no shared libpython${py_version}.so for $PY (Debian: apt-get install libpython${py_version}-dev)"

# ---- Debian source package ------------------------------------------------------
debian_mirror() {
  if [[ -n "${MPICAFFE_DEBIAN_MIRROR:-}" ]]; then
    echo "$MPICAFFE_DEBIAN_MIRROR"
    return
  fi
  # apt itself reads both source formats (one-line and deb822); this needs the
  # package lists to have been fetched once, which most machines have.
  local uri
  # shellcheck disable=SC2016  # $(REPO_URI) is apt's format field, not the shell's
  uri="$(apt-get indextargets --format '$(REPO_URI)' 'Origin: Debian' 'Label: Debian' 2>/dev/null | head -n 1)"
  if [[ -z "$uri" ]]; then
    # No lists yet: read the URIs from the source files, keeping the main
    # archive (…/debian, or a snapshot of it) and skipping security/ports.
    uri="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
      awk '/^[[:space:]]*deb(-src)?[[:space:]]/ { sub(/\[[^]]*\]/, ""); print $2 }
           /^[[:space:]]*URIs:/ { for (i = 2; i <= NF; i++) print $i }' |
      grep -E '/debian(/[0-9]{8}T[0-9]{6}Z)?/?$' | head -n 1 || true)"
  fi
  echo "${uri%/}"
}

fetch_source() {
  local mirror="$1" dest="$2" apt_dir
  # Under /var/tmp: apt's unprivileged _apt user must reach it, and /tmp is not
  # always world-searchable.
  apt_dir="$(mktemp -d /var/tmp/install_caffe.apt.XXXXXX)"
  # shellcheck disable=SC2064  # expand now: apt_dir is local
  trap "rm -rf '$apt_dir'" EXIT
  # A private apt configuration: the deb-src entry for the older suite never
  # touches the system's sources or package lists.
  mkdir -p "$apt_dir"/{lists/partial,cache/archives/partial,parts,dl,tmp}
  local keyring=/usr/share/keyrings/debian-archive-keyring.gpg options=""
  [[ -f "$keyring" ]] && options="[signed-by=$keyring] "
  echo "deb-src ${options}${mirror} ${CAFFE_SUITE} main" >"$apt_dir/sources.list"
  chmod -R a+rX "$apt_dir"
  # apt's signature check runs as _apt and writes to TMPDIR.
  chmod 1777 "$apt_dir/tmp"
  # apt downloads as the unprivileged _apt user where it exists.
  if ((EUID == 0)) && id _apt >/dev/null 2>&1; then
    chown _apt "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/dl"
  fi
  local apt_opts=(
    -o "Dir::Etc::SourceList=$apt_dir/sources.list"
    -o "Dir::Etc::SourceParts=$apt_dir/parts"
    -o "Dir::State::Lists=$apt_dir/lists"
    -o "Dir::Cache=$apt_dir/cache"
    # Snapshot mirrors serve Release files whose Valid-Until has passed; the
    # signature is still checked.
    -o "Acquire::Check-Valid-Until=false"
  )
  TMPDIR="$apt_dir/tmp" apt-get "${apt_opts[@]}" update >>"$log_dir/fetch.log" 2>&1 || return 1
  # apt checks the downloaded files against the signed Sources index.
  (cd "$apt_dir/dl" && TMPDIR="$apt_dir/tmp" apt-get "${apt_opts[@]}" source --download-only "caffe=${CAFFE_VERSION}") \
    >>"$log_dir/fetch.log" 2>&1 || return 1
  # dpkg-source checks the .dsc checksums, unpacks, and applies debian/patches/series.
  rm -rf "$dest"
  dpkg-source -x "$apt_dir/dl/caffe_${CAFFE_VERSION}.dsc" "$dest" >>"$log_dir/fetch.log" 2>&1 || return 1
  rm -f "$(dirname "$dest")"/caffe_*.orig.tar.*   # dpkg-source leaves a copy beside the tree
}

# Replace one literal string in a source file, failing if it is not there, so a
# changed upstream is noticed instead of silently left unfixed.
fix_source() {
  local file="$1" old="$2" new="$3"
  "$PY" - "$file" "$old" "$new" <<'EOF' || die "source fix not applicable to $file: $2"
import sys
path, old, new = sys.argv[1:]
text = open(path).read()
if old not in text:
    sys.exit(1)
open(path, "w").write(text.replace(old, new))
EOF
}

# Run a build step with its output in a log; on failure show the tail.
run_logged() {
  local name="$1"
  shift
  if ! "$@" >"$log_dir/$name.log" 2>&1; then
    tail -n 40 "$log_dir/$name.log" >&2
    die "$name failed (full log: $log_dir/$name.log)"
  fi
}

started=$SECONDS
mirror="$(debian_mirror)"
[[ -n "$mirror" ]] || die "no Debian mirror found in the apt sources; set MPICAFFE_DEBIAN_MIRROR"
src_dir="$build_dir/caffe-${CAFFE_VERSION%-*}"
: >"$log_dir/fetch.log"
say "fetching caffe ${CAFFE_VERSION} (${CAFFE_SUITE}) source from ${mirror}"
fetch_source "$mirror" "$src_dir" || {
  tail -n 20 "$log_dir/fetch.log" >&2
  die "could not fetch the caffe source package from $mirror (full log: $log_dir/fetch.log)"
}

say "applying fixes for current protobuf, numpy and scikit-image"
# Current protobuf's SetTotalBytesLimit takes only the limit (the warning threshold went away).
fix_source "$src_dir/src/caffe/util/io.cpp" \
  'SetTotalBytesLimit(kProtoReadBytesLimit, 536870912)' 'SetTotalBytesLimit(kProtoReadBytesLimit)'
# Current numpy 2 has no ndarray.tostring nor binary np.fromstring (caffe.io's Datum helpers).
fix_source "$src_dir/python/caffe/io.py" 'datum.data = arr.tostring()' 'datum.data = arr.tobytes()'
fix_source "$src_dir/python/caffe/io.py" \
  'np.fromstring(datum.data, dtype=np.uint8)' 'np.frombuffer(datum.data, dtype=np.uint8).copy()'
# Current scikit-image's imread only accepts the as_gray spelling.
fix_source "$src_dir/python/caffe/io.py" 'as_grey=not color' 'as_gray=not color'

say "configuring (CPU_ONLY, OpenBLAS, LMDB, Python ${py_version}, numpy ${numpy_major})"
obj_dir="$build_dir/cmake"
rm -rf "$obj_dir"
mkdir -p "$obj_dir"
run_logged cmake cmake -S "$src_dir" -B "$obj_dir" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_INSTALL_PREFIX="$prefix" \
  -DCPU_ONLY=ON -DUSE_CUDNN=OFF -DUSE_NCCL=OFF \
  -DBLAS=Open -DUSE_OPENCV=OFF -DUSE_LEVELDB=OFF -DUSE_LMDB=ON \
  -DBUILD_python=ON -DBUILD_python_layer=ON -DBUILD_docs=OFF -DBUILD_matlab=OFF \
  -Dpython_version="$py_version" \
  -DPYTHON_EXECUTABLE="$PY" -DPYTHON_INCLUDE_DIR="$py_include" -DPYTHON_LIBRARY="$py_library"
grep -q 'Python interface is disabled' "$log_dir/cmake.log" &&
  die "CMake would build Caffe without pycaffe (see $log_dir/cmake.log)"

say "building with $jobs jobs (a few minutes; log: $log_dir/make.log)"
run_logged make make -C "$obj_dir" -j "$jobs" all

say "installing to $prefix"
rm -rf "${prefix:?}"/{bin,lib,include,share,python} "$stamp"
# Caffe's CMake sets the install RPATH to the prefix's lib and every library
# directory it linked from, so nothing needs LD_LIBRARY_PATH.
run_logged install make -C "$obj_dir" install
install -D -m 644 "$src_dir/src/caffe/proto/caffe.proto" "$proto"
[[ -f "$pkg_dir/caffe/_caffe.so" ]] || die "pycaffe was not installed (see $log_dir/make.log)"
env -u LD_LIBRARY_PATH PYTHONPATH="$pkg_dir" "$PY" -c 'import caffe' >"$log_dir/import.log" 2>&1 || {
  tail -n 20 "$log_dir/import.log" >&2
  die "the built pycaffe does not import (full log: $log_dir/import.log)"
}
echo "$stamp_text" >"$stamp"
if ((!keep_build)); then
  rm -rf "$src_dir" "$obj_dir"   # hundreds of MB of objects; the logs stay
fi

link_into_venv
verify
say "built Caffe ${CAFFE_VERSION} in $((SECONDS - started)) s; prefix $prefix"
