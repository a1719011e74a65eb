"""asmlp_min: AS-MLP (Lian et al., ICLR 2022) built from small, readable, tested PyTorch modules.

The public surface coursework may rely on; everything else can change between versions.
"""
import einops._torch_specific  # noqa: F401  einops registers its functions with torch.compile and torch.export, which
                               # torch 2.7 needs to trace einops 0.8 (a no-op from torch 2.8 on)

from .backbone import ASMLP, ASMLPConfig, PatchEmbed, PatchMerging, create_model, list_models
from .block import ASMLPBlock, AxialShiftMix, DropPath, Mlp
from .checkpoint import LoadReport, load_checkpoint, load_official_checkpoint, save_checkpoint
from .checks import InputWarning
from .complexity import analytic_gmacs, count_gmacs, count_params
from .data import (ADE20KSegmentation, CocoDetection, ImageFolderClassification, ShapesClassification,
                   ShapesDetection, ShapesSegmentation, export_shapes)
from .detection import SimpleFPNDetector, build_maskrcnn
from .fpn import FPN
from .metrics import SegmentationMeter, coco_evaluate, topk_accuracy
from .runtime import keep_freed_memory
from .segmentation import FCNHead, SemanticSegmenter, UperHead
from .shift import AxialShift, axial_shift

__version__ = "0.1.0"
