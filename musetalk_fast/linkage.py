"""Is a built extension linked against the process's one libstdc++?

torch itself links libstdc++ dynamically (`libstdc++.so.6`). An extension that carries a second,
static copy of libstdc++ (what a compiler whose search path holds only `libstdc++.a` produces:
conda and custom-GCC toolchains, wrapper scripts that pass `-B` to a private GCC) breaks as soon as
the two copies meet: the locale facet ids differ, and formatting an integer into a TORCH_CHECK
message crashes the process or cuts the message short. So the build links libstdc++ dynamically on
purpose (LINK_FLAGS), and checks the result (`check`), failing loudly instead of shipping it.

    python -m musetalk_fast.linkage [path/to/_C.so]     # check a build (default: the installed one)

This file imports nothing from the package: setup.py loads it before the package exists.
"""
import shutil
import subprocess
import sys

# Ask for the shared library by its soname: the linker then cannot fall back to libstdc++.a.
LINK_FLAGS = ["-l:libstdc++.so.6"]


class LinkageError(RuntimeError):
    pass


def _run(tool, *args):
    path = shutil.which(tool)
    if path is None:
        raise LinkageError(f"{tool} not found: it comes with binutils, which the linker belongs to")
    return subprocess.run([path, *args], capture_output=True, text=True, check=True).stdout


def problems(library):
    """What is wrong with `library`'s libstdc++ linkage; an empty list when nothing is."""
    found = []
    needed = [line for line in _run("readelf", "-d", library).splitlines() if "(NEEDED)" in line]
    if not any("libstdc++.so" in line for line in needed):
        found.append("it does not load libstdc++.so.6 (no NEEDED entry): libstdc++ was linked statically")
    # Global stream symbols (nm's upper-case types: T, W, V, ...) are libstdc++'s own code, exported
    # and so able to stand in for the process's copy. Local ones (t: an inlined header function's
    # clone, e.g. "[clone .isra.0]") are private to the extension and harmless.
    defined = [line.split(" ", 2) for line in _run("nm", "-C", "--defined-only", library).splitlines()]
    ostream = sorted({name for _, kind, name in (f for f in defined if len(f) == 3)
                      if kind.isupper() and "std::basic_ostream" in name})
    if ostream:
        found.append(f"it exports {len(ostream)} std::basic_ostream symbols of its own, e.g. {ostream[0]!r}: "
                     "a second copy of libstdc++'s stream code")
    return found


def check(library):
    """Raise LinkageError naming the library and what is wrong with it."""
    found = problems(library)
    if found:
        raise LinkageError(
            f"{library}: {'; '.join(found)}. A second libstdc++ in the extension crashes torch's error "
            "messages. The compiler (CXX/CC) finds only a static libstdc++.a; point CXX at a g++ whose "
            f"libstdc++.so works, or make sure {' '.join(LINK_FLAGS)} reaches the link."
        )


def installed_extension():
    import importlib.util

    spec = importlib.util.find_spec("musetalk_fast._C")
    if spec is None or spec.origin is None:
        raise LinkageError("musetalk_fast._C is not built")
    return spec.origin


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    library = argv[0] if argv else installed_extension()
    try:
        check(library)
    except LinkageError as error:
        sys.exit(f"FAIL {error}")
    print(f"ok {library}: loads libstdc++.so.6 and exports no stream code of its own")


if __name__ == "__main__":
    main()
