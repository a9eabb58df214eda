"""k8s/ without a cluster: every RayJob (standalone and inlined in the Argo Workflow) against the vendored KubeRay
CRD schema, a strict-keys check, the controller-only rules, the project's own rules (GPU group, Secret-only
credentials, ConfigMap config, sizes that match the configs), the Workflow's chain, the entrypoints' --help, the
Dockerfile's pins, and a retry of the filter entrypoint resuming from object storage.

What the strict-keys check covers: every key of a RayJob must be named by the `properties` of the schema node it
sits under (recursing through objects, `additionalProperties` maps and array `items`), and lists that the schema
marks `x-kubernetes-list-type: map|set` must not repeat a key (the API server rejects that; jsonschema does not).
In this CRD the pod templates (head, workers, submitter) are fully expanded Kubernetes PodTemplateSpecs, so the
check reaches every container, env var, volume and toleration. The only node the schema leaves open
(`type: object` with no properties, no x-kubernetes-preserve-unknown-fields anywhere in v1) is the top-level
`metadata`, an ObjectMeta that the API server validates: there we allow name/generateName/namespace/labels/
annotations and check label syntax. `test_open_nodes_are_known` fails if a manifest starts to use another open
node, and `test_no_cel_rules_apply` fails if a manifest sets a field that carries x-kubernetes-validations (CEL),
which jsonschema cannot evaluate.
"""
from __future__ import annotations

import copy
import difflib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CRD_DIR = K8S / "crd"  # vendored with its LICENSE and SOURCE.md (the pinned KubeRay commit and sha256)
CRD = CRD_DIR / "ray.io_rayjobs.yaml"
WORKFLOW = K8S / "workflow-filter-then-train.yaml"
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
GENERATE_NAME = re.compile(r"^[a-z][-a-z0-9]*$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
MAX_RAYJOB_NAME = 47
GENERATED_SUFFIX = 5  # generateName gets 5 random characters
SECRET_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
OBJECT_META_KEYS = {"name", "generateName", "namespace", "labels", "annotations"}


# ---------------------------------------------------------------- loading


def yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.iterdir() if p.suffix in (".yaml", ".yml"))


def workflow() -> dict:
    (wf,) = yaml_docs(WORKFLOW)
    return wf


def inline_rayjobs() -> dict[str, dict]:
    """template name → the RayJob its resource template creates."""
    return {t["name"]: yaml.safe_load(t["resource"]["manifest"]) for t in workflow()["spec"]["templates"]
            if "resource" in t}


def all_rayjobs() -> list[tuple[str, dict]]:
    """(where, RayJob) for every RayJob in k8s/: the standalone files and the Workflow's inlined copies."""
    out = []
    for p in manifest_files():
        for i, d in enumerate(yaml_docs(p)):
            if d.get("kind") == "RayJob":
                out.append((f"{p.name}#{i}", d))
    out += [(f"{WORKFLOW.name}:{name}", job) for name, job in inline_rayjobs().items()]
    return out


def rayjob(name: str) -> dict:
    (job,) = [d for d in yaml_docs(K8S / name) if d.get("kind") == "RayJob"]
    return job


def configmap() -> dict:
    (cm,) = [d for p in manifest_files() for d in yaml_docs(p) if d.get("kind") == "ConfigMap"]
    return cm


@pytest.fixture(scope="module")
def schema() -> dict:
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 25k lines
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


# ---------------------------------------------------------------- checks


def schema_errors(doc: dict, schema: dict) -> list[str]:
    import jsonschema

    v = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in v.iter_errors(doc)]


