#!/usr/bin/env bash
# Runs every check and test on this machine, installing what they need first:
# a real local Kubernetes, the sandbox image, and a real llama.cpp model server.
#
#   tests/run.sh                    format, lint, unit tests, e2e tests on the local cluster
#   KUBECONFIG=... tests/run.sh     the same against another cluster (it must be able to run
#                                   the images localhost/ml-intern-sandbox:busybox and :python)
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "== $*" >&2; }

if [[ -z ${KUBECONFIG:-} ]]; then
  say "starting the local cluster"
  tests/cluster/local-k8s.sh up
  export KUBECONFIG=$(tests/cluster/local-k8s.sh kubeconfig)
  tests/cluster/local-k8s.sh has-image localhost/ml-intern-sandbox:busybox ||
    tests/cluster/local-k8s.sh busybox localhost/ml-intern-sandbox:busybox
  tests/cluster/local-k8s.sh has-image localhost/ml-intern-sandbox:python ||
    tests/cluster/local-k8s.sh debian localhost/ml-intern-sandbox:python
fi

say "starting the local model server"
tests/llm/local-llm.sh start
export ML_INTERN_E2E_LLM_URL=$(tests/llm/local-llm.sh url)

say "cargo fmt --check"
cargo fmt --check
say "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
say "cargo test"
cargo test --locked -- --test-threads 2
