"""The modules of the request path the optional compiled build (``KVMESH_COMPILE=1``,
``setup.py``) turns into C extensions with mypyc. A plain literal: ``setup.py`` reads it
without importing the package. Modules whose functions carry attributes set by a decorator
(aiohttp's ``@web.middleware``: ``mesh.api``, ``mesh.edge``, ``mesh.http_guard``) stay Python:
a compiled function has no ``__dict__``."""

NATIVE_MODULES = (
    "kvevents/keys.py",
    "mesh/calibration.py",
    "mesh/dispatch.py",
    "mesh/front.py",
    "mesh/lengths.py",
    "mesh/outcomes.py",
    "mesh/policies/base.py",
    "mesh/policies/headroom.py",
    "mesh/policies/risk.py",
    "mesh/policies/ttft.py",
    "mesh/prepare.py",
    "mesh/proxy.py",
    "mesh/router.py",
    "mesh/tiers.py",
    "mesh/ttft_error.py",
    "mesh/upstream.py",
    "mesh/view.py",
)
