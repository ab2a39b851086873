#!/usr/bin/env bash
# The wheels a lent GPU machine lacks, into .whl/ at the repository root, for benchmarks/gpu_check.sh.
#
# Usage: bash benchmarks/gpu_wheels.sh [--no-check]
#
# The GPU machine has Python 3.12, torch with CUDA, numpy, scipy, scikit-image, matplotlib, pandas, psutil, tqdm,
# nvidia-ml-py, einops and timm (and what pip installed with them), no internet, and takes at most 64 MiB of the
# work tree with it. Everything else that nnU-Net, our package and the checks import must travel as a wheel:
# WHEELS below, each pinned to the version installed in .venv (`pip show`), one version each, for CPython 3.12 on
# manylinux x86_64. openvino stays behind: on CUDA the predictor runs torch, and openvino is imported only where
# the OpenVINO backend runs (the CPU).
#
# Wheels above 1 MiB are re-zipped with LZMA (the same files, the same RECORD; pip reads any zip method that
# Python's zipfile reads): SimpleITK's 272 MB library is 52.8 MB deflated and 28.8 MB with LZMA, and without
# that the wheels alone would pass the limit. The script prints every wheel's size and the total, and fails if
# the wheels and the tree that travels (tracked files and untracked ones git does not ignore) exceed 60 MiB.
#
# The check (skip with --no-check) installs the wheels with `pip install --no-deps --target` into a throwaway
# folder and imports nnU-Net's predictor and trainer and ours with only those, our src/ and what the GPU image
# has: a folder of links to .venv's copies of the image's packages and of everything they require (Python 3.12
# markers), seen by a bare venv (no packages of its own). The interpreter here is 3.11, so the five wheels built for
# cp312 alone are checked as their cp311 twins of the same version. It leaves that interpreter (CHECK/venv/bin/python)
# and a wheel folder for it (CHECK/wheels311), for a rehearsal of the GPU run's wheel mode on this machine:
#   GPU_CHECK_PYTHON=CHECK/venv/bin/python GPU_CHECK_WHEELS=CHECK/wheels311 GPU_CHECK_SITE=CHECK/run-site \
#   bash benchmarks/gpu_check.sh OUT --cpu --wheels
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_PY="$REPO/.venv/bin/python"
WHL="$REPO/.whl"
CHECK="${TMPDIR:-/tmp}/nsn_gpu_wheels_check"
LIMIT_MIB=60
DO_CHECK=1
for arg in "$@"; do
  case "$arg" in
    --no-check) DO_CHECK=0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_wheels.sh: unknown argument '$arg'; see -h" >&2; exit 2 ;;
  esac
done
[ -x "$VENV_PY" ] || { echo "gpu_wheels.sh: no virtual environment at $REPO/.venv" >&2; exit 2; }

# what the GPU machine lacks, by `pip show` name; found by importing with the image's packages alone
WHEELS=(
  # imported by nnunetv2's predictor and trainer, and so by ours
  nnunetv2 acvl_utils dynamic_network_architectures batchgenerators batchgeneratorsv2 SimpleITK nibabel
  blosc2 ndindex msgpack httpx threadpoolctl connected-components-3d seaborn scikit-learn joblib cloudpickle
  narwhals
  # imported when a step runs: gzip checks of the inputs (isal), nsn evaluate (surface-distance)
  isal surface-distance
  # the CUDA tests
  pytest pluggy iniconfig pygments
)
# the GPU image's own packages (what pip installed with them comes along)
IMAGE=(torch numpy scipy scikit-image matplotlib pandas psutil tqdm nvidia-ml-py einops timm pip)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

