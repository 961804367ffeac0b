"""ekipl: External Knowledge-Infused Policy Learning for vision-language models.

Two packages ship from this repository:

* ``ekipl_kernels`` (folder ``kernels/``): the fused GRPO loss, its pure-torch reference, the C++ CPU op
  (sources in ``csrc/``, JIT-built on first use) and the Triton GPU kernels. Needs torch (+ triton on GPU).
* ``ekipl`` (folder ``ekipl/``): the trainer. Its dependencies are the ``train`` extra.

``EKIPL_BUILD_OPS=1 pip install .`` prebuilds the C++ op at install time; otherwise it is compiled and
cached on first use, so a plain install needs no compiler and no torch at build time.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithOps(build_py):
    """Ships ``csrc/`` inside ``ekipl_kernels`` (for wheels) and, with ``EKIPL_BUILD_OPS=1``, prebuilds the op."""

    def run(self):
        super().run()
        import shutil
        from pathlib import Path

        target = Path(self.build_lib) / "ekipl_kernels" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in Path(__file__).resolve().parent.joinpath("csrc").glob("*.[ch]*"):
            shutil.copy2(source, target / source.name)
        if os.environ.get("EKIPL_BUILD_OPS") == "1":
            import sys

            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from kernels.op_builder import load_cpu_op  # noqa: E402  (torch is importable here)

            load_cpu_op(verbose=True)


TRAIN = [
    "transformers>=5.12.1,<5.23",
    "tokenizers>=0.21",
    "deepspeed>=0.16",
    "accelerate>=1.0",
    "pillow>=10",
    "numpy",
    "pyyaml>=6",
    "tqdm",
    "requests",
    "openai>=1.40",
    "math-verify>=0.7",
    "tensorboard",
    "matplotlib",
]

setup(
    name="ekipl",
    version="0.1.0",
    description="Vision-EKIPL: GRPO with external-expert answers infused into groups, with fused Triton/C++ loss kernels",
    python_requires=">=3.10",
    packages=["ekipl_kernels", "ekipl_kernels.integrations", "ekipl_kernels.triton", "ekipl"]
    + [f"ekipl.{sub}" for sub in ("data", "rollout", "experts", "tools")],
    package_dir={"ekipl_kernels": "kernels"},
    install_requires=["torch>=2.6", "numpy", "ninja"],  # ninja: torch's JIT build of the C++ op
    extras_require={
        "gpu": ["triton>=3.2", "liger-kernel>=0.6", "flash-attn>=2.6"],
        "sglang": ["sglang>=0.5.18"],
        "train": TRAIN,
        "trl": ["trl>=1.16,<1.17", "datasets"],
        "dev": TRAIN + ["triton==3.7.1", "pytest>=8", "hypothesis>=6", "trl>=1.16,<1.17", "datasets", "liger-kernel>=0.6"],
    },
    cmdclass={"build_py": BuildPyWithOps},
)
