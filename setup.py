"""Builds portep's compiled engine (native/engine/*.c) with the system C compiler at install time.

The engine is one shared library loaded with ctypes (``portep.native.engine``); the UCX transport is
a second one, linked against the libucp of the ``libucx`` wheel, built only where that wheel is
installed in the build environment. Nothing is compiled at import time.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
ENGINE = HERE / "native" / "engine"
CFLAGS = ["-std=gnu11", "-O3", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off", "-fno-strict-aliasing",
          "-pthread"]


def _sources(*names: str) -> list[str]:
    return [str((ENGINE / name).relative_to(HERE)) for name in names]


ENGINE_SOURCES = _sources("pe_module.c", "pe_common.c", "pe_window.c", "pe_rows.c", "pe_ll.c", "pe_ht.c", "pe_engine.c",
                          "pe_proxy.c", "pe_msgproto.c",
                          *sorted(p.name for p in ENGINE.glob("pe_transport_*.c") if p.name != "pe_transport_ucx.c"))


class BuildEngine(build_ext):
    """build_ext that names the missing C compiler instead of failing obscurely."""

    def run(self) -> None:
        compiler = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc").split()[0]
        if shutil.which(compiler) is None:
            raise SystemExit(f"portep: building the compiled engine needs a C compiler; {compiler!r} was not found "
                             f"(install gcc or clang, or set CC)")
        super().run()


def _ucx_extension() -> list[Extension]:
    """The UCX transport, where the libucx wheel (headers and libucp) is in the build environment."""
    if not (ENGINE / "pe_transport_ucx.c").exists():
        return []
    try:
        import libucx
    except ImportError:
        return []
    root = Path(libucx.__file__).parent
    include, lib = root / "include", root / "lib"
    if not (include / "ucp" / "api" / "ucp.h").exists():
        return []
    return [Extension("portep.native._ucx",
                      sources=_sources("pe_transport_ucx.c", "pe_ucx_module.c", "pe_common.c", "pe_window.c"),
                      library_dirs=[str(lib)], libraries=["ucp", "ucs", "rt"],
                      extra_compile_args=[*CFLAGS, "-isystem", str(include)], extra_link_args=["-pthread"])]


setup(
    ext_modules=[Extension("portep.native._engine", sources=ENGINE_SOURCES, extra_compile_args=CFLAGS,
                           extra_link_args=["-pthread"], libraries=["dl", "rt", "m"]), *_ucx_extension()],
    cmdclass={"build_ext": BuildEngine},
)
