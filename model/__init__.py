"""CoCosNet v2 (and v1) as pure nn.Modules and losses."""
from .cocosnet import CoCosNet, CoCosNetOutput
from .config import ModelConfig

__all__ = ["CoCosNet", "CoCosNetOutput", "ModelConfig"]
