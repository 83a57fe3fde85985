#!/usr/bin/env python3
"""Checks of rendered Kubernetes manifests, run by validate_manifests.sh in the deploy venv.

  check_manifests.py objects --crds DIR --work DIR --k8s-versions V[,V...] OVERLAY=RENDERED.yaml...
      1. every built-in object: kubernetes-validate --strict, for each Kubernetes version;
      2. every custom resource: check-jsonschema against the openAPIV3Schema of its CRD in
         DIR (unknown fields rejected, as the API server's strict field validation does);
         a kind with no vendored CRD fails, except HTTPRoute (see HTTPROUTE_NOTE);
      3. the endpoint picker's EndpointPickerConfig (no published schema): its structure;
      4. references between objects (selectors, ports, names, probes, drain timing, ...).
  check_manifests.py promconfig --work DIR --promtool PROMTOOL PROMETHEUS_YML
      promtool check config, also with a promtool built without kubernetes_sd_configs.

Each problem is printed as "FAIL: <overlay> <Kind>/<name>: <what>"; the last line is
"checks: N passed, M failed"; the exit status is 1 when M > 0.
"""
import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys

import yaml

HTTPROUTE_NOTE = ("no vendored CRD: the Gateway API's HTTPRoute CRD is ~330 kB; checked here "
                  "for parentRefs and InferencePool backendRefs only")
BUILTIN_GROUPS = {"", "apps", "batch", "policy", "autoscaling", "networking.k8s.io",
                  "rbac.authorization.k8s.io", "storage.k8s.io", "scheduling.k8s.io",
                  "coordination.k8s.io", "discovery.k8s.io"}
GATEWAY_EXTENSION_KINDS = {"InferencePool", "InferenceObjective", "InferenceModelRewrite",
                           "HTTPRoute"}
MODEL_SERVER = {"app.kubernetes.io/name": "loraserve",
                "app.kubernetes.io/component": "model-server"}
ENGINE_LABEL = "llm-d.ai/engine-type"
ENGINES_WITH_VLLM_NAMES = {"vllm"}
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class Report:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, ok, where, what):
        if ok:
            self.passed += 1
        else:
            self.failed += 1
            print(f"FAIL: {where}: {what}", flush=True)
        return ok

    def finish(self):
        print(f"checks: {self.passed} passed, {self.failed} failed", flush=True)
        return 1 if self.failed else 0


def group_version(obj):
    api = obj.get("apiVersion", "")
    return tuple(api.split("/", 1)) if "/" in api else ("", api)


def ident(overlay, obj):
    return f"{overlay} {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def file_stem(overlay, obj):
    return f"{overlay}__{obj.get('kind')}__{obj.get('metadata', {}).get('name')}"


def selects(selector, labels):
    """Whether a matchLabels map (or a LabelSelector with matchLabels only) selects labels."""
    if selector is None:
        return False
    match = selector.get("matchLabels", selector) if isinstance(selector, dict) else {}
    if "matchExpressions" in selector:
        return False  # none used here; a selector with them is not resolved by this test
    return all(labels.get(k) == v for k, v in match.items())


# ---------------------------------------------------------------------------------------
# Schemas of custom resources


def strict_schema(schema):
    """An openAPIV3Schema as a JSON Schema that also rejects unknown fields."""
    schema = copy.deepcopy(schema)

    def walk(s):
        if isinstance(s, dict):
            if (s.get("type") == "object" and "properties" in s
                    and "additionalProperties" not in s
                    and not s.get("x-kubernetes-preserve-unknown-fields")):
                s["additionalProperties"] = False
            for key in ("properties", "patternProperties"):
                for sub in s.get(key, {}).values():
                    walk(sub)
            for key in ("items", "additionalProperties", "not"):
                if isinstance(s.get(key), dict):
                    walk(s[key])
            for key in ("anyOf", "allOf", "oneOf"):
                for sub in s.get(key, []):
                    walk(sub)
        return s

    out = walk(schema)
    out["$schema"] = "http://json-schema.org/draft-07/schema#"
    return out