def strict_key_errors(value, node: dict, path: str = "", open_nodes: list[str] | None = None,
                      cel_nodes: list[str] | None = None) -> list[str]:
    """Keys the schema does not name, and duplicate keys in list-map / set lists (see the module docstring)."""
    errs: list[str] = []
    if node.get("x-kubernetes-validations") and cel_nodes is not None:
        cel_nodes.append(path)
    if isinstance(value, dict):
        props, extra = node.get("properties"), node.get("additionalProperties")
        if props is None and not isinstance(extra, dict) or node.get("x-kubernetes-preserve-unknown-fields"):
            if open_nodes is not None:
                open_nodes.append(path)
            return errs
        for k, v in value.items():
            where = f"{path}.{k}" if path else k
            if props is not None and k in props:
                errs += strict_key_errors(v, props[k], where, open_nodes, cel_nodes)
            elif isinstance(extra, dict):
                errs += strict_key_errors(v, extra, where, open_nodes, cel_nodes)
            else:
                near = difflib.get_close_matches(k, list(props or {}), n=1)
                errs.append(f"{where}: unknown key{f' (did you mean {near[0]!r}?)' if near else ''}")
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        kind = node.get("x-kubernetes-list-type")
        if kind == "map":
            keys = [tuple(json.dumps(i.get(k), sort_keys=True) for k in node.get("x-kubernetes-list-map-keys", []))
                    for i in value if isinstance(i, dict)]
            dups = {k for k in keys if keys.count(k) > 1}
            errs += [f"{path}: duplicate list-map key {d}" for d in sorted(dups)]
        elif kind == "set":
            items = [json.dumps(i, sort_keys=True) for i in value]
            errs += [f"{path}: duplicate set item {d}" for d in sorted({i for i in items if items.count(i) > 1})]
        for i, v in enumerate(value):
            errs += strict_key_errors(v, node["items"], f"{path}[{i}]", open_nodes, cel_nodes)
    return errs


def object_meta_errors(meta: dict) -> list[str]:
    """The open top-level metadata: ObjectMeta keys a manifest may set, and label syntax."""
    errs = [f"metadata.{k}: not an ObjectMeta key this project sets" for k in meta if k not in OBJECT_META_KEYS]
    for k, v in (meta.get("labels") or {}).items():
        name = k.split("/")[-1]
        if not (len(name) <= 63 and LABEL_NAME.match(name)):
            errs.append(f"metadata.labels: bad key {k!r}")
        if not isinstance(v, str) or len(v) > 63 or (v and not LABEL_NAME.match(v)):
            errs.append(f"metadata.labels.{k}: bad value {v!r}")
    for k, v in (meta.get("annotations") or {}).items():
        if not isinstance(v, str):
            errs.append(f"metadata.annotations.{k}: must be a string")
    return errs


def pod_templates(job: dict) -> list[tuple[str, dict]]:
    rc = job["spec"]["rayClusterSpec"]
    out = [("head", rc["headGroupSpec"]["template"])]
    out += [(f"worker group {g.get('groupName')}", g["template"]) for g in rc.get("workerGroupSpecs", [])]
    return out


def controller_errors(job: dict) -> list[str]:
    """The rules KubeRay enforces only in its controller (k8s/crd/SOURCE.md)."""
    errs = []
    meta, spec = job.get("metadata", {}), job.get("spec", {})
    if "name" in meta:
        name = meta["name"]
        if len(name) > MAX_RAYJOB_NAME or not DNS1035.match(name):
            errs.append(f"metadata.name {name!r}: must be a DNS-1035 label of at most {MAX_RAYJOB_NAME} characters")
    elif "generateName" in meta:
        gen = meta["generateName"]
        if len(gen) + GENERATED_SUFFIX > MAX_RAYJOB_NAME or not GENERATE_NAME.match(gen):
            errs.append(f"metadata.generateName {gen!r}: the generated name must be a DNS-1035 label of at most "
                        f"{MAX_RAYJOB_NAME} characters")
    else:
        errs.append("metadata: needs name or generateName")
    for g in spec.get("rayClusterSpec", {}).get("workerGroupSpecs", []):
        lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 2 ** 31 - 1)
        if lo < 0 or hi < 0:
            errs.append(f"worker group {g.get('groupName')}: minReplicas/maxReplicas must not be negative")
        if lo > hi:
            errs.append(f"worker group {g.get('groupName')}: minReplicas {lo} > maxReplicas {hi}")
        if "replicas" in g and not lo <= g["replicas"] <= hi:  # KubeRay clamps it silently: say so here
            errs.append(f"worker group {g.get('groupName')}: replicas {g['replicas']} outside [{lo}, {hi}]")
    if "rayClusterSpec" in spec:
        for where, tpl in pod_templates(job):
            if not tpl.get("spec", {}).get("containers"):
                errs.append(f"{where}: the pod template needs at least one container")
    if "ttlSecondsAfterFinished" in spec and spec.get("shutdownAfterJobFinishes") is not True:
        errs.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
    return errs


def validate_rayjob(job: dict, schema: dict) -> list[str]:
    open_nodes: list[str] = []
    errs = schema_errors(job, schema) + strict_key_errors(job, schema, "", open_nodes)
    errs += [f"{p}: open in the schema, not checked" for p in open_nodes if p != "metadata"]
    return errs + object_meta_errors(job.get("metadata", {})) + controller_errors(job)


