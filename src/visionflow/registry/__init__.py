"""The model registry: numbered versions of named models and the aliases servers follow.

```python
from visionflow.registry import Registry

registry = Registry.open("registry")
v = registry.add("animals.vfb", name="animals", aliases=["candidate"])
registry.promote("animals", v.version)  # production -> v1
model = registry.load("animals")        # verified, on ONNX Runtime
```
"""

from visionflow.registry.store import DEFAULT_ALIAS, ModelVersion, Registry

__all__ = ["DEFAULT_ALIAS", "ModelVersion", "Registry"]
