import re

from setuptools import find_packages, setup

# The version is written once, in pilot/__init__.py (read as text: importing pilot needs torch).
with open("pilot/__init__.py", encoding="utf-8") as f:
    VERSION = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)

setup(
    name="pilot",
    version=VERSION,
    description="Triton-fused PILoT sparse training (x = m * w with dynamic weight decay) for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # bench/ runs from the checkout (python -m bench): installed, a top-level "bench" would shadow other packages
    packages=find_packages(include=["pilot", "pilot.*", "pilot_kernels", "pilot_kernels.*"]),
    # Each dataset's recipe: every value python -m pilot.train --data NAME trains with.
    package_data={"pilot.train": ["recipes/*.toml"]},
    # tomli reads the recipes where the standard library has no tomllib (Python 3.10).
    install_requires=["torch", "triton", "numpy", "safetensors", "tomli>=1.1; python_version < '3.11'"],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "torchvision", "tqdm", "matplotlib", "pillow"],
        "train": ["torchvision", "tqdm", "matplotlib", "pillow"],
        # examples/: PILoT in PyTorch Lightning and in the Hugging Face Trainer (which needs accelerate);
        # torchvision reads Fashion-MNIST for the Lightning example.
        "examples": ["lightning>=2.0", "transformers>=4.41", "accelerate>=0.26", "torchvision"],
    },
)