def load_crds(crd_dir, report):
    """{(group, version, kind): (schema_path, crd_file)} from every CRD file in crd_dir."""
    schemas = {}
    out_dir = os.path.join(WORK, "schemas")
    os.makedirs(out_dir, exist_ok=True)
    for name in sorted(os.listdir(crd_dir)):
        if not name.endswith((".yaml", ".yml")):
            continue
        path = os.path.join(crd_dir, name)
        for crd in yaml.safe_load_all(open(path)):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = version.get("schema", {}).get("openAPIV3Schema")
                if not report.check(schema is not None, f"crds {name}",
                                    f"version {version['name']} has no openAPIV3Schema"):
                    continue
                out = os.path.join(out_dir, f"{group}_{version['name']}_{kind}.json")
                with open(out, "w") as f:
                    json.dump(strict_schema(schema), f)
                schemas[(group, version["name"], kind)] = (out, name)
    return schemas


# ---------------------------------------------------------------------------------------
# Per-object validation


def validate_builtin(builtins, versions, venv_bin, report):
    tool = os.path.join(venv_bin, "kubernetes-validate")
    for version in versions:
        paths = [path for _, _, path in builtins]
        proc = subprocess.run([tool, "--strict", "--quiet", "-k", version] + paths,
                              capture_output=True, text=True)
        lines = (proc.stdout + proc.stderr).splitlines()
        for overlay, obj, path in builtins:
            bad = [ln for ln in lines if path in ln and not ln.startswith("INFO")]
            report.check(not bad, ident(overlay, obj),
                         f"kubernetes-validate --strict -k {version}: " + " | ".join(bad))
        if proc.returncode != 0 and not any(path in "".join(lines) for _, _, path in builtins):
            report.check(False, "kubernetes-validate", proc.stdout + proc.stderr)


def validate_custom(customs, schemas, venv_bin, report):
    tool = os.path.join(venv_bin, "check-jsonschema")
    for overlay, obj, path in customs:
        group, version = group_version(obj)
        key = (group, version, obj["kind"])
        where = ident(overlay, obj)
        name = obj.get("metadata", {}).get("name", "")
        report.check(bool(DNS1123.match(name)) and len(name) <= 253, where,
                     f"metadata.name {name!r} is not a DNS-1123 subdomain")
        if key not in schemas:
            if obj["kind"] == "HTTPRoute" and group == "gateway.networking.k8s.io":
                print(f"NOTE: {where}: {HTTPROUTE_NOTE}")
                continue
            report.check(False, where, f"no CRD for {group}/{version} {obj['kind']} in "
                         f"tests/deploy/crds (add the upstream CRD YAML there)")
            continue
        schema_path, crd_file = schemas[key]
        proc = subprocess.run([tool, "--schemafile", schema_path, path],
                              capture_output=True, text=True)
        report.check(proc.returncode == 0, where,
                     f"check-jsonschema against {crd_file}: "
                     + " ".join((proc.stdout + proc.stderr).split()))


# ---------------------------------------------------------------------------------------
# The endpoint picker's configuration


def check_epp_config(overlay, cm, report):
    where = ident(overlay, cm)
    for key, text in cm.get("data", {}).items():
        try:
            cfg = yaml.safe_load(text)
        except yaml.YAMLError as e:
            report.check(False, where, f"data[{key}] is not YAML: {e}")
            continue
        w = f"{where} data[{key}]"
        report.check(cfg.get("apiVersion") == "llm-d.ai/v1alpha1"
                     and cfg.get("kind") == "EndpointPickerConfig", w,
                     "expected apiVersion llm-d.ai/v1alpha1, kind EndpointPickerConfig")
        allowed = {"apiVersion", "kind", "featureGates", "plugins", "schedulingProfiles",
                   "dataLayer", "flowControl", "requestHandler", "saturationDetector", "parser"}
        report.check(set(cfg) <= allowed, w, f"unknown top-level fields {set(cfg) - allowed}")
        plugins = cfg.get("plugins") or []
        names = {}
        for p in plugins:
            if report.check(isinstance(p, dict) and isinstance(p.get("type"), str), w,
                            f"plugin without a type: {p}"):
                name = p.get("name") or p["type"]
                report.check(name not in names, w, f"plugin name {name!r} defined twice")
                names[name] = p
        profiles = cfg.get("schedulingProfiles") or []
        report.check(bool(profiles), w, "no schedulingProfiles")
        for prof in profiles:
            for ref in prof.get("plugins") or []:
                report.check(ref.get("pluginRef") in names, w,
                             f"profile {prof.get('name')!r} refers to undefined plugin "
                             f"{ref.get('pluginRef')!r}")
                weight = ref.get("weight")
                report.check(weight is None or isinstance(weight, (int, float)), w,
                             f"weight of {ref.get('pluginRef')!r} is not a number")
            refs = [names.get(r.get("pluginRef"), {}).get("type", "") for r in prof["plugins"]]
            report.check(any(t.endswith("-picker") for t in refs), w,
                         f"profile {prof.get('name')!r} has no picker plugin")
        return cfg
    return None


