"""Training-step efficiency: the default decoder at COCO size against a plain matmul, and padding.

    python scripts/bench_train.py [--precision fp32,bf16] [--compile] [--threads 1] [--repeats 5]
    python scripts/bench.py train ...

One training step is what ``captioner.training.engine.train_one_epoch`` runs for one batch: forward and
loss (under the chosen autocast), backward, gradient clipping at ``--grad-clip`` and an Adam step
(fused where torch has one for the device, as ``captioner.train`` builds it). The model is
``ShowTell`` with ``inject=first_input`` and the default dropout at COCO size (vocabulary 9,487,
embedding 512, hidden 512, 4096-d VGG fc7 features), batch 128, random weights and data.

GFLOP/s counts the model's matrix multiplies analytically, useful work only:
  image projection 2*B*F*E; LSTM 2*(E+H)*4H per row-step, for the image step plus one step per
  real input token (the steps run over padding are not counted); output layer 2*H*V per real
  target token. Forward+backward = 3 x forward (the usual convention).
The reference is a plain matrix multiply of the output layer's shape, [real tokens, H] x [H, V]
with bias, forward and both backward GEMMs (the same 3 x 2*N*H*V), measured in the same process
under the same autocast: the machine's practical limit for this shape.

Rows:
  mixed 8-16     captions of 8 to 16 words (uniform), the efficiency row
  all 8 / all 16 every caption 8 (16) words, same batch size: the padding check (batches are
                 trimmed to their longest caption, the output layer runs on real tokens only)
Every case is timed interleaved with the others, ``--repeats`` rounds. s/step and GFLOP/s are
the fastest step (the median is shown too); the ratios (% of matmul, the padding check) are the
median over rounds of the ratio within a round, which cancels most of the drift in the load of
a shared machine. Peak memory is measured afterwards, one more step per case: on CUDA
``torch.cuda.max_memory_allocated`` (weights, Adam state and the step); on CPU the process RSS,
sampled every 2 ms: the table shows what the step adds over the RSS just before it (activations,
gradients, logits; the weights and Adam state are already resident), the returned rows also
the process peak (torch itself and every variant's model included).
On a shared machine use ``--threads 1`` (or OMP_WAIT_POLICY=PASSIVE): spinning OpenMP threads
that lose their core to another process slow the many small parallel regions of an LSTM far
more than one large matmul, which skews the ratio against the model.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.training.engine import train_one_epoch  # noqa: E402
from captioner.data.batches import Batch  # noqa: E402
from captioner.models.show_tell import ShowTell  # noqa: E402
from captioner.training.optim import adam_options  # noqa: E402
from captioner.training.precision import Precision, compile_loss  # noqa: E402
from captioner.data.vocab import BOS_ID, EOS_ID, PAD_ID  # noqa: E402


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def step_flops(batch: int, n_targets: int, feature: int, embed: int, hidden: int, vocab: int) -> int:
    """Useful matmul FLOPs of one training step (forward x 3), as the module docstring states."""
    image = 2 * batch * feature * embed
    lstm = (batch + n_targets) * 2 * (embed + hidden) * 4 * hidden
    output = 2 * n_targets * hidden * vocab
    return 3 * (image + lstm + output)


def make_tokens(lengths: torch.Tensor, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """<bos> w1 .. wn <eos>, padded to the longest: what ``CaptionBatches`` yields."""
    tokens = torch.full((len(lengths), int(lengths.max()) + 2), PAD_ID, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        tokens[i, 0] = BOS_ID
        tokens[i, 1 : n + 1] = torch.randint(4, vocab, (n,), generator=generator)
        tokens[i, n + 1] = EOS_ID
    return tokens


class PeakRSS:
    """Peak resident memory (MiB) of this process while the block runs, sampled every 2 ms, and
    ``start``, the resident memory when it began (after handing freed heap pages back to the
    system, so that ``peak - start`` is what the block itself allocated)."""

    def __enter__(self):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.start = self.rss()
        self.peak, self._stop = self.start, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @staticmethod
    def rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=9487)
    parser.add_argument("--embed", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--feature", type=int, default=4096)
    parser.add_argument("--min-words", type=int, default=8)
    parser.add_argument("--max-words", type=int, default=16)
    parser.add_argument("--precision", default="fp32",
                        help="comma-separated: fp32, bf16, fp16 (each gets its rows and its own matmul reference)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the mixed batch with train.compile=true, for each precision")
    parser.add_argument("--adam-baseline", action="store_true",
                        help="also time the mixed batch with the per-tensor (for-loop) Adam")
    parser.add_argument("--grad-clip", type=float, default=5.0, help="as optim.grad_clip (0: no clipping)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per case, interleaved; the fastest counts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); on a busy shared machine 1 is steadier")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    V, E, H, Fd, B = args.vocab, args.embed, args.hidden, args.feature, args.batch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    g = torch.Generator().manual_seed(args.seed)
    features = torch.randn(B, Fd, generator=g).to(device)
    rows = torch.arange(B, device=device)
    batches = {
        f"mixed {args.min_words}-{args.max_words}": make_tokens(
            torch.randint(args.min_words, args.max_words + 1, (B,), generator=g), V, g).to(device),
        f"all {args.min_words}": make_tokens(torch.full((B,), args.min_words), V, g).to(device),
        f"all {args.max_words}": make_tokens(torch.full((B,), args.max_words), V, g).to(device),
    }
    mixed, short, long = batches

    # one model and optimizer per variant: (precision, compiled, adam options)
    precisions = []
    for name in args.precision.split(","):
        try:
            Precision(name, device)
            precisions.append(name)
        except ValueError as err:  # e.g. bf16 on a CPU without AVX-512: the other rows still run
            print(f"skipping {name}: {err}")
    if not precisions:
        raise SystemExit("error: none of --precision runs on this device; use --precision fp32")
    variants = [(p, False, None) for p in precisions]
    if args.compile:
        variants += [(p, True, None) for p in precisions]
    if args.adam_baseline:
        variants.append((variants[0][0], False, {"foreach": False}))

    cases = {}  # name -> (timed function, batch name, precision name)
    references = {}  # precision name -> matmul function, real tokens
    n_mixed = int((batches[mixed][:, 1:] != PAD_ID).sum())
    for precision_name, compiled, adam in variants:
        precision = Precision(precision_name, device)
        torch.manual_seed(args.seed)
        model = ShowTell(V, Fd, embed_dim=E, hidden_dim=H).to(device)
        if compiled:
            compile_loss(model, device)
        options = adam if adam is not None else adam_options(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, **options)
        label = precision_name + (", compiled" if compiled else "") + (", per-tensor Adam" if adam else "")

        def step(tokens, model=model, optimizer=optimizer, precision=precision):
            train_one_epoch(model, optimizer, None, [Batch(features, tokens, rows)], device, args.grad_clip,
                            precision=precision)
            sync()

        names = list(batches) if not (compiled or adam) else [mixed]
        for batch_name in names:
            cases[f"{batch_name} | {label}"] = (lambda t=batches[batch_name], s=step: s(t), batch_name, precision)

        if precision_name not in references:
            a = torch.randn(n_mixed, H, device=device, requires_grad=True)
            w = torch.randn(V, H, device=device, requires_grad=True)
            b = torch.zeros(V, device=device, requires_grad=True)

            def matmul(a=a, w=w, b=b, precision=precision):
                with precision.autocast():
                    y = F.linear(a, w, b)
                y.backward(torch.ones_like(y))
                sync()

            references[precision_name] = f"matmul [{n_mixed},{H}]x[{H},{V}] | {precision_name}"
            cases[references[precision_name]] = (matmul, None, precision)

    load = os.getloadavg()[0]
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
          f"{' (OMP_WAIT_POLICY=' + os.environ['OMP_WAIT_POLICY'] + ')' if 'OMP_WAIT_POLICY' in os.environ else ''}, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}, "
          f"load average {load:.1f} at start")
    passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    if device.type == "cpu" and torch.get_num_threads() > 1 and not passive and load > (os.cpu_count() or 1):
        print(f"note: the machine is busy (load {load:.1f} on {os.cpu_count()} cores); with {torch.get_num_threads()} "
              "spinning OpenMP threads the LSTM suffers more than the matmul; --threads 1 or "
              "OMP_WAIT_POLICY=PASSIVE measure the model rather than the contention")
    print(f"vocab {V}, embed {E}, hidden {H}, feature {Fd}, batch {B}, inject first_input, dropout 0.5, "
          f"grad_clip {args.grad_clip}, Adam {adam_options(device) or 'per-tensor'}; "
          f"{args.repeats} interleaved rounds", flush=True)

    warmup_start = time.perf_counter()
    for fn, *_ in cases.values():  # first-call allocations, oneDNN primitive setup, compilation
        fn()
        fn()
    warmup = time.perf_counter() - warmup_start
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, (fn, *_) in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    peaks = {}
    for name, (fn, *_) in cases.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            peaks[name] = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            with PeakRSS() as peak:
                fn()
            peaks[name] = (peak.peak, peak.peak - peak.start)

    rows, flops_of = [], {}
    for name, (fn, batch_name, precision) in cases.items():
        best, median = min(times[name]), statistics.median(times[name])
        if batch_name is None:  # the matmul reference
            n_tokens, flops = n_mixed, 3 * 2 * n_mixed * H * V
        else:
            n_tokens = int((batches[batch_name][:, 1:] != PAD_ID).sum())
            flops = step_flops(B, n_tokens, Fd, E, H, V)
        flops_of[name] = flops
        rows.append({"case": name, "precision": precision.name, "seconds": round(best, 4),
                     "median_seconds": round(median, 4), "real_tokens": n_tokens,
                     "tokens_per_s": round(n_tokens / best, 1), "gflop": round(flops / 1e9, 2),
                     "gflops": round(flops / best / 1e9, 2),
                     **({"peak_cuda_mib": round(peaks[name], 1)} if device.type == "cuda" else
                        {"peak_rss_mib": round(peaks[name][0], 1), "step_rss_mib": round(peaks[name][1], 1)})})
    def paired(a: str, b: str) -> float:
        """Median over rounds of time(a) / time(b), both measured in the same round."""
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    by_case = {r["case"]: r for r in rows}
    for row in rows:
        reference = by_case[references[row["precision"]]]
        flop_ratio = flops_of[row["case"]] / flops_of[reference["case"]]
        row["pct_of_matmul"] = round(100 * flop_ratio / paired(row["case"], reference["case"]), 1)
    for label in {r["case"].split(" | ", 1)[1] for r in rows if r["case"].startswith(long)}:
        s, l_ = f"{short} | {label}", f"{long} | {label}"
        by_case[s]["pct_of_all_long"] = round(100 * paired(s, l_), 1)

    mem = "peak CUDA MiB" if device.type == "cuda" else "step RSS MiB"
    mem_key = "peak_cuda_mib" if device.type == "cuda" else "step_rss_mib"
    print(f"warm-up {warmup:.0f}s; load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'case':<40} {'s/step':>7} {'median':>7} {'tokens':>6} {'tok/s':>7} {'GFLOP':>6} {'GFLOP/s':>8} "
          f"{'%matmul':>7} {mem:>13}")
    for r in rows:
        print(f"{r['case']:<40} {r['seconds']:>7.3f} {r['median_seconds']:>7.3f} {r['real_tokens']:>6} "
              f"{r['tokens_per_s']:>7.0f} {r['gflop']:>6.1f} {r['gflops']:>8.1f} {r['pct_of_matmul']:>7.1f} "
              f"{r[mem_key]:>13.0f}")
    if device.type == "cpu":
        print(f"process peak RSS {max(r['peak_rss_mib'] for r in rows):.0f} MiB (torch, data and "
              f"{len(variants)} model(s) with Adam state, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
              f"parameters each)")
    for r in rows:
        if "pct_of_all_long" in r:
            print(f"padding check ({r['case'].split(' | ')[1]}): {short} takes {r['pct_of_all_long']:.0f}% "
                  f"of the time of {long} (same batch size; <= 60% wanted)")
    for r in rows:
        if r["case"].startswith(mixed):
            print(f"efficiency ({r['case'].split(' | ')[1]}): {r['gflops']:.1f} GFLOP/s = {r['pct_of_matmul']:.0f}% "
                  f"of the same-run matmul (>= 80% wanted)")
    return rows


if __name__ == "__main__":
    run()
