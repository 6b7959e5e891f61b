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


def library():
    """llama_cpp, imported once, version checked, with OpenMP told not to spin (decode collapses on a busy
    2-core machine otherwise) and llama.cpp's log kept to its errors."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from celslm import llamastate

    try:
        import llama_cpp
    except ImportError as exc:
        raise UsageError(f"the llama.cpp engine needs llama-cpp-python=={llamastate.LLAMA_CPP_PYTHON} "
                         f"({exc}); install it, or use --engine transformers") from exc
    llamastate.check_version(llama_cpp)
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


def last_error() -> str:
    return f" ({_errors[-1]})" if _errors else ""


def load(path: str) -> Future:
    """The GGUF's llama_model handle, loading in a thread (or already loading since `preload`)."""
    key = os.path.abspath(path)
    with _lock:
        started = _loading.pop(key, None)
    if started is not None:
        return started
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


def preload(path: str) -> None:
    """Start loading `path` now; the engine this process makes for the same file takes it over."""
    future = load(path)
    with _lock:
        _loading.setdefault(os.path.abspath(path), future)