# ---------------------------------------------------------------------------------------
# References between the objects of one overlay


def pod_spec(dep):
    return dep["spec"]["template"]["spec"]


def container_ports(dep):
    return {p.get("name"): p["containerPort"] for c in pod_spec(dep)["containers"]
            for p in c.get("ports", [])}


def arg_value(container, flag):
    for a in container.get("args", []) + container.get("command", []):
        if a.startswith(f"--{flag}="):
            return a.split("=", 1)[1]
    for env in container.get("env", []):
        if env["name"] == "FLAGS_" + flag.replace("-", "_"):
            return env.get("value")
    return None


def check_pod_hardening(where, spec, report):
    psc = spec.get("securityContext", {})
    for c in spec["containers"]:
        w = f"{where} container {c['name']}"
        sc = c.get("securityContext", {})
        report.check(sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, w,
                     "runAsNonRoot is not true")
        report.check(sc.get("allowPrivilegeEscalation") is False, w,
                     "allowPrivilegeEscalation is not false")
        report.check(sc.get("readOnlyRootFilesystem") is True, w,
                     "readOnlyRootFilesystem is not true")
        report.check("ALL" in sc.get("capabilities", {}).get("drop", []), w,
                     "capabilities do not drop ALL")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        report.check(seccomp == "RuntimeDefault", w, f"seccompProfile {seccomp!r}")
        res = c.get("resources", {})
        for r in ("cpu", "memory"):
            report.check(r in res.get("requests", {}), w, f"no {r} request")
        report.check("memory" in res.get("limits", {}), w, "no memory limit")


