"""What a llama.cpp user runs without celslm: a plain llama-cpp-python script (no celslm import).

  save     evaluate the context and save llama.cpp's own sequence state of it to a file
  restore  load that state, evaluate the prompt, generate greedily (the peer `bench edge` compares with)
  prefill  evaluate context and prompt from scratch, then generate (llama.cpp edge-only)

python llama_peer.py MODE MODEL.gguf STATE_FILE IDS.json N_NEW [THREADS [LINK]]
IDS.json holds {"context": [...], "prompt": [...], "eos": [...]}. Generated text goes to stdout as it
comes; the last stderr line is JSON: tokens generated and the seconds from first to last.
LINK (restore only, e.g. 100mbit): the state file comes over an emulated link of that rate, its
transfer running from the process's start beside the import and the model load; the state is read
once all of it has arrived.
"""

import ctypes
import json
import os
import re
import sys
import threading
import time

RATES = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def arrival(state: str, link: str) -> threading.Thread:
    """The state file's emulated transfer, started now: join it before reading the file."""
    rate = re.fullmatch(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit)", link.lower())
    if not rate:
        sys.exit(f"bad link {link!r}: use RATE such as 100mbit")
    seconds = os.path.getsize(state) * 8 / (float(rate.group(1)) * RATES[rate.group(2)])
    transfer = threading.Thread(target=time.sleep, args=(seconds,))
    transfer.start()
    return transfer


def main() -> None:
    mode, model, state, ids_file, new = sys.argv[1:6]
    threads = int(sys.argv[6]) if len(sys.argv) > 6 else None
    transfer = arrival(state, sys.argv[7]) if len(sys.argv) > 7 and mode == "restore" else None
    import llama_cpp
    from llama_cpp import Llama

    ids = json.loads(open(ids_file).read())
    needed = len(ids["context"]) + len(ids["prompt"]) + int(new)
    llm = Llama(model_path=model, n_ctx=max(4096, -(-needed // 256) * 256), n_batch=512, n_threads=threads, n_threads_batch=threads,
                flash_attn=False, verbose=False)
    context = ids["context"]
    if mode == "save":
        llm.eval(context)
        array = (llama_cpp.llama_token * len(context))(*context)
        if not llama_cpp.llama_state_seq_save_file(llm._ctx.ctx, state.encode(), 0, array, len(context)):
            sys.exit("saving the state failed")
        return
    if mode == "restore":
        if transfer is not None:
            transfer.join()
        tokens = (llama_cpp.llama_token * llm.n_ctx())()
        count = ctypes.c_size_t()
        if not llama_cpp.llama_state_seq_load_file(llm._ctx.ctx, state.encode(), 0, tokens, llm.n_ctx(), ctypes.byref(count)):
            sys.exit("loading the state failed")
        llm.n_tokens = count.value
        llm.input_ids[: count.value] = tokens[: count.value]
        todo = ids["prompt"]
    else:
        todo = context + ids["prompt"]
    eos, made, first = set(ids["eos"]), 0, None
    for token in llm.generate(todo, temp=0.0, reset=False):
        if first is None:
            first = time.perf_counter()
        made += 1
        if token in eos:
            break
        sys.stdout.buffer.write(llm.detokenize([token]))
        sys.stdout.flush()
        if made >= int(new):
            break
    sys.stdout.write("\n")
    sys.stderr.write(json.dumps({"tokens": made, "decode_s": time.perf_counter() - first}) + "\n")


if __name__ == "__main__":
    main()
