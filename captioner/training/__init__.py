"""A training run: train(cfg) prepares and fits (trainer), the epoch (engine), the checkpoint format
(checkpoint), resume and init_from (resume), loading for inference (restore), random streams
(rng), optim, ema, precision, torchrun (distributed), the run directory's guards (runlock, rundir),
TensorBoard (board) and metrics.jsonl (history)."""
