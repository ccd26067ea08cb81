"""Offline validation of everything under deploy/.

    python deploy/validate.py

* deploy/ray-up.yaml: filled in with Ray's provider defaults and validated against the
  cluster schema that ships inside the installed ray package (ray/autoscaler/ray-schema.json),
  exactly as `ray up` does before it contacts the cloud.
* deploy/kuberay/*.yaml: RayCluster / RayJob against the KubeRay ray.io/v1 schema and
  every other object (and every pod template) against the Kubernetes v1.33 strict
  schemas, both vendored under tests/schemas/ (see tests/schemas/README.md).
* deploy/Dockerfile and cross-file rules (same pinned image everywhere, ClusterIP-only
  dashboard, token auth on, GPU workers, entrypoint and volumes that fit together).

Exit status 0 when everything passes; otherwise every problem is printed.
Needs: pyyaml, jsonschema, ray, dockerfile-parse.
"""

from __future__ import annotations

import copy
import io
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Iterable

import jsonschema
import yaml
from referencing import Registry, Resource

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
SCHEMAS = ROOT / "tests" / "schemas"
K8S_DEFS_FILE = SCHEMAS / "kubernetes" / "v1.33.0-local-strict.subset.json"
KUBERAY_DERIVED_FILE = SCHEMAS / "kuberay" / "ray.io-v1.derived.schema.yaml"
# Drop the published CRDs here (ray-project/kuberay ray-operator/config/crd/bases/) and
# they are used instead of the derived schema.
KUBERAY_CRD_FILES = {
    "RayCluster": SCHEMAS / "kuberay" / "ray.io_rayclusters.yaml",
    "RayJob": SCHEMAS / "kuberay" / "ray.io_rayjobs.yaml",
}
K8S_DEFS_ID = "https://kubernetes.io/api/_definitions.json"
K8S_KINDS = {
    ("v1", "PersistentVolumeClaim"): "io.k8s.api.core.v1.PersistentVolumeClaim",
    ("v1", "ConfigMap"): "io.k8s.api.core.v1.ConfigMap",
    ("networking.k8s.io/v1", "NetworkPolicy"): "io.k8s.api.networking.v1.NetworkPolicy",
}
MANIFESTS = ["kuberay/storage.yaml", "kuberay/raycluster.yaml", "kuberay/networkpolicy.yaml", "kuberay/rayjob.yaml"]
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


# --------------------------------------------------------------------------- loading


