"""Regenerate ``v1.33.0-local-strict.subset.json`` from the kubernetes-validate wheel.

The subset is the transitive ``$ref`` closure of the definitions that routescope's
manifests use (pod templates, Service, PVC, ConfigMap, NetworkPolicy, ...), copied
verbatim from kubernetes-validate's ``v1.33.0-local-strict/_definitions.json``:
nothing inside a definition is edited, unreferenced definitions are just left out.

    pip install kubernetes-validate==1.37.0
    python tests/schemas/kubernetes/make_subset.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

K8S_VERSION = "v1.33.0"
ROOTS = [
    "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
    "io.k8s.api.core.v1.PodTemplateSpec",
    "io.k8s.api.core.v1.PodSpec",
    "io.k8s.api.core.v1.Service",
    "io.k8s.api.core.v1.ServiceSpec",
    "io.k8s.api.core.v1.ServiceStatus",
    "io.k8s.api.core.v1.ResourceRequirements",
    "io.k8s.api.core.v1.SecurityContext",
    "io.k8s.api.core.v1.EnvVar",
    "io.k8s.api.core.v1.EnvVarSource",
    "io.k8s.api.core.v1.EnvFromSource",
    "io.k8s.api.core.v1.VolumeMount",
    "io.k8s.api.core.v1.PersistentVolumeClaim",
    "io.k8s.api.core.v1.ConfigMap",
    "io.k8s.api.networking.v1.NetworkPolicy",
]
REF = re.compile(r'"\$ref": "(?:/api/_definitions\.json)?#/\$defs/([^"]+)"')


def main() -> None:
    import kubernetes_validate  # noqa: PLC0415 - only needed to regenerate

    src = (
        Path(kubernetes_validate.__file__).parent
        / "kubernetes-json-schema"
        / f"{K8S_VERSION}-local-strict"
        / "_definitions.json"
    )
    full = json.loads(src.read_text())
    defs = full["$defs"]
    keep: set[str] = set()
    stack = list(ROOTS)
    while stack:
        name = stack.pop()
        if name in keep:
            continue
        keep.add(name)
        stack.extend(REF.findall(json.dumps(defs[name])))
    out = {
        "$schema": full["$schema"],
        "$id": full["$id"],
        "$comment": (
            f"Subset of kubernetes-validate {kubernetes_validate.__version__} "
            f"kubernetes-json-schema/{K8S_VERSION}-local-strict/_definitions.json "
            "(Apache-2.0); regenerate with tests/schemas/kubernetes/make_subset.py"
        ),
        "$defs": {name: defs[name] for name in sorted(keep)},
    }
    dst = Path(__file__).with_name(f"{K8S_VERSION}-local-strict.subset.json")
    dst.write_text(json.dumps(out, indent=1, sort_keys=False) + "\n")
    print(f"wrote {dst} ({len(keep)} definitions)")


if __name__ == "__main__":
    main()