def quantity(q) -> float:
    """A Kubernetes CPU/GPU quantity as a number ("8", 8, "500m")."""
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def containers(job: dict) -> list[tuple[str, dict]]:
    return [(where, c) for where, tpl in pod_templates(job) for c in tpl["spec"]["containers"]]


# ---------------------------------------------------------------- schema, strict keys, controller rules


def test_k8s_dir_has_the_manifests():
    kinds = sorted(d["kind"] for p in manifest_files() for d in yaml_docs(p))
    assert kinds.count("RayJob") == 2 and "Workflow" in kinds and "ConfigMap" in kinds, kinds
    assert {j["metadata"]["labels"]["app.kubernetes.io/component"] for _, j in all_rayjobs()} == {"filter", "train"}
    # no Secret with material in the repo: credentials are created in the cluster (k8s/README.md)
    assert "Secret" not in kinds
    assert not re.search(r"AKIA[0-9A-Z]{16}", "".join(p.read_text() for p in K8S.iterdir() if p.is_file()))


def test_vendored_crd_is_the_pinned_kuberay_version():
    """The schema is vendored in k8s/crd/ (no skip when ../shared is absent) and is exactly the file that
    SOURCE.md records: same sha256, same controller-gen version, with its license beside it."""
    import hashlib

    source = (CRD_DIR / "SOURCE.md").read_text()
    digest = re.search(r"sha256: ([0-9a-f]{64})", source).group(1)
    assert hashlib.sha256(CRD.read_bytes()).hexdigest() == digest, "k8s/crd/ray.io_rayjobs.yaml is not the pinned file"
    gen = re.search(r"controller-gen (v[0-9.]+)", source).group(1)
    crd = yaml.safe_load(CRD.read_text().split("\nspec:", 1)[0])  # the header only (the file is 25k lines)
    assert crd["metadata"]["annotations"]["controller-gen.kubebuilder.io/version"] == gen
    assert crd["metadata"]["name"] == "rayjobs.ray.io"
    assert re.search(r"Pinned KubeRay commit: [0-9a-f]{40}", source)
    assert "Apache License" in (CRD_DIR / "LICENSE").read_text()


@pytest.mark.parametrize("where,job", all_rayjobs(), ids=[w for w, _ in all_rayjobs()])
def test_rayjob_valid(where, job, schema):
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert validate_rayjob(job, schema) == [], where


def test_every_manifest_is_checked():
    """Every document in k8s/ is one of the kinds these tests validate."""
    handled = {"RayJob", "Workflow", "ConfigMap", "ServiceAccount", "Role", "RoleBinding"}
    for p in manifest_files():
        for d in yaml_docs(p):
            assert d.get("kind") in handled, f"{p.name}: no validation for kind {d.get('kind')!r}"
            assert set(d) <= {"apiVersion", "kind", "metadata", "spec", "data", "rules", "roleRef", "subjects"}
            assert object_meta_errors(d["metadata"]) == [], p.name


def test_open_nodes_are_known(schema):
    """The strict check stops only at the top-level metadata (checked by object_meta_errors)."""
    for where, job in all_rayjobs():
        open_nodes: list[str] = []
        strict_key_errors(job, schema, "", open_nodes)
        assert open_nodes == ["metadata"], where
    # and the pod templates really are closed in this CRD: the check reaches into containers
    pod = schema["properties"]["spec"]["properties"]["rayClusterSpec"]["properties"]["headGroupSpec"]
    container = pod["properties"]["template"]["properties"]["spec"]["properties"]["containers"]["items"]
    assert "env" in container["properties"] and "volumeMounts" in container["properties"]


def test_no_cel_rules_apply(schema):
    for where, job in all_rayjobs():
        cel: list[str] = []
        strict_key_errors(job, schema, "", None, cel)
        assert cel == [], f"{where} sets {cel}: fields with CEL rules; add a check for them here"


@pytest.mark.parametrize("mutate,expect", [
    (lambda j: j["spec"].__setitem__("shutdownAfterJobFinish", True), "spec.shutdownAfterJobFinish: unknown key"),
    (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["tolerations"][0]
     .__setitem__("operater", "Exists"), "tolerations[0].operater: unknown key (did you mean 'operator'?)"),
    (lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
     .__setitem__("volumeMount", []), "containers[0].volumeMount: unknown key (did you mean 'volumeMounts'?)"),
    (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].__setitem__("minReplica", 1),
     "workerGroupSpecs[0].minReplica: unknown key"),
])
def test_misspelt_key_fails(mutate, expect, schema):
    job = copy.deepcopy(rayjob("rayjob-filter.yaml"))
    mutate(job)
    assert schema_errors(job, schema) == [], "the CRD schema alone accepts a misspelt key (no additionalProperties)"
    errs = validate_rayjob(job, schema)
    assert any(expect in e for e in errs), errs


