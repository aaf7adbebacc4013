"""The Perfusion card's editor (the WebUI's ✎ on a card): the stored β (τ under "Advanced") and the library —
rename, duplicate, delete to the trash, continue training. The work is in library_actions.py (tested);
this file only lays out the gradio components of the WebUI's user-metadata editor.
"""
from __future__ import annotations

import html

import gradio as gr
from modules import ui_extra_networks_user_metadata

from ..core.concept import DEFAULT_BETA, DEFAULT_TAU
from ..training.config import field_defaults
from .train_request import WEBUI_FAMILY, ApiError, check_images, parse_train_request


def _status(text: str, error: bool = False) -> str:
    return f"<div class='perfusion-status{' perfusion-error' if error else ''}'>{html.escape(text)}</div>"


class PerfusionMetadataEditor(ui_extra_networks_user_metadata.UserMetadataEditor):
    def __init__(self, ui, tabname, page):
        super().__init__(ui, tabname, page)
        self.slider_beta = self.slider_tau = None
        self.new_name = self.continue_steps = self.continue_images = self.library_status = None

    # ---- values --------------------------------------------------------------------------------
    def _concept(self, name):
        try:
            return self.page.store.load(name).concept
        except Exception:  # noqa: BLE001 - an unusable file still opens its editor, with the defaults
            return None

    def get_user_metadata(self, name):
        """The user's own metadata only. The WebUI's version pre-fills the card's description, which here holds
        the facts line with β/τ: saved as the user's text, the card would show the old β/τ after this editor
        changed them."""
        item = self.page.items.get(name, {})
        item["user_metadata"] = item.get("user_metadata") or {}
        return item["user_metadata"]

    def put_values_into_components(self, name):
        values = super().put_values_into_components(name)
        user_metadata = self.get_user_metadata(name)
        if "description" not in user_metadata:  # none written: show the card's own (live β/τ)
            values = [values[0], self.page.generated_description(name) or "", *values[2:]]
        concept = self._concept(name)
        images = ""
        try:
            images = ", ".join(self.page.library().continue_plan(name).get("images", []))
        except ApiError:
            pass
        return [*values[0:5], concept.beta if concept else DEFAULT_BETA, concept.tau if concept else DEFAULT_TAU, "",
                images, ""]

    def save_perfusion_metadata(self, name, description, notes, beta, tau):
        user_metadata = self.get_user_metadata(name)
        generated = self.page.generated_description(name)  # before β/τ change below
        if generated is not None and (description or "").strip() == generated.strip():
            user_metadata.pop("description", None)  # not the user's words: the card keeps its live facts line
        else:
            user_metadata["description"] = description
        user_metadata["notes"] = notes
        self.write_user_metadata(name, user_metadata)
        concept = self._concept(name)
        if concept is not None and (float(beta), float(tau)) != (concept.beta, concept.tau):
            self.page.library().set_defaults(name, float(beta), float(tau))

    # ---- library buttons -----------------------------------------------------------------------
    def _run(self, action, *args, done=""):
        try:
            result = action(*args)
        except ApiError as exc:
            return _status(exc.message, error=True)
        return _status(done.format(**result) if isinstance(result, dict) else done)

    def rename(self, name, new):
        return self._run(self.page.library().rename, name, new,
                         done="Renamed to {name}; the old name still works in prompts. Refresh the cards (🔄).")

    def duplicate(self, name, new):
        return self._run(self.page.library().duplicate, name, new, done="Copied as {name}. Refresh the cards (🔄).")

    def delete(self, name, confirmed):
        if not confirmed:
            return _status("Tick the box first: the concept, its previews and its training run move to the trash.",
                           error=True)
        return self._run(self.page.library().delete, name,
                         done="Moved to the trash (.trash/{trash} in the concepts folder). Refresh the cards (🔄).")

    def continue_training(self, name, steps, images):
        try:
            body = self.page.library().continue_plan(name)
            body["images"] = [p.strip() for p in (images or "").split(",") if p.strip()] or body.get("images") or []
            body["steps"] = int(steps)
            req = parse_train_request(body, allowed_roots=None, family=WEBUI_FAMILY)
            check_images(req)  # as POST /train: images too small for the resolution are named now, not by a failed job
            job = self.page.jobs().submit(req)
        except ApiError as exc:
            return _status(exc.message, error=True)
        return _status(f"Job {job.id} queued: training {body['name']} from {name}; watch it in the Perfusion tab.")

    # ---- layout --------------------------------------------------------------------------------
    def create_editor(self):
        self.create_default_editor_elems()
        self.edit_notes = gr.TextArea(label="Notes", lines=4)
        self.slider_beta = gr.Slider(label="β (stored default)", minimum=0.0, maximum=1.5, step=0.01,
                                     info="Lower: more of the concept; higher: more of the prompt. Tags override it.")
        with gr.Accordion("Advanced", open=False):
            self.slider_tau = gr.Slider(label="τ (stored default)", minimum=0.01, maximum=1.0, step=0.01,
                                        info="The gate's softness")
        with gr.Accordion("Library", open=False):
            with gr.Row():
                self.new_name = gr.Textbox(label="New name", placeholder="teddy-2")
                rename_button = gr.Button("Rename")
                duplicate_button = gr.Button("Duplicate")
            with gr.Row():
                delete_confirm = gr.Checkbox(label="Move it, its previews and its training run to the trash")
                delete_button = gr.Button("Delete", variant="stop")
            with gr.Row():
                self.continue_steps = gr.Number(label="More steps", value=field_defaults(WEBUI_FAMILY)["steps"],
                                                precision=0)
                self.continue_images = gr.Textbox(label="Images (server folder or files, comma-separated)")
                continue_button = gr.Button("Continue training")
            self.library_status = gr.HTML()
        self.create_default_buttons()

        viewed = [self.edit_name, self.edit_description, self.html_filedata, self.html_preview, self.edit_notes,
                  self.slider_beta, self.slider_tau, self.new_name, self.continue_images, self.library_status]
        self.button_edit.click(fn=self.put_values_into_components, inputs=[self.edit_name_input], outputs=viewed)\
            .then(fn=lambda: gr.update(visible=True), inputs=[], outputs=[self.box])
        self.setup_save_handler(self.button_save, self.save_perfusion_metadata,
                                [self.edit_description, self.edit_notes, self.slider_beta, self.slider_tau])
        rename_button.click(fn=self.rename, inputs=[self.edit_name_input, self.new_name], outputs=[self.library_status])
        duplicate_button.click(fn=self.duplicate, inputs=[self.edit_name_input, self.new_name],
                               outputs=[self.library_status])
        delete_button.click(fn=self.delete, inputs=[self.edit_name_input, delete_confirm], outputs=[self.library_status])
        continue_button.click(fn=self.continue_training,
                              inputs=[self.edit_name_input, self.continue_steps, self.continue_images],
                              outputs=[self.library_status])
