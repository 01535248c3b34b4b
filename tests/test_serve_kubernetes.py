"""kubernetes/ manifests: valid against the KubeRay CRD schemas kept in the repository (unknown
fields rejected, as kubectl --validate=strict does), and in step with the Serve config."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "kubernetes"


def _strict(node):
    """CRD schema -> JSON Schema that refuses fields it does not list (unless the CRD keeps
    unknown fields, x-kubernetes-preserve-unknown-fields)."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def _errors(kind: str, doc: dict) -> list[str]:
    schemas = yaml.safe_load((KUBE / "crds" / "kuberay-v1-trimmed.yaml").read_text())
    validator = jsonschema.Draft7Validator(_strict(schemas[kind]))
    return sorted(f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc))


def _manifest(name: str) -> dict:
    return yaml.safe_load((KUBE / name).read_text())


@pytest.mark.parametrize("name,kind", [("rayservice.yaml", "RayService"), ("rayjob-sweep.yaml", "RayJob")])
def test_manifests_validate_against_the_kuberay_crd_schema(name, kind):
    doc = _manifest(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    assert _errors(kind, doc) == []


def test_the_schema_check_catches_misspelled_missing_and_mistyped_fields():
    doc = _manifest("rayservice.yaml")
    typo = copy.deepcopy(doc)
    typo["spec"]["rayClusterConfig"]["workerGroupSpec"] = typo["spec"]["rayClusterConfig"].pop("workerGroupSpecs")
    no_template = copy.deepcopy(doc)
    del no_template["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    wrong_type = copy.deepcopy(doc)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    bad_mode = copy.deepcopy(doc)
    bad_mode["spec"]["rayClusterConfig"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    no_name = copy.deepcopy(doc)
    del no_name["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]
    for broken, needle in ((typo, "workerGroupSpec"), (no_template, "template"), (wrong_type, "eight"),
                           (bad_mode, "Fast"), (no_name, "name")):
        errors = _errors("RayService", broken)
        assert errors and any(needle in e for e in errors), errors


def test_rayservice_serve_config_is_gpu_cluster_yaml_and_deploys_as_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from raycyto.serve.app import AppArgs
    from raycyto.serve.kube import embed_serve_config, embedded_serve_config

    text = (KUBE / "rayservice.yaml").read_text()
    cluster = (ROOT / "serve_configs" / "gpu_cluster.yaml").read_text()
    assert embedded_serve_config(text) == cluster  # verbatim, comments included
    assert embed_serve_config(text, cluster) == text  # regenerating changes nothing
    config = yaml.safe_load(_manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    assert config == yaml.safe_load(cluster)
    (app,) = ServeDeploySchema.model_validate(config).applications
    AppArgs.model_validate(app.args)
    token = app.args["auth_token_file"]
    pods = [_manifest("rayservice.yaml")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]] + [
        g["template"] for g in _manifest("rayservice.yaml")["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    for pod in pods:  # the token file exists on every node the ingress may land on
        mounts = pod["spec"]["containers"][0]["volumeMounts"]
        assert any(token.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts), mounts
    gpus = [g for g in _manifest("rayservice.yaml")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
            if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpus, "the GPU backbone replicas need a GPU worker group"


def test_embedding_a_changed_serve_config_changes_the_manifest():
    from raycyto.serve.kube import embed_serve_config, embedded_serve_config

    text = (KUBE / "rayservice.yaml").read_text()
    changed = embed_serve_config(text, "applications: []\n\nproxy_location: HeadOnly\n")
    assert embedded_serve_config(changed) == "applications: []\n\nproxy_location: HeadOnly\n"
    assert changed != text and yaml.safe_load(changed)["spec"]["rayClusterConfig"] == \
        yaml.safe_load(text)["spec"]["rayClusterConfig"]


def test_rayjob_runs_the_blood_smear_study_sweep():
    spec = _manifest("rayjob-sweep.yaml")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and argv[1].endswith("jobs/sweep.py")
    args = dict(zip(argv[2::2], argv[3::2]))
    assert args["--config"].endswith("jobs/configs/leukemia_study.yaml")
    assert (ROOT / "jobs" / "configs" / "leukemia_study.yaml").is_file()
    assert args["--storage"].startswith("s3://") and args["--data"]  # trials on workers need object storage
    import typer

    from raycyto.cli import app

    sweep = typer.main.get_command(app).commands["sweep"]  # jobs/sweep.py runs `raycyto sweep` itself
    sweep.make_context("raycyto sweep", argv[2:])  # every flag is one it accepts (parsed, not run)
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resources"]["limits"]["nvidia.com/gpu"] >= 1


def test_every_rayservice_container_runs_serve_as_raycyto_serve_does():
    """HAProxy ingress + high-throughput mode (raycyto.serve.app.SERVE_ENV) on every pod: Ray
    reads them where it starts, and every node runs an HAProxy."""
    from raycyto.serve.app import SERVE_ENV

    assert SERVE_ENV.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"

    spec = _manifest("rayservice.yaml")["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e["value"] for e in container.get("env", [])}
            assert {k: env.get(k) for k in SERVE_ENV} == SERVE_ENV, container["name"]
