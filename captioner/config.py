"""Config schemas: one dataclass per component and per command, registered in Hydra's ConfigStore.

The YAML files under ``conf/`` select and override these; because every node is typed, a
misspelled key or a wrong type fails at start-up instead of being silently ignored.

The allowed values of a field are stated once, on the field (``choice``, ``at_least``,
``between``), and cross-field rules in the schema's ``check``; ``validate(cfg)`` applies them to
every typed node of a composed config. Every command runs it before any work, so a typo in
``train.precision`` never surfaces after an hour of feature extraction. The model and objective
schemas live beside their code (``captioner.models``, ``captioner.objectives``) and are checked
the same way; a model field says whether it shapes the weights (``shapes=True``, ``shaping``).
``captioner.cli.register_configs`` stores all of them in Hydra's ConfigStore.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf

# conf/ sits beside the package in the repository (the install is editable).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


# --- allowed values, stated on the field -------------------------------------------------------

def owned_by(module: str, name: str) -> Callable[[], Sequence[str]]:
    """Choices that a module owns (encoder names, precisions, ...), read when a config is checked,
    so this module does not import torch to state them."""
    return lambda: list(getattr(importlib.import_module(module), name))


def choice(default: Any, options: Sequence[str] | Callable[[], Sequence[str]], shapes: bool = False):
    return field(default=default, metadata={"choices": options, "shapes": shapes})


def at_least(default: Any, low: float, shapes: bool = False):
    return field(default=default, metadata={"min": low, "shapes": shapes})


def above(default: Any, low: float):
    return field(default=default, metadata={"min": low, "low_open": True})


def between(default: Any, low: float, high: float, low_open: bool = False):
    return field(default=default, metadata={"min": low, "max": high, "low_open": low_open})


def shaping(default: Any):
    """A model field with no constraint that shapes the weights (``shapes=True`` on the others):
    a checkpoint loads only into a model with the same value (``captioner.models.shape_keys``)."""
    return field(default=default, metadata={"shapes": True})


def _field_problem(key: str, value: Any, meta: dict) -> Optional[str]:
    if value is None:
        return None
    if "choices" in meta:
        options = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
        if value not in options:
            return f"{key}={value!r}: choose one of {', '.join(options)}"
    low, high, low_open = meta.get("min"), meta.get("max"), meta.get("low_open")
    if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
        if high is None:
            return f"{key}={value}: must be {'greater than' if low_open else 'at least'} {low}"
        return f"{key}={value}: must be in {'(' if low_open else '['}{low}, {high}]"
    return None


def problems(node: Any, prefix: str = "") -> Iterator[str]:
    """Every broken rule of every typed node under ``node``, as one line each naming the key."""
    if not isinstance(node, DictConfig) or node._is_missing() or node._is_none():
        return
    schema = OmegaConf.get_type(node)
    if schema is not None and dataclasses.is_dataclass(schema):
        for f in dataclasses.fields(schema):
            if f.metadata and f.name in node:
                problem = _field_problem(f"{prefix}{f.name}", node[f.name], f.metadata)
                if problem:
                    yield problem
        check = getattr(schema, "check", None)
        if check is not None:
            problem = check(node)
            if problem:
                yield f"{prefix}{problem}"
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            yield from problems(child, f"{prefix}{key}.")


def validate(cfg: Any, prefix: str = "") -> None:
    """ValueError with the first broken rule (one line naming the key, under ``prefix``), before
    any work is done."""
    for problem in problems(cfg, prefix):
        raise ValueError(problem)


# --- components ------------------------------------------------------------------------------

@dataclass
class DataConfig:
    name: str = choice("shapes", ("shapes", "flickr8k", "coco_karpathy", "coco_captions", "coco_format"))
    root: str = "data/shapes"
    # shapes: how many images per split, and the generator's seed (the data set is a pure function of these)
    num_train: int = at_least(2000, 1)
    num_val: int = at_least(250, 0)
    num_test: int = at_least(250, 0)
    image_size: int = at_least(128, 16)
    seed: int = 0
    # flickr8k / coco sources (paths relative to root unless absolute)
    token_file: Optional[str] = None
    karpathy_json: Optional[str] = None
    image_dir: Optional[str] = None
    annotations: Optional[str] = None
    use_restval: bool = True
    # coco_format: the val and test splits from a split file (a Karpathy-style JSON or a list of
    # "file_name split" lines), or else the held-out fraction of the images for each
    split_file: Optional[str] = None
    holdout: float = between(0.1, 0.0, 0.5)
    # vocabulary, built from the training split only
    min_count: int = at_least(5, 1)
    max_length: int = at_least(16, 1)  # caption tokens kept for training, not counting <bos>/<eos>
    on_bad_image: str = choice("error", ("error", "skip"))


@dataclass
class EncoderConfig:
    name: str = choice("efficientnet_lite0", owned_by("captioner.encoding.encoders", "ENCODER_DIMS"))
    pretrained: bool = True
    weights: Optional[str] = None  # a local state-dict file instead of the download
    # preprocessing, as timm names it: a square input_size-pixel crop of the centre crop_pct of
    # the image (null: the encoder's own, e.g. VGG's 224 px of the centre 0.875, Lite2's 260 of 292)
    input_size: Optional[int] = at_least(None, 32)
    crop_pct: Optional[float] = between(None, 0.0, 1.0, low_open=True)
    batch_size: int = at_least(32, 1)  # feature extraction
    # processes decoding images for the CNN; null: a quarter of the CPUs, at most 8 (none on 2 CPUs:
    # decoding a JPEG costs ~2% of the CNN's time per image there, a worker would take a core from it)
    num_workers: Optional[int] = at_least(None, 0)
    # the CNN's arithmetic in extraction (bf16: CUDA, CPUs with AVX512-BF16 or AMX; fp16: CUDA);
    # recorded in the cache manifest, so caches of different precision never mix
    precision: str = choice("fp32", owned_by("captioner.training.precision", "PRECISIONS"))
    compile: bool = True  # torch.compile the CNN for extraction (eager, with a warning, without a C++ compiler)
    cache_dtype: str = choice("float16", ("float16", "float32"))
    cache_dir: Optional[str] = None  # default: <data.root>/features
    finetune_after: int = at_least(-1, -1)  # step after which the CNN trains end to end; -1 never
    finetune_lr: float = at_least(1e-5, 0.0)


@dataclass
class ModelConfig:
    """What every model schema has; each model's own fields are in its schema beside its code
    (``captioner.models``), selected by ``model.name``."""

    name: str = MISSING


@dataclass
class ObjectiveConfig:
    """What every training objective's schema has (``captioner.objectives``)."""

    name: str = MISSING


