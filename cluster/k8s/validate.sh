#!/usr/bin/env bash
# Validates the Kubernetes manifests in cluster/k8s/ offline: every object against the schemas of
# pinned Kubernetes versions, strictly (an unknown or misspelled field is an error), with
# kubernetes-validate from PyPI (installed into ~/.cache/colony when missing). No cluster is
# contacted. Also checks what the schemas cannot: duplicate YAML keys, the namespace of every
# object, the TOML files in colony-config (and, with a built colony binary, that each key is a
# flag of its subcommand), the Prometheus config (with promtool, when installed), and that a
# deliberately broken manifest is refused, so a validator that passes everything cannot go unseen.
#
# keda/ is skipped on purpose: a KEDA ScaledObject is a custom resource with no schema here.
#
#   bash cluster/k8s/validate.sh            # every manifest
#   bash cluster/k8s/validate.sh FILE...    # only these
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# The oldest Kubernetes release these manifests are written for, and a current one.
versions=(1.30 1.35)

pkg_dir="$HOME/.cache/colony/kubernetes-validate"
export PYTHONPATH="$pkg_dir${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import kubernetes_validate" >/dev/null 2>&1; then
    echo "installing: kubernetes-validate (into $pkg_dir)" >&2
    python3 -m pip install --quiet --target "$pkg_dir" kubernetes-validate >&2
fi
shipped="$(python3 -c "from kubernetes_validate import utils; print(' '.join(utils.all_versions()))")"
for v in "${versions[@]}"; do
    if ! grep -qw "$v.0" <<<"$shipped"; then
        echo "FAIL: the installed kubernetes-validate has no schemas for Kubernetes $v (it has: $shipped); update versions in $0" >&2
        exit 1
    fi
done

if [ "$#" -gt 0 ]; then
    files=("$@")
else
    mapfile -t files < <(cd "$here" && find . -name '*.yaml' -not -path './keda/*' | sed 's|^\./||' | sort)
    files=("${files[@]/#/$here/}")
fi

failed=0
fail() {
    echo "FAIL: $*" >&2
    failed=1
}

# Schemas, strictly. kubernetes-validate only warns (and exits 0) for a kind it has no schema
# for; here that is a failure, so a typo in `kind` or `apiVersion` cannot pass.
schema_check() {
    local file="$1" v out rc
    for v in "${versions[@]}"; do
        rc=0
        out="$(python3 -m kubernetes_validate --strict --quiet -k "$v" "$file" 2>&1)" || rc=$?
        if [ "$rc" -ne 0 ] || grep -q . <<<"$out"; then
            printf '%s\n' "$out" >&2
            return 1
        fi
    done
}

for file in "${files[@]}"; do
    if schema_check "$file"; then
        echo "ok    ${file#"$root"/} (Kubernetes ${versions[*]}, strict)"
    else
        fail "${file#"$root"/} does not validate against Kubernetes ${versions[*]} (strict)"
    fi
done

# The negative control: a Deployment with `replica` for `replicas` must be refused.
broken="$(mktemp --suffix=.yaml)"
trap 'rm -f "$broken"' EXIT
cat >"$broken" <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: {name: broken, namespace: colony}
spec:
  replica: 1
  selector: {matchLabels: {app: broken}}
  template:
    metadata: {labels: {app: broken}}
    spec: {containers: [{name: c, image: busybox}]}
EOF
if schema_check "$broken" 2>/dev/null; then
    fail "a Deployment with the unknown field spec.replica passed: strict validation is not in force"
else
    echo "ok    a deliberately misspelled field (spec.replica) is refused"
fi

# What the schemas cannot see.
colony_bin="${COLONY_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/colony/target}/release/colony}"
python3 - "$root" "$colony_bin" "${files[@]}" <<'PY' || failed=1
import os, subprocess, sys, tomllib, yaml

root, colony_bin, files = sys.argv[1], sys.argv[2], sys.argv[3:]
failed = False

def fail(message):
    global failed
    failed = True
    print(f"FAIL: {message}", file=sys.stderr)

class UniqueKeys(yaml.SafeLoader):
    pass

def unique_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)

UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, unique_mapping)

objects = []
for path in files:
    shown = os.path.relpath(path, root)
    try:
        with open(path) as f:
            docs = [d for d in yaml.load_all(f, Loader=UniqueKeys) if d]
    except yaml.YAMLError as e:
        fail(f"{shown}: {e}")
        continue
    for doc in docs:
        objects.append((shown, doc))
        kind, meta = doc.get("kind"), doc.get("metadata", {})
        if kind != "Namespace" and meta.get("namespace") != "colony":
            fail(f"{shown}: {kind}/{meta.get('name')} is not in namespace colony")
print(f"ok    {len(objects)} objects: no duplicate keys, all in namespace colony")

# The shell scripts in containers' commands parse (`sh -n`; the image's /bin/sh is dash, as here).
def pod_specs(doc):
    spec = doc.get("spec", {})
    if doc.get("kind") == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    template = spec.get("template")
    return [template["spec"]] if template else []

