"""The HTML pages' templates, with their CSS and JS, as package files an editor can highlight and check.

Pages stay self-contained: the writers inline these into each HTML file they write.
"""

from importlib.resources import files


def read_template(name: str) -> str:
    """The text of `fastsae/templates/<name>`, read from the installed package."""
    return files(__name__).joinpath(name).read_text(encoding="utf-8")
