#!/usr/bin/env bash
# The Flickr8k benchmark behind the README table: extract the frozen encoder's features, train on
# the 6,000 train images, pick the checkpoint by beam-3 BLEU-4 on the 1,000 dev images, score the
# 1,000 test images greedy and beam 3. Prints the wall time of each stage.
#   bash scripts/flickr8k_benchmark.sh /path/to/flickr8k [OUT_DIR] [extra overrides...]
set -euo pipefail
root=${1:?usage: flickr8k_benchmark.sh FLICKR8K_ROOT [OUT_DIR] [OVERRIDES...]}
run=${2:-outputs/flickr8k}
shift $(( $# >= 2 ? 2 : 1 ))

timed() { local start=$SECONDS; "$@"; echo "[$(( SECONDS - start )) s] $*" >&2; }
timed python -m captioner.extract experiment=flickr8k data.root="$root" "$@"
timed python -m captioner.train experiment=flickr8k data.root="$root" train.out_dir="$run" "$@"
for decode in greedy beam; do
  timed python -m captioner.evaluate checkpoint="$run/best.pt" split=test decode=$decode decode.beam_size=3
done