@dataclass
class DecodeConfig:
    method: str = choice("greedy", ("greedy", "sample", "beam"))
    max_length: int = at_least(20, 1)  # words, not counting <eos>
    temperature: float = above(1.0, 0.0)
    top_k: int = at_least(0, 0)
    top_p: float = between(1.0, 0.0, 1.0, low_open=True)
    beam_size: int = at_least(3, 1)
    length_penalty: str = choice("none", ("none", "average", "gnmt"))
    alpha: float = at_least(0.7, 0.0)  # GNMT length-penalty exponent
    n_best: int = at_least(1, 1)
    # diverse beam search: the beam in groups of beam_size / groups, each group's log-probabilities
    # lowered by diversity for every time the groups before it chose the word at the same step
    groups: int = at_least(1, 1)
    diversity: float = at_least(0.0, 0.0)
    repetition_penalty: float = at_least(1.0, 1.0)  # a word's probability / this per earlier use; 1: off
    block_trigrams: bool = False
    ban_unk: bool = False
    seed: int = 0
    batch_size: int = at_least(100, 1)

    @staticmethod
    def check(node) -> Optional[str]:
        if node.method == "beam" and node.n_best > node.beam_size:
            return f"n_best={node.n_best}: must be between 1 and decode.beam_size={node.beam_size}"
        if node.method == "beam" and node.groups >= 1 and node.beam_size % node.groups:  # (< 1: its field's problem)
            return f"groups={node.groups}: must divide decode.beam_size={node.beam_size}"
        return None


