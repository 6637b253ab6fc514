#!/usr/bin/env bash
# The Flickr8k benchmark behind the README tables: extract the frozen encoder's features, train
# with cross-entropy on the 6,000 train images (checkpoint picked by beam-3 BLEU-4 on the 1,000
# dev images), then self-critical training from that checkpoint (picked by beam-3 CIDEr on dev),
# and score the 1,000 test images greedy and beam 3 with each. Prints the wall time of each stage.
#   bash scripts/flickr8k_benchmark.sh /path/to/flickr8k [OUT_DIR] [extra overrides...]
#   EXPERIMENT=flickr8k_att bash scripts/flickr8k_benchmark.sh /path/to/flickr8k outputs/flickr8k_att
# OUT_DIR (default outputs/$EXPERIMENT) gets the cross-entropy run, OUT_DIR_scst the SCST run;
# EXPERIMENT (default flickr8k: Show and Tell; flickr8k_att: Show, Attend and Tell) and its
# ${EXPERIMENT}_scst are the settings.
set -euo pipefail
root=${1:?usage: flickr8k_benchmark.sh FLICKR8K_ROOT [OUT_DIR] [OVERRIDES...]}
experiment=${EXPERIMENT:-flickr8k}
run=${2:-outputs/$experiment}
shift $(( $# >= 2 ? 2 : 1 ))

timed() { local start=$SECONDS; "$@"; echo "[$(( SECONDS - start )) s] $*" >&2; }
timed python -m captioner.extract experiment="$experiment" data.root="$root" "$@"
timed python -m captioner.train experiment="$experiment" data.root="$root" train.out_dir="$run" "$@"
timed python -m captioner.train experiment="${experiment}_scst" data.root="$root" train.init_from="$run/best.pt" \
  train.out_dir="${run}_scst" "$@"
for checkpoint in "$run/best.pt" "${run}_scst/best.pt"; do
  for decode in greedy beam; do
    timed python -m captioner.evaluate checkpoint="$checkpoint" split=test decode=$decode decode.beam_size=3
  done
done
