"""Built-in dataset builders, one module each; importing this package
registers them all (see raygen.data.registry)."""
from raygen.data.sources import (  # noqa: F401  (imported to register)
    digits,
    fashion_mnist,
    folder,
    kali,
    parquet_import,
    shapes,
    spheres,
    webdataset,
)
