"""ComfyUI entry point of the Z-Image node pack.

ComfyUI imports this file as a package from custom_nodes/. It must also import where ComfyUI is absent
(tests, tools), so it only re-exports the node mappings; the nodes import ComfyUI lazily.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
