"""Config schemas: one dataclass per component, registered in Hydra's ConfigStore.

The YAML files under ``conf/`` select and override these; because every node is typed, a
misspelled key or a wrong type fails at start-up instead of being silently ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

# conf/ sits beside the package in the repository (the install is editable).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@dataclass
class DataConfig:
    name: str = "shapes"  # shapes | flickr8k | coco_karpathy | coco_captions | coco_format
    root: str = "data/shapes"
    # shapes: how many images per split, and the generator's seed (the data set is a pure function of these)
    num_train: int = 2000
    num_val: int = 250
    num_test: int = 250
    image_size: int = 128
    seed: int = 0
    # flickr8k / coco sources (paths relative to root unless absolute)
    token_file: Optional[str] = None
    karpathy_json: Optional[str] = None
    image_dir: Optional[str] = None
    annotations: Optional[str] = None
    use_restval: bool = True
    # vocabulary, built from the training split only
    min_count: int = 5
    max_length: int = 16  # caption tokens kept for training, not counting <bos>/<eos>
    on_bad_image: str = "error"  # error | skip


@dataclass
class EncoderConfig:
    name: str = "efficientnet_lite0"
    pretrained: bool = True
    weights: Optional[str] = None  # a local state-dict file instead of the download
    # preprocessing, as timm names it: a square input_size-pixel crop of the centre crop_pct of
    # the image (null: the encoder's standard, 224 px of the centre 0.875)
    input_size: Optional[int] = None
    crop_pct: Optional[float] = None
    batch_size: int = 32  # feature extraction
    num_workers: int = 0
    cache_dtype: str = "float16"
    cache_dir: Optional[str] = None  # default: <data.root>/features
    finetune_after: int = -1  # step after which the CNN trains end to end; -1 never
    finetune_lr: float = 1e-5


@dataclass
class ModelConfig:
    inject: str = "first_input"  # first_input | init_state | first_step_bias | every_step
    cell: str = "lstm"  # lstm | gru | rnn
    num_layers: int = 1
    embed_dim: int = 256
    hidden_dim: int = 512
    dropout: float = 0.5
    tie_embeddings: bool = False  # output layer shares the word embedding (needs embed_dim == hidden_dim)
    label_smoothing: float = 0.0  # training loss only; validation loss and decoding are unaffected


@dataclass
class DecodeConfig:
    method: str = "greedy"  # greedy | sample | beam
    max_length: int = 20
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    beam_size: int = 3
    length_penalty: str = "none"  # none | average | gnmt
    alpha: float = 0.7  # GNMT length-penalty exponent
    n_best: int = 1
    block_trigrams: bool = False
    ban_unk: bool = False
    seed: int = 0
    batch_size: int = 100


@dataclass
class OptimConfig:
    lr: float = 2e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 5.0
    schedule: str = "cosine"  # cosine | step | constant
    warmup_steps: int = 100
    step_epochs: int = 3  # step schedule: decay every N epochs
    gamma: float = 0.8
    # validate and save an exponential moving average of the decoder's weights (0: the weights as
    # trained); checkpoints keep the trained weights too, for resuming
    ema_decay: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 6
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out_dir: Optional[str] = None  # default: Hydra's run directory
    log_every: int = 50
    val_max_images: int = 0  # 0: the whole val split
    monitor: str = "Bleu_4"
    progress: bool = True
    plot: bool = True
    resume: Optional[str] = None  # PATH (a last.pt/best.pt, or a run directory) | auto (out_dir/last.pt if any)
    save_every: int = 0  # also save last.pt every N optimizer steps, for mid-epoch resume (0: epoch ends only)
    precision: str = "fp32"  # fp32 | bf16 | fp16
    compile: bool = False
    max_steps: int = 0  # 0: no limit (tests use a few steps)


@dataclass
class TrainRunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
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
    split: str = "test"
    # `data=...` on the command line evaluates on another data set than the checkpoint's
    data: Optional[DataConfig] = None
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    # scoring an existing COCO results file against a COCO-format captions file
    results: Optional[str] = None
    annotations: Optional[str] = None
    metrics: list[str] = field(default_factory=lambda: ["bleu", "meteor", "rouge", "cider"])
    tokenizer: str = "auto"  # auto | java | python
    output_dir: Optional[str] = None  # default: beside the checkpoint
    device: str = "auto"
    progress: bool = True


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainRunConfig)
    cs.store(name="evaluate_schema", node=EvaluateRunConfig)


register_configs()


def to_plain(cfg: Any) -> dict:
    """The config as plain data (dicts, lists, scalars) for checkpoints and logs."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg
