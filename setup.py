"""Maps the top-level folders to their import names.

`platform/` must not be a regular package: with the repo root on sys.path it
would shadow the standard library's `platform` module. So `raygen` is a
namespace package whose source folder is `platform/`, and the subpackages are
found automatically under each mapped root.
"""
from setuptools import find_packages, setup

ROOTS = {"raygen": "platform", "raygen.jobs": "jobs", "raygen.serving": "serving"}

packages = []
for name, folder in ROOTS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(
    package_dir=ROOTS,
    packages=packages,
    package_data={"raygen.jobs": ["specs/*.yaml"], "raygen.serving": ["static/*"]},
    include_package_data=True,
)
