"""CoCosNet v1 (Zhang et al., CVPR 2020): dense attention correspondence at H/4 and a SPADE generator with
self-attention. Built by ``CoCosNet(ModelConfig(version=1, ...))``."""
from .correspondence import CorrespondenceV1, CorrespondenceV1Output
from .generator import GeneratorV1

__all__ = ["CorrespondenceV1", "CorrespondenceV1Output", "GeneratorV1"]
