from setuptools import find_packages, setup

setup(
    name="dist_soup",
    version="0.1.0",
    description="Distributed multi-objective training with compressed gradient communication",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dist_soup", "dist_soup.*"]),
    package_data={"dist_soup": ["py.typed"]},
    install_requires=[
        "torch>=2.3,<3",
        "numpy>=1.24",
        "pyyaml>=6",
        "tqdm>=4.60",
        "scikit-learn>=1.2",  # bundled digits for the multidigits task; no downloads
        "matplotlib>=3.6",
    ],
    extras_require={
        "dev": [
            "pytest>=7",
            "pytest-timeout>=2.1",
            "hypothesis>=6",
            "torchjd[quadprog-projector,cagrad]>=0.18",
            "ruff>=0.6",
            "mypy>=1.10",
        ],
        "mpi": ["mpi4py>=3.1", "mpich"],
        # the plugin (integrations/deepspeed.py) is tested with 0.19.8; its JIT op needs g++
        "deepspeed": ["deepspeed>=0.19.8,<0.20"],
        "bench": ["torchjd>=0.18"],
    },
    entry_points={"console_scripts": ["dist-soup=dist_soup.cli:main"]},
)
