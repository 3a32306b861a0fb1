"""sdatc's ComfyUI node pack: link this folder into ComfyUI's ``custom_nodes/`` in an environment where sdatc
is installed (README, ComfyUI nodes). The nodes live in ``sdatc/comfy_nodes.py``:

- sdatc: Load pipeline      (preview DCM, SDATC, UltraVSR, bicubic; folders or Hub ids; dtype; device)
- sdatc: Restore frames x4  (IMAGE (B, H, W, C) in [0, 1] -> (B, 4H, 4W, 3); windows with blended overlaps)
- sdatc: Degradation score  (UltraVSR's d, for the restore node)
- sdatc: Load video         (frames of a file; empty path: the demo clip)

``workflow_api.json`` loads the demo clip's frames, restores them with the preview model and previews them.
"""

try:
    from sdatc.comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as e:  # ComfyUI shows this line beside the pack's name
    raise ImportError(f"the sdatc nodes need sdatc in ComfyUI's Python: pip install -e /path/to/sdatc ({e})") from None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
