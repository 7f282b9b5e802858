"""Build libkvwire.so from kvwire.h with cffi's embedding mode.

    python3 bindings/build_capi.py --out build

kvwire.h stays the single source of truth: this script reads it and derives
  * the declarations cffi needs: the header's types, and for each public function
    ``kvw_X`` an internal ``_kvwpy_X`` implemented in Python (bindings/kvwire_capi.py);
  * a thin C layer that exports ``kvw_X`` and calls ``_kvwpy_X``. The Python side returns
    ``status + 1``, so a result of 0 can only mean that the embedded runtime failed to run
    the call (cffi returns 0 then): the C layer turns that into KVW_ERR_INIT instead of
    letting it pass for KVW_OK.
The embedded module is named ``_kvwire_capi`` so it cannot clash with the ``kvwire``
package in a host process that is itself Python.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import sysconfig
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent
PROTOTYPE = re.compile(r"^(int|const char\*)\s+(kvw_\w+)\(([^;]*)\);", re.M | re.S)


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
    out = ['#include "kvwire.h"']
    out += [f"{r} _kvwpy_{n[len('kvw_') :]}({p});" for r, n, p in functions]  # cffi defines these below
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
        if ret == "int":
            body = f"int rc = {inner}({args}); return rc == 0 ? KVW_ERR_INIT : rc - 1;"
        else:
            body = f"const char* s = {inner}({args}); return s ? s : KVW_NOT_STARTED;"
        out.append(f"KVW_EXPORT {ret} {name}({params}) {{ {body} }}")
    return "\n".join(out)


def build(out_dir: Path) -> Path:
    header = read_header()
    types, functions = split(header)
    internal = "\n".join(f"{r} _kvwpy_{n[len('kvw_') :]}({p});" for r, n, p in functions)
    ffi = cffi.FFI()
    ffi.embedding_api(types + "\n" + internal)
    # The public functions are defined in C (c_layer) and only declared for cffi's compiler.
    ffi.set_source(
        "_kvwire_capi",
        c_layer(functions),
        include_dirs=[str(HERE)],
        extra_link_args=[f"-Wl,-rpath,{sysconfig.get_config_var('LIBDIR')}"],
    )
    ffi.embedding_init_code((HERE / "kvwire_capi.py").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "capi_build"
    target = ffi.compile(tmpdir=str(tmp), target="libkvwire.so", verbose=False)
    final = out_dir / "libkvwire.so"
    shutil.copy(target, final)
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build", help="output folder (default: build)")
    args = parser.parse_args()
    print(build(Path(args.out).resolve()))


if __name__ == "__main__":
    main()
