"""The container files: the image installs what CI tests, and the compose file's services
fit together. (No container engine runs in the tests; linters checked both files.)"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PINNED = re.compile(r"\b(torch|torchvision)==([0-9.]+)")


def test_the_image_installs_the_torch_ci_tests():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert dict(PINNED.findall(dockerfile)) == dict(PINNED.findall(ci))
    assert set(dict(PINNED.findall(ci))) == {"torch", "torchvision"}
    assert 'ENTRYPOINT ["python", "-m", "cifar_exp.run"]' in dockerfile


def test_compose_services_fit_together():
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"db", "mlflow", "trainer"}
    for name in ("mlflow", "trainer"):
        build = services[name]["build"]
        assert (REPO / "docker" / build["context"] / build["dockerfile"]).is_file()
    assert services["trainer"]["entrypoint"][:3] == ["python", "-m", "cifar_exp.run"]
    assert "tracking.uri=http://mlflow:5000" in services["trainer"]["entrypoint"]
    assert services["mlflow"]["depends_on"]["db"]["condition"] == "service_healthy"
    # The UI is published on the host's loopback only (no authentication in front of it).
    assert services["mlflow"]["ports"] == ["127.0.0.1:5000:5000"]
    named = {volume.split(":")[0] for service in services.values()
             for volume in service.get("volumes", []) if not volume.startswith(("$", "."))}
    assert named <= set(compose["volumes"])
