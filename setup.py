"""Installs the top-level folders as `nanofleet.*` (DESIGN.md): agent/ → nanofleet.agent, and so on.

Packages are found, not listed, so a new subfolder with an __init__.py is installed without touching this file.
"""

from setuptools import find_packages, setup

ROOTS = {"nanofleet": "nanofleet", "nanofleet.agent": "agent", "nanofleet.controller": "controller",
         "nanofleet.protos": "protos"}

packages = []
for name, folder in ROOTS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=ROOTS)
