"""The "Perfusion" tab: start, watch and interrupt training jobs (also from an existing concept); the step
picker (every checkpoint of a run with its preview; promote one); the composition preview; export.

Jobs run on the server (jobs.py); the status box and preview poll the job registry every few
seconds, so a reloaded or reopened page shows the running job again. Field defaults are the trainer's
(`training.config.field_defaults`); a start goes through the REST API's validation (its limits).
"""
from __future__ import annotations

import html
import logging
import time

import gradio as gr
from modules import shared

from perfusion_export.layouts import LAYOUTS, PRECISIONS

from ..core.errors import PerfusionError
from ..core.tags import format_tag
from ..training.config import field_defaults
from . import state
from .export import ExportRequest, export_from_body
from .train_request import WEBUI_FAMILY, ApiError, check_images, parse_train_request

log = logging.getLogger("perfusion")


def _fmt_eta(seconds):
    if seconds is None or seconds != seconds:
        return "–"
    return time.strftime("%H:%M:%S", time.gmtime(max(0, seconds)))


def status_html() -> str:
    job = state.jobs().latest()
    if job is None:
        return "<div class='perfusion-status'>No training job yet.</div>"
    j = job.to_json(preview=False)
    pct = 100.0 * j["step"] / max(1, j["total"])
    loss = "–" if j["loss"] is None else f"{j['loss']:.4f}"
    tag = html.escape(format_tag(j["name"]))
    done = "" if job.active else f"<div>{html.escape(j['message'])}</div>"
    if j["state"] == "finished":
        done += f"<div>Use it: <code>{tag}</code></div>"
    return (
        f"<div class='perfusion-status'><b>{html.escape(j['name'])}</b> ({html.escape(j['superclass'])}) — "
        f"<b>{j['state']}</b>, job {j['id']}<div class='progressDiv'><div class='progress' style='width:{pct:.1f}%'>"
        f"{j['step']}/{j['total']}</div></div>step {j['step']}/{j['total']} · loss {loss} · ETA {_fmt_eta(j['eta_seconds'])}"
        f"{done}</div>"
    )


def preview_image():
    job = state.jobs().latest()
    return None if job is None else job.preview


def start(name, superclass, images_dir, uploads, masks_dir, steps, batch_size, micro_batch, lr_value, lr_embedding,
          beta, tau, resolution, seed, resume, overwrite, init_from=None):
    images = []
    if images_dir and images_dir.strip():
        images.append(images_dir.strip())
    for f in uploads or []:
        images.append(getattr(f, "name", f))
    body = {"name": name, "superclass": superclass, "images": images, "masks_dir": masks_dir.strip() or None,
            "steps": int(steps), "batch_size": int(batch_size), "micro_batch": int(micro_batch) or None,
            "lr_value": float(lr_value), "lr_embedding": float(lr_embedding), "beta": float(beta), "tau": float(tau),
            "resolution": int(resolution), "seed": int(seed), "resume": bool(resume), "overwrite": bool(overwrite),
            "init_from": init_from or None}
    try:
        if shared.sd_model is None:
            raise ApiError(409, "no Stable Diffusion checkpoint is loaded: load one first")
        req = parse_train_request(body, allowed_roots=None)
        check_images(req)  # images too small for the resolution: said now, not by a job that fails later
        job = state.jobs().submit(req)
    except ApiError as exc:
        return f"<div class='perfusion-status perfusion-error'>{html.escape(exc.message)}</div>"
    return f"<div class='perfusion-status'>Job {job.id} queued: training {html.escape(job.request.name)}…</div>"


def interrupt():
    job = state.jobs().latest()
    if job is None or not job.active:
        return "<div class='perfusion-status'>No running job.</div>"
    state.jobs().interrupt(job.id)
    return f"<div class='perfusion-status'>Interrupt requested for job {job.id}; it saves and stops after this step.</div>"


def export(names, layout, precision):
    try:
        competitive = bool(getattr(shared.opts, "perfusion_competitive_gates", False))
        result = export_from_body({"concepts": list(names or []), "layout": layout, "precision": precision,
                                   "competitive_gates": competitive}, state.store())
    except ApiError as exc:
        return html.escape(exc.message)
    lines = [f"Exported to {result['out']}"] + ([f"TensorRT extension file: {result['unet_onnx']}"]
                                               if "unet_onnx" in result else [])
    lines.append(f"verification: {result['verification']}")
    return "<br>".join(html.escape(line) for line in lines)


def concept_names():
    return [e.name for e in state.store().entries() if e.concept is not None]


# ---- the step picker -------------------------------------------------------------------------------
def _steps(name):
    try:
        return state.library().steps(name) if name else []
    except ApiError:
        return []


def steps_selected(name):
    """A concept was chosen: the slider spans its checkpoints and starts at the one the file holds now."""
    steps = _steps(name)
    if not steps:
        return gr.update(minimum=0, maximum=0, value=0), None, f"<div>{html.escape(name or '')}: no checkpoints</div>"
    current = next((i for i, s in enumerate(steps) if s["current"]), len(steps) - 1)
    label = f"Checkpoint ({len(steps)} saved: steps {steps[0]['step']} to {steps[-1]['step']})"
    return (gr.update(minimum=0, maximum=len(steps) - 1, value=current, step=1, label=label), *step_view(name, current))


