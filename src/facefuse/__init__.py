"""facefuse: metric, occlusion-robust 3D faces by fusing MICA and OFER at inference time."""

__version__ = "0.1.0"
