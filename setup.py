"""Packaging of Orchester: one distribution, five packages, two console scripts."""

from setuptools import find_packages, setup

# genx3 itself declares wxPython (a GUI toolkit that does not build headless): install it with
#   pip install --no-deps genx3==3.8.13
# after this extra, which brings its real headless dependencies (and matplotlib for the plots).
GENX = ["scipy>=1.10", "platformdirs>=3", "h5py>=3.8", "orsopy>=1.2.0", "pint>=0.22", "requests>=2.28",
        "matplotlib>=3.7"]
MPI = ["mpi4py>=3.1", "mpich"]
# GenX's kernels compiled by numba (satellites.genx_numba): the tests fetch it for their own satellites only
NUMBA = ["numba>=0.59"]
# a real Graphite carbon-cache for the metrics tests (operators run their own)
CARBON = ["carbon>=1.1", "whisper>=1.1"]
# Playwright drives Debian's chromium (tests/conftest.py installs it when missing): no browser download
# pytest-xdist: the suite runs in two worker processes (pyproject's addopts), a module (or class) to each at a time
TESTS = ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "hypothesis>=6.100", "ruff>=0.5", "mypy>=1.10",
         "sphinx>=7", "playwright>=1.40", *GENX, *MPI, *CARBON]
DOCS = ["sphinx>=7"]

setup(
    name="orchester",
    version="0.1.0",
    description="A ZeroMQ message bus that runs scientific tasks (GenX fits first) on satellites",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="GPL-3.0-or-later",
    python_requires=">=3.11",
    packages=find_packages(include=["orchester", "orchester.*", "satellites", "serializers", "tracker",
                                    "topology_tests"]),
    package_data={**{p: ["py.typed"] for p in ("orchester", "satellites", "serializers", "tracker", "topology_tests")},
                  "orchester.web": ["templates/*.html", "static/*"]},
    install_requires=[
        "pyzmq>=25",
        "msgpack>=1.0",
        "numpy>=1.24",
        "click>=8.1",
        "rich>=13",
        "transitions>=0.9",
        "tables>=3.9",
        "tornado>=6.4",
        "bokeh>=3.4",
    ],
    extras_require={"test": TESTS, "docs": DOCS, "genx": GENX, "mpi": MPI, "numba": NUMBA},
    entry_points={
        "console_scripts": [
            "orchester = orchester.cli.main:main",
            "satellite = satellites.cli:main",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "License :: OSI Approved :: GNU General Public License v3 or later (GPLv3+)",
        "Topic :: Scientific/Engineering",
        "Topic :: System :: Distributed Computing",
    ],
)
