#!/usr/bin/env bash
# Download MS-COCO 2014 (train2014 + val2014 images, caption annotations) and Karpathy's split.
#
#   scripts/download_coco.sh [TARGET_DIR]     # default: data/coco
#
# Needs ~40 GB free while unpacking (19 GB of zips; delete them afterwards with KEEP_ZIPS=0).
# Safe to re-run: downloads resume (wget -c / curl -C -) and finished steps are skipped.
# Result:
#   TARGET_DIR/train2014/*.jpg (82,783)   TARGET_DIR/val2014/*.jpg (40,504)
#   TARGET_DIR/annotations/captions_{train,val}2014.json
#   TARGET_DIR/dataset_coco.json          (Karpathy split: 113,287 / 5,000 / 5,000 with restval)
set -euo pipefail

TARGET=${1:-data/coco}
KEEP_ZIPS=${KEEP_ZIPS:-1}
COCO_URL=${COCO_URL:-http://images.cocodataset.org}  # overridable, e.g. for a mirror
KARPATHY_URL=${KARPATHY_URL:-https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip}

die() { echo "download_coco.sh: error: $*" >&2; exit 1; }

command -v unzip >/dev/null || die "unzip is not installed"
if command -v wget >/dev/null; then
    fetch() { wget -c --tries=5 --progress=dot:giga "$1"; }  # no -O: it would defeat -c
elif command -v curl >/dev/null; then
    fetch() { curl -fL --retry 5 -C - -O "$1"; }
else
    die "need wget or curl"
fi

mkdir -p "$TARGET"
cd "$TARGET"

# get URL CHECK...: download the zip at URL, unpack it, run CHECK (a command) to verify, then
# leave a .ZIP.done marker so a re-run skips it; a half-unpacked step has no marker and is redone.
get() {
    local url=$1 zip=${1##*/}; shift
    if [[ -e ".$zip.done" ]]; then
        echo "== $zip: done earlier, skipping"
        return
    fi
    echo "== downloading $url"
    # curl -C - can fail on an already complete file; the zip test below decides either way.
    fetch "$url" || [[ -s "$zip" ]] || die "download of $url failed"
    # A truncated zip (no central directory) means the download did not finish: a re-run resumes it.
    unzip -qql "$zip" >/dev/null || die "$zip is incomplete or corrupt; re-run this script to resume, or delete it"
    echo "== unpacking $zip"
    unzip -oq "$zip" || die "unpacking $zip failed (disk full?)"
    "$@"
    touch ".$zip.done"
    [[ "$KEEP_ZIPS" == 1 ]] || rm -f "$zip"
}

# files F...: fail unless every F exists and is non-empty.
files() {
    local f
    for f in "$@"; do [[ -s "$f" ]] || die "$f is missing after unpacking"; done
}

# count DIR EXPECTED: fail unless DIR holds EXPECTED jpg files.
count() {
    local n
    n=$(find "$1" -maxdepth 1 -name '*.jpg' | wc -l)
    [[ "$n" -eq "$2" ]] || die "$1 holds $n images, expected $2"
    echo "== $1: $n images"
}

get "$COCO_URL/annotations/annotations_trainval2014.zip" \
    files annotations/captions_train2014.json annotations/captions_val2014.json
get "$KARPATHY_URL" files dataset_coco.json
get "$COCO_URL/zips/val2014.zip" count val2014 40504
get "$COCO_URL/zips/train2014.zip" count train2014 82783

echo "== done: COCO 2014 in $(pwd)"
echo "   load with captioner.data.coco.load_coco_karpathy('$(pwd)/dataset_coco.json', '$(pwd)')"
