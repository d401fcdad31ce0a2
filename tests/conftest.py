"""Settings for the whole test run."""

import os

# Models built by the tests would otherwise fill the user's cache with packed-weight files
# (one per random weights file); the tests of that cache pass their own directory.
os.environ["FASTVGG_PACKED_CACHE"] = "off"
