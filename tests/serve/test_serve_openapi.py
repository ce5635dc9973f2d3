"""The API's shape is a contract: its paths and methods are compared with a stored snapshot.

After an intended change, refresh it with ``VISIONFLOW_UPDATE_SNAPSHOT=1 pytest`` on this file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from visionflow.serve import ServeSettings, StaticSource, create_app

SNAPSHOT = Path(__file__).with_name("openapi_paths.json")


def test_openapi_paths_match_the_snapshot():
    app = create_app(ServeSettings(), source=StaticSource({}))
    spec = app.openapi()
    paths = {
        path: sorted(m.upper() for m in ops if m in {"get", "post", "put", "patch", "delete"})
        for path, ops in sorted(spec["paths"].items())
    }
    if os.environ.get("VISIONFLOW_UPDATE_SNAPSHOT"):
        SNAPSHOT.write_text(json.dumps(paths, indent=2) + "\n")
    assert paths == json.loads(SNAPSHOT.read_text())
    predict = spec["paths"]["/v1/models/{name}:predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