def check_references(overlay, objs, epp_configs, report):
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    deps = by_kind.get("Deployment", {})
    services = by_kind.get("Service", {})
    where = lambda o: ident(overlay, o)  # noqa: E731

    def pods_selected(selector):
        return [d for d in deps.values()
                if selects(selector, d["spec"]["template"]["metadata"].get("labels", {}))]

    # Deployments: own selector, hardening, volumes and config references.
    for dep in deps.values():
        w = where(dep)
        tmpl_labels = dep["spec"]["template"]["metadata"].get("labels", {})
        report.check(selects(dep["spec"]["selector"], tmpl_labels), w,
                     "spec.selector does not select the pod template's labels")
        spec = pod_spec(dep)
        check_pod_hardening(w, spec, report)
        sa = spec.get("serviceAccountName")
        report.check(sa is None or sa in by_kind.get("ServiceAccount", {}), w,
                     f"serviceAccountName {sa!r} is not rendered")
        for vol in spec.get("volumes", []):
            if "configMap" in vol:
                report.check(vol["configMap"]["name"] in by_kind.get("ConfigMap", {}), w,
                             f"volume {vol['name']}: ConfigMap {vol['configMap']['name']!r} "
                             "is not rendered")
            if "secret" in vol:
                report.check(vol["secret"]["secretName"] in by_kind.get("Secret", {}), w,
                             f"volume {vol['name']}: Secret {vol['secret']['secretName']!r} "
                             "is not rendered")
            if "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                report.check(claim in by_kind.get("PersistentVolumeClaim", {}), w,
                             f"volume {vol['name']}: PVC {claim!r} is not rendered")

    # The model server.
    server = next((d for d in deps.values()
                   if selects(MODEL_SERVER, d["spec"]["template"]["metadata"]["labels"])), None)
    if not report.check(server is not None, f"{overlay} Deployment",
                        f"no Deployment whose pods carry {MODEL_SERVER}"):
        return
    w = where(server)
    spec = pod_spec(server)
    c = spec["containers"][0]
    ports = container_ports(server)
    report.check(ports.get("http") == 8000 and ports.get("grpc") == 50051, w,
                 f"container ports {ports}: expected http 8000 and grpc 50051")
    probes = {p: c.get(p, {}).get("httpGet", {}).get("path")
              for p in ("livenessProbe", "readinessProbe", "startupProbe")}
    report.check(probes["livenessProbe"] == "/health", w, "liveness probe is not GET /health")
    report.check(probes["readinessProbe"] == "/ready", w, "readiness probe is not GET /ready")
    startup = c.get("startupProbe", {})
    budget = startup.get("failureThreshold", 3) * startup.get("periodSeconds", 10)
    report.check(probes["startupProbe"] is not None and budget >= 1200, w,
                 f"startup probe allows {budget} s: model load needs up to 20 min")
    drain = int(arg_value(c, "drain-seconds") or 30)
    pre = c.get("lifecycle", {}).get("preStop", {})
    pre_sleep = 0
    if "sleep" in pre:
        pre_sleep = pre["sleep"]["seconds"]
    elif "exec" in pre:
        nums = [int(x) for x in " ".join(pre["exec"]["command"]).split() if x.isdigit()]
        pre_sleep = nums[-1] if nums else 0
    report.check(pre_sleep > 0, w, "no preStop sleep before SIGTERM")
    grace = spec.get("terminationGracePeriodSeconds", 30)
    report.check(grace > drain + pre_sleep, w,
                 f"terminationGracePeriodSeconds {grace} <= preStop {pre_sleep} + "
                 f"--drain-seconds {drain}")
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    shm = vols.get(mounts.get("/dev/shm", {}).get("name"), {})
    report.check(shm.get("emptyDir", {}).get("medium") == "Memory", w,
                 "/dev/shm is not an emptyDir with medium Memory")
    for flag, want_ro in (("model", True), ("adapter-resolver-dir", True), ("upload-dir", False)):
        path = arg_value(c, flag)
        m = mounts.get(path)
        if not report.check(m is not None, w, f"--{flag}={path} is not a volume mount"):
            continue
        report.check(bool(m.get("readOnly")) == want_ro, w,
                     f"{path} mount readOnly={m.get('readOnly')}, expected {want_ro}")
        vol = vols.get(m["name"], {})
        if flag == "adapter-resolver-dir":
            claim = vol.get("persistentVolumeClaim", {}).get("claimName")
            pvc = by_kind.get("PersistentVolumeClaim", {}).get(claim, {})
            report.check("ReadOnlyMany" in pvc.get("spec", {}).get("accessModes", []), w,
                         f"resolver folder PVC {claim!r} is not ReadOnlyMany")
        if flag == "upload-dir":
            report.check("persistentVolumeClaim" in vol, w, "the upload dir is not on a PVC")
    keys = arg_value(c, "api-keys")
    report.check(keys is not None and any(keys.startswith(p + "/") for p in mounts
                 if "secret" in vols.get(mounts[p]["name"], {})), w,
                 f"--api-keys={keys} is not in a Secret volume")
    res = c.get("resources", {})
    device = arg_value(c, "device")
    if overlay == "gpu":
        report.check(device == "cuda", w, f"--device={device}, expected cuda")
        report.check(str(res.get("limits", {}).get("nvidia.com/gpu")) == "1", w,
                     "no nvidia.com/gpu: 1 limit")
        report.check(any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])),
                     w, "no toleration for nvidia.com/gpu")
        report.check(c["image"] == "loraserve:cuda", w, f"image {c['image']}, expected loraserve:cuda")
    if overlay == "cpu":
        report.check(device in (None, "cpu"), w, f"--device={device}, expected cpu")
        report.check("cpu" in res.get("limits", {}), w, "no cpu limit")
        report.check(c["image"] == "loraserve:cpu", w, f"image {c['image']}, expected loraserve:cpu")

    # Services: selector, named ports with appProtocol, targetPorts that exist.
    for svc in services.values():
        ws = where(svc)
        backends = pods_selected(svc["spec"].get("selector"))
        if not report.check(bool(backends), ws, "selects no rendered Deployment's pods"):
            continue
        names = set().union(*(container_ports(d) for d in backends))
        for p in svc["spec"]["ports"]:
            report.check(p.get("appProtocol") is not None, ws, f"port {p.get('name')} has no appProtocol")
            tp = p.get("targetPort", p["port"])
            report.check(tp in names or tp in set().union(*(container_ports(d).values()
                                                            for d in backends)), ws,
                         f"port {p.get('name')}: targetPort {tp} is not a container port")
    svc = next((s for s in services.values()
                if selects(s["spec"].get("selector"), server["spec"]["template"]["metadata"]["labels"])),
               None)
    if report.check(svc is not None, w, "no Service selects the model server"):
        report.check({p.get("name") for p in svc["spec"]["ports"]} >= {"http", "grpc"}, where(svc),
                     "ports are not named http and grpc")

    # PDB, HPA.
    for pdb in by_kind.get("PodDisruptionBudget", {}).values():
        report.check(bool(pods_selected(pdb["spec"]["selector"])), where(pdb),
                     "selects no rendered Deployment's pods")
    for hpa in by_kind.get("HorizontalPodAutoscaler", {}).values():
        ref = hpa["spec"]["scaleTargetRef"]
        report.check(ref["kind"] == "Deployment" and ref["name"] in deps, where(hpa),
                     f"scaleTargetRef {ref} is not a rendered Deployment")
        metrics = [m.get("pods", m.get("external", {})).get("metric", {}).get("name")
                   for m in hpa["spec"].get("metrics", [])]
        report.check(any(m and "requests_waiting" in m for m in metrics), where(hpa),
                     f"no waiting-requests metric in {metrics}")

    # NetworkPolicies: select pods, and name ports those pods have.
    for np_ in by_kind.get("NetworkPolicy", {}).values():
        targets = pods_selected(np_["spec"]["podSelector"])
        if not report.check(bool(targets), where(np_), "podSelector selects no rendered pods"):
            continue
        have = set().union(*(set(container_ports(d)) | set(container_ports(d).values())
                             for d in targets))
        for rule in np_["spec"].get("ingress", []):
            for p in rule.get("ports", []):
                report.check(p.get("port") in have, where(np_),
                             f"ingress port {p.get('port')} is not a port of the selected pods")

    # ServiceMonitors: select a Service and name one of its ports.
    for sm in by_kind.get("ServiceMonitor", {}).values():
        svcs = [s for s in services.values()
                if selects(sm["spec"]["selector"], s["metadata"].get("labels", {}))]
        if not report.check(bool(svcs), where(sm), "selector matches no rendered Service's labels"):
            continue
        names = {p.get("name") for s in svcs for p in s["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            report.check(ep.get("port") in names, where(sm),
                         f"endpoint port {ep.get('port')!r} is not a port of {[s['metadata']['name'] for s in svcs]}")

    # RBAC.
    for rb in by_kind.get("RoleBinding", {}).values():
        report.check(rb["roleRef"]["name"] in by_kind.get("Role", {}), where(rb),
                     f"roleRef {rb['roleRef']['name']!r} is not a rendered Role")
        for s in rb.get("subjects", []):
            report.check(s["kind"] != "ServiceAccount" or s["name"] in by_kind.get("ServiceAccount", {}),
                         where(rb), f"subject ServiceAccount {s['name']!r} is not rendered")

    # The Gateway API Inference Extension objects.
    pools = by_kind.get("InferencePool", {})
    if not report.check(bool(pools), f"{overlay} InferencePool", "none rendered"):
        return
    for pool in pools.values():
        wp = where(pool)
        members = pods_selected(pool["spec"]["selector"])
        report.check(server in members, wp, "selector does not select the model server pods")
        report.check([p["number"] for p in pool["spec"]["targetPorts"]] == [ports.get("http")], wp,
                     f"targetPorts {pool['spec']['targetPorts']} is not the HTTP port {ports.get('http')}")
        ref = pool["spec"]["endpointPickerRef"]
        epp_svc = services.get(ref["name"])
        if not report.check(ref.get("kind", "Service") == "Service" and epp_svc is not None, wp,
                            f"endpointPickerRef {ref} is not a rendered Service"):
            continue
        report.check("port" in ref and ref["port"]["number"] in [p["port"] for p in epp_svc["spec"]["ports"]],
                     wp, f"endpointPickerRef port {ref.get('port')} is not a port of Service {ref['name']}")
        epps = pods_selected(epp_svc["spec"]["selector"])
        if not report.check(len(epps) == 1, wp, f"Service {ref['name']} selects {len(epps)} Deployments"):
            continue
        epp = pod_spec(epps[0])["containers"][0]
        report.check(arg_value(epp, "pool-name") == pool["metadata"]["name"], where(epps[0]),
                     f"--pool-name={arg_value(epp, 'pool-name')}, expected {pool['metadata']['name']}")
        cfg_file = arg_value(epp, "config-file")
        report.check(cfg_file is not None, where(epps[0]), "no --config-file")
        labels = server["spec"]["template"]["metadata"]["labels"]
        for cfg in epp_configs:
            extractor = next((p for p in cfg.get("plugins", []) if p.get("type") == "core-metrics-extractor"), {})
            params = extractor.get("parameters") or {}
            label_key = params.get("engineLabelKey", ENGINE_LABEL)
            engine = labels.get(label_key, params.get("defaultEngine", "vllm"))
            custom = {e.get("name") for e in params.get("engineConfigs", [])}
            report.check(engine in ENGINES_WITH_VLLM_NAMES | custom, w,
                         f"pod label {label_key}={engine!r}: no engine config reads loraserve's metrics")
    for kind in ("InferenceObjective", "InferenceModelRewrite"):
        for o in by_kind.get(kind, {}).values():
            ref = o["spec"]["poolRef"]
            report.check(ref["name"] in pools, where(o), f"poolRef {ref['name']!r} is not a rendered InferencePool")
            report.check(ref.get("group") == "inference.networking.k8s.io", where(o),
                         f"poolRef.group {ref.get('group')!r}: the CRD's default (llm-d.ai) is not "
                         "the InferencePool's group, set inference.networking.k8s.io")
    for rw in by_kind.get("InferenceModelRewrite", {}).values():
        for rule in rw["spec"]["rules"]:
            targets = rule.get("targets", [])
            weights = [t.get("weight") for t in targets]
            report.check(all(x is None for x in weights) or all(x is not None for x in weights),
                         where(rw), "weights must be set on all targets or on none")
    for route in by_kind.get("HTTPRoute", {}).values():
        wr = where(route)
        report.check(group_version(route) == ("gateway.networking.k8s.io", "v1"), wr,
                     f"apiVersion {route['apiVersion']}, expected gateway.networking.k8s.io/v1")
        parents = route["spec"].get("parentRefs", [])
        report.check(bool(parents) and all(p.get("kind", "Gateway") == "Gateway" and p.get("name")
                                           for p in parents), wr, "no parentRef to a Gateway")
        backends = [b for r in route["spec"].get("rules", []) for b in r.get("backendRefs", [])]
        report.check(bool(backends), wr, "no backendRefs")
        for b in backends:
            report.check(b.get("group") == "inference.networking.k8s.io" and b.get("kind") == "InferencePool"
                         and b.get("name") in pools, wr, f"backendRef {b} is not a rendered InferencePool")


# ---------------------------------------------------------------------------------------


def cmd_objects(args):
    global WORK
    WORK = args.work
    report = Report()
    schemas = load_crds(args.crds, report)
    venv_bin = os.path.dirname(sys.executable)
    objdir = os.path.join(WORK, "objects")
    shutil.rmtree(objdir, ignore_errors=True)
    os.makedirs(objdir)
    builtins, customs = [], []
    per_overlay = {}
    for spec in args.rendered:
        overlay, path = spec.split("=", 1)
        objs = [o for o in yaml.safe_load_all(open(path)) if o]
        per_overlay[overlay] = objs
        report.check(bool(objs), overlay, f"{path} renders no objects")
        for o in objs:
            out = os.path.join(objdir, file_stem(overlay, o) + ".yaml")
            with open(out, "w") as f:
                yaml.safe_dump(o, f, sort_keys=False)
            group = group_version(o)[0]
            (builtins if group in BUILTIN_GROUPS else customs).append((overlay, o, out))
    validate_builtin(builtins, args.k8s_versions.split(","), venv_bin, report)
    validate_custom(customs, schemas, venv_bin, report)
    for overlay, objs in per_overlay.items():
        kinds = {o["kind"] for o in objs}
        report.check(GATEWAY_EXTENSION_KINDS <= kinds, overlay,
                     f"missing gateway extension objects {GATEWAY_EXTENSION_KINDS - kinds}")
        configs = []
        for o in objs:
            if o["kind"] == "ConfigMap" and any("EndpointPickerConfig" in str(v)
                                                for v in o.get("data", {}).values()):
                cfg = check_epp_config(overlay, o, report)
                if cfg:
                    configs.append(cfg)
        report.check(bool(configs), overlay, "no ConfigMap holds an EndpointPickerConfig")
        check_references(overlay, objs, configs, report)
    return report.finish()


SD_ROLES = {"node", "service", "pod", "endpoints", "endpointslice", "ingress"}
SD_KEYS = {"role", "namespaces", "selectors", "api_server", "kubeconfig_file", "attach_metadata",
           "basic_auth", "authorization", "oauth2", "tls_config", "proxy_url", "follow_redirects",
           "enable_http2", "bearer_token", "bearer_token_file", "no_proxy",
           "proxy_from_environment", "proxy_connect_header"}


def cmd_promconfig(args):
    report = Report()
    path = args.config
    with open(path) as f:
        cfg = yaml.safe_load(f)
    probe = os.path.join(args.work, "probe-k8s-sd.yml")
    with open(probe, "w") as f:
        f.write("scrape_configs:\n  - job_name: probe\n    kubernetes_sd_configs:\n      - role: pod\n")
    has_k8s_sd = subprocess.run([args.promtool, "check", "config", probe],
                                capture_output=True).returncode == 0
    target = path
    if not has_k8s_sd:
        print(f"NOTE: {args.promtool} was built without kubernetes_sd_configs (Debian's build); "
              f"checking those blocks' keys here and the rest of {path} with promtool")
        derived = copy.deepcopy(cfg)
        for job in derived.get("scrape_configs", []):
            for sd in job.pop("kubernetes_sd_configs", []) or []:
                w = f"{path} job {job.get('job_name')}"
                report.check(isinstance(sd, dict) and sd.get("role") in SD_ROLES, w,
                             f"kubernetes_sd_configs role {sd.get('role')!r} not in {sorted(SD_ROLES)}")
                report.check(set(sd) <= SD_KEYS, w, f"unknown kubernetes_sd_configs keys {set(sd) - SD_KEYS}")
                names = (sd.get("namespaces") or {}).get("names", [])
                report.check(isinstance(names, list) and all(isinstance(n, str) for n in names), w,
                             "namespaces.names is not a list of strings")
                job.setdefault("static_configs", [])
        target = os.path.join(args.work, "prometheus-without-k8s-sd.yml")
        with open(target, "w") as f:
            yaml.safe_dump(derived, f)
    proc = subprocess.run([args.promtool, "check", "config", target], capture_output=True, text=True)
    report.check(proc.returncode == 0, path, "promtool check config: " + " ".join((proc.stdout + proc.stderr).split()))
    return report.finish()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("objects")
    p.add_argument("--crds", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--k8s-versions", required=True)
    p.add_argument("rendered", nargs="+", help="OVERLAY=RENDERED.yaml")
    p = sub.add_parser("promconfig")
    p.add_argument("--work", required=True)
    p.add_argument("--promtool", required=True)
    p.add_argument("config")
    args = parser.parse_args()
    return cmd_objects(args) if args.cmd == "objects" else cmd_promconfig(args)


WORK = None
if __name__ == "__main__":
    sys.exit(main())
