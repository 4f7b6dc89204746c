"""bpr_core: Boundary Patch Refinement (Tang et al., CVPR 2021) as a plain library.

Pure numpy/torch/OpenCV/pycocotools; never imports ray. Three lines refine one image:

    from bpr_core import Refiner
    refiner = Refiner(checkpoint="model.pt")
    refined = refiner.refine(image, masks)   # HxWx3 uint8 RGB, NxHxW bool -> NxHxW bool
"""

from .config import BPRConfig
from .patches import boundary_points, crop_patches, float_boundary, paste_patches, propose_patches, reassemble, skip_reason, square_nms

__version__ = "0.1.0"

# The torch-backed names load on first use, so code that only proposes, crops and pastes (the
# pipeline's extraction actors) does not pay for importing torch (~1-2 s per process).
_LAZY = {"GuidedFilterPatchRefiner", "IdentityPatchRefiner", "InstanceInfo", "NetworkPatchRefiner", "Refiner",
         "load_checkpoint", "make_patch_refiner", "save_checkpoint"}


def __getattr__(name):
    if name in _LAZY:
        from . import refiner

        return getattr(refiner, name)
    raise AttributeError(f"module 'bpr_core' has no attribute {name!r}")

__all__ = [
    "BPRConfig", "Refiner", "InstanceInfo", "propose_patches", "crop_patches", "paste_patches",
    "float_boundary", "boundary_points", "square_nms", "reassemble", "skip_reason", "NetworkPatchRefiner", "GuidedFilterPatchRefiner",
    "IdentityPatchRefiner", "load_checkpoint", "save_checkpoint", "make_patch_refiner", "__version__",
]
