"""asmlp_min: AS-MLP (Lian et al., ICLR 2022) built from small, readable, tested PyTorch modules."""
from .backbone import ASMLP, ASMLPConfig, PatchEmbed, PatchMerging, create_model, list_models
from .checkpoint import LoadReport, load_checkpoint, load_official_checkpoint, save_checkpoint
from .complexity import analytic_gmacs, count_gmacs, count_params
from .block import ASMLPBlock, AxialShiftMix, DropPath, Mlp
from .shift import AxialShift, axial_shift

__version__ = "0.1.0"
