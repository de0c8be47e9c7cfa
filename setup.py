"""Maps the repo's `kernels/` and `integrations/` folders to `anonloader.kernels` and
`anonloader.integrations` (a top-level `kernels` would collide with Hugging Face's `kernels`
distribution); everything else lives in pyproject.toml."""

from setuptools import find_namespace_packages, setup

MAPPED = {"kernels": "anonloader.kernels", "integrations": "anonloader.integrations"}

packages = find_namespace_packages(include=["anonloader", "anonloader.*"])
package_dir = {"anonloader": "anonloader"}
for folder, name in MAPPED.items():
    for sub in find_namespace_packages(include=[folder, f"{folder}.*"]):
        if "__pycache__" in sub:
            continue
        packages.append(name + sub[len(folder):])
    package_dir[name] = folder

setup(packages=[p for p in packages if "__pycache__" not in p], package_dir=package_dir)
