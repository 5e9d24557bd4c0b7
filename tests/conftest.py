"""Shared test settings: one hypothesis profile (no deadline: rank round trips vary; derandomized in CI)."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "dtensor_plus",
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("dtensor_plus")