@pytest.mark.parametrize("mutate,expect", [
    (lambda j: j["metadata"].__setitem__("name", "gradshield-filter-for-a-customer-with-a-long-name"),
     "at most 47"),
    (lambda j: j["metadata"].__setitem__("name", "1gradshield"), "DNS-1035"),
    (lambda j: j["metadata"].__setitem__("name", "gradshield_filter"), "DNS-1035"),
    (lambda j: j["spec"].__setitem__("shutdownAfterJobFinishes", False), "needs shutdownAfterJobFinishes"),
    (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas=3, maxReplicas=2),
     "minReplicas 3 > maxReplicas 2"),
    (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas=-1), "must not be negative"),
    (lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].__setitem__("containers", []),
     "at least one container"),
    (lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "AWS_REGION", "value": "eu-west-1"}), "duplicate list-map key"),
    (lambda j: j["spec"].__setitem__("backoffLimit", "3"), "is not of type 'integer'"),
])
def test_rule_violations_fail(mutate, expect, schema):
    job = copy.deepcopy(rayjob("rayjob-filter.yaml"))
    mutate(job)
    errs = validate_rayjob(job, schema)
    assert any(expect in e for e in errs), errs


# ---------------------------------------------------------------- the project's requirements


@pytest.mark.parametrize("where,job", all_rayjobs(), ids=[w for w, _ in all_rayjobs()])
def test_rayjob_requirements(where, job):
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 0
    if job["metadata"]["labels"]["app.kubernetes.io/component"] == "filter":
        assert spec["backoffLimit"] >= 1, "the filter resumes, so retries are safe and wanted"
    assert "jobId" not in spec, "a fixed jobId would reuse one submission id across clusters"
    gpu_groups = [g for g in spec["rayClusterSpec"]["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                         for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, f"{where}: no GPU worker group"
    for g in gpu_groups:
        tol = g["template"]["spec"].get("tolerations", [])
        assert any(t.get("key") == "nvidia.com/gpu" for t in tol), f"{where}: GPU group without a GPU toleration"
    # credentials: from the Secret, in every Ray container (scorer and writer tasks on workers read S3 too)
    for cwhere, c in containers(job):
        env = {e["name"]: e for e in c.get("env", [])}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env), f"{where} {cwhere}: no S3 credentials"
        for name, e in env.items():
            if name in SECRET_ENV or re.search(r"SECRET|TOKEN|PASSWORD", name):
                assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), f"{where}: {name} inline"


def _entrypoint_config(job: dict) -> str:
    argv = shlex.split(job["spec"]["entrypoint"])
    return argv[argv.index("--config") + 1]


def _config_text(job: dict, tpl: dict, container: dict) -> str:
    """The text that the entrypoint's --config path holds in this container (via a ConfigMap volume mount)."""
    path = _entrypoint_config(job)
    for m in container.get("volumeMounts", []):
        if path.startswith(m["mountPath"].rstrip("/") + "/"):
            (vol,) = [v for v in tpl["spec"]["volumes"] if v["name"] == m["name"]]
            assert "configMap" in vol, f"{path} is mounted from {vol}, not a ConfigMap"
            cm = configmap()
            assert vol["configMap"]["name"] == cm["metadata"]["name"]
            key = path[len(m["mountPath"].rstrip("/")) + 1:]
            assert key in cm["data"], f"ConfigMap {cm['metadata']['name']} has no key {key}"
            return cm["data"][key]
    raise AssertionError(f"{path} is not under any volumeMount of {container['name']}")


def _gpus(job: dict) -> tuple[int, list[float]]:
    total, cpus = 0, []
    for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        (c,) = g["template"]["spec"]["containers"]
        n = int(quantity(c["resources"]["limits"].get("nvidia.com/gpu", 0)))
        total += n * g["replicas"]
        if n:
            cpus.append(quantity(c["resources"]["limits"]["cpu"]) / n)
    return total, cpus


def _train_module():
    from pipelines import filter_then_train

    return filter_then_train


