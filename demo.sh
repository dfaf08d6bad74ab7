#!/usr/bin/env bash
# The main job: run the controller and the sample AgentSession, and watch it to the answer.
#
# With nothing configured it starts a local Kubernetes (tests/cluster/local-k8s.sh) and a
# local llama.cpp model (tests/llm/local-llm.sh). It uses instead:
#   - the cluster in KUBECONFIG (or ~/.kube/config) when one answers;
#   - ML_INTERN_MODEL (+ ML_INTERN_LLM_BASE_URL, ML_INTERN_API_KEY) when set, else
#     OPENAI_API_KEY with openai/gpt-4o-mini, else HF_TOKEN with the Hugging Face router.
set -euo pipefail
cd "$(dirname "$0")"
NS=${ML_INTERN_DEMO_NAMESPACE:-ml-intern-demo}
SESSION=hello-sandbox
say() { echo "== $*" >&2; }

say "building ml-intern"
cargo build --quiet
BIN=${CARGO_TARGET_DIR:-target}/debug/ml-intern

local_cluster=0
if [[ -z ${KUBECONFIG:-} && -f $HOME/.kube/config ]]; then export KUBECONFIG=$HOME/.kube/config; fi
if [[ -z ${KUBECONFIG:-} ]] || ! kubectl get --raw /readyz >/dev/null 2>&1; then
  say "no cluster configured: starting the local one (the first build takes several minutes)"
  tests/cluster/local-k8s.sh up
  export KUBECONFIG=$(tests/cluster/local-k8s.sh kubeconfig)
  tests/cluster/local-k8s.sh has-image localhost/ml-intern-sandbox:busybox ||
    tests/cluster/local-k8s.sh busybox localhost/ml-intern-sandbox:busybox
  local_cluster=1
fi

api_key=""
base_url=${ML_INTERN_LLM_BASE_URL:-}
if [[ -n ${ML_INTERN_MODEL:-} ]]; then
  model=$ML_INTERN_MODEL; api_key=${ML_INTERN_API_KEY:-}
elif [[ -n ${OPENAI_API_KEY:-} ]]; then
  model=openai/gpt-4o-mini; api_key=$OPENAI_API_KEY
elif [[ -n ${HF_TOKEN:-} ]]; then
  model=moonshotai/Kimi-K2.6:novita; api_key=$HF_TOKEN
else
  say "no model configured: starting the local llama.cpp server (Qwen2.5-Coder-0.5B)"
  tests/llm/local-llm.sh start
  model=openai/qwen2.5-coder-0.5b; base_url=$(tests/llm/local-llm.sh url)
fi

say "installing the CRD and the namespace $NS"
kubectl apply -f crds/ >/dev/null
kubectl wait --for=condition=established --timeout=60s crd/agentsessions.ml-intern.io >/dev/null
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
if [[ -n $api_key ]]; then
  kubectl -n "$NS" create secret generic llm-api-key --from-literal=api-key="$api_key" \
    --dry-run=client -o yaml | kubectl apply -f - >/dev/null
fi

log=$(mktemp -t ml-intern-controller.XXXXXX.log)
say "starting the controller (log: $log)"
"$BIN" controller --namespace "$NS" --http-addr 127.0.0.1:0 >"$log" 2>&1 &
controller=$!
trap 'kill $controller 2>/dev/null || true; [[ -n ${watcher:-} ]] && kill $watcher 2>/dev/null || true' EXIT

# a session from an earlier run goes first (its finalizer needs the controller)
kubectl -n "$NS" delete agentsession "$SESSION" --ignore-not-found --timeout=60s >/dev/null

say "applying configs/samples/agentsession.yaml with model $model"
kubectl create --dry-run=client -o json -f configs/samples/agentsession.yaml |
  MODEL=$model BASE_URL=$base_url HAS_KEY=${api_key:+1} LOCAL=$local_cluster python3 -c '
import json, os, sys
s = json.load(sys.stdin)
s["metadata"].pop("namespace", None)
spec = s["spec"]
spec["model"] = os.environ["MODEL"]
if os.environ["BASE_URL"]:
    spec["llm"]["baseUrl"] = os.environ["BASE_URL"]
if not os.environ.get("HAS_KEY"):
    spec["llm"].pop("apiKeySecretRef", None)
if os.environ["LOCAL"] == "1":
    spec["sandbox"].update({"image": "localhost/ml-intern-sandbox:busybox", "imagePullPolicy": "Never"})
    spec["llm"].update({"maxTokens": 128, "temperature": 0})
json.dump(s, sys.stdout)' | kubectl -n "$NS" apply -f -

kubectl -n "$NS" get agentsessions -w &
watcher=$!
deadline=$((SECONDS + 900))
phase=""
until [[ $phase == Succeeded || $phase == Failed ]]; do
  if ((SECONDS > deadline)); then say "no result after 15 minutes"; exit 1; fi
  if ! kill -0 $controller 2>/dev/null; then say "the controller exited:"; tail -20 "$log" >&2; exit 1; fi
  sleep 1
  phase=$(kubectl -n "$NS" get agentsession "$SESSION" -o jsonpath='{.status.phase}' 2>/dev/null || true)
done
kill $watcher 2>/dev/null || true
echo
say "events"
kubectl -n "$NS" get events.events.k8s.io --field-selector regarding.name=$SESSION \
  -o custom-columns=TYPE:.type,REASON:.reason,NOTE:.note 2>/dev/null || true
echo
if [[ $phase == Succeeded ]]; then
  say "final answer"
  kubectl -n "$NS" get agentsession "$SESSION" -o jsonpath='{.status.finalResponse}'; echo
else
  say "the session failed"
  kubectl -n "$NS" get agentsession "$SESSION" -o jsonpath='{.status.message}'; echo
  exit 1
fi
