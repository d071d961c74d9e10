"""environment.yml and the pip requirements must pin exactly the same packages."""
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines):
    out = {}
    for line in lines:
        line = line.split("#")[0].strip().lstrip("- ").strip()
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s]+)", line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def test_environment_yml_matches_requirements():
    req = _pins((ROOT / "requirements.txt").read_text().splitlines())
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert _pins(pip) == req


def test_data_packages_are_documented_in_environment_yml():
    data = _pins((ROOT / "requirements-data.txt").read_text().splitlines())
    text = (ROOT / "environment.yml").read_text()
    for name, version in data.items():
        assert f"{name}=={version}" in text


def test_torch_is_pinned_to_the_local_cpu_wheel():
    assert _pins((ROOT / "requirements.txt").read_text().splitlines())["torch"] == "2.13.0"
