"""The custom-node folder `comfyui/`, loaded the way ComfyUI loads a custom node (its `__init__.py` by path): the V3
declaration where `comfy_api.v0_0_2` exists (a minimal stand-in of it here), the classic mappings where it does not,
and the example workflow."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import sys
import types
from pathlib import Path

import pytest
from comfy_standin import APPLY_MODEL, make_patcher

from ee_diffusion.comfyui_exits import NODE_SHAPES, WRAPPER_KEY

NODE_DIR = Path(__file__).resolve().parents[2] / "comfyui"


def _load_node_module(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, NODE_DIR / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_comfy_api() -> dict[str, types.ModuleType]:
    """`comfy_api.v0_0_2` with just the names the node uses, each recording what it was given."""

    class Recorded:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

    def io_type(io_type: str) -> type:
        return type(
            io_type,
            (),
            {
                "Input": type("Input", (Recorded,), {"io_type": io_type}),
                "Output": type("Output", (Recorded,), {"io_type": io_type}),
            },
        )

    class ComfyNode:
        pass

    class ComfyExtension:
        async def get_node_list(self):
            raise NotImplementedError

    io = types.SimpleNamespace(
        ComfyNode=ComfyNode,
        Schema=type("Schema", (Recorded,), {}),
        NodeOutput=type("NodeOutput", (Recorded,), {}),
        Model=io_type("MODEL"),
        Combo=io_type("COMBO"),
        Float=io_type("FLOAT"),
        String=io_type("STRING"),
    )
    package, versioned = types.ModuleType("comfy_api"), types.ModuleType("comfy_api.v0_0_2")
    versioned.io, versioned.ComfyExtension = io, ComfyExtension
    package.v0_0_2 = versioned
    return {"comfy_api": package, "comfy_api.v0_0_2": versioned}


def test_without_the_v3_api_it_is_a_classic_node(monkeypatch):
    monkeypatch.setitem(sys.modules, "comfy_api", None)  # an older ComfyUI: the import fails
    module = _load_node_module("ee_diffusion_node_classic")
    assert not hasattr(module, "comfy_entrypoint")
    assert module.NODE_DISPLAY_NAME_MAPPINGS == {module.NODE_ID: "Early Exit Schedule (ee-diffusion)"}
    node_class = module.NODE_CLASS_MAPPINGS[module.NODE_ID]
    spec = node_class.INPUT_TYPES()
    names = [*spec["required"], *spec["optional"]]
    assert names == ["model", "shape", "min_depth_fraction", "start_percent", "end_percent", "schedule_folder"]
    assert list(spec["required"]["shape"][0]) == list(NODE_SHAPES)
    assert node_class.RETURN_TYPES == ("MODEL",)
    execute = getattr(node_class(), node_class.FUNCTION)
    assert list(inspect.signature(execute).parameters) == names
    (patched,) = execute(make_patcher(), "linear", 0.5, 0.0, 1.0)
    assert len(patched.get_wrappers(APPLY_MODEL, WRAPPER_KEY)) == 1


def test_with_the_pinned_v3_api_it_is_a_v3_extension_only(monkeypatch):
    for name, module in _fake_comfy_api().items():
        monkeypatch.setitem(sys.modules, name, module)
    module = _load_node_module("ee_diffusion_node_v3")
    assert not hasattr(module, "NODE_CLASS_MAPPINGS")  # ComfyUI would read these first and skip comfy_entrypoint
    assert inspect.iscoroutinefunction(module.comfy_entrypoint)
    extension = asyncio.run(module.comfy_entrypoint())
    (node_class,) = asyncio.run(extension.get_node_list())
    schema = node_class.define_schema().kwargs
    assert schema["node_id"] == module.NODE_ID and schema["display_name"] == "Early Exit Schedule (ee-diffusion)"
    inputs = [(type(i).io_type, i.args[0], i.kwargs) for i in schema["inputs"]]
    assert [(kind, name) for kind, name, _ in inputs] == [
        ("MODEL", "model"),
        ("COMBO", "shape"),
        ("FLOAT", "min_depth_fraction"),
        ("FLOAT", "start_percent"),
        ("FLOAT", "end_percent"),
        ("STRING", "schedule_folder"),
    ]
    assert inputs[1][2]["options"] == list(NODE_SHAPES) and inputs[5][2]["optional"] is True
    assert [type(o).io_type for o in schema["outputs"]] == ["MODEL"]
    assert list(inspect.signature(node_class.execute).parameters) == [name for _, name, _ in inputs]
    output = node_class.execute(make_patcher(), "cosine", 0.25, 0.0, 1.0, "")
    (patched,) = output.args
    assert len(patched.get_wrappers(APPLY_MODEL, WRAPPER_KEY)) == 1
    with pytest.raises(ValueError, match="min_depth_fraction"):
        node_class.execute(make_patcher(), "cosine", 0.0, 0.0, 1.0)


def test_the_example_workflow_wires_the_node_between_loader_and_sampler():
    workflow = json.loads((NODE_DIR / "example_workflow.json").read_text())
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for link_id, origin, origin_slot, target, target_slot, kind in workflow["links"]:
        assert link_id in nodes[origin]["outputs"][origin_slot]["links"]
        assert nodes[origin]["outputs"][origin_slot]["type"] == kind
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert nodes[target]["inputs"][target_slot]["type"] == kind
    (ours,) = [node for node in nodes.values() if node["type"] == "EEDiffusionEarlyExitSchedule"]
    shape, fraction, start, end, folder = ours["widgets_values"]
    assert shape in NODE_SHAPES and 0 < fraction <= 1 and 0 <= start <= end <= 1 and folder == ""
    origin = {link[0]: link[1] for link in workflow["links"]}
    assert nodes[origin[ours["inputs"][0]["link"]]]["type"] == "CheckpointLoaderSimple"
    (sampler_link,) = ours["outputs"][0]["links"]
    assert any(n["type"] == "KSampler" and n["inputs"][0]["link"] == sampler_link for n in nodes.values())


def test_both_schemas_give_the_number_inputs_the_same_bounds_steps_and_tooltips(monkeypatch):
    monkeypatch.setitem(sys.modules, "comfy_api", None)
    classic = _load_node_module("ee_diffusion_node_classic_numbers")
    spec = classic.NODE_CLASS_MAPPINGS[classic.NODE_ID].INPUT_TYPES()["required"]
    for name, module in _fake_comfy_api().items():
        monkeypatch.setitem(sys.modules, name, module)
    v3 = _load_node_module("ee_diffusion_node_v3_numbers")
    (node_class,) = asyncio.run(asyncio.run(v3.comfy_entrypoint()).get_node_list())
    schema = {i.args[0]: i.kwargs for i in node_class.define_schema().kwargs["inputs"]}
    for name in ("min_depth_fraction", "start_percent", "end_percent"):
        kind, settings = spec[name]
        assert kind == "FLOAT" and settings == schema[name], name
        assert settings["tooltip"] == classic.TOOLTIPS[name] and settings["max"] == 1.0