mkdir -p "$WHL"
# .whl/ must not travel as untracked files nor be committed: ignored through this clone's own exclude file
EXCLUDE="$(git -C "$REPO" rev-parse --git-path info/exclude)"
case "$EXCLUDE" in /*) ;; *) EXCLUDE="$REPO/$EXCLUDE" ;; esac
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >> "$EXCLUDE"

version_of() { "$VENV_PY" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }

# wheel_of NAME VERSION [FOLDER]: the wheel file of that project and version in FOLDER (default .whl), if any
wheel_of() {
  "$VENV_PY" - "$1" "$2" "${3:-$WHL}" <<'PY'
import re, sys
from pathlib import Path
name, version, folder = sys.argv[1:]
canon = re.sub(r"[-_.]+", "_", name).lower()
for wheel in sorted(Path(folder).glob("*.whl")):
    project, wheel_version = wheel.name.split("-")[:2]
    if re.sub(r"[-_.]+", "_", project).lower() == canon and wheel_version == version:
        print(wheel)
        break
PY
}

# drop_other_versions NAME VERSION: keep one version of each project in .whl
drop_other_versions() {
  "$VENV_PY" - "$1" "$2" "$WHL" <<'PY'
import re, sys
from pathlib import Path
name, version, folder = sys.argv[1:]
canon = re.sub(r"[-_.]+", "_", name).lower()
for wheel in Path(folder).glob("*.whl"):
    project, wheel_version = wheel.name.split("-")[:2]
    if re.sub(r"[-_.]+", "_", project).lower() == canon and wheel_version != version:
        print(f"  removing {wheel.name} (another version than {version})")
        wheel.unlink()
PY
}

download() {  # download NAME==VERSION FOLDER PYTHON_VERSION: a binary wheel, or one built from a pure-Python sdist
  local spec="$1" folder="$2" pyver="$3" tmp
  if "$VENV_PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
      "${PLATFORMS[@]}" -d "$folder" "$spec" 2> "$CHECK/download.err"; then
    return 0
  fi
  # no wheel on the index (acvl_utils): build one from the sdist; it must come out pure Python (py3-none-any)
  tmp="$(mktemp -d)"
  "$VENV_PY" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "$spec" 2>> "$CHECK/download.err" \
    && "$VENV_PY" -m pip wheel -q --no-deps -w "$tmp" "$tmp"/*.tar.gz 2>> "$CHECK/download.err" \
    || { echo "gpu_wheels.sh: cannot get a wheel of $spec:" >&2; grep -v 'is ignored' "$CHECK/download.err" | tail -3 >&2
         rm -rf "$tmp"; exit 1; }
  local built; built="$(ls "$tmp"/*.whl)"
  case "$built" in *-none-any.whl) mv "$built" "$folder/" ;;
    *) echo "gpu_wheels.sh: $spec built a platform wheel ($(basename "$built")); it would not fit the GPU machine" >&2
       rm -rf "$tmp"; exit 1 ;; esac
  rm -rf "$tmp"
}

repack_lzma() {  # repack_lzma WHEEL: re-zip with LZMA unless done already (same members, same bytes)
  nice "$VENV_PY" - "$1" <<'PY'
import os, sys, zipfile
path = sys.argv[1]
with zipfile.ZipFile(path) as source:
    if all(i.compress_type == zipfile.ZIP_LZMA for i in source.infolist() if i.file_size > 0):
        sys.exit(0)
    tmp = f"{path}.lzma-{os.getpid()}"
    with zipfile.ZipFile(tmp, "w") as target:
        for info in source.infolist():  # order kept: RECORD and the .dist-info stay where the wheel had them
            target.writestr(info, source.read(info.filename), compress_type=zipfile.ZIP_LZMA)
before = os.path.getsize(path)
with zipfile.ZipFile(tmp) as check:
    assert check.testzip() is None, f"{tmp}: a member does not read back"
os.replace(tmp, path)
print(f"  re-zipped {os.path.basename(path)} with LZMA: {before / 2**20:.1f} -> {os.path.getsize(path) / 2**20:.1f} MiB")
PY
}

mkdir -p "$CHECK"
echo "wheels for the GPU machine (CPython 3.12, manylinux x86_64) into $WHL:"
SPECS=()
for name in "${WHEELS[@]}"; do
  version="$(version_of "$name")"
  [ -n "$version" ] || { echo "gpu_wheels.sh: $name is not installed in .venv" >&2; exit 1; }
  SPECS+=("$name==$version")
  drop_other_versions "$name" "$version"
  if [ -z "$(wheel_of "$name" "$version")" ]; then
    echo "  downloading $name==$version"
    download "$name==$version" "$WHL" 3.12
  fi
  wheel="$(wheel_of "$name" "$version")"
  [ -n "$wheel" ] || { echo "gpu_wheels.sh: no wheel of $name==$version in $WHL after the download" >&2; exit 1; }
  [ "$(stat -c %s "$wheel")" -le 1048576 ] || repack_lzma "$wheel"
done
# a wheel in .whl that WHEELS does not name (an earlier list) would travel and be installed too
"$VENV_PY" - "$WHL" "${SPECS[@]}" <<'PY'
import re, sys
from pathlib import Path
folder, *specs = sys.argv[1:]
canon = lambda name: re.sub(r"[-_.]+", "_", name).lower()
wanted = {(canon(s.split("==")[0]), s.split("==")[1]) for s in specs}
for wheel in Path(folder).glob("*.whl"):
    project, version = wheel.name.split("-")[:2]
    if (canon(project), version) not in wanted:
        print(f"  removing {wheel.name} (not in the list)")
        wheel.unlink()
PY

# sizes: the wheels, and the tree that travels with them
TREE_BYTES=$(cd "$REPO" && { git ls-files -z; git ls-files -z --others --exclude-standard; } \
  | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
"$VENV_PY" - "$WHL" "$TREE_BYTES" "$LIMIT_MIB" <<'PY'
import sys
from pathlib import Path
folder, tree, limit = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
wheels = sorted(folder.glob("*.whl"), key=lambda p: -p.stat().st_size)
total = sum(p.stat().st_size for p in wheels)
for p in wheels:
    print(f"  {p.stat().st_size / 2**20:7.2f} MiB  {p.name}")
print(f"{len(wheels)} wheels: {total / 2**20:.2f} MiB; the tree that travels (tracked + untracked, not ignored): "
      f"{tree / 2**20:.2f} MiB; together {(total + tree) / 2**20:.2f} MiB of at most {limit:g} MiB")
if total + tree > limit * 2**20:
    sys.exit(f"gpu_wheels.sh: wheels + tree = {(total + tree) / 2**20:.2f} MiB exceed {limit:g} MiB "
             f"(the device machine takes 64 MiB in all)")
PY
echo "carry them to the GPU machine with the run tool's carry: [\".whl\"]"
[ "$DO_CHECK" -eq 1 ] || exit 0

# --- the check: import with the wheels, src/ and the GPU image's packages alone ------------------------------
echo "checking the imports with the wheels and the GPU image's packages alone (emulated under $CHECK)"
rm -rf "$CHECK/image" "$CHECK/site" "$CHECK/wheels311" "$CHECK/venv"
mkdir -p "$CHECK/image" "$CHECK/wheels311" "$CHECK/cp311"
"$VENV_PY" - "$CHECK/image" "${IMAGE[@]}" <<'PY'
"""Links to .venv's copies of the image's distributions, what they require (Python 3.12), and torch's CUDA ones."""
import os, re, sys
from importlib.metadata import PackageNotFoundError, distribution, distributions
from packaging.requirements import Requirement

target, roots = sys.argv[1], sys.argv[2:]
env = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "os_name": "posix", "extra": ""}
canon = lambda name: re.sub(r"[-_.]+", "-", name).lower()
found, todo = {}, list(roots)
while todo:
    name = todo.pop()
    if canon(name) in found:
        continue
    try:
        found[canon(name)] = dist = distribution(name)
    except PackageNotFoundError:
        found[canon(name)] = None
        continue
    for line in dist.requires or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(env):
            todo.append(requirement.name)
for dist in distributions():  # torch's CUDA libraries, also those behind extras
    if canon(dist.metadata["Name"]).startswith(("nvidia-", "cuda-")):
        found[canon(dist.metadata["Name"])] = dist
for dist in filter(None, found.values()):
    for top in {str(f).split("/")[0] for f in dist.files or []}:
        if top.startswith("..") or top == "__pycache__" or top.endswith(".pth"):
            continue
        source, link = str(dist.locate_file(top)), os.path.join(target, top)
        if os.path.exists(source) and not os.path.lexists(link):
            os.symlink(source, link)
print(f"  image: {sum(d is not None for d in found.values())} distributions linked")
PY
# the wheels as Python 3.11 installs them: the same files where they are pure or abi3, cp311 twins of the others
for spec in "${SPECS[@]}"; do
  wheel="$(wheel_of "${spec%%==*}" "${spec##*==}")"
  case "$(basename "$wheel")" in
    *-none-any.whl|*-abi3-*.whl) ln -sf "$wheel" "$CHECK/wheels311/" ;;
    *) twin="$(wheel_of "${spec%%==*}" "${spec##*==}" "$CHECK/cp311")"
       if [ -z "$twin" ]; then download "$spec" "$CHECK/cp311" 3.11; twin="$(wheel_of "${spec%%==*}" "${spec##*==}" "$CHECK/cp311")"; fi
       echo "  $(basename "$wheel"): checked as its twin $(basename "$twin")"
       ln -sf "$twin" "$CHECK/wheels311/" ;;
  esac
done
"$VENV_PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$CHECK/site" "$CHECK"/wheels311/*.whl
# an interpreter that sees the emulated image and nothing else: a bare venv (no packages of its own) whose .pth
# adds the image's folder; processes it starts through sys.executable see the same
BASE_PY="$("$VENV_PY" -c 'import sys; print(sys._base_executable)')"
"$BASE_PY" -m venv --without-pip "$CHECK/venv"
"$CHECK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
  | { read -r purelib; echo "$CHECK/image" > "$purelib/gpu_image.pth"; }
cd "$CHECK"  # not the repository: '' on sys.path must not find src/ by accident
PYTHONPATH="$CHECK/site:$REPO/src" "$CHECK/venv/bin/python" - "$CHECK" "$REPO/src" <<'PY'
import sys, sysconfig

import nnunetv2.inference.predict_from_raw_data  # noqa: F401
import nnunetv2.training.nnUNetTrainer.nnUNetTrainer  # noqa: F401
import noisy_student_nnunet.inference.predictor  # noqa: F401
import noisy_student_nnunet.trainers  # noqa: F401
import noisy_student_nnunet.cli, noisy_student_nnunet.predict_cli  # noqa: E401,F401  (the console scripts)
import noisy_student_nnunet.evaluation, noisy_student_nnunet.io_checks  # noqa: E401,F401
import surface_distance, isal.igzip, pytest  # noqa: E401,F401

check, src = sys.argv[1], sys.argv[2]
assert "openvino" not in sys.modules, "openvino was imported: it must stay lazy (it does not travel)"
roots = (f"{check}/site", f"{check}/image", src, sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"])
# real files only: torch.ops and torch.classes carry a bare '_ops.py', this script '<stdin>'
outside = sorted({name.split(".")[0] for name, m in list(sys.modules.items())
                  if str(getattr(m, "__file__", None) or "").startswith("/") and not m.__file__.startswith(roots)})
assert not outside, f"imported from outside the emulated GPU machine: {outside}"
print(f"  imports ok: {len(sys.modules)} modules, all from the wheels, src/, the image or the standard library; "
      f"openvino not imported")
PY
echo "rehearsal of the wheel mode here: GPU_CHECK_PYTHON=$CHECK/venv/bin/python GPU_CHECK_WHEELS=$CHECK/wheels311 \\"
echo "  GPU_CHECK_SITE=$CHECK/run-site \\"
echo "  bash benchmarks/gpu_check.sh OUT --cpu --wheels"
