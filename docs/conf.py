"""Sphinx configuration of the Orchester documentation."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "Orchester"
author = "The Orchester developers"
copyright = "2026, The Orchester developers (GPL-3.0-or-later)"
release = "0.1.0"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
html_theme = "alabaster"
exclude_patterns = ["_build"]
