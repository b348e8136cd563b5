"""Loads libpynorm with cffi.

The declarations come from the C header itself (the block between PN_CDEF_BEGIN
and PN_CDEF_END of pynorm.h), so the bindings cannot drift from the library.
PYNORM_LIBRARY may name another build of the library (for development).
"""
import os
import sys

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_LIBNAME = {"darwin": "libpynorm.dylib", "win32": "pynorm.dll"}.get(sys.platform, "libpynorm.so")


def _find_library():
    env = os.environ.get("PYNORM_LIBRARY")
    if env:
        return env
    path = os.path.join(_HERE, "lib", _LIBNAME)
    if os.path.exists(path):
        return path
    raise ImportError(
        f"pynorm: the C library {_LIBNAME} is not in {os.path.join(_HERE, 'lib')}; "
        "install the package with `pip install .` (it builds the library), "
        "or point PYNORM_LIBRARY at a build of it")


def _find_header():
    for path in (os.path.join(_HERE, "lib", "pynorm.h"),
                 os.path.join(_HERE, os.pardir, "c_src", "include", "pynorm.h")):
        if os.path.exists(path):
            return path
    raise ImportError("pynorm: pynorm.h not found next to the library or in c_src/include")


def _cdef_block(header_text):
    start = header_text.index("/* PN_CDEF_BEGIN */") + len("/* PN_CDEF_BEGIN */")
    return header_text[start:header_text.index("/* PN_CDEF_END */")]


library_path = _find_library()
with open(_find_header()) as f:
    header_source = f.read()

ffi = FFI()
ffi.cdef(_cdef_block(header_source))
lib = ffi.dlopen(library_path, ffi.RTLD_NOW | getattr(ffi, "RTLD_NODELETE", 0))  # never unloaded: docs/reliability.md
