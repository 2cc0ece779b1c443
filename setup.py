"""Build the optional Cython + OpenMP extension ``bn_fast._cython``.

Metadata and dependencies live in pyproject.toml.  The extension is optional:
without Cython, a C compiler or OpenMP the build prints a warning, the install
still succeeds, and bn_fast uses its Numba kernels.

Like Numba, which compiles for the CPU it runs on, the extension is built for
this machine's instruction set (-march=native): AVX2 / AVX-512 vectors are
2-4 times wider than the x86-64 baseline's, which decides the speed of the
float64 sums on data in cache.  Set BN_FAST_MARCH to another -march value
(e.g. x86-64-v3) to build for a fleet of machines, or to "" for the compiler's
default target.
"""

import os

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

MARCH = os.environ.get("BN_FAST_MARCH", "native")
HERE = os.path.dirname(os.path.abspath(__file__))

# Numba's fastmath minus 'nnan'/'ninf': reassociation lets the compiler vectorise
# float64 sums, while NaN in x still reaches y.
GCC_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
             "-fassociative-math", "-ffp-contract=fast"]
FLAGS = {  # compiler type -> (compile flags, link flags)
    "msvc": (["/O2", "/openmp"], []),
    "unix": (GCC_FLAGS, ["-fopenmp"]),
    "mingw32": (GCC_FLAGS, ["-fopenmp"]),
}


class OptionalBuildExt(build_ext):
    """Cythonize and compile at build time; on any failure warn and carry on without it."""

    def build_extension(self, ext):
        try:
            from Cython.Build import cythonize

            ext.sources = cythonize([ext], quiet=True)[0].sources  # .pyx -> .c
            kind = self.compiler.compiler_type
            compile_args, ext.extra_link_args = FLAGS.get(kind, FLAGS["unix"])
            if MARCH and kind != "msvc":
                try:  # compilers that do not know -march=native get a second chance without it
                    ext.extra_compile_args = [*compile_args, f"-march={MARCH}"]
                    return super().build_extension(ext)
                except CompileError as exc:
                    self.warn(f"building {ext.name} with -march={MARCH} failed ({exc}); "
                              "retrying for the compiler's default target")
            ext.extra_compile_args = compile_args
            super().build_extension(ext)
        except Exception as exc:  # no Cython, no compiler, no OpenMP, ...
            self.warn(f"the optional extension {ext.name} was not built "
                      f"({type(exc).__name__}: {exc}); bn_fast will use its Numba kernels")
            # From an earlier build: do not ship it, and for an editable install (which
            # imports the source tree) do not leave the old kernels there either.
            stale = {self.get_ext_fullpath(ext.name)}
            if getattr(self, "editable_mode", False):
                stale.add(os.path.join(HERE, self.get_ext_filename(ext.name)))
            for path in stale:
                if os.path.exists(path):
                    os.remove(path)


setup(
    ext_modules=[Extension("bn_fast._cython", ["bn_fast/_cython.pyx"],
                           include_dirs=[np.get_include()], optional=True)],
    cmdclass={"build_ext": OptionalBuildExt},
)
