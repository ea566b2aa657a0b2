"""raygen-plugin-demo: the `democvae` model family, found by raygen through the
`raygen.families` entry point in this package's pyproject.toml."""
from raygen.models import Family

from raygen_plugin_demo.model import CVAE, CVAEConfig, CVAESampling, build

FAMILY = Family(
    name="democvae",
    config_cls=CVAEConfig,
    build=build,
    capabilities={"train", "sample"},
    sampling_params=CVAESampling,
    conditions=("none", "label"),
    description="tiny conditional convolutional VAE (a third-party plugin)",
)

__all__ = ["CVAE", "CVAEConfig", "CVAESampling", "FAMILY", "build"]
