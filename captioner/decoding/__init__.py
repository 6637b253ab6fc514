"""Log-probabilities -> tokens: greedy, sampling and batched beam search over the decoding protocol
(search), ensembles of decoders (ensemble), and feature rows or images -> captions (captioner)."""
