"""Package build. Pure Python for now: the C++/CUDA extensions (csrc/) join here as
`ext_modules` when they exist. Nothing in this file queries a GPU or the network."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["tome_kernels", "tome_kernels.*"]))
