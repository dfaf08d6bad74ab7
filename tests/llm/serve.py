"""Runs llama.cpp's HTTP server (embedded in the xllamacpp wheel) until SIGTERM."""
import os
import signal
import sys
import time

import xllamacpp as xlc

params = xlc.CommonParams()
params.model.path = os.environ["GGUF"]
params.hostnames = ["127.0.0.1"]
params.port = int(os.environ.get("PORT", "8089"))
params.n_ctx = int(os.environ.get("N_CTX", "4096"))
params.n_parallel = 1
params.cpuparams.n_threads = 2
params.cpuparams_batch.n_threads = 2
params.use_jinja = True
params.model_alias = {"qwen2.5-coder-0.5b"}
if os.environ.get("API_KEY"):
    params.api_keys = [os.environ["API_KEY"]]
if os.environ.get("TEMPLATE"):
    with open(os.environ["TEMPLATE"]) as f:
        params.chat_template = f.read()

server = xlc.Server(params)
print("listening", server.listening_address, flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(3600)