scripts = 0
for shown, doc in objects:
    for pod in pod_specs(doc):
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            command = c.get("command", [])
            if "-c" not in command:
                continue
            script = command[command.index("-c") + 1]
            run = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
            scripts += 1
            if run.returncode != 0:
                fail(f"{shown}: {doc['metadata']['name']} container {c['name']}: sh -n: {run.stderr.strip()}")
print(f"ok    {scripts} container scripts parse (sh -n)")

# The config files: valid TOML, no token in them, and each key a flag of the subcommand.
configs = [d for _, d in objects if d.get("kind") == "ConfigMap"
           and d["metadata"]["name"] == "colony-config"]
helps = {}
for doc in configs:
    for name, text in doc.get("data", {}).items():
        role = name.removesuffix(".toml")
        try:
            keys = tomllib.loads(text).keys()
        except tomllib.TOMLDecodeError as e:
            fail(f"colony-config {name}: {e}")
            continue
        if "token" in keys:
            fail(f"colony-config {name}: the token comes from a Secret (COLONY_TOKEN), not the file")
        if not os.access(colony_bin, os.X_OK):
            print(f"skip  colony-config {name}: keys not checked against flags ({colony_bin} not built)")
            continue
        if role not in helps:
            helps[role] = subprocess.run([colony_bin, role, "--help"], capture_output=True,
                                         text=True, check=True).stdout
        unknown = [k for k in keys if f"--{k.replace('_', '-')} " not in helps[role]
                   and f"--{k.replace('_', '-')}\n" not in helps[role]]
        if unknown:
            fail(f"colony-config {name}: not flags of `colony {role}`: {', '.join(unknown)}")
        else:
            print(f"ok    colony-config {name}: {len(keys)} keys, each a flag of `colony {role}`")

# The Prometheus config, with the project's alert rules where the pod mounts them.
for doc in objects:
    doc = doc[1]
    if doc.get("kind") != "ConfigMap" or doc["metadata"]["name"] != "colony-prometheus":
        continue
    promtool = subprocess.run(["sh", "-c", "command -v promtool"], capture_output=True, text=True).stdout.strip()
    if not promtool:
        print("skip  colony-prometheus prometheus.yml: promtool not installed")
        continue
    import shutil, tempfile
    with tempfile.TemporaryDirectory() as tmp:
        os.mkdir(f"{tmp}/rules")
        shutil.copy(f"{root}/cluster/prometheus/alerts.yml", f"{tmp}/rules/alerts.yml")
        config = yaml.safe_load(doc["data"]["prometheus.yml"])
        config["rule_files"] = [r.replace("/etc/prometheus/rules/", f"{tmp}/rules/")
                                for r in config["rule_files"]]
        # Debian's promtool is built without Kubernetes service discovery; it then checks the
        # job with a static target instead (relabelling, rules and the rest unchanged).
        probe = f"{tmp}/probe.yml"
        with open(probe, "w") as f:
            f.write("scrape_configs: [{job_name: p, kubernetes_sd_configs: [{role: pod}]}]\n")
        has_k8s_sd = subprocess.run([promtool, "check", "config", probe],
                                    capture_output=True).returncode == 0
        if not has_k8s_sd:
            for job in config["scrape_configs"]:
                if job.pop("kubernetes_sd_configs", None) is not None:
                    job["static_configs"] = [{"targets": ["127.0.0.1:9101"]}]
        with open(f"{tmp}/prometheus.yml", "w") as f:
            yaml.safe_dump(config, f)
        run = subprocess.run([promtool, "check", "config", f"{tmp}/prometheus.yml"],
                             capture_output=True, text=True)
        how = "" if has_k8s_sd else " (this promtool has no Kubernetes discovery: checked with a static target)"
        if run.returncode != 0:
            fail(f"colony-prometheus prometheus.yml: promtool check config:\n{run.stdout}{run.stderr}")
        else:
            print(f"ok    colony-prometheus prometheus.yml: promtool check config, with cluster/prometheus/alerts.yml{how}")

sys.exit(1 if failed else 0)
PY

# The rules ConfigMap is made from cluster/prometheus/alerts.yml by the command the guide gives;
# check that command's output too, when kubectl is here (it needs no cluster with --dry-run=client).
if [ "$#" -eq 0 ] && command -v kubectl >/dev/null 2>&1; then
    rules="$(mktemp --suffix=.yaml)"
    trap 'rm -f "$broken" "$rules"' EXIT
    kubectl -n colony create configmap colony-prometheus-rules \
        --from-file=alerts.yml="$root/cluster/prometheus/alerts.yml" --dry-run=client -o yaml >"$rules"
    if schema_check "$rules"; then
        echo "ok    colony-prometheus-rules, as kubectl makes it from cluster/prometheus/alerts.yml"
    else
        fail "the ConfigMap kubectl makes from cluster/prometheus/alerts.yml does not validate"
    fi
fi

if [ "$failed" -ne 0 ]; then
    echo "cluster/k8s: validation FAILED (see above)" >&2
    exit 1
fi
echo "cluster/k8s: every manifest is valid for Kubernetes ${versions[*]} (schemas only: no cluster was contacted)"
