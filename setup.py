"""Only what pyproject.toml cannot say: the data directories outside gateway/ (the DinD image
context, the config examples, the offline image build script) are shipped inside the package
as gateway.share.{dind,config,scripts,packaging} (see gateway/share/__init__.py)."""

from setuptools import find_packages, setup

DATA = {"gateway.share.dind": "images/dind", "gateway.share.config": "config",
        "gateway.share.scripts": "scripts", "gateway.share.packaging": "packaging"}

setup(
    packages=find_packages(include=["gateway*"]) + list(DATA),
    package_dir=DATA,
    package_data={
        "gateway.backend.docker": ["profiles/*.json", "profiles/apparmor-rootless"],
        "gateway.share.dind": ["*"],
        "gateway.share.config": ["*.yaml"],
        "gateway.share.scripts": ["build-images.sh"],
        "gateway.share.packaging": ["*"],
    },
    # dind-init must stay executable (the image context is built as it is)
    include_package_data=False,
)
