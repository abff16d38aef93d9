from setuptools import find_packages, setup

setup(
    name="pilot",
    version="0.1.0",
    description="Triton-fused PILoT sparse training (x = m * w with dynamic weight decay) for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pilot", "pilot.*", "pilot_kernels", "pilot_kernels.*", "bench", "bench.*"]),
    # The recipe files of python -m pilot.train --recipe NAME.
    package_data={"pilot.train": ["recipes/*.toml"]},
    install_requires=["torch", "triton", "numpy"],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "torchvision", "tqdm", "matplotlib", "pillow"],
        "train": ["torchvision", "tqdm", "matplotlib", "pillow"],
    },
)