def test_configs_come_from_the_configmap_and_fit_the_clusters():
    from gradshield_ray.config import GradShieldConfig

    filt, train = rayjob("rayjob-filter.yaml"), rayjob("rayjob-train.yaml")
    for job in (filt, train):  # every Ray container sees the same config file (workers load the model too)
        texts = {_config_text(job, tpl, c) for _, tpl in pod_templates(job) for c in tpl["spec"]["containers"]}
        assert len(texts) == 1
    fcfg = GradShieldConfig.model_validate(yaml.safe_load(_config_text(
        filt, *[(t, c) for _, t in pod_templates(filt) for c in t["spec"]["containers"]][0])))
    tcfg = _train_module().TrainJobConfig.model_validate(yaml.safe_load(configmap()["data"]["train.yaml"]))
    # a retry starts a new cluster: the run's state must be in object storage, and training reads that run
    assert fcfg.output.startswith("s3://") and fcfg.input.startswith("s3://")
    assert tcfg.run.rstrip("/") == fcfg.output.rstrip("/")
    assert tcfg.output.startswith("s3://") and tcfg.output.rstrip("/") != fcfg.output.rstrip("/")
    # no credentials in the configs: they come from the Secret as AWS_* environment variables
    assert fcfg.storage.access_key_id is None and tcfg.storage.secret_access_key is None
    # the model directory is a mounted volume on every node
    for job in (filt, train):
        for where, c in containers(job):
            assert any(fcfg.model.path.startswith(m["mountPath"].rstrip("/") + "/") for m in c["volumeMounts"]), where
    # sizes: the scorer actor pool and the training workers fit the GPU worker groups
    gpus, cpus_per_gpu = _gpus(filt)
    assert fcfg.ray.num_actors * fcfg.ray.num_gpus_per_actor <= gpus
    assert all(fcfg.ray.num_cpus_per_actor <= c for c in cpus_per_gpu)
    gpus, cpus_per_gpu = _gpus(train)
    assert tcfg.scaling.use_gpu and tcfg.scaling.num_workers <= gpus
    assert all(tcfg.scaling.cpus_per_worker <= c for c in cpus_per_gpu)


def _pins(text: str) -> dict[str, str]:
    return {m.group(1).lower().split("[")[0]: m.group(2)
            for m in re.finditer(r"^\s*\"?([A-Za-z0-9_.\-\[\],]+)==([0-9][^\s\"]*)", text, re.M)}


def test_image_and_versions_match_the_project():
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    constraints = _pins((REPO / "constraints.txt").read_text())
    docker = (K8S / "Dockerfile").read_text()
    images = {c["image"] for _, job in all_rayjobs() for _, c in containers(job)}
    images |= {t["container"]["image"] for t in workflow()["spec"]["templates"] if "container" in t}
    assert len(images) == 1 and next(iter(images)).endswith(f":{version}"), images
    assert f":{version}" in docker
    for _, job in all_rayjobs():
        assert job["spec"]["rayClusterSpec"]["rayVersion"] == constraints["ray"]
    # the Dockerfile installs with the project's constraints; anything it pins itself agrees with them
    assert "-c constraints.txt" in docker and '".[ray,train]"' in docker
    docker_pins = {m.group(1).lower().split("[")[0]: m.group(2)
                   for m in re.finditer(r"\"([A-Za-z0-9_.\-]+(?:\[[^\]]*\])?)==([0-9][^\"]*)\"", docker)}
    assert docker_pins, "the Dockerfile pins nothing"
    for pkg, ver in docker_pins.items():
        if pkg in constraints:
            assert constraints[pkg] == ver, f"Dockerfile pins {pkg}=={ver}, constraints.txt {constraints[pkg]}"
    assert "deepspeed" in docker_pins or "deepspeed" in constraints, "DeepSpeed must be pinned"
    py = tuple(int(x) for x in re.search(r"^FROM python:(\d+)\.(\d+)", docker, re.M).groups())
    assert py >= (3, 10)


# ---------------------------------------------------------------- the Argo Workflow


WF_TEMPLATE_KEYS = {"name", "dag", "steps", "resource", "container", "script", "retryStrategy", "volumes",
                    "activeDeadlineSeconds", "inputs", "outputs", "metadata", "nodeSelector", "tolerations"}
WF_RESOURCE_KEYS = {"action", "setOwnerReference", "successCondition", "failureCondition", "manifest",
                    "mergeStrategy", "flags"}
WF_TASK_KEYS = {"name", "template", "depends", "dependencies", "arguments", "when"}
WF_SPEC_KEYS = {"entrypoint", "templates", "serviceAccountName", "activeDeadlineSeconds", "podGC", "ttlStrategy",
                "arguments", "volumes"}


