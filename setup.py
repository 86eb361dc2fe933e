"""Installs the top-level folders as `nanofleet.*` (DESIGN.md): agent/ → nanofleet.agent, and so on.

Packages (and data folders) are found, not listed, so a new subfolder is installed without touching this file.
"""

from setuptools import find_namespace_packages, setup

ROOTS = {"nanofleet": "nanofleet", "nanofleet.agent": "agent", "nanofleet.controller": "controller",
         "nanofleet.protos": "protos"}

packages = []
for name, folder in ROOTS.items():
    packages.append(name)
    # Namespace discovery so data-only folders (web/static) ship too, without setuptools' "ambiguous" warning.
    packages += [f"{name}.{sub}" for sub in find_namespace_packages(folder, exclude=["*__pycache__*"])]

setup(packages=packages, package_dir=ROOTS)
