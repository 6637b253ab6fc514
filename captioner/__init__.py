"""captioner: Show-and-Tell image captioning.

    from captioner import Captioner
    captioner = Captioner.from_checkpoint("outputs/train/<run>/best.pt")
    captioner.caption_images(["photo.jpg"], method="beam", beam_size=5)
"""

__all__ = ["Captioner"]


def __getattr__(name: str):
    # Imported on first use: `import captioner.data.vocab` (and every other submodule) then stays
    # free of torch, torchvision and Hydra until the public API is actually asked for.
    if name == "Captioner":
        from captioner.decoding.captioner import Captioner

        return Captioner
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
