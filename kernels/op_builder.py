"""Just-in-time build of the C++ CPU op, in the manner of DeepSpeed's op builders.

The sources in ``csrc/`` are compiled with ``torch.utils.cpp_extension.load`` on first use and cached
under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), so only the first import in a
fresh environment pays for the compiler; later processes find the library and load it. A failed build
raises :class:`~ekipl_kernels.backends.BackendUnavailable` quoting the compiler. ``EKIPL_BUILD_OPS=1 pip
install .`` runs :func:`load_cpu_op` at install time instead.

Headers generated from Python (the slots of the loss scalars, :func:`~ekipl_kernels.loss_scalars.cpp_header`)
are written into ``generated/`` inside the extension's build folder, which the compiler searches first; their
text is part of the digest passed as a flag, so a change of the table rebuilds the library.

The row kernels use ATen's SIMD vectors; they are compiled for the CPU capability torch detects here
(AVX512, AVX2 or portable code), and that capability is part of the extension's name, so one cache
shared by machines of different kinds never hands a binary to a CPU that cannot run it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from .backends import BackendUnavailable

CPU_OP_NAME = "ekipl_cpu_ops"
CPU_OP_SOURCES = ("grpo_loss_cpu.cpp",)
LOSS_SCALARS_HEADER = "loss_scalars.h"  # generated; grpo_loss_cpu.cpp includes it

# The compiler flags and macros ATen itself uses for each vectorised kernel build.
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY=AVX512",
               "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}

_loaded: dict[str, str] = {}
_failed: dict[str, BackendUnavailable] = {}  # a failed build is not retried in the same process


def csrc_dir() -> Path:
    """The C++ sources: inside the package in a wheel, next to it in a source or editable checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / CPU_OP_SOURCES[0]).is_file():
            return candidate
    raise BackendUnavailable(
        f"the C++ sources of the CPU op ({CPU_OP_SOURCES[0]}) are neither in {here / 'csrc'} nor in "
        f"{here.parent / 'csrc'}; reinstall ekipl from a full checkout"
    )


def _cpu_capability() -> str:
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in _CAPABILITY_FLAGS else "DEFAULT"


def _sources_digest(folders: Sequence[Path]) -> str:
    """A digest of every source and header in ``folders``: torch re-builds on changes to the listed sources only."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.glob("*.[ch]*")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _write_generated_headers(name: str, headers: Mapping[str, str]) -> Path:
    """Writes ``headers`` (file name -> text) into ``generated/`` of the build folder of ``name``; returns it.

    A file is rewritten only when its text changed, so that its age tells the compiler when to rebuild, and
    atomically, so that a process building at the same moment reads either version whole."""
    from torch.utils import cpp_extension

    folder = Path(cpp_extension._get_build_directory(name, verbose=False)) / "generated"
    folder.mkdir(exist_ok=True)
    for file_name, text in headers.items():
        path = folder / file_name
        if path.is_file() and path.read_text() == text:
            continue
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as partial:
            partial.write(text)
        os.replace(partial.name, path)
    return folder


def build_op(name: str, sources: Sequence[Path], extra_cflags: Sequence[str] = (),
             generated_headers: Mapping[str, str] | None = None, verbose: bool = False) -> str:
    """Compiles (or finds in the cache) and loads a library of ``torch.library`` ops; returns its path.
    ``generated_headers`` (file name -> text) are written where the sources can ``#include`` them."""
    from torch.utils import cpp_extension

    if name in _loaded:
        return _loaded[name]
    if name in _failed:
        raise _failed[name]
    include_dir = _write_generated_headers(name, generated_headers or {})
    folders = sorted({Path(s).resolve().parent for s in sources}) + [include_dir]
    digest = _sources_digest(folders)
    _announce_build(name, folders)
    try:
        path = cpp_extension.load(
            name=name,
            sources=[str(s) for s in sources],
            extra_cflags=["-O3", "-fopenmp", f"-DEKIPL_SOURCES_DIGEST={digest}", *extra_cflags],
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(include_dir)],
            is_python_module=False,
            verbose=verbose,
        )
    except (RuntimeError, OSError, ImportError) as exc:
        message = str(exc).strip()
        tail = "\n".join(message.splitlines()[-40:])
        where = os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions")
        _failed[name] = BackendUnavailable(
            f"building the C++ op {name!r} failed (a C++17 compiler with OpenMP and ninja are needed; "
            f"build folder under {where}). Compiler output:\n{tail}"
        )
        raise _failed[name] from exc
    _loaded[name] = path
    return path


def _announce_build(name: str, folders: Sequence[Path]) -> None:
    """Says so on stderr when the library is missing or older than its sources: a build takes about a minute."""
    import sys

    from torch.utils import cpp_extension

    library = Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"
    newest = max(p.stat().st_mtime for folder in folders for p in folder.glob("*.[ch]*"))
    if not library.is_file() or library.stat().st_mtime < newest:
        print(f"[ekipl_kernels] compiling the C++ CPU op {name} (once per machine and source change, about a minute; "
              f"cached in {library.parent})", file=sys.stderr, flush=True)


def load_cpu_op(verbose: bool = False) -> str:
    """Builds or loads the ``ekipl::`` CPU kernels (after their schemas in ``ops``); returns the library path."""
    from . import ops  # noqa: F401  (the schemas must exist before the library registers its kernels)
    from .loss_scalars import cpp_header

    capability = _cpu_capability()
    folder = csrc_dir()
    return build_op(
        f"{CPU_OP_NAME}_{capability.lower()}",
        [folder / source for source in CPU_OP_SOURCES],
        _CAPABILITY_FLAGS.get(capability, []),
        generated_headers={LOSS_SCALARS_HEADER: cpp_header()},
        verbose=verbose,
    )
