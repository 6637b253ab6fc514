"""Decoding speed: greedy against a plain loop, batched beam search, and the same beam search one
image at a time.

    python scripts/bench_decode.py [--images 100] [--beam-size 3] [--repeats 3]
    python scripts/bench.py decode ...

A COCO-size Show-and-Tell decoder (vocabulary 9,487, embedding 512, hidden 512, VGG fc7
features 4096) with random weights. Random weights give near-uniform next-word
distributions, so <eos> is practically never chosen: every caption runs to max_length and no
image leaves the beam early. That is the worst case for the batched search, and both beam rows
do the same work. The per-image row calls the very same ``beam_search`` with one image at a
time (the loop the batched search replaces), so the ratio is the gain from batching alone.

The plain loop (``plain_greedy``, written here) is what greedy decoding is without its features:
``model.next_logprobs`` and argmax for max_length + 1 steps over the whole batch, no <unk> ban or trigram
blocking, no early stop. captioner's greedy is timed against it twice: on the random model
(nothing ends early: the cost of its bookkeeping alone) and on the same model with the <eos>
logit raised until greedy captions average ``--words`` words, as a trained model's do (there
greedy stops computing the captions that have ended).
All rows are measured side by side in one process, the rows interleaved within each of the
``--repeats`` rounds (a burst of other work then hits every row alike); the best round counts.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.decoding.search import generate  # noqa: E402
from captioner.models.show_tell import ShowTell  # noqa: E402
from captioner.data.vocab import BOS_ID, EOS_ID  # noqa: E402


def _best_times(cases: dict, repeats: int) -> dict[str, tuple[float, object]]:
    """{name: (best seconds, last output)}, every case run once per round."""
    best = {name: (float("inf"), None) for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            out = fn()
            best[name] = (min(best[name][0], time.perf_counter() - start), out)
    return best


@torch.no_grad()
def plain_greedy(model, features: torch.Tensor, max_length: int) -> torch.Tensor:
    """The reference: argmax for max_length + 1 steps over every row, nothing else."""
    state = model.init_state(features)
    tokens = torch.full((features.size(0),), BOS_ID, dtype=torch.long, device=features.device)
    out = []
    for _ in range(max_length + 1):
        logprobs, state = model.next_logprobs(tokens, state)
        tokens = logprobs.argmax(dim=-1)
        out.append(tokens)
    return torch.stack(out, dim=1)


def until_eos(tokens: torch.Tensor) -> list[list[int]]:
    return [seq[: seq.index(EOS_ID)] if EOS_ID in seq else seq for seq in tokens.tolist()]


def mean_words(model, features: torch.Tensor, max_length: int) -> float:
    sequences = generate(model, features, "greedy", max_length=max_length).sequences
    return sum(map(len, sequences)) / len(sequences)


@torch.no_grad()
def with_caption_length(model: ShowTell, features: torch.Tensor, max_length: int, words: float) -> float:
    """Raise the output layer's <eos> bias (bisection) until greedy captions average ``words``
    words; returns the mean reached."""
    base, low, high = model.output.bias[EOS_ID].item(), 0.0, 50.0
    for _ in range(30):
        model.output.bias[EOS_ID] = base + (low + high) / 2
        if mean_words(model, features, max_length) > words:
            low = (low + high) / 2
        else:
            high = (low + high) / 2
    return mean_words(model, features, max_length)


def run(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--vocab", type=int, default=9487)
    parser.add_argument("--embed", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--feature", type=int, default=4096)
    parser.add_argument("--max-length", type=int, default=16)
    parser.add_argument("--words", type=float, default=9.0,
                        help="mean greedy caption length of the second model (COCO greedy captions: about 9)")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--length-penalty", default="none", choices=["none", "average", "gnmt"])
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each row's fastest counts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); on a busy shared machine 1 is steadier")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-image-images", type=int, default=0,
                        help="images of the per-image beam row (0: all; it is the slow row on many images)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = ShowTell(args.vocab, args.feature, embed_dim=args.embed, hidden_dim=args.hidden).to(device).eval()
    features = torch.randn(args.images, args.feature, device=device)
    beam = {"max_length": args.max_length, "beam_size": args.beam_size, "length_penalty": args.length_penalty}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(decode):
        def go():
            out = decode()
            sync()
            return out
        return go

    ending = ShowTell(args.vocab, args.feature, embed_dim=args.embed, hidden_dim=args.hidden).to(device).eval()
    ending.load_state_dict(model.state_dict())
    reached = with_caption_length(ending, features, args.max_length, args.words)

    per_image = args.per_image_images or args.images
    cases = {
        "plain greedy loop": timed(lambda: plain_greedy(model, features, args.max_length)),
        "greedy (batched)": timed(lambda: generate(model, features, "greedy", max_length=args.max_length)),
        f"plain loop, {reached:.1f}-word": timed(lambda: plain_greedy(ending, features, args.max_length)),
        f"greedy, {reached:.1f}-word": timed(lambda: generate(ending, features, "greedy", max_length=args.max_length)),
        f"beam K={args.beam_size} (batched)": timed(lambda: generate(model, features, "beam", **beam)),
        f"beam K={args.beam_size} (per image)": timed(lambda: [
            generate(model, features[i : i + 1], "beam", **beam) for i in range(per_image)
        ]),
    }
    generate(model, features[:2], "beam", **beam)  # warm-up: first-call allocations and kernel setup
    rows = []
    for name, (seconds, out) in _best_times(cases, args.repeats).items():
        outs = out if isinstance(out, list) else [out]
        images = per_image if name.endswith("(per image)") else args.images
        words = [len(seq) for o in outs for seq in (until_eos(o) if isinstance(o, torch.Tensor) else o.sequences)]
        rows.append({
            "method": name,
            "images": images,
            "seconds": round(seconds, 4),
            "captions_per_s": round(images / seconds, 1),
            "mean_words": round(sum(words) / len(words), 2),
        })
    by_name = {row["method"]: row for row in rows}
    beam_row = by_name[f"beam K={args.beam_size} (batched)"]
    beam_row["speedup_vs_per_image"] = round(
        beam_row["captions_per_s"] / by_name[f"beam K={args.beam_size} (per image)"]["captions_per_s"], 2)
    for plain, greedy in ((rows[0], rows[1]), (rows[2], rows[3])):
        greedy["speedup_vs_plain_loop"] = round(greedy["captions_per_s"] / plain["captions_per_s"], 3)

    print(f"vocab {args.vocab}, embed {args.embed}, hidden {args.hidden}, feature {args.feature}, "
          f"{args.images} images, max_length {args.max_length}, length_penalty {args.length_penalty}, "
          f"device {device}, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'method':<26} {'seconds':>9} {'captions/s':>11} {'words':>6}")
    for row in rows:
        print(f"{row['method']:<26} {row['seconds']:>9.3f} {row['captions_per_s']:>11.1f} {row['mean_words']:>6.1f}")
    print(f"greedy / plain loop: {rows[1]['speedup_vs_plain_loop']:.2f}x (random model, captions never end), "
          f"{rows[3]['speedup_vs_plain_loop']:.2f}x (captions of {reached:.1f} words on average; the plain loop "
          f"always writes {args.max_length + 1} tokens)")
    print(f"batched / per-image beam: {beam_row['speedup_vs_per_image']:.1f}x")
    return rows


if __name__ == "__main__":
    run()
