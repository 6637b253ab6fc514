#!/usr/bin/env bash
# The Flickr8k benchmark behind the README table: train on the 6,000 train images, pick the
# checkpoint by BLEU-4 on the 1,000 dev images, score the 1,000 test images greedy and beam 3.
#   bash scripts/flickr8k_benchmark.sh /path/to/flickr8k [encoder] [extra train overrides...]
set -euo pipefail
root=${1:?usage: flickr8k_benchmark.sh FLICKR8K_ROOT [ENCODER] [OVERRIDES...]}
encoder=${2:-efficientnet_lite0}
shift $(( $# >= 2 ? 2 : 1 ))
run=outputs/flickr8k_${encoder}

python -m captioner.train experiment=flickr8k encoder="$encoder" data.root="$root" train.out_dir="$run" "$@"
for decode in greedy beam; do
  python -m captioner.evaluate checkpoint="$run/best.pt" split=test decode=$decode decode.beam_size=3
done
