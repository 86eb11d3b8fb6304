"""The unit tier's Hypothesis profiles: a few examples per property while developing, more in `make test`.

`pytest tests/unit` (`make test-unit`) stays within seconds with 30 examples per property; `make test`
sets HYPOTHESIS_PROFILE=thorough, 300 each (the most any of them ran before the profiles). Either
profile first replays the failing examples Hypothesis keeps in .hypothesis/. No deadline: a property's
examples are pure computation, and a slow one on a loaded machine is not a failure.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("unit", max_examples=30, deadline=None)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "unit"))