def load_docs(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def load_manifests(deploy: Path = DEPLOY) -> dict[str, list[dict]]:
    return {name: load_docs(deploy / name) for name in MANIFESTS}


# --------------------------------------------------------------------------- schemas


def crd_to_jsonschema(crd: dict, version: str = "v1") -> dict:
    """JSON Schema for one served version of a CustomResourceDefinition.

    Mirrors what the API server enforces with strict field validation (kubectl's
    default): unknown fields are errors unless x-kubernetes-preserve-unknown-fields.
    """
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    if not ver.get("served", False):
        raise ValueError(f"{crd['metadata']['name']}: {version} is not served")

    def conv(node: Any) -> Any:
        if isinstance(node, list):
            return [conv(n) for n in node]
        if not isinstance(node, dict):
            return node
        out = {k: conv(v) for k, v in node.items()}
        if out.pop("x-kubernetes-int-or-string", False) and "anyOf" not in out:
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        if out.pop("nullable", False) and isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        return out

    schema = conv(ver["schema"]["openAPIV3Schema"])
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    schema["properties"]["apiVersion"] = {"const": f"{group}/{version}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["properties"]["metadata"] = {"$ref": f"{K8S_DEFS_ID}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


class Schemas:
    """Vendored Kubernetes + KubeRay schemas behind one referencing registry."""

    def __init__(self, k8s_defs_file: Path = K8S_DEFS_FILE, kuberay_file: Path = KUBERAY_DERIVED_FILE):
        k8s = json.loads(k8s_defs_file.read_text())
        kuberay = yaml.safe_load(kuberay_file.read_text())
        self.kuberay_id = kuberay["$id"]
        self.registry = Registry().with_resources(
            [(k8s["$id"], Resource.from_contents(k8s)), (kuberay["$id"], Resource.from_contents(kuberay))]
        )
        self.kuberay_source = {kind: f"derived ({kuberay_file.name})" for kind in KUBERAY_CRD_FILES}
        self._crd_schemas: dict[str, dict] = {}
        for kind, path in KUBERAY_CRD_FILES.items():
            if path.exists():
                (crd,) = load_docs(path)
                self._crd_schemas[kind] = crd_to_jsonschema(crd)
                self.kuberay_source[kind] = f"published CRD ({path.name})"

    def schema_for(self, obj: dict) -> dict:
        api, kind = obj.get("apiVersion"), obj.get("kind")
        if api == "ray.io/v1" and kind in KUBERAY_CRD_FILES:
            if kind in self._crd_schemas:
                return self._crd_schemas[kind]
            return {"$ref": f"{self.kuberay_id}#/$defs/{kind}"}
        if (api, kind) in K8S_KINDS:
            return {"$ref": f"{K8S_DEFS_ID}#/$defs/{K8S_KINDS[api, kind]}"}
        raise KeyError(f"no vendored schema for apiVersion={api!r} kind={kind!r}")

    def errors(self, obj: dict, schema: dict | None = None) -> list[str]:
        schema = schema if schema is not None else self.schema_for(obj)
        validator = jsonschema.Draft202012Validator(schema, registry=self.registry)
        return [
            f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
        ]

    def pod_template_errors(self, template: dict) -> list[str]:
        """A pod template against the plain Kubernetes PodTemplateSpec (full ObjectMeta)."""
        ref = {"$ref": f"{K8S_DEFS_ID}#/$defs/io.k8s.api.core.v1.PodTemplateSpec"}
        return self.errors(template, ref)


def iter_pod_templates(obj: dict) -> Iterable[tuple[str, dict]]:
    spec = obj.get("spec") or {}
    cluster_specs = []
    if obj.get("kind") == "RayCluster":
        cluster_specs.append(("spec", spec))
    if obj.get("kind") == "RayJob":
        if "rayClusterSpec" in spec:
            cluster_specs.append(("spec.rayClusterSpec", spec["rayClusterSpec"]))
        if "submitterPodTemplate" in spec:
            yield "spec.submitterPodTemplate", spec["submitterPodTemplate"]
    for where, cs in cluster_specs:
        head = cs.get("headGroupSpec") or {}
        if "template" in head:
            yield f"{where}.headGroupSpec.template", head["template"]
        for i, wg in enumerate(cs.get("workerGroupSpecs") or []):
            if "template" in wg:
                yield f"{where}.workerGroupSpecs[{i}].template", wg["template"]


def manifest_schema_errors(manifests: dict[str, list[dict]], schemas: Schemas) -> list[str]:
    problems = []
    for name, docs in manifests.items():
        for doc in docs:
            label = f"{name}: {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
            try:
                problems += [f"{label}: {e}" for e in schemas.errors(doc)]
            except KeyError as e:
                problems.append(f"{label}: {e.args[0]}")
                continue
            for where, tmpl in iter_pod_templates(doc):
                problems += [f"{label}: {where}: {e}" for e in schemas.pod_template_errors(tmpl)]
    return problems


# --------------------------------------------------------------------------- ray up


def ray_up_errors(config: dict) -> list[str]:
    """Ray's own checks: provider defaults merged in, then ray-schema.json + sanity rules."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as e:  # jsonschema.ValidationError, ValueError, KeyError ...
        msg = getattr(e, "message", None) or str(e)
        return [f"ray-up.yaml: {type(e).__name__}: {msg}"]
    return []


def ray_up_policy_errors(config: dict) -> list[str]:
    p = []
    head_cmds = " ; ".join(config.get("head_start_ray_commands") or [])
    if not re.search(r"ray start --head\b.*--dashboard-host[= ]127\.0\.0\.1(\s|$)", head_cmds):
        p.append("ray-up.yaml: head must run `ray start --head ... --dashboard-host=127.0.0.1`")
    all_cmds = json.dumps({k: v for k, v in config.items() if k.endswith("_commands")})
    if "0.0.0.0" in all_cmds:
        p.append("ray-up.yaml: no command may bind 0.0.0.0")
    run_opts = " ".join((config.get("docker") or {}).get("run_options") or [])
    if not re.search(r"RAY_AUTH_MODE=token\b", run_opts):
        p.append("ray-up.yaml: docker.run_options must set RAY_AUTH_MODE=token")
    if not any(".ray/auth_token" in k for k in (config.get("file_mounts") or {})):
        p.append("ray-up.yaml: file_mounts must ship ~/.ray/auth_token")
    head_type = config.get("head_node_type")
    workers = {k: v for k, v in (config.get("available_node_types") or {}).items() if k != head_type}
    if not workers:
        p.append("ray-up.yaml: no worker node types")
    for name, nt in workers.items():
        if (nt.get("resources") or {}).get("GPU", 0) < 1:
            p.append(f"ray-up.yaml: worker type {name} declares no GPU")
    return p


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_facts(text: str) -> dict:
    from dockerfile_parse import DockerfileParser

    df = DockerfileParser(fileobj=io.BytesIO(text.encode()))
    args = {}
    for ins in df.structure:
        if ins["instruction"] == "ARG" and "=" in ins["value"]:
            k, v = ins["value"].split("=", 1)
            args[k.strip()] = v.strip().strip('"')

    def expand(s: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), s)

    users = [ins["value"].strip() for ins in df.structure if ins["instruction"] == "USER"]
    runs = [expand(ins["value"]) for ins in df.structure if ins["instruction"] == "RUN"]
    copies = [ins["value"] for ins in df.structure if ins["instruction"] == "COPY"]
    return {"base": df.baseimage, "users": users, "runs": runs, "copies": copies, "args": args}


def dockerfile_errors(text: str) -> list[str]:
    f = dockerfile_facts(text)
    p = []
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-(gpu|cu\d+)", f["base"] or "")
    if not m:
        p.append(f"Dockerfile: base must be a pinned rayproject/ray:<x.y.z>-py311-gpu tag, got {f['base']!r}")
    if not f["users"] or f["users"][-1].split(":")[0] in ("root", "0"):
        p.append("Dockerfile: the last USER must be a non-root user")
    elif not f["users"][-1].split(":")[0].isdigit():
        p.append("Dockerfile: the last USER must be numeric (Kubernetes runAsNonRoot cannot check names)")
    torch = [r for r in f["runs"] if re.search(r"pip install\b.*\btorch\b", r)]
    if not torch or not any(re.search(r"['\"]?torch==\d+\.\d+\.\d+['\"]?", r) for r in torch):
        p.append("Dockerfile: torch must be installed with an exact ==x.y.z pin")
    if not any(re.search(r"--(?:extra-)?index-url\s+\S*download\.pytorch\.org/whl/cu\d+", r) for r in torch):
        p.append("Dockerfile: torch must come from a CUDA wheel index (download.pytorch.org/whl/cuXYZ)")
    if not any(re.search(r"pip install\b.*['\"]?/app\[viewer\]['\"]?", r) for r in f["runs"]):
        p.append("Dockerfile: must `pip install /app[viewer]`")
    if not any(re.fullmatch(r"(--chown=\S+\s+)?\.\s+/app/?", c.strip()) for c in f["copies"]):
        p.append("Dockerfile: must `COPY . /app`")
    return p


# --------------------------------------------------------------------------- cross-file rules


def _containers(template: dict) -> list[dict]:
    return ((template.get("spec") or {}).get("containers")) or []


def _by_kind(manifests: dict[str, list[dict]], kind: str) -> list[dict]:
    return [d for docs in manifests.values() for d in docs if d.get("kind") == kind]


def images(manifests: dict[str, list[dict]], ray_up: dict) -> set[str]:
    found = {c.get("image") for docs in manifests.values() for d in docs for _, t in iter_pod_templates(d) for c in _containers(t)}
    found.add((ray_up.get("docker") or {}).get("image"))
    return found


def cluster_spec_errors(where: str, cs: dict, ray_version: str | None) -> list[str]:
    p = []
    head = cs.get("headGroupSpec") or {}
    if head.get("serviceType") != "ClusterIP":
        p.append(f"{where}: headGroupSpec.serviceType must be ClusterIP (dashboard reachable by port-forward only)")
    if head.get("enableIngress"):
        p.append(f"{where}: headGroupSpec.enableIngress must stay off")
    svc_type = (((head.get("headService") or {}).get("spec")) or {}).get("type")
    if svc_type not in (None, "ClusterIP"):
        p.append(f"{where}: headService type {svc_type} exposes the dashboard")
    auth = cs.get("authOptions") or {}
    if auth.get("mode") != "token" or not auth.get("secretName"):
        p.append(f"{where}: authOptions must be {{mode: token, secretName: ...}}")
    if ray_version and cs.get("rayVersion") != ray_version:
        p.append(f"{where}: rayVersion {cs.get('rayVersion')!r} != image Ray {ray_version!r}")
    for t in [head.get("template") or {}] + [wg.get("template") or {} for wg in cs.get("workerGroupSpecs") or []]:
        sc = (t.get("spec") or {}).get("securityContext") or {}
        if sc.get("runAsNonRoot") is not True or sc.get("runAsUser") in (None, 0):
            p.append(f"{where}: every pod must set securityContext runAsNonRoot: true and a non-zero runAsUser")
        for c in _containers(t):
            for e in c.get("env") or []:
                if e.get("name") == "RAY_AUTH_MODE" and e.get("value") != "token":
                    p.append(f"{where}: container {c.get('name')} sets RAY_AUTH_MODE={e.get('value')!r}")
    groups = cs.get("workerGroupSpecs") or []
    if not groups:
        p.append(f"{where}: no GPU worker group")
    for wg in groups:
        spec = (wg.get("template") or {}).get("spec") or {}
        gpus = [int(((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", 0)) for c in spec.get("containers") or []]
        if sum(gpus) < 1:
            p.append(f"{where}: worker group {wg.get('groupName')} has no nvidia.com/gpu limit")
        if not any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations") or []):
            p.append(f"{where}: worker group {wg.get('groupName')} lacks the nvidia.com/gpu toleration")
    return p


def _head_mounts(cs: dict, manifests: dict[str, list[dict]]) -> dict[str, dict]:
    """mountPath -> volume source, for the head container."""
    tmpl = (cs.get("headGroupSpec") or {}).get("template") or {}
    vols = {v["name"]: v for v in (tmpl.get("spec") or {}).get("volumes") or []}
    return {m["mountPath"]: vols.get(m["name"], {}) for c in _containers(tmpl) for m in c.get("volumeMounts") or []}


def parse_flags(argv: list[str]) -> dict[str, str]:
    """`--flag value` pairs (and bare `--switch`es, mapped to "") of a command line."""
    opts: dict[str, str] = {}
    i = 0
    while i < len(argv):
        if argv[i].startswith("--"):
            flag, _, val = argv[i].partition("=")
            if not _ and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                val, i = argv[i + 1], i + 1
            opts[flag] = val
        i += 1
    return opts


def entrypoint_errors(job: dict, manifests: dict[str, list[dict]]) -> list[str]:
    spec = job.get("spec") or {}
    where = f"RayJob/{job['metadata']['name']}"
    argv = shlex.split(spec.get("entrypoint") or "")
    if argv[:4] != ["python", "-m", "routescope.cli", "run-job"]:
        return [f"{where}: entrypoint must start with `python -m routescope.cli run-job`"]
    opts = parse_flags(argv[4:])
    p = [f"{where}: entrypoint lacks {f}" for f in ("--model", "--dataset", "--results", "--stages", "--gpus-per-stage") if f not in opts]
    if p:
        return p
    if not opts.get("--address"):
        p.append(f"{where}: entrypoint needs --address auto (else run-job keeps the stages in the driver, on CPU)")
    if opts.get("--dtype") not in ("float16", "bfloat16"):
        p.append(f"{where}: entrypoint needs --dtype bfloat16 or float16 (the CLI default float32 doubles the GPU memory)")
    cs = spec.get("rayClusterSpec") or {}
    gpus_available = 0
    for wg in cs.get("workerGroupSpecs") or []:
        per_pod = sum(int((((c.get("resources") or {}).get("limits")) or {}).get("nvidia.com/gpu", 0)) for c in _containers(wg.get("template") or {}))
        gpus_available += per_pod * int(wg.get("replicas", 0)) * int(wg.get("numOfHosts", 1))
    needed = int(opts["--stages"]) * float(opts["--gpus-per-stage"])
    if needed <= 0:
        p.append(f"{where}: --gpus-per-stage must be > 0 on a GPU cluster")
    if needed > gpus_available:
        p.append(f"{where}: --stages x --gpus-per-stage = {needed:g} GPUs but the worker groups provide {gpus_available}")
    mounts = _head_mounts(cs, manifests)
    results_mount = next((mp for mp in mounts if opts["--results"].startswith(mp.rstrip("/") + "/")), None)
    if results_mount is None or "persistentVolumeClaim" not in mounts[results_mount]:
        p.append(f"{where}: --results {opts['--results']} is not on a PVC mounted in the head pod")
    else:
        claim = mounts[results_mount]["persistentVolumeClaim"]["claimName"]
        if claim not in {d["metadata"]["name"] for d in _by_kind(manifests, "PersistentVolumeClaim")}:
            p.append(f"{where}: PVC {claim} is not defined in deploy/kuberay/storage.yaml")
    data_mount = next((mp for mp in mounts if opts["--dataset"].startswith(mp.rstrip("/") + "/")), None)
    if data_mount is None:
        p.append(f"{where}: --dataset {opts['--dataset']} is not on a volume mounted in the head pod")
    elif "configMap" in mounts[data_mount]:
        cm_name = mounts[data_mount]["configMap"]["name"]
        key = opts["--dataset"][len(data_mount.rstrip("/")) + 1 :]
        cms = {d["metadata"]["name"]: d for d in _by_kind(manifests, "ConfigMap")}
        if key not in ((cms.get(cm_name) or {}).get("data") or {}):
            p.append(f"{where}: ConfigMap {cm_name} has no key {key}")
    runtime_env = spec.get("runtimeEnvYAML")
    if runtime_env is not None:
        env_vars = (yaml.safe_load(runtime_env) or {}).get("env_vars") or {}
        if any(k in env_vars for k in AUTH_ENV) or "RAY_AUTH" in runtime_env:
            p.append(f"{where}: runtimeEnvYAML must not carry RAY_AUTH_* (auth is set on the pods)")
    return p


def policy_errors(manifests: dict[str, list[dict]], ray_up: dict, dockerfile_text: str) -> list[str]:
    p = dockerfile_errors(dockerfile_text)
    base = dockerfile_facts(dockerfile_text)["base"] or ""
    m = re.match(r"rayproject/ray:(\d+\.\d+\.\d+)", base)
    ray_version = m.group(1) if m else None
    imgs = images(manifests, ray_up)
    if len(imgs) != 1:
        p.append(f"all pods and ray-up.yaml must use one image, found {sorted(map(str, imgs))}")
    for img in imgs:
        if not img or ":" not in img.rsplit("/", 1)[-1] or img.endswith(":latest"):
            p.append(f"image {img!r} must carry a pinned tag (not latest)")
    clusters = _by_kind(manifests, "RayCluster")
    jobs = _by_kind(manifests, "RayJob")
    if not clusters or not jobs:
        p.append("need one RayCluster and one RayJob manifest")
    for c in clusters:
        p += cluster_spec_errors(f"RayCluster/{c['metadata']['name']}", c.get("spec") or {}, ray_version)
    for j in jobs:
        cs = (j.get("spec") or {}).get("rayClusterSpec")
        if cs is None:
            p.append(f"RayJob/{j['metadata']['name']}: needs spec.rayClusterSpec")
            continue
        p += cluster_spec_errors(f"RayJob/{j['metadata']['name']}", cs, ray_version)
        if clusters and cs != clusters[0].get("spec"):
            p.append(f"RayJob/{j['metadata']['name']}: spec.rayClusterSpec drifted from raycluster.yaml spec")
        p += entrypoint_errors(j, manifests)
    for svc in _by_kind(manifests, "Service"):
        if (svc.get("spec") or {}).get("type", "ClusterIP") != "ClusterIP":
            p.append(f"Service/{svc['metadata']['name']}: only ClusterIP services")
    if _by_kind(manifests, "Ingress"):
        p.append("no Ingress in deploy/: expose the viewer/dashboard through your own authenticated ingress")
    p += ray_up_policy_errors(ray_up)
    return p


# --------------------------------------------------------------------------- main


def all_errors(deploy: Path = DEPLOY) -> tuple[list[str], dict[str, str]]:
    schemas = Schemas()
    manifests = load_manifests(deploy)
    ray_up = yaml.safe_load((deploy / "ray-up.yaml").read_text())
    dockerfile = (deploy / "Dockerfile").read_text()
    problems = manifest_schema_errors(manifests, schemas)
    problems += ray_up_errors(ray_up)
    problems += policy_errors(manifests, ray_up, dockerfile)
    return problems, schemas.kuberay_source


def main() -> int:
    problems, sources = all_errors()
    for kind, src in sources.items():
        print(f"schema for {kind}: {src}")
    if problems:
        for line in problems:
            print(f"FAIL {line}")
        return 1
    print("deploy/: all manifests, ray-up.yaml and Dockerfile valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
