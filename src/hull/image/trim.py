"""Which standard library modules the guest needs, compiled to sourceless .pyc.

The set is found statically with :mod:`modulefinder` over the agent's sources, with the
extracted Debian stdlib as the path, in two passes:

1. *import time*: only the imports that run when the agent is imported. In stdlib modules,
   function bodies, ``if __name__ == "__main__":`` blocks and imports guarded by
   ``except ImportError`` are dropped before scanning. Everything this pass finds is
   required: importing the agent would fail without it.
2. *everything else*: all imports, also the lazy ones inside stdlib functions (so a call
   the agent makes at run time does not hit a missing module), except the heavy optional
   modules in :data:`OPTIONAL` that the first pass did not require (modulefinder would
   otherwise follow e.g. ``heapq``'s self-test into doctest, unittest, pdb, pydoc, http ...).

The hull sources are always scanned whole (their lazy imports are meant), minus
``if TYPE_CHECKING:`` blocks. The build then imports every chosen module inside a chroot
of the finished image, which is the real check.
"""

from __future__ import annotations

import ast
import modulefinder
import py_compile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hull.errors import AssetError

# Modules Python imports while starting, before any of the agent's code (found with
# ``python3.11 -S -X importtime -c pass`` in a chroot; the rest of startup is frozen).
# ascii and latin_1 are cheap and keep a non-UTF-8 locale from failing at startup.
STARTUP = ("encodings", "encodings.aliases", "encodings.utf_8", "encodings.ascii",
           "encodings.latin_1")

# Never in the image: other platforms' modules, reached through platform checks.
NEVER = frozenset({
    "nt", "ntpath", "nturl2path", "msvcrt", "winreg", "_winapi", "_overlapped", "winsound",
    "_aix_support", "_osx_support", "_scproxy", "ctypes._aix", "ctypes.wintypes",
    "ctypes.macholib", "encodings.mbcs", "encodings.oem", "asyncio.windows_events",
    "asyncio.windows_utils", "multiprocessing.popen_spawn_win32", "_bootsubprocess",
    "java", "vms_lib", "org", "_dummy_thread",
})

# Frozen into the python3.11 binary (Python/frozen.c, ``_imp._frozen_module_names()``),
# or importlib's fallback for an interpreter without its frozen bootstrap: the interpreter
# never reads their files (frozen modules are on outside a CPython source tree), so their
# .pyc would be ~235 KB of dead weight in the image. Only those whose own imports are all
# builtin or frozen are listed; os stays (getpath finds the stdlib by os.py[c]).
FROZEN = frozenset({
    "_collections_abc", "_sitebuiltins", "abc", "codecs", "genericpath", "io", "stat",
    "importlib._bootstrap", "importlib._bootstrap_external",
})

# Heavy or host-oriented modules that stdlib code imports lazily or optionally. Left out
# unless an import-time import needs them (then they are in, whatever this list says).
OPTIONAL = frozenset({
    # development tools, reached through self-tests and helper functions
    "doctest", "unittest", "pdb", "bdb", "pydoc", "pydoc_data", "test", "cmd", "code",
    "codeop", "profile", "cProfile", "pstats", "trace", "timeit", "tracemalloc", "difflib",
    "argparse", "optparse", "getopt", "pprint", "_testcapi", "_testinternalcapi",
    "_testbuffer", "_xxtestfuzz", "py_compile", "compileall", "runpy", "pkgutil",
    # archives, compression, packaging metadata
    "zipfile", "tarfile", "gzip", "bz2", "lzma", "_bz2", "_lzma", "_compression", "zipimport",
    "importlib.metadata", "importlib.resources", "importlib.readers", "sysconfig",
    "_sysconfigdata__x86_64-linux-gnu", "distutils", "ensurepip", "venv", "lib2to3",
    # network protocols, formats, crypto (OpenSSL would add ~5 MB)
    "ssl", "_ssl", "_hashlib", "hmac", "secrets", "http", "urllib", "email", "xml", "xmlrpc",
    "html", "mimetypes", "webbrowser", "ftplib", "netrc", "socketserver", "plistlib", "csv",
    # other subsystems the agent does not use
    "asyncio", "_asyncio", "concurrent", "multiprocessing", "_multiprocessing",
    "decimal", "_decimal", "_pydecimal", "fractions", "statistics", "platform", "getpass",
    "readline", "rlcompleter", "curses", "_curses", "sqlite3", "_sqlite3", "dbm", "tkinter",
    "_tkinter", "gettext", "calendar", "pickle", "_compat_pickle", "shelve", "uuid", "_uuid",
})


@dataclass(frozen=True)
class ModuleSet:
    sources: dict[str, Path]  # stdlib module name -> its .py (a package's __init__.py)
    extensions: dict[str, Path]  # module name -> its .so in lib-dynload
    builtins: frozenset[str]  # compiled into the python binary

    @property
    def names(self) -> list[str]:
        return sorted({*self.sources, *self.extensions})