def workflow_key_errors(wf: dict) -> list[str]:
    """Argo keys this Workflow may use (no Argo schema is vendored; Argo ignores unknown keys, and a misspelt
    successCondition would let the step succeed as soon as the RayJob is created)."""
    errs = [f"spec.{k}: unknown key" for k in set(wf["spec"]) - WF_SPEC_KEYS]
    for t in wf["spec"]["templates"]:
        errs += [f"template {t.get('name')}: unknown key {k}" for k in set(t) - WF_TEMPLATE_KEYS]
        if "resource" in t:
            errs += [f"template {t['name']}.resource: unknown key {k}" for k in set(t["resource"]) - WF_RESOURCE_KEYS]
            errs += [f"template {t['name']}.resource: needs {k}" for k in ("successCondition", "failureCondition")
                     if k not in t["resource"]]
        for task in t.get("dag", {}).get("tasks", []):
            errs += [f"task {task.get('name')}: unknown key {k}" for k in set(task) - WF_TASK_KEYS]
    return errs


def _condition(expr: str) -> tuple[str, str, str]:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\[\]]+)\s*(==|!=|=)\s*([A-Za-z0-9_.\-]+)\s*", expr)
    assert m, f"not a single Argo resource condition: {expr!r}"
    return m.groups()


def test_workflow_chains_filter_then_train():
    wf = workflow()
    assert wf["apiVersion"] == "argoproj.io/v1alpha1" and wf["kind"] == "Workflow"
    assert workflow_key_errors(wf) == []
    templates = {t["name"]: t for t in wf["spec"]["templates"]}
    dag = templates[wf["spec"]["entrypoint"]]["dag"]["tasks"]
    tasks = {t["name"]: t for t in dag}
    for t in dag:
        assert set(t) <= WF_TASK_KEYS and t["template"] in templates
    # a DAG of three: filter → check-manifest → train, each on the success of the one before
    assert tasks["check-manifest"]["depends"] == "filter.Succeeded"
    assert tasks["train"]["depends"] == "check-manifest.Succeeded"
    assert "depends" not in tasks["filter"] and "dependencies" not in tasks["filter"]
    jobs = inline_rayjobs()
    for task, component in (("filter", "filter"), ("train", "train")):
        tpl = templates[tasks[task]["template"]]
        res = tpl["resource"]
        assert res["action"] == "create" and res.get("setOwnerReference") is True
        assert _condition(res["successCondition"]) == ("status.jobDeploymentStatus", "==", "Complete")
        assert _condition(res["failureCondition"]) == ("status.jobDeploymentStatus", "==", "Failed")
        job = jobs[tpl["name"]]
        assert job["metadata"]["labels"]["app.kubernetes.io/component"] == component
        # the inlined RayJob is the standalone file, with generateName so the workflow can be submitted again
        standalone = rayjob(f"rayjob-{component}.yaml")
        expect = copy.deepcopy(standalone)
        name = expect["metadata"].pop("name")
        expect["metadata"]["generateName"] = name + "-"
        assert job == expect, f"{tpl['name']}: the inlined RayJob drifted from k8s/rayjob-{component}.yaml"
    # the manifest check: the training script with --check, on the training config, with the Secret's credentials
    chk = templates[tasks["check-manifest"]["template"]]["container"]
    assert chk["command"][:2] == ["python", "/app/pipelines/filter_then_train.py"] and "--check" in chk["command"]
    train_argv = shlex.split(rayjob("rayjob-train.yaml")["spec"]["entrypoint"])
    assert chk["command"][chk["command"].index("--config") + 1] == train_argv[train_argv.index("--config") + 1]
    env = {e["name"]: e for e in chk["env"]}
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[k]["valueFrom"] and "value" not in env[k]
    vols = templates[tasks["check-manifest"]["template"]]["volumes"]
    assert any(v.get("configMap", {}).get("name") == configmap()["metadata"]["name"] for v in vols)


def test_workflow_k8s_parts_match_the_crd(schema):
    """The field the resource conditions read is in the RayJob status schema, and the check step's container and
    volumes (Kubernetes objects) pass the CRD's own pod schema, strict keys included."""
    status = schema["properties"]["status"]["properties"]
    for t in workflow()["spec"]["templates"]:
        if "resource" in t:
            for cond in ("successCondition", "failureCondition"):
                key = _condition(t["resource"][cond])[0].split(".")
                assert key[0] == "status" and key[1] in status, t["resource"][cond]
    (tpl,) = [t for t in workflow()["spec"]["templates"] if "container" in t]
    chk, vols = tpl["container"], tpl["volumes"]
    pod = schema["properties"]["spec"]["properties"]["rayClusterSpec"]["properties"]["headGroupSpec"][
        "properties"]["template"]["properties"]["spec"]
    assert strict_key_errors(chk, pod["properties"]["containers"]["items"], "container") == []
    assert schema_errors({"name": "main", **chk}, pod["properties"]["containers"]["items"]) == []  # Argo names it
    assert strict_key_errors(vols, pod["properties"]["volumes"], "volumes") == []
    assert schema_errors(vols, pod["properties"]["volumes"]) == []


