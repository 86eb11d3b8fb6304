"""moto's server with billing_local.moto_fixes applied: ``python -m bench.moto_linear -H HOST -p PORT``.

The linear-queue fix that used to live here is now in billing_local.moto_fixes, which every local moto
server gets (``billing local up``, ``billing demo``, the tests); this module stays as the name the
benchmarks start.
"""

from __future__ import annotations

from billing_local.moto_fixes import main, patch

__all__ = ["main", "patch"]

if __name__ == "__main__":
    main()