def step_view(name, index):
    steps = _steps(name)
    if not steps:
        return None, ""
    s = steps[max(0, min(int(index or 0), len(steps) - 1))]
    image = None
    if s["preview"]:
        from PIL import Image

        with Image.open(s["preview"]) as im:
            image = im.copy()
    loss = "–" if s["loss"] is None else f"{s['loss']:.5f}"
    now = " · <b>the concept now</b>" if s["current"] else ""
    return image, f"<div>step <b>{s['step']}</b> of {steps[-1]['step']} · loss {loss}{now}</div>"


def promote(name, index):
    steps = _steps(name)
    if not steps:
        return "<div class='perfusion-status perfusion-error'>No checkpoints to promote.</div>"
    step = steps[max(0, min(int(index or 0), len(steps) - 1))]["step"]
    try:
        result = state.library().promote(name, step)
    except ApiError as exc:
        return f"<div class='perfusion-status perfusion-error'>{html.escape(exc.message)}</div>"
    kept = f" The file it replaced is in .trash/{html.escape(result['trash'])}." if result["trash"] else ""
    return f"<div class='perfusion-status'>Step {step} is now {html.escape(name)}.safetensors.{kept}</div>"


# ---- the composition preview -------------------------------------------------------------------------
def compose_preview(prompt, negative, seed, steps, size):
    """Each concept of the prompt alone, then together, at one seed (under the WebUI's generation lock)."""
    from modules import call_queue

    from .compose import render

    try:
        with call_queue.queue_lock:
            panels, used = render(prompt or "", negative or "", int(seed if seed is not None else -1),
                                  int(steps or 20), int(size or 512), int(size or 512))
    except PerfusionError as exc:
        return [], f"<div class='perfusion-status perfusion-error'>{html.escape(str(exc))}</div>"
    except Exception as exc:  # a failed generation (NaNs, out of memory): said here, logged in full
        log.exception("Perfusion: composition preview failed")
        return [], (f"<div class='perfusion-status perfusion-error'>the preview failed: "
                    f"{html.escape(type(exc).__name__)}: {html.escape(str(exc))}</div>")
    labels = ", ".join(html.escape(label) for _, label in panels)
    return panels, f"<div class='perfusion-status'>{len(panels)} panels ({labels}) at seed {used}</div>"


