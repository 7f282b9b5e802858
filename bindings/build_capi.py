"""Build libkvwire.so from kvwire.h with cffi's embedding mode.

    python3 bindings/build_capi.py --out build

kvwire.h stays the single source of truth: this script reads it and derives
  * the declarations cffi needs: the header's types, and for each public function
    ``kvw_X`` an internal ``_kvwpy_X`` implemented in Python (bindings/kvwire_capi.py);
  * a thin C layer that exports ``kvw_X`` and calls ``_kvwpy_X``. The Python side returns
    ``status + 1``, so a result of 0 can only mean that the embedded runtime failed to run
    the call (cffi returns 0 then): the C layer turns that into KVW_ERR_INIT instead of
    letting it pass for KVW_OK.
  * ``kvw_version`` and ``kvw_version_number`` in plain C, from the header's
    ``KVW_VERSION_*`` macros: they never start the runtime.
The library is ``libkvwire.so.MAJOR.MINOR.PATCH`` with the soname ``libkvwire.so.MAJOR``
and the two usual links beside it. The embedded module is named ``_kvwire_capi`` so it
cannot clash with the ``kvwire`` package in a host process that is itself Python.

    python3 bindings/build_capi.py --check

checks instead that this Python can run the library (it imports kvwire and its
dependencies) and prints what CMake reports about it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOTYPE = re.compile(r"^(int|const char\*)\s+(kvw_\w+)\(([^;]*)\);", re.M | re.S)
VERSION = re.compile(r"^#define KVW_VERSION_(MAJOR|MINOR|PATCH) (\d+)$", re.M)
# Exports written in C here rather than in Python: they must work without the runtime.
C_ONLY = {
    "kvw_version": 'return KVW_STR(KVW_VERSION_MAJOR) "." KVW_STR(KVW_VERSION_MINOR) "." KVW_STR(KVW_VERSION_PATCH);',
    "kvw_version_number": "return KVW_VERSION_NUMBER;",
}
# What the library imports when it starts: kvwire and its run-time dependencies.
RUNTIME_MODULES = ("cffi", "numpy", "torch", "lz4", "crc32c", "kvwire")


def version() -> tuple[int, int, int]:
    """(major, minor, patch) from kvwire.h's KVW_VERSION_* macros."""
    found = dict(VERSION.findall((HERE / "kvwire.h").read_text()))
    return int(found["MAJOR"]), int(found["MINOR"]), int(found["PATCH"])


def read_header() -> str:
    text = (HERE / "kvwire.h").read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)  # comments
    text = re.sub(r"#ifdef __cplusplus.*?#endif", "", text, flags=re.S)  # extern "C" braces
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def split(header: str) -> tuple[str, list[tuple[str, str, str]]]:
    """(the type declarations, [(return type, name, parameter list)])."""
    functions = [(r, n, " ".join(p.split())) for r, n, p in PROTOTYPE.findall(header)]
    types = PROTOTYPE.sub("", header)
    return types, functions


def parameter_names(params: str) -> list[str]:
    if params.strip() == "void":
        return []
    return [re.findall(r"\w+", p)[-1] for p in params.split(",")]


def c_layer(functions) -> str:
    out = ['#include "kvwire.h"', "#define KVW_STR_(x) #x", "#define KVW_STR(x) KVW_STR_(x)"]
    out += [f"{r} _kvwpy_{n[len('kvw_') :]}({p});" for r, n, p in functions if n not in C_ONLY]  # cffi defines these
    out += [
        "#include <stdlib.h>",
        "#include <wchar.h>",
        # Which Python to start when the host program has none: the one that built the
        # library (or $KVWIRE_PYTHON). Without this, an embedded interpreter guesses its
        # home from the first `python3` on PATH, which may be another installation.
        "extern void Py_SetProgramName(const wchar_t*);",
        "extern int Py_IsInitialized(void);",
        f"#define KVW_BUILD_PYTHON {json.dumps(sys.executable)}",
        "static wchar_t kvw_program[4096];",
        "__attribute__((constructor)) static void kvw_choose_python(void) {",
        "  if (Py_IsInitialized()) return; /* loaded into a Python process: use that one */",
        '  const char* exe = getenv("KVWIRE_PYTHON");',
        "  if (!exe || !*exe) exe = KVW_BUILD_PYTHON;",
        "#pragma GCC diagnostic push",
        '#pragma GCC diagnostic ignored "-Wdeprecated-declarations"',  # still the simplest pre-init hook
        "  if (mbstowcs(kvw_program, exe, 4095) != (size_t)-1) Py_SetProgramName(kvw_program);",
        "#pragma GCC diagnostic pop",
        "}",
        '#define KVW_EXPORT __attribute__((visibility("default")))',
        'static const char KVW_NOT_STARTED[] = "kvwire: the embedded Python runtime failed to start or to run '
        'the call (see standard error)";',
    ]
    for ret, name, params in functions:
        inner = "_kvwpy_" + name[len("kvw_") :]
        args = ", ".join(parameter_names(params))
        if name in C_ONLY:
            body = C_ONLY[name]
        elif ret == "int":
            body = f"int rc = {inner}({args}); return rc == 0 ? KVW_ERR_INIT : rc - 1;"
        else:
            body = f"const char* s = {inner}({args}); return s ? s : KVW_NOT_STARTED;"
        out.append(f"KVW_EXPORT {ret} {name}({params}) {{ {body} }}")
    return "\n".join(out)


def build(out_dir: Path) -> Path:
    header = read_header()
    types, functions = split(header)
    major, minor, patch = version()
    import cffi  # here, so that --check can report it missing

    internal = "\n".join(f"{r} _kvwpy_{n[len('kvw_') :]}({p});" for r, n, p in functions if n not in C_ONLY)
    ffi = cffi.FFI()
    ffi.embedding_api(types + "\n" + internal)
    # The public functions are defined in C (c_layer) and only declared for cffi's compiler.
    ffi.set_source(
        "_kvwire_capi",
        c_layer(functions),
        include_dirs=[str(HERE)],
        extra_link_args=[f"-Wl,-rpath,{sysconfig.get_config_var('LIBDIR')}", f"-Wl,-soname,libkvwire.so.{major}"],
    )
    ffi.embedding_init_code((HERE / "kvwire_capi.py").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "capi_build"
    target = ffi.compile(tmpdir=str(tmp), target="libkvwire.so", verbose=False)
    final = out_dir / f"libkvwire.so.{major}.{minor}.{patch}"
    shutil.copy(target, final)
    for link, points_to in ((f"libkvwire.so.{major}", final.name), ("libkvwire.so", f"libkvwire.so.{major}")):
        (out_dir / link).unlink(missing_ok=True)
        (out_dir / link).symlink_to(points_to)
    return final


def check() -> int:
    """Can this Python run the library? Prints ``key=value`` lines for CMake, or the reason.

    CMake runs this without PYTHONPATH: it checks what an installed library will import."""
    for name in RUNTIME_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure to import is the answer
            print(f"{sys.executable} cannot import {name} ({type(exc).__name__}: {exc})")
            return 1
    print(f"python={sys.executable}")
    print(f"kvwire={Path(module.__file__).resolve().parent.parent}")  # the folder that holds the package
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build", help="output folder (default: build)")
    parser.add_argument("--check", action="store_true", help="check that this Python can run the library")
    args = parser.parse_args()
    if args.check:
        sys.exit(check())
    print(build(Path(args.out).resolve()))


if __name__ == "__main__":
    main()
