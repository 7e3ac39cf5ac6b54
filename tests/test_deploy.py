"""The deployment files hold together: commands the CLI accepts, settings that exist, labels
that select, every capability served by exactly one worker group, secrets never inlined.

No container engine or cluster runs here, so the files are parsed (PyYAML) and checked
against the code itself; ``kubectl kustomize`` renders the manifests when kubectl exists.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from broker.capabilities import CAPABILITIES, parse_capability_list, queue_name
from broker.cli import main
from broker.settings import Settings
from tests.conftest import IN_CI

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
GROUPS = {
    "text": {"planner", "grounding_tier0", "export_generator", "export_healer",
             "stagehand_planner"},
    "vision": {"grounding_tier1_vlm", "passive_ux_vlm", "stagehand_vlm"},
    "embeddings": {"embeddings"},
}
SECRET_ENV = {"MOLAR_LLM_DATABASE_URL", "MOLAR_LLM_BROKER_URL", "MOLAR_LLM_SERVICE_KEY",
              "BFF_JWT_SECRET", "MOLAR_LLM_ENCRYPTION_KEYS", "MOLAR_LLM_FLOWER_BASIC_AUTH",
              "MOLAR_LLM_MANAGED_OPENAI_API_KEY", "MOLAR_LLM_MANAGED_ANTHROPIC_API_KEY",
              "MOLAR_LLM_MANAGED_OPENAI_COMPATIBLE_API_KEY"}
INTERPOLATED = re.compile(r"\$\{[A-Z0-9_]+(:?[-?][^}]*)?\}")


def settings_env_names() -> set[str]:
    names = set()
    for field_name, field in Settings.model_fields.items():
        names.add(f"MOLAR_LLM_{field_name.upper()}")
        alias = field.validation_alias
        names.update(getattr(alias, "choices", []) or [])
    return names


def check_command(args: list[str]) -> dict[str, Any]:
    """Parse ``molar-llm <args>`` as the CLI would; raises on unknown commands or options."""
    name, *rest = args
    assert name in main.commands, f"'molar-llm {name}' is not a command"
    command = main.commands[name]
    with command.make_context(name, list(rest)) as ctx:
        params = dict(ctx.params)
    if name == "worker":
        parse_capability_list(params["capabilities"])
    return params


def worker_capabilities(args: list[str]) -> set[str]:
    return set(parse_capability_list(check_command(args)["capabilities"]))


def assert_one_group_per_capability(groups: dict[str, set[str]]) -> None:
    served = Counter(cap for caps in groups.values() for cap in caps)
    assert set(served) == set(CAPABILITIES)
    assert all(n == 1 for n in served.values()), served


# -- compose ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def broker_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items()
            if str(svc.get("image", "")).startswith("molar-llm-broker")}


def test_compose_commands_are_real_cli_commands_with_valid_options(compose):
    services = broker_services(compose)
    assert set(services) == {"migrate", "api", "worker-text", "worker-vision",
                             "worker-embeddings", "flower"}
    for name, svc in services.items():
        check_command(svc["command"])
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile", name
    assert services["migrate"]["command"] == ["migrate"]
    assert check_command(services["api"]["command"])["host"] == "0.0.0.0"


def test_compose_worker_groups_serve_each_capability_exactly_once(compose):
    groups = {name.removeprefix("worker-"): worker_capabilities(svc["command"])
              for name, svc in broker_services(compose).items() if name.startswith("worker-")}
    assert groups == GROUPS
    assert_one_group_per_capability(groups)


def test_compose_env_names_are_settings_and_secrets_come_from_outside(compose):
    known = settings_env_names()
    for name, svc in broker_services(compose).items():
        for key, value in svc["environment"].items():
            assert key in known, f"{name}: {key} is not a setting of broker.settings.Settings"
            if key in SECRET_ENV:
                assert INTERPOLATED.search(str(value)), f"{name}: {key} is written inline"


def test_compose_orders_migration_first_and_offers_flower_and_litellm(compose):
    services = compose["services"]
    for name in ("api", "worker-text", "worker-vision", "worker-embeddings", "flower"):
        assert services[name]["depends_on"]["migrate"]["condition"] == \
            "service_completed_successfully"
    assert services["migrate"]["restart"] == "no"
    assert "MOLAR_LLM_FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    litellm = services["litellm"]
    assert litellm["profiles"] == ["litellm"]
    assert "4000:4000" in litellm["ports"]
    env = services["api"]["environment"]
    assert env["MOLAR_LLM_MANAGED_OPENAI_COMPATIBLE_BASE_URL"] == "http://litellm:4000/v1"
    config = yaml.safe_load((DEPLOY / "litellm" / "config.yaml").read_text())
    assert all(m["litellm_params"]["api_key"].startswith("os.environ/")
               for m in config["model_list"])


def test_the_image_runs_molar_llm_as_a_non_root_user():
    lines = [line.strip() for line in (DEPLOY / "Dockerfile").read_text().splitlines()]
    assert 'ENTRYPOINT ["molar-llm"]' in lines
    cmd = next(line for line in lines if line.startswith("CMD "))
    check_command(yaml.safe_load(cmd.removeprefix("CMD ")))
    user = [line for line in lines if line.startswith("USER ")]
    assert user and user[-1] not in ("USER root", "USER 0")


# -- Kubernetes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    files = sorted(path.name for path in (DEPLOY / "k8s").glob("*.yaml")
                   if path.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files
    docs = []
    for name in files:
        docs.extend(doc for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if doc)
    return docs


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: doc["spec"]["template"]["spec"]
            for kind in ("Deployment", "Job") for name, doc in of_kind(docs, kind).items()}


def test_manifests_never_inline_a_secret(manifests):
    assert not of_kind(manifests, "Secret")
    for name, spec in pod_specs(manifests).items():
        for container in spec["containers"]:
            for var in container.get("env", []):
                if var["name"] in SECRET_ENV:
                    assert "value" not in var, f"{name}: {var['name']} is inlined"
                    assert var["valueFrom"]["secretKeyRef"]["name"] == "molar-llm-secrets"
    config = of_kind(manifests, "ConfigMap")["molar-llm-config"]["data"]
    assert not set(config) & SECRET_ENV


def test_manifest_commands_env_and_images_are_consistent(manifests):
    known = settings_env_names()
    images = set()
    for name, spec in pod_specs(manifests).items():
        for container in spec["containers"]:
            check_command(container["args"])
            images.add(container["image"])
            for var in container.get("env", []):
                assert var["name"] in known, f"{name}: {var['name']} is not a setting"
    config = of_kind(manifests, "ConfigMap")["molar-llm-config"]["data"]
    assert set(config) <= known
    assert images == {"molar-llm-broker"}  # one image, pinned by kustomization's images
    assert pod_specs(manifests)["molar-llm-migrate"]["containers"][0]["args"] == ["migrate"]


def test_selectors_and_services_match_their_pods(manifests):
    deployments = of_kind(manifests, "Deployment")
    for name, deployment in deployments.items():
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), name
    for name, service in of_kind(manifests, "Service").items():
        selected = [d for d in deployments.values() if service["spec"]["selector"].items()
                    <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, f"service {name} selects {len(selected)} deployments"
        ports = {p["name"] for c in selected[0]["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports, name


def test_one_worker_deployment_per_group_scaled_on_its_own_queues(manifests):
    deployments = of_kind(manifests, "Deployment")
    groups = {name.removeprefix("molar-llm-worker-"): worker_capabilities(
                  deployment["spec"]["template"]["spec"]["containers"][0]["args"])
              for name, deployment in deployments.items() if "-worker-" in name}
    assert groups == GROUPS
    assert_one_group_per_capability(groups)

    auths = of_kind(manifests, "TriggerAuthentication")
    scaled = of_kind(manifests, "ScaledObject")
    assert {so["spec"]["scaleTargetRef"]["name"] for so in scaled.values()} == \
        {f"molar-llm-worker-{group}" for group in GROUPS}
    for so in scaled.values():
        group = so["spec"]["scaleTargetRef"]["name"].removeprefix("molar-llm-worker-")
        triggers = so["spec"]["triggers"]
        assert {t["type"] for t in triggers} == {"redis"}
        assert {t["metadata"]["listName"] for t in triggers} == \
            {queue_name(cap) for cap in GROUPS[group]}
        assert all(t["authenticationRef"]["name"] in auths for t in triggers)
    for auth in auths.values():
        assert {ref["name"] for ref in auth["spec"]["secretTargetRef"]} == {"molar-llm-secrets"}


def test_kustomize_renders_the_manifests(manifests):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if IN_CI:
            pytest.fail("kubectl is missing; CI renders the manifests with kubectl kustomize")
        pytest.skip("kubectl is not installed")
    rendered = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s")], capture_output=True,
                              text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    docs = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    assert len(docs) == len(manifests)
    namespaced = [doc for doc in docs if doc["kind"] != "Namespace"]
    assert {doc["metadata"].get("namespace") for doc in namespaced} == {"molar-llm"}


def test_a_bad_command_is_caught_by_the_check():
    with pytest.raises(click.UsageError):
        check_command(["worker", "--capabilites", "planner"])
    with pytest.raises(ValueError, match="unknown capability"):
        check_command(["worker", "--capabilities", "planer"])
    with pytest.raises(AssertionError):
        check_command(["scale-out"])