def create_tab():
    opts = shared.opts
    d = field_defaults(WEBUI_FAMILY)
    export_defaults = ExportRequest(())
    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row(equal_height=False):
            with gr.Column(variant="panel"):
                gr.HTML("<p>Train a Perfusion concept on the loaded checkpoint. It is saved to "
                        f"<code>{html.escape(str(state.concepts_dir()))}</code> and used as "
                        "<code>&lt;perfusion:NAME&gt;</code> in prompts.</p>")
                with gr.Row():
                    name = gr.Textbox(label="Name", placeholder="teddy", elem_id="perfusion_name")
                    superclass = gr.Textbox(label="Superclass (one word)", placeholder="bear", elem_id="perfusion_superclass")
                images_dir = gr.Textbox(label="Images folder (on the server)", elem_id="perfusion_images_dir")
                uploads = gr.File(label="…or upload 4–8 images", file_count="multiple", file_types=["image"],
                                  elem_id="perfusion_uploads")
                masks_dir = gr.Textbox(label="Masks folder (optional: NAME.png masks, white = subject)",
                                       elem_id="perfusion_masks_dir")
                with gr.Row():
                    steps = gr.Number(label="Steps", value=int(getattr(opts, "perfusion_default_steps", 0) or d["steps"]),
                                      precision=0, elem_id="perfusion_steps")
                    batch_size = gr.Number(label="Batch size", value=d["batch_size"], precision=0,
                                           elem_id="perfusion_batch_size")
                    micro_batch = gr.Number(label="Micro-batch (0: auto)", value=d["micro_batch"] or 0, precision=0,
                                            elem_id="perfusion_micro_batch")
                    resolution = gr.Number(label="Resolution", value=d["resolution"], precision=0,
                                           elem_id="perfusion_resolution")
                with gr.Row():
                    lr_value = gr.Number(label="Learning rate o*_V", value=d["lr_value"], elem_id="perfusion_lr_value")
                    lr_embedding = gr.Number(label="Learning rate embedding", value=d["lr_embedding"],
                                             elem_id="perfusion_lr_embedding")
                    beta = gr.Number(label="β (stored default)",
                                     value=float(getattr(opts, "perfusion_default_beta", 0) or d["beta"]),
                                     elem_id="perfusion_beta")
                    tau = gr.Number(label="τ (stored default)",
                                    value=float(getattr(opts, "perfusion_default_tau", 0) or d["tau"]),
                                    elem_id="perfusion_tau")
                    seed = gr.Number(label="Seed", value=d["seed"], precision=0, elem_id="perfusion_seed")
                with gr.Row():
                    resume = gr.Checkbox(label="Resume the run of this name", value=False, elem_id="perfusion_resume")
                    overwrite = gr.Checkbox(label="Replace an existing concept (it goes to the trash)", value=False,
                                            elem_id="perfusion_overwrite")
                    init_from = gr.Dropdown(label="Start from concept (continue training it)", choices=[""] +
                                            concept_names(), value="", elem_id="perfusion_init_from")
                with gr.Row():
                    train_button = gr.Button("Train", variant="primary", elem_id="perfusion_train")
                    interrupt_button = gr.Button("Interrupt", elem_id="perfusion_interrupt")
                with gr.Accordion("Export to ONNX", open=False):
                    export_names = gr.Dropdown(label="Concepts", multiselect=True, choices=concept_names(),
                                               elem_id="perfusion_export_concepts")
                    export_layout = gr.Radio(label="Layout", choices=list(LAYOUTS), value=export_defaults.layout,
                                             elem_id="perfusion_export_layout")
                    export_precision = gr.Radio(label="Precision", choices=list(PRECISIONS),
                                                value=export_defaults.precision, elem_id="perfusion_export_precision")
                    export_button = gr.Button("Export", elem_id="perfusion_export")
                    export_result = gr.HTML()
                with gr.Accordion("Steps of a run", open=False):
                    gr.HTML("<p>Every checkpoint of a training run with its preview (same seed). "
                            "<i>Promote</i> makes the chosen step the concept; the file it replaces goes to the trash.</p>")
                    with gr.Row():
                        steps_concept = gr.Dropdown(label="Concept", choices=concept_names(), elem_id="perfusion_steps_concept")
                        steps_refresh = gr.Button("↻", elem_id="perfusion_steps_refresh")
                    steps_slider = gr.Slider(label="Checkpoint", minimum=0, maximum=0, step=1, value=0,
                                             elem_id="perfusion_steps_slider")
                    steps_image = gr.Image(label="Preview", interactive=False, type="pil", elem_id="perfusion_steps_image")
                    steps_info = gr.HTML(elem_id="perfusion_steps_info")
                    promote_button = gr.Button("Promote this step", elem_id="perfusion_promote")
                    promote_result = gr.HTML()
                with gr.Accordion("Composition preview", open=False):
                    gr.HTML("<p>Several concepts in one prompt: each alone (the others replaced by their superclass "
                            "word) and all together, at one seed, to see whether each keeps its look.</p>")
                    compose_prompt = gr.Textbox(label="Prompt", elem_id="perfusion_compose_prompt",
                                                placeholder="a <perfusion:teddy> on the left, a <perfusion:robot> on "
                                                            "the right")
                    compose_negative = gr.Textbox(label="Negative prompt", elem_id="perfusion_compose_negative")
                    with gr.Row():
                        compose_seed = gr.Number(label="Seed", value=1, precision=0, elem_id="perfusion_compose_seed")
                        compose_steps = gr.Number(label="Steps", value=20, precision=0, elem_id="perfusion_compose_steps")
                        compose_size = gr.Number(label="Size", value=d["resolution"], precision=0,
                                                 elem_id="perfusion_compose_size")
                    compose_button = gr.Button("Compose", elem_id="perfusion_compose")
                    compose_gallery = gr.Gallery(label="Alone and together", columns=3, elem_id="perfusion_compose_gallery")
                    compose_result = gr.HTML(elem_id="perfusion_compose_result")
            with gr.Column():
                message = gr.HTML(elem_id="perfusion_message")
                gr.HTML(value=status_html, every=2, elem_id="perfusion_status")  # polls the job
                gr.Image(value=preview_image, every=5, label="Latest preview", interactive=False, type="pil",
                         elem_id="perfusion_preview")
        train_button.click(start, inputs=[name, superclass, images_dir, uploads, masks_dir, steps, batch_size,
                                          micro_batch, lr_value, lr_embedding, beta, tau, resolution, seed, resume,
                                          overwrite, init_from],
                           outputs=[message])
        steps_concept.change(steps_selected, inputs=[steps_concept], outputs=[steps_slider, steps_image, steps_info])
        steps_slider.change(step_view, inputs=[steps_concept, steps_slider], outputs=[steps_image, steps_info])
        steps_refresh.click(lambda: gr.update(choices=concept_names()), outputs=[steps_concept])
        promote_button.click(promote, inputs=[steps_concept, steps_slider], outputs=[promote_result])\
            .then(step_view, inputs=[steps_concept, steps_slider], outputs=[steps_image, steps_info])
        compose_button.click(compose_preview, inputs=[compose_prompt, compose_negative, compose_seed, compose_steps,
                                                      compose_size], outputs=[compose_gallery, compose_result])
        interrupt_button.click(interrupt, outputs=[message])
        export_button.click(export, inputs=[export_names, export_layout, export_precision], outputs=[export_result])
    return [(tab, "Perfusion", "perfusion")]
