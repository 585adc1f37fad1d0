#!/usr/bin/env bash
# Install the optional DenseCRF peer (pydensecrf2 1.1, source-only on PyPI) used by
# cucrf._peers, the comparison tests and the benchmarks.
#
# pydensecrf2 1.1 builds only with Cython 0.29 (Cython 3 fails on its .pyx files). Its
# pyproject pins Cython==0.29.36 for isolated builds, but that needs network access to fetch
# build dependencies, so we install a Cython 0.29 ourselves and build without isolation.
# Works with NumPy 2.x (tested: Python 3.11, NumPy 2.4, Cython 0.29.37, g++).
# Needs a C++ compiler (g++/clang++) and Python headers.
#
# Usage: scripts/install-densecrf.sh            (uses python3)
#        PYTHON=/path/to/venv/bin/python scripts/install-densecrf.sh
set -euo pipefail

PY="${PYTHON:-python3}"

"$PY" -m pip install "cython>=0.29,<3" setuptools wheel numpy
"$PY" -m pip install --no-build-isolation --no-cache-dir "pydensecrf2==1.1"

# Smoke test: one tiny inference.
"$PY" - <<'PYEOF'
import numpy as np
import pydensecrf.densecrf as dcrf

crf = dcrf.DenseCRF2D(4, 3, 2)
crf.setUnaryEnergy(np.ascontiguousarray(np.random.rand(2, 12), dtype=np.float32))
crf.addPairwiseGaussian(sxy=3, compat=3)
q = np.asarray(crf.inference(2))
assert q.shape == (2, 12) and np.allclose(q.sum(0), 1, atol=1e-4), q
print("pydensecrf OK")
PYEOF