def find_modules(stdlib: Path, hull_root: Path, triplet: str, version: tuple[int, int],
                 roots: Iterable[str] = ()) -> ModuleSet:
    """The stdlib modules needed by the hull package under ``hull_root`` and ``roots``."""
    hull_modules = package_modules(hull_root)
    start = [*STARTUP, *hull_modules, *roots]
    path = [str(hull_root), str(stdlib)]
    first = _Finder(path, NEVER | FROZEN, stdlib, import_time_only=True)
    first.run(start)
    required = set(first.modules)
    second = _Finder(path, NEVER | FROZEN | (OPTIONAL - required), stdlib,
                     import_time_only=False)
    second.run(start)

    dynload = stdlib / "lib-dynload"
    suffix = f".cpython-{version[0]}{version[1]}-{triplet}.so"
    sources: dict[str, Path] = {}
    extensions: dict[str, Path] = {}
    builtins: set[str] = set()
    for name, mod in second.modules.items():
        file = getattr(mod, "__file__", None)
        if name.split(".")[0] == "hull" or name == "__main__":
            continue
        if file is None:
            builtins.add(name)
        elif Path(file).is_relative_to(stdlib) and file.endswith(".py"):
            sources[name] = Path(file)
    missing, _maybe = second.any_missing_maybe()
    unresolved = {}
    for name in missing:
        # Extension modules are looked up here rather than by modulefinder, which only
        # knows the host's suffixes and so would miss another architecture's.
        if (dynload / f"{name}{suffix}").is_file():
            extensions[name] = dynload / f"{name}{suffix}"
            continue
        importers = sorted(m for m in second.badmodules[name] if m.split(".")[0] == "hull")
        if importers and name not in second.excludes:
            unresolved[name] = importers
    if unresolved:
        what = "; ".join(f"{n} (imported by {', '.join(i)})" for n, i in sorted(unresolved.items()))
        raise AssetError(f"the agent imports modules the image cannot hold: {what}")
    return ModuleSet(sources, extensions, frozenset(builtins))


def package_modules(root: Path) -> list[str]:
    """Module names of the .py files under ``root`` (``hull/agent/main.py`` -> hull.agent.main)."""
    names = []
    for py in sorted(root.rglob("*.py")):
        parts = list(py.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def compile_to(src: Path, dest: Path, guest_source: str) -> None:
    """Compile ``src`` to a sourceless .pyc at ``dest`` (the 'legacy' place: foo.pyc next to
    where foo.py was, the only place sourceless imports look).

    optimize=0 keeps asserts and docstrings: the guest runs the same code the host's tests
    ran. Unchecked-hash pycs embed no source mtime, so rebuilds give the same bytes.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        py_compile.compile(str(src), cfile=str(dest), dfile=guest_source, doraise=True,
                           optimize=0,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    except py_compile.PyCompileError as exc:
        raise AssetError(f"cannot compile {src}: {exc.msg}") from exc


class _Finder(modulefinder.ModuleFinder):
    def __init__(self, path: list[str], excludes: Iterable[str], stdlib: Path,
                 import_time_only: bool) -> None:
        super().__init__(path=path, excludes=list(excludes))
        self.stdlib = str(stdlib)
        self.import_time_only = import_time_only

    def run(self, names: Iterable[str]) -> None:
        for name in names:
            try:
                self.import_hook(name)
            except ImportError as exc:
                raise AssetError(f"module {name} is not in the image's sources: {exc}") from exc

    def load_module(self, fqname: str, fp: Any, pathname: str, file_info: Any) -> Any:
        if file_info[2] != modulefinder._PY_SOURCE:  # type: ignore[attr-defined]
            return super().load_module(fqname, fp, pathname, file_info)
        tree = ast.parse(fp.read(), pathname)
        if pathname.startswith(self.stdlib):
            tree.body = [n for n in tree.body if not _is_main_guard(n)]
            if self.import_time_only:
                tree = _ImportTimeOnly().visit(tree)
        else:
            tree = _DropTypeChecking().visit(tree)
        code = compile(ast.fix_missing_locations(tree), pathname, "exec")
        module: Any = self.add_module(fqname)
        module.__file__ = pathname
        module.__code__ = code
        self.scan_code(code, module)
        return module


def _is_main_guard(node: ast.stmt) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
            and len(node.test.comparators) == 1
            and isinstance(node.test.comparators[0], ast.Constant)
            and node.test.comparators[0].value == "__main__")


_IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def _catches_import_error(node: ast.Try | ast.TryStar) -> bool:
    for handler in node.handlers:
        types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        for t in types:
            if t is None or (isinstance(t, ast.Name) and t.id in _IMPORT_ERRORS):
                return True
    return False


class _DropImports(ast.NodeTransformer):
    def visit_Import(self, node: ast.Import) -> ast.AST:
        return ast.Pass()

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.AST:
        return ast.Pass()


class _ImportTimeOnly(ast.NodeTransformer):
    """Keep only the imports that run when the module is imported, unguarded."""

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        node.decorator_list = [self.visit(d) for d in node.decorator_list]
        node.body = [ast.Pass()]
        return node

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> ast.AST:
        node.decorator_list = [self.visit(d) for d in node.decorator_list]
        node.body = [ast.Pass()]
        return node

    def visit_Lambda(self, node: ast.Lambda) -> ast.AST:
        node.body = ast.Constant(None)
        return node

    def visit_Try(self, node: ast.Try) -> ast.AST:
        if _catches_import_error(node):
            node.body = [_DropImports().visit(stmt) for stmt in node.body]
        self.generic_visit(node)
        return node

    def visit_TryStar(self, node: ast.TryStar) -> ast.AST:
        if _catches_import_error(node):
            node.body = [_DropImports().visit(stmt) for stmt in node.body]
        self.generic_visit(node)
        return node


class _DropTypeChecking(ast.NodeTransformer):
    """``if TYPE_CHECKING:`` blocks never run: their imports need not be in the image."""

    def visit_If(self, node: ast.If) -> ast.AST:
        test = node.test
        name = test.id if isinstance(test, ast.Name) else (
            test.attr if isinstance(test, ast.Attribute) else "")
        if name == "TYPE_CHECKING":
            node.body = [ast.Pass()]
        self.generic_visit(node)
        return node
