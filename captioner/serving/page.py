"""The demo's page (Gradio): a photo (upload, paste, webcam), the decoding controls, and a column
per checkpoint with its caption, its n-best list and, for an attention decoder, its attention
strip. One batched event answers them all (``captioner.serving.replies.Demo``) behind Gradio's
queue, one batch at a time."""
from __future__ import annotations

import gradio as gr

from captioner.serving.replies import CONTROLS, Demo


def build_app(demo: Demo, decode, limits) -> gr.Blocks:
    """The page for ``demo``; its controls open at ``decode`` (the ``decode`` config), within
    ``limits`` (the ``demo`` config)."""
    with gr.Blocks(title="captioner", analytics_enabled=False) as app:
        gr.Markdown("## captioner: live demo")
        with gr.Row():
            with gr.Column():
                photo = gr.Image(label="Photo", type="filepath", sources=["upload", "clipboard", "webcam"],
                                 elem_id="photo")
                button = gr.Button("Caption", variant="primary")
                message = gr.Textbox(label="Message", interactive=False, elem_id="message")
            with gr.Column():
                method = gr.Radio(["greedy", "beam", "sample"], value=decode.method, label="Decoding")
                with gr.Group():
                    beam_size = gr.Slider(1, limits.max_beam_size, value=decode.beam_size, step=1,
                                          label="Beam: size")
                    length_penalty = gr.Radio(["none", "average", "gnmt"], value=decode.length_penalty,
                                              label="Beam: length penalty")
                    n_best = gr.Slider(1, limits.max_beam_size, value=decode.n_best, step=1, label="Beam: n-best")
                with gr.Group():  # bounds widened to hold any configured value
                    temperature = gr.Slider(min(0.05, decode.temperature), max(2.0, decode.temperature),
                                            value=decode.temperature, step=0.05, label="Sampling: temperature")
                    top_k = gr.Slider(0, max(100, decode.top_k), value=decode.top_k, step=1,
                                      label="Sampling: top-k (0: every word)")
                    top_p = gr.Slider(min(0.05, decode.top_p), 1.0, value=decode.top_p, step=0.05,
                                      label="Sampling: top-p")
        controls = {"method": method, "beam_size": beam_size, "length_penalty": length_penalty, "n_best": n_best,
                    "temperature": temperature, "top_k": top_k, "top_p": top_p}
        outputs = [message]
        with gr.Row():
            for index, (name, captioner) in enumerate(demo.captioners.items()):
                with gr.Column():
                    gr.Textbox(name, label="Checkpoint", interactive=False, max_lines=1)
                    outputs += [_output(kind, index) for kind in demo.outputs(captioner)]
        # The controls' raw values reach the function unprocessed: a component's own check raising
        # on one request would fail every request of its batch; Demo checks each request itself.
        gr.on([photo.change, button.click], demo,
              inputs=[photo, *(controls[name] for name in CONTROLS)],
              outputs=outputs, batch=True, max_batch_size=limits.max_batch_size, preprocess=False,
              concurrency_limit=1, api_name="caption")
    return app


def _output(kind: str, index: int) -> gr.components.Component:
    if kind == "caption":
        return gr.Textbox(label="Caption", interactive=False, elem_id=f"caption-{index}")
    if kind == "n_best":
        return gr.Dataframe(headers=["caption", "score"], label="n-best", interactive=False, elem_id=f"n-best-{index}")
    return gr.Image(label="Where each word looked", type="pil", format="png", interactive=False,  # (not lossy webp)
                    elem_id=f"attention-{index}")


def serve(app: gr.Blocks, limits) -> None:
    """Serve ``app`` on ``limits.host``:``limits.port`` until interrupted. Gradio refuses an upload
    over ``max_upload_mb`` while it arrives, before it is stored, and says so on the page."""
    try:
        app.queue().launch(server_name=limits.host, server_port=limits.port,
                           max_file_size=int(limits.max_upload_mb * 2**20))
    except OSError as err:
        if "Cannot find empty port" not in str(err):
            raise
        # Gradio's words name its environment variable, which an explicit port overrides
        raise OSError(f"port {limits.port} on {limits.host} is in use: choose another with demo.port=N") from None