@dataclass
class OptimConfig:
    lr: float = above(2e-3, 0.0)
    weight_decay: float = at_least(0.0, 0.0)
    beta1: float = between(0.9, 0.0, 1.0)
    beta2: float = between(0.999, 0.0, 1.0)
    grad_clip: float = at_least(5.0, 0.0)  # 0: no clipping
    schedule: str = choice("cosine", ("cosine", "step", "constant"))
    warmup_steps: int = at_least(100, 0)
    step_epochs: int = at_least(3, 1)  # step schedule: decay every N epochs
    gamma: float = between(0.8, 0.0, 1.0, low_open=True)
    # validate and save an exponential moving average of the decoder's weights (0: the weights as
    # trained); checkpoints keep the trained weights too, for resuming
    ema_decay: float = between(0.0, 0.0, 1.0)


@dataclass
class TrainConfig:
    epochs: int = at_least(6, 1)
    batch_size: int = at_least(64, 1)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out_dir: Optional[str] = None  # default: Hydra's run directory
    log_every: int = at_least(50, 0)
    val_max_images: int = at_least(0, 0)  # 0: the whole val split
    monitor: str = choice("Bleu_4", ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"))
    progress: bool = True
    plot: bool = True
    # TensorBoard events under <run>/tensorboard; null: when the tensorboard package is installed
    tensorboard: Optional[bool] = None
    resume: Optional[str] = None  # PATH (a last.pt/best.pt, or a run directory) | auto (out_dir/last.pt if any)
    # a fresh run in a directory that holds another run: false refuses it (nothing is overwritten),
    # true moves that run's files into <out_dir>/replaced-<date_time>/ first
    overwrite: bool = False
    # start from a trained checkpoint's weights and vocabulary (e.g. self-critical training after
    # cross-entropy), with a fresh optimizer and schedule
    init_from: Optional[str] = None
    save_every: int = at_least(0, 0)  # also save last.pt every N optimizer steps, for mid-epoch resume
    precision: str = choice("fp32", owned_by("captioner.training.precision", "PRECISIONS"))
    compile: bool = False
    max_steps: int = at_least(0, 0)  # 0: no limit (tests use a few steps)


# --- commands ----------------------------------------------------------------------------------

@dataclass
class TrainRunConfig:
    """python -m captioner.train"""

    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: ModelConfig = MISSING
    objective: ObjectiveConfig = MISSING
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    experiment: Optional[str] = None


@dataclass
class EvaluateRunConfig:
    """python -m captioner.evaluate: decode a split from a checkpoint, or score a results file."""

    checkpoint: Optional[str] = None
    # more checkpoints decoded together with `checkpoint` as one ensemble (same vocabulary and encoder)
    ensemble: list[str] = field(default_factory=list)
    split: str = choice("test", ("train", "val", "test"))
    # `data=...` on the command line evaluates on another data set than the checkpoint's
    data: Optional[DataConfig] = None
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    # scoring an existing COCO results file against a COCO-format captions file
    results: Optional[str] = None
    annotations: Optional[str] = None
    metrics: list[str] = field(default_factory=lambda: ["bleu", "meteor", "rouge", "cider"])
    tokenizer: str = choice("auto", ("auto", "java", "python"))
    output_dir: Optional[str] = None  # default: beside the checkpoint
    device: str = "auto"
    progress: bool = True
    # also the error-analysis page errors_<split>_<decode>.html: every image, its caption and
    # references, its own CIDEr-D and BLEU-4, worst first (attention decoders: their strips)
    html: bool = False


@dataclass
class CaptionRunConfig:
    """python -m captioner.caption FOLDER checkpoint=PATH"""

    folder: Optional[str] = None  # also accepted as the first argument
    checkpoint: Optional[str] = None  # a .pt written by training (best.pt or last.pt)
    output: str = "captions.json"
    html: bool = False  # also write a gallery page: output with .html (attention decoders: with their maps)
    attention: bool = False  # attention decoders: one PNG per image of its words and maps, in <output stem>_attention/
    thumbnail_size: int = at_least(256, 16)  # gallery thumbnails: longer side in pixels
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = at_least(16, 1)  # images per encoder batch
    num_workers: int = at_least(0, 0)  # processes decoding images
    progress: bool = True
    decode: DecodeConfig = field(default_factory=DecodeConfig)


@dataclass
class DemoConfig:
    """What the live demo serves on, and what one request may cost the server."""

    host: str = "127.0.0.1"  # 0.0.0.0: every network interface (anyone who can reach the machine)
    port: int = between(7860, 1, 65535)
    max_batch_size: int = at_least(16, 1)  # requests waiting in the queue decoded together
    encoder_batch_size: int = at_least(2, 1)  # of those, photos the CNN reads at once
    max_upload_mb: float = above(10.0, 0.0)
    max_megapixels: float = above(50.0, 0.0)
    # the encoder resizes the shorter side first: a 1 x 10,000 image would be 256 x 2,560,000 pixels
    max_aspect_ratio: float = at_least(20.0, 1.0)
    max_beam_size: int = at_least(10, 1)  # the page's largest beam (and n-best)


@dataclass
class DemoRunConfig:
    """python -m captioner.demo checkpoint=PATH"""

    checkpoint: Optional[str] = None  # a .pt written by training (best.pt or last.pt)
    checkpoints: list[str] = field(default_factory=list)  # more, each captioning the same photo beside it
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    decode: DecodeConfig = field(default_factory=DecodeConfig)  # the page's settings when it opens
    demo: DemoConfig = field(default_factory=DemoConfig)

    @staticmethod
    def check(node) -> Optional[str]:
        if node.decode.beam_size > node.demo.max_beam_size:
            return (f"decode.beam_size={node.decode.beam_size}: must be at most "
                    f"demo.max_beam_size={node.demo.max_beam_size}")
        return None


def decode_config(decode: Any = None, **overrides) -> DictConfig:
    """A typed, checked ``decode`` node: the schema's defaults, then ``decode`` (a DecodeConfig, a
    mapping or a DictConfig), then ``overrides``. A misspelled option or a bad value fails here."""
    given = set(decode.keys() if decode is not None and not dataclasses.is_dataclass(decode) else ()) | set(overrides)
    unknown = given - {f.name for f in dataclasses.fields(DecodeConfig)}
    if unknown:
        raise TypeError(f"unknown decode option(s): {', '.join(sorted(unknown))}")
    cfg = OmegaConf.merge(OmegaConf.structured(DecodeConfig), decode if decode is not None else {}, overrides)
    validate(cfg, prefix="decode.")
    return cfg


def run_dir(out_dir: Optional[str], resume: Optional[str]) -> Optional[str]:
    """A training run's directory: ``train.out_dir``, else that of the checkpoint ``train.resume``
    names (a resumed run goes on writing where it was), else None (Hydra's dated folder)."""
    if out_dir:
        return str(out_dir)
    if resume and resume not in ("auto", "none", "null"):
        return str(Path(resume) if Path(resume).is_dir() else Path(resume).parent)
    return None


# hydra.run.dir of training (conf/train.yaml), so a run directory holds its own log and config
if not OmegaConf.has_resolver("captioner.run_dir"):
    OmegaConf.register_new_resolver(
        "captioner.run_dir", lambda out_dir, resume, fallback: run_dir(out_dir, resume) or fallback)
