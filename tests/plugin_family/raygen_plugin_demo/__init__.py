"""raygen-plugin-demo: the `democvae` model family, found by raygen through the
`raygen.families` entry point in this package's pyproject.toml."""
from raygen.models import DataInfo, Family

from raygen_plugin_demo.model import CVAE, CVAEConfig, CVAESampling, build


def debug_flavors():
    """Tiny flavors: raygen's conformance suite (tests/families) checks each one."""
    digits = DataInfo(channels=1, resolution=8, num_classes=10, class_names=[str(i) for i in range(10)])
    return {"label": (CVAEConfig.debug(), digits),
            "none-rgb": (CVAEConfig.debug(conditioning="none"), DataInfo(channels=3, height=8, width=12))}


FAMILY = Family(
    name="democvae",
    config_cls=CVAEConfig,
    build=build,
    capabilities={"train", "sample"},
    sampling_params=CVAESampling,
    conditions=("none", "label"),
    debug=debug_flavors,
    description="tiny conditional convolutional VAE (a third-party plugin)",
)

__all__ = ["CVAE", "CVAEConfig", "CVAESampling", "FAMILY", "build"]
