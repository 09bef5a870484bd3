"""Print, as JSON lines, the documentation of the installed standard library: run by path with
`python -I -S` (no site-packages, no user paths), so only the stdlib is seen and the instruct
stage's own process imports none of it.

    {"module": "textwrap", "name": "dedent", "kind": "function", "summary": "...", "signature": "(text)"}

A record with an empty `name` is the module itself. Modules are visited in sorted order, their
public names in sorted order; a module that fails to import (or is on the block list: it has side
effects, or needs a display) is left out.
"""

import contextlib
import importlib
import inspect
import io
import json
import re
import sys

BLOCKED = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
           "pydoc_data", "venv", "webbrowser", "__main__", "__phello__", "__hello__", "msilib", "winreg",
           "winsound", "msvcrt", "_winapi", "nt", "xxsubtype", "pty", "tty", "readline", "crypt", "curses"}
MAX_SUMMARY = 160
# a default's repr may name where it lives in this process: `<function copy2 at 0x7f06e17e3740>`,
# `<weakref at 0x7fa3fe0e41d0; to '_StderrHandler'>`
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def summary(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    first = _ADDRESS.sub("", doc.strip().split("\n\n")[0].replace("\n", " ").strip())
    return first if len(first) <= MAX_SUMMARY else ""


def signature(obj) -> str:
    try:
        return _ADDRESS.sub("", str(inspect.signature(obj)))  # the same text in every process
    except (TypeError, ValueError):
        return ""


def records(module_names):
    for name in module_names:
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                module = importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - any module that cannot be imported here is skipped
            continue
        yield {"module": name, "name": "", "kind": "module", "summary": summary(module), "signature": ""}
        public = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        for attr in sorted(set(a for a in public if isinstance(a, str))):
            obj = getattr(module, attr, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            if getattr(obj, "__module__", None) != name:
                continue  # documented where it is defined
            kind = "class" if inspect.isclass(obj) else "function"
            yield {"module": name, "name": attr, "kind": kind, "summary": summary(obj), "signature": signature(obj)}


def main() -> None:
    names = sys.argv[1:] or sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in BLOCKED)
    for record in records(names):
        print(json.dumps(record, sort_keys=True, ensure_ascii=False))


if __name__ == "__main__":
    main()
