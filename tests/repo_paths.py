"""The repository's root and its files by repository-relative names: the tests pass from any
working directory."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repo_path(*parts: str) -> str:
  """The absolute path of a repository-relative one, e.g. repo_path("configs/tiny.py")."""
  return os.path.join(REPO, *parts)
