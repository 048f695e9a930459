"""ComfyUI custom node "Early Exit Schedule (ee-diffusion)": MODEL in, MODEL out, trailing blocks skipped when noisy.

Install ee-diffusion in ComfyUI's Python environment (`pip install ee-diffusion`) and copy or symlink this folder into
ComfyUI's `custom_nodes/` (see README.md here). All the work is done by `ee_diffusion.comfyui_exits`; this file only
declares the node: in ComfyUI's V3 schema from the pinned `comfy_api.v0_0_2` where that exists, otherwise as a
classic node for older ComfyUI.
"""

from __future__ import annotations

from ee_diffusion.comfyui_exits import NODE_SHAPES, early_exit_node, supported_families

NODE_ID = "EEDiffusionEarlyExitSchedule"
DISPLAY_NAME = "Early Exit Schedule (ee-diffusion)"
CATEGORY = "advanced/model"
DESCRIPTION = (
    "Skips the trailing transformer blocks at noisy steps, following an exit schedule (ee-diffusion): every block "
    "at the clean end, min_depth_fraction of them at pure noise. The last block of each stream always runs. "
    f"Supported models: {supported_families()}."
)
TOOLTIPS = {
    "shape": "How the depth falls from all blocks (clean end) to min_depth_fraction (pure noise); constant: "
    "min_depth_fraction at every step. Ignored when schedule_folder is set.",
    "min_depth_fraction": "Fraction of the model's blocks (double then single blocks as one sequence) run at pure "
    "noise.",
    "start_percent": "Sampling percent from which blocks may be skipped (0 = the first, noisiest step).",
    "end_percent": "Sampling percent after which every block runs again.",
    "schedule_folder": "Optional: a folder holding an exit_schedule.json saved by ee-diffusion (e.g. a calibrated "
    "schedule); it must be made for this model's block count.",
}
# The number inputs, for either schema: name -> (default, min, step); each at most 1.0.
NUMBERS = {
    "min_depth_fraction": (0.5, 0.01, 0.01),
    "start_percent": (0.0, 0.0, 0.001),
    "end_percent": (1.0, 0.0, 0.001),
}

try:
    from comfy_api.v0_0_2 import ComfyExtension, io
except ImportError:  # ComfyUI before the V3 node schema (or outside ComfyUI)
    ComfyExtension = io = None

if io is not None:

    class EarlyExitSchedule(io.ComfyNode):
        """The node, in ComfyUI's V3 schema."""

        @classmethod
        def define_schema(cls) -> io.Schema:
            return io.Schema(
                node_id=NODE_ID,
                display_name=DISPLAY_NAME,
                category=CATEGORY,
                description=DESCRIPTION,
                inputs=[
                    io.Model.Input("model"),
                    io.Combo.Input("shape", options=list(NODE_SHAPES), default="linear", tooltip=TOOLTIPS["shape"]),
                    *(
                        io.Float.Input(name, default=default, min=low, max=1.0, step=step, tooltip=TOOLTIPS[name])
                        for name, (default, low, step) in NUMBERS.items()
                    ),
                    io.String.Input("schedule_folder", default="", optional=True, tooltip=TOOLTIPS["schedule_folder"]),
                ],
                outputs=[io.Model.Output()],
            )

        @classmethod
        def execute(
            cls, model, shape, min_depth_fraction, start_percent, end_percent, schedule_folder=""
        ) -> io.NodeOutput:
            return io.NodeOutput(
                early_exit_node(model, shape, min_depth_fraction, start_percent, end_percent, schedule_folder or "")
            )

    class EEDiffusionExtension(ComfyExtension):
        """The extension ComfyUI loads through `comfy_entrypoint`."""

        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return [EarlyExitSchedule]

    async def comfy_entrypoint() -> EEDiffusionExtension:
        """ComfyUI's V3 entry point."""
        return EEDiffusionExtension()

else:

    class EarlyExitSchedule:
        """The node, as a classic (V1) node."""

        RETURN_TYPES = ("MODEL",)
        FUNCTION = "execute"
        CATEGORY = CATEGORY
        DESCRIPTION = DESCRIPTION

        @classmethod
        def INPUT_TYPES(cls) -> dict:
            numbers = {
                name: ("FLOAT", {"default": default, "min": low, "max": 1.0, "step": step, "tooltip": TOOLTIPS[name]})
                for name, (default, low, step) in NUMBERS.items()
            }
            return {
                "required": {
                    "model": ("MODEL",),
                    "shape": (list(NODE_SHAPES), {"default": "linear", "tooltip": TOOLTIPS["shape"]}),
                    **numbers,
                },
                "optional": {"schedule_folder": ("STRING", {"default": "", "tooltip": TOOLTIPS["schedule_folder"]})},
            }

        def execute(self, model, shape, min_depth_fraction, start_percent, end_percent, schedule_folder=""):
            return (early_exit_node(model, shape, min_depth_fraction, start_percent, end_percent, schedule_folder),)

    # Only without the V3 API: ComfyUI reads NODE_CLASS_MAPPINGS first and would then ignore comfy_entrypoint.
    NODE_CLASS_MAPPINGS = {NODE_ID: EarlyExitSchedule}
    NODE_DISPLAY_NAME_MAPPINGS = {NODE_ID: DISPLAY_NAME}