def test_workflow_misspelt_condition_fails():
    """A misspelt successCondition would make Argo treat the step as done on creation: the key check catches it."""
    wf = workflow()
    tpl = next(t for t in wf["spec"]["templates"] if "resource" in t)
    tpl["resource"]["sucessCondition"] = tpl["resource"].pop("successCondition")
    errs = workflow_key_errors(wf)
    assert "template filter-rayjob.resource: unknown key sucessCondition" in errs, errs
    assert "template filter-rayjob.resource: needs successCondition" in errs, errs


def test_rbac_lets_the_workflow_manage_rayjobs():
    docs = {d["kind"]: d for d in yaml_docs(K8S / "rbac.yaml")}
    sa = workflow()["spec"]["serviceAccountName"]
    assert docs["ServiceAccount"]["metadata"]["name"] == sa
    rule = next(r for r in docs["Role"]["rules"] if "rayjobs" in r["resources"])
    assert rule["apiGroups"] == ["ray.io"] and {"create", "get", "watch"} <= set(rule["verbs"])
    assert docs["RoleBinding"]["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    assert docs["RoleBinding"]["subjects"][0]["name"] == sa


# ---------------------------------------------------------------- entrypoints


def image_paths() -> dict[str, Path]:
    """Container path → repository path, from the Dockerfile's WORKDIR and COPY lines."""
    workdir, out = "/", {}
    for line in (K8S / "Dockerfile").read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "WORKDIR":
            workdir = parts[1]
        elif parts[0] == "COPY" and not any(p.startswith("--") for p in parts[1:]):
            *srcs, dst = parts[1:]
            into_dir = dst.endswith("/") or len(srcs) > 1
            dst = os.path.normpath(dst if dst.startswith("/") else os.path.join(workdir, dst))
            for s in srcs:
                out[f"{dst}/{s}" if into_dir else dst] = REPO / s
    return out


def resolve(argv: list[str]) -> list[str]:
    """An image command → the same command on this checkout (a script under pipelines/, a module, or the CLI)."""
    exe, rest = argv[0], argv[1:]
    if exe in ("python", "python3"):
        if rest[0] == "-m":
            return [sys.executable, "-m", rest[1]]
        mapping = image_paths()
        best = max((p for p in mapping if rest[0] == p or rest[0].startswith(p + "/")), key=len, default=None)
        assert best, f"{rest[0]} is not a path the Dockerfile copies into the image"
        script = mapping[best] / rest[0][len(best):].lstrip("/")
        assert script.is_file(), f"{rest[0]} → {script} does not exist"
        return [sys.executable, str(script)]
    if exe == "gradshield-ray":
        return [sys.executable, "-m", "gradshield_ray.cli", rest[0]]
    raise AssertionError(f"unknown entrypoint executable {exe!r}")


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    return env


def _commands() -> list[tuple[str, list[str]]]:
    out = [(w, shlex.split(j["spec"]["entrypoint"])) for w, j in all_rayjobs()]
    out += [(f"{WORKFLOW.name}:{t['name']}", t["container"]["command"]) for t in workflow()["spec"]["templates"]
            if "container" in t]
    return out


@pytest.mark.parametrize("where,argv", _commands(), ids=[w for w, _ in _commands()])
def test_entrypoint_exists_and_help_runs(where, argv):
    cmd = resolve(argv)
    out = subprocess.run(cmd + ["--help"], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    for flag in [a for a in argv if a.startswith("--")]:  # every flag the manifest passes is one the script takes
        assert flag in out.stdout, f"{where}: {flag} is not in {cmd} --help"


# ---------------------------------------------------------------- a RayJob retry resumes


@pytest.mark.slow
def test_filter_retry_resumes_from_object_storage(tmp_path, tiny_model_dir):
    """Run the filter RayJob's own entrypoint and config as a fresh process twice against an S3 server: the first
    attempt dies partway (as a failed RayJob attempt), the second (what backoffLimit starts, on a new cluster)
    resumes from the committed units instead of starting over, and loses or duplicates no row."""
    import io

    import pyarrow.parquet as pq

    from gradshield_ray.miniature.demo import make_corpus
    from s3server import FAKE_KEY, FAKE_SECRET, moto_server, s3_client, upload_dir

    job = rayjob("rayjob-filter.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    head_tpl = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    head = head_tpl["spec"]["containers"][0]
    cfg_path = tmp_path / "filter.yaml"  # what the ConfigMap mounts, at a local path
    cfg_path.write_text(_config_text(job, head_tpl, head))
    argv[argv.index("--config") + 1] = str(cfg_path)
    # the container's environment: Secret-backed variables get the test server's credentials
    secrets = {"AWS_ACCESS_KEY_ID": FAKE_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET}
    env = {**_env(), "AWS_EC2_METADATA_DISABLED": "true", "RAY_DEDUP_LOGS": "0", "OMP_NUM_THREADS": "1",
           "RAY_ADDRESS": "local"}  # a fresh local Ray per attempt, as a retry gets a fresh cluster (and never a
    # cluster that another test started with `ray start`, which an unset RAY_ADDRESS would attach to)
    for e in head["env"]:
        env[e["name"]] = secrets[e["name"]] if "valueFrom" in e else e["value"]

    src = make_corpus(tmp_path / "src", n_rows=48, n_files=3, seed=7)
    corpus = tmp_path / "in"
    corpus.mkdir()
    for f in sorted(src.glob("*.parquet")):  # 3 files × 4 row groups of 4 rows = 12 units
        pq.write_table(pq.read_table(f), corpus / f.name, row_group_size=4)
    with moto_server() as url:
        client = s3_client(url)
        client.create_bucket(Bucket="corpus")
        upload_dir(client, corpus, "corpus", "in")
        # only what differs on this machine: the test server, the tiny model, a CPU-sized Ray pool
        cmd = resolve(argv) + argv[2:] + [f"--set={kv}" for kv in (
            "input=s3://corpus/in", "output=s3://corpus/run", f"model.path={tiny_model_dir}",
            "model.dtype=float32", "model.attn_implementation=eager", f"storage.endpoint_url={url}",
            "proxy.max_probes=4", "score.token_budget=4096", "ray.num_actors=1", "ray.num_gpus_per_actor=0",
            "ray.num_cpus_per_actor=0.5", "ray.render_num_cpus=0.5", "ray.batch_rows=4")]

        first = subprocess.run(cmd, env={**env, "GRADSHIELD_TEST_FAIL_AFTER_PARTS": "7"}, capture_output=True,
                               text=True, cwd=tmp_path, timeout=400)
        assert first.returncode != 0 and "injected failure" in first.stderr, first.stderr[-3000:]
        listed = client.list_objects_v2(Bucket="corpus", Prefix="run/")
        keys = [o["Key"] for o in listed.get("Contents", [])]
        assert "run/manifest.json" not in keys
        markers = [k for k in keys if k.startswith("run/scored/_commits/")]
        assert markers, f"nothing was committed before the failure: {keys}"

        second = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=400)
        assert second.returncode == 0, second.stderr[-3000:]
        man = json.loads(client.get_object(Bucket="corpus", Key="run/manifest.json")["Body"].read())
        report = json.loads(client.get_object(Bucket="corpus", Key="run/report.json")["Body"].read())
        total = man["counts"]["input"]
        assert total == 48
        assert 0 < man["scoring"]["rows_scored_this_attempt"] < total
        assert report["scoring"]["rows_scored_this_attempt"] == man["scoring"]["rows_scored_this_attempt"]
        ids = []
        for split in ("kept", "removed", "errors"):
            for page in client.get_paginator("list_objects_v2").paginate(Bucket="corpus", Prefix=f"run/{split}/"):
                for o in page.get("Contents", []):
                    body = client.get_object(Bucket="corpus", Key=o["Key"])["Body"].read()
                    ids += pq.read_table(io.BytesIO(body), columns=["gs_row_id"])["gs_row_id"].to_pylist()
        expected = {f"{f.name}:{i}" for f in corpus.glob("*.parquet") for i in range(pq.read_metadata(f).num_rows)}
        assert len(ids) == len(set(ids)) == total and set(ids) == expected
        assert sum(man["counts"][k] for k in ("kept", "removed", "errors")) == total
        for out in (first, second):
            assert FAKE_SECRET not in out.stdout + out.stderr
        assert FAKE_SECRET not in json.dumps(man)
