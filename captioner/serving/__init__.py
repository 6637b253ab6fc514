"""Captions on request: the live demo (``python -m captioner.demo``). An upload checked against
what one request may cost (uploads), a batch of requests captioned by every checkpoint with
one forward pass per decoding step (replies), and the Gradio page in front of them (page)."""
