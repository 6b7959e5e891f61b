"""llama-cpp-python, imported and told how to behave, and GGUF files loaded into it in a thread.

Kept apart from the engine (`llamacpp.py`, numpy and the artifact format) so that the command line
can start loading the model before anything else is imported: `decode` and `serve` spend their first
~0.35 s in llama.cpp's loader, which releases the GIL and so overlaps Python's own imports.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import Future

from celslm.errors import CelslmError, UsageError

_errors: list[str] = []  # llama.cpp's last error lines, quoted in our messages
_loading: dict[str, Future] = {}  # GGUF path -> its model handle, loading since the command line started
_lock = threading.Lock()


def _bindings():
    """llama-cpp-python's ctypes bindings (`llama_cpp.llama_cpp`) and its version.

    Importing the package runs its high-level API too (jinja2, diskcache, numpy...: 0.16 s, a third of
    an answer's time to first byte), which celslm does not use. So, unless the package is imported
    already, the bindings are imported under a bare stand-in for the package, which is then taken out
    of sys.modules: a later `import llama_cpp` gets the real package, which reuses these bindings."""
    import importlib
    import importlib.util
    import re
    import sys
    import types

    if "llama_cpp.llama_cpp" in sys.modules and "llama_cpp" in sys.modules:
        return sys.modules["llama_cpp.llama_cpp"], getattr(sys.modules["llama_cpp"], "__version__", "?")
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("No module named 'llama_cpp'")
    folder = list(spec.submodule_search_locations)[0]
    with open(os.path.join(folder, "__init__.py")) as f:
        found = re.search(r'__version__\s*=\s*"([^"]+)"', f.read())
    stand_in = types.ModuleType("llama_cpp")
    stand_in.__path__ = [folder]
    sys.modules["llama_cpp"] = stand_in
    try:
        bindings = importlib.import_module("llama_cpp.llama_cpp")
    finally:
        if sys.modules.get("llama_cpp") is stand_in:
            del sys.modules["llama_cpp"]
    return bindings, found.group(1) if found else "?"


def library():
    """llama.cpp's bindings, imported once, version checked, with OpenMP told not to spin (decode
    collapses on a busy 2-core machine otherwise) and llama.cpp's log kept to its errors."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from celslm import llamastate

    with _lock:
        if getattr(library, "bound", None) is None:
            try:
                library.bound = _bindings()
            except ImportError as exc:
                raise UsageError(f"the llama.cpp engine needs llama-cpp-python=={llamastate.LLAMA_CPP_PYTHON} "
                                 f"({exc}); install it, or use --engine transformers") from exc
    llama_cpp, version = library.bound
    llamastate.check_version(version, getattr(llama_cpp, "LLAMA_STATE_SEQ_VERSION", None))
    with _lock:
        if not getattr(library, "logging", None):
            llama_cpp.llama_backend_init()

            @llama_cpp.llama_log_callback
            def log(level, text, _):
                if level == 4:  # GGML_LOG_LEVEL_ERROR (ggml.h of this llama.cpp)
                    _errors.append(text.decode(errors="replace").strip().rpartition(": ")[2])
                    del _errors[:-4]

            library.logging = log  # kept alive: llama.cpp holds the pointer
            llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    return llama_cpp


def half_converter():
    """llama.cpp's own float32 -> float16 row converter, `ggml_cpu_fp32_to_fp16(x, y, n)` from the ggml-cpu
    library llama-cpp-python ships (F16C instructions where the CPU has them: ~30x numpy's cast on this
    machine), or None where that library or symbol is missing. Rounds to nearest even, as numpy does;
    `llamacpp.to_half` keeps numpy's cast as the fallback, and a test checks the two agree bit for bit."""
    if not hasattr(half_converter, "found"):
        half_converter.found = None
        folder = getattr(library(), "_base_path", None)
        for name in ("libggml-cpu.so", "libggml-cpu.dylib", "ggml-cpu.dll"):
            if folder is not None and os.path.isfile(os.path.join(folder, name)):
                try:
                    convert = ctypes.CDLL(os.path.join(folder, name)).ggml_cpu_fp32_to_fp16
                except (OSError, AttributeError):
                    continue
                convert.argtypes, convert.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
                half_converter.found = convert
                break
    return half_converter.found


def byte_pointer(data) -> ctypes.POINTER(ctypes.c_uint8):
    """A `uint8 *` to state bytes (bytes, or a contiguous numpy uint8 buffer), read in place, never copied."""
    if hasattr(data, "ctypes"):
        return data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
    return ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))


def last_error() -> str:
    return f" ({_errors[-1]})" if _errors else ""


def load(path: str) -> Future:
    """The GGUF's llama_model handle, loading in a thread (or already loading since `preload`)."""
    with _lock:
        started = _loading.pop(os.path.abspath(path), None)
    return started if started is not None else _start(path)


def _start(path: str) -> Future:
    lib, future = library(), Future()

    def run() -> None:
        try:
            params = lib.llama_model_default_params()
            params.n_gpu_layers = 0
            model = lib.llama_model_load_from_file(path.encode(), params)
            if not model:
                raise CelslmError(f"llama.cpp cannot load {path}{last_error()}")
            future.set_result(model)
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="celslm-llama-load", daemon=True).start()
    return future


def preload(path: str) -> Future:
    """Start loading `path` now; the engine this process makes for the same file takes it over."""
    future = Future()
    with _lock:  # registered before the load starts, so that an engine made meanwhile waits for it
        if _loading.setdefault(os.path.abspath(path), future) is not future:
            return _loading[os.path.abspath(path)]
    try:
        started = _start(path)
    except BaseException as exc:
        future.set_exception(exc)
        raise
    started.add_done_callback(lambda done: future.set_exception(done.exception()) if done.exception()
                              else future.set_result(done.result()))
    return future
