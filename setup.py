"""Package metadata and build of the `engine` package (pure Python for now)."""
from setuptools import find_packages, setup

setup(
    name="gpt-engine",
    version="0.1.0",
    description="A GPT training engine whose hot path runs on hand-written kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "bench", "bench.*"]),
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={"test": ["pytest>=8"]},
)
