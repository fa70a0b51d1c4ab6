"""Feature Atlas: the domain logic, one module per concern (see README's layout).

Importing the package pins how Intel MKL (torch's CPU BLAS here) computes, before torch
loads it: by default MKL may choose its code path by memory alignment and its thread
count dynamically, both known sources of run-to-run differences in the last bits. The
toy LM's weights once differed in low bits between two runs on a loaded machine (same
losses to 6 decimals); whether these settings remove that is what the reproducibility
test (tests/backbone/test_pipeline_e2e.py) keeps checking. A value already in the
environment wins.
"""

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # conditional numerical reproducibility
os.environ.setdefault("MKL_DYNAMIC", "FALSE")  # a fixed thread count
