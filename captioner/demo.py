"""A live captioning page for one or more checkpoints.

    python -m captioner.demo checkpoint=PATH [demo.port=7860] [demo.host=127.0.0.1] [decode=beam ...]
    python -m captioner.demo 'checkpoints=[a/best.pt,b/best.pt]'

Loads each checkpoint once (through the restore path of ``captioner.caption``, which validates
it: a missing or broken one stops here with one line), then serves a Gradio page on
http://demo.host:demo.port: a photo in, each checkpoint's caption, n-best list and (attention
decoders) attention strip out, side by side. Concurrent requests are decoded together
(``demo.max_batch_size``); a bad photo gets a message on the page (``captioner.serving``). Needs
the ``demo`` extra (gradio).
"""
from __future__ import annotations

from omegaconf import DictConfig

from captioner.cli import UsageError, command
from captioner.config import validate
from captioner.decoding.captioner import Captioner
from captioner.serving.replies import Demo


def run(cfg: DictConfig) -> None:
    """Load the checkpoints, then serve their page until interrupted."""
    validate(cfg)
    paths = ([cfg.checkpoint] if cfg.checkpoint else []) + list(cfg.checkpoints)
    if not paths:
        raise UsageError("no checkpoint given: add checkpoint=PATH (a best.pt or last.pt written by training), "
                         "or 'checkpoints=[a.pt,b.pt]'")
    demo = Demo({path: Captioner.from_checkpoint(path, cfg.device) for path in dict.fromkeys(paths)},
                cfg.decode, cfg.demo)
    try:
        from captioner.serving.page import build_app, serve
    except ModuleNotFoundError as err:
        if err.name != "gradio":
            raise
        raise UsageError("the demo needs gradio: pip install -e '.[demo]'") from None
    serve(build_app(demo, cfg.decode, cfg.demo), cfg.demo)


main = command("demo", run)

if __name__ == "__main__":
    main()
