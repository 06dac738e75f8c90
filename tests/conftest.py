"""Suite-wide settings, inherited by every process the tests start (spawn, torchrun, mpirun).

DIST_SOUP_COMPILE=0: the codecs' eager kernels compute exactly what the compiled ones do
(tests/test_compress_qsgd.py::test_compiled_matches_eager checks that, with compile on), and
every process would otherwise pay torch.compile's start-up (5-25 s) on its first large tensor.
"""

import os

os.environ["DIST_SOUP_COMPILE"] = "0"
os.environ.setdefault("OMP_NUM_THREADS", "1")
