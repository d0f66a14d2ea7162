"""Package discovery (metadata lives in pyproject.toml).

Every ``dspark_vllm`` subpackage is found, not listed by hand. Two top-level folders of the
repository ship inside the package: ``kernels/`` as ``dspark_vllm.kernels`` (never a top-level
``kernels`` module: another PyPI project owns that name) and ``configs/`` (the YAML settings
users read and edit) as ``dspark_vllm/configs`` package data, so the checkout's files are the
one source of truth for both.
"""

from setuptools import find_packages, setup

MAPPED = {"dspark_vllm.kernels": "kernels", "dspark_vllm.configs": "configs",
          "dspark_vllm.configs.profiles": "configs/profiles"}

setup(packages=find_packages(include=["dspark_vllm", "dspark_vllm.*"]) + list(MAPPED),
      package_dir={"dspark_vllm": "dspark_vllm", **MAPPED})
