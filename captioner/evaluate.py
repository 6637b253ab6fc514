"""python -m captioner.evaluate: COCO metrics for a checkpoint on a split, or for a results file.

    python -m captioner.evaluate checkpoint=outputs/train/<run>/best.pt split=test decode=beam
    python -m captioner.evaluate results=captions_results.json annotations=captions_val2014.json
    python -m captioner.evaluate checkpoint=a/best.pt 'ensemble=[b/best.pt,c/best.pt]' decode=beam

The first decodes the split through ``captioner.evaluation.loop.evaluate`` (the same path as
validation during training) and writes ``results_<split>_<decode>.json`` (COCO results format)
and ``metrics_<split>_<decode>.json`` beside the checkpoint (``..._ensemble<N>.json`` for an
ensemble of N models): the scores, the captions' diversity (``captioner.evaluation.diversity``)
and the data config, from which ``captioner.significance`` reads the references again.
``data=NAME`` evaluates on that data set's config instead of the checkpoint's; ``data.KEY=VALUE``
without it changes a key of the checkpoint's own data set (``data.root=DIR``: its images moved
elsewhere). The second scores any results file the way the coco-caption toolkit does.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from captioner.training.checkpoint import CheckpointError, load_checkpoint, named_by
from captioner.training.restore import restore_model
from captioner.cli import UsageError, command
from captioner.config import CONF_DIR, DataConfig, validate
from captioner.io import atomic_write_text
from captioner.evaluation.metrics import format_scores, score_results_file
from captioner.runtime import resolve_device

log = logging.getLogger("captioner.evaluate")


def checkpoint_split(checkpoint: str, split: str, data_cfg=None, device: str | torch.device = "auto",
                     progress: bool = True):
    """(model, vocab, checkpoint config, records, features) for decoding ``split`` with a checkpoint.

    Features come from the cache of the checkpoint's encoder, or are computed afresh when the
    checkpoint carries fine-tuned encoder weights (the cache describes the original ones).
    ``data_cfg`` None means the data set the checkpoint was trained on. Where the checkpoint's
    config names the data or the cache, they are only read (``checkpoint.named_by``).
    """
    from captioner.data import load_records
    from captioner.encoding.features import compute_features, extraction_options, feature_cache_dir, split_features

    device = resolve_device(device)
    model, vocab, ckpt_cfg, encoder, finetuned = restore_model(checkpoint, device, with_encoder=True)  # (Restored)
    data_cfg = data_cfg if data_cfg is not None else ckpt_cfg.data
    records = load_records(data_cfg, generate=not named_by(ckpt_cfg, data_cfg.root)).get(split)
    if not records:
        raise ValueError(f"split={split!r}: data set {data_cfg.name!r} has no images in that split")
    enc = ckpt_cfg.encoder
    if finetuned:
        features = compute_features(encoder, records, device=device, **extraction_options(enc))
    else:
        # (data.on_bad_image=skip: unreadable images leave the split, as in training)
        cache_dir = feature_cache_dir(data_cfg, enc)
        computed = split_features(encoder, records, cache_dir, split, device=device, **extraction_options(enc),
                                  progress=progress, on_bad_image=data_cfg.on_bad_image,
                                  read_only=named_by(ckpt_cfg, cache_dir))
        records, features = computed.records, computed.features
    return model, vocab, ckpt_cfg, records, features


def ensemble_with(first: str, model, vocab, ckpt_cfg, checkpoints: Sequence[str], device):
    """``model`` (restored from checkpoint ``first``) and the decoders of ``checkpoints`` as one
    ``Ensemble``. Every member must read the same frozen encoder's features and write the same
    vocabulary."""
    from captioner.decoding.ensemble import Ensemble

    if OmegaConf.select(ckpt_cfg, "encoder.finetune_after", default=-1) >= 0:
        raise CheckpointError(f"{first} was trained with encoder.finetune_after: ensembles need members that "
                              "read the same frozen features")
    members = [model]
    for path in checkpoints:
        ckpt = load_checkpoint(path)
        if "encoder" in ckpt:
            raise CheckpointError(f"{path} has a fine-tuned encoder: ensembles need members that read the same "
                                  "frozen features")
        member = restore_model(ckpt, device)
        member_vocab, member_cfg = member.vocab, member.config
        if member_vocab.itos != vocab.itos:
            raise CheckpointError(f"{path} was trained with another vocabulary than {first} ({len(member_vocab)} "
                                  f"and {len(vocab)} words): ensemble models trained on the same data and "
                                  "data.min_count")
        if member_cfg.encoder.name != ckpt_cfg.encoder.name:
            raise CheckpointError(f"{path} reads encoder={member_cfg.encoder.name} features, {first} "
                                  f"encoder={ckpt_cfg.encoder.name}: ensemble models trained on the same encoder")
        members.append(member.model)
    return Ensemble(members).to(device).eval()


def evaluate_checkpoint(checkpoint: str, split: str = "test", decode_cfg=None, data_cfg=None,
                        metrics=("bleu", "meteor", "rouge", "cider"), tokenizer: str = "auto",
                        output_dir: Optional[str] = None, device: str = "auto",
                        progress: bool = True, ensemble: Sequence[str] = (), html: bool = False) -> dict[str, Any]:
    """Decode ``split`` with the checkpoint's model (with the ``ensemble`` checkpoints' models,
    as one ensemble, when given) and score it; returns the scores. ``html`` also writes the
    error-analysis page (``captioner.evaluation.analysis``), with attention strips for an attention decoder."""
    from captioner.data import load_records
    from captioner.evaluation.diversity import diversity
    from captioner.evaluation.loop import evaluate

    device = resolve_device(device)
    model, vocab, ckpt_cfg, records, features = checkpoint_split(checkpoint, split, data_cfg, device, progress)
    if ensemble:
        model = ensemble_with(checkpoint, model, vocab, ckpt_cfg, ensemble, device)
    data_cfg = data_cfg if data_cfg is not None else ckpt_cfg.data
    decode_cfg = decode_cfg if decode_cfg is not None else ckpt_cfg.decode
    attention = html and bool(getattr(model, "attends", False))
    scores, results = evaluate(model, features, records, vocab, decode_cfg, device, metrics=list(metrics),
                               tokenizer=tokenizer, progress=progress, attention=attention)

    out = Path(output_dir) if output_dir else Path(checkpoint).resolve().parent
    tag = f"{split}_{decode_cfg.method}" + (f"_ensemble{len(ensemble) + 1}" if ensemble else "")
    results_file, metrics_file = out / f"results_{tag}.json", out / f"metrics_{tag}.json"
    coco = [{k: v for k, v in r.items() if k not in ("words", "attention")} for r in results]
    atomic_write_text(results_file, json.dumps(coco, ensure_ascii=False))
    training = [c for r in load_records(data_cfg, generate=False).get("train", []) for c in r.captions]
    variety = diversity([r["caption"] for r in results], training)
    report = {"checkpoint": str(checkpoint), **({"ensemble": list(ensemble)} if ensemble else {}),
              "split": split, "data": data_cfg.name, "data_config": OmegaConf.to_container(data_cfg),
              "num_images": len(records), "decode": OmegaConf.to_container(decode_cfg), "scale": "0-1",
              "scores": scores, "diversity": variety}
    atomic_write_text(metrics_file, json.dumps(report, indent=1))
    log.info("%s images of %s/%s: %s", len(records), data_cfg.name, split, format_scores(scores))
    log.info("diversity: %s", " | ".join(f"{k} {v:.4g}" for k, v in variety.items()))
    log.info("wrote %s and %s", results_file, metrics_file)
    if html:
        page = error_page(out / f"errors_{tag}.html", results, records, scores, tokenizer, ckpt_cfg,
                          f"{data_cfg.name} {split}, {decode_cfg.method}: {checkpoint}", attention)
        log.info("wrote %s", page)
    return scores


def error_page(path: Path, results, records, scores, tokenizer: str, ckpt_cfg, title: str, attention: bool) -> Path:
    """The error-analysis page: per-image CIDEr-D and BLEU-4 by the toolkit's arithmetic on the
    tokens the corpus scores read."""
    from captioner.evaluation.analysis import write_error_page
    from captioner.encoding.encoders import encoder_from_config
    from captioner.evaluation.metrics import image_scores

    references = {r.image_id: list(r.captions) for r in records}
    per_image = image_scores(references, {r["image_id"]: r["caption"] for r in results}, tokenizer)
    crop = encoder_from_config(ckpt_cfg.encoder, pretrained=False, weights=None).crop if attention else None

    def view(image):  # the crop the encoder read, which the attention maps cover
        from torchvision.transforms.functional import to_pil_image

        return to_pil_image(crop(image.convert("RGB")))
    corpus = {k: v for k, v in scores.items() if isinstance(v, float)}
    return write_error_page(path, results, records, per_image, corpus, title, view=view if attention else None)


def run(cfg: DictConfig) -> dict[str, Any]:
    validate(cfg)
    if cfg.results is not None:
        if cfg.annotations is None:
            raise ValueError("results=FILE needs annotations=FILE (a COCO-format captions file)")
        if cfg.html:
            raise ValueError("html=true needs checkpoint=PATH: the error page shows every image, and a results file "
                             "with its annotations names none; drop html=true to score the file")
        scores = score_results_file(cfg.results, cfg.annotations, metrics=list(cfg.metrics), tokenizer=cfg.tokenizer)
    elif cfg.checkpoint is None:
        raise ValueError("give checkpoint=PATH (decode and score a split) or results=FILE annotations=FILE")
    else:
        scores = evaluate_checkpoint(cfg.checkpoint, cfg.split, cfg.decode, cfg.data, cfg.metrics, cfg.tokenizer,
                                     cfg.output_dir, cfg.device, cfg.progress, list(cfg.ensemble), cfg.html)
    print(format_scores(scores, digits=4))
    return scores


def checkpoint_data(argv: list[str]) -> list[str]:
    """``data.KEY=VALUE`` without ``data=NAME``: the checkpoint's own data set with KEY changed.

    Hydra sets keys only of a data config the command line chose (else: "Unexpected type for
    root: NoneType"), so the checkpoint's data config is spelled out as overrides ahead of the
    user's, and the whole command line is then composed and checked as any other."""
    import dataclasses

    import yaml
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Quote, QuotedString

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
    except Exception:  # noqa: BLE001 - a malformed override: the config check names it
        return argv
    given = {o.key_or_group: o for o in overrides}
    changed = [key for key in given if key.startswith("data.")]
    if not changed or "data" in given:
        return argv
    if "checkpoint" not in given:
        raise UsageError(f"{changed[0]}=... changes the checkpoint's data set: give checkpoint=PATH "
                         "(or data=NAME for that data set's own config)")
    data = load_checkpoint(given["checkpoint"].value())["config"]["data"]
    # the group option whose YAML the checkpoint's data set was composed from (coco.yaml is coco_karpathy)
    options = {yaml.safe_load(f.read_text(encoding="utf-8"))["name"]: f.stem
               for f in Path(CONF_DIR, "data").glob("*.yaml")}

    def value(v) -> str:  # in Hydra's override syntax
        return QuotedString(text=v, quote=Quote.single).with_quotes() if isinstance(v, str) else json.dumps(v)

    spelled = [f"data.{f.name}={value(data[f.name])}" for f in dataclasses.fields(DataConfig)
               if f.name in data and f"data.{f.name}" not in given]
    return [f"data={options.get(data['name'], data['name'])}", *spelled, *argv]


main = command("evaluate", run, argv_hook=checkpoint_data)

if __name__ == "__main__":
    main()
