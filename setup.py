"""Install mokd. The native CPU kernels (CMakeLists.txt, csrc/) are built here by CMake when cmake, a C++20
compiler and torch are present in the installing environment (so `pip install --no-build-isolation -e .`, as the
Makefile runs it); without them the install still succeeds, with a warning, and mokd uses its torch path.
MOKD_BUILD_NATIVE=0 skips them on purpose."""

import os
import shutil
import subprocess
import sys
import time

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

NATIVE_LIBRARY = "libmokd_native.so"


class CMakeExtension(Extension):
    """The torch-operator library: not a Python module, so no sources for setuptools to compile."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt with the installing interpreter's torch, writing the library where
    the package expects it (mokd/kernels/ in an editable install). Optional: any failure is a warning."""

    def get_ext_filename(self, fullname: str) -> str:
        return os.path.join(*fullname.split(".")[:-1], NATIVE_LIBRARY)

    def build_extension(self, ext: Extension) -> None:
        if os.environ.get("MOKD_BUILD_NATIVE", "1") == "0":  # a pure-Python build (the wheel test's, say)
            self.warn("mokd: MOKD_BUILD_NATIVE=0: native CPU kernels not built; the torch path will be used.")
            return
        output_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        try:
            self._cmake(output_dir)
        except (OSError, subprocess.CalledProcessError, RuntimeError) as error:
            self.warn(f"mokd: native CPU kernels not built ({error}); the torch path will be used. "
                      "Build them later with `cmake -S . -B build && cmake --build build`.")

    def _cmake(self, output_dir: str) -> None:
        missing = [tool for tool in ("cmake", os.environ.get("CXX", "c++")) if shutil.which(tool) is None]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} not found")
        try:
            import torch  # noqa: F401  (CMake asks this interpreter for torch's location)
        except ImportError:
            raise RuntimeError("torch is not importable while building: install torch first and build with "
                               "`pip install --no-build-isolation -e .`") from None
        source = os.path.dirname(os.path.abspath(__file__))
        build_dir = os.path.join(source, "build", "setup")
        start = time.perf_counter()
        subprocess.run(["cmake", "-S", source, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
                        f"-DPython3_EXECUTABLE={sys.executable}", f"-DMOKD_NATIVE_OUTPUT_DIR={output_dir}"],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", build_dir, "--parallel", str(os.cpu_count() or 1)], check=True,
                       stdout=subprocess.DEVNULL)
        print(f"mokd: built {NATIVE_LIBRARY} in {time.perf_counter() - start:.0f} s", file=sys.stderr)


setup(
    name="mokd",
    version="0.1.0",
    description="Multi-mode Online Knowledge Distillation: two vision models learn self-supervised together",
    packages=find_packages(include=["mokd", "mokd.*"]),
    package_data={"mokd": ["configs/*.yaml"]},  # the presets, read with importlib.resources
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.14,<2.15",
        "torchvision>=0.29,<0.30",
        "timm>=1.0",
        "omegaconf>=2.3",
        "tensorboard>=2.15",
        "tqdm>=4.60",
        "numpy",
        "pillow",
        "pyyaml",
        "matplotlib>=3.7",
        "scikit-learn>=1.3",
        "threadpoolctl>=3.1",
        "webdataset>=1.0",
    ],
    extras_require={
        # The tests run real DeepSpeed (ZeRO-1/2/3 on CPU with gloo); users of parallel.strategy=deepspeed
        # install it with `pip install mokd[deepspeed]`.
        "dev": ["pytest>=7", "deepspeed>=0.17"],
        "deepspeed": ["deepspeed>=0.17"],
        "flash": ["flash-attn"],
    },
    entry_points={"console_scripts": ["mokd=mokd.launch.cli:main"]},
    ext_modules=[CMakeExtension("mokd.kernels.libmokd_native")],
    cmdclass={"build_ext": CMakeBuild},
)
