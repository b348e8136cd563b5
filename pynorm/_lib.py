"""Loads libpynorm with cffi.

The declarations come from the C header itself (the block between PN_CDEF_BEGIN
and PN_CDEF_END of pynorm.h), so the bindings cannot drift from the library.

Where the library is looked for, in order:
1. $PYNORM_LIBRARY, another build of it (for development);
2. pynorm/lib next to this file: the installed package (`pip install .`);
3. the installed pynorm distribution, when this file is a source checkout's
   pynorm/ that Python found first, as it does from the repository's root
   (the current directory comes first on sys.path). The checkout's Python
   code then runs on the installed library, which must have been built from
   the same pynorm.h.
"""
import os
import sys

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_LIBNAME = {"darwin": "libpynorm.dylib", "win32": "pynorm.dll"}.get(sys.platform, "libpynorm.so")
_SOURCE_HEADER = os.path.join(_HERE, os.pardir, "c_src", "include", "pynorm.h")


def _installed_library_dir():
    """pynorm/lib of the installed distribution, or None (not installed, or
    this file is that installed package)."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution
        dist = distribution("pynorm")
    except (ImportError, PackageNotFoundError):
        return None
    libdir = os.path.abspath(str(dist.locate_file(os.path.join("pynorm", "lib"))))
    if libdir == os.path.join(_HERE, "lib") or not os.path.exists(os.path.join(libdir, _LIBNAME)):
        return None
    return libdir


def _read(path):
    with open(path) as f:
        return f.read()


def _find_library():
    """(library path, header text) of the library to load."""
    env = os.environ.get("PYNORM_LIBRARY")
    if env:
        headers = [os.path.join(os.path.dirname(os.path.abspath(env)), "pynorm.h"),
                   os.path.join(_HERE, "lib", "pynorm.h"), _SOURCE_HEADER]
        for header in headers:
            if os.path.exists(header):
                return env, _read(header)
        raise ImportError(f"pynorm: pynorm.h not found for PYNORM_LIBRARY={env} (looked in {', '.join(headers)})")
    own = os.path.join(_HERE, "lib")
    if os.path.exists(os.path.join(own, _LIBNAME)):
        return os.path.join(own, _LIBNAME), _read(os.path.join(own, "pynorm.h"))
    installed = _installed_library_dir()
    if installed is None:
        raise ImportError(
            f"pynorm: the C library {_LIBNAME} is not in {own}, and no installed pynorm was found; "
            "install the package with `pip install .` (it builds the library), "
            "or point PYNORM_LIBRARY at a build of it")
    header = _read(os.path.join(installed, "pynorm.h"))
    if os.path.exists(_SOURCE_HEADER) and _read(_SOURCE_HEADER) != header:
        raise ImportError(
            f"pynorm: this source checkout ({os.path.dirname(_HERE)}) has no built library, and the "
            f"installed one ({installed}) was built from a different pynorm.h; "
            "run `pip install .` here again (or point PYNORM_LIBRARY at a build of this checkout)")
    return os.path.join(installed, _LIBNAME), header


def _cdef_block(header_text):
    start = header_text.index("/* PN_CDEF_BEGIN */") + len("/* PN_CDEF_BEGIN */")
    return header_text[start:header_text.index("/* PN_CDEF_END */")]


library_path, header_source = _find_library()

ffi = FFI()
ffi.cdef(_cdef_block(header_source))
lib = ffi.dlopen(library_path, ffi.RTLD_NOW | getattr(ffi, "RTLD_NODELETE", 0))  # never unloaded: docs/reliability.md
